//! `cargo bench -p lockmeter-bench --bench sync`: lockmeter's in-process locks against the lock
//! each one sits on, from an outside crate, side by side in one process.
//!
//! - **Uncontended** lock + unlock (one thread): `sync::Mutex`, `sync::RwLock` read and write vs
//!   `parking_lot`'s (std's shown for reference), `tokio::Mutex`/`RwLock` vs tokio's, and a
//!   `parking_lot` lock through `LockMeter` vs bare. Interleaved rounds; each ratio is the
//!   median of per-round ratios, with the middle half and the worst. Target: ≤ 1.10×.
//! - **Contended** throughput: 2 threads pinned to CPUs 0 and 1 (true contention) and 4 threads
//!   unpinned, for `Mutex` and `RwLock::write`; tokio's locks across 8 tasks on a 2-worker
//!   multi-thread runtime. Target: ≥ 0.90× the lock underneath.
//!
//! A real SDK `MeterProvider` is installed globally (as an application does) and the locks use
//! their default sampling. Counts are checked exact at the end of each contended round.
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use lockmeter::LockMode;
use lockmeter_bench::{cpu_model, install_global_sdk, median, mitigations, ns_per_op};

fn quick() -> bool {
    std::env::args().any(|a| a == "--test") || std::env::var_os("QUICK").is_some()
}

/// Prints one comparison: medians of both and the median and worst per-round ratio against
/// `target` (`higher`: a throughput, where worse is lower).
fn report(name: &str, base: &str, unit: &str, pairs: &[(f64, f64)], target: f64, higher: bool) {
    let mut a: Vec<f64> = pairs.iter().map(|p| p.0).collect();
    let mut b: Vec<f64> = pairs.iter().map(|p| p.1).collect();
    let mut r: Vec<f64> = pairs.iter().map(|p| p.1 / p.0).collect();
    let worst = if higher {
        r.iter().copied().fold(f64::MAX, f64::min)
    } else {
        r.iter().copied().fold(f64::MIN, f64::max)
    };
    let med = median(&mut r);
    // The middle half of the per-round ratios (`median` sorted them).
    let q = |f: f64| r[((r.len() - 1) as f64 * f).round() as usize];
    let (q1, q3) = (q(0.25), q(0.75));
    let met = if higher { med >= target } else { med <= target };
    println!(
        "  {name:<34} {:>8.2} {unit}  vs {base:<24} {:>8.2} {unit}  ratio median {med:.3} (middle half {q1:.3}-{q3:.3}, worst {worst:.3})  target {} {target:.2} {}",
        median(&mut b),
        median(&mut a),
        if higher { ">=" } else { "<=" },
        if met { "met" } else { "MISSED" }
    );
}

