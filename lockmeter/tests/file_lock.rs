//! FileLock against the real kernel, real processes and util-linux.
#![allow(clippy::unwrap_used)]

use std::io::{Read as _, Write as _};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lockmeter::metrics::Sink;
use lockmeter::metrics::DEFAULT_BOUNDARIES;
use lockmeter::{Error, FileLock, LockKind, Operation};
use lockmeter_testkit::proc::{helper, helper_under, role_var};
use lockmeter_testkit::tools::command;
use lockmeter_testkit::{
    flock_cli_can_lock, flock_holder, read_line_starting, release_flock_holder, require_tool,
    Recorder,
};

const KINDS: [LockKind; 3] = [LockKind::Flock, LockKind::Ofd, LockKind::Posix];

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

lockmeter_testkit::helper_roles! {
    "counter" => role_counter,
    "hold_and_spawn" => role_hold_and_spawn,
    "try" => role_try,
    "open" => role_open,
}

/// Increments a counter file ITERS times under the lock; detects overlap with a marker file.
fn role_counter() {
    let kind: LockKind = role_var("KIND").parse().unwrap();
    let lock = FileLock::builder(role_var("LOCK"))
        .kind(kind)
        .open()
        .unwrap();
    let counter = PathBuf::from(role_var("COUNTER"));
    let inside = counter.with_extension("inside");
    let iters: u32 = role_var("ITERS").parse().unwrap();
    for _ in 0..iters {
        let g = lock.lock().unwrap();
        // O_EXCL create fails if another holder is inside right now.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&inside)
            .expect("two holders inside the critical section at once");
        let n: u64 = std::fs::read_to_string(&counter)
            .unwrap()
            .trim()
            .parse()
            .unwrap_or(0);
        std::thread::yield_now();
        std::fs::write(&counter, format!("{}", n + 1)).unwrap();
        std::fs::remove_file(&inside).unwrap();
        g.unlock().unwrap();
    }
}

/// Takes the lock, starts a long-lived child, reports, then waits to be killed.
fn role_hold_and_spawn() {
    let lock = FileLock::open(role_var("LOCK")).unwrap();
    let _g = lock.lock().unwrap();
    // Deliberately outlives this process (the test kills it by pid afterwards).
    #[allow(clippy::zombie_processes)]
    let sleeper = Command::new("sleep").arg("600").spawn().unwrap();
    println!("ready {}", sleeper.id());
    std::io::stdout().flush().unwrap();
    let mut buf = [0u8; 1];
    let _ = std::io::stdin().read(&mut buf);
}

/// One non-blocking attempt from another process.
fn role_try() {
    let kind: LockKind = role_var("KIND").parse().unwrap();
    let lock = FileLock::builder(role_var("LOCK"))
        .kind(kind)
        .open()
        .unwrap();
    let free = lock.try_lock().unwrap().is_some();
    println!("try {}", if free { "free" } else { "held" });
}

/// Tries to open a lock file (run as an unprivileged user).
fn role_open() {
    match FileLock::open(role_var("LOCK")) {
        Ok(_) => println!("result ok"),
        Err(e) => println!("result {} {} {}", e.operation(), e.errno_name(), e),
    }
}

// ---- exclusion ----------------------------------------------------------------------------

fn processes_exclude(kind: LockKind) {
    let dir = tmp();
    let lock = dir.path().join("counter.lock");
    let counter = dir.path().join("counter");
    std::fs::write(&counter, "0").unwrap();
    let (procs, iters) = (4, 250);
    let children: Vec<_> = (0..procs)
        .map(|_| {
            helper(
                "counter",
                &[
                    ("KIND", kind.as_str()),
                    ("LOCK", lock.to_str().unwrap()),
                    ("COUNTER", counter.to_str().unwrap()),
                    ("ITERS", &iters.to_string()),
                ],
            )
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "{kind}: a worker failed");
    }
    let n: u64 = std::fs::read_to_string(&counter).unwrap().parse().unwrap();
    assert_eq!(
        n,
        procs * iters as u64,
        "{kind}: lost updates: exclusion failed"
    );
}

#[test]
fn four_processes_exclude_each_other_flock() {
    processes_exclude(LockKind::Flock);
}

#[test]
fn four_processes_exclude_each_other_ofd() {
    processes_exclude(LockKind::Ofd);
}

#[test]
fn four_processes_exclude_each_other_posix() {
    processes_exclude(LockKind::Posix);
}

