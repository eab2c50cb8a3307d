//! Disks that say no: a read-only file system, a full one, a lock directory whose permissions
//! change while a lock is held, and owner records that a failed write must never tear. Real
//! tmpfs and bind mounts (root), real permission checks (a thread that gave up root).
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use lockmeter::metrics::Sink;
use lockmeter::{FileLock, LockKind, Operation};
use lockmeter_testkit::disk::{fill, read_only_bind, remount, tmpfs};
use lockmeter_testkit::{Action, Fault, FaultFs, Op, Recorder};

const KINDS: [LockKind; 3] = [LockKind::Flock, LockKind::Ofd, LockKind::Posix];

fn errors(rec: &Recorder, op: &str, errno: &str) -> u64 {
    rec.snapshot().counter(
        "lock.errors",
        &[("lock.operation", op), ("error.type", errno)],
    )
}

fn builder(path: &Path, kind: LockKind, sink: &Sink) -> lockmeter::FileLockBuilder {
    FileLock::builder(path).kind(kind).sink(sink.clone())
}

/// Read-only: creating fails with EROFS at open; an existing file can be locked with flock (a
/// read-only descriptor is enough, as flock(1) does) but not with OFD/POSIX write locks (they
/// need a writable descriptor: EROFS at open); owner records cannot be written (EBADF at lock).
#[test]
fn a_read_only_file_system() {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("there.lock"), b"").unwrap();
    let ro = read_only_bind(src.path());
    for kind in KINDS {
        let rec = Recorder::new();
        let sink = Sink::new(rec.meter());
        let new = ro.path("new.lock");
        let e = builder(&new, kind, &sink).open().unwrap_err();
        assert_eq!(
            (e.operation(), e.errno_name()),
            (Operation::Open, "EROFS"),
            "{e}"
        );
        assert!(e.to_string().contains(&new.display().to_string()), "{e}");
        let there = ro.path("there.lock");
        match kind {
            LockKind::Flock => {
                let lock = builder(&there, kind, &sink).open().unwrap();
                lock.lock().unwrap().unlock().unwrap();
                drop(lock.lock_shared().unwrap());
                let owned = builder(&there, kind, &sink)
                    .owner_record(true)
                    .open()
                    .unwrap();
                let e = owned.lock().unwrap_err();
                assert_eq!(
                    (e.operation(), e.errno_name()),
                    (Operation::Lock, "EBADF"),
                    "{e}"
                );
                assert_eq!(errors(&rec, "lock", "EBADF"), 1);
                // Not held behind the error: another descriptor takes it at once.
                drop(lock.try_lock().unwrap().expect("free"));
                assert_eq!(errors(&rec, "open", "EROFS"), 1);
            }
            _ => {
                let e = builder(&there, kind, &sink).open().unwrap_err();
                assert_eq!(
                    (e.operation(), e.errno_name()),
                    (Operation::Open, "EROFS"),
                    "{e}"
                );
                assert_eq!(errors(&rec, "open", "EROFS"), 2);
            }
        }
        assert_eq!(rec.snapshot().counter("lock.errors", &[]), 2, "{kind:?}");
    }
}

/// A tmpfs cannot be remounted read-only under a held lock (lockmeter's descriptor is open
/// read-write: EBUSY, the lock stays good); once the lock is gone it can, and then `flock`
/// locks work through a read-only descriptor while OFD ones are refused at open (EROFS).
#[test]
fn remounting_read_only_around_a_lock() {
    let fs = tmpfs(1 << 20, 64);
    let path = fs.path("held.lock");
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let lock = builder(&path, LockKind::Flock, &sink).open().unwrap();
    let g = lock.lock().unwrap();
    let e = remount(&fs, true).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{e}");
    g.unlock().unwrap();
    drop(lock);
    remount(&fs, true).unwrap();
    let lock = builder(&path, LockKind::Flock, &sink).open().unwrap();
    lock.lock().unwrap().unlock().unwrap();
    let e = builder(&path, LockKind::Ofd, &sink).open().unwrap_err();
    assert_eq!(
        (e.operation(), e.errno_name()),
        (Operation::Open, "EROFS"),
        "{e}"
    );
    drop(lock);
    remount(&fs, false).unwrap();
    assert_eq!(rec.snapshot().counter("lock.errors", &[]), 1);
}