/// Ops per second of `threads` threads each doing `per_thread` ops on `m`, released together.
fn throughput<M: Send + Sync + 'static>(
    m: &Arc<M>,
    op: fn(&M),
    threads: usize,
    pin: bool,
    per_thread: u32,
) -> f64 {
    let barrier = Arc::new(std::sync::Barrier::new(threads + 1));
    let ts: Vec<_> = (0..threads)
        .map(|i| {
            let (m, barrier) = (Arc::clone(m), Arc::clone(&barrier));
            std::thread::spawn(move || {
                if pin {
                    let mut set = rustix::thread::CpuSet::new();
                    set.set(i);
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
    threads as f64 * f64::from(per_thread) / start.elapsed().as_secs_f64()
}

fn main() {
    let quick = quick();
    let (rounds, iters) = if quick { (1, 20_000) } else { (15, 2_000_000) };
    println!("host: {}", cpu_model());
    for (k, v) in mitigations() {
        println!("  {k}: {v}");
    }
    let provider = install_global_sdk();
    // `cargo bench --bench sync -- PART...` runs only those parts (uncontended, contended,
    // tokio); all by default.
    let parts: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let part = |p: &str| parts.is_empty() || parts.iter().any(|a| a == p);

    if part("uncontended") {
        uncontended(rounds, iters);
    }
    if part("contended") {
        // More rounds than the uncontended part: contended throughput on a VM drifts by tens
        // of per cent over seconds, and only ratios of rounds run side by side are compared.
        contended(
            if quick { 1 } else { 41 },
            if quick { 2_000 } else { 300_000 },
        );
    }
    if part("tokio") {
        tokio_contended(
            if quick { 1 } else { 41 },
            if quick { 1_000 } else { 20_000 },
        );
    }
    provider.force_flush().unwrap();
}

/// ns per iteration of `fut`, which runs `n` iterations, on `rt`.
fn block_ns(
    rt: &tokio::runtime::Runtime,
    n: u32,
    fut: impl std::future::Future<Output = ()>,
) -> f64 {
    let start = Instant::now();
    rt.block_on(fut);
    start.elapsed().as_nanos() as f64 / f64::from(n)
}

fn uncontended(rounds: usize, iters: u32) {
    let std_m = std::sync::Mutex::new(0u64);
    let pl_m = parking_lot::Mutex::new(0u64);
    let lm_m = lockmeter::sync::Mutex::named("bench-mutex", 0u64);
    let pl_rw = parking_lot::RwLock::new(0u64);
    let lm_rw = lockmeter::sync::RwLock::named("bench-rwlock", 0u64);
    let tk_m = tokio::sync::Mutex::new(0u64);
    let lmt_m = lockmeter::tokio::Mutex::named("bench-tokio-mutex", 0u64);
    let tk_rw = tokio::sync::RwLock::new(0u64);
    let lmt_rw = lockmeter::tokio::RwLock::named("bench-tokio-rwlock", 0u64);
    let meter = lockmeter::LockMeter::new("bench-meter", "parking_lot_mutex");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();

    let names = [
        ("sync::Mutex", "parking_lot::Mutex"),
        ("sync::RwLock read", "parking_lot::RwLock read"),
        ("sync::RwLock write", "parking_lot::RwLock write"),
        ("tokio::Mutex", "tokio::sync::Mutex"),
        ("tokio::RwLock read", "tokio::sync::RwLock read"),
        ("tokio::RwLock write", "tokio::sync::RwLock write"),
        ("LockMeter around parking_lot", "parking_lot::Mutex"),
    ];
    let mut pairs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); names.len()];
    let mut std_ns = Vec::new();
    let tokio_iters = iters / 4;
    for _ in 0..rounds {
        std_ns.push(ns_per_op(iters, || *black_box(&std_m).lock().unwrap() += 1));
        let pl = ns_per_op(iters, || *black_box(&pl_m).lock() += 1);
        pairs[0].push((
            pl,
            ns_per_op(iters, || *black_box(&lm_m).lock().unwrap() += 1),
        ));
        pairs[1].push((
            ns_per_op(iters, || {
                black_box(*black_box(&pl_rw).read());
            }),
            ns_per_op(iters, || {
                black_box(*black_box(&lm_rw).read().unwrap());
            }),
        ));
        pairs[2].push((
            ns_per_op(iters, || *black_box(&pl_rw).write() += 1),
            ns_per_op(iters, || *black_box(&lm_rw).write().unwrap() += 1),
        ));
        pairs[3].push((
            block_ns(&rt, tokio_iters, async {
                for _ in 0..tokio_iters {
                    *black_box(&tk_m).lock().await += 1;
                }
            }),
            block_ns(&rt, tokio_iters, async {
                for _ in 0..tokio_iters {
                    *black_box(&lmt_m).lock().await += 1;
                }
            }),
        ));
        pairs[4].push((
            block_ns(&rt, tokio_iters, async {
                for _ in 0..tokio_iters {
                    black_box(*black_box(&tk_rw).read().await);
                }
            }),
            block_ns(&rt, tokio_iters, async {
                for _ in 0..tokio_iters {
                    black_box(*black_box(&lmt_rw).read().await);
                }
            }),
        ));
        pairs[5].push((
            block_ns(&rt, tokio_iters, async {
                for _ in 0..tokio_iters {
                    *black_box(&tk_rw).write().await += 1;
                }
            }),
            block_ns(&rt, tokio_iters, async {
                for _ in 0..tokio_iters {
                    *black_box(&lmt_rw).write().await += 1;
                }
            }),
        ));
        pairs[6].push((
            pl,
            ns_per_op(iters, || {
                **meter.lock(
                    LockMode::Exclusive,
                    || black_box(&pl_m).try_lock(),
                    || black_box(&pl_m).lock(),
                ) += 1;
            }),
        ));
    }
    println!(
        "uncontended lock + unlock, one thread, {rounds} interleaved rounds (std::sync::Mutex: {:.2} ns/op)",
        median(&mut std_ns)
    );
    for (i, (name, base)) in names.iter().enumerate() {
        // LockMeter times every attempt (no sampling): its cost is printed, with no target.
        let target = if i == 6 { f64::INFINITY } else { 1.10 };
        report(name, base, "ns/op", &pairs[i], target, false);
    }
}

fn contended(rounds: usize, per_thread: u32) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (threads, pin) in [(2usize, true), (4, false)] {
        if pin && cpus < 2 {
            println!("contended, 2 threads pinned: not run, fewer than 2 CPUs");
            continue;
        }
        let mut mutex = Vec::new();
        let mut write = Vec::new();
        for _ in 0..rounds {
            let pl = Arc::new(parking_lot::Mutex::new(0u64));
            let lm = Arc::new(lockmeter::sync::Mutex::named("bench-contended", 0u64));
            let a = throughput(&pl, |m| *m.lock() += 1, threads, pin, per_thread);
            let b = throughput(&lm, |m| *m.lock().unwrap() += 1, threads, pin, per_thread);
            assert_eq!(*lm.lock().unwrap(), threads as u64 * u64::from(per_thread));
            mutex.push((a / 1e6, b / 1e6));
            let pl = Arc::new(parking_lot::RwLock::new(0u64));
            let lm = Arc::new(lockmeter::sync::RwLock::named("bench-contended-rw", 0u64));
            let a = throughput(&pl, |m| *m.write() += 1, threads, pin, per_thread);
            let b = throughput(&lm, |m| *m.write().unwrap() += 1, threads, pin, per_thread);
            write.push((a / 1e6, b / 1e6));
        }
        let how = if pin {
            "pinned to CPUs 0 and 1"
        } else {
            "unpinned"
        };
        println!("contended, {threads} threads {how}, {rounds} interleaved rounds");
        report(
            "sync::Mutex",
            "parking_lot::Mutex",
            "Mops/s",
            &mutex,
            0.90,
            true,
        );
        report(
            "sync::RwLock write",
            "parking_lot::RwLock write",
            "Mops/s",
            &write,
            0.90,
            true,
        );
    }
}

fn tokio_contended(rounds: usize, per_task: u32) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    const TASKS: u32 = 8;
    let mut mutex = Vec::new();
    let mut write = Vec::new();
    for _ in 0..rounds {
        let run = |spawn: &dyn Fn() -> tokio::task::JoinHandle<()>| {
            let start = Instant::now();
            rt.block_on(async {
                let hs: Vec<_> = (0..TASKS).map(|_| spawn()).collect();
                for h in hs {
                    h.await.unwrap();
                }
            });
            f64::from(TASKS * per_task) / start.elapsed().as_secs_f64() / 1e6
        };
        let tk = Arc::new(tokio::sync::Mutex::new(0u64));
        let a = run(&|| {
            let m = Arc::clone(&tk);
            rt.spawn(async move {
                for _ in 0..per_task {
                    *m.lock().await += 1;
                }
            })
        });
        let lm = Arc::new(lockmeter::tokio::Mutex::named(
            "bench-tokio-contended",
            0u64,
        ));
        let b = run(&|| {
            let m = Arc::clone(&lm);
            rt.spawn(async move {
                for _ in 0..per_task {
                    *m.lock().await += 1;
                }
            })
        });
        mutex.push((a, b));
        let tk = Arc::new(tokio::sync::RwLock::new(0u64));
        let a = run(&|| {
            let m = Arc::clone(&tk);
            rt.spawn(async move {
                for _ in 0..per_task {
                    *m.write().await += 1;
                }
            })
        });
        let lm = Arc::new(lockmeter::tokio::RwLock::named(
            "bench-tokio-contended-rw",
            0u64,
        ));
        let b = run(&|| {
            let m = Arc::clone(&lm);
            rt.spawn(async move {
                for _ in 0..per_task {
                    *m.write().await += 1;
                }
            })
        });
        write.push((a, b));
    }
    println!("tokio, contended: {TASKS} tasks on a 2-worker multi-thread runtime, {rounds} interleaved rounds");
    report(
        "tokio::Mutex",
        "tokio::sync::Mutex",
        "Mops/s",
        &mutex,
        0.90,
        true,
    );
    report(
        "tokio::RwLock write",
        "tokio::sync::RwLock write",
        "Mops/s",
        &write,
        0.90,
        true,
    );
}
