//! Instrumented file locks: [`FileLock`], its [`FileLockBuilder`] and [`FileLockGuard`].

mod pool;
mod posix;

use std::fmt;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lock_api::RawRwLock as _;
use opentelemetry::metrics::Meter;
use opentelemetry::KeyValue;
use parking_lot::Mutex;
use rustix::io::Errno;

use crate::clock::Ticks as Tsc;
use crate::error::{Error, Operation, Result};
use crate::metrics::{
    keys, DetectedAt, LockMetrics, LockMode, LockStats, MigrationKind, Outcome,
    DEFAULT_SAMPLE_EVERY,
};
use crate::owner;
use crate::sys::{self, FileId};
use crate::trace;
use crate::watch::{self, WatchHandle, WatchSpec};
use pool::FdPool;
use posix::PosixHandle;

/// How many times one acquire re-locks after finding the lock file replaced before it gives up
/// with [`Error::Unstable`].
const MAX_MIGRATIONS: u32 = 16;
/// Polling back-off for timed and async acquires.
const POLL_MIN: Duration = Duration::from_micros(100);
const POLL_MAX: Duration = Duration::from_millis(10);

/// Which kernel lock a [`FileLock`] takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LockKind {
    /// `flock(2)`: whole-file lock owned by the open file description. Shown as `FLOCK` in
    /// `/proc/locks`. On NFS (since Linux 2.6.12) emulated with a byte-range lock on the server.
    #[default]
    Flock,
    /// Open-file-description lock (`F_OFD_SETLK`, Linux 3.15+) over the whole file: owned by the
    /// open file description like `flock`, byte-range like POSIX. Shown as `OFDLCK`.
    Ofd,
    /// Process-associated POSIX record lock (`F_SETLK`) over the whole file. Shown as `POSIX`.
    /// See the crate docs for how lockmeter makes it exclude threads too.
    Posix,
}

impl LockKind {
    /// The `lock.kind` attribute value: `flock`, `ofd` or `posix`.
    pub fn as_str(self) -> &'static str {
        match self {
            LockKind::Flock => "flock",
            LockKind::Ofd => "ofd",
            LockKind::Posix => "posix",
        }
    }
}

impl fmt::Display for LockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LockKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "flock" => Ok(LockKind::Flock),
            "ofd" => Ok(LockKind::Ofd),
            "posix" | "fcntl" => Ok(LockKind::Posix),
            other => Err(format!(
                "unknown lock kind {other:?} (expected flock, ofd or posix)"
            )),
        }
    }
}

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
    meter: Option<Meter>,
    fs_policy: FsPolicy,
    owner_record: bool,
    watch: Option<Duration>,
    sample_every: u32,
}

impl FileLockBuilder {
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
    pub fn owner_record(mut self, on: bool) -> Self {
        self.owner_record = on;
        self
    }

    /// Watch held locks (default off): notice within milliseconds (inotify on the lock file's
    /// directory) or within `interval` (periodic re-validation, for changes inotify cannot see
    /// such as another NFS client's) that the lock file was replaced, renamed away or unlinked
    /// while held, and with owner records that another holder took the lock. Counted as
    /// `lock.inode.migrations{migration.detected_at="hold"}` / `lock.violations`, logged with
    /// `warn!`/`error!`, and visible on the guard ([`FileLockGuard::is_valid`],
    /// [`FileLockGuard::wait_invalidated`]). Also re-validates once more at release.
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

    /// Time 1 in `n` acquisitions (default 16, rounded up to a power of two; `1` times every
    /// one). Counts are always exact: every acquisition, conflict and release is counted. What
    /// is sampled is the two histograms (`lock.wait.duration` for acquired calls and
    /// `lock.duration`), chosen by acquisition number, never by duration, so quantiles stay
    /// unbiased; the first acquisition after each [`crate::metrics::FLUSH_INTERVAL`] is timed
    /// too, so a lock taken less than about ten times a second is timed every time. Acquire
    /// calls that do not acquire (would block, timeout, cancelled, error) are always timed.
    ///
    /// Why: a histogram record costs ~15 ns, two per acquisition add ~10% to an uncontended
    /// `flock` + unlock (~600 ns); sampled, the whole instrumentation stays within ~5%.
    pub fn sample_every(mut self, n: u32) -> Self {
        self.sample_every = n.max(1);
        self
    }

    /// The meter to record on (default: the global meter provider's `lockmeter` meter, read
    /// when the lock is opened).
    pub fn meter(mut self, meter: Meter) -> Self {
        self.meter = Some(meter);
        self
    }