#[test]
fn threads_sharing_one_filelock_exclude_each_other() {
    for kind in KINDS {
        let dir = tmp();
        let lock = Arc::new(
            FileLock::builder(dir.path().join("t.lock"))
                .kind(kind)
                .open()
                .unwrap(),
        );
        let inside = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (lock, inside) = (Arc::clone(&lock), Arc::clone(&inside));
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let g = lock.lock().unwrap();
                        assert!(
                            !inside.swap(true, Ordering::SeqCst),
                            "{kind}: two threads inside"
                        );
                        std::thread::yield_now();
                        inside.store(false, Ordering::SeqCst);
                        drop(g);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}

#[test]
fn two_filelocks_on_one_path_exclude_within_a_process() {
    for kind in KINDS {
        let dir = tmp();
        let path = dir.path().join("p.lock");
        let a = FileLock::builder(&path).kind(kind).open().unwrap();
        let b = FileLock::builder(&path).kind(kind).open().unwrap();
        let g = a.lock().unwrap();
        assert!(
            b.try_lock().unwrap().is_none(),
            "{kind}: exclusive vs exclusive"
        );
        assert!(
            b.try_lock_shared().unwrap().is_none(),
            "{kind}: exclusive vs shared"
        );
        drop(g);
        let s1 = a.lock_shared().unwrap();
        let s2 = b.try_lock_shared().unwrap();
        assert!(s2.is_some(), "{kind}: shared holders coexist");
        assert!(
            b.try_lock().unwrap().is_none(),
            "{kind}: shared vs exclusive"
        );
        drop((s1, s2));
        assert!(b.try_lock().unwrap().is_some(), "{kind}: free again");
    }
}

#[test]
fn posix_lock_survives_other_filelocks_on_the_same_file_closing() {
    // Closing any descriptor of a file drops the process's POSIX locks on it; lockmeter must
    // not do that to itself when a second FileLock on the same path is dropped.
    let dir = tmp();
    let path = dir.path().join("posix.lock");
    let a = FileLock::builder(&path)
        .kind(LockKind::Posix)
        .open()
        .unwrap();
    let _g = a.lock().unwrap();
    for _ in 0..3 {
        let b = FileLock::builder(&path)
            .kind(LockKind::Posix)
            .open()
            .unwrap();
        drop(b);
    }
    // Another process must still see the lock.
    let out = helper(
        "try",
        &[("LOCK", path.to_str().unwrap()), ("KIND", "posix")],
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("try held"), "{stdout}");
}

// ---- interop with util-linux --------------------------------------------------------------

#[test]
fn flock_cli_fails_while_lockmeter_holds() {
    if !require_tool("flock") {
        return;
    }
    let dir = tmp();
    let path = dir.path().join("interop.lock");
    let lock = FileLock::open(&path).unwrap();
    let g = lock.lock().unwrap();
    assert!(!flock_cli_can_lock(&path));
    drop(g);
    assert!(flock_cli_can_lock(&path));
    let s = lock.lock_shared().unwrap();
    let shared_ok = command("flock")
        .args(["-n", "-s"])
        .arg(&path)
        .arg("true")
        .status()
        .unwrap();
    assert!(
        shared_ok.success(),
        "shared flock(1) coexists with a shared lockmeter lock"
    );
    assert!(!flock_cli_can_lock(&path));
    drop(s);
}

#[test]
fn try_lock_returns_none_while_flock_cli_holds() {
    if !require_tool("flock") {
        return;
    }
    let dir = tmp();
    let path = dir.path().join("interop2.lock");
    let holder = flock_holder(&path, false);
    let lock = FileLock::open(&path).unwrap();
    assert!(lock.try_lock().unwrap().is_none());
    assert!(lock
        .lock_timeout(Duration::from_millis(30))
        .unwrap()
        .is_none());
    release_flock_holder(holder);
    assert!(lock.try_lock().unwrap().is_some());
}

#[test]
fn lslocks_shows_each_kind() {
    if !require_tool("lslocks") {
        return;
    }
    for (kind, shown) in [
        (LockKind::Flock, "FLOCK"),
        (LockKind::Ofd, "OFDLCK"),
        (LockKind::Posix, "POSIX"),
    ] {
        let dir = tmp();
        let path = dir.path().join("shown.lock");
        let lock = FileLock::builder(&path).kind(kind).open().unwrap();
        let _g = lock.lock().unwrap();
        let ino = std::fs::metadata(&path).unwrap().ino();
        let out = command("lslocks")
            .args(["--noheadings", "--raw", "-o", "TYPE,INODE,MODE"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(&ino.to_string()))
            .unwrap_or_else(|| panic!("{kind}: inode {ino} not in lslocks:\n{text}"));
        let cols: Vec<_> = line.split_whitespace().collect();
        assert_eq!(cols[0], shown, "{kind}: {line}");
        assert_eq!(cols[2], "WRITE", "{kind}: {line}");
    }
}

// ---- metrics ------------------------------------------------------------------------------

#[test]
fn exact_counts_through_the_sdk() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let dir = tmp();
    let path = dir.path().join("count.lock");
    let lock = FileLock::builder(&path)
        .sink(sink.clone())
        .sample_every(1)
        .open()
        .unwrap();
    let other = FileLock::open(&path).unwrap(); // not recorded: global no-op meter

    for _ in 0..10 {
        lock.lock().unwrap().unlock().unwrap();
    }
    for _ in 0..4 {
        drop(lock.lock_shared().unwrap());
    }
    let held = other.lock().unwrap();
    for _ in 0..3 {
        assert!(lock.try_lock().unwrap().is_none());
    }
    assert!(lock
        .lock_timeout(Duration::from_millis(20))
        .unwrap()
        .is_none());
    let s = rec.snapshot();
    assert_eq!(s.updown("lock.held", &[]), 0);
    drop(held);

    let s = rec.snapshot();
    let ex = ("lock.mode", "exclusive");
    let uncontended = ("lock.contended", "false");
    assert_eq!(s.counter("lock.acquisitions", &[ex, uncontended]), 10);
    assert_eq!(
        s.counter("lock.acquisitions", &[("lock.mode", "shared")]),
        4
    );
    assert_eq!(
        s.counter("lock.acquisitions", &[("lock.contended", "true")]),
        0
    );
    assert_eq!(
        s.counter("lock.conflicts", &[ex]),
        4,
        "3 try_lock + 1 timeout"
    );
    assert_eq!(
        s.hist_count("lock.wait.duration", &[ex, ("lock.outcome", "acquired")]),
        10
    );
    assert_eq!(
        s.hist_count("lock.wait.duration", &[("lock.outcome", "would_block")]),
        3
    );
    assert_eq!(
        s.hist_count("lock.wait.duration", &[("lock.outcome", "timeout")]),
        1
    );
    assert_eq!(s.hist_count("lock.duration", &[ex, uncontended]), 10);
    assert_eq!(s.hist_count("lock.duration", &[("lock.mode", "shared")]), 4);
    assert_eq!(s.updown("lock.held", &[]), 0);
    assert_eq!(s.counter("lock.errors", &[]), 0);
    assert_eq!(s.counter("lock.inode.migrations", &[]), 0);

    // Schema details: units, boundaries, attributes.
    assert_eq!(s.unit("lock.duration"), "s");
    assert_eq!(s.unit("lock.wait.duration"), "s");
    assert_eq!(s.unit("lock.acquisitions"), "{acquisition}");
    assert_eq!(s.unit("lock.held"), "{lock}");
    assert_eq!(s.hist_bounds("lock.duration"), DEFAULT_BOUNDARIES);
    assert_eq!(s.hist_bounds("lock.wait.duration"), DEFAULT_BOUNDARIES);
    let name = format!("lock.name={}", path.display());
    for set in s.attribute_sets("lock.duration") {
        assert!(set.contains(&name), "{set:?}");
        assert!(set.contains(&"lock.kind=flock".to_owned()), "{set:?}");
        assert!(
            set.iter()
                .any(|a| a.starts_with("fs.type=") && a != "fs.type=unknown"),
            "{set:?}"
        );
    }
}

#[test]
fn timing_is_sampled_counts_stay_exact_and_rare_acquisitions_are_all_timed() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let dir = tmp();
    let lock = FileLock::builder(dir.path().join("sampled.lock"))
        .sink(sink.clone())
        .open()
        .unwrap(); // default: 1 in 16 timed
    for _ in 0..1_601 {
        drop(lock.lock().unwrap());
    }
    let s = rec.snapshot();
    assert_eq!(
        s.counter("lock.acquisitions", &[]),
        1_601,
        "counts are exact"
    );
    assert_eq!(s.updown("lock.held", &[]), 0);
    let holds = s.hist_count("lock.duration", &[]);
    // Numbers 0, 16, ..., 1600 by number (no collection happened in between).
    assert_eq!(holds, 101, "1 in 16 timed");
    assert_eq!(
        s.hist_count("lock.wait.duration", &[("lock.outcome", "acquired")]),
        holds,
        "a timed acquisition records its wait and its hold"
    );

    // A lock taken less often than metrics are collected is timed every time (numbers
    // 1601..1605 are not multiples of 16: only the collection rule times them; each snapshot
    // is a collection).
    for i in 1..=4 {
        drop(lock.lock().unwrap());
        assert_eq!(
            rec.snapshot().hist_count("lock.duration", &[]),
            holds + i,
            "acquisition {i} after a pause was timed"
        );
    }
}

