//! [`FileLockBuilder`]: a lock's options, opening the lock file, and the file-system check.

use std::os::fd::AsFd as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use parking_lot::Mutex;
use rustix::io::Errno;

use super::{count_error, Backend, FdPool, FileLock, LockFd, PosixHandle};
use crate::error::{Error, Operation, Result};
use crate::kind::LockKind;
use crate::metrics::{Recorder, Sink, Spec, DEFAULT_SAMPLE_EVERY};
use crate::sys::{self, FileId};

/// What to do when the lock file's file system cannot be trusted to make the lock exclude
/// (see [`crate::fs::Coherence`]): NFS with `nolock`/`local_lock`, FUSE without known lock
/// forwarding, sshfs, 9p, an unknown file system.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FsPolicy {
    /// Open it anyway, silently.
    Allow,
    /// Open it and emit one `warn!` event per lock file per process (the default).
    #[default]
    Warn,
    /// Refuse with [`Error::UntrustedFileSystem`].
    Refuse,
}

/// Builder for a [`FileLock`]; see [`FileLock::builder`].
#[derive(Debug)]
#[must_use = "call .open() to create the lock"]
pub struct FileLockBuilder {
    path: PathBuf,
    name: Option<String>,
    kind: LockKind,
    create: bool,
    mode: u32,
    verify_inode: bool,
    sink: Sink,
    fs_policy: FsPolicy,
    owner_record: bool,
    watch: Option<Duration>,
    spans: bool,
    sample_every: u32,
    allow_directory: bool,
    slow_wait: Option<Duration>,
    slow_hold: Option<Duration>,
}

impl FileLockBuilder {
    pub(super) fn new(path: &Path) -> FileLockBuilder {
        FileLockBuilder {
            path: path.to_path_buf(),
            name: None,
            kind: LockKind::Flock,
            create: true,
            mode: 0o644,
            verify_inode: true,
            sink: Sink::global(),
            fs_policy: FsPolicy::Warn,
            owner_record: false,
            watch: None,
            spans: false,
            sample_every: DEFAULT_SAMPLE_EVERY,
            allow_directory: false,
            slow_wait: None,
            slow_hold: None,
        }
    }

    /// The stable `lock.name` for metrics (default: the path as given). Use one name per
    /// *kind of* resource: a name per lock file (`job-1234.lock`) makes unbounded series.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The kernel lock to take (default [`LockKind::Flock`]).
    pub fn kind(mut self, kind: LockKind) -> Self {
        self.kind = kind;
        self
    }

    /// Create the lock file if it is missing (default `true`). lockmeter never deletes it.
    pub fn create(mut self, create: bool) -> Self {
        self.create = create;
        self
    }