    /// Opens (and by default creates) the lock file. Nothing is locked yet.
    ///
    /// Fails on a missing directory, a directory or symlink given as lock file, a file that is
    /// not a regular file, permission or read-only errors; each failure is also counted in
    /// `lock.errors`.
    pub fn open(self) -> Result<FileLock> {
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| self.path.to_string_lossy().into_owned());
        let meter = self
            .meter
            .clone()
            .unwrap_or_else(crate::metrics::default_meter);
        let opened = open_fd(&self.path, self.create, self.mode, self.kind);
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
        let metrics = Arc::new(LockMetrics::new(
            &meter,
            &name,
            self.kind.as_str(),
            &[KeyValue::new(keys::FS_TYPE, fs_type)],
        ));
        let fd = match opened {
            Ok(fd) => fd,
            Err(e) => return Err(count_error(&metrics, e)),
        };
        let stats = LockStats::new(&name, Arc::clone(&metrics), self.sample_every);
        if !fs_info.coherence.is_trustworthy() {
            match self.fs_policy {
                FsPolicy::Allow => {}
                FsPolicy::Warn => warn_untrusted_once(&self.path, fd.id, &fs_info),
                FsPolicy::Refuse => {
                    return Err(count_error(
                        &metrics,
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
            name,
            kind: self.kind,
            create: self.create,
            mode: self.mode,
            verify: self.verify_inode,
            owner_record: self.owner_record,
            watch: self.watch,
            fast_path: matches!(backend, Backend::Fds(_))
                && !self.owner_record
                && self.watch.is_none(),
            fs_type,
            fs_info,
            backend,
            metrics,
            stats,
        })
    }
}

/// An open lock descriptor and the inode it refers to.
struct LockFd {
    fd: OwnedFd,
    id: FileId,
}

enum Backend {
    /// flock and OFD: each holder locks through its own open file description, so the kernel
    /// excludes threads as it excludes processes. Idle descriptors are kept for reuse.
    Fds(FdPool),
    /// POSIX: one descriptor per inode per process, behind an in-process gate.
    Posix(Mutex<PosixHandle>),
}

/// A successful acquire: the lock and, with owner records, this holder's record state.
struct Acquired {
    held: Held,
    owner: Option<Box<OwnerState>>,
}

/// This holder's owner record: its token and fence, and whether a violation was counted.
struct OwnerState {
    token: String,
    fence: u64,
    /// Shared with the watcher: a violation is counted once per guard, by whoever sees it.
    violated: Arc<AtomicBool>,
}

/// What a guard holds.
enum Held {
    Fd(Box<LockFd>),
    Posix(PosixHandle),
}

impl Held {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Held::Fd(f) => f.fd.as_fd(),
            Held::Posix(h) => h.file().fd(),
        }
    }
    fn id(&self) -> FileId {
        match self {
            Held::Fd(f) => f.id,
            Held::Posix(h) => h.file().id,
        }
    }
}

/// An instrumented file lock.
///
/// Wraps `flock(2)`, OFD or POSIX `fcntl` locks on one lock file and records the schema's
/// metrics (hold and wait histograms, acquisitions, conflicts, errors, migrations, locks held).
///
/// Two `FileLock`s on one path exclude each other within a process and across processes, for
/// every [`LockKind`]; a `FileLock` shared between threads (`Arc<FileLock>`) never lets two
/// threads hold it exclusively at once.
pub struct FileLock {
    path: PathBuf,
    name: String,
    kind: LockKind,
    create: bool,
    mode: u32,
    verify: bool,
    owner_record: bool,
    watch: Option<Duration>,
    /// flock/OFD without owner records or watching: `lock` and `try_lock` try `fast` first.
    fast_path: bool,
    fs_type: &'static str,
    fs_info: crate::fs::FsInfo,
    backend: Backend,
    metrics: Arc<LockMetrics>,
    /// Counts (published by the flusher) and the timing sample.
    stats: Arc<LockStats>,
}

impl fmt::Debug for FileLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileLock")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("verify_inode", &self.verify)
            .field("fs_type", &self.fs_type)
            .finish_non_exhaustive()
    }
}

/// What the fast path's one non-blocking attempt did.
enum FastTry {
    Locked(Box<LockFd>),
    /// The lock is held elsewhere (conflict counted).
    Busy,
    /// The fast path does not apply; take the full path.
    Slow,
    Failed(Errno),
}

/// How an acquire waits once it has found the lock taken.
#[derive(Clone, Copy)]
enum Wait {
    /// Give up at once.
    No,
    /// Block in the kernel (and on the in-process gate for POSIX).
    Block,
}

impl FileLock {
    /// Opens `path` as a `flock` lock with default settings (create with mode 0644, verify the
    /// inode after acquiring, global meter).
    pub fn open(path: impl AsRef<Path>) -> Result<FileLock> {
        FileLock::builder(path).open()
    }

    /// Starts a builder for `path`.
    pub fn builder(path: impl AsRef<Path>) -> FileLockBuilder {
        FileLockBuilder {
            path: path.as_ref().to_path_buf(),
            name: None,
            kind: LockKind::Flock,
            create: true,
            mode: 0o644,
            verify_inode: true,
            meter: None,
            fs_policy: FsPolicy::Warn,
            owner_record: false,
            watch: None,
            sample_every: DEFAULT_SAMPLE_EVERY,
        }
    }

    /// The lock file path as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `lock.name` this lock records under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The kernel lock kind.
    pub fn kind(&self) -> LockKind {
        self.kind
    }