/// Full: opening and locking need no space; the first owner record in an empty lock file does
/// (ENOSPC at lock, lock not handed out, nothing written); once a record exists, both slots are
/// in its block and the next holders write theirs without new space, fences going up.
#[test]
fn a_full_file_system() {
    for kind in KINDS {
        let fs = tmpfs(64 << 10, 64);
        let rec = Recorder::new();
        let sink = Sink::new(rec.meter());
        let (empty, used) = (fs.path("empty.lock"), fs.path("used.lock"));
        let with_record = builder(&used, kind, &sink)
            .owner_record(true)
            .open()
            .unwrap();
        drop(with_record.lock().unwrap());
        assert_eq!(with_record.holder().unwrap().unwrap().fence, 1);
        let filler = fill(fs.root());
        // Open and lock: no space needed.
        let plain = builder(&empty, kind, &sink).open().unwrap();
        drop(plain.lock().unwrap());
        // The first record: no space for its block.
        let owned = builder(&empty, kind, &sink)
            .owner_record(true)
            .open()
            .unwrap();
        let e = owned.lock().unwrap_err();
        assert_eq!(
            (e.operation(), e.errno_name()),
            (Operation::Lock, "ENOSPC"),
            "{kind:?}: {e}"
        );
        assert_eq!(errors(&rec, "lock", "ENOSPC"), 1, "{kind:?}");
        assert!(
            owned.holder().unwrap().is_none(),
            "nothing torn, nothing written"
        );
        assert!(
            plain.try_lock().unwrap().is_some(),
            "{kind:?}: not held behind the error"
        );
        // Records that exist: both slots in one allocated block.
        for fence in 2..6 {
            let g = with_record.lock().unwrap();
            assert_eq!(g.fencing_token(), Some(fence), "{kind:?}: on a full disk");
            g.unlock().unwrap();
        }
        std::fs::remove_file(filler).unwrap();
        let g = owned.lock().unwrap();
        assert_eq!(g.fencing_token(), Some(1), "{kind:?}: space again");
        drop(g);
        assert_eq!(rec.snapshot().counter("lock.errors", &[]), 1, "{kind:?}");
    }
}

/// No inode left: creating the lock file fails at open with ENOSPC.
#[test]
fn no_inode_left() {
    let fs = tmpfs(1 << 20, 4);
    let mut n = 0;
    while std::fs::write(fs.path(&format!("f{n}")), b"").is_ok() {
        n += 1;
    }
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let e = builder(&fs.path("new.lock"), LockKind::Flock, &sink)
        .open()
        .unwrap_err();
    assert_eq!(
        (e.operation(), e.errno_name()),
        (Operation::Open, "ENOSPC"),
        "{e}"
    );
    assert_eq!(errors(&rec, "open", "ENOSPC"), 1);
}

/// Runs `f` on a thread whose credentials (and only its: the raw system calls are per thread)
/// are uid/gid 65534 without capabilities, so permission checks apply to it.
fn as_nobody<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: raw setres[ug]id on this thread only; no memory involved.
            unsafe {
                assert_eq!(
                    libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
                    0
                );
                assert_eq!(libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534), 0);
                assert_eq!(libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534), 0);
            }
            f()
        })
        .join()
        .unwrap()
    })
}