    /// Permission bits for a created lock file (default `0o644`; the umask applies).
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }

    /// Accept a directory as the lock file (default `false`: [`Error::IsDirectory`]), as
    /// `flock(1)` does: it is opened read-only (`O_RDONLY | O_DIRECTORY | O_NOFOLLOW |
    /// O_CLOEXEC`), which is all a `flock` lock needs. POSIX and OFD *write* locks need a
    /// descriptor open for writing, so on a directory only shared ones can be taken (an
    /// exclusive one fails with `EBADF`). Owner records cannot be kept in a directory:
    /// with [`owner_record(true)`](Self::owner_record) a directory is still refused.
    pub fn allow_directory(mut self, allow: bool) -> Self {
        self.allow_directory = allow;
        self
    }

    /// Lock-then-verify (default `true`): after acquiring, check that the locked descriptor is
    /// still the file the path names (`fstat` (dev, ino) vs `stat(path)`); if the file was
    /// replaced or unlinked, count a migration, re-open and lock again. Costs one `stat(path)`
    /// per acquire.
    pub fn verify_inode(mut self, verify: bool) -> Self {
        self.verify_inode = verify;
        self
    }

    /// Write an owner record with a fencing token into the lock file after every exclusive
    /// acquire, and check it before release (default `false`); see [`crate::owner`]. A
    /// different token at release means another holder got the lock meanwhile: counted in
    /// `lock.violations`. Costs a write and an `fdatasync` per exclusive acquire.
    ///
    /// A record that cannot be written (`ENOSPC`, `EIO`, `EBADF` on a file only readable, as on
    /// a read-only file system) fails the acquire: the lock is let go, the call returns
    /// [`Error::Os`] with [`Operation::Lock`] and the write's errno, counted in `lock.errors`
    /// (`lock.operation="lock"`). A write that stopped part-way never costs the previous
    /// holder's record or fence (see [`crate::owner`]).
    pub fn owner_record(mut self, on: bool) -> Self {
        self.owner_record = on;
        self
    }

    /// Watch held locks (default off): notice within milliseconds (inotify on the lock file's
    /// directory) or within `interval` (periodic re-validation, for changes inotify cannot see
    /// such as another NFS client's) that the lock file was replaced, renamed away or unlinked
    /// while held, and with owner records that another holder took the lock. Counted as
    /// `lock.inode.migrations{migration.detected_at="hold"}` / `lock.violations`, logged with
    /// `warn!`/`error!`, and visible on the guard
    /// ([`is_valid`](crate::FileLockGuard::is_valid),
    /// [`wait_invalidated`](crate::FileLockGuard::wait_invalidated)). Also re-validates once
    /// more at release.
    ///
    /// A change made elsewhere becomes visible here only when the file system's own caches let
    /// it through: FUSE caches lookups for `entry_timeout` (libfuse default 1 s), NFS for
    /// `actimeo`/`lookupcache` (3 to 60 s by default). Detection of such changes takes up to
    /// that plus `interval`.
    pub fn watch(mut self, interval: Duration) -> Self {
        self.watch = Some(interval);
        self
    }

    /// What to do when the file system cannot be trusted to make this lock exclude (default
    /// [`FsPolicy::Warn`]).
    pub fn fs_policy(mut self, policy: FsPolicy) -> Self {
        self.fs_policy = policy;
        self
    }

    /// Time 1 in `n` acquisitions (default [`DEFAULT_SAMPLE_EVERY`], 16, rounded up to a power
    /// of two; `1` times every one). Counts are always exact: every acquisition, conflict and
    /// release is counted. What is sampled is the two histograms (`lock.wait.duration` for
    /// acquired calls and `lock.duration`), chosen by acquisition number, never by duration, so
    /// quantiles stay unbiased; the first acquisition after each metrics collection is timed
    /// too, so a lock taken less often than metrics are collected is timed every time. Acquire
    /// calls that do not acquire (would block, timeout, cancelled, error) are always timed.
    ///
    /// Why: two histogram records per acquisition add ~5-10% to an uncontended `flock` +
    /// unlock; sampled, they add well under 1%.
    pub fn sample_every(mut self, n: u32) -> Self {
        self.sample_every = n.max(1);
        self
    }

    /// Create a `tracing` span per acquire (`lock.acquire`) and per hold (`lock.hold`) at
    /// `INFO` (default `false`: they are `TRACE` spans, created only when `TRACE` is enabled for
    /// target `lockmeter`). A span costs more than an uncontended lock cycle once a subscriber
    /// listens; slow acquisitions and holds are reported without them ([`crate::profile`]).
    pub fn spans(mut self, on: bool) -> Self {
        self.spans = on;
        self
    }

    /// Report acquires that waited at least `d` as `lock.slow_wait` events (default
    /// [`profile::default_slow_wait`](crate::profile::default_slow_wait): 10 ms or
    /// `LOCKMETER_SLOW_WAIT_MS`). See [`crate::profile`].
    pub fn slow_wait(mut self, d: Duration) -> Self {
        self.slow_wait = Some(d);
        self
    }

    /// Report timed holds of at least `d` as `lock.slow_hold` events (default
    /// [`profile::default_slow_hold`](crate::profile::default_slow_hold): 100 ms or
    /// `LOCKMETER_SLOW_HOLD_MS`). See [`crate::profile`].
    pub fn slow_hold(mut self, d: Duration) -> Self {
        self.slow_hold = Some(d);
        self
    }

    /// Where to record (default [`Sink::global`]: the global meter provider, whichever is
    /// installed now or later).
    pub fn sink(mut self, sink: Sink) -> Self {
        self.sink = sink;
        self
    }

    /// Opens (and by default creates) the lock file. Nothing is locked yet.
    ///
    /// Fails on a missing directory, a directory (unless [allowed](Self::allow_directory)) or
    /// symlink given as lock file, a file that is not a regular file, permission or read-only
    /// errors; each failure is also counted in `lock.errors`.
    pub fn open(self) -> Result<FileLock> {
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| self.path.to_string_lossy().into_owned());
        let allow_directory = self.allow_directory && !self.owner_record;
        let opened = open_fd(
            &self.path,
            self.create,
            self.mode,
            self.kind,
            allow_directory,
        );
        let fs_info = match &opened {
            Ok(fd) => crate::fs::fs_info(&self.path, fd.fd.as_fd(), self.kind),
            Err(_) => crate::fs::FsInfo {
                fs_type: sys::fs_type_of_parent(&self.path).to_owned(),
                mount: None,
                coherence: crate::fs::Coherence::Unknown,
                reasons: vec![],
            },
        };
        let fs_type: &'static str = intern(fs_info.metric_fs_type());
        let recorder = Recorder::new(Spec {
            fs_type: Some(fs_type),
            slow_wait: self.slow_wait,
            slow_hold: self.slow_hold,
            ..Spec::new(&self.sink, &name, self.kind.as_str(), self.sample_every)
        });
        let fd = match opened {
            Ok(fd) => fd,
            Err(e) => return Err(count_error(&recorder, e)),
        };
        // Cannot fail: the path just opened has no interior NUL.
        let c_path = std::ffi::CString::new(self.path.as_os_str().as_bytes()).map_err(|_| {
            count_error(
                &recorder,
                Error::Os {
                    path: self.path.clone(),
                    operation: Operation::Open,
                    errno: Errno::INVAL,
                },
            )
        })?;
        if !fs_info.coherence.is_trustworthy() {
            match self.fs_policy {
                FsPolicy::Allow => {}
                FsPolicy::Warn => warn_untrusted_once(&self.path, fd.id, &fs_info),
                FsPolicy::Refuse => {
                    return Err(count_error(
                        &recorder,
                        Error::UntrustedFileSystem {
                            path: self.path.clone(),
                            fs_type: fs_info.fs_type.clone(),
                            coherence: fs_info.coherence,
                            reasons: fs_info.reasons.join("; "),
                        },
                    ))
                }
            }
        }
        let backend = match self.kind {
            LockKind::Flock | LockKind::Ofd => Backend::Fds(FdPool::new(Box::new(fd))),
            LockKind::Posix => Backend::Posix(Mutex::new(PosixHandle::register(fd.fd, fd.id))),
        };
        Ok(FileLock {
            path: self.path,
            c_path,
            name,
            kind: self.kind,
            create: self.create,
            mode: self.mode,
            allow_directory,
            verify: self.verify_inode,
            owner_record: self.owner_record,
            watch: self.watch,
            spans: self.spans,
            fast_path: matches!(backend, Backend::Fds(_))
                && !self.owner_record
                && self.watch.is_none(),
            fs_type,
            fs_info,
            backend,
            recorder,
        })
    }
}

