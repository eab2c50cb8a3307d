//! `cargo bench -p lockmeter-bench --bench user`: lockmeter's overhead in plain user code, over
//! several launches of this binary, bare and with a production `tracing` set-up.
//!
//! The parent launches itself `LAUNCHES` times per configuration (default 8), alternating
//! `bare` and `production`; each launch runs interleaved rounds and prints its medians and
//! per-round-median ratios; the parent prints every launch, then the median and the worst
//! launch of each ratio. Targets: `FileLock` lock+unlock ≤ 1.10× raw `flock` (verify off) and
//! ≤ 1.10× raw + `stat` (default) in the median launch, ≤ 1.20× in the worst, in both
//! configurations; `sync::Mutex` ≤ 3× `std::sync::Mutex`. `sync::Mutex` and `sync::RwLock`
//! against parking_lot's locks are printed for #17's 1.10× (not a target of this bench).
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::process::Command;

use lockmeter::FileLock;
use lockmeter_bench::{cpu_model, install_global_sdk, median, mitigations, ns_per_op};
use rustix::fs::FlockOperation;

const CHILD: &str = "LOCKMETER_BENCH_CHILD";

/// The variants, in the order they are timed in each round.
const VARIANTS: [&str; 11] = [
    "raw flock EX+UN",
    "raw flock EX+UN + lstat",
    "FileLock verify_inode(false)",
    "FileLock default (verify)",
    "std::sync::Mutex",
    "parking_lot::Mutex",
    "lockmeter::sync::Mutex",
    "parking_lot::RwLock read",
    "lockmeter::sync::RwLock read",
    "parking_lot::RwLock write",
    "lockmeter::sync::RwLock write",
];

/// Ratios reported: (name, numerator variant, denominator variant, target median, target worst).
const RATIOS: [(&str, usize, usize, f64, f64); 6] = [
    ("FileLock verify off / raw flock", 2, 0, 1.10, 1.20),
    ("FileLock default / (raw + lstat)", 3, 1, 1.10, 1.20),
    ("sync::Mutex / std::sync::Mutex", 6, 4, 3.0, 3.0),
    ("sync::Mutex / parking_lot::Mutex", 6, 5, f64::NAN, f64::NAN),
    ("sync::RwLock read / parking_lot", 8, 7, f64::NAN, f64::NAN),
    (
        "sync::RwLock write / parking_lot",
        10,
        9,
        f64::NAN,
        f64::NAN,
    ),
];

fn main() {
    match std::env::var(CHILD) {
        Ok(config) => child(&config),
        Err(_) => parent(),
    }
}

fn quick() -> bool {
    std::env::args().any(|a| a == "--test") || std::env::var_os("QUICK").is_some()
}