/// The lock directory loses its permissions while a lock is held: holding, checking the owner
/// record and releasing go through the descriptor and keep working; what needs the path fails
/// with a typed EACCES: the check after the next lock (`verify`), and opening anew (`open`).
#[test]
fn the_lock_directory_loses_its_permissions_while_held() {
    for kind in KINDS {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("locks");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        let path = dir.join("job.lock");
        let rec = Recorder::new();
        let sink = Sink::new(rec.meter());
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|s| {
            let dir = &dir;
            let chmod = s.spawn(move || {
                rx.recv().unwrap();
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o000)).unwrap();
                done_tx.send(()).unwrap();
            });
            let (path, sink) = (&path, &sink);
            as_nobody(move || {
                let lock = builder(path, kind, sink).owner_record(true).open().unwrap();
                let mut g = lock.lock().unwrap();
                tx.send(()).unwrap();
                done_rx.recv().unwrap();
                assert!(
                    std::fs::metadata(path).is_err(),
                    "the path is out of reach now"
                );
                assert!(
                    g.check_owner().unwrap(),
                    "{kind:?}: the record reads through the descriptor"
                );
                g.unlock().unwrap();
                let e = lock.lock().unwrap_err();
                assert_eq!(
                    (e.operation(), e.errno_name()),
                    (Operation::Verify, "EACCES"),
                    "{kind:?}: {e}"
                );
                let e = builder(path, kind, sink).open().unwrap_err();
                assert_eq!(
                    (e.operation(), e.errno_name()),
                    (Operation::Open, "EACCES"),
                    "{kind:?}: {e}"
                );
            });
            chmod.join().unwrap();
        });
        assert_eq!(errors(&rec, "verify", "EACCES"), 1, "{kind:?}");
        assert_eq!(errors(&rec, "open", "EACCES"), 1, "{kind:?}");
        assert_eq!(rec.snapshot().counter("lock.errors", &[]), 2, "{kind:?}");
        assert_eq!(rec.snapshot().updown("lock.held", &[]), 0, "{kind:?}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let lock = builder(&path, kind, &sink)
            .owner_record(true)
            .open()
            .unwrap();
        assert_eq!(lock.lock().unwrap().fencing_token(), Some(2), "{kind:?}");
    }
}

/// A record write that stops part-way (a short write, then ENOSPC) at every length: the lock
/// is not handed out, and the next holder reads the previous record and goes on from its
/// fence. Through the fault-injecting file system (the owner record is written through FUSE
/// with `direct_io`, one write request per `pwrite`).
#[test]
fn a_torn_owner_record_is_never_read_as_one() {
    let fs = FaultFs::mount();
    for kind in KINDS {
        let rel = format!("torn-{kind:?}.lock");
        let lock = FileLock::builder(fs.path(&rel))
            .kind(kind)
            .owner_record(true)
            .open()
            .unwrap();
        let mut fence = lock.lock().unwrap().fencing_token().unwrap();
        let len = lock.holder().unwrap().unwrap().to_string().len();
        // Up to the last byte but one: a write that stops just before the final newline
        // leaves a complete record (the slot's previous record ended in the same newline at
        // the same offset when the two are the same length), which the next holder rightly
        // reads. Which cuts the step hits depends on the record's length (the pid's digits).
        for cut in (1..len - 1).step_by(7) {
            fs.inject(
                Fault::new(Op::Write, Action::ShortWrite(cut))
                    .path(rel.as_str())
                    .times(1),
            );
            fs.inject(
                Fault::fail(Op::Write, libc::ENOSPC)
                    .path(rel.as_str())
                    .times(1),
            );
            let e = lock.lock().unwrap_err();
            assert_eq!(e.errno_name(), "ENOSPC", "{kind:?} cut at {cut}: {e}");
            assert!(!fs.held(&rel), "{kind:?}: held behind the error");
            fs.clear();
            let held = lock
                .holder()
                .unwrap()
                .expect("the previous record survives");
            assert_eq!(held.fence, fence, "{kind:?} cut at {cut}: read {held:?}");
            let g = lock.lock().unwrap();
            fence += 1;
            assert_eq!(g.fencing_token(), Some(fence), "{kind:?} cut at {cut}");
            drop(g);
        }
        assert!(fence > 10, "{kind:?}: the loop ran");
    }
}
