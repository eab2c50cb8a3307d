//! Distributed locks against real servers (etcd 3.4, Redis 7, PostgreSQL 15), each started by
//! the test on a free loopback port: exclusion under load, fencing tokens, interop with
//! `etcdctl lock`, losses provoked for real (key deleted, lease revoked, server killed,
//! backend terminated, holder paused past its TTL) and detected, counted and reported.
#![cfg(all(feature = "etcd", feature = "redis", feature = "postgres"))]
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockmeter::lease::{
    EtcdLock, LeaseError, LeaseGuard, LockStatus, LostReason, PgAdvisoryLock, RedisLock,
};
use lockmeter::metrics::Sink;
use lockmeter_testkit::servers::{Etcd, Postgres, Redis};
use lockmeter_testkit::{free_port, Recorder};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Etcd,
    Redis,
    Postgres,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Etcd => "etcd",
            Kind::Redis => "redis",
            Kind::Postgres => "postgres",
        }
    }
}

/// Any of the three locks, so one test body covers every backend.
#[derive(Clone, Debug)]
enum AnyLock {
    Etcd(EtcdLock),
    Redis(RedisLock),
    Pg(PgAdvisoryLock),
}

impl AnyLock {
    async fn connect(kind: Kind, url: &str, name: &str, ttl: Duration, sink: &Sink) -> AnyLock {
        Self::try_connect(kind, url, name, ttl, sink)
            .await
            .unwrap_or_else(|e| panic!("connect {kind:?}: {e}"))
    }

    async fn try_connect(
        kind: Kind,
        url: &str,
        name: &str,
        ttl: Duration,
        sink: &Sink,
    ) -> Result<AnyLock, LeaseError> {
        let t = Duration::from_secs(2);
        Ok(match kind {
            Kind::Etcd => AnyLock::Etcd(
                EtcdLock::builder(url, name)
                    .ttl(ttl)
                    .connect_timeout(t)
                    .sink(sink.clone())
                    .connect()
                    .await?,
            ),
            Kind::Redis => AnyLock::Redis(
                RedisLock::builder(url, name)
                    .ttl(ttl)
                    .connect_timeout(t)
                    .sink(sink.clone())
                    .connect()
                    .await?,
            ),
            Kind::Postgres => AnyLock::Pg(
                PgAdvisoryLock::builder(url, name)
                    .ttl(ttl)
                    .connect_timeout(t)
                    .sink(sink.clone())
                    .connect()
                    .await?,
            ),
        })
    }

    async fn lock(&self) -> LeaseGuard {
        match self {
            AnyLock::Etcd(l) => l.lock().await,
            AnyLock::Redis(l) => l.lock().await,
            AnyLock::Pg(l) => l.lock().await,
        }
        .unwrap()
    }

    async fn try_lock(&self) -> Option<LeaseGuard> {
        match self {
            AnyLock::Etcd(l) => l.try_lock().await,
            AnyLock::Redis(l) => l.try_lock().await,
            AnyLock::Pg(l) => l.try_lock().await,
        }
        .unwrap()
    }

    async fn lock_timeout(&self, d: Duration) -> Option<LeaseGuard> {
        match self {
            AnyLock::Etcd(l) => l.lock_timeout(d).await,
            AnyLock::Redis(l) => l.lock_timeout(d).await,
            AnyLock::Pg(l) => l.lock_timeout(d).await,
        }
        .unwrap()
    }

    async fn status(&self) -> LockStatus {
        match self {
            AnyLock::Etcd(l) => l.status().await,
            AnyLock::Redis(l) => l.status().await,
            AnyLock::Pg(l) => l.status().await,
        }
        .unwrap()
    }
}

fn recorder() -> Recorder {
    Recorder::new()
}

/// Waits for `invalidated()` with a bound; returns the reason and how long it took.
async fn loss_within(guard: &LeaseGuard, bound: Duration) -> (LostReason, Duration) {
    let t0 = Instant::now();
    match tokio::time::timeout(bound, guard.invalidated()).await {
        Ok(r) => (r, t0.elapsed()),
        Err(_) => panic!(
            "the loss of {} was not detected within {bound:?}",
            guard.name()
        ),
    }
}

