//! `lockmeter probe`, `who` and `exec --owner-record/--watch` on real mounts: split-brain and
//! lock-forwarding bindfs, a local file system, held and waiting processes.
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

use lockmeter_testkit::{read_line_starting, require_tool, Bindfs};

fn lm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lockmeter"));
    c.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("RUST_LOG");
    c
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn probe_fails_on_split_brain_mounts_with_the_reason() {
    let Some(bf) = Bindfs::new(&[]) else { return };
    let (a, b) = (bf.a().join("p.lock"), bf.b().join("p.lock"));
    let o = lm()
        .arg("probe")
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
    let o = lm().arg("probe").arg(&a).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains("--peer"), "{}", out(&o));
    // JSON for scripts.
    let o = lm()
        .arg("probe")
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
        .args(["probe", "--kind", "flock"])
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
        .arg("probe")
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
        .arg("probe")
        .arg(dir.path().join("x.lock"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(out(&o).contains("host-wide"));
    let o = lm()
        .arg("probe")
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
        lm().args(["probe", "--kind", "flock", "--rendezvous", "1.5"])
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

    let Some(fwd) = Bindfs::new(&["--multithreaded", "--enable-lock-forwarding"]) else {
        return;
    };
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
    let mut holder = lm()
        .args(["exec", "--owner-record"])
        .arg(&lock)
        .args(["--", "sh", "-c", "echo ready; read _"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    read_line_starting(&mut holder, "ready");
    let mut waiter = Command::new("flock")
        .arg(&lock)
        .arg("true")
        .spawn()
        .unwrap();
    lockmeter_testkit::eventually("the waiter to block", || {
        std::fs::read_to_string("/proc/locks")
            .unwrap()
            .contains(&format!("-> FLOCK  ADVISORY  WRITE {}", waiter.id()))
    });
    let o = lm().arg("who").arg(&lock).output().unwrap();
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains(&format!("pid {} (running)", holder.id())),
        "{text}"
    );
    assert!(text.contains("fence 1"), "{text}");
    assert!(
        text.contains("FLOCK") && text.contains("held") && text.contains("waiting"),
        "{text}"
    );
    assert!(
        text.contains(&format!("pid {} (flock)", waiter.id())),
        "{text}"
    );
    holder.stdin.take().unwrap().write_all(b"\n").unwrap();
    assert!(holder.wait().unwrap().success());
    assert!(waiter.wait().unwrap().success());
    let o = lm().arg("who").arg(&lock).output().unwrap();
    assert!(out(&o).contains("(exited)"), "{}", out(&o));
    assert!(out(&o).contains("no locks on this file"), "{}", out(&o));
}

#[test]
fn exec_warns_of_a_violation_and_still_passes_the_status_through() {
    let Some(bf) = Bindfs::new(&[]) else { return };
    let (a, b) = (bf.a().join("v.lock"), bf.b().join("v.lock"));
    let mut first = lm()
        .args(["exec", "--owner-record"])
        .arg(&a)
        .args(["--", "sh", "-c", "echo ready; read _; exit 4"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    read_line_starting(&mut first, "ready");
    // Through the other mount the "exclusive" lock is granted at once: split brain.
    let second = lm()
        .args(["exec", "-n", "--owner-record"])
        .arg(&b)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(0), "{}", out(&second));
    first.stdin.take().unwrap().write_all(b"\n").unwrap();
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
    let o = lm()
        .args(["exec", "--watch=0.2"])
        .arg(&lock)
        .args(["--", "sh", "-c"])
        .arg(format!(
            "mv {} {}; sleep 0.5; exit 3",
            new.display(),
            lock.display()
        ))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<_> = err.lines().filter(|l| l.contains("was replaced")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("locked inode") && lines[0].contains("path now names"),
        "{err}"
    );
}
