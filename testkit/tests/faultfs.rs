//! The fault-injecting file system itself: it forwards locks (two open files exclude each
//! other through it), and each kind of fault does what it says.
#![allow(clippy::unwrap_used, missing_docs)]

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use lockmeter_testkit::{Action, Fault, FaultFs, Op};
use rustix::fs::{flock, FlockOperation as F};
use rustix::io::Errno;

fn open(fs: &FaultFs, rel: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(fs.path(rel))
        .unwrap()
}

#[test]
fn locks_are_forwarded_and_exclude() {
    let fs = FaultFs::mount();
    let (a, b) = (open(&fs, "x.lock"), open(&fs, "x.lock"));
    assert!(!fs.held("x.lock"));
    flock(a.as_fd(), F::NonBlockingLockExclusive).unwrap();
    assert!(
        fs.held("x.lock"),
        "the daemon took the lock on the backing file"
    );
    assert_eq!(
        flock(b.as_fd(), F::NonBlockingLockExclusive),
        Err(Errno::WOULDBLOCK)
    );
    flock(a.as_fd(), F::Unlock).unwrap();
    assert!(!fs.held("x.lock"));
    flock(b.as_fd(), F::NonBlockingLockExclusive).unwrap();
    drop(b); // closing the open file ends its flock lock
    lockmeter_testkit::eventually("the release to reach the daemon", || !fs.held("x.lock"));
    assert_eq!(fs.calls(Op::Lock, "x.lock"), 3);
}

#[test]
fn faults_fail_delay_and_split_the_brain() {
    let fs = FaultFs::mount();
    let (a, b) = (open(&fs, "y.lock"), open(&fs, "y.lock"));
    let id = fs.inject(Fault::fail(Op::Lock, libc::ENOLCK).path("y.lock").times(1));
    assert_eq!(flock(a.as_fd(), F::LockExclusive), Err(Errno::NOLCK));
    assert_eq!(fs.fired(id), 1);
    assert!(!fs.held("y.lock"));
    // A grant without forwarding: both "hold" the exclusive lock.
    fs.inject(Fault::new(Op::Lock, Action::Grant).path("y.lock").times(2));
    flock(a.as_fd(), F::NonBlockingLockExclusive).unwrap();
    flock(b.as_fd(), F::NonBlockingLockExclusive).unwrap();
    assert!(!fs.held("y.lock"), "nothing was forwarded");
    let d = fs.inject(Fault::new(Op::Lock, Action::Delay(Duration::from_millis(300))).times(1));
    let t = Instant::now();
    flock(a.as_fd(), F::LockExclusive).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(fs.fired(d), 1);
    fs.inject(Fault::fail(Op::Unlock, libc::EIO).times(1));
    assert_eq!(flock(a.as_fd(), F::Unlock), Err(Errno::IO));
    assert!(fs.held("y.lock"), "a failed unlock leaves the lock held");
    drop(a);
    lockmeter_testkit::eventually("close to release it", || !fs.held("y.lock"));
}

#[test]
fn writes_can_fail_or_be_short() {
    use std::os::unix::fs::FileExt as _;
    let fs = FaultFs::mount();
    let f = open(&fs, "w");
    fs.inject(Fault::new(Op::Write, Action::ShortWrite(3)).times(1));
    assert_eq!(f.write_at(b"abcdef", 0).unwrap(), 3);
    fs.inject(Fault::fail(Op::Write, libc::ENOSPC).times(1));
    let e = f.write_at(b"def", 3).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(std::fs::read(fs.backing("w")).unwrap(), b"abc");
    fs.inject(Fault::fail(Op::Fsync, libc::EIO).times(1));
    assert_eq!(f.sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));
    fs.inject(Fault::fail(Op::Stat, libc::EACCES).path("w"));
    let e = std::fs::symlink_metadata(fs.path("w")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES));
    fs.clear();
    fs.inject(Fault::fail(Op::Open, libc::EIO).path("w"));
    assert_eq!(
        std::fs::File::open(fs.path("w"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EIO)
    );
}

/// What a daemon's EINTR answer to a lock request becomes in user space.
#[test]
fn an_eintr_answer_to_a_lock_request() {
    let fs = FaultFs::mount();
    let a = open(&fs, "z.lock");
    fs.inject(Fault::fail(Op::Lock, libc::EINTR).times(1));
    let r = flock(a.as_fd(), F::NonBlockingLockExclusive);
    eprintln!("flock after an EINTR answer: {r:?}");
    fs.inject(Fault::fail(Op::Lock, libc::EINTR).times(1));
    let r = rustix::fs::fcntl_lock(a.as_fd(), F::NonBlockingLockExclusive);
    eprintln!("fcntl after an EINTR answer: {r:?}");
}
