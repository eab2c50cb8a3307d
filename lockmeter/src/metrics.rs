//! The metric schema (see `DESIGN.md`): instrument names, units, attribute keys and values,
//! histogram boundaries, and the per-lock set of pre-bound instruments.
//!
//! Everything a lock records on its hot path goes through handles bound once, when the lock
//! is created ([`LockMetrics::new`]); cold paths (errors, migrations, violations) build their
//! attribute lists when they happen.

use opentelemetry::metrics::{BoundCounter, BoundHistogram, BoundUpDownCounter, Counter, Meter};
use std::sync::OnceLock;

use crate::clock::{HoldStart, Ticks};
use opentelemetry::KeyValue;

/// Instrumentation scope name of every lockmeter instrument.
pub const SCOPE: &str = "lockmeter";

/// Instrument names, as exported over OTLP. Prometheus names are derived by the exporter
/// (`lock.duration` with unit `s` becomes `lock_duration_seconds`, counters gain `_total`).
pub mod names {
    /// Hold time histogram (seconds): from acquired to released.
    pub const DURATION: &str = "lock.duration";
    /// Wait time histogram (seconds): time spent in an acquire call, whatever its outcome.
    pub const WAIT_DURATION: &str = "lock.wait.duration";
    /// Successful acquisitions.
    pub const ACQUISITIONS: &str = "lock.acquisitions";
    /// Acquires that found the lock taken.
    pub const CONFLICTS: &str = "lock.conflicts";
    /// Failed lock operations.
    pub const ERRORS: &str = "lock.errors";
    /// Lock files found replaced, unlinked or moved to another device.
    pub const INODE_MIGRATIONS: &str = "lock.inode.migrations";
    /// Exclusion violations: someone else acquired a lock we held.
    pub const VIOLATIONS: &str = "lock.violations";
    /// Locks held now.
    pub const HELD: &str = "lock.held";
    /// Holds that ended without the holder releasing them (a distributed lock's lease expired,
    /// was revoked, its key was deleted or overwritten, its connection dropped).
    pub const LOST: &str = "lock.lost";
    /// Processes (or tasks) blocked on a lock right now.
    pub const WAITERS: &str = "lock.waiters";
}

/// Attribute keys.
pub mod keys {
    /// Stable lock name (defaults to the path as given).
    pub const LOCK_NAME: &str = "lock.name";
    /// `flock`, `ofd`, `posix`, `mutex`, ...
    pub const LOCK_KIND: &str = "lock.kind";
    /// `exclusive` or `shared`.
    pub const LOCK_MODE: &str = "lock.mode";
    /// `true` when the acquire found the lock taken.
    pub const LOCK_CONTENDED: &str = "lock.contended";
    /// Outcome of an acquire call.
    pub const LOCK_OUTCOME: &str = "lock.outcome";
    /// `open`, `lock`, `unlock` or `verify`.
    pub const LOCK_OPERATION: &str = "lock.operation";
    /// Errno name.
    pub const ERROR_TYPE: &str = "error.type";
    /// `replaced`, `unlinked` or `device_changed`.
    pub const MIGRATION_KIND: &str = "migration.kind";
    /// `acquire`, `hold` or `release`.
    pub const MIGRATION_DETECTED_AT: &str = "migration.detected_at";
    /// File-system type of a lock file (`ext4`, `tmpfs`, `nfs`, `fuse`, ...).
    pub const FS_TYPE: &str = "fs.type";
    /// Why a hold was lost: `expired`, `revoked`, `overwritten` or `connection`.
    pub const LOCK_LOST_REASON: &str = "lock.lost.reason";
    /// The holder's or waiter's command name (OpenTelemetry semantic convention); the host
    /// agent sets it. Pids never become attributes.
    pub const PROCESS_EXECUTABLE_NAME: &str = "process.executable.name";
}

