//! Locks across machines: etcd, Redis and PostgreSQL locks with fencing tokens and lease-loss
//! detection, recorded with the same schema as every other lock (`lock.kind` = `etcd`,
//! `redis`, `postgres`).
//!
//! One cargo feature per backend (`etcd`, `redis`, `postgres`), async on tokio. Every lock has
//! `lock()`, `try_lock()` (`Ok(None)` when held elsewhere), `lock_timeout(d)` (`Ok(None)` when
//! the deadline passed) and `status()` (holders and waiters), and hands out a [`LeaseGuard`]:
//!
//! - [`LeaseGuard::fencing_token`]: strictly greater than every earlier holder's. A lock
//!   service cannot stop a paused or partitioned holder from writing after its lease ended;
//!   the storage can, by rejecting writes with a token lower than one it has already seen.
//! - [`LeaseGuard::is_valid`] / [`LeaseGuard::invalidated`]: the hold stops being trusted when
//!   the lease is lost (expired, revoked, key deleted or overwritten, connection dropped),
//!   detected within the bounds below, counted in `lock.lost{lock.lost.reason}` and logged
//!   with `error!`. A renewal confirmed after the deadline had already passed is not trusted.
//! - [`LeaseGuard::release`] reports a failed release; dropping the guard releases in the
//!   background (failures are logged and counted in `lock.errors`).
//!
//! Metrics: `lock.wait.duration` for every acquire (`acquired`, `would_block`, `timeout`,
//! `cancelled`, `error`), `lock.duration` for every hold, `lock.acquisitions`,
//! `lock.conflicts` (a try that found the lock held, or a wait that had to queue),
//! `lock.errors{lock.operation, error.type}` with the backend's error kind (`unavailable`,
//! `timeout`, `connection`, `auth`, a PostgreSQL SQLSTATE, ...), `lock.held`, `lock.lost`.
//!
//! ## Guarantees and loss detection, per backend
//!
//! | | etcd ([`EtcdLock`]) | Redis ([`RedisLock`]) | PostgreSQL ([`PgAdvisoryLock`]) |
//! |---|---|---|---|
//! | lock | key `NAME/<lease-hex>` on a lease; oldest create revision holds (as `etcdctl lock`) | `SET lockmeter:NAME "<token> <id>" NX PX ttl` (Lua, with the counter) | `pg_advisory_lock(key)` on a dedicated connection |
//! | queue | FIFO by create revision (Lock service) | none: polling with back-off | PostgreSQL's lock queue |
//! | fencing token | the key's create revision | `INCR lockmeter:NAME:fence` | row `NAME` of table `lockmeter_fence`, +1 per acquisition |
//! | renewal | lease keep-alive every TTL/3 | compare-and-extend (Lua) every TTL/3 | health check every TTL/3 (the lock is in `pg_locks`) |
//! | lost when | lease expired or revoked, key deleted or re-put | key expired, deleted or overwritten | connection dropped or terminated |
//! | detected within | TTL (deadline = last confirmed renewal's send time + TTL); key deleted: ms (watch) | TTL; key deleted or overwritten: TTL/3 | connection closed: ms; silent network loss: TTL |
//! | paused holder | lease expires after TTL, next holder gets in; fencing needed | same | keeps the lock (the server holds the session): no second holder |
//! | failover | raft: a committed lock survives a leader change | **not safe**: an async replica can be promoted without the key | session ends on failover: lock lost, detected |
//!
//! Redis is supported as a single instance (or a primary whose failover you accept may hand
//! the lock to a second holder: the fencing token is what makes that detectable downstream).
//! Redlock is not offered: it needs bounded clock drift and process pauses to be safe, which
//! is the very assumption a paused or partitioned holder breaks, and it still needs fencing
//! tokens, which it cannot generate. Use etcd or PostgreSQL when you need the lock itself to
//! hold across failures.
//!
//! The guard's validity is measured with the monotonic clock from the *send* time of the last
//! confirmed renewal, so the holder always stops trusting its lease before the server can
//! expire it (the server counts from when it received the renewal, which is later).
//!
//! The background tasks run on the tokio runtime that called `lock()`; if that runtime shuts
//! down while a guard is held, nothing renews the lease: it ends at its TTL (etcd, Redis) or
//! when the connection closes (PostgreSQL).

mod core;
#[cfg(feature = "etcd")]
mod etcd;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;

pub use self::core::{LeaseError, LeaseGuard, LockStatus, Participant};
#[cfg(feature = "etcd")]
pub use self::etcd::{EtcdLock, EtcdLockBuilder};
#[cfg(feature = "postgres")]
pub use self::postgres::{advisory_key, PgAdvisoryLock, PgAdvisoryLockBuilder};
#[cfg(feature = "redis")]
pub use self::redis::{RedisLock, RedisLockBuilder};
pub use crate::metrics::LostReason;
