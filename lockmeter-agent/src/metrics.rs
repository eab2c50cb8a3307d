//! The agent's instruments, in lockmeter's schema (scope `lockmeter`).
//!
//! | instrument | source | attributes |
//! |---|---|---|
//! | `lock.held` (observable up-down counter) | sampling | `lock.name`, `lock.kind`, `lock.mode`, `fs.type`, `process.executable.name` |
//! | `lock.waiters` (observable gauge) | sampling | the same, with the waiter's mode and name |
//! | `lock.hold.age` (observable gauge, s) | sampling | as `lock.held`: the oldest hold's age |
//! | `lock.untrusted` (observable gauge) | sampling | `lock.name`, `lock.kind`, `fs.type`, `fs.coherence` |
//! | `lock.duration` (histogram, s) | tracepoints (exact) or sampling (interval resolution) | `lock.name`, `lock.kind`, `lock.mode`, `lock.contended`, `fs.type`, `process.executable.name` |
//! | `lock.wait.duration` (histogram, s) | tracepoints | `lock.name`, `lock.kind`, `lock.mode`, `lock.outcome`, `fs.type`, `process.executable.name` |
//! | `lock.acquisitions`, `lock.conflicts` | tracepoints | as in the schema, plus `fs.type`, `process.executable.name` |
//! | `lock.errors` | tracepoints | `lock.name`, `lock.kind`, `lock.operation`, `error.type`, ... |
//! | `lock.inode.migrations` | sampling | `lock.name`, `lock.kind`, `migration.kind`, `migration.detected_at="agent"`, `fs.type` |
//!
//! Observable series exist while their locks do: a released lock's series disappears at the
//! next collection (the SDK drops series a callback no longer reports).

use std::sync::{Arc, Mutex, PoisonError};

use lockmeter::metrics::{instruments, keys, names, DetectedAt, DEFAULT_BOUNDARIES};
use opentelemetry::metrics::{Counter, Histogram, Meter};
use opentelemetry::KeyValue;

use crate::model::{Gauges, HoldAttrs, Update};

/// `lock.hold.age`: age of the oldest hold (agent only).
pub const HOLD_AGE: &str = "lock.hold.age";
/// `lock.untrusted`: 1 per lock file on a file system whose locks may not exclude (agent only).
pub const UNTRUSTED: &str = "lock.untrusted";
/// `fs.coherence` on `lock.untrusted`: `local-only` or `unknown`.
pub const FS_COHERENCE: &str = "fs.coherence";

/// Attribute list for a hold or a waiter.
pub fn hold_kvs(a: &HoldAttrs) -> Vec<KeyValue> {
    vec![
        KeyValue::new(keys::LOCK_NAME, a.name.clone()),
        KeyValue::new(keys::LOCK_KIND, a.kind.as_str()),
        KeyValue::new(keys::LOCK_MODE, a.mode.as_str()),
        KeyValue::new(keys::FS_TYPE, a.fs_type.clone()),
        KeyValue::new(keys::PROCESS_EXECUTABLE_NAME, a.exe.clone()),
    ]
}

/// The agent's instruments on one meter.
pub struct AgentMetrics {
    pub(crate) duration: Histogram<f64>,
    pub(crate) wait: Histogram<f64>,
    pub(crate) acquisitions: Counter<u64>,
    pub(crate) conflicts: Counter<u64>,
    pub(crate) errors: Counter<u64>,
    migrations: Counter<u64>,
    gauges: Arc<Mutex<Vec<Series>>>,
    _observables: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").finish_non_exhaustive()
    }
}

/// Prebuilt attribute lists for the observable callbacks (built once per snapshot, read at
/// every collection).
#[derive(Default)]
struct Series {
    held: Vec<(Vec<KeyValue>, i64)>,
    waiters: Vec<(Vec<KeyValue>, i64)>,
    age: Vec<(Vec<KeyValue>, f64)>,
    untrusted: Vec<Vec<KeyValue>>,
}