/// Histogram boundaries in seconds, from 1 µs to 5 min. Set explicitly on `lock.duration` and
/// `lock.wait.duration` because the SDK defaults are meant for milliseconds. Override with an
/// SDK view (the `telemetry` builder has `histogram_boundaries`).
pub const DEFAULT_BOUNDARIES: &[f64] = &[
    1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

/// Lock mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LockMode {
    /// One holder at a time (`LOCK_EX`, `F_WRLCK`, a mutex, a write lock).
    Exclusive,
    /// Many holders at once, none exclusive (`LOCK_SH`, `F_RDLCK`, a read lock).
    Shared,
}

impl LockMode {
    /// The attribute value: `exclusive` or `shared`.
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Exclusive => "exclusive",
            LockMode::Shared => "shared",
        }
    }
    #[inline]
    pub(crate) fn idx(self) -> usize {
        self as usize
    }
}

/// Outcome of an acquire call (`lock.outcome` on `lock.wait.duration`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The lock was acquired.
    Acquired,
    /// A non-blocking attempt found the lock taken.
    WouldBlock,
    /// The deadline passed before the lock was free.
    Timeout,
    /// The caller gave up (an async acquire was dropped).
    Cancelled,
    /// The acquire failed with an error.
    Error,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::Acquired,
        Outcome::WouldBlock,
        Outcome::Timeout,
        Outcome::Cancelled,
        Outcome::Error,
    ];
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Acquired => "acquired",
            Outcome::WouldBlock => "would_block",
            Outcome::Timeout => "timeout",
            Outcome::Cancelled => "cancelled",
            Outcome::Error => "error",
        }
    }
}

/// How an inode migration showed itself (`migration.kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MigrationKind {
    /// The path now names another inode on the same device (renamed over, recreated).
    Replaced,
    /// The path no longer exists.
    Unlinked,
    /// The path now names a file on another device (remounted, another mount on top).
    DeviceChanged,
}

impl MigrationKind {
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationKind::Replaced => "replaced",
            MigrationKind::Unlinked => "unlinked",
            MigrationKind::DeviceChanged => "device_changed",
        }
    }
}

/// When an inode migration was noticed (`migration.detected_at`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DetectedAt {
    /// Right after acquiring (lock-then-verify).
    Acquire,
    /// While the lock was held.
    Hold,
    /// At release.
    Release,
    /// By the host agent, from outside the holding process.
    Agent,
}

impl DetectedAt {
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            DetectedAt::Acquire => "acquire",
            DetectedAt::Hold => "hold",
            DetectedAt::Release => "release",
            DetectedAt::Agent => "agent",
        }
    }
}

/// Why a hold ended without its holder releasing it (`lock.lost.reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LostReason {
    /// The lease or TTL ran out before it was renewed.
    Expired,
    /// The lease was revoked or the lock taken away by the service or an operator.
    Revoked,
    /// The lock's key was deleted or now holds another holder's token.
    Overwritten,
    /// The session or connection that held the lock was lost.
    Connection,
}

impl LostReason {
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            LostReason::Expired => "expired",
            LostReason::Revoked => "revoked",
            LostReason::Overwritten => "overwritten",
            LostReason::Connection => "connection",
        }
    }
}

/// The default meter: the global meter provider's `lockmeter` scope.
///
/// The global provider is read when a lock is created, so install telemetry first.
pub fn default_meter() -> Meter {
    opentelemetry::global::meter_provider().meter(SCOPE)
}

/// The schema's instruments, created on one meter. Creating them again on the same meter is
/// cheap (the SDK returns the same streams), but is only done when a lock is created.
#[derive(Clone, Debug)]
pub(crate) struct Instruments {
    duration: opentelemetry::metrics::Histogram<f64>,
    wait: opentelemetry::metrics::Histogram<f64>,
    acquisitions: Counter<u64>,
    conflicts: Counter<u64>,
    errors: Counter<u64>,
    migrations: Counter<u64>,
    violations: Counter<u64>,
    held: opentelemetry::metrics::UpDownCounter<i64>,
    lost: Counter<u64>,
}