#[test]
fn contended_acquire_is_counted_and_timed() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let dir = tmp();
    let path = dir.path().join("contended.lock");
    let lock = Arc::new(
        FileLock::builder(&path)
            .name("c")
            .sink(sink.clone())
            .open()
            .unwrap(),
    );
    let holder = FileLock::open(&path).unwrap();
    let held = holder.lock().unwrap();
    let waiter = {
        let lock = Arc::clone(&lock);
        std::thread::spawn(move || {
            let g = lock.lock().unwrap();
            assert!(g.was_contended());
        })
    };
    rec.wait_for("the waiter to find the lock taken", |s| {
        s.counter("lock.conflicts", &[]) == 1
    });
    drop(held);
    waiter.join().unwrap();
    let s = rec.snapshot();
    assert_eq!(
        s.counter("lock.acquisitions", &[("lock.contended", "true")]),
        1
    );
    assert_eq!(
        s.hist_count("lock.duration", &[("lock.contended", "true")]),
        1
    );
    assert_eq!(
        s.hist_count("lock.wait.duration", &[("lock.outcome", "acquired")]),
        1
    );
    assert_eq!(s.counter("lock.conflicts", &[("lock.name", "c")]), 1);
}

// ---- inode migrations ---------------------------------------------------------------------

fn replace_file(path: &Path) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, b"").unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn migration_while_waiting(unlink: bool) {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let dir = tmp();
    let path = dir.path().join("migrate.lock");
    let lock = Arc::new(FileLock::builder(&path).sink(sink.clone()).open().unwrap());
    let holder = FileLock::builder(&path).verify_inode(false).open().unwrap();
    let held = holder.lock().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let waiter = {
        let (lock, path) = (Arc::clone(&lock), path.clone());
        std::thread::spawn(move || {
            let g = lock.lock().unwrap();
            // The guard must be on the file the path names now.
            let fd_ino = rustix::fs::fstat(g.as_fd()).unwrap().st_ino;
            assert_eq!(fd_ino, std::fs::metadata(&path).unwrap().ino());
            rx.recv().unwrap(); // hold until the main thread has checked exclusion
        })
    };
    rec.wait_for("the waiter to block", |s| {
        s.counter("lock.conflicts", &[]) == 1
    });
    if unlink {
        std::fs::remove_file(&path).unwrap();
    } else {
        replace_file(&path);
    }
    drop(held); // the waiter now gets the orphaned inode, must notice and re-lock
    let kind = if unlink { "unlinked" } else { "replaced" };
    rec.wait_for("the migration", |s| {
        s.counter("lock.acquisitions", &[]) == 1
    });
    // The waiter holds the file the path names: a newcomer is excluded.
    assert!(!flock_cli_can_lock(&path));
    tx.send(()).unwrap();
    waiter.join().unwrap();
    let s = rec.snapshot();
    assert_eq!(
        s.counter(
            "lock.inode.migrations",
            &[
                ("migration.kind", kind),
                ("migration.detected_at", "acquire")
            ]
        ),
        1
    );
    assert_eq!(s.counter("lock.inode.migrations", &[]), 1);
}

