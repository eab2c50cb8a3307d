//! The examples, run for real: a Redis lock against a real redis-server, and every example
//! binary (built by `cargo test`) executed as a process.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lockmeter::metrics::Sink;
use lockmeter::LockMeter;
use lockmeter_examples::redis_lock::RedisLock;
use lockmeter_testkit::proc::{until_up, KillOnDrop};
use lockmeter_testkit::tools::command;
use lockmeter_testkit::{free_port, listening, require_tool, Recorder};

/// A private redis-server on a free loopback port, without persistence; killed on drop.
struct Redis {
    _server: KillOnDrop,
    url: String,
}

impl Redis {
    /// `None` when redis-server is missing and the run allows that (the caller returns).
    fn start() -> Option<Redis> {
        if !require_tool("redis-server") {
            return None;
        }
        let port = free_port();
        let server = command("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut server = KillOnDrop(server);
        until_up(
            &mut server,
            "redis-server to listen",
            Duration::from_secs(30),
            None,
            || listening(port),
        );
        Some(Redis {
            _server: server,
            url: format!("redis://127.0.0.1:{port}/"),
        })
    }
}

#[test]
fn redis_set_nx_lock_excludes_and_is_counted_exactly() {
    let Some(redis) = Redis::start() else { return };
    let rec = Recorder::new();
    let meter = LockMeter::with_sink("report", "redis", &Sink::new(rec.meter()));
    let inside = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let lock = RedisLock::new(
                &redis.url,
                "lock:report",
                Duration::from_secs(5),
                meter.clone(),
            )
            .unwrap();
            let inside = Arc::clone(&inside);
            std::thread::spawn(move || {
                let mut got = 0;
                for _ in 0..100 {
                    let g = lock
                        .lock_timeout(Duration::from_secs(5), Duration::from_micros(200))
                        .unwrap()
                        .expect("acquired within 5 s");
                    assert!(
                        !inside.swap(true, Ordering::SeqCst),
                        "two Redis holders at once"
                    );
                    std::thread::sleep(Duration::from_micros(300));
                    inside.store(false, Ordering::SeqCst);
                    assert!(g.release().unwrap());
                    got += 1;
                }
                got
            })
        })
        .collect();
    let total: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(total, 200);
    // A would-block attempt and an expired lock whose release finds another owner.
    let a = RedisLock::new(
        &redis.url,
        "lock:short",
        Duration::from_millis(50),
        meter.clone(),
    )
    .unwrap();
    let b = RedisLock::new(
        &redis.url,
        "lock:short",
        Duration::from_secs(5),
        meter.clone(),
    )
    .unwrap();
    let held = a.try_lock().unwrap().unwrap();
    assert!(b.try_lock().unwrap().is_none());
    let stolen = b
        .lock_timeout(Duration::from_secs(2), Duration::from_millis(5))
        .unwrap()
        .unwrap();
    assert!(
        !held.release().unwrap(),
        "a's TTL ran out: the key is b's now"
    );
    assert!(stolen.release().unwrap());

    let s = rec.snapshot();
    assert_eq!(
        s.counter("lock.acquisitions", &[("lock.kind", "redis")]),
        202
    );
    let contended = s.counter("lock.acquisitions", &[("lock.contended", "true")]);
    assert_eq!(
        s.counter("lock.conflicts", &[]),
        contended + 1,
        "+1: the would_block try"
    );
    assert_eq!(
        s.hist_count("lock.wait.duration", &[("lock.outcome", "would_block")]),
        1
    );
    assert_eq!(
        s.counter(
            "lock.errors",
            &[("lock.operation", "unlock"), ("error.type", "NotOwner")]
        ),
        1
    );
    assert_eq!(s.hist_count("lock.duration", &[]), 202);
    assert_eq!(s.updown("lock.held", &[]), 0);
}

fn example(name: &str) -> PathBuf {
    // target/debug/deps/examples-HASH -> target/debug/examples/NAME
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name)
}

fn run_example(name: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut c = Command::new(example(name));
    c.args(args).env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap_or_else(|e| panic!("{name}: {e}"));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{name}: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

#[test]
fn the_examples_that_need_no_server_run() {
    let out = run_example("file_lock", &[], &[]);
    assert!(
        out.contains("lock_acquisitions_total{") && out.contains("nightly-job"),
        "{out}"
    );
    let out = run_example("wrap_std_mutex", &[], &[]);
    assert!(
        out.contains("counted 200000 updates") && out.contains("lock_kind=\"mutex\""),
        "{out}"
    );
    let out = run_example("tokio_service", &["--self-test", "50"], &[]);
    assert!(out.contains("lock_kind=\"tokio_mutex\""), "{out}");
    let acquired: f64 = out
        .lines()
        .filter(|l| l.starts_with("lock_acquisitions_total"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(acquired, 50.0, "{out}");
}

#[test]
fn the_wrap_any_lock_example_runs_against_redis() {
    let Some(redis) = Redis::start() else { return };
    let out = run_example("wrap_any_lock", &[], &[("REDIS_URL", &redis.url)]);
    assert!(
        out.contains("lock_kind=\"redis\"") && out.contains("lock_kind=\"parking_lot_mutex\""),
        "{out}"
    );
}

/// The etcd job example against a real etcd: it finishes and releases; then, with an operator
/// deleting its lock key mid-run, it stops before its next write and exits 75.
#[cfg(feature = "etcd")]
#[test]
fn distributed_lock_example_writes_with_its_token_and_stops_when_lost() {
    use std::io::{BufRead as _, BufReader};
    let etcd = lockmeter_testkit::servers::Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("report.store");
    let s = store.to_str().unwrap();
    let out = run_example("distributed_lock", &[&etcd.url, "3", s], &[]);
    assert!(
        out.contains("wrote step 3 with fencing token") && out.contains("lock released"),
        "{out}"
    );
    let first: u64 = std::fs::read_to_string(&store)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();

    let mut c = Command::new(example("distributed_lock"))
        .args([&etcd.url, "1000", s])
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(c.stdout.take().unwrap()).lines();
    let holding = lines.next().unwrap().unwrap();
    let key = holding.split_whitespace().nth(1).unwrap().to_owned();
    let token: u64 = holding.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(token > first, "{holding}");
    assert!(lines.next().unwrap().unwrap().starts_with("wrote step 1"));
    etcd.ctl_ok(&["del", &key]);
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(
        rest.last().unwrap().starts_with("lock lost (overwritten)"),
        "{rest:?}"
    );
    assert_eq!(c.wait().unwrap().code(), Some(75));
}
