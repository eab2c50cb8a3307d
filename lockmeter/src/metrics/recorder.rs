//! [`Recorder`]: everything one lock records, through one route.
//!
//! - **Counts** (acquisitions, releases, conflicts) go into the lock's per-thread shards
//!   ([`super::shard`]) with a plain load and store; the SDK reads them when it collects
//!   ([`super::series`]). Exact, and nothing on the lock path touches the SDK.
//! - **Timing** (the two histograms) is sampled: 1 in `sample_mask + 1` acquisitions (by
//!   number for file and tokio locks; by a draw from a per-thread generator for the `sync`
//!   locks, which then read nothing but their own word), plus the first after each metrics
//!   collection (`sample` set to 0 by the collection, put back by the timed acquisition), so a
//!   lock taken less often than metrics are collected is timed every time. Neither rule looks
//!   at durations, so the recorded waits and holds are an unbiased sample. Records go to
//!   histograms bound once per lock (and bound again if the global provider changes). A timed
//!   hold is kept by its thread and recorded with its next few ([`Pending`]); collections,
//!   lock-profile reads and the lock's drop record what threads kept first.
//! - **Rare events** (errors, migrations, violations, losses) are recorded as they happen, with
//!   attributes built then.

use std::cell::Cell;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use opentelemetry::metrics::BoundHistogram;
use opentelemetry::KeyValue;

use super::schema::{keys, DetectedAt, LostReason, MigrationKind, Outcome};
use super::series::{Series, Totals};
use super::shard::{self, Shard};
use super::sink::{global_instruments, known_global_instruments, Instruments, Sink};
use crate::clock::{HoldStart, Ticks};
use crate::kind::LockMode;
use crate::profile::{self, EventAttrs, ProfileSlot, Site, Thresholds};
use crate::sync::raw::RawMutex;
use crate::sync::raw_rw::RawRwLock;

/// A lock bound to the global provider re-checks which provider is installed every this many
/// timed acquisitions (every one while the provider is the no-op one).
const GLOBAL_CHECK_EVERY: u32 = 64;

/// In-process waits at least this long (seconds) all enter the lock profile; shorter ones (a
/// few spins, where a profile entry would cost more than the wait) by the timing sample.
pub(crate) const PROFILE_EVERY_WAIT_FROM: f64 = 50e-6;

/// The recording state of one lock. See the [module docs](self).
///
/// Memory: ~1.5 KB per lock (one 128-byte counter shard per thread slot, and lines of their own
/// for what every acquisition reads), allocated once, plus ~200 bytes for each thread slot
/// that times a hold ([`Pending`]).
pub(crate) struct Recorder {
    shards: [Shard; shard::SHARDS],
    /// Time 1 in `sample_mask + 1` acquisitions (a power of two).
    sample_mask: u64,
    /// The mask in use: `sample_mask`, or 0 after a collection (time the next acquisition
    /// whatever its number; the timed acquisition puts the mask back). One load decides.
    /// On a line of its own: read by every acquisition on every thread, so nothing written
    /// more often than once per collection may share its line.
    sample: Line<AtomicU64>,
    name: String,
    /// `lock.name`, `lock.kind` and the extra attributes, for binding and rare events.
    base: Vec<KeyValue>,
    sink: Sink,
    series: Arc<Series>,
    bound: ArcSwap<Bound>,
    /// Timed acquisitions until the next look at the global provider.
    checks: Line<AtomicU32>,
    /// `lock.kind`, and `fs.type` for file locks (slow-lock events).
    kind: String,
    fs_type: Option<&'static str>,
    thresholds: Thresholds,
    profile: ProfileSlot,
    contention: Contention,
    /// The word of a `sync::Mutex` or `sync::RwLock`, which counts the lock's holds.
    word: std::sync::Mutex<Word>,
    /// An exclusive in-process hold that waited: its wait's start and the site it waited for,
    /// kept by the holder for its release to record (written only by that holder).
    kept: Kept,
    /// Timed holds not recorded yet, by thread slot (see [`Pending`]).
    pending: [OnceLock<Box<parking_lot::Mutex<Pending>>>; shard::SHARDS],
}

