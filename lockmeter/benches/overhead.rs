//! Uncontended lock + unlock: lockmeter against the raw system calls, measured in one run.
//!
//! `cargo bench -p lockmeter --bench overhead` prints ns/op (median of interleaved rounds, so
//! machine noise hits every variant alike) and the ratios the project targets:
//!
//! - `verify_inode(false)` ≤ 1.10 × raw `flock(LOCK_EX)` + `flock(LOCK_UN)` on a kept-open fd;
//! - default (verify on)  ≤ 1.10 × (raw + one `stat(path)`).
//!
//! A real SDK `MeterProvider` (periodic reader, in-memory exporter) records what lockmeter
//! records: exact counts, and wait/hold times for 1 in 16 acquisitions (the default
//! `sample_every`); `every one timed` shows the cost of `sample_every(1)`.
//!
//! `raw flock, called` is the same two system calls, each behind a non-inlined function: on
//! hosts with return-stack-overflow mitigations (AMD SRSO "Safe RET", as on the reference VM)
//! the first return after a system call into a frame entered before it costs ~130 ns, so a
//! call boundary around a system call costs more than all of lockmeter's instrumentation.
//! lockmeter's fast paths are inlined into the caller for that reason.
#![allow(clippy::unwrap_used, missing_docs)]

#[macro_use]
mod common;

use std::hint::black_box;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use lockmeter::FileLock;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use rustix::fs::FlockOperation;

const ROUNDS: usize = 21;
const ITERS: u32 = 100_000;

/// ns per iteration (see `common::ns_per_op!`; the inlining it guarantees matters here far
/// more than usual, see `raw flock, called` below).
macro_rules! time {
    ($body:expr) => {
        ns_per_op!(ITERS, $body)
    };
}

/// `flock(2)` behind a function call, as C's `flock(3)` wrapper or any non-inlined helper does.
#[inline(never)]
fn called_flock(fd: std::os::fd::BorrowedFd<'_>, op: FlockOperation) {
    rustix::fs::flock(fd, op).unwrap();
}

use common::median;

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs it once quickly.
    let quick = common::quick();
    let rounds = if quick { 1 } else { ROUNDS };

    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_reader(
            PeriodicReader::builder(exporter)
                .with_interval(Duration::from_secs(3600))
                .build(),
        )
        .build();
    let meter = provider.meter("lockmeter");
    let sink = lockmeter::metrics::Sink::new(meter.clone());

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
        .sink(sink.clone())
        .verify_inode(false)
        .open()
        .unwrap();
    let verify = FileLock::builder(&path).sink(sink.clone()).open().unwrap();
    let exact = FileLock::builder(&path)
        .sink(sink.clone())
        .verify_inode(false)
        .sample_every(1)
        .open()
        .unwrap();
    let noop = FileLock::builder(&path)
        .sink(lockmeter::metrics::Sink::new(
            opentelemetry::metrics::NoopMeterProvider::new().meter("lockmeter"),
        ))
        .verify_inode(false)
        .open()
        .unwrap();

    let names = [
        "raw flock EX+UN (kept-open fd)",
        "raw flock EX+UN + stat(path)",
        "lockmeter verify_inode(false)",
        "lockmeter default (verify on)",
        "lockmeter verify off, no-op meter",
        "lockmeter verify off, every one timed",
        "raw flock, called (not inlined)",
        "component: std Instant::now()",
        "component: TSC clock read (quanta)",
        "component: bound histogram record",
        "component: bound counter add",
    ];
    let h = opentelemetry::metrics::Meter::f64_histogram(&meter, "x.h")
        .build()
        .bind(&[opentelemetry::KeyValue::new("a", "b")]);
    let c = opentelemetry::metrics::Meter::u64_counter(&meter, "x.c")
        .build()
        .bind(&[opentelemetry::KeyValue::new("a", "b")]);

    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for _ in 0..rounds {
        samples[0].push(time!({
            rustix::fs::flock(raw, FlockOperation::NonBlockingLockExclusive).unwrap();
            rustix::fs::flock(raw, FlockOperation::Unlock).unwrap();
        }));
        samples[1].push(time!({
            rustix::fs::flock(raw, FlockOperation::NonBlockingLockExclusive).unwrap();
            black_box(rustix::fs::lstat(&path).unwrap());
            rustix::fs::flock(raw, FlockOperation::Unlock).unwrap();
        }));
        samples[2].push(time!(drop(black_box(noverify.lock().unwrap()))));
        samples[3].push(time!(drop(black_box(verify.lock().unwrap()))));
        samples[4].push(time!(drop(black_box(noop.lock().unwrap()))));
        samples[5].push(time!(drop(black_box(exact.lock().unwrap()))));
        samples[6].push(time!({
            called_flock(raw, FlockOperation::NonBlockingLockExclusive);
            called_flock(raw, FlockOperation::Unlock);
        }));
        samples[7].push(time!(black_box(Instant::now())));
        samples[8].push(time!(black_box(quanta::Instant::now())));
        samples[9].push(time!(h.record(black_box(0.000_3))));
        samples[10].push(time!(c.add(black_box(1))));
    }
    let m: Vec<f64> = samples.iter_mut().map(|s| median(s)).collect();
    println!("uncontended lock + unlock, median of {rounds} rounds x {ITERS} iterations");
    for (name, ns) in names.iter().zip(&m) {
        println!("  {name:<38} {ns:>8.1} ns/op");
    }
    println!(
        "  ratio verify off / raw            {:>8.3}  (target <= 1.10)",
        m[2] / m[0]
    );
    println!(
        "  ratio verify on / (raw + stat)    {:>8.3}  (target <= 1.10)",
        m[3] / m[1]
    );
    println!(
        "  ratio every one timed / raw       {:>8.3}  (sample_every(1))",
        m[5] / m[0]
    );
    // Sanity: the SDK really recorded (bound instruments enabled in the SDK).
    provider.force_flush().unwrap();
}
