//! Exact counts, read at collection time.
//!
//! Locks count acquisitions, releases and conflicts in per-thread shards of their own
//! ([`super::Recorder`]); nothing is pushed into the SDK on the lock path. Instead each
//! [`Sink`](super::Sink) registers three observable instruments (`lock.acquisitions`,
//! `lock.conflicts`, `lock.held`) whose callbacks read a [`Registry`] of every lock recording
//! into it, whenever the SDK collects: a Prometheus scrape, a periodic export, `force_flush`,
//! shutdown. A reader therefore sees every acquisition that happened before it, whatever the
//! provider and whatever the order in which the provider and the locks were created.
//!
//! Locks are grouped into [`Series`] by their attribute identity (`lock.name`, `lock.kind` and
//! any extra attributes such as `fs.type`): the SDK keeps the *last* observation of an
//! attribute set per collection, so two locks with one name must be summed before they are
//! observed. A lock that is dropped folds its counts into its series ("retired"), so the
//! exported counters never go backwards. Memory is bounded: past [`SERIES_LIMIT`] distinct
//! series, new locks count into one overflow series (`otel.metric.overflow = true`, the
//! attribute the SDK's own cardinality limit uses), and a dropped lock leaves nothing behind but
//! the counts in its series.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use opentelemetry::metrics::AsyncInstrument;
use opentelemetry::{KeyValue, Value};
use parking_lot::Mutex;

use super::recorder::Recorder;
use super::schema::keys;
use crate::kind::LockMode;

/// Distinct series (lock attribute identities: name, kind, extra attributes) a sink keeps
/// before it counts new ones into the overflow series. A series is observed with up to four
/// attribute sets on `lock.acquisitions` (mode x contended), so this keeps every observation
/// inside the SDK's default cardinality limit of 2000 per instrument, overflow series included.
pub const SERIES_LIMIT: usize = 2000 / 4 - 1;

/// The attribute the SDK gives to series beyond its cardinality limit.
const OVERFLOW_KEY: &str = "otel.metric.overflow";

/// Counts of one lock or one series: acquisitions by [mode][contended], releases and conflicts
/// by mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) acquisitions: [[u64; 2]; 2],
    pub(crate) releases: [u64; 2],
    pub(crate) conflicts: [u64; 2],
}

impl Totals {
    pub(crate) fn add(&mut self, o: &Totals) {
        for m in 0..2 {
            for c in 0..2 {
                self.acquisitions[m][c] =
                    self.acquisitions[m][c].wrapping_add(o.acquisitions[m][c]);
            }
            self.releases[m] = self.releases[m].wrapping_add(o.releases[m]);
            self.conflicts[m] = self.conflicts[m].wrapping_add(o.conflicts[m]);
        }
    }

    fn acquired(&self, m: usize) -> u64 {
        self.acquisitions[m][0].wrapping_add(self.acquisitions[m][1])
    }

    /// Locks held in mode `m` now.
    fn held(&self, m: usize) -> i64 {
        self.acquired(m).wrapping_sub(self.releases[m]) as i64
    }

    /// Whether mode `m` saw any activity (its `lock.held` series exists, even at 0).
    fn active(&self, m: usize) -> bool {
        self.acquired(m) != 0 || self.releases[m] != 0
    }
}

/// The attribute sets one series is observed with, built once.
struct Attrs {
    /// `lock.acquisitions` by [mode][contended].
    acquisitions: [[Vec<KeyValue>; 2]; 2],
    /// `lock.conflicts` and `lock.held` by mode.
    by_mode: [Vec<KeyValue>; 2],
}

impl Attrs {
    fn new(base: &[KeyValue]) -> Attrs {
        let with = |m: LockMode, more: &[KeyValue]| {
            let mut v = Vec::with_capacity(base.len() + 1 + more.len());
            v.extend_from_slice(base);
            v.push(KeyValue::new(keys::LOCK_MODE, m.as_str()));
            v.extend_from_slice(more);
            v
        };
        let contended = |c: bool| [KeyValue::new(keys::LOCK_CONTENDED, c)];
        Attrs {
            acquisitions: LockMode::ALL
                .map(|m| [with(m, &contended(false)), with(m, &contended(true))]),
            by_mode: LockMode::ALL.map(|m| with(m, &[])),
        }
    }
}

