//! etcd v3 locks with the key layout of `etcdctl lock NAME` (the v3 concurrency mutex): a key
//! `NAME/<lease-id-hex>` attached to a lease; the lowest create revision under `NAME/` holds
//! the lock. lockmeter's locks and `etcdctl lock` (and the server's Lock service, and Go's
//! `concurrency.Mutex`) therefore exclude each other.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LockOptions, PutOptions,
    SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use tokio::sync::{mpsc, oneshot};

use super::core::{
    await_acquire, redact, release_requested, renew_interval, retry_interval, AbortOnDrop,
    AcquireReply, Acquired, BoxError, LeaseError, LeaseGuard, LockStatus, Participant, Shared,
};
use crate::metrics::Sink;
use crate::metrics::{LockMode, LostReason};
use crate::LockMeter;

const BACKEND: &str = "etcd";

/// Builder for [`EtcdLock`].
#[derive(Debug, Clone)]
pub struct EtcdLockBuilder {
    endpoints: Vec<String>,
    name: String,
    ttl: Duration,
    connect_timeout: Duration,
    sink: Sink,
}

impl EtcdLockBuilder {
    /// The lease TTL (default 10 s, as `etcdctl lock --ttl`). Rounded up to whole seconds;
    /// the server may grant more (its minimum lease TTL, 1.5 s rounded up, on default
    /// settings). A lost lease is detected within the TTL.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long to wait for the server when connecting and for each call other than the
    /// wait for the lock (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Records into `sink` instead of the global provider ([`Sink::global`]).
    pub fn sink(mut self, sink: Sink) -> Self {
        self.sink = sink;
        self
    }

    /// Connects and checks that the server answers (within the connect timeout).
    pub async fn connect(self) -> Result<EtcdLock, LeaseError> {
        let invalid = |message: String| LeaseError::InvalidArgument {
            name: self.name.clone(),
            backend: BACKEND,
            message,
        };
        if self.name.is_empty() {
            return Err(invalid("the lock name is empty".into()));
        }
        if self.endpoints.is_empty() {
            return Err(invalid("no etcd endpoint given".into()));
        }
        let ttl_secs = self.ttl.as_secs() + u64::from(self.ttl.subsec_nanos() > 0);
        if ttl_secs == 0 {
            return Err(invalid("the TTL must be at least 1 s".into()));
        }
        let endpoint = self.endpoints.join(",");
        let connect_err = |error_type: String, source: BoxError| LeaseError::Connect {
            name: self.name.clone(),
            backend: BACKEND,
            endpoint: redact(&endpoint),
            error_type,
            source,
        };
        let options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_keep_alive(Duration::from_secs(2), self.connect_timeout);
        let mut client = op(
            self.connect_timeout,
            Client::connect(&self.endpoints, Some(options)),
        )
        .await
        .map_err(|(t, e)| connect_err(t, e))?;
        // The channel connects lazily: one cheap read proves the server answers.
        op(
            self.connect_timeout,
            client.get(
                format!("{}/", self.name),
                Some(GetOptions::new().with_prefix().with_count_only()),
            ),
        )
        .await
        .map_err(|(t, e)| connect_err(t, e))?;
        let meter = LockMeter::with_sink(&self.name, BACKEND, &self.sink);
        Ok(EtcdLock {
            inner: Arc::new(Inner {
                client,
                name: self.name,
                ttl_secs: i64::try_from(ttl_secs).unwrap_or(i64::MAX),
                op_timeout: self.connect_timeout,
                meter,
            }),
        })
    }
}

