//! The demo's summary table: per-lock totals and quantiles read from the same Prometheus
//! registry `/metrics` serves, printed as a table.

use std::collections::BTreeMap;

use lockmeter::telemetry::Telemetry;

/// Per-lock totals read from the Prometheus registry.
#[derive(Clone, Default)]
pub(super) struct LockSummary {
    acquisitions: f64,
    conflicts: f64,
    migrations: f64,
    /// Cumulative bucket counts by upper bound, summed over series.
    wait: Vec<(f64, f64)>,
    hold: Vec<(f64, f64)>,
}

#[derive(Default)]
pub(super) struct Snapshot(BTreeMap<String, LockSummary>);

impl Snapshot {
    pub(super) fn take(t: &Telemetry) -> Snapshot {
        let mut s = Snapshot::default();
        let Some(reg) = t.prometheus_registry() else {
            return s;
        };
        for mf in reg.gather() {
            let name = mf.name();
            for m in mf.get_metric() {
                let Some(lock) = m
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "lock_name")
                    .map(|l| l.value().to_owned())
                else {
                    continue;
                };
                let e = s.0.entry(lock).or_default();
                match name {
                    "lock_acquisitions_total" => e.acquisitions += m.get_counter().get_value(),
                    "lock_conflicts_total" => e.conflicts += m.get_counter().get_value(),
                    "lock_inode_migrations_total" => e.migrations += m.get_counter().get_value(),
                    "lock_wait_duration_seconds" => add_buckets(&mut e.wait, m),
                    "lock_duration_seconds" => add_buckets(&mut e.hold, m),
                    _ => {}
                }
            }
        }
        s
    }

    pub(super) fn minus(&self, before: &Snapshot) -> Snapshot {
        let mut out = Snapshot::default();
        for (k, now) in &self.0 {
            let b = before.0.get(k).cloned().unwrap_or_default();
            let sub = |a: &[(f64, f64)], b: &[(f64, f64)]| -> Vec<(f64, f64)> {
                a.iter()
                    .map(|&(le, c)| {
                        let prev = b.iter().find(|x| x.0 == le).map_or(0.0, |x| x.1);
                        (le, c - prev)
                    })
                    .collect()
            };
            out.0.insert(
                k.clone(),
                LockSummary {
                    acquisitions: now.acquisitions - b.acquisitions,
                    conflicts: now.conflicts - b.conflicts,
                    migrations: now.migrations - b.migrations,
                    wait: sub(&now.wait, &b.wait),
                    hold: sub(&now.hold, &b.hold),
                },
            );
        }
        out
    }
}

fn add_buckets(into: &mut Vec<(f64, f64)>, m: &prometheus::proto::Metric) {
    let h = m.get_histogram();
    // The +Inf bucket is implicit in the exposition model: it is the sample count.
    let inf = (f64::INFINITY, h.get_sample_count());
    let finite = h
        .get_bucket()
        .iter()
        .map(|b| (b.upper_bound(), b.cumulative_count()));
    for (le, c) in finite.chain(std::iter::once(inf)) {
        let c = c as f64;
        match into.iter_mut().find(|x| x.0 == le) {
            Some(x) => x.1 += c,
            None => into.push((le, c)),
        }
    }
    into.sort_by(|a, b| a.0.total_cmp(&b.0));
}

/// `histogram_quantile` as Prometheus computes it: linear interpolation inside the bucket.
fn quantile(q: f64, buckets: &[(f64, f64)], total: f64) -> Option<f64> {
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev_le = 0.0;
    let mut prev_c = 0.0;
    for &(le, c) in buckets {
        if c >= rank {
            if le.is_infinite() {
                // In the +Inf bucket: report the highest finite bound, as Prometheus does.
                return Some(prev_le);
            }
            if c == prev_c {
                return Some(le);
            }
            return Some(prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c));
        }
        prev_le = le;
        prev_c = c;
    }
    Some(prev_le)
}

fn fmt_secs(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        // Inside the lowest bucket (0 to 1 µs), where interpolation says nothing.
        Some(s) if s < 1e-6 => "<1µs".into(),
        Some(s) if s < 1e-3 => format!("{:.0}µs", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.1}ms", s * 1e3),
        Some(s) => format!("{s:.2}s"),
    }
}

pub(super) fn print_table(title: &str, snap: &Snapshot, secs: f64) {
    let secs = secs.max(1e-9);
    println!();
    println!("── lockmeter demo: {title} ──");
    println!(
        "{:<10} {:>9} {:>11} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "lock",
        "acq/s",
        "conflicts/s",
        "wait p50",
        "wait p99",
        "hold p50",
        "hold p99",
        "migrations"
    );
    for (name, s) in &snap.0 {
        let wait_n = s.wait.last().map_or(0.0, |x| x.1);
        let hold_n = s.hold.last().map_or(0.0, |x| x.1);
        println!(
            "{:<10} {:>9.1} {:>11.1} {:>9} {:>9} {:>9} {:>9} {:>10.0}",
            name,
            s.acquisitions / secs,
            s.conflicts / secs,
            fmt_secs(quantile(0.5, &s.wait, wait_n)),
            fmt_secs(quantile(0.99, &s.wait, wait_n)),
            fmt_secs(quantile(0.5, &s.hold, hold_n)),
            fmt_secs(quantile(0.99, &s.hold, hold_n)),
            s.migrations,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::fmt_secs;

    /// A quantile inside the lowest bucket (1 µs) reads as below it, not as `0µs`.
    #[test]
    fn quantiles_below_the_lowest_bucket_read_as_under_a_microsecond() {
        assert_eq!(fmt_secs(Some(4e-7)), "<1µs");
        assert_eq!(fmt_secs(Some(3e-6)), "3µs");
        assert_eq!(fmt_secs(Some(0.0125)), "12.5ms");
        assert_eq!(fmt_secs(None), "-");
    }
}