/// Timed holds a thread ended and has not recorded yet: recording them at the release (two
/// histogram records and the lock profile, ~100 ns) lets another thread take the lock
/// meanwhile, which in a loop of short holds moves the lock's line once more per timed hold.
/// A thread keeps them in its slot of the lock (its own among the first
/// [`shard::OWNED`] threads to count, the shared one beyond; a mutex the collection also takes)
/// and records them [`PENDING`] at a time, under that mutex; the metrics collection (from the
/// `lock.acquisitions` callback: a view that drops that instrument leaves holds to be recorded
/// in bulk only), the lock profile's readers and the lock's drop record what is left first.
/// Slow holds are recorded at once (their event is due now).
struct Pending {
    len: usize,
    /// `holds[..len]` are kept.
    holds: [PendingHold; PENDING],
}

impl Default for Pending {
    fn default() -> Self {
        const NONE: PendingHold = PendingHold {
            secs: 0.0,
            mode: LockMode::Exclusive,
            contended: false,
            site: None,
        };
        Pending {
            len: 0,
            holds: [NONE; PENDING],
        }
    }
}

/// Timed holds a thread records at once.
const PENDING: usize = 8;

#[derive(Clone, Copy)]
struct PendingHold {
    secs: f64,
    mode: LockMode,
    contended: bool,
    site: Option<Site>,
}

/// Where the counts kept by an in-process lock's own word are. The word lives in the lock's
/// heap block, beside the value (so a hold hands one cache line from core to core); the lock
/// attaches it at construction and, when dropped, detaches it, leaving its final counts.
/// Collections read it under the mutex around this, so never after the block is freed.
#[derive(Debug, Default)]
pub(crate) enum Word {
    /// Not an in-process lock, or not attached yet.
    #[default]
    None,
    Mutex(std::ptr::NonNull<RawMutex>),
    RwLock(std::ptr::NonNull<RawRwLock>),
    /// Detached: the word's last counts.
    Gone(Totals),
}

// SAFETY: the pointers are only dereferenced (shared, for atomic loads) under the recorder's
// `word` mutex while the lock they belong to is alive: it detaches under that mutex before its
// block is freed.
unsafe impl Send for Word {}

impl Word {
    /// The counts the word holds, as the schema counts them.
    fn totals(&self) -> Totals {
        let mut t = Totals::default();
        let x = LockMode::Exclusive.idx();
        match self {
            Word::None => {}
            Word::Gone(g) => t = *g,
            Word::Mutex(p) => {
                // SAFETY: attached, so alive (see `Word`).
                let c = unsafe { p.as_ref() }.counts();
                // A `sync::Mutex`: every hold that waited had one conflict.
                t.acquisitions[x] = [c.acquisitions.wrapping_sub(c.waited), c.waited];
                t.conflicts[x] = c.waited;
                t.releases[x] = c.acquisitions.wrapping_sub(u64::from(c.held));
            }
            Word::RwLock(p) => {
                // SAFETY: as above.
                let rw = unsafe { p.as_ref() }.counts();
                // Every hold and every hold that waited (the conflicts are counted in the
                // shards when the waits begin).
                let sh = LockMode::Shared.idx();
                let pairs = [
                    (sh, rw.shared, rw.shared_waited, rw.readers),
                    (x, rw.exclusive, rw.exclusive_waited, u64::from(rw.writer)),
                ];
                for (m, all, waited, held) in pairs {
                    t.acquisitions[m] = [all.wrapping_sub(waited), waited];
                    t.releases[m] = all.wrapping_sub(held);
                }
            }
        }
        t
    }
}

/// A value on a cache-line pair of its own (x86's adjacent-line prefetch pairs 64-byte lines).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Line<T>(T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        &self.0
    }
}

/// See [`Recorder::kept`].
#[derive(Debug, Default)]
#[repr(align(64))]
struct Kept {
    wait_start: AtomicU64,
    waited_for: AtomicPtr<std::panic::Location<'static>>,
}

/// Who is waiting, and where the last holder that released while someone waited acquired
/// the lock: waiters charge their wait to that call site (the contention it caused). On a line
/// of its own: waiters write it, holders only read it while nobody waits.
#[derive(Default)]
#[repr(align(64))]
struct Contention {
    waiters: AtomicU32,
    releaser: AtomicPtr<std::panic::Location<'static>>,
}

/// What a lock's [`Recorder`] is for.
pub(crate) struct Spec<'a> {
    pub(crate) sink: &'a Sink,
    pub(crate) name: &'a str,
    /// `lock.kind`.
    pub(crate) kind: &'a str,
    /// `fs.type` of a file lock (also an attribute of every series).
    pub(crate) fs_type: Option<&'static str>,
    /// Further attributes of every series.
    pub(crate) extra: &'a [KeyValue],
    /// Time 1 in this many acquisitions.
    pub(crate) sample_every: u32,
    pub(crate) slow_wait: Option<Duration>,
    pub(crate) slow_hold: Option<Duration>,
}

