//! `lockmeter probe`, `who` and `exec --owner-record/--watch` on real mounts: split-brain and
//! lock-forwarding bindfs, a local file system, held and waiting processes.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;

use lockmeter_testkit::cli::{text as out, Cli};
use lockmeter_testkit::proc::{read_stderr_line_containing, send_line};
use lockmeter_testkit::tools::command;
use lockmeter_testkit::{eventually, flock_holder, release_flock_holder, require_tool, Bindfs};

fn lm() -> Cli {
    Cli::new(env!("CARGO_BIN_EXE_lockmeter"))
}

#[test]
fn probe_fails_on_split_brain_mounts_with_the_reason() {
    let Some(bf) = Bindfs::new(&[]) else { return };
    let (a, b) = (bf.a().join("p.lock"), bf.b().join("p.lock"));
    let o = lm()
        .command(["probe"])
        .arg(&a)
        .arg("--peer")
        .arg(&b)
        .output()
        .unwrap();
    let text = out(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains("NOT TRUSTED") && text.contains("split brain"),
        "{text}"
    );
    assert!(text.contains("flock NO"), "{text}");
    // Without a peer, FUSE alone cannot be trusted either: the mount table cannot tell.
    let o = lm().command(["probe"]).arg(&a).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains("--peer"), "{}", out(&o));
    // JSON for scripts.
    let o = lm()
        .command(["probe"])
        .arg("--json")
        .arg(&a)
        .arg("--peer")
        .arg(&b)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["trusted"], false);
    assert_eq!(v["fs_type"], "fuse");
    assert_eq!(v["excludes_across_peer"]["flock"], false);
    assert_eq!(v["excludes_on_path"]["flock"], true);
}

#[test]
fn probe_passes_flock_on_lock_forwarding_mounts_and_catches_posix() {
    let Some(bf) = Bindfs::new(&["--multithreaded", "--enable-lock-forwarding"]) else {
        return;
    };
    let (a, b) = (bf.a().join("p.lock"), bf.b().join("p.lock"));
    let o = lm()
        .command(["probe", "--kind", "flock"])
        .arg(&a)
        .arg("--peer")
        .arg(&b)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(out(&o).contains("can be trusted"));
    // bindfs re-issues forwarded POSIX/OFD locks from its own process: they exclude nobody,
    // not even two processes on the same mount. The probe must say so.
    let o = lm()
        .command(["probe"])
        .arg(&a)
        .arg("--peer")
        .arg(&b)
        .output()
        .unwrap();
    let text = out(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains("posix: a lock on") && text.contains("does not exclude another process"),
        "{text}"
    );
}