/// Retries `f` until it returns true or 10 s pass.
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Several clients (each its own connection) x many increments of a shared counter done as a
/// non-atomic read-yield-write: any overlap loses increments or trips the `inside` flag.
/// Fencing tokens must rise strictly from one holder to the next.
async fn exclusion_under_load(kind: Kind, url: &str) {
    const CLIENTS: usize = 4;
    const ROUNDS: usize = 25;
    let rec = recorder();
    let sink = Sink::new(rec.meter());
    let name = format!("load-{}", kind.as_str());
    let counter = Arc::new(AtomicU64::new(0));
    let inside = Arc::new(AtomicBool::new(false));
    let last_token = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let lock = AnyLock::connect(kind, url, &name, Duration::from_secs(10), &sink).await;
        let (counter, inside, last_token) = (counter.clone(), inside.clone(), last_token.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let g = lock.lock().await;
                assert!(g.is_valid());
                assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                let prev = last_token.swap(g.fencing_token(), Ordering::SeqCst);
                assert!(
                    g.fencing_token() > prev,
                    "fencing token {} not above the previous holder's {prev}",
                    g.fencing_token()
                );
                let v = counter.load(Ordering::SeqCst);
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_micros(200)).await;
                counter.store(v + 1, Ordering::SeqCst);
                inside.store(false, Ordering::SeqCst);
                g.release().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = (CLIENTS * ROUNDS) as u64;
    assert_eq!(
        counter.load(Ordering::SeqCst),
        total,
        "{kind:?}: increments lost"
    );
    let snap = rec.snapshot();
    let k = [("lock.name", name.as_str()), ("lock.kind", kind.as_str())];
    assert_eq!(snap.counter("lock.acquisitions", &k), total);
    assert!(
        snap.counter("lock.conflicts", &k) > 0,
        "{kind:?}: no conflict counted"
    );
    assert_eq!(snap.updown("lock.held", &k), 0);
    assert_eq!(snap.hist_count("lock.duration", &k), total);
    assert_eq!(snap.counter("lock.lost", &k), 0);
    assert_eq!(snap.counter("lock.errors", &k), 0);
}

