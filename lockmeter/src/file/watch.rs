//! Migration watch during hold: notices that a held lock file was replaced, renamed away or
//! unlinked, and (with owner records) that another holder took the lock meanwhile.
//!
//! One process-wide thread serves every watched guard. It watches each lock file's directory
//! with inotify (`IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF |
//! IN_MOVE_SELF`), which sees changes made on this host within milliseconds, and re-validates
//! every guard each `watch_interval` (`lstat(path)` against the locked inode, and the owner
//! record), which catches what inotify cannot see: changes made by another NFS client or
//! through another FUSE mount, once the file system's lookup cache lets them through (FUSE
//! `entry_timeout`, NFS `actimeo`/`lookupcache`).

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustix::fs::inotify;

use crate::metrics::{DetectedAt, MigrationKind, Recorder};
use crate::sys::{self, FileId};

/// The shared state of one watched guard.
pub(crate) struct Watch {
    path: PathBuf,
    dir: PathBuf,
    name: OsString,
    id: FileId,
    lock_name: String,
    recorder: Arc<Recorder>,
    interval: Duration,
    /// (descriptor used only for reading the owner record, our token); flock/OFD only.
    owner: Option<(OwnedFd, String, Arc<AtomicBool>)>,
    state: std::sync::Mutex<State>,
    changed: Condvar,
    #[cfg(feature = "tokio")]
    notify: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    migrated: Option<MigrationKind>,
    violated: bool,
    released: bool,
    next_check: Option<Instant>,
}