impl Instruments {
    fn new(meter: &Meter) -> Self {
        Instruments {
            duration: meter
                .f64_histogram(names::DURATION)
                .with_unit("s")
                .with_description("Time a lock was held, from acquired to released.")
                .with_boundaries(DEFAULT_BOUNDARIES.to_vec())
                .build(),
            wait: meter
                .f64_histogram(names::WAIT_DURATION)
                .with_unit("s")
                .with_description("Time spent in an acquire call, whatever its outcome.")
                .with_boundaries(DEFAULT_BOUNDARIES.to_vec())
                .build(),
            acquisitions: meter
                .u64_counter(names::ACQUISITIONS)
                .with_unit("{acquisition}")
                .with_description("Locks acquired.")
                .build(),
            conflicts: meter
                .u64_counter(names::CONFLICTS)
                .with_unit("{conflict}")
                .with_description("Acquires that found the lock taken and had to wait or give up.")
                .build(),
            errors: meter
                .u64_counter(names::ERRORS)
                .with_unit("{error}")
                .with_description("Failed lock operations, by operation and errno.")
                .build(),
            migrations: meter
                .u64_counter(names::INODE_MIGRATIONS)
                .with_unit("{migration}")
                .with_description(
                    "Lock files replaced, unlinked or moved while being locked or held: the lock guarded an orphaned inode.",
                )
                .build(),
            violations: meter
                .u64_counter(names::VIOLATIONS)
                .with_unit("{violation}")
                .with_description("Exclusion violations: another holder acquired a lock we held.")
                .build(),
            held: meter
                .i64_up_down_counter(names::HELD)
                .with_unit("{lock}")
                .with_description("Locks held now.")
                .build(),
            lost: meter
                .u64_counter(names::LOST)
                .with_unit("{loss}")
                .with_description("Holds that ended without the holder releasing the lock.")
                .build(),
        }
    }
}

/// Per-lock instruments, bound once to the lock's attribute sets.
///
/// This is the recording core shared by every lock type in lockmeter. Each (mode, contended,
/// outcome) combination is bound the first time it is recorded, so a lock that is never taken
/// shared exports no shared series; after that, hot-path methods are one atomic load plus the
/// bound instrument's own update, and never allocate.
#[derive(Debug)]
pub struct LockMetrics {
    base: Vec<KeyValue>,
    ins: Instruments,
    duration: [[OnceLock<BoundHistogram<f64>>; 2]; 2],
    wait: [[OnceLock<BoundHistogram<f64>>; 5]; 2],
    pub(crate) acquisitions: [[OnceLock<BoundCounter<u64>>; 2]; 2],
    pub(crate) conflicts: [OnceLock<BoundCounter<u64>>; 2],
    pub(crate) held: [OnceLock<BoundUpDownCounter<i64>>; 2],
}

const MODES: [LockMode; 2] = [LockMode::Exclusive, LockMode::Shared];

impl LockMetrics {
    /// Creates the schema's instruments for one lock. `extra` attributes (such as `fs.type`)
    /// are added to every series of the lock.
    pub fn new(meter: &Meter, name: &str, kind: &str, extra: &[KeyValue]) -> Self {
        let mut base = vec![
            KeyValue::new(keys::LOCK_NAME, name.to_owned()),
            KeyValue::new(keys::LOCK_KIND, kind.to_owned()),
        ];
        base.extend_from_slice(extra);
        LockMetrics {
            base,
            ins: Instruments::new(meter),
            duration: Default::default(),
            wait: Default::default(),
            acquisitions: Default::default(),
            conflicts: Default::default(),
            held: Default::default(),
        }
    }

    #[cold]
    pub(crate) fn attrs(&self, mode: usize, more: &[KeyValue]) -> Vec<KeyValue> {
        let mut v = Vec::with_capacity(self.base.len() + 1 + more.len());
        v.extend_from_slice(&self.base);
        v.push(KeyValue::new(keys::LOCK_MODE, MODES[mode].as_str()));
        v.extend_from_slice(more);
        v
    }

    #[inline]
    pub(crate) fn contended_kv(c: usize) -> KeyValue {
        KeyValue::new(keys::LOCK_CONTENDED, c == 1)
    }

