//! Faults on purpose: every `FileLock` operation x every kind x each errno, through a FUSE file
//! system that fails the call on demand (`testkit::faultfs`), and real signals interrupting
//! real blocking waits.
//!
//! What each case checks: the typed error names the path, the operation and the errno;
//! `lock.errors{lock.operation, error.type}` counts it exactly once (and nothing else); no guard
//! is handed out for a lock not held (the daemon's backing file says whether anything is held);
//! a failed unlock is reported, counted and its descriptor closed; descriptors on the mount
//! are all closed once the `FileLock` is gone; and after the fault clears, the lock works.
#![allow(clippy::unwrap_used)]

use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lockmeter::metrics::Sink;
use lockmeter::{Error, FileLock, FileLockGuard, LockKind, Operation};
use lockmeter_testkit::proc::{helper, role_var, spawn_ready};
use lockmeter_testkit::{eventually, send_line, Action, Fault, FaultFs, Op, Recorder};

const KINDS: [LockKind; 3] = [LockKind::Flock, LockKind::Ofd, LockKind::Posix];
const ERRNOS: [(i32, &str); 5] = [
    (libc::EIO, "EIO"),
    (libc::ENOLCK, "ENOLCK"),
    (libc::EINTR, "EINTR"),
    (libc::EACCES, "EACCES"),
    (libc::ENOSPC, "ENOSPC"),
];

lockmeter_testkit::helper_roles! {
    "hold" => role_hold,
}

/// Holds LOCK (of KIND) until a line arrives on stdin.
fn role_hold() {
    let kind: LockKind = role_var("KIND").parse().unwrap();
    let lock = FileLock::builder(role_var("LOCK"))
        .kind(kind)
        .open()
        .unwrap();
    let _g = lock.lock().unwrap();
    println!("ready");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
}

/// One case's metrics.
struct Case {
    rec: Recorder,
    sink: Sink,
}

impl Case {
    fn new() -> Case {
        let rec = Recorder::new();
        let sink = Sink::new(rec.meter());
        Case { rec, sink }
    }

    fn lock(&self, path: &Path, kind: LockKind) -> lockmeter::Result<FileLock> {
        FileLock::builder(path)
            .kind(kind)
            .sink(self.sink.clone())
            .open()
    }

    /// `lock.errors` is exactly one, with this operation and error type.
    fn counted_once(&self, what: &str, op: &str, errno: &str) {
        let s = self.rec.snapshot();
        let total = s.counter("lock.errors", &[]);
        let this = s.counter(
            "lock.errors",
            &[("lock.operation", op), ("error.type", errno)],
        );
        assert_eq!(
            (total, this),
            (1, 1),
            "{what}: lock.errors total {total}, {{{op}, {errno}}} {this}; sets: {:?}",
            s.attribute_sets("lock.errors")
        );
    }

    fn no_errors(&self, what: &str) {
        let s = self.rec.snapshot();
        assert_eq!(
            s.counter("lock.errors", &[]),
            0,
            "{what}: {:?}",
            s.attribute_sets("lock.errors")
        );
    }
}

/// The error is `Os` with this path, operation and errno name.
fn typed(what: &str, e: &Error, path: &Path, op: Operation, errno: &str) {
    assert!(matches!(e, Error::Os { .. }), "{what}: {e:?}");
    assert_eq!(e.path(), path, "{what}: {e}");
    assert_eq!(e.operation(), op, "{what}: {e}");
    assert_eq!(e.errno_name(), errno, "{what}: {e}");
    let text = e.to_string();
    assert!(
        text.contains(&path.display().to_string()) && text.contains(errno),
        "{what}: the message names the path and the errno: {text}"
    );
}

type Acquire = for<'a> fn(&'a FileLock) -> lockmeter::Result<Option<FileLockGuard<'a>>>;

/// Every acquire call: name, whether it waits in a blocking system call (the async ones, and
/// `lock_timeout`, poll with non-blocking attempts), the call.
fn acquires() -> Vec<(&'static str, bool, Acquire)> {
    let v: Vec<(&'static str, bool, Acquire)> = vec![
        ("lock", true, |l| l.lock().map(Some)),
        ("lock_shared", true, |l| l.lock_shared().map(Some)),
        ("try_lock", false, |l| l.try_lock()),
        ("try_lock_shared", false, |l| l.try_lock_shared()),
        ("lock_timeout", false, |l| {
            l.lock_timeout(Duration::from_millis(30))
        }),
    ];
    #[cfg(feature = "tokio")]
    let v = {
        let mut v = v;
        v.extend([
            (
                "lock_async",
                false,
                (|l| in_runtime(l.lock_async())) as Acquire,
            ),
            ("lock_shared_async", false, |l| {
                in_runtime(l.lock_shared_async())
            }),
        ]);
        v
    };
    v
}

