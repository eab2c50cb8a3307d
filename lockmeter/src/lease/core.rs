//! What every backend shares: the guard, the hold's shared state (deadline and status), the
//! errors, the status report, and the loss bookkeeping (state, `error!`, `lock.lost`).
//!
//! Each acquisition runs in one background task (the *keeper*) that owns a clone of the lock's
//! [`LockMeter`], resolves the [`Attempt`](crate::Attempt), holds the [`Hold`], renews the
//! lease and watches for its loss. The caller's future only waits for the keeper's answer, so
//! a cancelled `lock()` is seen by the keeper (it cleans up and records `cancelled`), and a
//! loss is counted the moment it is detected, whatever the holder is doing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use crate::metrics::LostReason;
use crate::Hold;

/// A boxed error from a client crate.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors from distributed locks. Each names the lock and the backend; backend failures also
/// carry the `error.type` recorded in `lock.errors` ([`LeaseError::error_type`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    /// The server could not be reached or refused the connection.
    #[error("{backend} lock {name:?}: cannot connect to {endpoint} ({error_type}): {source}")]
    Connect {
        /// The lock name.
        name: String,
        /// `etcd`, `redis` or `postgres`.
        backend: &'static str,
        /// The endpoint as given (passwords removed).
        endpoint: String,
        /// The error kind (`unavailable`, `timeout`, `connection`, `auth`, ...).
        error_type: String,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// A call to the server failed.
    #[error("{backend} lock {name:?}: {operation} failed ({error_type}): {source}")]
    Backend {
        /// The lock name.
        name: String,
        /// `etcd`, `redis` or `postgres`.
        backend: &'static str,
        /// What was being done: `lock`, `unlock`, `renew`, `status`.
        operation: &'static str,
        /// The error kind (`unavailable`, `timeout`, `connection`, a SQLSTATE, ...).
        error_type: String,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// The lock was lost (lease expired or revoked, key deleted or overwritten, connection
    /// dropped) before the holder released it. It was counted in `lock.lost` when detected.
    #[error("{backend} lock {name:?} was lost ({}) before it was released", reason.as_str())]
    Lost {
        /// The lock name.
        name: String,
        /// `etcd`, `redis` or `postgres`.
        backend: &'static str,
        /// Why.
        reason: LostReason,
    },
    /// The lock's background task ended without answering (its tokio runtime shut down).
    #[error(
        "{backend} lock {name:?}: its background task is gone (was the tokio runtime shut down?)"
    )]
    TaskGone {
        /// The lock name.
        name: String,
        /// `etcd`, `redis` or `postgres`.
        backend: &'static str,
    },
    /// A bad argument (an unparsable URL, a mode the backend does not support, a zero TTL).
    #[error("{backend} lock {name:?}: {message}")]
    InvalidArgument {
        /// The lock name.
        name: String,
        /// `etcd`, `redis` or `postgres`.
        backend: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl LeaseError {
    /// The `error.type` value for this error (`unavailable`, `timeout`, `connection`, `lost`,
    /// `invalid_argument`, ...).
    pub fn error_type(&self) -> &str {
        match self {
            LeaseError::Connect { error_type, .. } | LeaseError::Backend { error_type, .. } => {
                error_type
            }
            LeaseError::Lost { .. } => "lost",
            LeaseError::TaskGone { .. } => "task_gone",
            LeaseError::InvalidArgument { .. } => "invalid_argument",
        }
    }

    /// Whether the server could not be reached (at connect time or later).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, LeaseError::Connect { .. })
            || matches!(self.error_type(), "unavailable" | "connection" | "timeout")
    }
}

/// Where a hold stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    Held,
    Lost(LostReason),
    Released,
}

/// State shared by a guard and its keeper.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) backend: &'static str,
    epoch: Instant,
    /// Nanoseconds after `epoch` at which the hold stops being trusted; `u64::MAX`: never.
    deadline_ns: AtomicU64,
    /// The last renewal attempt failed to reach the server (a deadline passing then is a
    /// `connection` loss rather than an `expired` one).
    renew_failing: AtomicBool,
    status: watch::Sender<Status>,
}