    /// Records a successful acquisition: the wait, the acquisition count and `lock.held` + 1.
    #[inline]
    pub fn acquired(&self, mode: LockMode, contended: bool, wait_secs: f64) {
        let (m, c) = (mode.idx(), contended as usize);
        self.wait_handle(m, Outcome::Acquired as usize)
            .record(wait_secs);
        self.acquisitions[m][c]
            .get_or_init(|| {
                self.ins
                    .acquisitions
                    .bind(&self.attrs(m, &[Self::contended_kv(c)]))
            })
            .add(1);
        self.held[m]
            .get_or_init(|| self.ins.held.bind(&self.attrs(m, &[])))
            .add(1);
    }

    /// Records a hold time only (counts are kept elsewhere, see `LockStats`).
    #[inline]
    pub fn record_hold(&self, mode: LockMode, contended: bool, hold_secs: f64) {
        let (m, c) = (mode.idx(), contended as usize);
        self.duration[m][c]
            .get_or_init(|| {
                self.ins
                    .duration
                    .bind(&self.attrs(m, &[Self::contended_kv(c)]))
            })
            .record(hold_secs);
    }

    /// Records the wait of an acquire call with its outcome (counts are kept elsewhere).
    #[inline]
    pub fn record_wait(&self, mode: LockMode, outcome: Outcome, wait_secs: f64) {
        self.wait_handle(mode.idx(), outcome as usize)
            .record(wait_secs);
    }

    /// Records a release: the hold time and `lock.held` - 1.
    #[inline]
    pub fn released(&self, mode: LockMode, contended: bool, hold_secs: f64) {
        self.record_hold(mode, contended, hold_secs);
        let m = mode.idx();
        self.held[m]
            .get_or_init(|| self.ins.held.bind(&self.attrs(m, &[])))
            .add(-1);
    }

    /// Records an acquire that found the lock taken.
    #[inline]
    pub fn conflict(&self, mode: LockMode) {
        let m = mode.idx();
        self.conflicts[m]
            .get_or_init(|| self.ins.conflicts.bind(&self.attrs(m, &[])))
            .add(1);
    }

    /// Records the wait of an acquire call that did not acquire.
    #[inline]
    pub fn not_acquired(&self, mode: LockMode, outcome: Outcome, wait_secs: f64) {
        self.wait_handle(mode.idx(), outcome as usize)
            .record(wait_secs);
    }

    #[inline]
    fn wait_handle(&self, m: usize, o: usize) -> &BoundHistogram<f64> {
        self.wait[m][o].get_or_init(|| {
            let kv = KeyValue::new(keys::LOCK_OUTCOME, Outcome::ALL[o].as_str());
            self.ins.wait.bind(&self.attrs(m, &[kv]))
        })
    }

    /// Counts an error (`lock.errors`) with its operation and errno name.
    #[cold]
    pub fn error(&self, operation: &str, error_type: &str) {
        let mut attrs = self.base.clone();
        attrs.push(KeyValue::new(keys::LOCK_OPERATION, operation.to_owned()));
        attrs.push(KeyValue::new(keys::ERROR_TYPE, error_type.to_owned()));
        self.ins.errors.add(1, &attrs);
    }

    /// Counts an inode migration.
    #[cold]
    pub fn migration(&self, kind: MigrationKind, at: DetectedAt) {
        let mut attrs = self.base.clone();
        attrs.push(KeyValue::new(keys::MIGRATION_KIND, kind.as_str()));
        attrs.push(KeyValue::new(keys::MIGRATION_DETECTED_AT, at.as_str()));
        self.ins.migrations.add(1, &attrs);
    }

    /// Counts a hold lost without a release (`lock.lost`).
    #[cold]
    pub fn lost(&self, reason: LostReason) {
        let mut attrs = self.base.clone();
        attrs.push(KeyValue::new(keys::LOCK_LOST_REASON, reason.as_str()));
        self.ins.lost.add(1, &attrs);
    }

    /// Counts an exclusion violation.
    #[cold]
    pub fn violation(&self) {
        self.ins.violations.add(1, &self.base);
    }

    /// The attributes every series of this lock carries (`lock.name`, `lock.kind`, extras).
    pub fn base_attributes(&self) -> &[KeyValue] {
        &self.base
    }
}