impl Watch {
    pub(crate) fn is_valid(&self) -> bool {
        let s = self.lock_state();
        s.migrated.is_none() && !s.violated
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks until the lock is found invalid or `timeout` passes; true if invalid.
    pub(crate) fn wait_invalid(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock_state();
        loop {
            if s.migrated.is_some() || s.violated {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || s.released {
                return false;
            }
            s = match self.changed.wait_timeout(s, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    #[cfg(feature = "tokio")]
    pub(crate) async fn invalidated(&self) {
        loop {
            let notified = self.notify.notified();
            if !self.is_valid() {
                return;
            }
            notified.await;
        }
    }

    /// Checks the path (and owner record) now; `at` says when, for the metric.
    pub(crate) fn revalidate(&self, at: DetectedAt) {
        let now_id = sys::path_id(&self.path);
        let kind = match now_id {
            Ok(id) if id == self.id => None,
            Ok(id) if id.dev != self.id.dev => Some(MigrationKind::DeviceChanged),
            Ok(_) => Some(MigrationKind::Replaced),
            Err(rustix::io::Errno::NOENT) => Some(MigrationKind::Unlinked),
            Err(errno) => {
                self.recorder.error("verify", sys::errno_name(errno));
                None
            }
        };
        let violated = match &self.owner {
            Some((fd, token, counted)) => match crate::owner::read(fd.as_fd()) {
                Ok(rec) if rec.as_ref().map(|r| r.token.as_str()) != Some(token.as_str()) => {
                    // Counted once per guard, whoever notices first (watcher or guard).
                    if !counted.swap(true, Ordering::AcqRel) {
                        self.recorder.violation();
                        tracing::error!(
                            lock.name = %self.lock_name,
                            lock.path = %self.path.display(),
                            other.host = rec.as_ref().map(|r| r.host.as_str()).unwrap_or(""),
                            other.pid = rec.as_ref().map(|r| r.pid).unwrap_or(0),
                            "exclusion violation while holding: another holder's owner record is in the lock file; the lock does not exclude here",
                        );
                    }
                    true
                }
                Ok(_) => false,
                Err(errno) => {
                    self.recorder.error("verify", sys::errno_name(errno));
                    false
                }
            },
            None => false,
        };
        let mut s = self.lock_state();
        let mut changed = false;
        if let (Some(kind), None) = (kind, s.migrated) {
            s.migrated = Some(kind);
            changed = true;
            self.recorder.migration(kind, at);
            tracing::warn!(
                lock.name = %self.lock_name,
                lock.path = %self.path.display(),
                migration.kind = kind.as_str(),
                migration.detected_at = at.as_str(),
                "lock file {} {} while the lock was held (locked inode {}, path now names {}): the lock guards an orphaned inode and excludes nobody; stop the critical section",
                self.path.display(),
                match kind {
                    MigrationKind::Replaced => "was replaced",
                    MigrationKind::Unlinked => "was unlinked",
                    MigrationKind::DeviceChanged => "moved to another device",
                },
                self.id,
                now_id.map_or_else(|_| "nothing".to_owned(), |id| id.to_string()),
            );
        }
        if violated && !s.violated {
            s.violated = true;
            changed = true;
        }
        s.next_check = Some(Instant::now() + self.interval);
        drop(s);
        if changed {
            self.changed.notify_all();
            #[cfg(feature = "tokio")]
            self.notify.notify_waiters();
        }
    }
}

/// Parameters for a new watch.
pub(crate) struct WatchSpec {
    pub(crate) path: PathBuf,
    pub(crate) id: FileId,
    pub(crate) lock_name: String,
    pub(crate) recorder: Arc<Recorder>,
    pub(crate) interval: Duration,
    pub(crate) owner: Option<(OwnedFd, String, Arc<AtomicBool>)>,
}

/// A registered watch; unregisters (and removes the inotify watch when it was the last one on
/// its directory) on drop.
pub(crate) struct WatchHandle(Arc<Watch>);

impl WatchHandle {
    pub(crate) fn watch(&self) -> &Watch {
        &self.0
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        {
            let mut s = self.0.lock_state();
            s.released = true;
        }
        self.0.changed.notify_all();
        if let Some(w) = watcher() {
            w.unregister(&self.0);
        }
    }
}

struct Watcher {
    inotify: OwnedFd,
    inner: Mutex<Inner>,
    /// Written to wake the thread when a watch is added (its interval may be the shortest).
    wake: OwnedFd,
}

#[derive(Default)]
struct Inner {
    /// Directory → (inotify watch descriptor, number of watches using it).
    dirs: HashMap<PathBuf, (i32, usize)>,
    /// Watch descriptor → watches on files in that directory.
    by_wd: HashMap<i32, Vec<Weak<Watch>>>,
    /// Every registered watch, for periodic re-validation (also those inotify could not take).
    all: Vec<Weak<Watch>>,
}

fn watcher() -> Option<&'static Watcher> {
    static W: OnceLock<Option<&'static Watcher>> = OnceLock::new();
    *W.get_or_init(|| match Watcher::start() {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "lockmeter: cannot start the lock watcher; held locks are re-validated only at release");
            None
        }
    })
}

/// Registers a watch for a held lock. Without a watcher thread (inotify unavailable) the
/// handle still re-validates on demand and at release.
pub(crate) fn register(spec: WatchSpec) -> WatchHandle {
    let dir = match spec.path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = spec
        .path
        .file_name()
        .map(|n| n.to_owned())
        .unwrap_or_default();
    let watch = Arc::new(Watch {
        path: spec.path,
        dir,
        name,
        id: spec.id,
        lock_name: spec.lock_name,
        recorder: spec.recorder,
        interval: spec.interval,
        owner: spec.owner,
        state: std::sync::Mutex::new(State {
            next_check: Some(Instant::now() + spec.interval),
            ..State::default()
        }),
        changed: Condvar::new(),
        #[cfg(feature = "tokio")]
        notify: tokio::sync::Notify::new(),
    });
    if let Some(w) = watcher() {
        w.register(&watch);
    }
    WatchHandle(watch)
}

impl Watcher {
    fn start() -> std::io::Result<&'static Watcher> {
        let inotify =
            inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
        let (rd, wr) = rustix::pipe::pipe_with(
            rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
        )?;
        let w: &'static Watcher = Box::leak(Box::new(Watcher {
            inotify,
            inner: Mutex::new(Inner::default()),
            wake: wr,
        }));
        std::thread::Builder::new()
            .name("lockmeter-watch".into())
            .spawn(move || w.run(rd))?;
        Ok(w)
    }

    fn register(&self, watch: &Arc<Watch>) {
        let mut inner = self.inner.lock();
        let wd = match inner.dirs.get_mut(&watch.dir) {
            Some((wd, n)) => {
                *n += 1;
                Some(*wd)
            }
            None => {
                let mask = inotify::WatchFlags::CREATE
                    | inotify::WatchFlags::DELETE
                    | inotify::WatchFlags::MOVED_FROM
                    | inotify::WatchFlags::MOVED_TO
                    | inotify::WatchFlags::DELETE_SELF
                    | inotify::WatchFlags::MOVE_SELF;
                match inotify::add_watch(&self.inotify, &watch.dir, mask) {
                    Ok(wd) => {
                        inner.dirs.insert(watch.dir.clone(), (wd, 1));
                        Some(wd)
                    }
                    // Polling still covers it (e.g. ENOSPC: inotify watch limit reached).
                    Err(errno) => {
                        watch.recorder.error("verify", sys::errno_name(errno));
                        None
                    }
                }
            }
        };
        if let Some(wd) = wd {
            let list = inner.by_wd.entry(wd).or_default();
            list.retain(|w| w.strong_count() > 0);
            list.push(Arc::downgrade(watch));
        }
        inner.all.retain(|w| w.strong_count() > 0);
        inner.all.push(Arc::downgrade(watch));
        drop(inner);
        let _ = rustix::io::write(&self.wake, &[1]);
    }

    fn unregister(&self, watch: &Arc<Watch>) {
        let mut inner = self.inner.lock();
        let me = Arc::as_ptr(watch);
        inner
            .all
            .retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), me));
        let Some((wd, n)) = inner.dirs.get_mut(&watch.dir) else {
            return;
        };
        let wd = *wd;
        *n -= 1;
        if *n == 0 {
            inner.dirs.remove(&watch.dir);
            inner.by_wd.remove(&wd);
            let _ = inotify::remove_watch(&self.inotify, wd);
        } else if let Some(list) = inner.by_wd.get_mut(&wd) {
            list.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), me));
        }
    }

    fn all(&self) -> Vec<Arc<Watch>> {
        self.inner
            .lock()
            .all
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    fn run(&self, wake_rd: OwnedFd) {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 8192];
        loop {
            // Sleep until an event, a wake-up, or the earliest periodic check.
            let now = Instant::now();
            let next = self
                .all()
                .iter()
                .filter_map(|w| w.lock_state().next_check)
                .min();
            let timeout = next.map(|t| t.saturating_duration_since(now));
            let ts = timeout.map(|d| rustix::time::Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: d.subsec_nanos() as i64,
            });
            let mut fds = [
                rustix::event::PollFd::new(&self.inotify, rustix::event::PollFlags::IN),
                rustix::event::PollFd::new(&wake_rd, rustix::event::PollFlags::IN),
            ];
            let _ = rustix::event::poll(&mut fds, ts.as_ref());
            let mut drain = [0u8; 64];
            while let Ok(n) = rustix::io::read(&wake_rd, &mut drain) {
                if n == 0 {
                    break;
                }
            }
            // Directory events: re-validate the watches whose file name they mention.
            let mut to_check: Vec<Arc<Watch>> = Vec::new();
            let mut reader = inotify::Reader::new(&self.inotify, &mut buf);
            while let Ok(ev) = reader.next() {
                let wd = ev.wd();
                let name = ev.file_name().map(|n| n.to_bytes().to_vec());
                let inner = self.inner.lock();
                for w in inner
                    .by_wd
                    .get(&wd)
                    .into_iter()
                    .flatten()
                    .filter_map(Weak::upgrade)
                {
                    use std::os::unix::ffi::OsStrExt as _;
                    let ours = match &name {
                        Some(n) => n.as_slice() == w.name.as_bytes(),
                        None => true, // the directory itself moved or went away
                    };
                    if ours {
                        to_check.push(w);
                    }
                }
            }
            for w in &to_check {
                w.revalidate(DetectedAt::Hold);
            }
            // Periodic re-validation.
            let now = Instant::now();
            for w in self.all() {
                let due = w.lock_state().next_check.is_some_and(|t| t <= now);
                if due {
                    w.revalidate(DetectedAt::Hold);
                }
            }
        }
    }
}