impl Shared {
    pub(crate) fn new(name: &str, backend: &'static str) -> Arc<Shared> {
        Arc::new(Shared {
            name: name.to_owned(),
            backend,
            epoch: Instant::now(),
            deadline_ns: AtomicU64::new(u64::MAX),
            renew_failing: AtomicBool::new(false),
            status: watch::Sender::new(Status::Held),
        })
    }

    /// Sets the instant past which the hold is not trusted.
    pub(crate) fn set_deadline(&self, at: Instant) {
        let ns = at.saturating_duration_since(self.epoch).as_nanos();
        self.deadline_ns
            .store(u64::try_from(ns).unwrap_or(u64::MAX - 1), Ordering::Release);
    }

    /// The current deadline (`None`: no expiry).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match self.deadline_ns.load(Ordering::Acquire) {
            u64::MAX => None,
            ns => Some(self.epoch + Duration::from_nanos(ns)),
        }
    }

    pub(crate) fn expired(&self) -> bool {
        self.deadline().is_some_and(|d| Instant::now() >= d)
    }

    pub(crate) fn set_renew_failing(&self, failing: bool) {
        self.renew_failing.store(failing, Ordering::Release);
    }

    /// The reason to record when the deadline passes without a trusted renewal.
    pub(crate) fn deadline_reason(&self) -> LostReason {
        if self.renew_failing.load(Ordering::Acquire) {
            LostReason::Connection
        } else {
            LostReason::Expired
        }
    }

    pub(crate) fn status(&self) -> Status {
        *self.status.borrow()
    }

    /// Resolves when the deadline passes (re-reading it, since renewals move it).
    pub(crate) async fn deadline_passed(&self) {
        loop {
            match self.deadline() {
                None => std::future::pending::<()>().await,
                Some(d) if Instant::now() >= d => return,
                Some(d) => tokio::time::sleep_until(d.into()).await,
            }
        }
    }

    /// Marks the hold lost: an `error!`, `lock.lost{reason}`, then the status (so whoever
    /// wakes on it sees the loss already counted). Only the keeper ends a hold, so the check
    /// and the update cannot race; only the first end counts.
    pub(crate) fn lost(&self, hold: Hold<'_>, reason: LostReason, detail: &str) {
        if self.status() != Status::Held {
            // Already ended: the hold was recorded by whoever ended it.
            drop(hold);
            return;
        }
        tracing::error!(
            lock.name = %self.name,
            lock.kind = self.backend,
            lock.lost.reason = reason.as_str(),
            "{} lock {:?} lost ({}): {detail}; the holder no longer excludes anyone",
            self.backend,
            self.name,
            reason.as_str()
        );
        hold.lost(reason);
        self.status.send_replace(Status::Lost(reason));
    }

    /// Marks the hold released (before the release call, so `is_valid()` turns false first).
    pub(crate) fn released(&self) {
        self.status.send_if_modified(|s| {
            if *s == Status::Held {
                *s = Status::Released;
                true
            } else {
                false
            }
        });
    }

    pub(crate) fn lost_error(&self, reason: LostReason) -> LeaseError {
        LeaseError::Lost {
            name: self.name.clone(),
            backend: self.backend,
            reason,
        }
    }

    pub(crate) fn gone_error(&self) -> LeaseError {
        match self.status() {
            Status::Lost(reason) => self.lost_error(reason),
            _ => LeaseError::TaskGone {
                name: self.name.clone(),
                backend: self.backend,
            },
        }
    }
}

/// The keeper's answer to a release request.
pub(crate) type ReleaseReply = oneshot::Sender<Result<(), LeaseError>>;

/// What the keeper hands back when it acquired the lock.
pub(crate) struct Acquired {
    pub(crate) token: u64,
    pub(crate) key: String,
    pub(crate) revision: Option<i64>,
    pub(crate) contended: bool,
    pub(crate) release: oneshot::Sender<ReleaseReply>,
}