/// How long a collection waits for a dropped lock's counts to be kept ([`Series::totals`]).
const DYING_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// The locks that share one attribute identity, and the counts of those already dropped.
pub(crate) struct Series {
    attrs: Attrs,
    /// The overflow series: every combination is observed as one value.
    overflow: bool,
    state: Mutex<SeriesState>,
}

#[derive(Default)]
struct SeriesState {
    members: Vec<Weak<Recorder>>,
    retired: Totals,
}

impl SeriesState {
    /// The members not dropped.
    fn live(&self) -> Vec<Arc<Recorder>> {
        self.members.iter().filter_map(Weak::upgrade).collect()
    }
}

impl Series {
    fn new(base: &[KeyValue], overflow: bool) -> Series {
        Series {
            attrs: Attrs::new(base),
            overflow,
            state: Mutex::new(SeriesState::default()),
        }
    }

    /// Adds a live lock.
    pub(crate) fn join(&self, member: Weak<Recorder>) {
        self.state.lock().members.push(member);
    }

    /// A lock is going away: keep its counts (the exported counters must not go backwards).
    /// Each member removes itself, here, in the same step that keeps its counts: a member whose
    /// last reference is gone but whose drop has not got here yet is *dying*, still listed, and
    /// a collection waits for it ([`Self::totals`]).
    pub(crate) fn retire(&self, member: &Recorder, totals: &Totals) {
        let mut s = self.state.lock();
        s.retired.add(totals);
        let me: *const Recorder = member;
        s.members.retain(|w| !std::ptr::eq(w.as_ptr(), me));
    }

    /// The series' counts now: dropped locks' and live ones'. `tick` asks each live lock to
    /// time its next acquisition (see [`Recorder::tick`]). A dying member (dropped, its counts
    /// not yet kept) can no longer be read and is not yet retired: counting without it would
    /// make the exported counters dip, so this waits for its drop to retire it (a few
    /// instructions away on the dropping thread; at most [`DYING_WAIT`], then it counts
    /// without it).
    fn totals(&self, tick: bool) -> Totals {
        let deadline = std::time::Instant::now() + DYING_WAIT;
        loop {
            let s = self.state.lock();
            let dying = s.members.iter().any(|w| w.strong_count() == 0);
            if !dying || std::time::Instant::now() >= deadline {
                let live = s.live();
                let mut t = s.retired;
                for m in &live {
                    t.add(&m.totals());
                    if tick {
                        m.tick();
                    }
                }
                // The references are let go after the lock: if one is the last (its lock was
                // dropped meanwhile), its drop retires it, and retiring takes this lock.
                drop(s);
                if tick {
                    // The timed holds the locks' threads kept, so that this collection's
                    // histograms have them (the SDK runs every callback before it reads them).
                    for m in &live {
                        m.record_pending();
                    }
                }
                drop(live);
                return t;
            }
            drop(s);
            std::thread::yield_now();
        }
    }
}

/// Every series recording into one sink.
pub(crate) struct Registry {
    inner: Mutex<RegistryInner>,
}

#[derive(Default)]
struct RegistryInner {
    series: HashMap<String, Arc<Series>>,
    overflow: Option<Arc<Series>>,
}

/// Every registry, for [`record_pending_everywhere`].
static REGISTRIES: Mutex<Vec<Weak<Registry>>> = Mutex::new(Vec::new());

/// Records the timed holds every lock in the process has kept: for readers of the lock profile,
/// which is fed by the same records.
pub(crate) fn record_pending_everywhere() {
    let all: Vec<Arc<Registry>> = REGISTRIES.lock().iter().filter_map(Weak::upgrade).collect();
    for r in all {
        r.record_pending();
    }
}

