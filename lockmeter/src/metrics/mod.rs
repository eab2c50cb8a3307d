//! The metric schema and where lockmeter's measurements go.
//!
//! - [`names`], [`keys`], the value enums and [`DEFAULT_BOUNDARIES`]: the schema, a contract
//!   with the dashboards and alert rules in the repository.
//! - [`Sink`]: the meter provider locks record into (the global one by default).
//!
//! How a lock records (the same for every kind): counts of acquisitions, conflicts and
//! releases are kept in per-lock, per-thread atomics and read by the SDK when it collects,
//! through observable instruments; so a Prometheus scrape, a periodic OTLP export,
//! `force_flush` or a shutdown right after an acquisition always sees it. Wait and hold times
//! are recorded into histograms bound to the lock's attributes, for a sample of acquisitions
//! (`sample_every` on each builder) plus the first acquisition after each collection. Errors,
//! migrations, violations and lost holds are counted as they happen.

mod recorder;
mod schema;
mod series;
pub(crate) mod shard;
mod sink;

#[cfg(feature = "tokio")]
pub(crate) use recorder::WaitStart;
pub(crate) use recorder::{Recorder, Spec, Word};
pub use schema::{
    instruments, keys, names, DetectedAt, InstrumentSpec, LostReason, MigrationKind, Outcome,
    DEFAULT_BOUNDARIES, SCOPE,
};
pub(crate) use series::record_pending_everywhere;
pub use series::SERIES_LIMIT;
#[cfg(feature = "telemetry")]
pub(crate) use sink::global_has_counts;
pub use sink::Sink;

pub use crate::kind::LockMode;

/// Default timing sample of file locks: 1 in this many acquisitions (plus the first after each
/// metrics collection) records wait and hold times; counts are always exact. In-process locks
/// default to [`crate::sync::DEFAULT_SAMPLE_EVERY`] (64).
pub const DEFAULT_SAMPLE_EVERY: u32 = 16;

/// Picks up the global meter provider now.
///
/// Locks that record into the global provider ([`Sink::global`], the default) notice a
/// provider installed after they were created at their next timed acquisition. Call this
/// right after `opentelemetry::global::set_meter_provider` to make the counts of every
/// existing lock visible to the new provider at once (`lockmeter::telemetry::init` does).
pub fn refresh() {
    sink::global_instruments();
}