/// The keeper's answer to an acquire: `Ok(None)` for would-block / timed out.
pub(crate) type AcquireReply = oneshot::Sender<Result<Option<Acquired>, LeaseError>>;

/// Waits for the keeper's answer and wraps it in a guard.
pub(crate) async fn await_acquire(
    shared: Arc<Shared>,
    rx: oneshot::Receiver<Result<Option<Acquired>, LeaseError>>,
) -> Result<Option<LeaseGuard>, LeaseError> {
    match rx.await {
        Ok(Ok(Some(a))) => Ok(Some(LeaseGuard {
            shared,
            token: a.token,
            key: a.key,
            revision: a.revision,
            contended: a.contended,
            release: Some(a.release),
        })),
        Ok(Ok(None)) => Ok(None),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(LeaseError::TaskGone {
            name: shared.name.clone(),
            backend: shared.backend,
        }),
    }
}

/// A held distributed lock.
///
/// While it is held a background task renews the lease and watches for its loss. Check
/// [`is_valid`](LeaseGuard::is_valid) before each side effect, pass
/// [`fencing_token`](LeaseGuard::fencing_token) to the storage you write to, and stop when
/// [`invalidated`](LeaseGuard::invalidated) resolves. [`release`](LeaseGuard::release)
/// releases and reports a failed release; dropping the guard releases in the background (a
/// failure there is logged and counted in `lock.errors`, never silent).
#[must_use = "the lock is released when the guard is dropped"]
#[derive(Debug)]
pub struct LeaseGuard {
    shared: Arc<Shared>,
    token: u64,
    key: String,
    revision: Option<i64>,
    contended: bool,
    release: Option<oneshot::Sender<ReleaseReply>>,
}

impl LeaseGuard {
    /// The fencing token: strictly greater than every earlier holder's token for this lock
    /// (etcd: the lock key's create revision; Redis: the per-lock `INCR` counter; PostgreSQL:
    /// the per-lock row of the counter table). Give it to the storage you write to and have
    /// the storage reject writes carrying a lower token than one it has seen.
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// The key that represents this hold on the server (etcd: `NAME/<lease-id-hex>`, as
    /// `ETCD_LOCK_KEY`; Redis: the lock key; PostgreSQL: the advisory lock key in decimal).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The server's revision when the lock was acquired (etcd only; `ETCD_LOCK_REV` as
    /// `etcdctl lock` sets it). The fencing token is the key's create revision, which can be
    /// lower when the acquire had to wait.
    pub fn revision(&self) -> Option<i64> {
        self.revision
    }