/// Counters of one lock, updated on its hot path with plain atomics and published into the
/// SDK's (bound, synchronous) instruments by a background flusher.
///
/// Publishing is what costs on the hot path (a bound counter update is ~3 ns, a histogram record
/// ~15 ns, against ~4 ns for a whole uncontended `std::sync::Mutex` cycle), so locks count into
/// these atomics and the flusher adds the differences to `lock.acquisitions`, `lock.conflicts`
/// and `lock.held` every [`FLUSH_INTERVAL`] and on [`flush`]. Every acquisition and every
/// conflict is counted; the exported value lags by at most one interval.
///
/// Timing (the two histograms) is sampled: 1 in `sample_mask + 1` acquisitions by counter, plus
/// the first acquisition after each flusher tick (`sample` set to 0), so a lock taken less than
/// about ten times a second is timed every time. Neither rule looks at durations, so the recorded
/// waits and holds are an unbiased sample.
///
/// The counters are sharded per thread ([`shard`]): each live thread (up to [`shard::OWNED`])
/// owns one cache line of every lock's counters and updates it with a plain load and store, so
/// counting adds no cache-line transfer when the lock moves between threads (it did: contended
/// throughput of a two-thread mutex dropped to ~0.7x std's with one shared line).
#[derive(Debug)]
pub(crate) struct LockStats {
    name: String,
    pub(crate) metrics: std::sync::Arc<LockMetrics>,
    shards: [shard::Shard; shard::SHARDS],
    published: parking_lot::Mutex<Published>,
    /// Time 1 in `sample_mask + 1` acquisitions (a power of two).
    pub(crate) sample_mask: u64,
    /// The mask in use: `sample_mask`, or 0 after a flusher tick (time the next acquisition
    /// whatever its number; the timed acquisition puts the mask back). One load decides.
    sample: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct Published {
    acquisitions: [[u64; 2]; 2],
    releases: [u64; 2],
    conflicts: [u64; 2],
}

/// Default timing sample of file locks: 1 in this many acquisitions (plus the first after each
/// [`FLUSH_INTERVAL`]) records wait and hold times; counts are always exact. In-process locks
/// default to [`crate::sync::DEFAULT_SAMPLE_EVERY`] (64).
pub const DEFAULT_SAMPLE_EVERY: u32 = 16;

/// How often lock counts are published into the SDK instruments.
pub const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

fn stats_registry() -> &'static parking_lot::Mutex<Vec<std::sync::Weak<LockStats>>> {
    static REG: OnceLock<parking_lot::Mutex<Vec<std::sync::Weak<LockStats>>>> = OnceLock::new();
    REG.get_or_init(|| {
        // The flusher thread: publishes every interval for as long as the process runs.
        let spawned = std::thread::Builder::new()
            .name("lockmeter-flush".into())
            .spawn(|| loop {
                std::thread::sleep(FLUSH_INTERVAL);
                publish_all(true);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "lockmeter: cannot start the metrics flusher; call lockmeter::metrics::flush() before exporting");
        }
        parking_lot::Mutex::new(Vec::new())
    })
}

/// Publishes the counts of every in-process lock (`sync`/`tokio` wrappers, [`crate::LockMeter`])
/// into the SDK instruments now. The flusher does this every [`FLUSH_INTERVAL`]; call it
/// before reading or exporting metrics when exact, current counts matter (tests, shutdown; the
/// `telemetry` guard does it on drop).
pub fn flush() {
    publish_all(false);
}