/// Runs an async acquire on a current-thread runtime, given up after 30 ms as `lock_timeout`
/// gives up (`Ok(None)`: an `EACCES` from a non-blocking `fcntl` is "held elsewhere", so an
/// async acquire facing one for good waits for good).
#[cfg(feature = "tokio")]
fn in_runtime<'a>(
    acquire: impl std::future::Future<Output = lockmeter::Result<FileLockGuard<'a>>>,
) -> lockmeter::Result<Option<FileLockGuard<'a>>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        match tokio::time::timeout(Duration::from_millis(30), acquire).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    })
}

#[test]
fn open_faults() {
    let fs = FaultFs::mount();
    for kind in KINDS {
        for (errno, name) in ERRNOS {
            let what = format!("open, {kind:?}, {name}");
            let rel = format!("open-{kind:?}-{name}.lock");
            let path = fs.path(&rel);
            let c = Case::new();
            let id = fs.inject(Fault::fail(Op::Open, errno).path(rel.as_str()));
            let e = c.lock(&path, kind).unwrap_err();
            typed(&what, &e, &path, Operation::Open, name);
            c.counted_once(&what, "open", name);
            assert!(fs.fired(id) >= 1, "{what}: the fault was not hit");
            assert_eq!(fs.open_fds(), 0, "{what}: a descriptor leaked");
            fs.clear();
            let lock = c.lock(&path, kind).unwrap();
            drop(lock.lock().unwrap());
        }
    }
    assert_eq!(fs.open_fds(), 0);
}

#[test]
fn lock_faults() {
    let fs = FaultFs::mount();
    for kind in KINDS {
        for (errno, name) in ERRNOS {
            for (call, waits, acquire) in acquires() {
                let what = format!("{call}, {kind:?}, lock fails with {name}");
                let rel = format!("lock-{kind:?}-{name}-{call}.lock");
                let path = fs.path(&rel);
                let c = Case::new();
                let lock = c.lock(&path, kind).unwrap();
                let id = fs.inject(Fault::fail(Op::Lock, errno).path(rel.as_str()));
                let r = acquire(&lock);
                assert!(fs.fired(id) >= 1, "{what}: the fault was not hit");
                assert!(!fs.held(&rel), "{what}: a lock is held behind the error");
                if errno == libc::EACCES && kind != LockKind::Flock && !waits {
                    // fcntl(2): F_SETLK answers EACCES (or EAGAIN) for "held elsewhere"; a
                    // non-blocking attempt cannot tell the fault from a conflict.
                    assert!(matches!(r, Ok(None)), "{what}: {r:?}");
                    drop(r);
                    c.no_errors(&what);
                } else {
                    let e = r.map(|g| g.is_some()).unwrap_err();
                    typed(&what, &e, &path, Operation::Lock, name);
                    c.counted_once(&what, "lock", name);
                }
                assert!(fs.open_fds() <= 1, "{what}: descriptors pile up");
                fs.clear();
                // Transient: one failure, then the call goes through. EINTR is retried;
                // anything else is reported and the next call succeeds.
                let id = fs.inject(Fault::fail(Op::Lock, errno).path(rel.as_str()).times(1));
                let r = acquire(&lock);
                if errno == libc::EINTR {
                    let g = r.unwrap().unwrap_or_else(|| panic!("{what}: EINTR once"));
                    assert!(fs.held(&rel), "{what}: guard without the lock");
                    drop(g);
                    assert_eq!(fs.fired(id), 1);
                } else {
                    drop(r);
                }
                fs.clear();
                let g = acquire(&lock).unwrap().unwrap();
                assert!(fs.held(&rel), "{what}: guard without the lock");
                drop(g);
                assert!(!fs.held(&rel), "{what}: released");
                drop(lock);
                assert_eq!(fs.open_fds(), 0, "{what}: a descriptor leaked");
            }
        }
    }
}