#[test]
fn probe_trusts_a_local_file_system() {
    let dir = tempfile::tempdir().unwrap();
    let o = lm()
        .command(["probe"])
        .arg(dir.path().join("x.lock"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(out(&o).contains("host-wide"));
    let o = lm()
        .command(["probe"])
        .arg(dir.path().join("no/such/dir/x.lock"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(66));
}

#[test]
fn rendezvous_detects_split_brain_between_two_probes() {
    let Some(bf) = Bindfs::new(&[]) else { return };
    // Two "hosts" probing one shared file, each through its own mount.
    let run = |mine: std::path::PathBuf, theirs: std::path::PathBuf| {
        lm().command(["probe", "--kind", "flock", "--rendezvous", "1.5"])
            .arg(mine.join("r.lock"))
            .arg("--peer")
            .arg(theirs.join("r.lock"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (pa, pb) = (run(bf.a(), bf.b()), run(bf.b(), bf.a()));
    let (oa, ob) = (
        pa.wait_with_output().unwrap(),
        pb.wait_with_output().unwrap(),
    );
    let all = format!("{}\n{}", out(&oa), out(&ob));
    assert!(all.contains("split brain:"), "{all}");
    assert!(oa.status.code() == Some(1) || ob.status.code() == Some(1));

    // bindfs was there a moment ago: no second chance to skip half-way through.
    let fwd = Bindfs::new(&["--multithreaded", "--enable-lock-forwarding"]).unwrap();
    let (pa, pb) = (run(fwd.a(), fwd.b()), run(fwd.b(), fwd.a()));
    let (oa, ob) = (
        pa.wait_with_output().unwrap(),
        pb.wait_with_output().unwrap(),
    );
    assert_eq!(oa.status.code(), Some(0), "{}", out(&oa));
    assert_eq!(ob.status.code(), Some(0), "{}", out(&ob));
}

#[test]
fn who_shows_the_owner_record_holders_and_waiters() {
    if !require_tool("flock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("who.lock");
    let mut holder = lm().exec_ready(
        &["--owner-record", "--name", "nightly-job"],
        &lock,
        "echo ready; read _",
    );
    let mut waiter = command("flock").arg(&lock).arg("true").spawn().unwrap();
    eventually("the waiter to block", || {
        std::fs::read_to_string("/proc/locks")
            .unwrap()
            .contains(&format!("-> FLOCK  ADVISORY  WRITE {}", waiter.id()))
    });
    // Local time: TZ=UTC-9 is nine hours east of UTC (POSIX TZ, no zone files needed).
    let o = lm()
        .command(["who"])
        .arg(&lock)
        .env("TZ", "UTC-9")
        .output()
        .unwrap();
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains(&format!("pid {} (running)", holder.id())),
        "{text}"
    );
    assert!(text.contains("fence 1"), "{text}");
    assert!(text.contains("name:       nightly-job"), "{text}");
    let owner = text.lines().find(|l| l.starts_with("owner:")).unwrap();
    let held = regex_like_age(owner, "held for ");
    assert!(owner.contains(" +0900 (held for "), "{owner}");
    assert!(held.is_some(), "an age such as 12ms or 3m12s: {owner}");
    // The holder's and the waiter's command lines, the waiter's wait so far.
    assert!(
        text.contains("command: ") && text.contains("--name nightly-job"),
        "{text}"
    );
    let waiting = text
        .lines()
        .find(|l| l.contains("waiting") && l.contains(&format!("pid {}", waiter.id())))
        .unwrap_or_else(|| panic!("no waiter line: {text}"));
    assert!(regex_like_age(waiting, "waiting ").is_some(), "{waiting}");
    assert!(
        text.contains("FLOCK") && text.contains("held") && text.contains("waiting"),
        "{text}"
    );
    assert!(
        text.contains(&format!("pid {} (flock)", waiter.id())),
        "{text}"
    );
    send_line(&mut holder, "");
    assert!(holder.wait().unwrap().success());
    assert!(waiter.wait().unwrap().success());
    let o = lm().command(["who"]).arg(&lock).output().unwrap();
    assert!(out(&o).contains("(exited)"), "{}", out(&o));
    assert!(out(&o).contains(" ago)"), "{}", out(&o));
    assert!(out(&o).contains("no locks on this file"), "{}", out(&o));
}

/// `/proc/locks` names no process for an OFD lock (pid -1): `who` finds the holder through
/// the `lock:` lines of its descriptors' fdinfo.
#[test]
fn who_finds_the_holder_of_an_ofd_lock_through_fdinfo() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("ofd.lock");
    let mut holder = lm().exec_ready(&["--kind", "ofd"], &lock, "echo ready; read _");
    let o = lm().command(["who"]).arg(&lock).output().unwrap();
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    let kernel = text
        .lines()
        .find(|l| l.starts_with("kernel:") && l.contains("OFDLCK"))
        .unwrap_or_else(|| panic!("no OFD line: {text}"));
    assert!(
        kernel.contains(&format!("pid {} (", holder.id())) && kernel.contains("WRITE"),
        "the holder, found through fdinfo: {text}"
    );
    assert!(!text.contains("owner unknown"), "{text}");
    send_line(&mut holder, "");
    assert!(holder.wait().unwrap().success());
}

/// A `flock` lock outlives the process that took it when another has its open file (the
/// descriptor form: `exec 9>F; lockmeter exec 9`, then the shell goes on). `/proc/locks` still
/// names the exited taker; `who` names the shell that holds the descriptor now, and says who
/// took it.
#[test]
fn who_names_the_process_that_holds_an_inherited_flock_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("inherited.lock");
    let (mut shell, _) = lockmeter_testkit::proc::spawn_ready(
        std::process::Command::new("sh")
            .arg("-c")
            .arg(r#"exec 9>"$1"; "$2" exec 9 || exit 9; echo "ready $!"; read _"#)
            .arg("sh")
            .arg(&lock)
            .arg(env!("CARGO_BIN_EXE_lockmeter")),
        "ready",
    );
    let o = lm().command(["who"]).arg(&lock).output().unwrap();
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    let kernel = text
        .lines()
        .find(|l| l.starts_with("kernel:") && l.contains("FLOCK"))
        .unwrap_or_else(|| panic!("no FLOCK line: {text}"));
    assert!(
        kernel.contains(&format!("pid {} (sh)", shell.id())),
        "the shell holds it: {text}"
    );
    assert!(
        kernel.contains("taken by pid ") && kernel.contains("which has exited"),
        "{text}"
    );
    send_line(&mut shell, "");
    assert!(shell.wait().unwrap().success());
}

#[test]
fn exec_warns_of_a_violation_and_still_passes_the_status_through() {
    let Some(bf) = Bindfs::new(&[]) else { return };
    let (a, b) = (bf.a().join("v.lock"), bf.b().join("v.lock"));
    let mut first = lm().exec_ready(&["--owner-record"], &a, "echo ready; read _; exit 4");
    // Through the other mount the "exclusive" lock is granted at once: split brain.
    let second = lm()
        .command(["exec", "-n", "--owner-record"])
        .arg(&b)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(0), "{}", out(&second));
    send_line(&mut first, "");
    let o = first.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(4));
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<_> = err
        .lines()
        .filter(|l| l.contains("exclusion violation"))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
}

#[test]
fn exec_watch_warns_once_when_the_lock_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("r.lock");
    let new = dir.path().join("r.lock.new");
    std::fs::write(&new, b"").unwrap();
    let script = format!(
        "echo ready; mv {} {}; read _; exit 3",
        new.display(),
        lock.display()
    );
    let mut c = lm().exec_ready(&["--watch=0.2"], &lock, &script);
    // The warning comes while the command still holds the lock (the watcher), not at release.
    let line = read_stderr_line_containing(&mut c, "was replaced");
    assert!(
        line.contains("locked inode") && line.contains("path now names"),
        "{line}"
    );
    send_line(&mut c, "");
    let o = c.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(3));
    let rest = String::from_utf8_lossy(&o.stderr);
    assert!(
        !rest.contains("was replaced"),
        "warned again after the first warning: {rest}"
    );
}

/// The age after `after` in `line` (`850ms`, `12s`, `3m12s`, `2h05m`, `3d04h`), if well formed.
fn regex_like_age<'a>(line: &'a str, after: &str) -> Option<&'a str> {
    let rest = &line[line.rfind(after)? + after.len()..];
    let age = rest.split([',', ')', ' ']).next()?;
    let units = ["ms", "s", "m", "h", "d"];
    let well_formed = !age.is_empty()
        && age.starts_with(|c: char| c.is_ascii_digit())
        && age
            .split(|c: char| c.is_ascii_digit())
            .filter(|u| !u.is_empty())
            .all(|u| units.contains(&u));
    well_formed.then_some(age)
}