struct Inner {
    client: Client,
    name: String,
    ttl_secs: i64,
    op_timeout: Duration,
    meter: LockMeter,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdLock")
            .field("name", &self.name)
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

/// An etcd lock (`lock.kind = etcd`), interoperable with `etcdctl lock NAME`.
///
/// Each acquisition grants a lease (TTL default 10 s) kept alive in the background every
/// TTL/3, creates `NAME/<lease-id-hex>` on it, and waits through etcd's Lock service when
/// another key under `NAME/` is older. The fencing token is the key's create revision, which
/// only grows. Loss is detected within the TTL (a renewal the server refused, no renewal
/// trusted in time) and within milliseconds when the key is deleted or re-put without the
/// lease (a watch).
///
/// ```no_run
/// # async fn demo() -> Result<(), lockmeter::lease::LeaseError> {
/// let lock = lockmeter::lease::EtcdLock::connect("http://127.0.0.1:2379", "nightly-report").await?;
/// let guard = lock.lock().await?;
/// let token = guard.fencing_token(); // pass it to every write the lock protects
/// tokio::select! {
///     reason = guard.invalidated() => eprintln!("lost the lock ({reason:?}): stop writing"),
///     _ = async { /* work, writing with `token` */ } => {}
/// }
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct EtcdLock {
    inner: Arc<Inner>,
}

enum Wait {
    NonBlocking,
    Forever,
    Until(Instant),
}

impl EtcdLock {
    /// A builder for the lock `name` on `endpoint` (`http://host:port`; several endpoints
    /// separated by commas).
    pub fn builder(endpoint: &str, name: &str) -> EtcdLockBuilder {
        EtcdLockBuilder {
            endpoints: endpoint
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            name: name.to_owned(),
            ttl: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            sink: Sink::global(),
        }
    }

    /// Connects with the defaults (TTL 10 s, connect timeout 5 s).
    pub async fn connect(endpoint: &str, name: &str) -> Result<EtcdLock, LeaseError> {
        EtcdLock::builder(endpoint, name).connect().await
    }

    /// The lock name (the key prefix, as `etcdctl lock NAME`).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The lease TTL requested.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.inner.ttl_secs.unsigned_abs())
    }

    /// Waits until the lock is acquired.
    pub async fn lock(&self) -> Result<LeaseGuard, LeaseError> {
        match self.acquire(Wait::Forever).await? {
            Some(g) => Ok(g),
            None => Err(self.shared().gone_error()),
        }
    }

    /// Takes the lock if it is free; `Ok(None)` if another holder has it.
    pub async fn try_lock(&self) -> Result<Option<LeaseGuard>, LeaseError> {
        self.acquire(Wait::NonBlocking).await
    }

    /// Waits at most `timeout`; `Ok(None)` if the lock was not acquired by then.
    pub async fn lock_timeout(&self, timeout: Duration) -> Result<Option<LeaseGuard>, LeaseError> {
        match Instant::now().checked_add(timeout) {
            Some(deadline) => self.acquire(Wait::Until(deadline)).await,
            None => self.acquire(Wait::Forever).await,
        }
    }

    fn shared(&self) -> Arc<Shared> {
        Shared::new(&self.inner.name, BACKEND)
    }

    async fn acquire(&self, wait: Wait) -> Result<Option<LeaseGuard>, LeaseError> {
        let shared = self.shared();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(keeper(
            Arc::clone(&self.inner),
            Arc::clone(&shared),
            wait,
            tx,
        ));
        await_acquire(shared, rx).await
    }

    /// Who holds the lock and who waits, oldest first (the keys under `NAME/` by create
    /// revision, with their leases' remaining TTL).
    pub async fn status(&self) -> Result<LockStatus, LeaseError> {
        let inner = &self.inner;
        let mut client = inner.client.clone();
        let err = |(error_type, source): (String, BoxError)| LeaseError::Backend {
            name: inner.name.clone(),
            backend: BACKEND,
            operation: "status",
            error_type,
            source,
        };
        let resp = op(
            inner.op_timeout,
            client.get(
                format!("{}/", inner.name),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Ascend),
                ),
            ),
        )
        .await
        .map_err(err)?;
        let mut all = Vec::new();
        for kv in resp.kvs() {
            let ttl = if kv.lease() != 0 {
                op(
                    inner.op_timeout,
                    client.lease_time_to_live(kv.lease(), None),
                )
                .await
                .map_err(err)?
                .ttl()
            } else {
                -1
            };
            all.push(Participant {
                id: String::from_utf8_lossy(kv.key()).into_owned(),
                token: u64::try_from(kv.create_revision()).ok(),
                ttl: u64::try_from(ttl).ok().map(Duration::from_secs),
                detail: None,
            });
        }
        let last_token = all.iter().filter_map(|p| p.token).max();
        let waiters = if all.is_empty() {
            Vec::new()
        } else {
            all.split_off(1)
        };
        Ok(LockStatus {
            holders: all,
            waiters,
            last_token,
        })
    }
}