#[test]
fn unlock_faults() {
    let fs = FaultFs::mount();
    for kind in KINDS {
        for (errno, name) in ERRNOS {
            for explicit in [true, false] {
                for shared in [false, true] {
                    let call = if explicit { "unlock()" } else { "drop" };
                    let what =
                        format!("{call}, shared {shared}, {kind:?}, unlock fails with {name}");
                    let rel = format!("unlock-{kind:?}-{name}-{explicit}-{shared}.lock");
                    let path = fs.path(&rel);
                    let c = Case::new();
                    let lock = c.lock(&path, kind).unwrap();
                    let g = if shared {
                        lock.lock_shared().unwrap()
                    } else {
                        lock.lock().unwrap()
                    };
                    assert!(fs.held(&rel));
                    let id = fs.inject(Fault::fail(Op::Unlock, errno).path(rel.as_str()));
                    if explicit {
                        let e = g.unlock().unwrap_err();
                        typed(&what, &e, &path, Operation::Unlock, name);
                    } else {
                        drop(g);
                    }
                    assert!(fs.fired(id) >= 1, "{what}: the fault was not hit");
                    c.counted_once(&what, "unlock", name);
                    if kind == LockKind::Posix {
                        // One descriptor per inode per process, kept while the lock exists:
                        // the failed unlock leaves the kernel lock until it closes.
                        assert_eq!(fs.open_fds(), 1, "{what}");
                    } else {
                        // The descriptor of a failed unlock is closed, which releases
                        // flock and OFD locks.
                        assert_eq!(fs.open_fds(), 0, "{what}: descriptor not closed");
                        eventually(&format!("{what}: released by the close"), || !fs.held(&rel));
                    }
                    fs.clear();
                    drop(lock);
                    assert_eq!(fs.open_fds(), 0, "{what}: a descriptor leaked");
                    eventually(&format!("{what}: nothing held"), || !fs.held(&rel));
                    let s = c.rec.snapshot();
                    let mode = if shared { "shared" } else { "exclusive" };
                    assert_eq!(
                        s.updown("lock.held", &[("lock.mode", mode)]),
                        0,
                        "{what}: a release that failed is still a release"
                    );
                }
            }
        }
    }
}

#[test]
fn verify_faults() {
    let fs = FaultFs::mount();
    for kind in KINDS {
        for (errno, name) in ERRNOS {
            let what = format!("lock, {kind:?}, stat fails with {name} while verifying");
            let rel = format!("verify-{kind:?}-{name}.lock");
            let path = fs.path(&rel);
            let c = Case::new();
            let lock = c.lock(&path, kind).unwrap();
            let id = fs.inject(Fault::fail(Op::Stat, errno).path(rel.as_str()));
            let e = lock.lock().unwrap_err();
            typed(&what, &e, &path, Operation::Verify, name);
            c.counted_once(&what, "verify", name);
            assert!(fs.fired(id) >= 1);
            assert!(!fs.held(&rel), "{what}: a lock is held behind the error");
            // Again and again: no descriptor piles up.
            for _ in 0..3 {
                assert!(lock.lock().is_err());
            }
            assert!(fs.open_fds() <= 1, "{what}: {} descriptors", fs.open_fds());
            fs.clear();
            drop(lock.lock().unwrap());
            drop(lock);
            assert_eq!(fs.open_fds(), 0, "{what}: a descriptor leaked");
        }
    }
}

#[test]
fn owner_record_write_faults() {
    let fs = FaultFs::mount();
    for kind in KINDS {
        for (errno, name) in ERRNOS {
            for op in [Op::Write, Op::Fsync] {
                let what = format!("lock with owner record, {kind:?}, {op:?} fails with {name}");
                let rel = format!("owner-{kind:?}-{name}-{op:?}.lock");
                let path = fs.path(&rel);
                let c = Case::new();
                let lock = FileLock::builder(&path)
                    .kind(kind)
                    .owner_record(true)
                    .sink(c.sink.clone())
                    .open()
                    .unwrap();
                drop(lock.lock().unwrap());
                let fence = lock.holder().unwrap().unwrap().fence;
                let id = fs.inject(Fault::fail(op, errno).path(rel.as_str()));
                // An owner record that cannot be written is a failed lock (operation `lock`):
                // the lock is let go, never handed out without its record.
                let e = lock.lock().unwrap_err();
                typed(&what, &e, &path, Operation::Lock, name);
                c.counted_once(&what, "lock", name);
                assert!(fs.fired(id) >= 1);
                assert!(!fs.held(&rel), "{what}: a lock is held behind the error");
                fs.clear();
                let g = lock.lock().unwrap();
                assert!(
                    g.fencing_token().unwrap() > fence,
                    "{what}: the fence never goes back"
                );
                drop(g);
                drop(lock);
                assert_eq!(fs.open_fds(), 0, "{what}: a descriptor leaked");
            }
        }
    }
}