    /// The file-system type the lock file was on when opened (the `fs.type` attribute).
    pub fn fs_type(&self) -> &'static str {
        self.fs_type
    }

    /// The file system the lock file was on when opened: mount, options, and whether locks
    /// there exclude host-wide, across clients, or only locally.
    pub fn fs_info(&self) -> &crate::fs::FsInfo {
        &self.fs_info
    }

    /// The owner record currently in the lock file (written by the last exclusive holder that
    /// used [`FileLockBuilder::owner_record`]), read bypassing cached pages. `Ok(None)` when
    /// the file holds no record.
    pub fn holder(&self) -> Result<Option<owner::OwnerRecord>> {
        let read = |fd: BorrowedFd<'_>| {
            owner::read(fd).map_err(|errno| self.err(Operation::Verify, errno))
        };
        match &self.backend {
            Backend::Fds(pool) => {
                let fd = match pool.take() {
                    Some(fd) => fd,
                    None => self.reopen()?,
                };
                let r = read(fd.fd.as_fd());
                pool.put(fd);
                r
            }
            Backend::Posix(current) => {
                let handle = current.lock().clone();
                read(handle.file().fd())
            }
        }
    }

    /// Takes the lock exclusively, waiting as long as it takes.
    #[inline(always)]
    pub fn lock(&self) -> Result<FileLockGuard<'_>> {
        self.lock_mode(LockMode::Exclusive)
    }

    /// Takes the lock shared, waiting as long as it takes.
    #[inline(always)]
    pub fn lock_shared(&self) -> Result<FileLockGuard<'_>> {
        self.lock_mode(LockMode::Shared)
    }

    /// Tries to take the lock exclusively; `Ok(None)` when it is held elsewhere.
    #[inline(always)]
    pub fn try_lock(&self) -> Result<Option<FileLockGuard<'_>>> {
        self.try_lock_mode(LockMode::Exclusive)
    }

    /// Tries to take the lock shared; `Ok(None)` when it is held exclusively elsewhere.
    #[inline(always)]
    pub fn try_lock_shared(&self) -> Result<Option<FileLockGuard<'_>>> {
        self.try_lock_mode(LockMode::Shared)
    }

    /// Takes the lock exclusively, giving up after `timeout` with `Ok(None)`.
    ///
    /// The kernel has no timed `flock`, so after a first non-blocking attempt this polls with
    /// exponential back-off (100 µs up to 10 ms): a release is noticed within 10 ms.
    pub fn lock_timeout(&self, timeout: Duration) -> Result<Option<FileLockGuard<'_>>> {
        self.acquire_timeout(LockMode::Exclusive, timeout)
    }

    /// Takes the lock shared, giving up after `timeout` with `Ok(None)`.
    pub fn lock_shared_timeout(&self, timeout: Duration) -> Result<Option<FileLockGuard<'_>>> {
        self.acquire_timeout(LockMode::Shared, timeout)
    }

    /// Takes the lock exclusively without blocking a runtime thread.
    ///
    /// Cancellation-safe: the future only ever holds the lock at the instant it resolves, so
    /// dropping it before then never leaves the lock held, not even later. Waits by polling
    /// with back-off (100 µs up to 10 ms) on the tokio timer.
    #[cfg(feature = "tokio")]
    pub async fn lock_async(&self) -> Result<FileLockGuard<'_>> {
        self.acquire_async(LockMode::Exclusive).await
    }

    /// Takes the lock shared without blocking a runtime thread; see [`FileLock::lock_async`].
    #[cfg(feature = "tokio")]
    pub async fn lock_shared_async(&self) -> Result<FileLockGuard<'_>> {
        self.acquire_async(LockMode::Shared).await
    }

    // ---- acquire paths -------------------------------------------------------------------

    #[inline(always)]
    fn lock_mode(&self, mode: LockMode) -> Result<FileLockGuard<'_>> {
        let start = Tsc::now();
        match self.fast(mode) {
            FastTry::Locked(fd) => Ok(self.fast_guard(fd, mode, start)),
            FastTry::Busy => self.acquire_blocking(mode, start, true),
            FastTry::Slow => self.acquire_blocking(mode, start, false),
            FastTry::Failed(errno) => Err(self.fast_failed(mode, start, errno)),
        }
    }

    #[inline(always)]
    fn try_lock_mode(&self, mode: LockMode) -> Result<Option<FileLockGuard<'_>>> {
        let start = Tsc::now();
        match self.fast(mode) {
            FastTry::Locked(fd) => Ok(Some(self.fast_guard(fd, mode, start))),
            FastTry::Busy => {
                self.not_acquired(mode, Outcome::WouldBlock, start, &tracing::Span::none());
                Ok(None)
            }
            FastTry::Slow => self.acquire_try(mode, start),
            FastTry::Failed(errno) => Err(self.fast_failed(mode, start, errno)),
        }
    }

    /// The common case without spans, owner records or watching: one descriptor from the
    /// pool, one non-blocking lock call, one `stat` to verify. Anything else (an empty pool,
    /// a migration, POSIX locks, a tracing subscriber that wants spans) says `Slow`; a conflict
    /// is counted and says `Busy`. Everything but the lock call itself stays out of line, so
    /// the instructions and memory touched between the system calls stay few.
    #[inline(always)]
    fn fast(&self, mode: LockMode) -> FastTry {
        let Some(pool) = self.fast_pool() else {
            return FastTry::Slow;
        };
        let Some(fd) = pool.take() else {
            return FastTry::Slow;
        };
        match sys::lock(fd.fd.as_fd(), self.kind, mode, false) {
            Ok(true) if !self.verify || self.verified(&fd) => FastTry::Locked(fd),
            Ok(true) => {
                self.unlock_migrated(pool, fd);
                FastTry::Slow
            }
            Ok(false) => {
                pool.put(fd);
                self.stats.conflict(mode);
                FastTry::Busy
            }
            // The descriptor is closed here; the error is counted and returned (a retry that
            // happened to succeed must not hide it).
            Err(errno) => FastTry::Failed(errno),
        }
    }

    /// The descriptor pool when the fast path applies.
    #[inline(always)]
    fn fast_pool(&self) -> Option<&FdPool> {
        match &self.backend {
            Backend::Fds(pool)
                if self.fast_path
                    && !tracing::enabled!(target: "lockmeter", tracing::Level::INFO) =>
            {
                Some(pool)
            }
            _ => None,
        }
    }

    /// Whether the path still names the locked inode.
    #[inline(always)]
    fn verified(&self, fd: &LockFd) -> bool {
        matches!(sys::path_id(&self.path), Ok(id) if id == fd.id)
    }

    /// A migration (or a failing stat) on the fast path: let go; the full path counts it.
    #[cold]
    #[inline(never)]
    fn unlock_migrated(&self, pool: &FdPool, fd: Box<LockFd>) {
        if sys::unlock(fd.fd.as_fd(), self.kind).is_ok() {
            pool.put(fd);
        }
    }

    #[cold]
    #[inline(never)]
    fn fast_failed(&self, mode: LockMode, start: Tsc, errno: Errno) -> Error {
        let e = self.err(Operation::Lock, errno);
        self.fail_wait(mode, start, &tracing::Span::none(), e)
    }

    #[inline(always)]
    fn fast_guard(&self, fd: Box<LockFd>, mode: LockMode, start: Tsc) -> FileLockGuard<'_> {
        let acquired_at = Tsc::now();
        let timed = self.stats.file_acquired(mode, false);
        if timed {
            self.record_wait(mode, start, acquired_at);
        }
        FileLockGuard {
            lock: self,
            held: ManuallyDrop::new(Some(Held::Fd(fd))),
            extra: ManuallyDrop::new(None),
            acquired_at,
            mode,
            contended: false,
            timed,
        }
    }

    /// Records the wait of a timed (sampled) acquisition.
    #[cold]
    #[inline(never)]
    fn record_wait(&self, mode: LockMode, start: Tsc, acquired_at: Tsc) {
        self.metrics
            .record_wait(mode, Outcome::Acquired, start.secs_until(acquired_at));
    }

    /// Records the hold of a timed (sampled) acquisition, ending now.
    #[cold]
    #[inline(never)]
    fn record_hold(&self, mode: LockMode, contended: bool, acquired_at: Tsc) {
        self.metrics
            .record_hold(mode, contended, acquired_at.elapsed_secs());
    }

    #[cold]
    fn acquire_blocking(
        &self,
        mode: LockMode,
        start: Tsc,
        contended: bool,
    ) -> Result<FileLockGuard<'_>> {
        let span = trace::acquire(self.span_attrs(), mode);
        let _entered = span.enter();
        let mut contended = contended;
        match self.attempt(mode, Wait::Block, &mut contended) {
            Ok(Some(held)) => Ok(self.guard(held, mode, contended, start, &span)),
            // A blocking attempt only returns None if the kernel said "would block" to a
            // blocking call, which it does not; treat it as an error rather than loop.
            Ok(None) => Err(self.fail_wait(
                mode,
                start,
                &span,
                Error::Os {
                    path: self.path.clone(),
                    operation: Operation::Lock,
                    errno: Errno::AGAIN,
                },
            )),
            Err(e) => Err(self.fail_wait(mode, start, &span, e)),
        }
    }

    #[cold]
    fn acquire_try(&self, mode: LockMode, start: Tsc) -> Result<Option<FileLockGuard<'_>>> {
        let span = trace::acquire(self.span_attrs(), mode);
        let _entered = span.enter();
        let mut contended = false;
        match self.attempt(mode, Wait::No, &mut contended) {
            Ok(Some(held)) => Ok(Some(self.guard(held, mode, contended, start, &span))),
            Ok(None) => {
                self.not_acquired(mode, Outcome::WouldBlock, start, &span);
                Ok(None)
            }
            Err(e) => Err(self.fail_wait(mode, start, &span, e)),
        }
    }

    fn acquire_timeout(
        &self,
        mode: LockMode,
        timeout: Duration,
    ) -> Result<Option<FileLockGuard<'_>>> {
        let span = trace::acquire(self.span_attrs(), mode);
        let _entered = span.enter();
        let start = Tsc::now();
        let deadline = Instant::now() + timeout;
        let mut contended = false;
        let mut backoff = POLL_MIN;
        loop {
            match self.attempt(mode, Wait::No, &mut contended) {
                Ok(Some(held)) => return Ok(Some(self.guard(held, mode, contended, start, &span))),
                Ok(None) => {}
                Err(e) => return Err(self.fail_wait(mode, start, &span, e)),
            }
            let now = Instant::now();
            if now >= deadline {
                self.not_acquired(mode, Outcome::Timeout, start, &span);
                return Ok(None);
            }
            std::thread::sleep(backoff.min(deadline - now));
            backoff = (backoff * 2).min(POLL_MAX);
        }
    }

    #[cfg(feature = "tokio")]
    async fn acquire_async(&self, mode: LockMode) -> Result<FileLockGuard<'_>> {
        /// Records `cancelled` if the future is dropped before it resolves.
        struct Pending<'a> {
            lock: &'a FileLock,
            mode: LockMode,
            start: Tsc,
            span: tracing::Span,
            done: bool,
        }
        impl Drop for Pending<'_> {
            fn drop(&mut self) {
                if !self.done {
                    self.lock
                        .not_acquired(self.mode, Outcome::Cancelled, self.start, &self.span);
                }
            }
        }
        let start = Tsc::now();
        let mut pending = Pending {
            lock: self,
            mode,
            start,
            span: trace::acquire(self.span_attrs(), mode),
            done: false,
        };
        let mut contended = false;
        let mut backoff = POLL_MIN;
        loop {
            // A non-blocking attempt holds nothing when it returns None, and returns the guard
            // in the same poll when it succeeds: there is no await point while the lock is held.
            let attempt = pending
                .span
                .in_scope(|| self.attempt(mode, Wait::No, &mut contended));
            match attempt {
                Ok(Some(held)) => {
                    pending.done = true;
                    return Ok(self.guard(held, mode, contended, start, &pending.span));
                }
                Ok(None) => {}
                Err(e) => {
                    pending.done = true;
                    return Err(self.fail_wait(mode, start, &pending.span, e));
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(POLL_MAX);
        }
    }

    #[inline]
    fn guard(
        &self,
        acquired: Acquired,
        mode: LockMode,
        contended: bool,
        start: Tsc,
        acquire_span: &tracing::Span,
    ) -> FileLockGuard<'_> {
        let acquired_at = Tsc::now();
        let timed = self.stats.file_acquired(mode, contended);
        if timed {
            self.record_wait(mode, start, acquired_at);
        }
        trace::acquire_done(acquire_span, Outcome::Acquired, contended);
        let watch = self
            .watch
            .map(|interval| self.start_watch(&acquired, interval));
        let span = trace::hold(self.span_attrs(), mode, contended);
        let extra = (watch.is_some() || acquired.owner.is_some() || !span.is_none()).then(|| {
            Box::new(GuardExtra {
                watch,
                owner: acquired.owner,
                _span: span,
            })
        });
        FileLockGuard {
            lock: self,
            held: ManuallyDrop::new(Some(acquired.held)),
            extra: ManuallyDrop::new(extra),
            acquired_at,
            mode,
            contended,
            timed,
        }
    }

    #[cold]
    fn start_watch(&self, acquired: &Acquired, interval: Duration) -> WatchHandle {
        // The watcher re-reads the owner record through its own duplicate of the locked
        // descriptor. Not for POSIX locks: closing any descriptor of the file would drop them.
        let owner = match (&acquired.owner, &acquired.held) {
            (Some(o), Held::Fd(fd)) => match fd.fd.try_clone() {
                Ok(dup) => Some((dup, o.token.clone(), Arc::clone(&o.violated))),
                Err(e) => {
                    self.metrics.error(
                        "verify",
                        sys::errno_name(Errno::from_io_error(&e).unwrap_or(Errno::MFILE)),
                    );
                    None
                }
            },
            _ => None,
        };
        watch::register(WatchSpec {
            path: self.path.clone(),
            id: acquired.held.id(),
            lock_name: self.name.clone(),
            metrics: Arc::clone(&self.metrics),
            interval,
            owner,
        })
    }

    #[inline]
    fn span_attrs(&self) -> trace::SpanAttrs<'_> {
        trace::SpanAttrs {
            name: &self.name,
            kind: self.kind.as_str(),
            fs_type: Some(self.fs_type),
        }
    }

    fn not_acquired(&self, mode: LockMode, outcome: Outcome, start: Tsc, span: &tracing::Span) {
        self.metrics
            .not_acquired(mode, outcome, start.elapsed_secs());
        trace::acquire_done(span, outcome, true);
    }

    #[cold]
    fn fail_wait(&self, mode: LockMode, start: Tsc, span: &tracing::Span, e: Error) -> Error {
        self.metrics
            .not_acquired(mode, Outcome::Error, start.elapsed_secs());
        trace::acquire_done(span, Outcome::Error, false);
        e
    }

    /// One acquire: lock (first without blocking, then per `wait`), then verify the inode and
    /// re-lock on a migration. Counts a conflict the first time the lock is found taken.
    /// Errors are counted here; the caller records the wait.
    #[inline]
    fn attempt(
        &self,
        mode: LockMode,
        wait: Wait,
        contended: &mut bool,
    ) -> Result<Option<Acquired>> {
        let Some(held) = self.attempt_inner(mode, wait, contended)? else {
            return Ok(None);
        };
        let owner = if self.owner_record && mode == LockMode::Exclusive {
            match self.stamp(held.fd()) {
                Ok(o) => Some(o),
                Err(errno) => {
                    // Asked for a record and could not write it: do not hand out the lock.
                    let e = self.err(Operation::Lock, errno);
                    if let Err(errno) = self.unlock_held(held, mode) {
                        self.err(Operation::Unlock, errno);
                    }
                    return Err(e);
                }
            }
        } else {
            None
        };
        Ok(Some(Acquired { held, owner }))
    }

    /// Writes this acquisition's owner record (fence = previous + 1).
    #[cold]
    fn stamp(&self, fd: BorrowedFd<'_>) -> std::result::Result<Box<OwnerState>, Errno> {
        let previous = owner::read(fd)?;
        let fence = previous.map_or(1, |p| p.fence.wrapping_add(1));
        let rec = owner::OwnerRecord::new_for_self(fence)?;
        owner::write(fd, &rec)?;
        Ok(Box::new(OwnerState {
            token: rec.token,
            fence,
            violated: Arc::new(AtomicBool::new(false)),
        }))
    }

    #[inline]
    fn attempt_inner(
        &self,
        mode: LockMode,
        wait: Wait,
        contended: &mut bool,
    ) -> Result<Option<Held>> {
        let mut migrations = 0;
        loop {
            let held = match &self.backend {
                Backend::Fds(pool) => self.lock_fd(pool, mode, wait, contended)?,
                Backend::Posix(current) => self.lock_posix(current, mode, wait, contended)?,
            };
            let Some(held) = held else { return Ok(None) };
            if !self.verify {
                return Ok(Some(held));
            }
            match sys::path_id(&self.path) {
                Ok(id) if id == held.id() => return Ok(Some(held)),
                Ok(id) => {
                    let kind = if id.dev != held.id().dev {
                        MigrationKind::DeviceChanged
                    } else {
                        MigrationKind::Replaced
                    };
                    self.migrated(kind, held.id(), Some(id));
                }
                Err(Errno::NOENT) => self.migrated(MigrationKind::Unlinked, held.id(), None),
                Err(errno) => {
                    let e = self.err(Operation::Verify, errno);
                    self.discard(held, mode);
                    return Err(e);
                }
            }
            // The lock guards an inode the path no longer names: let go of it and of every
            // descriptor of the old inode, then lock what the path names now.
            self.discard(held, mode);
            migrations += 1;
            if migrations >= MAX_MIGRATIONS {
                return Err(count_error(
                    &self.metrics,
                    Error::Unstable {
                        path: self.path.clone(),
                        attempts: migrations,
                    },
                ));
            }
        }
    }

    /// Counts an exclusion violation and says so loudly.
    #[cold]
    fn violation(&self, ours: &str, fence: u64, theirs: Option<&owner::OwnerRecord>) {
        self.metrics.violation();
        match theirs {
            Some(t) => tracing::error!(
                lock.name = %self.name,
                lock.path = %self.path.display(),
                our.token = ours,
                our.fence = fence,
                other.host = %t.host,
                other.pid = t.pid,
                other.token = %t.token,
                other.fence = t.fence,
                "exclusion violation: {}:{} acquired this lock while we held it exclusively; the lock does not exclude here (check the file system with `lockmeter probe`)",
                t.host, t.pid,
            ),
            None => tracing::error!(
                lock.name = %self.name,
                lock.path = %self.path.display(),
                our.token = ours,
                our.fence = fence,
                "exclusion violation: our owner record in the lock file was overwritten or removed while we held the lock exclusively",
            ),
        }
    }

    #[cold]
    fn migrated(&self, kind: MigrationKind, old: FileId, new: Option<FileId>) {
        self.metrics.migration(kind, DetectedAt::Acquire);
        tracing::warn!(
            lock.name = %self.name,
            lock.path = %self.path.display(),
            migration.kind = kind.as_str(),
            migration.detected_at = "acquire",
            old_inode = %old,
            new_inode = %new.map(|n| n.to_string()).unwrap_or_else(|| "none".into()),
            "lock file changed under the lock: it was {} after this process opened it; re-locking the file the path names now",
            match kind { MigrationKind::Unlinked => "unlinked", MigrationKind::Replaced => "replaced", MigrationKind::DeviceChanged => "moved to another device" },
        );
    }

    #[inline]
    fn lock_fd(
        &self,
        pool: &FdPool,
        mode: LockMode,
        wait: Wait,
        contended: &mut bool,
    ) -> Result<Option<Held>> {
        let fd = match pool.take() {
            Some(fd) => fd,
            None => self.reopen()?,
        };
        match self.kernel_lock(fd.fd.as_fd(), mode, wait, contended) {
            Ok(true) => Ok(Some(Held::Fd(fd))),
            Ok(false) => {
                pool.put(fd);
                Ok(None)
            }
            Err(e) => Err(e), // the descriptor is closed; it holds nothing
        }
    }

    /// Kernel lock on `fd`: non-blocking first; on conflict count it, then block if asked.
    #[inline]
    fn kernel_lock(
        &self,
        fd: BorrowedFd<'_>,
        mode: LockMode,
        wait: Wait,
        contended: &mut bool,
    ) -> Result<bool> {
        match sys::lock(fd, self.kind, mode, false) {
            Ok(true) => return Ok(true),
            Ok(false) => self.conflict(mode, contended),
            Err(errno) => return Err(self.err(Operation::Lock, errno)),
        }
        match wait {
            Wait::No => Ok(false),
            Wait::Block => sys::lock(fd, self.kind, mode, true)
                .map_err(|errno| self.err(Operation::Lock, errno)),
        }
    }

    #[inline]
    fn conflict(&self, mode: LockMode, contended: &mut bool) {
        if !*contended {
            *contended = true;
            self.stats.conflict(mode);
        }
    }

    fn lock_posix(
        &self,
        current: &Mutex<PosixHandle>,
        mode: LockMode,
        wait: Wait,
        contended: &mut bool,
    ) -> Result<Option<Held>> {
        let handle = current.lock().clone();
        let file = handle.file();
        // In-process gate first: threads of one process never exclude each other in the kernel.
        let gated = match mode {
            LockMode::Exclusive => file.gate.try_lock_exclusive(),
            LockMode::Shared => file.gate.try_lock_shared(),
        };
        if !gated {
            self.conflict(mode, contended);
            match wait {
                Wait::No => return Ok(None),
                Wait::Block => match mode {
                    LockMode::Exclusive => file.gate.lock_exclusive(),
                    LockMode::Shared => file.gate.lock_shared(),
                },
            }
        }
        let unlock_gate = || {
            // SAFETY: the gate was locked in `mode` above by this call.
            unsafe {
                match mode {
                    LockMode::Exclusive => file.gate.unlock_exclusive(),
                    LockMode::Shared => file.gate.unlock_shared(),
                }
            }
        };
        let kernel = match mode {
            LockMode::Exclusive => self.kernel_lock(file.fd(), mode, wait, contended),
            LockMode::Shared => {
                // The first shared holder in this process takes the kernel read lock for all.
                // A thread may be blocked in the kernel holding `readers` (first reader waiting
                // for another process's writer): a non-blocking attempt must not wait for it.
                let readers = match wait {
                    Wait::Block => Some(file.readers.lock()),
                    Wait::No => file.readers.try_lock(),
                };
                let Some(mut readers) = readers else {
                    self.conflict(mode, contended);
                    unlock_gate();
                    return Ok(None);
                };
                if *readers == 0 {
                    let r = self.kernel_lock(file.fd(), mode, wait, contended);
                    if let Ok(true) = r {
                        *readers = 1;
                    }
                    r
                } else {
                    *readers += 1;
                    Ok(true)
                }
            }
        };
        match kernel {
            Ok(true) => Ok(Some(Held::Posix(handle))),
            Ok(false) => {
                unlock_gate();
                Ok(None)
            }
            Err(e) => {
                unlock_gate();
                Err(e)
            }
        }
    }

    /// Releases a flock/OFD lock and returns the descriptor to the pool.
    /// `unlock_fd` for `flock` locks, with the system call inline (see `FileLockGuard`'s `Drop`).
    #[inline(always)]
    fn unlock_flock(&self, fd: Box<LockFd>) -> std::result::Result<(), Errno> {
        let r = rustix::fs::flock(fd.fd.as_fd(), rustix::fs::FlockOperation::Unlock);
        match (&self.backend, r) {
            (Backend::Fds(pool), Ok(())) => pool.put(fd),
            _ => unlock_failed_close(fd),
        }
        r
    }

    fn unlock_fd(&self, fd: Box<LockFd>) -> std::result::Result<(), Errno> {
        let r = sys::unlock(fd.fd.as_fd(), self.kind);
        match (&self.backend, r) {
            (Backend::Fds(pool), Ok(())) => pool.put(fd),
            // On failure the descriptor is dropped here: closing the last descriptor of an
            // open file description releases flock and OFD locks.
            _ => drop(fd),
        }
        r
    }

    /// Releases a held lock (kernel, then the in-process gate for POSIX).
    fn unlock_held(&self, held: Held, mode: LockMode) -> std::result::Result<(), Errno> {
        match held {
            Held::Fd(fd) => self.unlock_fd(fd),
            Held::Posix(handle) => {
                let file = handle.file();
                let r = match mode {
                    LockMode::Exclusive => sys::unlock(file.fd(), self.kind),
                    LockMode::Shared => {
                        let mut readers = file.readers.lock();
                        *readers -= 1;
                        if *readers == 0 {
                            sys::unlock(file.fd(), self.kind)
                        } else {
                            Ok(())
                        }
                    }
                };
                // SAFETY: a `Held::Posix` in `mode` owns one lock of the gate in that mode.
                unsafe {
                    match mode {
                        LockMode::Exclusive => file.gate.unlock_exclusive(),
                        LockMode::Shared => file.gate.unlock_shared(),
                    }
                }
                r
            }
        }
    }

    /// Lets go of a lock on an inode the path no longer names, and of every descriptor of it.
    #[cold]
    fn discard(&self, held: Held, mode: LockMode) {
        let old = held.id();
        if let Err(errno) = self.unlock_held(held, mode) {
            // Counted, not returned: the descriptors of the orphaned inode are closed below,
            // which releases a flock/OFD lock; the caller goes on to lock the new file.
            self.err(Operation::Unlock, errno);
        }
        match &self.backend {
            Backend::Fds(pool) => pool.retain(|fd| fd.id != old),
            Backend::Posix(current) => {
                let mut cur = current.lock();
                if cur.file().id == old {
                    match open_fd(&self.path, self.create, self.mode, self.kind) {
                        Ok(fd) => *cur = PosixHandle::register(fd.fd, fd.id),
                        // Counted now; the next attempt re-opens through the old handle, finds
                        // the same mismatch and reports through `Unstable` or the open error.
                        Err(e) => {
                            count_error(&self.metrics, e);
                        }
                    }
                }
            }
        }
    }

    #[cold]
    fn reopen(&self) -> Result<Box<LockFd>> {
        open_fd(&self.path, self.create, self.mode, self.kind)
            .map(Box::new)
            .map_err(|e| count_error(&self.metrics, e))
    }

    #[cold]
    fn err(&self, operation: Operation, errno: Errno) -> Error {
        count_error(
            &self.metrics,
            Error::Os {
                path: self.path.clone(),
                operation,
                errno,
            },
        )
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

/// One `warn!` per lock file (inode) per process about a file system that may not exclude.
#[cold]
fn warn_untrusted_once(path: &Path, id: FileId, info: &crate::fs::FsInfo) {
    static WARNED: std::sync::OnceLock<Mutex<std::collections::HashSet<FileId>>> =
        std::sync::OnceLock::new();
    if WARNED.get_or_init(Default::default).lock().insert(id) {
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

/// Counts an error in `lock.errors` and logs it at debug level; returns it for the caller.
#[cold]
fn count_error(metrics: &LockMetrics, e: Error) -> Error {
    metrics.error(e.operation().as_str(), e.errno_name());
    tracing::debug!(error = %e, "lock operation failed");
    e
}

fn open_fd(path: &Path, create: bool, mode: u32, kind: LockKind) -> Result<LockFd> {
    match sys::open_lock_file(path, create, mode, kind) {
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

/// A held file lock. Dropping it releases the lock with an explicit unlock (`LOCK_UN` /
/// `F_UNLCK`); a failed unlock is counted in `lock.errors` and logged at `error` level. Call
/// [`FileLockGuard::unlock`] to get the error instead.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct FileLockGuard<'a> {
    lock: &'a FileLock,
    /// `None` once released. `ManuallyDrop` (here and below) keeps the guard's drop glue down to
    /// `Drop::drop`, small enough to be inlined into the caller: see `Drop`.
    held: ManuallyDrop<Option<Held>>,
    /// Watch, owner record and span; `None` in the common case (a small guard is cheap to move).
    extra: ManuallyDrop<Option<Box<GuardExtra>>>,
    acquired_at: Tsc,
    mode: LockMode,
    contended: bool,
    /// Whether this acquisition is in the timing sample (its hold is recorded at release).
    timed: bool,
}

/// The parts of a guard only some locks have.
struct GuardExtra {
    watch: Option<WatchHandle>,
    owner: Option<Box<OwnerState>>,
    /// The `lock.hold` span, kept for its lifetime: it closes when the guard goes.
    _span: tracing::Span,
}

impl fmt::Debug for FileLockGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileLockGuard")
            .field("lock", &self.lock.name)
            .field("mode", &self.mode)
            .field("contended", &self.contended)
            .finish_non_exhaustive()
    }
}

impl FileLockGuard<'_> {
    /// The mode the lock is held in.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// Whether the acquire found the lock taken and had to wait.
    pub fn was_contended(&self) -> bool {
        self.contended
    }

    /// How long the lock has been held so far.
    pub fn held_for(&self) -> Duration {
        Duration::from_secs_f64(self.acquired_at.elapsed_secs())
    }

    /// The fencing number of this acquisition (with owner records, exclusive mode): one more
    /// than the previous holder's. Pass it to the storage the lock protects and have it reject
    /// writes carrying a smaller one.
    pub fn fencing_token(&self) -> Option<u64> {
        self.owner().map(|o| o.fence)
    }

    /// Re-reads the owner record (bypassing caches) and checks it is still ours. `Ok(false)`
    /// means another holder acquired this "exclusive" lock while we held it: the lock does not
    /// exclude. The first such finding per guard is counted in `lock.violations` and logged at
    /// `error` level. Always `Ok(true)` without owner records. Also done at release.
    pub fn check_owner(&mut self) -> Result<bool> {
        let (Some(owner), Some(held)) = (
            self.extra.as_ref().and_then(|x| x.owner.as_deref()),
            self.held.as_ref(),
        ) else {
            return Ok(true);
        };
        let current =
            owner::read(held.fd()).map_err(|errno| self.lock.err(Operation::Verify, errno))?;
        if current.as_ref().map(|r| r.token.as_str()) == Some(owner.token.as_str()) {
            return Ok(true);
        }
        if !owner.violated.swap(true, Ordering::AcqRel) {
            self.lock
                .violation(&owner.token, owner.fence, current.as_ref());
        }
        Ok(false)
    }

    /// Whether the lock still protects what it should: the path still names the locked inode
    /// and (with owner records) no other holder's record appeared. With
    /// [`FileLockBuilder::watch`] this reads what the watcher found (cheap); without it, it
    /// checks the path now. A holder that sees `false` should stop its critical section.
    pub fn is_valid(&self) -> bool {
        match (self.watch(), &*self.held) {
            (Some(w), _) => w.watch().is_valid(),
            (None, Some(h)) => sys::path_id(&self.lock.path).is_ok_and(|id| id == h.id()),
            (None, None) => false,
        }
    }

    /// Blocks until the watcher finds the lock invalid (returns `true`) or `timeout` passes
    /// (`false`). Needs [`FileLockBuilder::watch`]; without it, returns `!is_valid()` at once.
    pub fn wait_invalidated(&self, timeout: Duration) -> bool {
        match self.watch() {
            Some(w) => w.watch().wait_invalid(timeout),
            None => !self.is_valid(),
        }
    }

    /// Resolves when the watcher finds the lock invalid (pending forever without
    /// [`FileLockBuilder::watch`] while the lock stays valid). Use it in a `select!` beside the
    /// critical section's work.
    #[cfg(feature = "tokio")]
    pub async fn invalidated(&self) {
        match self.watch() {
            Some(w) => w.watch().invalidated().await,
            None if !self.is_valid() => {}
            None => std::future::pending().await,
        }
    }

    fn owner(&self) -> Option<&OwnerState> {
        self.extra.as_ref().and_then(|x| x.owner.as_deref())
    }

    fn watch(&self) -> Option<&WatchHandle> {
        self.extra.as_ref().and_then(|x| x.watch.as_ref())
    }

    /// Releases the lock, returning the unlock error if there is one (it is also counted).
    pub fn unlock(mut self) -> Result<()> {
        self.release()
            .map_err(|errno| self.lock.err(Operation::Unlock, errno))
    }

    /// Releases (once; later calls do nothing). The error is the unlock call's, not yet counted.
    /// Kept small: it is inlined, system call included, wherever a guard is dropped.
    #[inline(always)]
    fn release(&mut self) -> std::result::Result<(), Errno> {
        if self.extra.is_some() {
            self.release_checks();
        }
        if self.held.is_none() {
            return Ok(());
        }
        if self.timed {
            self.lock
                .record_hold(self.mode, self.contended, self.acquired_at);
        }
        self.lock.stats.count_release(self.mode);
        match self.held.take() {
            Some(Held::Fd(fd)) if self.lock.kind == LockKind::Flock => self.lock.unlock_flock(fd),
            Some(held) => self.lock.unlock_held(held, self.mode),
            None => Ok(()),
        }
    }

    #[cold]
    fn release_checks(&mut self) {
        // Last chance to notice that someone else held the lock with us. A failed read is
        // counted (lock.errors, verify) and does not stop the release.
        let _ = self.check_owner();
        if let Some(w) = self.extra.as_mut().and_then(|x| x.watch.take()) {
            // Once more at release; counted only if the watcher has not already.
            w.watch().revalidate(crate::metrics::DetectedAt::Release);
        }
    }
}

impl AsFd for FileLockGuard<'_> {
    /// The locked descriptor (for handing the lock to a child process, as `lockmeter exec`
    /// does). Closing a duplicate of it does not release a `flock`/OFD lock; for POSIX locks
    /// any close of any descriptor of the file does.
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &*self.held {
            Some(h) => h.fd(),
            // Unreachable: `held` is only taken by `release`, which consumes or drops the guard.
            None => unreachable_released(),
        }
    }
}