/// Runs `fut` with a timeout, mapping failures to (`error.type`, error).
async fn op<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, (String, BoxError)> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err((classify(&e).to_owned(), Box::new(e))),
        Err(elapsed) => Err(("timeout".to_owned(), Box::new(elapsed))),
    }
}

/// The `error.type` for an etcd client error.
fn classify(e: &etcd_client::Error) -> &'static str {
    use etcd_client::Error as E;
    use tonic::Code;
    match e {
        E::GRpcStatus(s) => match s.code() {
            Code::Unavailable => "unavailable",
            Code::DeadlineExceeded => "timeout",
            Code::Cancelled => "cancelled",
            Code::Unauthenticated | Code::PermissionDenied => "auth",
            Code::NotFound => "not_found",
            Code::InvalidArgument | Code::OutOfRange => "invalid_argument",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            _ => "server",
        },
        E::TransportError(_) | E::IoError(_) => "unavailable",
        E::InvalidUri(_) | E::InvalidArgs(_) | E::EndpointError(_) => "invalid_argument",
        E::LeaseKeepAliveError(_) => "lease_not_found",
        E::WatchError(_) => "watch",
        _ => "client",
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

/// Revokes the lease (which deletes our key), bounded by `timeout`; used on paths that gave
/// up, before they answer. Awaited, not left to the background: a caller that exits right
/// after a failed try (`lockmeter exec -n`) would otherwise leave its key queued, delaying
/// every later waiter until the lease's TTL.
async fn revoke(mut client: Client, lease: i64, timeout: Duration, name: &str) {
    if let Err((t, e)) = op(timeout, client.lease_revoke(lease)).await {
        // Not fatal: the lease (and its key) ends at its TTL anyway.
        tracing::warn!(lock.name = %name, lock.kind = BACKEND, error.type = %t,
            "could not revoke lease {lease:x} (it expires at its TTL): {e}");
    }
}

enum LeaseEvent {
    /// The server no longer knows the lease (revoked, or expired).
    Gone,
    /// A renewal succeeded, but only after the deadline had passed: not trusted.
    LateRenewal,
}

/// Keeps the lease alive every TTL/3 (sooner after a failure), moving the shared deadline to
/// each renewal's send time plus the TTL the server granted.
async fn keep_alive(
    mut client: Client,
    lease: i64,
    ttl: Duration,
    timeout: Duration,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<LeaseEvent>,
) {
    /// One renewal's outcome.
    enum Renew {
        Granted(Duration),
        Gone,
        Failed(String),
    }
    let mut stream = None;
    let interval = renew_interval(ttl);
    let per_call = timeout.min(interval);
    loop {
        let sent = Instant::now();
        let result = tokio::time::timeout(per_call, async {
            match &mut stream {
                None => {
                    // Creating the stream sends one keep-alive and checks that its answer
                    // has a positive TTL (the lease's own).
                    let s = client.lease_keep_alive(lease).await?;
                    stream = Some(s);
                    Ok::<_, etcd_client::Error>(Renew::Granted(ttl))
                }
                Some((keeper, responses)) => {
                    keeper.keep_alive().await?;
                    Ok(match responses.message().await? {
                        Some(r) if r.ttl() > 0 => {
                            Renew::Granted(Duration::from_secs(r.ttl().unsigned_abs()))
                        }
                        Some(_) => Renew::Gone,
                        None => Renew::Failed("the keep-alive stream ended".into()),
                    })
                }
            }
        })
        .await;
        let renew = match result {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Renew::Failed(e.to_string()),
            Err(_) => Renew::Failed(format!("no answer within {per_call:?}")),
        };
        let renew = match renew {
            Renew::Failed(why) => {
                stream = None;
                // A failed stream says little (the server may just be unreachable): ask
                // the server whether it still knows the lease.
                match op(per_call, client.lease_time_to_live(lease, None)).await {
                    Ok(r) if r.ttl() <= 0 => Renew::Gone,
                    _ => Renew::Failed(why),
                }
            }
            r => r,
        };
        match renew {
            Renew::Granted(t) => {
                if shared.expired() {
                    let _ = events.send(LeaseEvent::LateRenewal);
                    return;
                }
                shared.set_deadline(sent + t);
                shared.set_renew_failing(false);
                tokio::time::sleep(interval).await;
            }
            Renew::Gone => {
                let _ = events.send(LeaseEvent::Gone);
                return;
            }
            Renew::Failed(why) => {
                tracing::debug!(lock.name = %shared.name, "etcd keep-alive failed: {why}");
                shared.set_renew_failing(true);
                tokio::time::sleep(retry_interval(ttl)).await;
            }
        }
    }
}

/// What the watch on our key saw.
enum KeyEvent {
    Deleted,
    Overwritten(i64),
}

/// A watch on the lock key from a revision on, re-created after errors.
struct KeyWatch {
    client: Client,
    key: String,
    lease: i64,
    next_rev: i64,
    retry: Duration,
    stream: Option<WatchStream>,
}

impl KeyWatch {
    async fn next(&mut self) -> KeyEvent {
        loop {
            let stream = match &mut self.stream {
                Some(s) => s,
                None => {
                    let opts = WatchOptions::new().with_start_revision(self.next_rev);
                    match self.client.watch(self.key.clone(), Some(opts)).await {
                        Ok(s) => self.stream.insert(s),
                        Err(_) => {
                            tokio::time::sleep(self.retry).await;
                            continue;
                        }
                    }
                }
            };
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.canceled() {
                        // Compacted past our revision: fall back to reading the key.
                        self.stream = None;
                        match self.client.get(self.key.clone(), None).await {
                            Ok(r) => match r.kvs().first() {
                                None => return KeyEvent::Deleted,
                                Some(kv) if kv.lease() != self.lease => {
                                    return KeyEvent::Overwritten(kv.lease())
                                }
                                Some(kv) => self.next_rev = kv.mod_revision() + 1,
                            },
                            Err(_) => tokio::time::sleep(self.retry).await,
                        }
                        continue;
                    }
                    for ev in resp.events() {
                        if let Some(kv) = ev.kv() {
                            self.next_rev = self.next_rev.max(kv.mod_revision() + 1);
                            match ev.event_type() {
                                EventType::Delete => return KeyEvent::Deleted,
                                EventType::Put if kv.lease() != self.lease => {
                                    return KeyEvent::Overwritten(kv.lease())
                                }
                                EventType::Put => {}
                            }
                        }
                    }
                }
                Ok(None) | Err(_) => {
                    self.stream = None;
                    tokio::time::sleep(self.retry).await;
                }
            }
        }
    }
}