impl<'a> Spec<'a> {
    /// A lock `name` of kind `kind` recording into `sink`, with the defaults.
    pub(crate) fn new(sink: &'a Sink, name: &'a str, kind: &'a str, sample_every: u32) -> Self {
        Spec {
            sink,
            name,
            kind,
            fs_type: None,
            extra: &[],
            sample_every,
            slow_wait: None,
            slow_hold: None,
        }
    }
}

/// The start of a wait for a lock found taken.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WaitStart {
    at: Ticks,
    /// In the timing sample (its wait goes into `lock.wait.duration`).
    timed: bool,
}

#[cfg(feature = "tokio")]
impl WaitStart {
    /// Seconds from the start of the wait to `end`.
    #[inline]
    pub(crate) fn secs_until(self, end: Ticks) -> f64 {
        self.at.secs_until(end)
    }

    /// Whether the wait is in the timing sample.
    #[inline]
    pub(crate) fn timed(self) -> bool {
        self.timed
    }
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("name", &self.name)
            .field("sample_every", &(self.sample_mask + 1))
            .finish_non_exhaustive()
    }
}

/// Histograms bound to one lock's attribute sets on one provider's instruments, each bound the
/// first time it is recorded (a lock never taken shared exports no shared series).
struct Bound {
    instruments: Arc<Instruments>,
    /// `lock.duration` by [mode][contended].
    duration: [[OnceLock<BoundHistogram<f64>>; 2]; 2],
    /// `lock.wait.duration` by [mode][outcome].
    wait: [[OnceLock<BoundHistogram<f64>>; 5]; 2],
}

impl Bound {
    fn new(instruments: Arc<Instruments>) -> Bound {
        Bound {
            instruments,
            duration: Default::default(),
            wait: Default::default(),
        }
    }
}

thread_local! {
    /// This thread's sampling generator (xorshift64; 0 until seeded).
    static DRAW: Cell<u64> = const { Cell::new(0) };
}

