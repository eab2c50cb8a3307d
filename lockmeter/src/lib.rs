//! # lockmeter: observable, honest locks
//!
//! lockmeter wraps the locks a program already takes and records, through the OpenTelemetry
//! metrics API, how long each is waited for and held, how often it is contended, and when it
//! silently stops protecting anything (the lock file was replaced or unlinked).
//!
//! ```
//! use lockmeter::FileLock;
//!
//! # fn main() -> Result<(), lockmeter::Error> {
//! # let dir = tempfile::tempdir().unwrap();
//! # let path = dir.path().join("job.lock");
//! let lock = FileLock::builder(&path).name("nightly-job").open()?;
//! {
//!     let _guard = lock.lock()?;            // flock(LOCK_EX), then verify the inode
//!     // ... critical section ...
//! }                                          // LOCK_UN; hold time recorded
//! if let Some(_guard) = lock.try_lock()? {  // Ok(None) when another holder has it
//!     // ...
//! }
//! # Ok(())
//! # }
//! ```
//!
//! What else is here:
//!
//! - [`sync::Mutex`] / [`sync::RwLock`] and (feature `tokio`) `tokio::Mutex` / `tokio::RwLock`:
//!   drop-ins for the std and tokio locks, same API, same schema (`lock.kind = mutex`, ...);
//!   the `sync` ones keep std's poisoning on `parking_lot`'s faster lock.
//! - [`LockMeter`]: the schema for any other lock call (a `parking_lot` lock, Redis `SET NX`,
//!   an advisory lock), through an [`Attempt`] and a [`Hold`].
//! - [`fs`]: where a lock file lives and whether locks there exclude host-wide, across
//!   clients, or only locally ([`FileLock::fs_info`], [`FsPolicy`]).
//! - [`owner`]: owner records and fencing tokens ([`FileLockBuilder::owner_record`]) that turn a
//!   lock which silently stopped excluding into a counted `lock.violations`.
//! - [`FileLockBuilder::watch`]: notice a lock file replaced or unlinked while held.
//! - [`telemetry`] (feature `telemetry`): SDK, Prometheus `/metrics` and OTLP from `OTEL_*`.
//!
//! With no meter provider installed the instruments are no-ops. Install one first (the
//! `telemetry` feature's [`telemetry::init`] does it from the standard `OTEL_*` variables and
//! serves `/metrics`), then create locks: a lock binds its instruments when it is opened.
//!
//! ## Metrics
//!
//! | instrument | type | Prometheus name |
//! |---|---|---|
//! | `lock.duration` | histogram, s | `lock_duration_seconds` |
//! | `lock.wait.duration` | histogram, s | `lock_wait_duration_seconds` |
//! | `lock.acquisitions` | counter | `lock_acquisitions_total` |
//! | `lock.conflicts` | counter | `lock_conflicts_total` |
//! | `lock.errors` | counter | `lock_errors_total` |
//! | `lock.inode.migrations` | counter | `lock_inode_migrations_total` |
//! | `lock.violations` | counter | `lock_violations_total` |
//! | `lock.held` | up-down counter | `lock_held` |
//!
//! Attributes: `lock.name`, `lock.kind`, `lock.mode`, `lock.contended` / `lock.outcome`, and
//! `fs.type` for file locks. `lock.name` defaults to the path: a lock file per resource
//! (`job-1234.lock`) makes a series per file, so give such locks a stable
//! [`name`](FileLockBuilder::name). The SDK's cardinality limit (2000 series per instrument by
//! default) bounds memory; excess series land in `otel.metric.overflow`.
//!
//! ## Kernel facts this crate is built on
//!
//! - `flock(2)` is its own system call. Its locks belong to the *open file description*: `fork`
//!   and `dup` share them, and they end at `LOCK_UN` or when the last descriptor of that
//!   description closes. lockmeter opens lock files with `O_CLOEXEC | O_NOFOLLOW` (so an
//!   `exec`ed child never inherits the lock by accident) and releases with an explicit
//!   `LOCK_UN`. A child made by `fork` *without* `exec` shares the description, and so the lock.
//! - POSIX `fcntl` locks belong to the *process*: two threads never exclude each other, and
//!   closing *any* descriptor of the file drops all of the process's locks on it. For
//!   [`LockKind::Posix`] lockmeter keeps one descriptor per inode per process, never closes it
//!   while a lockmeter handle to that inode exists, and puts an in-process reader-writer gate
//!   in front of the kernel lock so threads exclude each other. It cannot stop *other* code in
//!   the process from closing a descriptor of the file: prefer `Flock` or `Ofd`.
//! - OFD locks (`F_OFD_SETLK`, Linux 3.15+) belong to the open file description like `flock`
//!   but are byte-range locks (lockmeter locks the whole file).
//! - Two holders in one process (threads sharing a [`FileLock`], or two `FileLock`s on one
//!   path) exclude each other for `Flock` and `Ofd` because each holder locks through its own
//!   open file description.
//! - NFS: since Linux 2.6.12 the client emulates `flock` with a whole-file byte-range lock on
//!   the server, so it is coherent across clients (and conflicts with `fcntl` locks there),
//!   unless the mount uses `nolock` or `local_lock=flock|all`. NFSv4 locks are leases: a client
//!   that loses its lease loses the lock.
//! - A lock on a path is a lock on the inode the path named at open time. If the file is
//!   replaced or unlinked, the held lock guards nothing. lockmeter therefore verifies after
//!   acquiring (`fstat(fd)` vs `stat(path)`), counts a migration, and re-locks the current file.
#![deny(missing_docs)]
#![warn(clippy::unwrap_used)]

mod clock;
mod error;
mod file;
pub mod fs;
#[cfg(any(feature = "etcd", feature = "redis", feature = "postgres"))]
pub mod lease;
mod meter;
pub mod metrics;
pub mod owner;
pub mod sync;
mod sys;
#[cfg(feature = "telemetry")]
pub mod telemetry;
#[cfg(feature = "tokio")]
pub mod tokio;
mod trace;
mod watch;

pub use error::{Error, Operation, Result};
pub use file::{FileLock, FileLockBuilder, FileLockGuard, FsPolicy, LockKind};
pub use meter::{Attempt, Hold, LockMeter, Metered};
pub use metrics::{LockMode, LostReason, Outcome};

/// Raw errno type used in [`Error`] (re-exported from `rustix`).
pub use rustix::io::Errno;