/// `fs.type` values are few (one per file-system type); keep one `'static` copy of each.
fn intern(s: &str) -> &'static str {
    static SEEN: std::sync::OnceLock<Mutex<std::collections::HashSet<&'static str>>> =
        std::sync::OnceLock::new();
    let mut seen = SEEN.get_or_init(Default::default).lock();
    match seen.get(s) {
        Some(v) => v,
        None => {
            let v: &'static str = Box::leak(s.to_owned().into_boxed_str());
            seen.insert(v);
            v
        }
    }
}

/// Lock files remembered as warned about; past this many the memory starts over (and a file
/// may be warned about again): a program that locks a million files on NFS must not keep a
/// million entries.
const MAX_WARNED: usize = 4096;

/// One `warn!` per lock file (inode) per process about a file system that may not exclude
/// (per [`MAX_WARNED`] distinct files).
#[cold]
fn warn_untrusted_once(path: &Path, id: FileId, info: &crate::fs::FsInfo) {
    static WARNED: std::sync::OnceLock<Mutex<std::collections::HashSet<FileId>>> =
        std::sync::OnceLock::new();
    let first = {
        let mut warned = WARNED.get_or_init(Default::default).lock();
        if warned.len() >= MAX_WARNED {
            *warned = std::collections::HashSet::new();
        }
        warned.insert(id)
    };
    if first {
        tracing::warn!(
            lock.path = %path.display(),
            fs.type = %info.fs_type,
            fs.coherence = info.coherence.as_str(),
            mount.source = info.mount.as_ref().map(|m| m.source.as_str()).unwrap_or(""),
            "locks on this file system may not exclude other holders: {}",
            info.reasons.join("; "),
        );
    }
}

/// Opens (and maybe creates) a lock file, mapping failures to typed errors.
pub(super) fn open_fd(
    path: &Path,
    create: bool,
    mode: u32,
    kind: LockKind,
    allow_directory: bool,
) -> Result<LockFd> {
    match sys::open_lock_file(path, create, mode, kind, allow_directory) {
        Ok((fd, id)) => Ok(LockFd { fd, id }),
        Err(sys::OpenError::Errno(Errno::ISDIR)) => Err(Error::IsDirectory {
            path: path.to_path_buf(),
        }),
        Err(sys::OpenError::Errno(Errno::LOOP)) => Err(Error::Symlink {
            path: path.to_path_buf(),
        }),
        Err(sys::OpenError::Errno(errno)) => Err(Error::Os {
            path: path.to_path_buf(),
            operation: Operation::Open,
            errno,
        }),
        Err(sys::OpenError::NotRegular(rustix::fs::FileType::Directory)) => {
            Err(Error::IsDirectory {
                path: path.to_path_buf(),
            })
        }
        Err(sys::OpenError::NotRegular(_)) => Err(Error::NotRegularFile {
            path: path.to_path_buf(),
        }),
    }
}
