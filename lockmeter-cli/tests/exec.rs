//! `lockmeter exec` as a shell user runs it: real processes, flock(1), lslocks, signals.
#![allow(clippy::unwrap_used)]

use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lockmeter_testkit::cli::Cli;
use lockmeter_testkit::http::Unresponsive;
use lockmeter_testkit::proc::{self, send_line};
use lockmeter_testkit::tools::{command, path_of};
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
    assert_eq!(o.status.code(), Some(69), "flock(1)'s EX_UNAVAILABLE");
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
            vec!["exec", p(&link), "--", "true"],
            66,
            "--follow-symlinks",
        ),
        (vec!["exec", p(&file)], 64, "COMMAND"),
        (vec!["exec", p(&file), "--"], 64, "COMMAND"),
        (
            vec!["exec", "-w", "soon", p(&file), "--", "true"],
            64,
            "invalid timeout value",
        ),
        (
            vec!["exec", "-w", "-1", p(&file), "--", "true"],
            64,
            "cannot be negative",
        ),
        (
            vec!["exec", "--owner-record", "7"],
            64,
            "--owner-record needs a lock file path",
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
        .env("OTEL_METRICS_EXPORTER", "none")
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

// ---- side by side with util-linux flock(1) ---------------------------------------------------

/// What one run of flock(1) or `lockmeter exec` did.
#[derive(Debug)]
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl From<Output> for Ran {
    fn from(o: Output) -> Ran {
        Ran {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// flock(1) with ARGS in `dir` (`SHELL=/bin/sh`, as cron runs it).
fn flock_in(dir: &Path, args: &[&str]) -> Ran {
    command("flock")
        .args(args)
        .current_dir(dir)
        .env("SHELL", "/bin/sh")
        .output()
        .unwrap()
        .into()
}

/// `lockmeter exec ARGS` the same way, metrics off (so stderr is flock's and COMMAND's).
fn lockmeter_in(dir: &Path, args: &[&str]) -> Ran {
    lm().command(["exec"])
        .args(args)
        .current_dir(dir)
        .env("SHELL", "/bin/sh")
        .env("OTEL_METRICS_EXPORTER", "none")
        .output()
        .unwrap()
        .into()
}

/// How much of the two runs' output must agree.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Same {
    /// Status, stdout, and stderr (flock's first line, `flock:` read as `lockmeter:`, begins
    /// lockmeter's; lockmeter may add a hint after it).
    Everything,
    /// Status only: getopt's and clap's words for an unknown option differ; `-V` names the
    /// program.
    Status,
}

fn compare(dir: &Path, args: &[&str], expect: i32, same: Same) {
    let f = flock_in(dir, args);
    let l = lockmeter_in(dir, args);
    assert_eq!(f.code, Some(expect), "flock {args:?}: {f:?}");
    assert_eq!(
        l.code, f.code,
        "lockmeter exec {args:?}: {l:?}\nflock: {f:?}"
    );
    if same == Same::Status {
        return;
    }
    assert_eq!(l.stdout, f.stdout, "{args:?}: stdout");
    match f.stderr.lines().next() {
        None => assert_eq!(l.stderr, "", "{args:?}: flock printed nothing on stderr"),
        Some(first) => {
            let want = match first.strip_prefix("flock: ") {
                Some(msg) => format!("lockmeter: {msg}"),
                None => first.to_owned(), // COMMAND's own stderr
            };
            let got = l.stderr.lines().next().unwrap_or_default();
            assert!(
                got.starts_with(&want),
                "{args:?}: stderr\n  flock:     {first:?}\n  lockmeter: {got:?}"
            );
        }
    }
}

#[test]
fn every_form_and_option_exits_and_speaks_as_flock_does() {
    if !require_tool("flock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    use Same::{Everything as E, Status as S};
    let cases: &[(&[&str], i32, Same)] = &[
        // Usage.
        (&[], 64, E),
        (&["-n"], 64, E),
        (&["f.lock"], 64, E),
        (&["99999999999"], 64, E),
        (&["-w", "soon", "f.lock", "true"], 64, E),
        (&["-E", "300", "f.lock", "true"], 64, E),
        (&["-E", "x", "f.lock", "true"], 64, E),
        (&["f.lock", "-c"], 64, E),
        (&["f.lock", "-c", "a", "b"], 64, E),
        (&["f.lock", "--command", "a", "b"], 64, E),
        (&["-F", "-o", "f.lock", "true"], 64, E),
        (&["-c", "true", "f.lock"], 64, S),
        (&["--bogus", "f.lock", "true"], 64, S),
        (&["-V"], 0, S),
        // Descriptors, files, directories, commands.
        (&["97"], 65, E),
        (&["nodir/x.lock", "true"], 66, E),
        (&["f.lock", "no-such-command-xyz"], 69, E),
        (&["f.lock", "-n", "true"], 69, E), // options after FILE are COMMAND's
        (
            &["f.lock", "sh", "-c", "echo out; echo err >&2; exit 7"],
            7,
            E,
        ),
        (&["f.lock", "-c", "echo $0 ran; exit 3"], 3, E),
        (&["f.lock", "--command", "echo ran"], 0, E),
        (&["d", "echo", "dir"], 0, E),
        (&["-s", "d", "true"], 0, E),
        (&["--", "f.lock", "echo", "x"], 0, E),
        (&["-s", "f.lock", "true"], 0, E),
        (&["-x", "-s", "-e", "f.lock", "true"], 0, E),
        (&["-u", "f.lock", "echo", "unlocked"], 0, E),
        (&["-o", "f.lock", "true"], 0, E),
        (&["-F", "f.lock", "sh", "-c", "exit 4"], 4, E),
        (&["-F", "f.lock", "no-such-command-xyz"], 69, E),
        (&["--nb", "f.lock", "true"], 0, E),
        (&["--nonblocking", "f.lock", "true"], 0, E),
        (&["--wait", "1", "f.lock", "true"], 0, E),
        (
            &["--timeout=1", "--conflict-exit-code=9", "f.lock", "true"],
            0,
            E,
        ),
        (&["-nw5", "f.lock", "true"], 0, E),
        (&["-w", "0", "f.lock", "true"], 0, E),
        (&["f.lock", "sh", "-c", "kill -TERM $$"], 143, E),
    ];
    for (args, code, same) in cases {
        compare(dir.path(), args, *code, *same);
    }

    // Against a holder: conflicts, timeouts, -E, the verbose reasons.
    let lock = dir.path().join("f.lock");
    let holder = flock_holder(&lock, false);
    let busy: &[(&[&str], i32)] = &[
        (&["-n", "f.lock", "true"], 1),
        (&["-n", "-E", "42", "f.lock", "true"], 42),
        (&["-w", "0.2", "f.lock", "true"], 1),
        (&["-w", "0", "-E", "5", "f.lock", "true"], 5),
        (&["-n", "-w", "5", "f.lock", "true"], 1), // -n wins
        (&["--verbose", "-n", "f.lock", "true"], 1),
        (&["--verbose", "-w", "0.1", "f.lock", "true"], 1),
        (&["-s", "-n", "f.lock", "true"], 1),
        (&["-u", "f.lock", "echo", "no lock needed"], 0),
    ];
    for (args, code) in busy {
        compare(dir.path(), args, *code, Same::Everything);
    }
    release_flock_holder(holder);
    let holder = flock_holder(&lock, true);
    compare(
        dir.path(),
        &["-s", "-n", "f.lock", "true"],
        0,
        Same::Everything,
    );
    compare(dir.path(), &["-n", "f.lock", "true"], 1, Same::Everything);
    release_flock_holder(holder);
}

/// `/proc/locks` entries on `path`'s inode: (type, mode, waiting).
fn kernel_locks(path: &Path) -> Vec<(String, String, bool)> {
    let meta = std::fs::metadata(path).unwrap();
    let id = format!(
        "{:02x}:{:02x}:{}",
        rustix::fs::major(meta.dev()),
        rustix::fs::minor(meta.dev()),
        meta.ino()
    );
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().skip(1).collect();
            let (blocked, f) = match f.first() {
                Some(&"->") => (true, &f[1..]),
                _ => (false, &f[..]),
            };
            (f.len() >= 5 && f[4] == id).then(|| (f[0].to_owned(), f[2].to_owned(), blocked))
        })
        .collect()
}

#[test]
fn the_kernel_sees_the_same_lock_as_with_flock() {
    if !require_tool("flock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("k.lock");
    let sub = dir.path().join("k.dir");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(&file, b"").unwrap();
    let flock = path_of("flock");
    // Each form holds the lock until told to go; "ready" once it is held.
    let forms: Vec<(&str, Vec<String>, &Path)> = vec![
        ("file", vec![p(&file).into()], &file),
        ("file shared", vec!["-s".into(), p(&file).into()], &file),
        ("directory", vec![p(&sub).into()], &sub),
        ("directory shared", vec!["-s".into(), p(&sub).into()], &sub),
    ];
    for (what, args, target) in forms {
        let script = "echo ready; read _";
        let mut by_flock = Command::new(&flock);
        by_flock.args(&args).args(["sh", "-c", script]);
        let mut by_lockmeter = lm().command(["exec"]);
        by_lockmeter.args(&args).args(["sh", "-c", script]);
        let mut seen = Vec::new();
        for mut c in [by_flock, by_lockmeter] {
            let (mut child, _) = proc::spawn_ready(c.stderr(Stdio::null()), "ready");
            seen.push(kernel_locks(target));
            assert!(!flock_cli_can_lock(target) || what.ends_with("shared"));
            send_line(&mut child, "");
            assert!(child.wait().unwrap().success(), "{what}");
            assert!(kernel_locks(target).is_empty(), "{what}: released");
        }
        assert!(!seen[0].is_empty(), "{what}: flock(1) holds a lock");
        assert_eq!(seen[1], seen[0], "{what}: lockmeter vs flock(1)");
    }
    // The descriptor form: the lock is the shell's, and outlives the locking process.
    for (what, redirect, flag) in [("fd", ">", ""), ("fd shared", "<", "-s")] {
        let mut seen = Vec::new();
        for locker in [
            format!("{} {flag}", flock.display()),
            format!("\"$LOCKMETER\" exec {flag}"),
        ] {
            let script = format!(
                "exec 9{redirect}'{}'; {locker} 9 || exit 9; echo ready; read _",
                p(&file)
            );
            let (mut child, _) =
                proc::spawn_ready(lm().shell(&script).stderr(Stdio::null()), "ready");
            seen.push(kernel_locks(&file));
            assert!(!flock_cli_can_lock(&file), "{what}: the shell holds it");
            send_line(&mut child, "");
            assert!(child.wait().unwrap().success(), "{what}");
            assert!(
                kernel_locks(&file).is_empty(),
                "{what}: gone with the shell"
            );
        }
        assert!(!seen[0].is_empty());
        assert_eq!(seen[1], seen[0], "{what}: lockmeter vs flock(1)");
    }
    // --fcntl (util-linux 2.40+; this flock(1) may predate it): an OFD lock.
    let mut c = lm().exec_ready(&["--fcntl"], &file, "echo ready; read _");
    assert_eq!(
        kernel_locks(&file),
        [("OFDLCK".to_owned(), "WRITE".to_owned(), false)]
    );
    send_line(&mut c, "");
    assert!(c.wait().unwrap().success());
}

#[test]
fn the_descriptor_form_locks_and_unlocks_the_shells_descriptor_as_flock_does() {
    if !require_tool("flock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fd.lock");
    std::fs::write(&file, b"").unwrap();
    let flock = path_of("flock");
    // The same script with each locker; `flock -n` from outside the shell probes the lock.
    let script = |locker: &str| {
        format!(
            r#"probe() {{ {flock} -n '{f}' true; echo "$1 $?"; }}
            exec 9>'{f}'
            {locker} -n 9; echo "locked $?"; probe "other, while the shell holds it:"
            {locker} -u 9; echo "unlocked $?"; probe "other, after -u:"
            {locker} 8; echo "closed descriptor $?"
            {locker} -s 9; echo "shared $?"
            {flock} -n -s '{f}' true; echo "another shared $?"
            exec 9>&-; probe "after the shell closed it:""#,
            flock = flock.display(),
            f = p(&file)
        )
    };
    let by_flock = lm()
        .shell(&script(&flock.display().to_string()))
        .output()
        .unwrap();
    let by_lockmeter = lm()
        .shell(&script("\"$LOCKMETER\" exec"))
        .env("OTEL_METRICS_EXPORTER", "none")
        .output()
        .unwrap();
    let out = |o: &Output| String::from_utf8_lossy(&o.stdout).into_owned();
    let err = |o: &Output| String::from_utf8_lossy(&o.stderr).replace("flock: ", "lockmeter: ");
    assert_eq!(
        out(&by_flock),
        "locked 0\nother, while the shell holds it: 1\nunlocked 0\nother, after -u: 0\n\
         closed descriptor 65\nshared 0\nanother shared 0\nafter the shell closed it: 0\n"
    );
    assert_eq!(out(&by_lockmeter), out(&by_flock));
    assert_eq!(err(&by_lockmeter), err(&by_flock), "8: Bad file descriptor");

    // Against a holder: conflict, timeout and -E, as flock(1).
    let holder = flock_holder(&file, false);
    let busy = |locker: &str| {
        format!(
            r#"exec 9>'{f}'; {locker} -n 9; echo "n $?"; {locker} -w 0.2 -E 7 9; echo "w $?"; {locker} --verbose -n 9 2>&1 | sed 's/^[a-z]*: //'"#,
            f = p(&file)
        )
    };
    let by_flock = lm()
        .shell(&busy(&flock.display().to_string()))
        .output()
        .unwrap();
    let by_lockmeter = lm()
        .shell(&busy("\"$LOCKMETER\" exec"))
        .env("OTEL_METRICS_EXPORTER", "none")
        .output()
        .unwrap();
    assert_eq!(out(&by_flock), "n 1\nw 7\nfailed to get lock\n");
    assert_eq!(out(&by_lockmeter), out(&by_flock));
    release_flock_holder(holder);
}

#[test]
fn no_fork_becomes_the_command_which_keeps_the_lock() {
    if !require_tool("flock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("nofork.lock");
    let (mut c, line) = proc::spawn_ready(
        lm().command(["exec", "-F"])
            .arg(&lock)
            .args(["sh", "-c", "echo ready $$; read _; exit 6"])
            .env("OTEL_METRICS_EXPORTER", "none"),
        "ready",
    );
    assert_eq!(
        line,
        format!("ready {}", c.id()),
        "COMMAND runs in lockmeter's process"
    );
    assert!(!flock_cli_can_lock(&lock));
    send_line(&mut c, "");
    assert_eq!(c.wait().unwrap().code(), Some(6));
    assert!(flock_cli_can_lock(&lock));
    // Every kind stays locked in COMMAND, POSIX too (the process stays the same, and its
    // descriptor must stay open across the exec).
    for (kind, shown) in [("flock", "FLOCK"), ("ofd", "OFDLCK"), ("posix", "POSIX")] {
        let (mut c, _) = proc::spawn_ready(
            lm().command(["exec", "-F", "--kind", kind])
                .arg(&lock)
                .args(["sh", "-c", "echo ready; read _"])
                .env("OTEL_METRICS_EXPORTER", "none"),
            "ready",
        );
        let held = kernel_locks(&lock);
        assert_eq!(held.len(), 1, "{kind}: {held:?}");
        assert_eq!(held[0].0, shown, "{kind}");
        send_line(&mut c, "");
        assert!(c.wait().unwrap().success());
        assert!(kernel_locks(&lock).is_empty(), "{kind}: released at exit");
    }
    // Without -F, COMMAND is a child.
    let (mut c, line) = proc::spawn_ready(
        lm().command(["exec"])
            .arg(&lock)
            .args(["sh", "-c", "echo ready $$; read _"])
            .env("OTEL_METRICS_EXPORTER", "none"),
        "ready",
    );
    assert_ne!(line, format!("ready {}", c.id()));
    send_line(&mut c, "");
    assert!(c.wait().unwrap().success());
}

#[test]
fn verbose_says_what_flock_says_and_what_the_lock_is() {
    if !require_tool("flock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let normalize = |text: &str, prog: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(&format!("{prog}: ")))
            .map(|l| {
                // The time taken differs run to run.
                let mut w: Vec<&str> = l.split(' ').collect();
                if l.starts_with("getting lock took") {
                    w[3] = "N";
                }
                w.join(" ")
            })
            .collect()
    };
    let f = flock_in(dir.path(), &["--verbose", "v.lock", "true"]);
    let l = lockmeter_in(
        dir.path(),
        &["--verbose", "--owner-record", "v.lock", "true"],
    );
    assert_eq!((f.code, l.code), (Some(0), Some(0)));
    let (fl, ll) = (
        normalize(&f.stdout, "flock"),
        normalize(&l.stdout, "lockmeter"),
    );
    assert_eq!(
        fl,
        ["getting lock took N seconds", "executing true"],
        "{f:?}"
    );
    // flock's lines, in flock's order, and one more: kind, mode, file-system trust, token.
    let extra: Vec<&String> = ll.iter().filter(|l| !fl.contains(l)).collect();
    assert_eq!(
        ll.iter().filter(|l| fl.contains(l)).collect::<Vec<_>>(),
        fl.iter().collect::<Vec<_>>(),
        "{l:?}"
    );
    assert_eq!(extra.len(), 1, "{ll:?}");
    let lock_line = extra[0];
    assert!(
        lock_line.starts_with("lock: flock exclusive on v.lock")
            && lock_line.contains("host-wide")
            && lock_line.ends_with("fencing token 1"),
        "{lock_line}"
    );
    let took = l
        .stdout
        .lines()
        .find_map(|x| x.strip_prefix("lockmeter: getting lock took "))
        .unwrap();
    let secs: f64 = took.trim_end_matches(" seconds").parse().unwrap();
    assert!(took.split('.').nth(1).unwrap().len() == 6 + " seconds".len() && secs < 60.0);
}

#[test]
fn symlinks_are_refused_unless_followed_on_purpose() {
    if !require_tool("flock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A link planted where the lock file should be, pointing at someone's file.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious\n").unwrap();
    let planted = dir.path().join("job.lock");
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    let o = lm()
        .command(["exec", "--owner-record"])
        .arg(&planted)
        .arg("true")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(66));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--follow-symlinks"),
        "{o:?}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious\n", "untouched");
    // A dangling link would have made flock(1) create its target: lockmeter does not.
    let dangling = dir.path().join("dangling.lock");
    let target = dir.path().join("created-by-following");
    std::os::unix::fs::symlink(&target, &dangling).unwrap();
    assert_eq!(run(&["exec", p(&dangling), "true"]).status.code(), Some(66));
    assert!(!target.exists());
    // Opted in: the target is locked (and created), as with flock(1).
    let mut c = lm().exec_ready(&["--follow-symlinks"], &dangling, "echo ready; read _");
    assert!(target.exists());
    assert!(!flock_cli_can_lock(&target), "the link's target is locked");
    send_line(&mut c, "");
    assert!(c.wait().unwrap().success());
}

// ---- telemetry for a short-lived command ---------------------------------------------------

fn not_delivered_notes(o: &Output) -> usize {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| l.contains("not delivered"))
        .count()
}

#[test]
fn metrics_that_go_nowhere_are_mentioned_once() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("note.lock");
    let o = lm()
        .command(["exec"])
        .arg(&lock)
        .arg("true")
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(not_delivered_notes(&o), 1, "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("OTEL_EXPORTER_OTLP_ENDPOINT"),
        "{o:?}"
    );
    // A conflict is a metric too.
    let o = lm()
        .command(["exec", "-n"])
        .arg(&lock)
        .arg("true")
        .env("OTEL_METRICS_EXPORTER", "none")
        .output()
        .unwrap();
    assert_eq!((o.status.code(), not_delivered_notes(&o)), (Some(0), 0));
    // A Prometheus endpoint nobody scraped before exit delivered nothing either.
    let o = lm()
        .command(["exec"])
        .arg(&lock)
        .arg("true")
        .env("OTEL_METRICS_EXPORTER", "prometheus")
        .env("OTEL_EXPORTER_PROMETHEUS_PORT", "0")
        .output()
        .unwrap();
    assert_eq!(not_delivered_notes(&o), 1, "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("nothing scraped http://127.0.0.1:"),
        "{o:?}"
    );
    // Scraped while COMMAND ran: delivered, nothing to say.
    let port = free_port();
    let mut c = lm().command(["exec"]);
    c.arg(&lock)
        .args(["sh", "-c", "echo ready; read _"])
        .env("OTEL_METRICS_EXPORTER", "prometheus")
        .env("OTEL_EXPORTER_PROMETHEUS_PORT", port.to_string())
        .stderr(Stdio::piped());
    let (mut child, _) = proc::spawn_ready(&mut c, "ready");
    lockmeter_testkit::http_get_eventually(&format!("http://127.0.0.1:{port}/metrics"));
    send_line(&mut child, "");
    let o = child.wait_with_output().unwrap();
    assert_eq!(not_delivered_notes(&o), 0, "{o:?}");
}