impl Registry {
    /// A registry for one sink, known to [`record_pending_everywhere`].
    pub(crate) fn shared() -> Arc<Registry> {
        let r = Arc::new(Registry::new());
        let mut all = REGISTRIES.lock();
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&r));
        r
    }

    pub(crate) fn new() -> Registry {
        Registry {
            inner: Mutex::new(RegistryInner::default()),
        }
    }

    /// The series of a lock with these base attributes (created on first use; the overflow
    /// series once [`SERIES_LIMIT`] are kept).
    pub(crate) fn series(&self, base: &[KeyValue]) -> Arc<Series> {
        let key = series_key(base);
        let mut r = self.inner.lock();
        if let Some(s) = r.series.get(&key) {
            return Arc::clone(s);
        }
        if r.series.len() >= SERIES_LIMIT {
            return Arc::clone(r.overflow.get_or_insert_with(|| {
                Arc::new(Series::new(&[KeyValue::new(OVERFLOW_KEY, true)], true))
            }));
        }
        let s = Arc::new(Series::new(base, false));
        r.series.insert(key, Arc::clone(&s));
        s
    }

    /// Records the timed holds every lock here has kept (see [`Recorder::record_pending`]).
    fn record_pending(&self) {
        for s in self.all() {
            let live = s.state.lock().live();
            for m in &live {
                m.record_pending();
            }
        }
    }

    fn all(&self) -> Vec<Arc<Series>> {
        let r = self.inner.lock();
        r.series
            .values()
            .chain(r.overflow.iter())
            .cloned()
            .collect()
    }

    /// Whether any lock recording here has counted anything.
    pub(crate) fn has_counts(&self) -> bool {
        self.all()
            .iter()
            .any(|s| s.totals(false) != Totals::default())
    }

    /// `lock.acquisitions` callback. Also the collection "tick": the next acquisition of every
    /// lock is timed, so a lock taken less often than metrics are collected is timed every time.
    pub(crate) fn observe_acquisitions(&self, obs: &dyn AsyncInstrument<u64>) {
        for s in self.all() {
            let t = s.totals(true);
            if s.overflow {
                let n = (0..2).map(|m| t.acquired(m)).fold(0, u64::wrapping_add);
                if n > 0 {
                    obs.observe(n, &s.attrs.by_mode[0][..1]);
                }
                continue;
            }
            for (m, row) in t.acquisitions.iter().enumerate() {
                for (c, &n) in row.iter().enumerate() {
                    if n > 0 {
                        obs.observe(n, &s.attrs.acquisitions[m][c]);
                    }
                }
            }
        }
    }

    /// `lock.conflicts` callback.
    pub(crate) fn observe_conflicts(&self, obs: &dyn AsyncInstrument<u64>) {
        for s in self.all() {
            let t = s.totals(false);
            if s.overflow {
                let n = t.conflicts[0].wrapping_add(t.conflicts[1]);
                if n > 0 {
                    obs.observe(n, &s.attrs.by_mode[0][..1]);
                }
                continue;
            }
            for (m, &n) in t.conflicts.iter().enumerate() {
                if n > 0 {
                    obs.observe(n, &s.attrs.by_mode[m]);
                }
            }
        }
    }

    /// `lock.held` callback: a mode's series appears once it was used, and stays (at 0).
    pub(crate) fn observe_held(&self, obs: &dyn AsyncInstrument<i64>) {
        for s in self.all() {
            let t = s.totals(false);
            if s.overflow {
                if t.active(0) || t.active(1) {
                    obs.observe(t.held(0) + t.held(1), &s.attrs.by_mode[0][..1]);
                }
                continue;
            }
            for m in 0..2 {
                if t.active(m) {
                    obs.observe(t.held(m), &s.attrs.by_mode[m]);
                }
            }
        }
    }
}

/// A map key naming an attribute set (keys and values, in order).
fn series_key(base: &[KeyValue]) -> String {
    let mut k = String::new();
    for kv in base {
        k.push_str(kv.key.as_str());
        k.push('\u{1}');
        match &kv.value {
            Value::String(s) => k.push_str(s.as_str()),
            other => k.push_str(&other.to_string()),
        }
        k.push('\u{2}');
    }
    k
}
