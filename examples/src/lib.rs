//! Code shared by lockmeter's examples and their tests.
#![deny(missing_docs)]

pub mod redis_lock;

/// Prints the `lock_acquisitions_total` and `lock_conflicts_total` lines that Prometheus would
/// scrape from `telemetry`'s `/metrics` now.
pub fn print_lock_counts(
    telemetry: &lockmeter::telemetry::Telemetry,
) -> Result<(), Box<dyn std::error::Error>> {
    use prometheus::Encoder as _;
    telemetry.flush()?;
    let Some(registry) = telemetry.prometheus_registry() else {
        return Ok(());
    };
    let mut out = Vec::new();
    prometheus::TextEncoder::new().encode(&registry.gather(), &mut out)?;
    for line in String::from_utf8(out)?.lines() {
        if line.starts_with("lock_acquisitions_total") || line.starts_with("lock_conflicts_total") {
            println!("{line}");
        }
    }
    Ok(())
}
