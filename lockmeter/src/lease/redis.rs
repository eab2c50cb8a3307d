//! Redis locks on a single instance: `SET` with `NX`/`PX` semantics in a Lua script that also
//! draws the fencing token from a per-lock `INCR` counter, compare-and-extend renewal and
//! compare-and-delete release (Lua).
//!
//! Keys: `lockmeter:NAME` holds `"<fencing-token> <holder-id>"` with the TTL;
//! `lockmeter:NAME:fence` is the counter; `lockmeter:NAME:waiters` is a sorted set of waiters
//! (score: when their registration expires), for `status()` and `lockmeter who`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tokio::sync::oneshot;

use super::core::{
    await_acquire, holder_id, redact, release_requested, renew_interval, retry_interval,
    AcquireReply, Acquired, BoxError, LeaseError, LeaseGuard, LockStatus, Participant,
    ReleaseRequest, Shared,
};
use crate::metrics::Sink;
use crate::metrics::{LockMode, LostReason};
use crate::LockMeter;

const BACKEND: &str = "redis";

/// Takes the lock if the key is free: returns the new fencing token, or 0 (and registers the
/// caller as a waiter when ARGV[3] is "1").
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('EXISTS', KEYS[1]) == 1 then
  if ARGV[3] == '1' then
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[1])
    redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[2]) * 2)
  end
  return 0
end
local fence = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], fence .. ' ' .. ARGV[1], 'NX', 'PX', ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return fence
";

/// Compare-and-extend: 1 extended, 0 key missing, -1 key holds another value.
const EXTEND: &str = r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not v then return 0 end
return -1
";

/// Compare-and-delete: 1 deleted, 0 key missing, -1 key holds another value.
const RELEASE: &str = r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
if not v then return 0 end
return -1
";

/// Builder for [`RedisLock`].
#[derive(Debug, Clone)]
pub struct RedisLockBuilder {
    url: String,
    name: String,
    ttl: Duration,
    connect_timeout: Duration,
    sink: Sink,
}

impl RedisLockBuilder {
    /// The key TTL (default 10 s), renewed every TTL/3 while held.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long to wait for the server when connecting and for each call (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Records into `sink` instead of the global provider ([`Sink::global`]).
    pub fn sink(mut self, sink: Sink) -> Self {
        self.sink = sink;
        self
    }

    /// Connects (within the connect timeout).
    pub async fn connect(self) -> Result<RedisLock, LeaseError> {
        let invalid = |message: String| LeaseError::InvalidArgument {
            name: self.name.clone(),
            backend: BACKEND,
            message,
        };
        if self.name.is_empty() {
            return Err(invalid("the lock name is empty".into()));
        }
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        if ttl_ms < 10 {
            return Err(invalid("the TTL must be at least 10 ms".into()));
        }
        let client = redis::Client::open(self.url.as_str())
            .map_err(|e| invalid(format!("bad Redis URL {}: {e}", redact(&self.url))))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.connect_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let connect_err = |error_type: String, source: BoxError| LeaseError::Connect {
            name: self.name.clone(),
            backend: BACKEND,
            endpoint: redact(&self.url),
            error_type,
            source,
        };
        let mut conn = op(
            self.connect_timeout,
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|(t, e)| connect_err(t, e))?;
        let _: String = op(
            self.connect_timeout,
            redis::cmd("PING").query_async(&mut conn),
        )
        .await
        .map_err(|(t, e)| connect_err(t, e))?;
        let meter = LockMeter::with_sink(&self.name, BACKEND, &self.sink);
        Ok(RedisLock {
            inner: Arc::new(Inner {
                conn,
                key: format!("lockmeter:{}", self.name),
                fence_key: format!("lockmeter:{}:fence", self.name),
                waiters_key: format!("lockmeter:{}:waiters", self.name),
                name: self.name,
                ttl: self.ttl,
                ttl_ms,
                op_timeout: self.connect_timeout,
                meter,
                acquire: Script::new(ACQUIRE),
                extend: Script::new(EXTEND),
                release: Script::new(RELEASE),
            }),
        })
    }
}

