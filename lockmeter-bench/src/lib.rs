//! Overhead as users' code sees it.
//!
//! This crate depends on `lockmeter` the way an application does and times lock calls written
//! as users write them: `let g = lock.lock().unwrap(); drop(g);` inside an ordinary closure,
//! handed to a generic timing function the compiler is free to inline or not, against the raw
//! system calls in the same closure shape. Figures vary from one launch of a binary to the
//! next (code placement, the host's return-stack mitigations), so the bench launches itself
//! several times and reports the spread: median and worst launch, never the best run.
//!
//! Two configurations, in alternating launches:
//!
//! - `bare`: a real SDK meter provider installed globally (periodic reader, in-memory
//!   exporter), no `tracing` subscriber;
//! - `production`: the same plus a global `tracing_subscriber::fmt` subscriber at `INFO`
//!   writing to a sink, with a `tracing-opentelemetry` layer on an SDK tracer provider, as
//!   most services run.
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::time::Instant;

/// Nanoseconds per call of `f`, over `iters` calls. Generic: `f` is user code, inlined or not
/// as the compiler sees fit.
pub fn ns_per_op(iters: u32, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    black_box(start.elapsed().as_nanos() as f64 / f64::from(iters))
}

/// The median (sorts in place).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The host's speculative-execution mitigations that change what a system call and the
/// return after it cost (`/sys/devices/system/cpu/vulnerabilities`).
pub fn mitigations() -> Vec<(String, String)> {
    let dir = std::path::Path::new("/sys/devices/system/cpu/vulnerabilities");
    ["spec_rstack_overflow", "retbleed", "spectre_v2", "meltdown"]
        .iter()
        .map(|n| {
            let v = std::fs::read_to_string(dir.join(n))
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".to_owned());
            ((*n).to_owned(), v)
        })
        .collect()
}

/// The CPU model, from `/proc/cpuinfo`.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Installs a real SDK meter provider globally, as an application does (an in-memory exporter
/// read hourly: nothing but the SDK's own work during a run); returns it for `force_flush`.
pub fn install_global_sdk() -> opentelemetry_sdk::metrics::SdkMeterProvider {
    let exporter = opentelemetry_sdk::metrics::InMemoryMetricExporter::default();
    let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_reader(
            opentelemetry_sdk::metrics::PeriodicReader::builder(exporter)
                .with_interval(std::time::Duration::from_secs(3600))
                .build(),
        )
        .build();
    opentelemetry::global::set_meter_provider(provider.clone());
    provider
}