impl AgentMetrics {
    /// Creates the instruments on `meter` (use the `lockmeter` scope, as
    /// `lockmeter::telemetry::Telemetry::meter` gives it).
    pub fn new(meter: &Meter) -> AgentMetrics {
        let gauges: Arc<Mutex<Vec<Series>>> = Arc::new(Mutex::new(vec![Series::default()]));
        let read = |g: &Arc<Mutex<Vec<Series>>>, f: &mut dyn FnMut(&Series)| {
            let guard = g.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(s) = guard.first() {
                f(s)
            }
        };
        let g = gauges.clone();
        let held = meter
            .i64_observable_up_down_counter(names::HELD)
            .with_unit(instruments::HELD.unit)
            .with_description(instruments::HELD.description)
            .with_callback(move |o| {
                read(&g, &mut |s| {
                    for (a, v) in &s.held {
                        o.observe(*v, a)
                    }
                })
            })
            .build();
        let g = gauges.clone();
        let waiters = meter
            .i64_observable_gauge(names::WAITERS)
            .with_unit(instruments::WAITERS.unit)
            .with_description(instruments::WAITERS.description)
            .with_callback(move |o| {
                read(&g, &mut |s| {
                    for (a, v) in &s.waiters {
                        o.observe(*v, a)
                    }
                })
            })
            .build();
        let g = gauges.clone();
        let age = meter
            .f64_observable_gauge(HOLD_AGE)
            .with_unit("s")
            .with_description(
                "Age of the oldest hold, counted from the first sample that saw it (a lower bound; resolution: the sampling interval).",
            )
            .with_callback(move |o| {
                read(&g, &mut |s| {
                    for (a, v) in &s.age {
                        o.observe(*v, a)
                    }
                })
            })
            .build();
        let g = gauges.clone();
        let untrusted = meter
            .i64_observable_gauge(UNTRUSTED)
            .with_unit("{lock}")
            .with_description(
                "1 for each lock file on a file system whose locks may not exclude other clients or mounts (lockmeter probe would say local-only or unknown).",
            )
            .with_callback(move |o| {
                read(&g, &mut |s| {
                    for a in &s.untrusted {
                        o.observe(1, a)
                    }
                })
            })
            .build();
        AgentMetrics {
            duration: meter
                .f64_histogram(names::DURATION)
                .with_unit(instruments::DURATION.unit)
                .with_description(instruments::DURATION.description)
                .with_boundaries(DEFAULT_BOUNDARIES.to_vec())
                .build(),
            wait: meter
                .f64_histogram(names::WAIT_DURATION)
                .with_unit(instruments::WAIT_DURATION.unit)
                .with_description(instruments::WAIT_DURATION.description)
                .with_boundaries(DEFAULT_BOUNDARIES.to_vec())
                .build(),
            acquisitions: meter
                .u64_counter(names::ACQUISITIONS)
                .with_unit(instruments::ACQUISITIONS.unit)
                .with_description(instruments::ACQUISITIONS.description)
                .build(),
            conflicts: meter
                .u64_counter(names::CONFLICTS)
                .with_unit(instruments::CONFLICTS.unit)
                .with_description(instruments::CONFLICTS.description)
                .build(),
            errors: meter
                .u64_counter(names::ERRORS)
                .with_unit(instruments::ERRORS.unit)
                .with_description(instruments::ERRORS.description)
                .build(),
            migrations: meter
                .u64_counter(names::INODE_MIGRATIONS)
                .with_unit(instruments::INODE_MIGRATIONS.unit)
                .with_description(instruments::INODE_MIGRATIONS.description)
                .build(),
            gauges,
            _observables: vec![
                Box::new(held),
                Box::new(waiters),
                Box::new(age),
                Box::new(untrusted),
            ],
        }
    }

    /// Publishes a snapshot's gauges and records what ended or changed. `record_holds`: record
    /// sampled hold times into `lock.duration` (off when the tracepoint source records exact
    /// ones).
    pub fn apply(&self, up: &Update, record_holds: bool) {
        self.publish(&up.gauges);
        if record_holds {
            for h in &up.ended {
                let mut kv = hold_kvs(&h.attrs);
                kv.push(KeyValue::new(keys::LOCK_CONTENDED, h.contended));
                self.duration.record(h.seconds, &kv);
            }
        }
        for m in &up.migrations {
            self.migrations.add(
                1,
                &[
                    KeyValue::new(keys::LOCK_NAME, m.attrs.name.clone()),
                    KeyValue::new(keys::LOCK_KIND, m.attrs.kind.as_str()),
                    KeyValue::new(keys::MIGRATION_KIND, m.kind.as_str()),
                    KeyValue::new(keys::MIGRATION_DETECTED_AT, DetectedAt::Agent.as_str()),
                    KeyValue::new(keys::FS_TYPE, m.attrs.fs_type.clone()),
                ],
            );
        }
    }

    fn publish(&self, g: &Gauges) {
        let s = Series {
            held: g.held.iter().map(|(a, v)| (hold_kvs(a), *v)).collect(),
            waiters: g.waiters.iter().map(|(a, v)| (hold_kvs(a), *v)).collect(),
            age: g.age.iter().map(|(a, v)| (hold_kvs(a), *v)).collect(),
            untrusted: g
                .untrusted
                .iter()
                .map(|(name, kind, fs, coh)| {
                    vec![
                        KeyValue::new(keys::LOCK_NAME, name.clone()),
                        KeyValue::new(keys::LOCK_KIND, kind.as_str()),
                        KeyValue::new(keys::FS_TYPE, fs.clone()),
                        KeyValue::new(FS_COHERENCE, coh.as_str()),
                    ]
                })
                .collect(),
        };
        let mut guard = self.gauges.lock().unwrap_or_else(PoisonError::into_inner);
        *guard = vec![s];
    }
}
