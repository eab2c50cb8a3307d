//! Owner records, fencing tokens and exclusion violations, on a local file system and on real
//! FUSE mounts (split-brain and lock-forwarding bindfs).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lockmeter::metrics::Sink;
use lockmeter::{FileLock, FsPolicy};
use lockmeter_testkit::proc::{helper, role_var, send_line, spawn_ready};
use lockmeter_testkit::{Bindfs, Recorder};

lockmeter_testkit::helper_roles! {
    "owner_loop" => role_owner_loop,
}

/// Takes the lock at LOCK with owner records in a loop for MILLIS, after the parent's go;
/// prints the violations it counted and whether its fencing tokens increased.
fn role_owner_loop() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let lock = FileLock::builder(role_var("LOCK"))
        .owner_record(true)
        .fs_policy(FsPolicy::Allow)
        .sink(sink.clone())
        .open()
        .unwrap();
    let window = Duration::from_millis(role_var("MILLIS").parse().unwrap());
    // Start together: report ready, wait for the parent's go; then run for a fixed window, so
    // the two holders overlap even if one is scheduled late on a loaded machine.
    println!("ready");
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).unwrap();
    let mut fences = Vec::new();
    let start = std::time::Instant::now();
    while start.elapsed() < window {
        let g = lock.lock().unwrap();
        fences.push(g.fencing_token().unwrap());
        std::thread::sleep(Duration::from_micros(500));
        g.unlock().unwrap();
    }
    let v = rec.snapshot().counter("lock.violations", &[]);
    println!("acquisitions {}", fences.len());
    println!("violations {v}");
    println!(
        "fences_increasing {}",
        fences.windows(2).all(|w| w[0] < w[1])
    );
}

#[test]
fn fencing_tokens_increase_and_the_holder_is_readable() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fenced.lock");
    let lock = FileLock::builder(&path)
        .owner_record(true)
        .sink(sink.clone())
        .open()
        .unwrap();
    assert!(
        lock.holder().unwrap().is_none(),
        "a new lock file holds no record"
    );
    let mut g = lock.lock().unwrap();
    assert_eq!(g.fencing_token(), Some(1));
    let h = lock.holder().unwrap().unwrap();
    assert_eq!(h.pid, std::process::id());
    assert_eq!(h.fence, 1);
    assert_eq!(h.token.len(), 32);
    assert!(!h.boot_id.is_empty() && !h.host.is_empty() && h.start_time > 0);
    assert!(g.check_owner().unwrap());
    drop(g);
    let g = lock.lock().unwrap();
    assert_eq!(g.fencing_token(), Some(2));
    drop(g);
    // Shared holders write no record; a plain FileLock reads the last one.
    let s = lock.lock_shared().unwrap();
    assert_eq!(s.fencing_token(), None);
    drop(s);
    let plain = FileLock::open(&path).unwrap();
    assert_eq!(plain.holder().unwrap().unwrap().fence, 2);
    assert_eq!(rec.snapshot().counter("lock.violations", &[]), 0);
}

#[test]
fn the_record_names_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("named.lock");
    let lock = FileLock::builder(&path)
        .name("nightly-job")
        .owner_record(true)
        .open()
        .unwrap();
    let g = lock.lock().unwrap();
    let h = lock.holder().unwrap().unwrap();
    assert_eq!(h.name.as_deref(), Some("nightly-job"));
    let age = std::time::SystemTime::now()
        .duration_since(h.acquired_time().unwrap())
        .unwrap();
    assert!(age < std::time::Duration::from_secs(60), "{age:?}");
    drop(g);
    // Without a name, the record carries the path as given (the default lock.name).
    let unnamed = FileLock::builder(&path).owner_record(true).open().unwrap();
    drop(unnamed.lock().unwrap());
    let h = unnamed.holder().unwrap().unwrap();
    assert_eq!(h.name.as_deref(), Some(path.to_str().unwrap()));
    assert_eq!(h.fence, 2, "fences carry on across names");
}

#[test]
fn an_overwritten_record_is_one_violation() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stolen.lock");
    let lock = FileLock::builder(&path)
        .owner_record(true)
        .sink(sink.clone())
        .open()
        .unwrap();
    let mut g = lock.lock().unwrap();
    // Another "holder" (a client the lock did not exclude) writes its own record.
    std::fs::write(
        &path,
        "lockmeter-owner v1\nhost=elsewhere\nboot_id=x\npid=99\nstart_time=1\ntoken=ffffffffffffffffffffffffffffffff\nfence=2\nacquired_at=0\n",
    )
    .unwrap();
    assert!(!g.check_owner().unwrap());
    assert!(!g.check_owner().unwrap());
    drop(g); // checked again at release: still counted once
    let s = rec.snapshot();
    assert_eq!(s.counter("lock.violations", &[]), 1);
    assert_eq!(
        s.counter("lock.violations", &[("lock.name", path.to_str().unwrap())]),
        1
    );
}

/// Two processes taking the "same" exclusive lock through two mounts of one directory.
fn two_mounts_under_load(bf: &Bindfs) -> (u64, bool) {
    let mut procs: Vec<_> = [bf.a(), bf.b()]
        .iter()
        .map(|m| {
            let lock = m.join("shared.lock");
            let mut c = helper(
                "owner_loop",
                &[("LOCK", lock.to_str().unwrap()), ("MILLIS", "400")],
            );
            spawn_ready(&mut c, "ready").0
        })
        .collect();
    for p in &mut procs {
        send_line(p, "go");
    }
    let mut violations = 0;
    let mut increasing = true;
    for p in procs {
        let out = p.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "helper failed: {text}");
        let value = |key: &str| {
            let mut found = text.lines().filter_map(|l| l.strip_prefix(key));
            let v = found
                .next()
                .unwrap_or_else(|| panic!("no {key:?} line: {text}"));
            assert!(found.next().is_none(), "two {key:?} lines: {text}");
            v.to_owned()
        };
        // A holder that never got the lock would make both results vacuous.
        let acquisitions: u64 = value("acquisitions ").parse().unwrap();
        assert!(acquisitions > 0, "a helper never got the lock: {text}");
        violations += value("violations ").parse::<u64>().unwrap();
        increasing &= value("fences_increasing ") == "true";
    }
    (violations, increasing)
}

#[test]
fn split_brain_fuse_mounts_are_caught_as_violations() {
    let Some(bf) = Bindfs::new(&[]) else { return };
    let (violations, _) = two_mounts_under_load(&bf);
    assert!(
        violations > 0,
        "two lock domains must show up as violations"
    );
}

#[test]
fn lock_forwarding_fuse_mounts_show_no_violations() {
    let Some(bf) = Bindfs::new(&["--multithreaded", "--enable-lock-forwarding"]) else {
        return;
    };
    let (violations, increasing) = two_mounts_under_load(&bf);
    assert_eq!(violations, 0);
    assert!(increasing, "fencing tokens increase for each holder");
}