fn first_create(prefix: &str) -> TxnOp {
    TxnOp::get(
        prefix,
        Some(
            GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Ascend)
                .with_limit(1),
        ),
    )
}

fn range_kvs(r: Option<&TxnOpResponse>) -> Option<&[etcd_client::KeyValue]> {
    match r {
        Some(TxnOpResponse::Get(g)) => Some(g.kvs()),
        _ => None,
    }
}

/// One acquisition: lease, key, wait, then the hold until release or loss.
async fn keeper(inner: Arc<Inner>, shared: Arc<Shared>, wait: Wait, mut reply: AcquireReply) {
    let meter = inner.meter.clone();
    let attempt = meter.start(LockMode::Exclusive);
    let name = inner.name.as_str();
    let mut client = inner.client.clone();
    let ttl = Duration::from_secs(inner.ttl_secs.unsigned_abs());
    fn fail(name: &str, attempt: crate::Attempt<'_>, reply: AcquireReply, e: (String, BoxError)) {
        attempt.failed(&e.0);
        let _ = reply.send(Err(backend_err(name, "lock", e)));
    }

    // 1. A lease of our own for this acquisition.
    let sent = Instant::now();
    let lease = match op(inner.op_timeout, client.lease_grant(inner.ttl_secs, None)).await {
        Ok(l) => l,
        Err(e) => return fail(name, attempt, reply, e),
    };
    let lease_id = lease.id();
    shared.set_deadline(sent + Duration::from_secs(lease.ttl().unsigned_abs()));
    let (ev_tx, mut lease_events) = mpsc::unbounded_channel();
    let _keep_alive = AbortOnDrop(tokio::spawn(keep_alive(
        client.clone(),
        lease_id,
        ttl,
        inner.op_timeout,
        Arc::clone(&shared),
        ev_tx,
    )));
    let give_up = |client: &Client| revoke(client.clone(), lease_id, inner.op_timeout, name);

    // 2. Our key, and the oldest key under the prefix, in one transaction (as
    //    concurrency.Mutex does).
    let key = format!("{name}/{lease_id:x}");
    let prefix = format!("{name}/");
    let txn = Txn::new()
        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
        .and_then([
            TxnOp::put(
                key.as_str(),
                "",
                Some(PutOptions::new().with_lease(lease_id)),
            ),
            first_create(&prefix),
        ])
        .or_else([TxnOp::get(key.as_str(), None), first_create(&prefix)]);
    let resp = match op(inner.op_timeout, client.txn(txn)).await {
        Ok(r) => r,
        Err(e) => {
            give_up(&client).await;
            return fail(name, attempt, reply, e);
        }
    };
    let header_rev = resp.header().map(|h| h.revision()).unwrap_or(0);
    let ops = resp.op_responses();
    let my_rev = if resp.succeeded() {
        header_rev
    } else {
        range_kvs(ops.first())
            .and_then(|k| k.first())
            .map(|kv| kv.create_revision())
            .unwrap_or(header_rev)
    };
    let owner_rev = range_kvs(ops.get(1))
        .and_then(|k| k.first())
        .map(|kv| kv.create_revision());

    let (contended, revision) = if owner_rev.is_none() || owner_rev == Some(my_rev) {
        (false, header_rev)
    } else {
        let until = match wait {
            Wait::NonBlocking => {
                give_up(&client).await;
                attempt.would_block();
                let _ = reply.send(Ok(None));
                return;
            }
            Wait::Forever => None,
            Wait::Until(d) => Some(d),
        };
        attempt.conflict();
        // 3. Wait through the Lock service: it finds our key (same lease) and waits for every
        //    older key under the prefix to go, exactly as `etcdctl lock` waits.
        let mut lock_client = client.clone();
        let lock_call = lock_client.lock(name, Some(LockOptions::new().with_lease(lease_id)));
        let timed_out = async {
            match until {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = lock_call => match r {
                Ok(resp) => (true, resp.header().map(|h| h.revision()).unwrap_or(0)),
                Err(e) => {
                    give_up(&client).await;
                    return fail(name, attempt, reply, (classify(&e).to_owned(), Box::new(e)));
                }
            },
            _ = reply.closed() => {
                // The caller stopped waiting: the attempt records `cancelled`.
                give_up(&client).await;
                return;
            }
            _ = timed_out => {
                give_up(&client).await;
                attempt.timed_out();
                let _ = reply.send(Ok(None));
                return;
            }
            _ = lease_events.recv() => {
                let e: BoxError = "the lease ended while waiting for the lock".into();
                return fail(name, attempt, reply, ("lease_expired".to_owned(), e));
            }
            _ = shared.deadline_passed() => {
                give_up(&client).await;
                let e: BoxError = "no lease renewal succeeded within the TTL while waiting".into();
                return fail(name, attempt, reply, ("lease_expired".to_owned(), e));
            }
        }
    };

    // 4. Our key must still be there, on our lease; its create revision is the token.
    let token = match op(inner.op_timeout, client.get(key.as_str(), None)).await {
        Ok(r) => match r.kvs().first() {
            Some(kv) if kv.lease() == lease_id => kv.create_revision(),
            _ => {
                give_up(&client).await;
                let e: BoxError = "the lock key vanished as the lock was acquired".into();
                return fail(name, attempt, reply, ("lease_expired".to_owned(), e));
            }
        },
        Err(e) => {
            give_up(&client).await;
            return fail(name, attempt, reply, e);
        }
    };
    if shared.expired() {
        give_up(&client).await;
        let e: BoxError = "the lease deadline passed while acquiring".into();
        return fail(name, attempt, reply, ("lease_expired".to_owned(), e));
    }
    let hold = attempt.acquired(contended);
    let (rel_tx, mut rel_rx) = oneshot::channel();
    let acquired = Acquired {
        token: token.unsigned_abs(),
        key: key.clone(),
        revision: Some(revision),
        contended,
        release: rel_tx,
    };
    if reply.send(Ok(Some(acquired))).is_err() {
        // Acquired, but nobody is waiting any more: release at once.
        shared.released();
        match op(inner.op_timeout, client.lease_revoke(lease_id)).await {
            Ok(_) => hold.released(),
            Err((t, _)) => hold.release_failed(&t),
        }
        return;
    }

    // 5. Hold: renewals run in `keep_alive`; here we wait for the release, the deadline,
    //    the lease's end, or a change to our key.
    let mut watch = KeyWatch {
        client: client.clone(),
        key,
        lease: lease_id,
        next_rev: token + 1,
        retry: retry_interval(ttl),
        stream: None,
    };
    enum End {
        Release(super::core::ReleaseRequest),
        Lost(LostReason, String),
    }
    let end = tokio::select! {
        // Deadline first: after a pause, every branch is ready and the clock decides.
        biased;
        _ = shared.deadline_passed() => End::Lost(
            shared.deadline_reason(),
            format!("no lease renewal was confirmed within the TTL ({} s)", ttl.as_secs()),
        ),
        req = release_requested(&mut rel_rx) => End::Release(req),
        ev = lease_events.recv() => match ev {
            Some(LeaseEvent::LateRenewal) => End::Lost(
                LostReason::Expired,
                "a renewal was confirmed only after the TTL had passed (not trusted)".into(),
            ),
            Some(LeaseEvent::Gone) if shared.expired() => End::Lost(
                LostReason::Expired,
                format!("the server no longer knows lease {lease_id:x}"),
            ),
            Some(LeaseEvent::Gone) => End::Lost(
                LostReason::Revoked,
                format!("lease {lease_id:x} was revoked"),
            ),
            None => End::Lost(shared.deadline_reason(), "the keep-alive task ended".into()),
        },
        ev = watch.next() => match ev {
            // The lease ran out (the server deleted the key at expiry).
            _ if shared.expired() => End::Lost(
                LostReason::Expired,
                format!("the lease ran out and the server deleted {}", watch.key),
            ),
            KeyEvent::Deleted => End::Lost(
                LostReason::Overwritten,
                format!("the lock key {} was deleted", watch.key),
            ),
            KeyEvent::Overwritten(other) => End::Lost(
                LostReason::Overwritten,
                format!("the lock key {} was put again on lease {other:x}", watch.key),
            ),
        },
    };
    match end {
        End::Release(req) => {
            shared.released();
            // Revoking the lease deletes the key: the next waiter gets the lock.
            let result = match op(inner.op_timeout, client.lease_revoke(lease_id)).await {
                Ok(_) => {
                    hold.released();
                    Ok(())
                }
                Err(e) => {
                    hold.release_failed(&e.0);
                    Err(backend_err(name, "unlock", e))
                }
            };
            req.answer(&shared, result);
        }
        End::Lost(reason, detail) => {
            shared.lost(hold, reason, &detail);
            give_up(&client).await;
        }
    }
}
