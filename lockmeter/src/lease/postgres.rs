//! PostgreSQL session advisory locks on a dedicated connection.
//!
//! The lock key is [`advisory_key`]`(name)`: FNV-1a 64 over the name's UTF-8 bytes, read as a
//! signed 64-bit integer (stable across versions, platforms and processes; `lockmeter who
//! --postgres` prints it). Fencing tokens come from the table `lockmeter_fence (name text
//! primary key, token bigint)`, created on first use: each acquisition increments its row while
//! holding the lock.
//!
//! A session advisory lock lives exactly as long as its session: a dropped connection
//! (`pg_terminate_backend`, a restart, a failover) releases it, and a transaction-pooling proxy
//! such as PgBouncer breaks it (connect directly, or through session pooling).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use super::core::{
    await_acquire, redact, release_requested, renew_interval, retry_interval, AcquireReply,
    Acquired, BoxError, LeaseError, LeaseGuard, LockStatus, Participant, ReleaseRequest, Shared,
};
use crate::metrics::Sink;
use crate::metrics::{LockMode, LostReason};
use crate::LockMeter;

const BACKEND: &str = "postgres";

/// The advisory lock key for a lock name: FNV-1a 64 of the UTF-8 bytes as `i64`.
///
/// ```
/// assert_eq!(lockmeter::lease::advisory_key(""), 0xcbf29ce484222325_u64 as i64);
/// ```
pub fn advisory_key(name: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h as i64
}

/// `pg_locks` shows a bigint advisory key as `classid` (high 32 bits) and `objid` (low).
fn key_parts(key: i64) -> (i64, i64) {
    let k = key as u64;
    ((k >> 32) as i64, (k & 0xffff_ffff) as i64)
}

/// Builder for [`PgAdvisoryLock`].
#[derive(Debug, Clone)]
pub struct PgAdvisoryLockBuilder {
    conninfo: String,
    name: String,
    key: Option<i64>,
    mode: LockMode,
    ttl: Duration,
    connect_timeout: Duration,
    sink: Sink,
}

impl PgAdvisoryLockBuilder {
    /// Health-check bound (default 10 s): the session is checked every TTL/3, and a hold with
    /// no successful check for a TTL is declared lost (`connection`) and its connection closed.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long to wait when connecting and for each call other than the wait for the lock
    /// (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Uses this advisory key instead of [`advisory_key`]`(name)` (to share a lock with code
    /// that calls `pg_advisory_lock(key)` itself).
    pub fn key(mut self, key: i64) -> Self {
        self.key = Some(key);
        self
    }

    /// Exclusive (default) or shared (`pg_advisory_lock_shared`).
    pub fn mode(mut self, mode: LockMode) -> Self {
        self.mode = mode;
        self
    }

    /// Records into `sink` instead of the global provider ([`Sink::global`]).
    pub fn sink(mut self, sink: Sink) -> Self {
        self.sink = sink;
        self
    }

    /// Connects once to check the server (the connection is kept for the first acquisition).
    pub async fn connect(self) -> Result<PgAdvisoryLock, LeaseError> {
        let invalid = |message: String| LeaseError::InvalidArgument {
            name: self.name.clone(),
            backend: BACKEND,
            message,
        };
        if self.name.is_empty() {
            return Err(invalid("the lock name is empty".into()));
        }
        if self.ttl < Duration::from_millis(100) {
            return Err(invalid("the TTL must be at least 100 ms".into()));
        }
        let mut config: tokio_postgres::Config = self.conninfo.parse().map_err(|e| {
            invalid(format!(
                "bad PostgreSQL connection string {}: {e}",
                redact(&self.conninfo)
            ))
        })?;
        config
            .connect_timeout(self.connect_timeout)
            .keepalives(true)
            .keepalives_idle(self.ttl.max(Duration::from_secs(1)))
            .application_name(format!("lockmeter {}", self.name));
        let meter = LockMeter::with_sink(&self.name, BACKEND, &self.sink);
        let inner = Arc::new(Inner {
            key: self.key.unwrap_or_else(|| advisory_key(&self.name)),
            endpoint: redact(&self.conninfo),
            name: self.name,
            config,
            mode: self.mode,
            ttl: self.ttl,
            op_timeout: self.connect_timeout,
            meter,
            spare: parking_lot::Mutex::new(None),
        });
        let conn = inner
            .connect()
            .await
            .map_err(|(t, e)| LeaseError::Connect {
                name: inner.name.clone(),
                backend: BACKEND,
                endpoint: inner.endpoint.clone(),
                error_type: t,
                source: e,
            })?;
        *inner.spare.lock() = Some(conn);
        Ok(PgAdvisoryLock { inner })
    }
}