struct Inner {
    conn: ConnectionManager,
    name: String,
    key: String,
    fence_key: String,
    waiters_key: String,
    ttl: Duration,
    ttl_ms: u64,
    op_timeout: Duration,
    meter: LockMeter,
    acquire: Script,
    extend: Script,
    release: Script,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLock")
            .field("name", &self.name)
            .field("key", &self.key)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// A Redis lock on a single instance (`lock.kind = redis`).
///
/// Safe against other clients of the same instance while it stays up. Not safe across a
/// failover to an asynchronous replica (the replica may not have the key: a second holder gets
/// in); the fencing token, drawn from a counter that the failover may also roll back, makes a
/// stale holder's writes detectable only if the storage keeps the highest token it saw. See
/// the [module documentation](super) for why Redlock is not offered.
#[derive(Debug, Clone)]
pub struct RedisLock {
    inner: Arc<Inner>,
}

enum Wait {
    NonBlocking,
    Forever,
    Until(Instant),
}

impl RedisLock {
    /// A builder for the lock `name` on `url` (`redis://[:password@]host:port[/db]`).
    pub fn builder(url: &str, name: &str) -> RedisLockBuilder {
        RedisLockBuilder {
            url: url.to_owned(),
            name: name.to_owned(),
            ttl: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            sink: Sink::global(),
        }
    }

    /// Connects with the defaults (TTL 10 s, connect timeout 5 s).
    pub async fn connect(url: &str, name: &str) -> Result<RedisLock, LeaseError> {
        RedisLock::builder(url, name).connect().await
    }

    /// The lock name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The Redis key holding the lock (`lockmeter:NAME`).
    pub fn key(&self) -> &str {
        &self.inner.key
    }

    /// Waits until the lock is acquired (polling with back-off: Redis has no queue).
    pub async fn lock(&self) -> Result<LeaseGuard, LeaseError> {
        match self.acquire(Wait::Forever).await? {
            Some(g) => Ok(g),
            None => Err(Shared::new(&self.inner.name, BACKEND).gone_error()),
        }
    }

    /// Takes the lock if it is free; `Ok(None)` if another holder has it.
    pub async fn try_lock(&self) -> Result<Option<LeaseGuard>, LeaseError> {
        self.acquire(Wait::NonBlocking).await
    }

    /// Waits at most `timeout`; `Ok(None)` if the lock was not acquired by then.
    pub async fn lock_timeout(&self, timeout: Duration) -> Result<Option<LeaseGuard>, LeaseError> {
        match Instant::now().checked_add(timeout) {
            Some(d) => self.acquire(Wait::Until(d)).await,
            None => self.acquire(Wait::Forever).await,
        }
    }

    async fn acquire(&self, wait: Wait) -> Result<Option<LeaseGuard>, LeaseError> {
        let shared = Shared::new(&self.inner.name, BACKEND);
        let (tx, rx) = oneshot::channel();
        tokio::spawn(keeper(
            Arc::clone(&self.inner),
            Arc::clone(&shared),
            wait,
            tx,
        ));
        await_acquire(shared, rx).await
    }

    /// The holder (token, id, remaining TTL), the registered waiters, and the last token.
    pub async fn status(&self) -> Result<LockStatus, LeaseError> {
        let inner = &self.inner;
        let mut conn = inner.conn.clone();
        type Reply = (
            Option<String>,
            i64,
            Option<u64>,
            (u64, u64),
            Vec<(String, f64)>,
        );
        let (value, pttl, fence, (secs, micros), waiters): Reply = op(
            inner.op_timeout,
            redis::pipe()
                .get(&inner.key)
                .pttl(&inner.key)
                .get(&inner.fence_key)
                .cmd("TIME")
                .zrange_withscores(&inner.waiters_key, 0, -1)
                .query_async(&mut conn),
        )
        .await
        .map_err(|e| backend_err(&inner.name, "status", e))?;
        let now_ms = secs.saturating_mul(1000) + micros / 1000;
        let holders = value
            .map(|v| {
                let (token, id) = v.split_once(' ').unwrap_or(("", v.as_str()));
                Participant {
                    id: id.to_owned(),
                    token: token.parse().ok(),
                    ttl: u64::try_from(pttl).ok().map(Duration::from_millis),
                    detail: None,
                }
            })
            .into_iter()
            .collect();
        let waiters = waiters
            .into_iter()
            .filter(|(_, until)| *until > now_ms as f64)
            .map(|(id, _)| Participant {
                id,
                token: None,
                ttl: None,
                detail: None,
            })
            .collect();
        Ok(LockStatus {
            holders,
            waiters,
            last_token: fence,
        })
    }
}

async fn op<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, (String, BoxError)> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err((classify(&e), Box::new(e))),
        Err(elapsed) => Err(("timeout".to_owned(), Box::new(elapsed))),
    }
}