/// A number from this thread's generator: the timing sample of the `sync` locks, drawn without
/// reading a line another thread writes (a lock's hold count is on the line its holders hand
/// over; reading it right after taking the lock can miss) and without aliasing (a per-thread
/// count would time only one of two locks a loop takes in turn).
#[inline(always)]
fn draw() -> u64 {
    DRAW.try_with(|c| {
        let mut x = c.get();
        if x == 0 {
            x = seed(c);
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.set(x);
        x
    })
    // A thread being torn down: time it (rare, and never biased by duration).
    .unwrap_or(0)
}

/// A nonzero seed for this thread's generator, from the address of its state (splitmix64).
#[cold]
#[inline(never)]
fn seed(c: &Cell<u64>) -> u64 {
    let mut z = (std::ptr::from_ref(c).addr() as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

impl Recorder {
    /// A recorder for the lock `spec` describes.
    pub(crate) fn new(spec: Spec<'_>) -> Arc<Recorder> {
        let mut base = vec![
            KeyValue::new(keys::LOCK_NAME, spec.name.to_owned()),
            KeyValue::new(keys::LOCK_KIND, spec.kind.to_owned()),
        ];
        if let Some(fs) = spec.fs_type {
            base.push(KeyValue::new(keys::FS_TYPE, fs));
        }
        base.extend_from_slice(spec.extra);
        let sample_mask = u64::from(spec.sample_every.max(1).next_power_of_two()) - 1;
        let series = spec.sink.registry().series(&base);
        let r = Arc::new(Recorder {
            shards: Default::default(),
            sample_mask,
            // The first acquisition is timed, as the first after a collection is.
            sample: Line(AtomicU64::new(0)),
            name: spec.name.to_owned(),
            base,
            bound: ArcSwap::from_pointee(Bound::new(spec.sink.instruments())),
            sink: spec.sink.clone(),
            series,
            checks: Line(AtomicU32::new(GLOBAL_CHECK_EVERY)),
            kind: spec.kind.to_owned(),
            fs_type: spec.fs_type,
            thresholds: Thresholds::new(spec.slow_wait, spec.slow_hold),
            profile: ProfileSlot::default(),
            contention: Contention::default(),
            word: std::sync::Mutex::default(),
            kept: Kept::default(),
            pending: Default::default(),
        });
        r.series.join(Arc::downgrade(&r));
        r
    }

    /// The lock's `lock.name`.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    // ---- counts -------------------------------------------------------------------------

    /// Adds one to counter `i` in this thread's shard; returns the shard's previous value.
    #[inline(always)]
    fn bump(&self, i: usize) -> u64 {
        let slot = shard::slot();
        shard::bump(&self.shards[slot], slot, i)
    }

    /// Counter `i` summed over all shards.
    fn total(&self, i: usize) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0[i].load(Relaxed))
            .fold(0, u64::wrapping_add)
    }

    /// All counts of this lock now.
    pub(crate) fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for m in 0..2 {
            for c in 0..2 {
                t.acquisitions[m][c] = self.total(shard::acquisitions(m, c));
            }
            t.releases[m] = self.total(shard::releases(m));
            t.conflicts[m] = self.total(shard::conflicts(m));
        }
        t.add(&self.word_lock().totals());
        t
    }

    fn word_lock(&self) -> std::sync::MutexGuard<'_, Word> {
        // Nothing panics while it is held; a poisoned one is as good.
        self.word
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A `sync::Mutex` or `sync::RwLock` records here and keeps counts in `word`.
    ///
    /// # Safety
    ///
    /// The raw lock `word` points to stays valid until [`Self::detach`] is called (by the
    /// lock's drop).
    pub(crate) unsafe fn attach(&self, word: Word) {
        *self.word_lock() = word;
    }

    /// The lock whose word is attached goes away: keeps its last counts.
    pub(crate) fn detach(&self) {
        let mut w = self.word_lock();
        *w = Word::Gone(w.totals());
    }

    /// The kept wait of an exclusive in-process hold (see [`Self::kept`]).
    #[cold]
    pub(crate) fn keep_wait(&self, start: Ticks, holder: Option<Site>) {
        self.kept.wait_start.store(start.raw(), Relaxed);
        let p: *const std::panic::Location<'static> = holder.map_or(std::ptr::null(), |h| h);
        self.kept.waited_for.store(p.cast_mut(), Relaxed);
    }

    /// The wait kept by [`Self::keep_wait`], read by the same holder before it releases.
    #[cold]
    pub(crate) fn kept_wait(&self) -> (Ticks, Option<Site>) {
        let start = Ticks::from_raw(self.kept.wait_start.load(Relaxed));
        // SAFETY: only `&'static Location` pointers or null are stored (`keep_wait`).
        let holder = unsafe { self.kept.waited_for.load(Relaxed).cast_const().as_ref() };
        (start, holder)
    }

    /// Whether the hold numbered `n` (or drawn, [`Self::hold_sampled`]) is timed; returns its
    /// start if so.
    #[inline(always)]
    pub(crate) fn hold_numbered(&self, n: u64) -> Option<HoldStart> {
        if n & self.sample.load(Relaxed) == 0 {
            self.sampled_start()
        } else {
            None
        }
    }

    /// Whether an uncontended acquisition of a `sync` lock is timed (1 in `sample_mask + 1` by
    /// this thread's draw, or the first after a collection); returns its start if so.
    #[inline(always)]
    pub(crate) fn hold_sampled(&self) -> Option<HoldStart> {
        self.hold_numbered(draw())
    }

    /// Whether a contended acquisition of a `sync` lock is timed, drawn as
    /// [`Self::hold_sampled`]'s.
    #[inline]
    pub(crate) fn wait_sampled(&self) -> bool {
        self.sampled(draw())
    }

    /// The hold after a `sync::Mutex` or `RwLock` writer's wait begins (the lock counted it;
    /// `timed`: the wait is in the timing sample): reads the clock, the only work inside the
    /// critical section; the guard records the wait after its release.
    #[cold]
    #[inline(never)]
    pub(crate) fn waited_hold(&self, timed: bool) -> HoldStart {
        let now = Ticks::now();
        if timed {
            HoldStart::new(now, true)
        } else {
            HoldStart::contended_untimed(now)
        }
    }

    /// A collection happened: time the next acquisition whatever its number.
    pub(crate) fn tick(&self) {
        if self.sample_mask != 0 {
            self.sample.store(0, Relaxed);
        }
    }

    /// An uncontended acquisition of a tokio lock in `mode`, counted in this thread's shard;
    /// returns the start of the hold if this one is timed.
    #[cfg(feature = "tokio")]
    #[inline(always)]
    pub(crate) fn acquired_uncontended(&self, mode: LockMode) -> Option<HoldStart> {
        self.hold_numbered(self.bump(shard::acquisitions(mode.idx(), 0)))
    }

    /// Counts a release (the hold, if timed, is recorded separately by [`Self::hold_done`], so
    /// a guard can do that after unlocking).
    #[inline(always)]
    pub(crate) fn count_release(&self, mode: LockMode) {
        let slot = shard::current();
        shard::bump(&self.shards[slot], slot, shard::releases(mode.idx()));
    }

    /// Counts a conflict.
    #[inline]
    pub(crate) fn conflict(&self, mode: LockMode) {
        self.bump(shard::conflicts(mode.idx()));
    }

    /// Counts an acquisition; returns its number (in this thread's shard).
    #[inline]
    pub(crate) fn acquired(&self, mode: LockMode, contended: bool) -> u64 {
        self.bump(shard::acquisitions(mode.idx(), usize::from(contended)))
    }

    /// Starts timing a sampled uncontended acquisition's hold. Its wait (0 s: one successful
    /// try, inside the lowest bucket) is recorded with the hold, in [`Self::hold_done`], after
    /// the lock is released: nothing but a clock read inside the critical section.
    #[cold]
    #[inline(never)]
    fn sampled_start(&self) -> Option<HoldStart> {
        self.restore_sample_mask();
        Some(HoldStart::new(Ticks::now(), false))
    }

    /// Records a timed hold that ended now, acquired at `site`: a slow one at once, any other
    /// with this thread's next [`PENDING`] (see [`Pending`]).
    #[cold]
    #[inline(never)]
    pub(crate) fn hold_done(&self, mode: LockMode, since: HoldStart, site: Option<Site>) {
        let hold = PendingHold {
            secs: since.at().elapsed_secs(),
            mode,
            contended: since.contended(),
            site,
        };
        if hold.secs >= self.thresholds.hold {
            self.record_holds(&self.bound(), &[hold]);
            return;
        }
        let buf = self.pending[shard::current()].get_or_init(Default::default);
        let mut p = buf.lock();
        let mut fills = None;
        if p.len + 1 == PENDING {
            // This one fills the slot. The instruments first, and not under the slot's lock:
            // binding may make them, which waits for a running collection, and a collection
            // waits for this lock. (Meanwhile the slot can only have been emptied: whoever
            // fills it records it.)
            drop(p);
            fills = Some(self.bound());
            p = buf.lock();
        }
        let n = p.len;
        p.holds[n] = hold;
        p.len = n + 1;
        if let (PENDING, Some(b)) = (p.len, fills) {
            // Recorded under the slot's lock, so that a collection that finds the slot empty
            // does not read before these are in.
            p.len = 0;
            self.record_holds(&b, &p.holds);
        }
    }

    /// Records the holds every thread has kept (a collection, a profile reader, the lock's
    /// drop). Never makes instruments nor waits for them ([`Self::bound_known`]).
    pub(crate) fn record_pending(&self) {
        let mut b = None;
        for buf in self.pending.iter().filter_map(OnceLock::get) {
            let mut p = buf.lock();
            let n = p.len;
            if n > 0 {
                p.len = 0;
                let b = b.get_or_insert_with(|| self.bound_known());
                self.record_holds(b, &p.holds[..n]);
            }
        }
    }

    #[cold]
    #[inline(never)]
    fn record_holds(&self, b: &Bound, holds: &[PendingHold]) {
        for h in holds {
            if !h.contended {
                // The wait of a timed uncontended acquisition, recorded here rather than
                // inside the critical section.
                self.record_wait_in(b, h.mode, Outcome::Acquired, 0.0);
            }
            self.record_hold_in(b, h.mode, h.contended, h.secs);
            if let Some(site) = h.site {
                self.held(h.mode, site, h.secs);
            }
        }
    }

    /// A try found the lock taken and the caller will wait (a `sync::RwLock` reader or a tokio
    /// lock): [`Self::waiting`], then reads the clock outside any critical section.
    #[cold]
    #[inline(never)]
    pub(crate) fn contended_start(&self, mode: LockMode) -> WaitStart {
        WaitStart {
            timed: self.waiting(mode),
            at: Ticks::now(),
        }
    }

    /// A try found the lock taken and the caller will wait: counts the conflict now (those
    /// waiters do not give up, so a stuck one shows at once; a cancelled tokio wait is recorded
    /// as such) and decides whether this wait is timed (1 in N conflicts, the same rate as
    /// uncontended acquisitions, so the histograms' mix stays unbiased). A `sync::RwLock`
    /// writer calls it alone: it reads the clock only if the wait is timed or parks.
    #[cold]
    pub(crate) fn waiting(&self, mode: LockMode) -> bool {
        self.sampled(self.bump(shard::conflicts(mode.idx())))
    }

    /// A `sync::RwLock` reader got the lock after waiting since `w`, the last holder having
    /// acquired at `holder`: records the wait at once (other readers are not held up by it);
    /// returns the start of the hold if the wait is timed.
    #[cold]
    #[inline(never)]
    pub(crate) fn read_acquired_contended(
        &self,
        w: WaitStart,
        site: Site,
        holder: Option<Site>,
    ) -> Option<HoldStart> {
        let now = Ticks::now();
        self.wait_done(
            LockMode::Shared,
            site,
            holder,
            w.at.secs_until(now),
            w.timed,
        );
        w.timed.then(|| HoldStart::new(now, true))
    }

    /// An in-process lock's wait of `secs` at `site` that ended a hold acquired at `holder`:
    /// into the profile if at least [`PROFILE_EVERY_WAIT_FROM`], or if `timed` (standing for
    /// the `sample_every` waits it was sampled from); into `lock.wait.duration` if `timed`; a
    /// slow-wait event if slow, timed or not.
    #[cold]
    pub(crate) fn wait_done(
        &self,
        mode: LockMode,
        site: Site,
        holder: Option<Site>,
        secs: f64,
        timed: bool,
    ) {
        // Waits long enough to have parked cost far more than a profile entry: all of them go
        // in. Shorter ones (a few spins) go in by the timing sample, each standing for the
        // `sample_every` it was drawn from, so the profile's counts and totals stay unbiased.
        let weight = if secs >= PROFILE_EVERY_WAIT_FROM {
            1
        } else if timed {
            self.sample_mask + 1
        } else {
            0
        };
        self.profile_wait(mode, site, holder, secs, weight);
        if timed {
            self.record_wait(mode, Outcome::Acquired, secs);
        }
    }

    /// A waiter stops waiting ([`Self::contended_start`]) without the lock (cancelled):
    /// returns its wait in seconds.
    #[cfg(feature = "tokio")]
    #[cold]
    pub(crate) fn wait_abandoned(&self, w: WaitStart) -> f64 {
        w.at.elapsed_secs()
    }

    /// Whether the acquisition (or failed acquire) numbered `n` is timed: 1 in N by number, or
    /// the first since the last collection.
    #[inline(always)]
    pub(crate) fn sampled(&self, n: u64) -> bool {
        let timed = n & self.sample.load(Relaxed) == 0;
        if timed {
            self.restore_sample_mask();
        }
        timed
    }

    /// Puts the sampling mask back after a collection asked for the next acquisition to be
    /// timed.
    #[inline(always)]
    fn restore_sample_mask(&self) {
        // Only when changed: a store on every timed acquisition would pull this line (read by
        // every acquisition on every thread) away from the other cores.
        if self.sample_mask != 0 && self.sample.load(Relaxed) == 0 {
            self.sample.store(self.sample_mask, Relaxed);
        }
    }

    /// The contended acquire ([`Self::contended_start`]) got the lock: counts it and reads
    /// the clock, nothing more inside the critical section; returns the start of the hold if
    /// the wait is timed, and the wait's end (for the guard to turn into seconds and record
    /// after its release, [`Self::wait_done`]).
    #[cfg(feature = "tokio")]
    #[inline]
    pub(crate) fn contended_acquired(
        &self,
        mode: LockMode,
        w: WaitStart,
    ) -> (Option<HoldStart>, Ticks) {
        self.bump(shard::acquisitions(mode.idx(), 1));
        let now = Ticks::now();
        (w.timed.then(|| HoldStart::new(now, true)), now)
    }

    /// A waiter got the lock: no longer waiting; where the holder that released it acquired.
    #[cold]
    pub(crate) fn wait_over(&self) -> Option<Site> {
        let p = self
            .contention
            .releaser
            .load(std::sync::atomic::Ordering::Acquire);
        self.contention.waiters.fetch_sub(1, Relaxed);
        // SAFETY: only `&'static Location` pointers are ever stored (see `releasing`).
        unsafe { p.cast_const().as_ref() }
    }

    /// A file lock's blocking acquire starts waiting (it counts its conflict itself).
    #[cold]
    pub(crate) fn wait_begins(&self) {
        self.contention.waiters.fetch_add(1, Relaxed);
    }

    /// A holder that acquired at `site` releases: if anyone waits, tell them where (inline:
    /// one load of a line nobody writes while nobody waits).
    #[inline(always)]
    pub(crate) fn releasing(&self, site: Site) {
        if self.contention.waiters.load(Relaxed) != 0 {
            self.publish_releaser(site);
        }
    }

    /// Whether anyone waits for this lock in this process.
    #[inline(always)]
    pub(crate) fn has_waiters(&self) -> bool {
        self.contention.waiters.load(Relaxed) != 0
    }

    #[cold]
    #[inline(never)]
    fn publish_releaser(&self, site: Site) {
        let p: *const std::panic::Location<'static> = site;
        self.contention
            .releaser
            .store(p.cast_mut(), std::sync::atomic::Ordering::Release);
    }

    /// A wait of `secs` at `site`, ended by a holder that acquired at `holder`: into the
    /// profile, and a `lock.slow_wait` event if it was slow.
    #[cold]
    pub(crate) fn waited(&self, mode: LockMode, site: Site, holder: Option<Site>, secs: f64) {
        self.profile_wait(mode, site, holder, secs, 1);
    }

    /// A wait standing for `weight` waits (0: none) into the profile, and a `lock.slow_wait`
    /// event if it was slow (whatever its weight).
    fn profile_wait(
        &self,
        mode: LockMode,
        site: Site,
        holder: Option<Site>,
        secs: f64,
        weight: u64,
    ) {
        if weight != 0 {
            if let Some(t) = self.profile.get(&self.name, &self.kind) {
                t.add_wait(site, holder, secs, weight);
            }
        }
        if secs >= self.thresholds.wait {
            profile::slow_wait(&self.event_attrs_for(mode), site, holder, secs);
        }
    }

    /// A timed hold of `secs` acquired at `site`: into the profile, and a `lock.slow_hold`
    /// event if it was slow.
    #[cold]
    pub(crate) fn held(&self, mode: LockMode, site: Site, secs: f64) {
        if let Some(t) = self.profile.get(&self.name, &self.kind) {
            t.add(site, profile::Event::Held(secs));
        }
        if secs >= self.thresholds.hold {
            profile::slow_hold(&self.event_attrs_for(mode), site, secs);
        }
    }

    /// Whether a wait of `secs` is slow for this lock.
    pub(crate) fn is_slow_wait(&self, secs: f64) -> bool {
        secs >= self.thresholds.wait
    }

    fn event_attrs_for(&self, mode: LockMode) -> EventAttrs<'_> {
        EventAttrs {
            name: &self.name,
            kind: &self.kind,
            mode,
            fs_type: self.fs_type,
        }
    }

    /// Whether this thread's next file lock acquire is timed: decided before the lock call, by
    /// the number of this thread's acquire attempts (or the first after a collection), so no
    /// clock is read for the others (a clock read is a few per cent of an uncontended
    /// `flock` + unlock on a VM).
    #[inline(always)]
    pub(crate) fn file_attempt_timed(&self) -> bool {
        let n = self.bump(shard::ATTEMPTS);
        n & self.sample.load(Relaxed) == 0
    }

    /// Starts timing an acquire the sample picked ([`Self::file_attempt_timed`]).
    #[cold]
    #[inline(never)]
    pub(crate) fn timed_start(&self) -> Ticks {
        self.restore_sample_mask();
        Ticks::now()
    }

    // ---- timing -------------------------------------------------------------------------

    /// The bound histograms, bound again first if the global provider changed.
    #[inline]
    fn bound(&self) -> arc_swap::Guard<Arc<Bound>> {
        let b = self.bound.load();
        if self.sink.is_global() && (b.instruments.noop || self.check_due()) {
            return self.rebind(b);
        }
        b
    }

    /// Counts down to the next look at the global provider (a racy countdown is fine: it
    /// only spaces the looks out).
    #[inline]
    fn check_due(&self) -> bool {
        let n = self.checks.load(Relaxed);
        if n <= 1 {
            self.checks.store(GLOBAL_CHECK_EVERY, Relaxed);
            true
        } else {
            self.checks.store(n - 1, Relaxed);
            false
        }
    }

    /// [`Self::bound`] without making instruments or waiting for them: bound again only to
    /// the global provider's instruments lockmeter has made already
    /// ([`known_global_instruments`]; it has for any provider whose collection is running).
    fn bound_known(&self) -> arc_swap::Guard<Arc<Bound>> {
        let b = self.bound.load();
        if !self.sink.is_global() {
            return b;
        }
        match known_global_instruments() {
            Some(now) => self.bind_to(b, now),
            None => b,
        }
    }

    /// `b`, or, if it is bound to other instruments than `now`, a binding to `now`.
    fn bind_to(
        &self,
        b: arc_swap::Guard<Arc<Bound>>,
        now: Arc<Instruments>,
    ) -> arc_swap::Guard<Arc<Bound>> {
        if Arc::ptr_eq(&now, &b.instruments) {
            return b;
        }
        self.bound.store(Arc::new(Bound::new(now)));
        self.bound.load()
    }

    #[cold]
    #[inline(never)]
    fn rebind(&self, b: arc_swap::Guard<Arc<Bound>>) -> arc_swap::Guard<Arc<Bound>> {
        self.bind_to(b, global_instruments())
    }

    /// The lock's attributes plus `lock.mode` and `more`.
    #[cold]
    fn attrs(&self, mode: LockMode, more: KeyValue) -> Vec<KeyValue> {
        let mut v = Vec::with_capacity(self.base.len() + 2);
        v.extend_from_slice(&self.base);
        v.push(KeyValue::new(keys::LOCK_MODE, mode.as_str()));
        v.push(more);
        v
    }

    /// Records a hold time.
    #[inline]
    pub(crate) fn record_hold(&self, mode: LockMode, contended: bool, secs: f64) {
        self.record_hold_in(&self.bound(), mode, contended, secs);
    }

    #[inline]
    fn record_hold_in(&self, b: &Bound, mode: LockMode, contended: bool, secs: f64) {
        b.duration[mode.idx()][usize::from(contended)]
            .get_or_init(|| {
                b.instruments
                    .duration
                    .bind(&self.attrs(mode, KeyValue::new(keys::LOCK_CONTENDED, contended)))
            })
            .record(secs);
    }

    /// Records the wait of an acquire call with its outcome.
    #[inline]
    pub(crate) fn record_wait(&self, mode: LockMode, outcome: Outcome, secs: f64) {
        self.record_wait_in(&self.bound(), mode, outcome, secs);
    }

    #[inline]
    fn record_wait_in(&self, b: &Bound, mode: LockMode, outcome: Outcome, secs: f64) {
        b.wait[mode.idx()][outcome as usize]
            .get_or_init(|| {
                b.instruments
                    .wait
                    .bind(&self.attrs(mode, KeyValue::new(keys::LOCK_OUTCOME, outcome.as_str())))
            })
            .record(secs);
    }

    // ---- rare events ----------------------------------------------------------------------

    #[cold]
    fn event_attrs(&self, more: &[KeyValue]) -> Vec<KeyValue> {
        let mut v = Vec::with_capacity(self.base.len() + more.len());
        v.extend_from_slice(&self.base);
        v.extend_from_slice(more);
        v
    }

    /// Counts an error (`lock.errors`) with its operation and error type (an errno name, or a
    /// client's error kind).
    #[cold]
    pub(crate) fn error(&self, operation: &str, error_type: &str) {
        let attrs = self.event_attrs(&[
            KeyValue::new(keys::LOCK_OPERATION, operation.to_owned()),
            KeyValue::new(keys::ERROR_TYPE, error_type.to_owned()),
        ]);
        self.sink.instruments().errors.add(1, &attrs);
    }

    /// Counts an inode migration.
    #[cold]
    pub(crate) fn migration(&self, kind: MigrationKind, at: DetectedAt) {
        let attrs = self.event_attrs(&[
            KeyValue::new(keys::MIGRATION_KIND, kind.as_str()),
            KeyValue::new(keys::MIGRATION_DETECTED_AT, at.as_str()),
        ]);
        self.sink.instruments().migrations.add(1, &attrs);
    }

    /// Counts an exclusion violation.
    #[cold]
    pub(crate) fn violation(&self) {
        self.sink.instruments().violations.add(1, &self.base);
    }

    /// Counts a hold lost without a release.
    #[cold]
    pub(crate) fn lost(&self, reason: LostReason) {
        let attrs = self.event_attrs(&[KeyValue::new(keys::LOCK_LOST_REASON, reason.as_str())]);
        self.sink.instruments().lost.add(1, &attrs);
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.record_pending();
        // The lock goes away; its counts stay in its series.
        let totals = self.totals();
        self.series.retire(self, &totals);
    }
}