/// One dedicated connection, and the news of its end.
struct Conn {
    client: Client,
    closed: oneshot::Receiver<String>,
}

struct Inner {
    name: String,
    endpoint: String,
    config: tokio_postgres::Config,
    key: i64,
    mode: LockMode,
    ttl: Duration,
    op_timeout: Duration,
    meter: LockMeter,
    /// A connection whose session holds no lock, kept for the next acquisition.
    spare: parking_lot::Mutex<Option<Conn>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgAdvisoryLock")
            .field("name", &self.name)
            .field("key", &self.key)
            .field("mode", &self.mode)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Inner {
    async fn connect(&self) -> Result<Conn, (String, BoxError)> {
        let (client, connection) = op(self.op_timeout, self.config.connect(NoTls)).await?;
        let (tx, closed) = oneshot::channel();
        tokio::spawn(async move {
            let why = match connection.await {
                Ok(()) => "the server closed the connection".to_owned(),
                Err(e) => e.to_string(),
            };
            let _ = tx.send(why);
        });
        Ok(Conn { client, closed })
    }

    /// The spare connection if it is still open, else a new one.
    async fn take_conn(&self) -> Result<Conn, (String, BoxError)> {
        let spare = self.spare.lock().take();
        match spare {
            Some(c) if !c.client.is_closed() => Ok(c),
            _ => self.connect().await,
        }
    }

    fn put_back(&self, conn: Conn) {
        if !conn.client.is_closed() {
            let mut spare = self.spare.lock();
            if spare.is_none() {
                *spare = Some(conn);
            }
        }
    }

    fn fn_name(&self, what: &str) -> String {
        match self.mode {
            LockMode::Exclusive => format!("pg_{what}"),
            LockMode::Shared => format!("pg_{what}_shared"),
        }
    }
}

/// A PostgreSQL session advisory lock (`lock.kind = postgres`) on a dedicated connection.
///
/// Exclusion is PostgreSQL's own: the lock lives in the server's lock table for as long as the
/// session, so a paused holder keeps it (nobody else gets in) and a dropped connection
/// releases it (detected within milliseconds when the socket closes, within the TTL when the
/// network silently fails).
#[derive(Debug, Clone)]
pub struct PgAdvisoryLock {
    inner: Arc<Inner>,
}

enum Wait {
    NonBlocking,
    Forever,
    Until(Instant),
}

impl PgAdvisoryLock {
    /// A builder for the lock `name` on `conninfo` (`postgresql://user@host:port/db` or
    /// `host=... port=... user=... dbname=...`).
    pub fn builder(conninfo: &str, name: &str) -> PgAdvisoryLockBuilder {
        PgAdvisoryLockBuilder {
            conninfo: conninfo.to_owned(),
            name: name.to_owned(),
            key: None,
            mode: LockMode::Exclusive,
            ttl: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            sink: Sink::global(),
        }
    }

    /// Connects with the defaults (exclusive, TTL 10 s, connect timeout 5 s).
    pub async fn connect(conninfo: &str, name: &str) -> Result<PgAdvisoryLock, LeaseError> {
        PgAdvisoryLock::builder(conninfo, name).connect().await
    }

    /// The lock name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The advisory lock key.
    pub fn key(&self) -> i64 {
        self.inner.key
    }

