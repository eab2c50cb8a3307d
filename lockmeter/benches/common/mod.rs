//! Timing helpers shared by the bench binaries.
#![allow(dead_code)]

use std::time::Instant;

/// Average ns per call of `f` over `iters` calls.
pub fn ns_per_op(iters: u32, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    start.elapsed().as_nanos() as f64 / iters as f64
}

/// The median (sorts in place).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Whether to run one quick round (`cargo test --benches`, or QUICK set).
pub fn quick() -> bool {
    std::env::args().any(|a| a == "--test") || std::env::var_os("QUICK").is_some()
}