#[cold]
fn unreachable_released() -> ! {
    // `held` is `None` only inside `release`, which is reached from `unlock(self)` or `drop`;
    // no `&self` method can observe it.
    std::process::abort()
}

/// Drops the descriptor of a failed unlock: closing the last descriptor of an open file
/// description releases flock and OFD locks.
#[cold]
#[inline(never)]
fn unlock_failed_close(fd: Box<LockFd>) {
    drop(fd);
}

impl Drop for FileLockGuard<'_> {
    /// Inlined into the caller, with the unlock system call: on hosts with return-stack
    /// mitigations (AMD's SRSO "Safe RET" here), the first `ret` after a system call into a
    /// frame entered before it costs ~130 ns, a fifth of the whole `flock` + unlock. Keeping
    /// the system calls in the caller's frame avoids that ret.
    #[inline(always)]
    fn drop(&mut self) {
        // The common case in as few instructions as possible (a flock guard without extras,
        // released into an empty pool slot); anything else out of line.
        let lock = self.lock;
        if let (Backend::Fds(pool), Some(Held::Fd(_)), None, LockKind::Flock) =
            (&lock.backend, &*self.held, &*self.extra, lock.kind)
        {
            let Some(Held::Fd(fd)) = self.held.take() else {
                return;
            };
            if self.timed {
                lock.record_hold(self.mode, self.contended, self.acquired_at);
            }
            lock.stats.count_release(self.mode);
            let r = rustix::fs::flock(fd.fd.as_fd(), rustix::fs::FlockOperation::Unlock);
            match r {
                Ok(()) => pool.put(fd),
                Err(errno) => flock_unlock_failed(lock, fd, errno),
            }
        } else {
            self.drop_slow();
        }
    }
}

impl FileLockGuard<'_> {
    #[cold]
    #[inline(never)]
    fn drop_slow(&mut self) {
        if let Err(errno) = self.release() {
            release_failed(self.lock, errno);
        }
        if self.extra.is_some() {
            // SAFETY: dropped once, here; `extra` is not used after `drop`.
            unsafe { drop_extra(&mut self.extra) };
        }
    }
}

#[cold]
#[inline(never)]
fn flock_unlock_failed(lock: &FileLock, fd: Box<LockFd>, errno: Errno) {
    // Closing the last descriptor of an open file description releases a flock lock.
    drop(fd);
    release_failed(lock, errno);
}

/// Closes the watch and span of a guard.
///
/// # Safety
/// `extra` must not be used afterwards.
#[cold]
#[inline(never)]
unsafe fn drop_extra(extra: &mut ManuallyDrop<Option<Box<GuardExtra>>>) {
    // SAFETY: per the caller's contract.
    unsafe { ManuallyDrop::drop(extra) }
}

#[cold]
#[inline(never)]
fn release_failed(lock: &FileLock, errno: Errno) {
    let e = lock.err(Operation::Unlock, errno);
    tracing::error!(error = %e, lock.name = %lock.name, "failed to release lock");
}