    /// Waits until the lock is acquired (in PostgreSQL's lock queue).
    pub async fn lock(&self) -> Result<LeaseGuard, LeaseError> {
        match self.acquire(Wait::Forever).await? {
            Some(g) => Ok(g),
            None => Err(Shared::new(&self.inner.name, BACKEND).gone_error()),
        }
    }

    /// Takes the lock if it is free; `Ok(None)` if another session holds it.
    pub async fn try_lock(&self) -> Result<Option<LeaseGuard>, LeaseError> {
        self.acquire(Wait::NonBlocking).await
    }

    /// Waits at most `timeout` (PostgreSQL's `lock_timeout`); `Ok(None)` if not acquired.
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

    /// Sessions holding and waiting for the lock (from `pg_locks` and `pg_stat_activity`, in
    /// the current database), and the last fencing token.
    pub async fn status(&self) -> Result<LockStatus, LeaseError> {
        let inner = &self.inner;
        let err = |e: (String, BoxError)| backend_err(&inner.name, "status", e);
        let conn = inner.take_conn().await.map_err(err)?;
        let (hi, lo) = key_parts(inner.key);
        let rows = op(
            inner.op_timeout,
            conn.client.query(
                "SELECT l.pid, l.granted, l.mode, coalesce(a.application_name, ''), \
                        coalesce(host(a.client_addr), 'local'), \
                        coalesce(to_char(a.backend_start, 'YYYY-MM-DD HH24:MI:SS'), '') \
                 FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND l.objsubid = 1 \
                   AND l.classid::bigint = $1 AND l.objid::bigint = $2 \
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 ORDER BY l.granted DESC, l.waitstart NULLS FIRST, l.pid",
                &[&hi, &lo],
            ),
        )
        .await
        .map_err(err)?;
        let last_token = match op(
            inner.op_timeout,
            conn.client.query_opt(
                "SELECT token FROM lockmeter_fence WHERE name = $1",
                &[&inner.name],
            ),
        )
        .await
        {
            Ok(row) => row.and_then(|r| u64::try_from(r.get::<_, i64>(0)).ok()),
            Err((t, _)) if t == SqlState::UNDEFINED_TABLE.code() => None,
            Err(e) => return Err(err(e)),
        };
        inner.put_back(conn);
        let mut status = LockStatus {
            last_token,
            ..LockStatus::default()
        };
        for r in rows {
            let pid: i32 = r.get(0);
            let granted: bool = r.get(1);
            let mode: String = r.get(2);
            let app: String = r.get(3);
            let addr: String = r.get(4);
            let since: String = r.get(5);
            let p = Participant {
                id: format!("pid {pid}"),
                token: None,
                ttl: None,
                detail: Some(format!(
                    "{mode}, application {app:?}, client {addr}, connected {since}"
                )),
            };
            if granted {
                status.holders.push(p);
            } else {
                status.waiters.push(p);
            }
        }
        if let [only] = status.holders.as_mut_slice() {
            if only
                .detail
                .as_deref()
                .is_some_and(|d| d.starts_with("ExclusiveLock"))
            {
                only.token = status.last_token;
            }
        }
        Ok(status)
    }
}

async fn op<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, (String, BoxError)> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err((classify(&e), Box::new(e))),
        Err(elapsed) => Err(("timeout".to_owned(), Box::new(elapsed))),
    }
}