#[test]
fn a_collector_that_never_answers_costs_at_most_the_timeout_after_the_lock_is_released() {
    if !require_tool("flock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("hung.lock");
    // Whenever lockmeter connects to deliver, is the lock already free?
    let probe = lock.clone();
    let collector = Unresponsive::start(move || flock_cli_can_lock(&probe));
    for (protocol, timeout, bound) in [
        ("grpc", None, Duration::from_secs(2)),
        ("http/protobuf", None, Duration::from_secs(2)),
        ("grpc", Some("300"), Duration::from_millis(300)),
    ] {
        let mut c = lm().command(["exec"]);
        c.arg(&lock)
            .args(["sh", "-c", "exit 5"])
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint())
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol);
        if let Some(ms) = timeout {
            c.env("OTEL_EXPORTER_OTLP_TIMEOUT", ms);
        }
        let connections_before = collector.seen().len();
        let start = Instant::now();
        let o = c.output().unwrap();
        let took = start.elapsed();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(5), "{protocol}: {err}");
        // The bound, plus start-up and the command on a busy 2-core machine.
        assert!(
            took < bound + Duration::from_millis(900),
            "{protocol} {timeout:?}: took {took:?}, bound {bound:?}: {err}"
        );
        let warning: Vec<&str> = err.lines().filter(|l| l.contains("warning")).collect();
        assert_eq!(warning.len(), 1, "{protocol}: one warning: {err}");
        assert!(
            warning[0].contains(&collector.endpoint())
                && warning[0].contains(&format!("({protocol})"))
                && warning[0].contains("no answer within"),
            "{protocol}: the warning names endpoint, protocol and what happened: {err}"
        );
        let seen = collector.seen();
        assert!(
            seen.len() > connections_before,
            "{protocol}: lockmeter tried to deliver"
        );
        assert!(
            seen[connections_before..].iter().all(|free| *free),
            "{protocol}: the lock was still held while delivering"
        );
    }
}
