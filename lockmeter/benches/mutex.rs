//! In-process lock overhead: `cargo bench -p lockmeter --bench mutex`.
//!
//! Prints, from one run, uncontended lock + unlock for `std::sync::Mutex`,
//! `parking_lot::Mutex` and `lockmeter::sync::Mutex` (a real SDK `MeterProvider` installed,
//! default sampling and every acquisition timed), and contended throughput with 2 threads,
//! pinned to two CPUs (true contention) and unpinned. Targets: lockmeter uncontended <= 3x
//! std; contended throughput >= 0.8x std. lockmeter's mutex is built on parking_lot's lock,
//! so the line "lockmeter / parking_lot" is the instrumentation's own cost under contention.
#![allow(clippy::unwrap_used, missing_docs)]

#[macro_use]
mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};

const ROUNDS: usize = 15;
const ITERS: u32 = 2_000_000;

/// ns per iteration (see `common::ns_per_op!`).
macro_rules! time {
    ($body:expr) => {
        ns_per_op!(ITERS, $body)
    };
}

use common::median;

/// Ops per second of two threads hammering `m`, both released at once by a barrier; the clock
/// runs from the release until both are done. With `pin`, thread `i` runs on CPU `i` only, so
/// the two really run at the same time (true contention); without, the scheduler may also
/// time-slice both on one CPU, where a lock is never contended and the run measures
/// single-thread speed: unpinned rounds swing between the two regimes.
fn contended<M: Send + Sync + 'static, F: Fn(&M) + Copy + Send + 'static>(
    m: Arc<M>,
    op: F,
    pin: bool,
) -> f64 {
    let per_thread = 500_000u32;
    let barrier = Arc::new(std::sync::Barrier::new(3));
    let ts: Vec<_> = (0..2)
        .map(|cpu| {
            let (m, barrier) = (Arc::clone(&m), Arc::clone(&barrier));
            std::thread::spawn(move || {
                if pin {
                    let mut set = rustix::thread::CpuSet::new();
                    set.set(cpu);
                    rustix::thread::sched_setaffinity(None, &set).unwrap();
                }
                barrier.wait();
                for _ in 0..per_thread {
                    op(&m);
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for t in ts {
        t.join().unwrap();
    }
    2.0 * f64::from(per_thread) / start.elapsed().as_secs_f64()
}

/// Interleaved contended rounds of std, parking_lot and lockmeter; prints medians and the
/// target ratio (median of per-round ratios: the three share each round's conditions).
fn contended_rounds(sink: &lockmeter::metrics::Sink, rounds: usize, pin: bool) {
    let mut c: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let (mut vs_std, mut vs_pl) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let std_ops = contended(
            Arc::new(std::sync::Mutex::new(0u64)),
            |m| *m.lock().unwrap() += 1,
            pin,
        );
        let pl_ops = contended(
            Arc::new(parking_lot::Mutex::new(0u64)),
            |m| *m.lock() += 1,
            pin,
        );
        let lm = Arc::new(
            lockmeter::sync::Mutex::builder("bench-contended")
                .sink(sink.clone())
                .build(0u64),
        );
        let lm_ops = contended(lm, |m| *m.lock().unwrap() += 1, pin);
        c[0].push(std_ops);
        c[1].push(pl_ops);
        c[2].push(lm_ops);
        vs_std.push(lm_ops / std_ops);
        vs_pl.push(lm_ops / pl_ops);
    }
    let cm: Vec<f64> = c.iter_mut().map(|v| median(v)).collect();
    let how = if pin {
        "pinned to CPUs 0 and 1: true contention"
    } else {
        "unpinned: the scheduler may time-slice both on one CPU"
    };
    println!("contended, 2 threads, {how}; {rounds} interleaved rounds x 1M ops (median)");
    for (n, v) in [
        "std::sync::Mutex",
        "parking_lot::Mutex",
        "lockmeter::sync::Mutex (1/64)",
    ]
    .iter()
    .zip(&cm)
    {
        println!("  {n:<38} {:>7.2} Mops/s", v / 1e6);
    }
    println!(
        "  lockmeter / parking_lot (its lock underneath): {:.2}x",
        median(&mut vs_pl)
    );
    println!(
        "  target: lockmeter >= 0.80x std throughput -> {:.2}x (median of per-round ratios; min {:.2}, max {:.2})",
        median(&mut vs_std),
        vs_std.iter().cloned().fold(f64::INFINITY, f64::min),
        vs_std.iter().cloned().fold(0.0, f64::max),
    );
}

fn main() {
    let quick = common::quick();
    let rounds = if quick { 1 } else { ROUNDS };
    let provider = SdkMeterProvider::builder()
        .with_reader(
            PeriodicReader::builder(InMemoryMetricExporter::default())
                .with_interval(Duration::from_secs(3600))
                .build(),
        )
        .build();
    let sink = lockmeter::metrics::Sink::new(provider.meter("lockmeter"));

    let std_m = std::sync::Mutex::new(0u64);
    let pl_m = parking_lot::Mutex::new(0u64);
    let lm_m = lockmeter::sync::Mutex::builder("bench")
        .sink(sink.clone())
        .build(0u64);
    let lm_all = lockmeter::sync::Mutex::builder("bench-all")
        .sink(sink.clone())
        .sample_every(1)
        .build(0u64);

    let names = [
        "std::sync::Mutex",
        "parking_lot::Mutex",
        "lockmeter::sync::Mutex (sample 1/64)",
        "lockmeter::sync::Mutex (time every)",
    ];
    let mut s: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for _ in 0..rounds {
        s[0].push(time!(*black_box(&std_m).lock().unwrap() += 1));
        s[1].push(time!(*black_box(&pl_m).lock() += 1));
        s[2].push(time!(*black_box(&lm_m).lock().unwrap() += 1));
        s[3].push(time!(*black_box(&lm_all).lock().unwrap() += 1));
    }
    let m: Vec<f64> = s.iter_mut().map(|v| median(v)).collect();
    println!("uncontended lock + unlock, median of {rounds} rounds x {ITERS}");
    for (n, v) in names.iter().zip(&m) {
        println!("  {n:<38} {v:>7.2} ns/op  {:>5.2}x std", v / m[0]);
    }
    println!(
        "  target: lockmeter (default) <= 3.00x std  -> {:.2}x",
        m[2] / m[0]
    );

    // Contended runs swing by 2x from run to run on a small VM: interleave the three locks in
    // each round and compare within the round (median of per-round ratios).
    let crounds = if quick { 1 } else { 31 };
    if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        contended_rounds(&sink, crounds, true);
    } else {
        println!("contended, pinned: skipped, fewer than 2 CPUs");
    }
    contended_rounds(&sink, crounds, false);
    provider.force_flush().unwrap();
}
