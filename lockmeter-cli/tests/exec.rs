//! `lockmeter exec` as a shell user runs it: real processes, flock(1), lslocks, signals.
#![allow(clippy::unwrap_used)]

use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::{Child, Output, Stdio};

use lockmeter_testkit::cli::Cli;
use lockmeter_testkit::proc::send_line;
use lockmeter_testkit::tools::command;
use lockmeter_testkit::{
    eventually, flock_cli_can_lock, flock_holder, free_port, release_flock_holder, require_tool,
};

fn lm() -> Cli {
    Cli::new(env!("CARGO_BIN_EXE_lockmeter"))
}

fn run(args: &[&str]) -> Output {
    lm().output(args)
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `lockmeter exec FLAGS LOCK -- sh -c 'echo ready; SCRIPT'`, started and ready.
fn spawn_ready(flags: &[&str], lock: &Path, script: &str) -> Child {
    lm().exec_ready(flags, lock, &format!("echo ready; {script}"))
}

#[test]
fn exit_status_of_command_passes_through() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("a.lock");
    let o = run(&["exec", p(&lock), "--", "sh", "-c", "exit 7"]);
    assert_eq!(o.status.code(), Some(7));
    let o = run(&["exec", p(&lock), "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(o.status.code(), Some(128 + 15), "killed by SIGTERM -> 143");
    let o = run(&["exec", p(&lock), "true"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "the -- is optional, as in flock(1)"
    );
    let o = run(&["exec", p(&lock), "--", "no-such-command-xyz"]);
    assert_eq!(o.status.code(), Some(127));
}

#[test]
fn conflict_and_timeout_exit_without_running_command() {
    if !require_tool("flock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("b.lock");
    let marker = dir.path().join("ran");
    let touch = ["touch", p(&marker)];
    let holder = flock_holder(&lock, false);
    let cases: [(&[&str], i32); 4] = [
        (&["-n"], 1),
        (&["-n", "-E", "42"], 42),
        (&["--nonblock", "--conflict-exit-code", "3"], 3),
        (&["-w", "0.2"], 1),
    ];
    for (flags, code) in cases {
        let o = lm()
            .command(["exec"])
            .args(flags)
            .arg(&lock)
            .arg("--")
            .args(touch)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(code), "{flags:?}");
        assert!(!marker.exists(), "{flags:?}: COMMAND must not run");
    }
    // Shared vs shared coexist; shared vs exclusive does not.
    release_flock_holder(holder);
    let holder = flock_holder(&lock, true);
    assert_eq!(
        run(&["exec", "-s", "-n", p(&lock), "--", "true"])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        run(&["exec", "-x", "-n", p(&lock), "--", "true"])
            .status
            .code(),
        Some(1)
    );
    release_flock_holder(holder);
    assert_eq!(
        run(&["exec", "-w", "5", p(&lock), "--"]
            .iter()
            .copied()
            .chain(touch)
            .collect::<Vec<_>>())
        .status
        .code(),
        Some(0)
    );
    assert!(marker.exists());
}

#[test]
fn lock_is_held_while_command_runs() {
    if !require_tool("flock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("c.lock");
    let mut c = spawn_ready(&[], &lock, "read _");
    assert!(!flock_cli_can_lock(&lock));
    send_line(&mut c, "");
    assert!(c.wait().unwrap().success());
    assert!(flock_cli_can_lock(&lock), "released after COMMAND exits");
    // Shared mode: a shared flock(1) gets in, an exclusive one does not.
    let o = run(&[
        "exec",
        "-s",
        p(&lock),
        "--",
        "flock",
        "-n",
        "-s",
        p(&lock),
        "true",
    ]);
    assert_eq!(o.status.code(), Some(0));
    let o = run(&[
        "exec",
        "-s",
        p(&lock),
        "--",
        "flock",
        "-n",
        p(&lock),
        "true",
    ]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn command_inherits_the_lock_when_lockmeter_is_killed() {
    if !require_tool("flock") {
        return;
    }
    for kind in ["flock", "ofd"] {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("d.lock");
        let mut c = spawn_ready(&["--kind", kind], &lock, "exec cat");
        let mut stdin = c.stdin.take();
        c.kill().unwrap(); // SIGKILL lockmeter; `cat` lives on with the descriptor
        c.wait().unwrap();
        let ino = std::fs::metadata(&lock).unwrap().ino();
        assert!(lock_listed(ino), "{kind}: the command still holds the lock");
        if kind == "flock" {
            assert!(!flock_cli_can_lock(&lock));
        }
        drop(stdin.take()); // cat sees EOF and exits; its descriptor closes
        eventually("the orphaned command to exit", || !lock_listed(ino));
    }
}

#[test]
fn close_flag_keeps_the_lock_out_of_command() {
    if !require_tool("flock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("e.lock");
    let mut c = spawn_ready(&["-o"], &lock, "exec cat");
    let stdin = c.stdin.take();
    c.kill().unwrap();
    c.wait().unwrap();
    assert!(
        flock_cli_can_lock(&lock),
        "with -o the lock dies with lockmeter"
    );
    drop(stdin);
}

fn lock_listed(ino: u64) -> bool {
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(|l| {
            l.split_whitespace()
                .nth(5)
                .is_some_and(|f| f.ends_with(&format!(":{ino}")))
        })
}

#[test]
fn signals_are_forwarded_to_command() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("f.lock");
    // Traps first, then `ready`: a signal sent after `ready` must find them installed.
    let script = r#"trap "exit 41" INT; trap "exit 42" TERM; trap "exit 43" HUP; echo ready; while :; do sleep 0.05; done"#;
    for (sig, code) in [
        (rustix::process::Signal::INT, 41),
        (rustix::process::Signal::TERM, 42),
        (rustix::process::Signal::HUP, 43),
    ] {
        let mut c = lm().exec_ready(&[], &lock, script);
        let pid = rustix::process::Pid::from_raw(c.id() as i32).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
        assert_eq!(c.wait().unwrap().code(), Some(code), "{sig:?}");
    }
    // A command without handlers dies of the forwarded signal: 128 + N.
    let mut c = spawn_ready(&[], &lock, "exec sleep 600");
    let pid = rustix::process::Pid::from_raw(c.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert_eq!(c.wait().unwrap().code(), Some(143));
}

#[test]
fn each_kind_shows_in_lslocks() {
    if !require_tool("lslocks") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (kind, shown) in [("flock", "FLOCK"), ("ofd", "OFDLCK"), ("posix", "POSIX")] {
        let lock = dir.path().join(format!("{kind}.lock"));
        let mut c = spawn_ready(&["--kind", kind], &lock, "read _");
        let ino = std::fs::metadata(&lock).unwrap().ino().to_string();
        let out = command("lslocks")
            .args(["--noheadings", "--raw", "-o", "TYPE,INODE"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == [shown, &ino]),
            "{kind}: {text}"
        );
        send_line(&mut c, "");
        assert!(c.wait().unwrap().success());
    }
}

#[test]
fn bad_input_is_one_line_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("real.lock");
    std::fs::write(&file, b"").unwrap();
    let link = dir.path().join("link.lock");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    let missing = dir.path().join("nodir/x.lock");
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["exec", p(&missing), "--", "true"], 66, "nodir/x.lock"),
        (
            vec!["exec", p(dir.path()), "--", "true"],
            66,
            "is a directory",
        ),
        (vec!["exec", p(&link), "--", "true"], 66, "symbolic link"),
        (vec!["exec", p(&file)], 64, "COMMAND"),
        (vec!["exec", p(&file), "--"], 64, "COMMAND"),
        (
            vec!["exec", "-w", "soon", p(&file), "--", "true"],
            64,
            "--timeout",
        ),
        (
            vec!["exec", "-w", "-1", p(&file), "--", "true"],
            64,
            "--timeout",
        ),
        (
            vec!["exec", "--kind", "mandatory", p(&file), "--", "true"],
            64,
            "--kind",
        ),
    ];
    for (args, code, needle) in cases {
        let o = run(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line, got {err:?}");
        assert!(
            err.contains(needle),
            "{args:?}: {err:?} should mention {needle}"
        );
    }
}

#[test]
fn stdin_and_stdout_are_the_commands() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("io.lock");
    let mut c = lm()
        .command(["exec", p(&lock), "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    send_line(&mut c, "hello");
    let mut out = String::new();
    c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert_eq!(out, "hello\n");
    assert!(c.wait().unwrap().success());
}

#[test]
fn an_unreachable_collector_is_a_warning_not_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("otlp.lock");
    // A port nothing listens on: bind one, note it, close it.
    let port = free_port();
    for proto in ["grpc", "http/protobuf"] {
        let o = lm()
            .command(["exec", p(&lock), "--", "sh", "-c", "exit 5"])
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{port}"),
            )
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", proto)
            .output()
            .unwrap();
        assert_eq!(
            o.status.code(),
            Some(5),
            "{proto}: COMMAND's status still passes through"
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("warning") && err.contains("telemetry"),
            "{proto}: {err}"
        );
    }
}
