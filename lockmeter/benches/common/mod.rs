//! Timing helpers shared by the bench binaries.
#![allow(dead_code)]

/// ns per iteration of `$body` over `$iters` iterations, the body written out inside the timing
/// loop: no closure call the optimiser may or may not inline (which changed results by 2x
/// here), so every variant is measured the same way.
macro_rules! ns_per_op {
    ($iters:expr, $body:expr) => {{
        let start = std::time::Instant::now();
        for _ in 0..$iters {
            $body;
        }
        start.elapsed().as_nanos() as f64 / f64::from($iters)
    }};
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