#[test]
fn probe_says_what_it_waits_for_and_gives_up_at_its_timeout() {
    if !require_tool("flock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("busy.lock");
    let holder = flock_holder(&lock, false);
    let o = lm()
        .command(["probe", "--kind", "flock", "--timeout", "0.3"])
        .arg(&lock)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(75), "{}", out(&o));
    let first = err.lines().next().unwrap_or_default();
    assert!(
        first.contains("is locked (FLOCK WRITE held by")
            && first.contains(&format!("pid {} (flock)", holder.id()))
            && first.contains("echo locked")
            && first.contains("waiting up to 300ms"),
        "said before waiting: who holds it, its command line, how long: {err}"
    );
    assert!(err.contains("stayed locked for 300ms"), "{err}");

    // Released while the probe waits: the probe goes on to its verdict.
    let mut probe = lm()
        .command(["probe", "--kind", "flock"])
        .arg(&lock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    read_stderr_line_containing(&mut probe, "waiting up to 30s");
    release_flock_holder(holder);
    let o = probe.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(out(&o).contains("can be trusted"), "{}", out(&o));
}

#[test]
fn lockmeter_alone_names_every_subcommand_in_its_first_line() {
    let help = lm().output(["--help"]);
    let text = String::from_utf8_lossy(&help.stdout).into_owned();
    let commands: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 4, "{text}");
    let o = lm().output(Vec::<&str>::new());
    assert_eq!(o.status.code(), Some(64));
    let first = out(&o).lines().next().unwrap_or_default().to_owned();
    for c in &commands {
        assert!(
            first.contains(&format!(" {c},")) || first.contains(&format!(" {c} ")),
            "{c} missing from the summary line {first:?}"
        );
    }
}

#[test]
fn who_on_a_locked_directory_shows_its_holder() {
    let dir = tempfile::tempdir().unwrap();
    let locked = dir.path().join("jobs");
    std::fs::create_dir(&locked).unwrap();
    let mut holder = lm().exec_ready(&[], &locked, "echo ready; read _");
    let o = lm().command(["who"]).arg(&locked).output().unwrap();
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("owner:      none (a directory"), "{text}");
    assert!(
        text.contains("FLOCK")
            && text.contains(&format!("pid {} (lockmeter), running for", holder.id())),
        "{text}"
    );
    send_line(&mut holder, "");
    assert!(holder.wait().unwrap().success());
}