#[test]
fn replaced_while_waiting_never_yields_a_guard_on_the_orphaned_inode() {
    if !require_tool("flock") {
        return;
    }
    migration_while_waiting(false);
}

#[test]
fn unlinked_while_waiting_never_yields_a_guard_on_the_orphaned_inode() {
    if !require_tool("flock") {
        return;
    }
    migration_while_waiting(true);
}

#[test]
fn without_verification_the_orphaned_inode_is_locked() {
    if !require_tool("flock") {
        return;
    }
    // What lock-then-verify prevents: the guard covers a file nobody else can see.
    let dir = tmp();
    let path = dir.path().join("orphan.lock");
    let lock = FileLock::builder(&path).verify_inode(false).open().unwrap();
    replace_file(&path);
    let _g = lock.lock().unwrap();
    assert!(flock_cli_can_lock(&path), "a newcomer locks the new file");
}

// ---- process lifetime ---------------------------------------------------------------------

#[test]
fn holder_dies_with_a_long_lived_child_and_the_lock_is_free() {
    if !require_tool("flock") {
        return;
    }
    let dir = tmp();
    let path = dir.path().join("die.lock");
    let mut holder = helper("hold_and_spawn", &[("LOCK", path.to_str().unwrap())])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let ready = read_line_starting(&mut holder, "ready ");
    let sleeper: i32 = ready["ready ".len()..].parse().unwrap();
    assert!(!flock_cli_can_lock(&path), "held while the holder lives");
    holder.kill().unwrap();
    holder.wait().unwrap();
    // The child (sleep 600) is still alive, but O_CLOEXEC kept the lock out of it.
    assert!(Path::new(&format!("/proc/{sleeper}")).exists());
    assert!(flock_cli_can_lock(&path), "the lock died with its holder");
    let sleeper = rustix::process::Pid::from_raw(sleeper).unwrap();
    rustix::process::kill_process(sleeper, rustix::process::Signal::KILL).unwrap();
}