/// try_lock finds it held (would_block), lock_timeout gives up (timeout), status shows the
/// holder with its token and a waiter, and a waiter gets in right after the release.
async fn try_timeout_status(kind: Kind, url: &str) {
    let rec = recorder();
    let sink = Sink::new(rec.meter());
    let name = format!("try-{}", kind.as_str());
    let ttl = Duration::from_secs(10);
    let a = AnyLock::connect(kind, url, &name, ttl, &sink).await;
    let b = AnyLock::connect(kind, url, &name, ttl, &sink).await;
    let g = a.try_lock().await.expect("free lock");
    assert!(b.try_lock().await.is_none());
    let t0 = Instant::now();
    assert!(b.lock_timeout(Duration::from_millis(300)).await.is_none());
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(280) && waited < Duration::from_secs(3),
        "{kind:?}: lock_timeout(300ms) took {waited:?}"
    );
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.lock().await }
    });
    eventually("the waiter to show in status()", || {
        let a = a.clone();
        async move { a.status().await.waiters.len() == 1 }
    })
    .await;
    let st = a.status().await;
    assert_eq!(st.holders.len(), 1, "{st:?}");
    assert_eq!(st.holders[0].token, Some(g.fencing_token()), "{st:?}");
    let first = g.fencing_token();
    g.release().await.unwrap();
    let g2 = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("waiter got the lock after the release")
        .unwrap();
    assert!(g2.fencing_token() > first);
    assert!(g2.was_contended());
    g2.release().await.unwrap();
    let snap = rec.snapshot();
    let k = [("lock.name", name.as_str()), ("lock.kind", kind.as_str())];
    let wait = |o| snap.hist_count("lock.wait.duration", &[k[0], k[1], ("lock.outcome", o)]);
    assert_eq!(wait("would_block"), 1);
    assert_eq!(wait("timeout"), 1);
    assert_eq!(wait("acquired"), 2);
    assert_eq!(snap.counter("lock.conflicts", &k), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_excludes_under_load_with_rising_tokens() {
    let etcd = Etcd::start();
    exclusion_under_load(Kind::Etcd, &etcd.url).await;
    try_timeout_status(Kind::Etcd, &etcd.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_excludes_under_load_with_rising_tokens() {
    let redis = Redis::start();
    exclusion_under_load(Kind::Redis, &redis.url).await;
    try_timeout_status(Kind::Redis, &redis.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_excludes_under_load_with_rising_tokens() {
    let pg = Postgres::start();
    exclusion_under_load(Kind::Postgres, &pg.url).await;
    try_timeout_status(Kind::Postgres, &pg.url).await;
}

/// `etcdctl lock NAME` and lockmeter exclude each other, both ways, and the tokens keep
/// rising across the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_interoperates_with_etcdctl_lock() {
    let etcd = Etcd::start();
    let rec = recorder();
    let sink = Sink::new(rec.meter());
    let lock = AnyLock::connect(
        Kind::Etcd,
        &etcd.url,
        "interop",
        Duration::from_secs(5),
        &sink,
    )
    .await;

    // etcdctl holds: lockmeter must not get in.
    let mut ctl = etcd
        .ctl()
        .args(["lock", "interop"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(ctl.stdout.take().unwrap());
    let mut key = String::new();
    out.read_line(&mut key).unwrap();
    let key = key.trim().to_owned();
    assert!(key.starts_with("interop/"), "etcdctl printed {key:?}");
    assert!(
        lock.try_lock().await.is_none(),
        "lockmeter got a lock etcdctl holds"
    );
    assert!(lock
        .lock_timeout(Duration::from_millis(200))
        .await
        .is_none());
    let ctl_rev: u64 = etcd
        .ctl_ok(&["get", &key, "-w", "fields"])
        .lines()
        .find_map(|l| l.strip_prefix("\"CreateRevision\" : "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(ctl.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    ctl.wait().unwrap();
    let g = tokio::time::timeout(Duration::from_secs(5), lock.lock())
        .await
        .unwrap();
    assert!(g.fencing_token() > ctl_rev);

    // lockmeter holds: etcdctl must wait until the release.
    let mut ctl = etcd
        .ctl()
        .args(["lock", "interop"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("etcdctl to queue behind lockmeter", || {
        let lock = lock.clone();
        async move { lock.status().await.waiters.len() == 1 }
    })
    .await;
    let st = lock.status().await;
    assert_eq!(st.holders[0].id, g.key());
    let waiter_token = st.waiters[0].token.unwrap();
    assert!(waiter_token > g.fencing_token());
    g.release().await.unwrap();
    let mut out = BufReader::new(ctl.stdout.take().unwrap());
    let mut key = String::new();
    out.read_line(&mut key).unwrap();
    assert!(
        key.starts_with("interop/"),
        "etcdctl printed {key:?} after the release"
    );
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(ctl.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    ctl.wait().unwrap();
}

/// Losses an operator or the server causes while the lock is held: detected, `is_valid()`
/// false, `invalidated()` wakes, `lock.lost{reason}` counted, `release()` reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_key_deleted_and_lease_revoked_are_detected() {
    let etcd = Etcd::start();
    let rec = recorder();
    let sink = Sink::new(rec.meter());
    let lock = AnyLock::connect(Kind::Etcd, &etcd.url, "ops", Duration::from_secs(10), &sink).await;

    let g = lock.lock().await;
    etcd.ctl_ok(&["del", g.key()]);
    let (reason, took) = loss_within(&g, Duration::from_secs(2)).await;
    assert_eq!(reason, LostReason::Overwritten);
    assert!(took < Duration::from_secs(2));
    assert!(!g.is_valid());
    assert!(matches!(
        g.release().await,
        Err(LeaseError::Lost {
            reason: LostReason::Overwritten,
            ..
        })
    ));

    let g = lock.lock().await;
    let lease = g.key().rsplit('/').next().unwrap().to_owned();
    etcd.ctl_ok(&["lease", "revoke", &lease]);
    let (reason, _) = loss_within(&g, Duration::from_secs(5)).await;
    // Revoking deletes the key first (the watch sees it) or the keep-alive learns it.
    assert!(
        matches!(reason, LostReason::Overwritten | LostReason::Revoked),
        "{reason:?}"
    );
    drop(g);

    let snap = rec.snapshot();
    let k = [("lock.name", "ops"), ("lock.kind", "etcd")];
    assert_eq!(snap.counter("lock.lost", &k), 2);
    assert!(
        snap.counter(
            "lock.lost",
            &[k[0], k[1], ("lock.lost.reason", "overwritten")]
        ) >= 1
    );
    assert_eq!(snap.updown("lock.held", &k), 0);
    // The next holder gets in at once.
    assert!(lock.try_lock().await.is_some());
}

/// The server dies while the lock is held: the loss is reported within the TTL.
async fn server_killed_is_detected_within_ttl(kind: Kind, url: &str, kill: impl FnOnce()) {
    let rec = recorder();
    let sink = Sink::new(rec.meter());
    let ttl = Duration::from_secs(2);
    let lock = AnyLock::connect(kind, url, "killed", ttl, &sink).await;
    let g = lock.lock().await;
    let killed = Instant::now();
    kill();
    let (reason, _) = loss_within(&g, ttl + Duration::from_secs(2)).await;
    let took = killed.elapsed();
    assert!(
        took <= ttl + Duration::from_millis(500),
        "{kind:?}: loss reported after {took:?}"
    );
    assert!(!g.is_valid());
    assert_eq!(reason, LostReason::Connection, "{kind:?}");
    let snap = rec.snapshot();
    assert_eq!(
        snap.counter(
            "lock.lost",
            &[
                ("lock.kind", kind.as_str()),
                ("lock.lost.reason", "connection")
            ]
        ),
        1
    );
    assert_eq!(snap.updown("lock.held", &[("lock.kind", kind.as_str())]), 0);
    assert!(g.release().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_server_killed_is_detected_within_ttl() {
    let mut etcd = Etcd::start();
    let url = etcd.url.clone();
    server_killed_is_detected_within_ttl(Kind::Etcd, &url, || etcd.kill()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_server_killed_is_detected_within_ttl() {
    let mut redis = Redis::start();
    let url = redis.url.clone();
    server_killed_is_detected_within_ttl(Kind::Redis, &url, || redis.kill()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_server_killed_is_detected_within_ttl() {
    let mut pg = Postgres::start();
    let url = pg.url.clone();
    server_killed_is_detected_within_ttl(Kind::Postgres, &url, || pg.kill()).await;
}

/// Redis: a deleted or overwritten key is found at the next renewal (TTL/3); a dropped
/// connection (`CLIENT KILL`) is not a loss: the key is still ours and renewals resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_key_deleted_overwritten_and_client_kill() {
    let redis = Redis::start();
    let rec = recorder();
    let sink = Sink::new(rec.meter());
    let ttl = Duration::from_secs(3);
    let lock = AnyLock::connect(Kind::Redis, &redis.url, "ops", ttl, &sink).await;

    let g = lock.lock().await;
    redis.cli(&["DEL", "lockmeter:ops"]);
    let (reason, took) = loss_within(&g, ttl).await;
    assert_eq!(reason, LostReason::Overwritten);
    assert!(took <= ttl / 3 + Duration::from_millis(500), "{took:?}");
    drop(g);

    let g = lock.lock().await;
    redis.cli(&["SET", "lockmeter:ops", "999 someone-else", "PX", "60000"]);
    let (reason, _) = loss_within(&g, ttl).await;
    assert_eq!(reason, LostReason::Overwritten);
    assert!(matches!(g.release().await, Err(LeaseError::Lost { .. })));
    redis.cli(&["DEL", "lockmeter:ops"]);

    let g = lock.lock().await;
    redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    // Two renewal periods later it must still be ours and valid.
    tokio::time::sleep(ttl).await;
    assert!(
        g.is_valid(),
        "lost after CLIENT KILL: {:?}",
        g.lost_reason()
    );
    let value = redis.cli(&["GET", "lockmeter:ops"]);
    assert!(
        value.starts_with(&format!("{} ", g.fencing_token())),
        "{value}"
    );
    g.release().await.unwrap();

    let snap = rec.snapshot();
    let k = [("lock.name", "ops"), ("lock.kind", "redis")];
    assert_eq!(
        snap.counter(
            "lock.lost",
            &[k[0], k[1], ("lock.lost.reason", "overwritten")]
        ),
        2
    );
    assert_eq!(snap.updown("lock.held", &k), 0);
}

/// PostgreSQL: `pg_terminate_backend` on the holder's session is a `connection` loss seen
/// at once, and the next session gets the lock with a higher token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_terminated_backend_is_detected_at_once() {
    let pg = Postgres::start();
    let rec = recorder();
    let sink = Sink::new(rec.meter());
    let ttl = Duration::from_secs(10);
    let lock = AnyLock::connect(Kind::Postgres, &pg.url, "term", ttl, &sink).await;
    let other = AnyLock::connect(Kind::Postgres, &pg.url, "term", ttl, &sink).await;
    let g = lock.lock().await;
    let key = lockmeter::lease::advisory_key("term");
    assert_eq!(g.key(), key.to_string());
    let n = pg.psql(&format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' \
         AND granted AND ((classid::bigint << 32) | objid::bigint) = {key}"
    ));
    assert_eq!(n, "1");
    let (reason, took) = loss_within(&g, Duration::from_secs(2)).await;
    assert_eq!(reason, LostReason::Connection);
    assert!(took < Duration::from_secs(2));
    let g2 = other.try_lock().await.expect("free once the session ended");
    assert!(g2.fencing_token() > g.fencing_token());
    g2.release().await.unwrap();
    let snap = rec.snapshot();
    assert_eq!(
        snap.counter(
            "lock.lost",
            &[("lock.name", "term"), ("lock.lost.reason", "connection")]
        ),
        1
    );
}

/// A holder paused past its TTL (its runtime thread blocked: no renewal can run): etcd and
/// Redis hand the lock to the next holder with a higher token, and the paused holder's guard
/// is invalid the moment it runs again and its loss is counted as `expired`.
async fn paused_holder_loses_to_next(kind: Kind, url: String) {
    let rec = recorder();
    let sink = Sink::new(rec.meter());
    let ttl = Duration::from_secs(2);
    let (tx, rx) = std::sync::mpsc::channel();
    let url2 = url.clone();
    let sink2 = sink.clone();
    let paused = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let lock = AnyLock::connect(kind, &url2, "paused", ttl, &sink2).await;
            let g = lock.lock().await;
            tx.send(g.fencing_token()).unwrap();
            // The pause: nothing on this runtime runs for 2 TTLs.
            std::thread::sleep(ttl * 2);
            let valid_on_resume = g.is_valid();
            let (reason, _) = loss_within(&g, Duration::from_secs(1)).await;
            (valid_on_resume, reason)
        })
    });
    let first = rx.recv().unwrap();
    let next = AnyLock::connect(kind, &url, "paused", ttl, &sink).await;
    let t0 = Instant::now();
    let g = tokio::time::timeout(ttl * 3, next.lock())
        .await
        .expect("the next holder got in");
    assert!(
        t0.elapsed() >= ttl / 2,
        "{kind:?}: got in before the lease could expire"
    );
    assert!(g.fencing_token() > first);
    let (valid_on_resume, reason) = paused.join().unwrap();
    assert!(
        !valid_on_resume,
        "{kind:?}: paused holder still valid after its TTL"
    );
    assert_eq!(reason, LostReason::Expired, "{kind:?}");
    g.release().await.unwrap();
    let snap = rec.snapshot();
    assert_eq!(
        snap.counter(
            "lock.lost",
            &[
                ("lock.kind", kind.as_str()),
                ("lock.lost.reason", "expired")
            ]
        ),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_paused_holder_loses_to_next_holder() {
    let etcd = Etcd::start();
    paused_holder_loses_to_next(Kind::Etcd, etcd.url.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_holder_loses_to_next_holder() {
    let redis = Redis::start();
    paused_holder_loses_to_next(Kind::Redis, redis.url.clone()).await;
}

/// Nothing listening: a clear `Connect` error naming the lock and endpoint, quickly, never a
/// hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_down_at_start_is_a_clear_error() {
    let rec = recorder();
    let sink = Sink::new(rec.meter());
    for (kind, url) in [
        (Kind::Etcd, format!("http://127.0.0.1:{}", free_port())),
        (Kind::Redis, format!("redis://127.0.0.1:{}/", free_port())),
        (
            Kind::Postgres,
            format!("postgresql://postgres@127.0.0.1:{}/postgres", free_port()),
        ),
    ] {
        let t0 = Instant::now();
        let r = AnyLock::try_connect(kind, &url, "down", Duration::from_secs(5), &sink).await;
        let took = t0.elapsed();
        let e = r.expect_err("connected to nothing");
        assert!(matches!(e, LeaseError::Connect { .. }), "{kind:?}: {e:?}");
        assert!(e.is_unavailable(), "{kind:?}: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains("\"down\"") && msg.contains("127.0.0.1"),
            "{msg}"
        );
        assert!(took < Duration::from_secs(3), "{kind:?}: took {took:?}");
    }
}
