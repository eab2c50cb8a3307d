//! The meter around locks lockmeter does not wrap itself: a `parking_lot::Mutex` and a Redis
//! `SET NX PX` lock taken through the `redis` client crate.
//!
//! `cargo run --example wrap_any_lock` (needs a Redis server; `REDIS_URL`, default
//! `redis://127.0.0.1:6379/`).

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use lockmeter::{LockMeter, LockMode};
use lockmeter_examples::redis_lock::RedisLock;

fn main() -> Result<(), Box<dyn Error>> {
    let telemetry = lockmeter::telemetry::Telemetry::builder()
        .prometheus_addr("127.0.0.1:0".parse()?)
        .init()?;

    // 1. parking_lot: try first, then block, so contention is measured.
    let meter = LockMeter::new("jobs", "parking_lot_mutex");
    let jobs = Arc::new(parking_lot::Mutex::new(Vec::<u32>::new()));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (meter, jobs) = (meter.clone(), Arc::clone(&jobs));
            std::thread::spawn(move || {
                for i in 0..10_000 {
                    let mut g = meter.lock(LockMode::Exclusive, || jobs.try_lock(), || jobs.lock());
                    g.push(w * 10_000 + i);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| "worker panicked")?;
    }
    println!("parking_lot: {} jobs", jobs.lock().len());

    // 2. Redis: two clients contend for one key.
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let redis_meter = LockMeter::new("nightly-report", "redis");
    let clients: Vec<_> = (0..2)
        .map(|_| {
            RedisLock::new(
                &url,
                "lock:nightly-report",
                Duration::from_secs(10),
                redis_meter.clone(),
            )
        })
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot reach Redis at {url}: {e}"))?;
    let first = clients[0].try_lock()?.ok_or("the key is already held")?;
    assert!(
        clients[1].try_lock()?.is_none(),
        "a second client must not get the lock"
    );
    first.release()?;
    let second = clients[1]
        .lock_timeout(Duration::from_secs(1), Duration::from_millis(10))?
        .ok_or("timed out")?;
    second.release()?;
    println!("redis: lock taken by one client at a time");

    // What Prometheus would scrape now.
    lockmeter_examples::print_lock_counts(&telemetry)?;
    Ok(())
}