// ---- async --------------------------------------------------------------------------------

#[cfg(feature = "tokio")]
#[test]
fn dropping_lock_async_never_leaves_the_lock_held() {
    if !require_tool("flock") {
        return;
    }
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let dir = tmp();
    let path = dir.path().join("async.lock");
    // Every acquisition timed: the test counts the waits of both acquires.
    let lock = FileLock::builder(&path)
        .sink(sink.clone())
        .sample_every(1)
        .open()
        .unwrap();
    let holder = FileLock::open(&path).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let held = holder.lock().unwrap();
        let r = tokio::time::timeout(Duration::from_millis(50), lock.lock_async()).await;
        assert!(r.is_err(), "must still be waiting");
        drop(held);
        // Let the runtime run anything that might still be pending for a while.
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert!(
                flock_cli_can_lock(&path),
                "a cancelled acquire holds nothing"
            );
        }
        // And a new async acquire works once the lock is released mid-wait.
        let held = holder.lock().unwrap();
        let waiting = lock.lock_async();
        let release = async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            drop(held);
        };
        let (g, ()) = tokio::join!(waiting, release);
        let g = g.unwrap();
        assert!(g.was_contended());
        assert!(!flock_cli_can_lock(&path));
    });
    let s = rec.snapshot();
    assert_eq!(
        s.hist_count("lock.wait.duration", &[("lock.outcome", "cancelled")]),
        1
    );
    assert_eq!(
        s.hist_count("lock.wait.duration", &[("lock.outcome", "acquired")]),
        1
    );
    assert_eq!(s.counter("lock.conflicts", &[]), 2);
}

// ---- bad input and errors -----------------------------------------------------------------

#[test]
fn bad_paths_are_typed_errors_and_counted() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let dir = tmp();
    let open = |p: &Path| FileLock::builder(p).sink(sink.clone()).open();

    let e = open(&dir.path().join("missing/x.lock")).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Os {
                operation: Operation::Open,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.errno_name(), "ENOENT");
    assert!(e.to_string().contains("missing/x.lock"), "{e}");

    let e = open(dir.path()).unwrap_err();
    assert!(matches!(e, Error::IsDirectory { .. }), "{e}");
    assert_eq!(e.errno_name(), "EISDIR");
    // `?` in main prints Debug: the same sentence, naming the path and the errno.
    assert_eq!(format!("{e:?}"), e.to_string());

    let target = dir.path().join("real.lock");
    std::fs::write(&target, b"").unwrap();
    let link = dir.path().join("link.lock");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let e = open(&link).unwrap_err();
    assert!(matches!(e, Error::Symlink { .. }), "{e}");
    assert_eq!(e.errno_name(), "ELOOP");

    let fifo = dir.path().join("fifo.lock");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let e = open(&fifo).unwrap_err();
    assert!(matches!(e, Error::NotRegularFile { .. }), "{e}");

    let e = FileLock::builder(dir.path().join("absent.lock"))
        .create(false)
        .sink(sink.clone())
        .open()
        .unwrap_err();
    assert_eq!(e.errno_name(), "ENOENT");

    let s = rec.snapshot();
    let open_errs = |t: &str| {
        s.counter(
            "lock.errors",
            &[("lock.operation", "open"), ("error.type", t)],
        )
    };
    assert_eq!(open_errs("ENOENT"), 2);
    assert_eq!(open_errs("EISDIR"), 1);
    assert_eq!(open_errs("ELOOP"), 1);
    assert_eq!(open_errs("EINVAL"), 1);
}