    /// Whether the acquire had to wait for another holder.
    pub fn was_contended(&self) -> bool {
        self.contended
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Whether the hold can still be trusted: not lost, not released, and its lease deadline
    /// (the last trusted renewal's send time plus the TTL) has not passed. Reads the clock, so
    /// it is correct even if the background task has not run yet.
    pub fn is_valid(&self) -> bool {
        self.shared.status() == Status::Held && !self.shared.expired()
    }

    /// How long the hold stays trusted without another renewal (`None`: no expiry, as for a
    /// PostgreSQL session lock between health checks; zero once lost).
    pub fn remaining(&self) -> Option<Duration> {
        if self.shared.status() != Status::Held {
            return Some(Duration::ZERO);
        }
        self.shared
            .deadline()
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Why the lock was lost, if it was.
    pub fn lost_reason(&self) -> Option<LostReason> {
        match self.shared.status() {
            Status::Lost(r) => Some(r),
            _ => None,
        }
    }

    /// Resolves when the lock is lost, with the reason (never resolves while the lock is
    /// held). Cancel-safe: use it in `tokio::select!` next to the work the lock protects.
    pub async fn invalidated(&self) -> LostReason {
        let mut rx = self.shared.status.subscribe();
        loop {
            if let Status::Lost(r) = *rx.borrow_and_update() {
                return r;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `shared`, which we hold: unreachable, but never spin.
                return std::future::pending().await;
            }
        }
    }

    /// Releases the lock and waits for the server's answer. `Err(LeaseError::Lost)` if the
    /// lock had already been lost (nothing to release; the loss was counted when detected);
    /// `Err(LeaseError::Backend)` if the release call failed (counted in `lock.errors`; the
    /// lease still ends at its TTL).
    pub async fn release(mut self) -> Result<(), LeaseError> {
        if let Status::Lost(reason) = self.shared.status() {
            return Err(self.shared.lost_error(reason));
        }
        let Some(tx) = self.release.take() else {
            return Err(self.shared.gone_error());
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        if tx.send(reply_tx).is_err() {
            return Err(self.shared.gone_error());
        }
        match reply_rx.await {
            Ok(r) => r,
            Err(_) => Err(self.shared.gone_error()),
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        // Dropping the request sender tells the keeper to release in the background.
        drop(self.release.take());
    }
}

/// What the keeper's hold loop waits for next, besides backend events.
pub(crate) enum ReleaseRequest {
    /// `release()` was called: answer on the reply.
    Explicit(ReleaseReply),
    /// The guard was dropped.
    Dropped,
}

/// Waits for the guard's release request (or its drop).
pub(crate) async fn release_requested(rx: &mut oneshot::Receiver<ReleaseReply>) -> ReleaseRequest {
    match rx.await {
        Ok(reply) => ReleaseRequest::Explicit(reply),
        Err(_) => ReleaseRequest::Dropped,
    }
}

impl ReleaseRequest {
    /// Answers the request; for a dropped guard, logs a failure (it is already counted).
    pub(crate) fn answer(self, shared: &Shared, result: Result<(), LeaseError>) {
        match self {
            ReleaseRequest::Explicit(reply) => {
                // The caller may have stopped waiting; the result was recorded either way.
                let _ = reply.send(result);
            }
            ReleaseRequest::Dropped => {
                if let Err(e) = result {
                    tracing::error!(
                        lock.name = %shared.name,
                        lock.kind = shared.backend,
                        error.type = e.error_type(),
                        "background release of a dropped guard failed: {e}"
                    );
                }
            }
        }
    }
}

/// A task aborted when this handle is dropped.
#[cfg(feature = "etcd")]
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

#[cfg(feature = "etcd")]
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The renewal period for a TTL: a third of it, so two renewals can fail before it passes.
pub(crate) fn renew_interval(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(50))
}

/// How long to wait before retrying a failed renewal: soon, but not in a tight loop.
pub(crate) fn retry_interval(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_millis(50), Duration::from_millis(500))
}

/// One holder or waiter as reported by `status()` / `lockmeter who`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Participant {
    /// Who: the etcd key, the Redis holder id (`host:pid:random`), `pid N` for PostgreSQL.
    pub id: String,
    /// The holder's fencing token, when the backend can tell it.
    pub token: Option<u64>,
    /// Time until the holder's lease ends unless renewed (etcd, Redis).
    pub ttl: Option<Duration>,
    /// Extra facts (PostgreSQL: application, client address, since).
    pub detail: Option<String>,
}

/// Who holds a lock and who waits for it, as the server sees it now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockStatus {
    /// The current holders (one for an exclusive lock; several for shared PostgreSQL locks).
    pub holders: Vec<Participant>,
    /// Waiters, in the order the server will serve them where it has one.
    pub waiters: Vec<Participant>,
    /// The last fencing token handed out for this lock, if any.
    pub last_token: Option<u64>,
}

/// A unique id for a holder: `host:pid:random`.
#[cfg(feature = "redis")]
pub(crate) fn holder_id() -> String {
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    format!("{host}:{}:{:016x}", std::process::id(), fastrand::u64(..))
}

/// Removes a password from a URL for error messages (`redis://:pw@h` → `redis://:***@h`).
pub(crate) fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((auth, host)) = rest.rsplit_once('@') {
            let user = auth.split(':').next().unwrap_or("");
            return format!("{scheme}://{user}:***@{host}");
        }
    }
    // key=value form (PostgreSQL): hide password=...
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