/// The `error.type` for a Redis client error.
fn classify(e: &redis::RedisError) -> String {
    if e.is_connection_refusal() {
        "unavailable".into()
    } else if e.is_timeout() {
        "timeout".into()
    } else if e.is_connection_dropped() || e.is_io_error() {
        "connection".into()
    } else if e.kind() == redis::ErrorKind::AuthenticationFailed {
        "auth".into()
    } else if let Some(code) = e.code() {
        code.to_ascii_lowercase()
    } else {
        "client".into()
    }
}

fn backend_err(
    name: &str,
    operation: &'static str,
    (error_type, source): (String, BoxError),
) -> LeaseError {
    LeaseError::Backend {
        name: name.to_owned(),
        backend: BACKEND,
        operation,
        error_type,
        source,
    }
}

fn fail(name: &str, attempt: crate::Attempt<'_>, reply: AcquireReply, e: (String, BoxError)) {
    attempt.failed(&e.0);
    let _ = reply.send(Err(backend_err(name, "lock", e)));
}

/// Removes a waiter registration in the background (it also expires by itself).
fn unregister_waiter(inner: &Arc<Inner>, id: &str) {
    let inner = Arc::clone(inner);
    let id = id.to_owned();
    tokio::spawn(async move {
        let mut conn = inner.conn.clone();
        let r: Result<i64, _> = op(
            inner.op_timeout,
            redis::cmd("ZREM")
                .arg(&inner.waiters_key)
                .arg(&id)
                .query_async(&mut conn),
        )
        .await;
        if let Err((t, e)) = r {
            tracing::debug!(lock.name = %inner.name, error.type = %t,
                "could not remove waiter {id} (it expires by itself): {e}");
        }
    });
}