#[test]
fn created_lock_files_are_0644_and_close_on_exec() {
    let dir = tmp();
    let path = dir.path().join("mode.lock");
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    let lock = FileLock::open(&path).unwrap();
    rustix::process::umask(old);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o644
    );
    let g = lock.lock().unwrap();
    let flags = rustix::io::fcntl_getfd(g.as_fd()).unwrap();
    assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
    drop(g);
    let custom = FileLock::builder(dir.path().join("m600.lock"))
        .mode(0o600)
        .open()
        .unwrap();
    assert_eq!(
        std::fs::metadata(custom.path())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
}

#[test]
fn permission_denied_for_an_unprivileged_user() {
    if !require_tool("setpriv") {
        return;
    }
    let dir = tmp();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("root-only.lock");
    std::fs::write(&path, b"").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut setpriv = command("setpriv");
    setpriv.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
    let out = helper_under(setpriv, "open", &[("LOCK", path.to_str().unwrap())])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("result "))
        .unwrap_or_else(|| {
            panic!(
                "no result from child: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(line.starts_with("result open EACCES"), "{line}");
    assert!(line.contains("root-only.lock"), "{line}");
}

#[test]
fn a_failed_unlock_is_reported_and_counted() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let dir = tmp();
    let path = dir.path().join("unlock.lock");
    let lock = FileLock::builder(&path).sink(sink.clone()).open().unwrap();
    // Swap the locked descriptor for an O_PATH one, on which flock(2) fails with EBADF.
    let sabotage = |g: &lockmeter::FileLockGuard<'_>| {
        let opath = rustix::fs::open(
            dir.path(),
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        // SAFETY: test-only: dup2 replaces the guard's descriptor in place; the guard still
        // owns (and later closes) that descriptor number.
        let r = unsafe { libc::dup2(opath.as_raw_fd(), g.as_fd().as_raw_fd()) };
        assert!(r >= 0);
    };
    let g = lock.lock().unwrap();
    sabotage(&g);
    let e = g.unlock().unwrap_err();
    assert!(
        matches!(
            e,
            Error::Os {
                operation: Operation::Unlock,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.errno_name(), "EBADF");
    let g = lock.lock().unwrap();
    sabotage(&g);
    drop(g); // the drop path reports through lock.errors and an error! event
    let s = rec.snapshot();
    assert_eq!(
        s.counter(
            "lock.errors",
            &[("lock.operation", "unlock"), ("error.type", "EBADF")]
        ),
        2
    );
    assert_eq!(s.updown("lock.held", &[]), 0);
    // The lock is free: the sabotaged descriptors were closed.
    assert!(lock.try_lock().unwrap().is_some());
}

#[test]
fn a_directory_is_locked_as_flock_1_locks_it_when_allowed() {
    if !require_tool("flock") {
        return;
    }
    let dir = tmp();
    let locked = dir.path().join("d");
    std::fs::create_dir(&locked).unwrap();
    let lock = FileLock::builder(&locked)
        .allow_directory(true)
        .open()
        .unwrap();
    let g = lock.lock().unwrap();
    assert!(
        !flock_cli_can_lock(&locked),
        "flock(1) on the directory must find it taken"
    );
    drop(g);
    assert!(flock_cli_can_lock(&locked));
    // flock(1) holding the directory excludes lockmeter too.
    let holder = flock_holder(&locked, false);
    assert!(lock.try_lock().unwrap().is_none());
    release_flock_holder(holder);
    // Opened read-only: nothing can be written into it, so owner records refuse it.
    let e = FileLock::builder(&locked)
        .allow_directory(true)
        .owner_record(true)
        .open()
        .unwrap_err();
    assert!(matches!(e, Error::IsDirectory { .. }), "{e}");
    // A symlink to a directory is still a symlink.
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&locked, &link).unwrap();
    let e = FileLock::builder(&link)
        .allow_directory(true)
        .open()
        .unwrap_err();
    assert!(matches!(e, Error::Symlink { .. }), "{e}");
}
