//! Wrap an existing `std::sync::Mutex`: `cargo run --example wrap_std_mutex`.
//!
//! The change in a real program is two lines:
//!
//! ```text
//! -use std::sync::Mutex;
//! +use lockmeter::sync::Mutex;
//!
//! -let cache = Mutex::new(HashMap::new());
//! +let cache = Mutex::named("cache", HashMap::new());
//! ```
//!
//! Everything else (`lock()`, `try_lock()`, poisoning, `Arc<Mutex<_>>`) stays as it was.

#![allow(clippy::unwrap_used)] // an example: a poisoned cache should crash it

use std::collections::HashMap;
use std::error::Error;
use std::sync::Arc;

use lockmeter::sync::Mutex;

fn main() -> Result<(), Box<dyn Error>> {
    let telemetry = lockmeter::telemetry::Telemetry::builder()
        .prometheus_addr("127.0.0.1:0".parse()?)
        .init()?;

    let cache = Arc::new(Mutex::named("cache", HashMap::<u32, u64>::new()));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let cache = Arc::clone(&cache);
            std::thread::spawn(move || {
                for i in 0..50_000u32 {
                    *cache.lock().unwrap().entry((i + w) % 64).or_default() += 1;
                }
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| "worker panicked")?;
    }
    let total: u64 = cache.lock().unwrap().values().sum();
    println!("counted {total} updates");

    // What Prometheus would scrape now.
    lockmeter_examples::print_lock_counts(&telemetry)?;
    Ok(())
}