/// The `error.type` for a PostgreSQL error: `unavailable`, `timeout`, `connection`, `auth`, or
/// the SQLSTATE.
fn classify(e: &tokio_postgres::Error) -> String {
    if let Some(code) = e.code() {
        let c = code.code();
        return match c {
            "55P03" | "57014" => "timeout".into(),
            _ if c.starts_with("28") => "auth".into(),
            _ if c.starts_with("08") || c.starts_with("57P") => "connection".into(),
            _ => c.to_owned(),
        };
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound => {
                    "unavailable".into()
                }
                std::io::ErrorKind::TimedOut => "timeout".into(),
                _ => "connection".into(),
            };
        }
        src = s.source();
    }
    if e.is_closed() || e.to_string().contains("timed out") {
        if e.is_closed() {
            "connection".into()
        } else {
            "timeout".into()
        }
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

/// Cancels the running query in the background; the connection is then dropped, which ends
/// the session (and whatever it might have acquired meanwhile).
fn cancel_in_background(client: &Client, name: &str) {
    let token = client.cancel_token();
    let name = name.to_owned();
    tokio::spawn(async move {
        if let Err(e) = token.cancel_query(NoTls).await {
            tracing::debug!(lock.name = %name, "could not cancel the lock wait: {e}");
        }
    });
}

/// Increments the lock's row in `lockmeter_fence` (creating the table on first use).
async fn next_token(inner: &Inner, client: &Client) -> Result<u64, (String, BoxError)> {
    const UPSERT: &str = "INSERT INTO lockmeter_fence (name, token) VALUES ($1, 1) \
         ON CONFLICT (name) DO UPDATE SET token = lockmeter_fence.token + 1 RETURNING token";
    let row = match op(inner.op_timeout, client.query_one(UPSERT, &[&inner.name])).await {
        Err((t, _)) if t == SqlState::UNDEFINED_TABLE.code() => {
            // Two first users may race to create it: either wins, the other's error is moot.
            let _ = op(
                inner.op_timeout,
                client.batch_execute(
                    "CREATE TABLE IF NOT EXISTS lockmeter_fence \
                     (name text PRIMARY KEY, token bigint NOT NULL)",
                ),
            )
            .await;
            op(inner.op_timeout, client.query_one(UPSERT, &[&inner.name])).await?
        }
        r => r?,
    };
    Ok(row.get::<_, i64>(0).unsigned_abs())
}

async fn keeper(inner: Arc<Inner>, shared: Arc<Shared>, wait: Wait, mut reply: AcquireReply) {
    let meter = inner.meter.clone();
    let attempt = meter.start(inner.mode);
    let name = inner.name.as_str();
    let key = inner.key;
    let mut conn = match inner.take_conn().await {
        Ok(c) => c,
        Err(e) => return fail(name, attempt, reply, e),
    };

    // 1. Try.
    let try_sql = format!("SELECT {}($1)", inner.fn_name("try_advisory_lock"));
    let got: bool = match op(inner.op_timeout, conn.client.query_one(&try_sql, &[&key])).await {
        Ok(row) => row.get(0),
        Err(e) => return fail(name, attempt, reply, e),
    };
    let contended = !got;
    if !got {
        let until = match wait {
            Wait::NonBlocking => {
                attempt.would_block();
                inner.put_back(conn);
                let _ = reply.send(Ok(None));
                return;
            }
            Wait::Forever => None,
            Wait::Until(d) => Some(d),
        };
        attempt.conflict();
        // 2. Wait in PostgreSQL's queue, bounded by its lock_timeout.
        let ms = until.map_or(0, |d| {
            d.saturating_duration_since(Instant::now())
                .as_millis()
                .clamp(1, i32::MAX as u128)
        });
        let sql = format!(
            "SET lock_timeout = {ms}; SELECT {}({key}); SET lock_timeout = 0",
            inner.fn_name("advisory_lock")
        );
        let waited = tokio::select! {
            r = conn.client.batch_execute(&sql) => r,
            _ = reply.closed() => {
                cancel_in_background(&conn.client, name);
                return; // the attempt records `cancelled`; dropping `conn` ends the session
            }
        };
        match waited {
            Ok(()) => {}
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                attempt.timed_out();
                // Back to no timeout before the connection is reused.
                if op(
                    inner.op_timeout,
                    conn.client.batch_execute("SET lock_timeout = 0"),
                )
                .await
                .is_ok()
                {
                    inner.put_back(conn);
                }
                let _ = reply.send(Ok(None));
                return;
            }
            Err(e) => return fail(name, attempt, reply, (classify(&e), Box::new(e))),
        }
    }
    let acquired_at = Instant::now();

    // 3. The fencing token, taken while holding the lock.
    let unlock_sql = format!("SELECT {}($1)", inner.fn_name("advisory_unlock"));
    let token = match next_token(&inner, &conn.client).await {
        Ok(t) => t,
        Err(e) => {
            // Dropping the connection releases the lock with the session.
            return fail(name, attempt, reply, e);
        }
    };
    shared.set_deadline(acquired_at + inner.ttl);
    let hold = attempt.acquired(contended);
    let (rel_tx, mut rel_rx) = oneshot::channel();
    let acquired = Acquired {
        token,
        key: key.to_string(),
        revision: None,
        contended,
        release: rel_tx,
    };
    if reply.send(Ok(Some(acquired))).is_err() {
        shared.released();
        // Ending the session releases the lock whatever the unlock call says.
        drop(conn);
        hold.released();
        return;
    }

    // 4. Hold: the session is checked every TTL/3; its end is noticed as it happens.
    let (hi, lo) = key_parts(key);
    let check_sql = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
         AND pid = pg_backend_pid() AND classid::bigint = $1 AND objid::bigint = $2 \
         AND objsubid = 1 AND granted";
    let interval = renew_interval(inner.ttl);
    let mut next_check = Instant::now() + interval;
    let end: Result<ReleaseRequest, (LostReason, String)> = loop {
        tokio::select! {
            biased;
            why = &mut conn.closed => break Err((
                LostReason::Connection,
                format!("the session ended: {}", why.unwrap_or_else(|_| "connection task gone".into())),
            )),
            _ = shared.deadline_passed() => break Err((
                shared.deadline_reason(),
                format!("no health check succeeded within the TTL ({:?})", inner.ttl),
            )),
            req = release_requested(&mut rel_rx) => break Ok(req),
            _ = tokio::time::sleep_until(next_check.into()) => {
                let sent = Instant::now();
                match op(inner.op_timeout.min(interval), conn.client.query_one(check_sql, &[&hi, &lo])).await {
                    Ok(_) if shared.expired() => break Err((
                        LostReason::Connection,
                        "a health check succeeded only after the TTL had passed (not trusted)".into(),
                    )),
                    Ok(row) if row.get::<_, i64>(0) > 0 => {
                        shared.set_deadline(sent + inner.ttl);
                        shared.set_renew_failing(false);
                        next_check = Instant::now() + interval;
                    }
                    Ok(_) => break Err((
                        LostReason::Revoked,
                        format!("the session no longer holds advisory lock {key}"),
                    )),
                    Err((t, e)) => {
                        tracing::debug!(lock.name = %name, error.type = %t, "postgres health check failed: {e}");
                        shared.set_renew_failing(true);
                        if conn.client.is_closed() {
                            break Err((LostReason::Connection, format!("the session ended: {e}")));
                        }
                        next_check = Instant::now() + retry_interval(inner.ttl);
                    }
                }
            }
        }
    };
    match end {
        Ok(req) => {
            let result = match op(
                inner.op_timeout,
                conn.client.query_one(&unlock_sql, &[&key]),
            )
            .await
            {
                Ok(row) if row.get::<_, bool>(0) => {
                    shared.released();
                    hold.released();
                    inner.put_back(conn);
                    Ok(())
                }
                Ok(_) => {
                    shared.lost(
                        hold,
                        LostReason::Revoked,
                        "found at release: the session did not hold the lock",
                    );
                    Err(shared.lost_error(LostReason::Revoked))
                }
                Err(e) => {
                    // Dropping the connection ends the session, which releases the lock if the
                    // server is still there; the failed call is reported all the same.
                    shared.released();
                    hold.release_failed(&e.0);
                    Err(backend_err(name, "unlock", e))
                }
            };
            req.answer(&shared, result);
        }
        Err((reason, detail)) => {
            shared.lost(hold, reason, &detail);
            // Close the session: if the server still had it, the lock is freed now rather
            // than held by a holder that stopped trusting it.
            drop(conn);
        }
    }
}
