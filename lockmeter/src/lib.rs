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
//! Where the measurements go: lockmeter records through the OpenTelemetry *API*; an
//! application installs an SDK meter provider to export them (the `telemetry` feature's
//! [`telemetry::init`] does it from the standard `OTEL_*` variables and serves Prometheus
//! `/metrics`; any `opentelemetry::global::set_meter_provider` works too). The order does not
//! matter: a lock created before the provider is installed is picked up by it (see
//! [Set-up order](#set-up-order)). Without a provider, recording costs next to nothing and
//! goes nowhere.
//!
//! What else is here:
//!
//! - [`sync::Mutex`] / [`sync::RwLock`] and (feature `tokio`) `tokio::Mutex` / `tokio::RwLock`:
//!   drop-ins for the std and tokio locks, same API, same schema (`lock.kind = mutex`, ...);
//!   the `sync` ones keep std's poisoning on lockmeter's own raw locks, whose words count their
//!   holds.
//! - [`LockMeter`]: the schema for any other lock call (a `parking_lot` lock, Redis `SET NX`,
//!   an advisory lock), through an [`Attempt`] and a [`Hold`].
//! - [`fs`]: where a lock file lives and whether locks there exclude host-wide, across
//!   clients, or only locally ([`FileLock::fs_info`], [`FsPolicy`]).
//! - [`owner`]: owner records and fencing tokens ([`FileLockBuilder::owner_record`]) that turn a
//!   lock which silently stopped excluding into a counted `lock.violations`.
//! - [`FileLockBuilder::watch`]: notice a lock file replaced or unlinked while held.
//! - [`metrics`]: the schema's names and keys, and [`metrics::Sink`] for a provider that is
//!   not the global one.
//! - [`telemetry`] (feature `telemetry`): SDK, Prometheus `/metrics` and OTLP from `OTEL_*`.
//!
//! ## Metrics
//!
//! | instrument | type | Prometheus name |
//! |---|---|---|
//! | `lock.duration` | histogram, s | `lock_duration_seconds` |
//! | `lock.wait.duration` | histogram, s | `lock_wait_duration_seconds` |
//! | `lock.acquisitions` | counter (observed at collection) | `lock_acquisitions_total` |
//! | `lock.conflicts` | counter (observed at collection) | `lock_conflicts_total` |
//! | `lock.errors` | counter | `lock_errors_total` |
//! | `lock.inode.migrations` | counter | `lock_inode_migrations_total` |
//! | `lock.violations` | counter | `lock_violations_total` |
//! | `lock.held` | up-down counter (observed at collection) | `lock_held` |
//! | `lock.lost` | counter | `lock_lost_total` |
//!
//! Attributes: `lock.name`, `lock.kind`, `lock.mode`, `lock.contended` / `lock.outcome`, and
//! `fs.type` for file locks. `lock.name` defaults to the path: a lock file per resource
//! (`job-1234.lock`) makes a series per file, so give such locks a stable
//! [`name`](FileLockBuilder::name). The SDK's cardinality limit (2000 series per instrument by
//! default) bounds memory; excess series land in `otel.metric.overflow`.
//!
//! Counts are exact: every acquisition, conflict and release is counted in per-lock atomics
//! that the SDK reads when it collects, so a scrape, a periodic export, `force_flush` or a
//! shutdown right after an acquisition sees it. Wait and hold times are sampled (1 in 16 file
//! lock and 1 in 64 in-process acquisitions by default, plus the first after each collection;
//! `sample_every` on each builder), chosen without regard to durations.
//!
//! ## Set-up order
//!
//! Locks record into [`metrics::Sink::global`] by default, which follows the global meter
//! provider as it changes. A lock created before the provider is installed:
//!
//! - has its **counts** read by the new provider from the moment lockmeter notices it, and
//!   they are complete from the lock's creation. [`telemetry::init`] (and
//!   [`metrics::refresh`], for a provider you install yourself) make it notice at once;
//!   otherwise it notices at the lock's next timed acquisition (1 in `sample_every`
//!   acquisitions: after `sample_every` on average for a `sync` lock, whose sample is drawn at
//!   random, and within `sample_every` for the others, which count) or when another lock is
//!   created.
//! - records **wait and hold times** from that moment on; those of acquisitions before it went
//!   to the no-op provider and are lost. lockmeter says so once, with a `warn!`.
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
#![cfg_attr(docsrs, feature(doc_cfg))]

mod clock;
mod error;
mod file;
pub mod fs;
mod kind;
#[cfg(any(feature = "etcd", feature = "redis", feature = "postgres"))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(feature = "etcd", feature = "redis", feature = "postgres")))
)]
pub mod lease;
mod meter;
pub mod metrics;
pub mod owner;
pub mod profile;
pub mod sync;
mod sys;
#[cfg(feature = "telemetry")]
#[cfg_attr(docsrs, doc(cfg(feature = "telemetry")))]
pub mod telemetry;
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub mod tokio;

pub use error::{Error, Operation, Result};
pub use file::{FileLock, FileLockBuilder, FileLockGuard, FsPolicy};
pub use kind::{LockKind, LockMode};
pub use meter::{Attempt, Hold, LockMeter, Metered};
pub use metrics::{LostReason, Outcome};

/// Raw errno type used in [`Error`] (re-exported from `rustix`).
pub use rustix::io::Errno;