/// Publishes every live lock's counts; the flusher's ticks also ask each lock to time its next
/// acquisition.
fn publish_all(tick: bool) {
    let live: Vec<std::sync::Arc<LockStats>> = {
        let mut reg = stats_registry().lock();
        reg.retain(|w| w.strong_count() > 0);
        reg.iter().filter_map(std::sync::Weak::upgrade).collect()
    };
    for s in live {
        s.publish();
        if tick {
            s.sample.store(0, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl LockStats {
    pub(crate) fn new(
        name: &str,
        metrics: std::sync::Arc<LockMetrics>,
        sample_every: u32,
    ) -> std::sync::Arc<LockStats> {
        let sample_mask = u64::from(sample_every.max(1).next_power_of_two()) - 1;
        let s = std::sync::Arc::new(LockStats {
            name: name.to_owned(),
            metrics,
            shards: Default::default(),
            published: parking_lot::Mutex::new(Published::default()),
            sample_mask,
            // The first acquisition is timed anyway (number 0).
            sample: std::sync::atomic::AtomicU64::new(sample_mask),
        });
        stats_registry().lock().push(std::sync::Arc::downgrade(&s));
        s
    }

    /// Adds what changed since the last publication to the SDK instruments.
    pub(crate) fn publish(&self) {
        let mut p = self.published.lock();
        for m in 0..MODES.len() {
            let mut acquired = 0;
            for c in 0..2 {
                let now = self.total(shard::acq(m, c));
                let delta = now.wrapping_sub(p.acquisitions[m][c]);
                if delta > 0 {
                    self.metrics.acquisitions[m][c]
                        .get_or_init(|| {
                            self.metrics
                                .ins
                                .acquisitions
                                .bind(&self.metrics.attrs(m, &[LockMetrics::contended_kv(c)]))
                        })
                        .add(delta);
                    p.acquisitions[m][c] = now;
                    acquired += delta;
                }
            }
            let released_now = self.total(shard::rel(m));
            let released = released_now.wrapping_sub(p.releases[m]);
            p.releases[m] = released_now;
            let held = acquired as i64 - released as i64;
            // Any activity publishes (a zero change still creates the series: a lock that was
            // taken and let go shows `lock.held` 0, not nothing).
            if acquired != 0 || released != 0 {
                self.metrics.held[m]
                    .get_or_init(|| self.metrics.ins.held.bind(&self.metrics.attrs(m, &[])))
                    .add(held);
            }
            let conflicts_now = self.total(shard::conf(m));
            let conflicts = conflicts_now.wrapping_sub(p.conflicts[m]);
            if conflicts > 0 {
                self.metrics.conflicts[m]
                    .get_or_init(|| self.metrics.ins.conflicts.bind(&self.metrics.attrs(m, &[])))
                    .add(conflicts);
                p.conflicts[m] = conflicts_now;
            }
        }
    }

    /// The lock's `lock.name`.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Adds one to counter `i` in this thread's shard; returns the shard's previous value.
    #[inline(always)]
    pub(crate) fn bump(&self, i: usize) -> u64 {
        let slot = shard::slot();
        shard::bump(&self.shards[slot], slot, i)
    }

    /// This thread's shard's value of counter `i`.
    #[inline(always)]
    fn peek(&self, i: usize) -> u64 {
        self.shards[shard::slot()].0[i].load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counter `i` summed over all shards.
    fn total(&self, i: usize) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0[i].load(std::sync::atomic::Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }

    /// An uncontended acquisition by the thread owning `slot` ([`shard::slot`]); returns the
    /// start of the hold when this one is sampled.
    #[inline(always)]
    pub(crate) fn acquired_uncontended_in(&self, slot: usize, mode: LockMode) -> Option<HoldStart> {
        let n = shard::bump(&self.shards[slot], slot, shard::acq(mode.idx(), 0));
        if n & self.sample.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            self.sampled_start()
        } else {
            None
        }
    }

    /// Counts a release and records the hold if the acquisition was timed.
    #[cfg(feature = "tokio")]
    #[inline(always)]
    pub(crate) fn released(&self, mode: LockMode, since: Option<HoldStart>) {
        self.count_release(mode);
        if let Some(t) = since {
            self.hold_done(mode, t);
        }
    }

    /// Counts a release (the hold, if timed, is recorded separately by [`Self::hold_done`], so
    /// a guard can do that after unlocking).
    #[inline(always)]
    pub(crate) fn count_release(&self, mode: LockMode) {
        let slot = shard::current();
        shard::bump(&self.shards[slot], slot, shard::rel(mode.idx()));
    }

    /// Counts a conflict.
    #[inline]
    pub(crate) fn conflict(&self, mode: LockMode) {
        self.bump(shard::conf(mode.idx()));
    }

    /// Counts an acquisition.
    #[inline]
    pub(crate) fn acquired(&self, mode: LockMode, contended: bool) -> u64 {
        self.bump(shard::acq(mode.idx(), contended as usize))
    }

    /// Starts timing a sampled uncontended acquisition's hold. Its wait (0 s: one successful
    /// try, inside the lowest bucket) is recorded with the hold, in [`Self::hold_done`], after
    /// the lock is released: nothing but a clock read inside the critical section.
    #[cold]
    #[inline(never)]
    fn sampled_start(&self) -> Option<HoldStart> {
        self.unforce();
        Some(HoldStart::new(Ticks::now(), false))
    }

    /// Records a timed hold that ended now.
    #[cold]
    #[inline(never)]
    pub(crate) fn hold_done(&self, mode: LockMode, since: HoldStart) {
        let held = since.at().elapsed_secs();
        if !since.contended() {
            // The wait of a timed uncontended acquisition, recorded here rather than inside
            // the critical section.
            self.metrics.record_wait(mode, Outcome::Acquired, 0.0);
        }
        self.metrics.record_hold(mode, since.contended(), held);
    }

    /// A try found the lock taken: decide whether to time this wait (1 in N conflicts, the
    /// same rate as uncontended acquisitions, so the histograms' mix stays unbiased). For
    /// exclusive locks the conflict is counted later, when the lock is acquired
    /// ([`Self::contended_acquired`]); a waiter that gives up counts it itself.
    #[cold]
    #[inline(never)]
    pub(crate) fn contended_start(&self, mode: LockMode, exclusive: bool) -> Option<Ticks> {
        let c = shard::conf(mode.idx());
        let n = if exclusive {
            self.peek(c)
        } else {
            self.bump(c)
        };
        self.sampled(n).then(Ticks::now)
    }

    /// Whether the acquisition (or failed acquire) numbered `n` is timed: 1 in N by number, or
    /// the first since the flusher's last tick.
    #[inline(always)]
    pub(crate) fn sampled(&self, n: u64) -> bool {
        let timed = n & self.sample.load(std::sync::atomic::Ordering::Relaxed) == 0;
        if timed {
            self.unforce();
        }
        timed
    }

    /// Puts the sampling mask back after a flusher tick forced a timing.
    #[inline(always)]
    fn unforce(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        // Only when forced: a store on every timed acquisition would pull this line (read by
        // every acquisition on every thread) away from the other cores.
        if self.sample_mask != 0 && self.sample.load(Relaxed) == 0 {
            self.sample.store(self.sample_mask, Relaxed);
        }
    }

    /// A file lock acquisition (holders may run concurrently, even "exclusive" ones on a file
    /// system that does not exclude: atomic adds). Returns whether to time it.
    #[inline(always)]
    pub(crate) fn file_acquired(&self, mode: LockMode, contended: bool) -> bool {
        let n = self.acquired(mode, contended);
        self.sampled(n)
    }

    /// The contended acquire got the lock: count it (and, for exclusive locks, its conflict);
    /// if timed, record the wait and start timing the hold.
    #[cold]
    #[inline(never)]
    pub(crate) fn contended_acquired(
        &self,
        mode: LockMode,
        exclusive: bool,
        t0: Option<Ticks>,
    ) -> Option<HoldStart> {
        let m = mode.idx();
        if exclusive {
            self.bump(shard::conf(m));
        }
        self.bump(shard::acq(m, 1));
        let t0 = t0?;
        let now = Ticks::now();
        self.metrics
            .record_wait(mode, Outcome::Acquired, t0.secs_until(now));
        Some(HoldStart::new(now, true))
    }
}

impl Drop for LockStats {
    fn drop(&mut self) {
        // Publish what the last interval counted before the lock goes away.
        self.publish();
    }
}

/// Per-thread counter shards.
///
/// A thread claims a slot the first time it counts anything (one of [`OWNED`], released when
/// the thread exits) and from then on updates slot `i` of every lock's shards with a plain
/// load and store: it is the only writer there. Threads beyond [`OWNED`] share the last slot
/// and update it with atomic adds. Readers (the flusher) sum the slots.
pub(crate) mod shard {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU16, AtomicU64, Ordering::Relaxed};

    /// Slots owned by one thread each.
    pub(crate) const OWNED: usize = 8;
    /// All slots: the owned ones and the shared one.
    pub(crate) const SHARDS: usize = OWNED + 1;
    const SHARED: u8 = OWNED as u8;
    const UNCLAIMED: u8 = u8::MAX;

    /// One thread's counters of one lock, on a cache line of its own.
    #[derive(Debug, Default)]
    #[repr(align(128))] // two lines: adjacent-line prefetch pairs 64-byte lines on x86
    pub(crate) struct Shard(pub(crate) [AtomicU64; 8]);

    /// Counter indices: acquisitions by [mode][contended], releases and conflicts by mode.
    #[inline(always)]
    pub(crate) const fn acq(mode: usize, contended: usize) -> usize {
        mode * 2 + contended
    }
    #[inline(always)]
    pub(crate) const fn rel(mode: usize) -> usize {
        4 + mode
    }
    #[inline(always)]
    pub(crate) const fn conf(mode: usize) -> usize {
        6 + mode
    }

    /// Free owned slots, one bit each.
    static FREE: AtomicU16 = AtomicU16::new((1 << OWNED) - 1);

    thread_local! {
        static SLOT: Cell<u8> = const { Cell::new(UNCLAIMED) };
        static RELEASE: Release = const { Release };
    }

    /// Gives the slot back when the thread exits.
    struct Release;

    impl Drop for Release {
        fn drop(&mut self) {
            let _ = SLOT.try_with(|s| {
                let slot = s.replace(SHARED);
                if slot < SHARED {
                    // Release: the next owner sees every count this thread made.
                    FREE.fetch_or(1 << slot, std::sync::atomic::Ordering::Release);
                }
            });
        }
    }

    /// This thread's slot, claiming one on first use. Always `< SHARDS` (the `min`s let the
    /// compiler drop the bounds checks from the inlined hot paths).
    #[inline(always)]
    pub(crate) fn slot() -> usize {
        let s = SLOT.try_with(Cell::get).unwrap_or(SHARED);
        if s == UNCLAIMED {
            return claim().min(SHARDS - 1);
        }
        usize::from(s.min(SHARED))
    }

    /// This thread's slot if it has claimed one, else the shared slot: for releases, whose
    /// thread claimed its slot when it acquired (no claim path to inline).
    #[inline(always)]
    pub(crate) fn current() -> usize {
        usize::from(SLOT.try_with(Cell::get).unwrap_or(SHARED).min(SHARED))
    }

    #[cold]
    #[inline(never)]
    fn claim() -> usize {
        use std::sync::atomic::Ordering::{Acquire, Relaxed as R};
        let mut free = FREE.load(R);
        let slot = loop {
            if free == 0 {
                break SHARED;
            }
            let bit = free.trailing_zeros() as u8;
            match FREE.compare_exchange_weak(free, free & !(1 << bit), Acquire, R) {
                Ok(_) => break bit,
                Err(now) => free = now,
            }
        };
        // Register the release first: if the thread is already exiting, count as shared.
        if slot < SHARED && RELEASE.try_with(|_| ()).is_err() {
            FREE.fetch_or(1 << slot, std::sync::atomic::Ordering::Release);
            return usize::from(SHARED);
        }
        let _ = SLOT.try_with(|s| s.set(slot));
        usize::from(slot)
    }

    /// Adds one to counter `i` of `shard` (this thread's `slot`); returns the previous value.
    #[inline(always)]
    pub(crate) fn bump(shard: &Shard, slot: usize, i: usize) -> u64 {
        let c = &shard.0[i];
        if slot < OWNED {
            let n = c.load(Relaxed);
            c.store(n.wrapping_add(1), Relaxed);
            n
        } else {
            c.fetch_add(1, Relaxed)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod shard_tests {
    #[test]
    fn exited_threads_give_their_slot_back() {
        for _ in 0..(3 * super::shard::OWNED) {
            let slot = std::thread::spawn(super::shard::slot).join().unwrap();
            assert!(
                slot < super::shard::OWNED,
                "slot {slot}: not returned by exited threads"
            );
        }
    }
}