fn parent() {
    let launches: usize = std::env::var("LAUNCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick() { 1 } else { 8 });
    println!("host: {}", cpu_model());
    for (k, v) in mitigations() {
        println!("  {k}: {v}");
    }
    let exe = std::env::current_exe().unwrap();
    let mut results: BTreeMap<&str, Vec<Vec<f64>>> = BTreeMap::new();
    for i in 0..launches * 2 {
        let config = if i % 2 == 0 { "bare" } else { "production" };
        let out = Command::new(&exe)
            .env(CHILD, config)
            .envs(quick().then_some(("QUICK", "1")))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "launch failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("ratios "))
            .unwrap_or_else(|| panic!("no ratios line in {text}"));
        let ratios: Vec<f64> = line
            .split_whitespace()
            .map(|r| r.parse().unwrap())
            .collect();
        let ns = text
            .lines()
            .find_map(|l| l.strip_prefix("ns "))
            .unwrap_or("");
        println!(
            "launch {:>2} {config:<10} ratios {}   ns/op {ns}",
            i / 2 + 1,
            ratios
                .iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        results.entry(config).or_default().push(ratios);
    }
    println!();
    println!("variants: {}", VARIANTS.join(" | "));
    for (config, launches) in &results {
        println!(
            "{config}: median and worst launch of {} (per launch: median of per-round ratios)",
            launches.len()
        );
        for (r, (name, _, _, target_median, target_worst)) in RATIOS.iter().enumerate() {
            let mut v: Vec<f64> = launches.iter().map(|l| l[r]).collect();
            let worst = v.iter().copied().fold(f64::MIN, f64::max);
            let best = v.iter().copied().fold(f64::MAX, f64::min);
            let med = median(&mut v);
            let target = if target_median.is_nan() {
                "(no target)".to_owned()
            } else {
                format!(
                    "target median <= {target_median:.2} {}, worst <= {target_worst:.2} {}",
                    if med <= *target_median {
                        "met"
                    } else {
                        "MISSED"
                    },
                    if worst <= *target_worst {
                        "met"
                    } else {
                        "MISSED"
                    }
                )
            };
            println!("  {name:<34} median {med:.3}  worst {worst:.3}  best {best:.3}  {target}");
        }
    }
}

fn child(config: &str) {
    let quick = quick();
    let (rounds, iters) = if quick { (1, 2_000) } else { (11, 50_000) };

    // A real SDK, as an application installs it.
    let provider = install_global_sdk();
    let _tracer_provider = (config == "production").then(install_production_subscriber);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.lock");
    let raw_file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .unwrap();
    let raw = raw_file.as_fd();
    let noverify = FileLock::builder(&path)
        .name("bench")
        .verify_inode(false)
        .open()
        .unwrap();
    let verify = FileLock::builder(&path).name("bench").open().unwrap();
    let std_m = std::sync::Mutex::new(0u64);
    let pl_m = parking_lot::Mutex::new(0u64);
    let lm_m = lockmeter::sync::Mutex::named("bench", 0u64);
    let pl_rw = parking_lot::RwLock::new(0u64);
    let lm_rw = lockmeter::sync::RwLock::named("bench-rw", 0u64);

    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); RATIOS.len()];
    for _ in 0..rounds {
        let round = [
            ns_per_op(iters, || {
                rustix::fs::flock(raw, FlockOperation::LockExclusive).unwrap();
                rustix::fs::flock(raw, FlockOperation::Unlock).unwrap();
            }),
            ns_per_op(iters, || {
                rustix::fs::flock(raw, FlockOperation::LockExclusive).unwrap();
                std::hint::black_box(rustix::fs::lstat(&path).unwrap());
                rustix::fs::flock(raw, FlockOperation::Unlock).unwrap();
            }),
            ns_per_op(iters, || {
                let g = noverify.lock().unwrap();
                drop(g);
            }),
            ns_per_op(iters, || {
                let g = verify.lock().unwrap();
                drop(g);
            }),
            ns_per_op(iters * 20, || {
                *std_m.lock().unwrap() += 1;
            }),
            ns_per_op(iters * 20, || {
                *pl_m.lock() += 1;
            }),
            ns_per_op(iters * 20, || {
                *lm_m.lock().unwrap() += 1;
            }),
            ns_per_op(iters * 20, || {
                std::hint::black_box(*pl_rw.read());
            }),
            ns_per_op(iters * 20, || {
                std::hint::black_box(*lm_rw.read().unwrap());
            }),
            ns_per_op(iters * 20, || {
                *pl_rw.write() += 1;
            }),
            ns_per_op(iters * 20, || {
                *lm_rw.write().unwrap() += 1;
            }),
        ];
        for (v, x) in ns.iter_mut().zip(round) {
            v.push(x);
        }
        for (r, (_, num, den, _, _)) in RATIOS.iter().enumerate() {
            ratios[r].push(round[*num] / round[*den]);
        }
    }
    provider.force_flush().unwrap();
    println!(
        "ns {}",
        ns.iter_mut()
            .map(|v| format!("{:.1}", median(v)))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "ratios {}",
        ratios
            .iter_mut()
            .map(|v| format!("{:.4}", median(v)))
            .collect::<Vec<_>>()
            .join(" ")
    );
}

/// A service's usual set-up: `fmt` at INFO (to a sink here) and OpenTelemetry traces.
fn install_production_subscriber() -> opentelemetry_sdk::trace::SdkTracerProvider {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let tracer_provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_simple_exporter(opentelemetry_sdk::trace::InMemorySpanExporter::default())
        .build();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::sink)
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer_provider.tracer("bench"))
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    tracing_subscriber::registry().with(fmt).with(otel).init();
    tracer_provider
}
