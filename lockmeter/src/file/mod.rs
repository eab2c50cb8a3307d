//! Instrumented file locks: [`FileLock`], its [`FileLockBuilder`] and [`FileLockGuard`].
//!
//! One concern per file, in the order a lock is used:
//!
//! | file | what |
//! |---|---|
//! | `builder.rs` | [`FileLockBuilder`], [`FsPolicy`]: options, opening the lock file, the fs check |
//! | `acquire.rs` | every acquire: the inlined fast path, blocking, try, timeout, async |
//! | `verify.rs` | lock-then-verify (inode migrations) and owner records (violations) |
//! | `guard.rs` | [`FileLockGuard`] and the release path of each kind |
//! | `pool.rs` | idle descriptors of flock/OFD locks, reused without locking |
//! | `posix.rs` | the per-inode, per-process state POSIX locks need |
//! | `watch.rs` | the watcher thread that re-validates held locks |
//! | `trace.rs` | `tracing` spans and events |

mod acquire;
mod builder;
mod guard;
mod pool;
mod posix;
mod trace;
mod verify;
mod watch;

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rustix::io::Errno;

use crate::error::{Error, Operation, Result};
use crate::kind::LockKind;
use crate::metrics::Recorder;
use crate::owner;
use crate::sys::FileId;
use pool::FdPool;
use posix::PosixHandle;

pub use builder::{FileLockBuilder, FsPolicy};
pub use guard::FileLockGuard;

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
    /// `path` as a C string, built once: verifying after each acquire then passes it to
    /// `lstat` without copying it.
    c_path: std::ffi::CString,
    name: String,
    kind: LockKind,
    create: bool,
    mode: u32,
    /// A directory is accepted as the lock file ([`FileLockBuilder::allow_directory`]).
    allow_directory: bool,
    verify: bool,
    owner_record: bool,
    watch: Option<Duration>,
    /// Per-acquisition spans asked for ([`FileLockBuilder::spans`]).
    spans: bool,
    /// flock/OFD without owner records or watching: `lock` and `try_lock` try the inlined
    /// fast path first.
    fast_path: bool,
    fs_type: &'static str,
    fs_info: crate::fs::FsInfo,
    backend: Backend,
    recorder: Arc<Recorder>,
}

/// An open lock descriptor and the inode it refers to.
struct LockFd {
    fd: OwnedFd,
    id: FileId,
}

/// Where a lock's descriptors live.
enum Backend {
    /// flock and OFD: each holder locks through its own open file description, so the kernel
    /// excludes threads as it excludes processes. Idle descriptors are kept for reuse.
    Fds(FdPool),
    /// POSIX: one descriptor per inode per process, behind an in-process gate.
    Posix(Mutex<PosixHandle>),
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

impl FileLock {
    /// Opens `path` as a `flock` lock with default settings (create with mode 0644, verify the
    /// inode after acquiring, global meter provider).
    pub fn open(path: impl AsRef<Path>) -> Result<FileLock> {
        FileLock::builder(path).open()
    }

    /// Starts a builder for `path`.
    pub fn builder(path: impl AsRef<Path>) -> FileLockBuilder {
        FileLockBuilder::new(path.as_ref())
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

    /// Opens another descriptor of the lock file (the pool was empty, or the file changed).
    #[cold]
    fn reopen(&self) -> Result<Box<LockFd>> {
        self.open_again().map(Box::new).map_err(|e| self.count(e))
    }

    /// Opens the lock file again with the options it was opened with (not counted).
    #[cold]
    fn open_again(&self) -> Result<LockFd> {
        builder::open_fd(
            &self.path,
            self.create,
            self.mode,
            self.kind,
            self.allow_directory,
        )
    }

    /// A failed system call on the lock file: counted in `lock.errors`, returned typed.
    #[cold]
    fn err(&self, operation: Operation, errno: Errno) -> Error {
        self.count(Error::Os {
            path: self.path.clone(),
            operation,
            errno: crate::sys::normalize(errno),
        })
    }

    /// Counts an error in `lock.errors` and logs it at debug level; returns it for the caller.
    #[cold]
    fn count(&self, e: Error) -> Error {
        count_error(&self.recorder, e)
    }
}

/// Counts an error in `lock.errors` and logs it at debug level; returns it for the caller.
#[cold]
fn count_error(recorder: &Recorder, e: Error) -> Error {
    recorder.error(e.operation().as_str(), e.errno_name());
    tracing::debug!(error = %e, "lock operation failed");
    e
}