#[test]
fn a_grant_without_forwarding_is_a_split_brain_that_owner_records_catch() {
    let fs = FaultFs::mount();
    for kind in KINDS {
        let rel = format!("split-{kind:?}.lock");
        let c = Case::new();
        let open = || {
            FileLock::builder(fs.path(&rel))
                .kind(kind)
                .owner_record(true)
                .sink(c.sink.clone())
                .open()
                .unwrap()
        };
        let (a, b) = (open(), open());
        let mut ga = a.lock().unwrap();
        if kind == LockKind::Posix {
            // One process: the in-process gate excludes before the kernel is asked.
            assert!(b.try_lock().unwrap().is_none());
            continue;
        }
        // b's lock request is answered "granted" without being forwarded: both hold it.
        fs.inject(
            Fault::new(Op::Lock, Action::Grant)
                .path(rel.as_str())
                .times(1),
        );
        let gb = b.try_lock().unwrap().expect("granted");
        assert!(
            !ga.check_owner().unwrap(),
            "{kind:?}: the violation is seen"
        );
        drop(gb);
        drop(ga);
        let s = c.rec.snapshot();
        assert_eq!(s.counter("lock.violations", &[]), 1, "{kind:?}");
    }
}

#[test]
fn a_slow_lock_call_is_waited_for_and_timed() {
    let fs = FaultFs::mount();
    for kind in KINDS {
        let rel = format!("slow-{kind:?}.lock");
        let c = Case::new();
        let lock = FileLock::builder(fs.path(&rel))
            .kind(kind)
            .sample_every(1)
            .sink(c.sink.clone())
            .open()
            .unwrap();
        fs.inject(
            Fault::new(Op::Lock, Action::Delay(Duration::from_millis(200)))
                .path(rel.as_str())
                .times(1),
        );
        let t = std::time::Instant::now();
        let g = lock.lock().unwrap();
        assert!(t.elapsed() >= Duration::from_millis(200));
        assert!(fs.held(&rel));
        drop(g);
        let s = c.rec.snapshot();
        assert_eq!(
            s.hist_count("lock.wait.duration", &[("lock.outcome", "acquired")]),
            1
        );
        c.no_errors(&format!("{kind:?}"));
    }
}

// ---- EINTR: real signals interrupting real blocking waits -----------------------------------

static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// A SIGUSR1 handler installed without `SA_RESTART`: a blocking `flock`/`fcntl` it interrupts
/// returns `EINTR` instead of being restarted by the kernel.
fn install_handler() {
    // SAFETY: a plain handler that only touches an atomic; the struct is fully initialised.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = 0;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
}

/// The system call a thread is blocked in (`/proc/self/task/TID/syscall`, first field).
fn blocked_in(tid: libc::pid_t) -> Option<i64> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn gettid() -> libc::pid_t {
    // SAFETY: no arguments, no memory.
    unsafe { libc::gettid() }
}

/// Whether SIGUSR1 is pending for thread `tid` (`SigPnd` in its status).
fn usr1_pending(tid: libc::pid_t) -> bool {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigPnd:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
        .unwrap();
    mask & (1 << (libc::SIGUSR1 - 1)) != 0
}