async fn keeper(inner: Arc<Inner>, shared: Arc<Shared>, wait: Wait, mut reply: AcquireReply) {
    let meter = inner.meter.clone();
    let attempt = meter.start(LockMode::Exclusive);
    let name = inner.name.as_str();
    let mut conn = inner.conn.clone();
    let id = holder_id();
    let until = match wait {
        Wait::Until(d) => Some(d),
        _ => None,
    };
    let blocking = !matches!(wait, Wait::NonBlocking);
    let max_poll = (inner.ttl / 4).clamp(Duration::from_millis(10), Duration::from_millis(200));
    let mut poll = Duration::from_millis(5);
    let mut registered = false;
    let mut contended = false;

    // 1. Try; if held (and allowed to wait), poll with back-off until free.
    let (token, sent) = loop {
        let sent = Instant::now();
        let r: Result<i64, _> = op(
            inner.op_timeout,
            inner
                .acquire
                .key(&inner.key)
                .key(&inner.fence_key)
                .key(&inner.waiters_key)
                .arg(&id)
                .arg(inner.ttl_ms)
                .arg(if blocking { "1" } else { "0" })
                .invoke_async(&mut conn),
        )
        .await;
        match r {
            Ok(t) if t > 0 => break (t.unsigned_abs(), sent),
            Ok(_) => {}
            Err(e) => {
                if registered {
                    unregister_waiter(&inner, &id);
                }
                return fail(name, attempt, reply, e);
            }
        }
        if !blocking {
            attempt.would_block();
            let _ = reply.send(Ok(None));
            return;
        }
        contended = true;
        registered = true;
        attempt.conflict();
        let jitter = Duration::from_micros(fastrand::u64(0..=poll.as_micros() as u64 / 2));
        let next = Instant::now() + poll + jitter;
        poll = (poll * 2).min(max_poll);
        let timed_out = match until {
            Some(d) if d <= next => {
                tokio::select! {
                    _ = tokio::time::sleep_until(d.into()) => true,
                    _ = reply.closed() => { unregister_waiter(&inner, &id); return; }
                }
            }
            _ => {
                tokio::select! {
                    _ = tokio::time::sleep_until(next.into()) => false,
                    _ = reply.closed() => { unregister_waiter(&inner, &id); return; }
                }
            }
        };
        if timed_out {
            // One last try at the deadline would make the timeout fuzzy: give up now.
            unregister_waiter(&inner, &id);
            attempt.timed_out();
            let _ = reply.send(Ok(None));
            return;
        }
    };
    let value = format!("{token} {id}");
    shared.set_deadline(sent + inner.ttl);
    let hold = attempt.acquired(contended);
    let (rel_tx, mut rel_rx) = oneshot::channel();
    let acquired = Acquired {
        token,
        key: inner.key.clone(),
        revision: None,
        contended,
        release: rel_tx,
    };
    if reply.send(Ok(Some(acquired))).is_err() {
        // Acquired, but nobody is waiting any more: release at once.
        match release(&inner, &mut conn, &value).await {
            Ok(1) => hold.released(),
            Ok(_) => shared.lost(
                hold,
                LostReason::Expired,
                "lost before it could be released",
            ),
            Err((t, _)) => hold.release_failed(&t),
        }
        return;
    }

    // 2. Hold: compare-and-extend every TTL/3 (sooner after a failure).
    let interval = renew_interval(inner.ttl);
    let mut next_renewal = Instant::now() + interval;
    let end: Result<ReleaseRequest, (LostReason, String)> = loop {
        tokio::select! {
            // Deadline first: after a pause, every branch is ready and the clock decides.
            biased;
            _ = shared.deadline_passed() => break Err((
                shared.deadline_reason(),
                format!("no renewal was confirmed within the TTL ({:?})", inner.ttl),
            )),
            req = release_requested(&mut rel_rx) => break Ok(req),
            _ = tokio::time::sleep_until(next_renewal.into()) => {
                let sent = Instant::now();
                let r: Result<i64, _> = op(
                    inner.op_timeout.min(interval),
                    inner.extend.key(&inner.key).arg(&value).arg(inner.ttl_ms).invoke_async(&mut conn),
                ).await;
                match r {
                    Ok(1) if shared.expired() => break Err((
                        LostReason::Expired,
                        "a renewal was confirmed only after the TTL had passed (not trusted)".into(),
                    )),
                    Ok(1) => {
                        shared.set_deadline(sent + inner.ttl);
                        shared.set_renew_failing(false);
                        next_renewal = Instant::now() + interval;
                    }
                    Ok(0) if shared.expired() => break Err((
                        LostReason::Expired, format!("the key {} expired", inner.key),
                    )),
                    Ok(0) => break Err((
                        LostReason::Overwritten,
                        format!("the key {} was deleted before its TTL", inner.key),
                    )),
                    Ok(_) => break Err((
                        LostReason::Overwritten,
                        format!("the key {} now holds another holder's token", inner.key),
                    )),
                    Err((t, e)) => {
                        tracing::debug!(lock.name = %name, error.type = %t, "redis renewal failed: {e}");
                        shared.set_renew_failing(true);
                        next_renewal = Instant::now() + retry_interval(inner.ttl);
                    }
                }
            }
        }
    };
    match end {
        Ok(req) => {
            // Status stays `Held` until the answer: a key found gone at release is a loss.
            let result = match release(&inner, &mut conn, &value).await {
                Ok(1) => {
                    shared.released();
                    hold.released();
                    Ok(())
                }
                Ok(n) => {
                    // Not ours any more: lost between two renewals, found out only now.
                    let reason = if n == 0 {
                        LostReason::Expired
                    } else {
                        LostReason::Overwritten
                    };
                    shared.lost(hold, reason, "found at release: the key was no longer ours");
                    Err(shared.lost_error(reason))
                }
                Err(e) => {
                    shared.released();
                    hold.release_failed(&e.0);
                    Err(backend_err(name, "unlock", e))
                }
            };
            req.answer(&shared, result);
        }
        Err((reason, detail)) => shared.lost(hold, reason, &detail),
    }
}

async fn release(
    inner: &Inner,
    conn: &mut ConnectionManager,
    value: &str,
) -> Result<i64, (String, BoxError)> {
    op(
        inner.op_timeout,
        inner.release.key(&inner.key).arg(value).invoke_async(conn),
    )
    .await
}