/// The signal tests share the handler's counter: one at a time.
static SIGNAL_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A thread blocked in `lock()` is sent real signals while another holder has the lock, then
/// the holder lets go: the thread gets the lock, with no error and no lost lock.
///
/// On a local file system (`local`) each of three signals interrupts the wait (the handler
/// runs, `flock`/`fcntl` return `EINTR`: the handler is installed without `SA_RESTART`) and
/// `sys::lock` waits again. Through FUSE one signal is sent: the kernel interrupts a waiting
/// lock request only while it believes the daemon handles `FUSE_INTERRUPT` (fuser answers
/// `ENOSYS`, after which it stops asking); otherwise the signal stays pending until the
/// daemon's answer. Either way the handler runs once and the lock is had.
fn interrupted_wait(
    lock_path: &Path,
    kind: LockKind,
    local: bool,
    holder: impl FnOnce() -> Box<dyn FnOnce()>,
) {
    let _one = SIGNAL_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    install_handler();
    let c = Case::new();
    let lock = Arc::new(c.lock(lock_path, kind).unwrap());
    let release = holder();
    let (tx, rx) = std::sync::mpsc::channel();
    let l = Arc::clone(&lock);
    let waiter = std::thread::spawn(move || {
        tx.send(gettid()).unwrap();
        l.lock().map(|g| g.was_contended())
    });
    let tid = rx.recv().unwrap();
    let wanted = if kind == LockKind::Flock {
        libc::SYS_flock
    } else {
        libc::SYS_fcntl
    };
    eventually("the waiter to block in the lock call", || {
        blocked_in(tid) == Some(wanted)
    });
    let signal = || {
        // SAFETY: signalling a live thread of this process.
        let r = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR1) };
        assert_eq!(r, 0);
    };
    let start = SIGNALS.load(Ordering::SeqCst);
    let sent = if local { 3 } else { 1 };
    for n in 1..=sent {
        signal();
        if local {
            eventually("the handler to run", || {
                SIGNALS.load(Ordering::SeqCst) >= start + n
            });
            eventually("the waiter to wait again", || {
                blocked_in(tid) == Some(wanted)
            });
        } else {
            eventually("the signal to be handled or held pending", || {
                SIGNALS.load(Ordering::SeqCst) > start || usr1_pending(tid)
            });
        }
    }
    release();
    let r = waiter.join().unwrap();
    assert!(r.unwrap(), "{kind:?}: acquired, after waiting");
    assert_eq!(SIGNALS.load(Ordering::SeqCst) - start, sent);
    c.no_errors(&format!("{kind:?}"));
    let s = c.rec.snapshot();
    assert_eq!(s.updown("lock.held", &[]), 0);
    assert_eq!(
        s.counter("lock.acquisitions", &[("lock.contended", "true")]),
        1
    );
    drop(lock);
}

#[test]
fn a_signal_during_a_blocking_wait_is_retried_on_a_local_file_system() {
    let dir = tempfile::tempdir().unwrap();
    for kind in KINDS {
        let path = dir.path().join(format!("{kind:?}.lock"));
        let p = path.clone();
        interrupted_wait(&path, kind, true, move || {
            let mut c = helper(
                "hold",
                &[("LOCK", p.to_str().unwrap()), ("KIND", kind.as_str())],
            );
            let mut child = spawn_ready(&mut c, "ready").0;
            Box::new(move || {
                send_line(&mut child, "");
                assert!(child.wait().unwrap().success());
            })
        });
    }
}

#[test]
fn a_signal_during_a_blocking_wait_through_fuse_is_not_a_lost_lock() {
    let fs = FaultFs::mount();
    for kind in [LockKind::Flock, LockKind::Ofd] {
        let rel = format!("sig-{kind:?}.lock");
        let path = fs.path(&rel);
        // The holder: another open file description in this process; the daemon excludes
        // lock owners as the kernel would.
        let holder = Arc::new(FileLock::builder(&path).kind(kind).open().unwrap());
        let h = Arc::clone(&holder);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let g = h.lock().unwrap();
            held_tx.send(()).unwrap();
            rx.recv().unwrap();
            drop(g);
        });
        held_rx.recv().unwrap();
        interrupted_wait(&path, kind, false, move || {
            Box::new(move || {
                tx.send(()).unwrap();
                t.join().unwrap();
            })
        });
        assert!(!fs.held(&rel));
        assert_eq!(fs.open_fds(), 1, "only the holder's descriptor is left");
        drop(holder);
        assert_eq!(fs.open_fds(), 0);
    }
}

#[test]
fn the_descriptor_count_helper_sees_the_mount() {
    // Guards the helper the other tests lean on: a descriptor on the mount is counted.
    let fs = FaultFs::mount();
    let f = std::fs::File::create(fs.path("x")).unwrap();
    assert_eq!(fs.open_fds(), 1, "fd {}", f.as_raw_fd());
    drop(f);
    assert_eq!(fs.open_fds(), 0);
}
