//! Instrumented drop-ins for `std::sync::Mutex` and `std::sync::RwLock`.
//!
//! Same API shape and poisoning as std; each lock is named at construction and records the
//! metric schema with `lock.kind` = `mutex` / `rwlock`:
//!
//! ```
//! use lockmeter::sync::Mutex;
//!
//! let cache = Mutex::named("cache", Vec::<u32>::new());
//! cache.lock().unwrap().push(1);
//! assert_eq!(cache.lock().unwrap().len(), 1);
//! ```
//!
//! The lock underneath is `parking_lot`'s, not std's (std's cannot be built on: it offers
//! no way to wait for a lock found taken without another compare-and-swap, and that second
//! write on the lock's cache line, plus no back-off while spinning, cost a third of std's own
//! two-thread contended throughput). What you see is std's: `lock`/`try_lock`/`read`/`write`
//! return `LockResult`/`TryLockResult`, a panic while holding a `Mutex` or a `RwLock` write
//! guard poisons the lock, `is_poisoned`/`clear_poison`/`into_inner`/`get_mut` behave as
//! std's, and `Send`/`Sync` bounds are std's. What differs is parking_lot's: waiters spin with
//! back-off before parking, and the lock is *eventually fair* (about every 0.5 ms a release
//! hands the lock to a waiter instead of letting the releasing thread take it straight
//! back). As with std, a thread that locks a mutex it already holds deadlocks, and a recursive
//! `read` may deadlock if a writer is waiting.
//!
//! Cost model: the uncontended path is the lock's own try plus a plain load and store into
//! this thread's shard of the lock's counters, which the SDK reads when it collects (see
//! [`crate::metrics`]). Timing (two clock reads and two histogram records) is done for 1 in
//! `sample_every` acquisitions (default 64, a power of two; [`MutexBuilder::sample_every`])
//! plus the first after each metrics collection, chosen without regard to durations, among
//! uncontended and contended ones alike, so the histograms' quantiles are unbiased estimates
//! and locks taken less often than metrics are collected are timed every time. Only the clock
//! reads happen while the lock is held; the records are made after the release. Memory: each
//! lock's counters take ~1.2 KB (one 128-byte shard per thread slot), allocated once at
//! construction. `lock_acquisitions_total`, `lock_conflicts_total` and `lock_held` are exact:
//! every acquisition and every contended wait is counted. `sample_every(1)` times every
//! acquisition. An uncontended timed acquisition, and a `try_*` that found the lock taken,
//! record a wait of 0 s: one attempt of a few nanoseconds, inside the lowest bucket (1 µs).
//! Measured costs: the README's overhead table and `cargo bench -p lockmeter --bench mutex`.
//!
//! Leaked guards and panics: a guard leaked with `mem::forget` never unlocks the lock
//! either, so `lock_held` stays raised, which is the truth. A thread that panics while holding
//! the lock drops the guard during unwinding: the release is counted and, as with std, the lock
//! is poisoned.

use std::fmt;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::panic::Location;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering::Relaxed};
use std::sync::{Arc, LockResult, PoisonError, TryLockError, TryLockResult};
use std::time::Duration;

use crate::clock::HoldStart;
use crate::kind::LockMode;
use crate::metrics::{shard, Outcome, Recorder, Sink, Spec};
use crate::profile::Site;

/// Default timing sample of the in-process wrappers (`sync`, `tokio`): 1 in this many
/// acquisitions, plus the first after each metrics collection, records wait and hold times;
/// counts are always exact. Lower than file locks' ([`crate::metrics::DEFAULT_SAMPLE_EVERY`],
/// 16): two histogram records cost several bare mutex cycles, and more when two cores record
/// into the same histogram.
pub const DEFAULT_SAMPLE_EVERY: u32 = 64;

/// What the in-process wrappers' builders set.
#[derive(Debug)]
pub(crate) struct Options {
    pub(crate) name: String,
    pub(crate) sink: Sink,
    pub(crate) sample_every: u32,
    pub(crate) slow_wait: Option<Duration>,
    pub(crate) slow_hold: Option<Duration>,
}

impl Options {
    pub(crate) fn new(name: String) -> Options {
        Options {
            name,
            sink: Sink::global(),
            sample_every: DEFAULT_SAMPLE_EVERY,
            slow_wait: None,
            slow_hold: None,
        }
    }

    /// The lock's recorder, with `lock.kind` = `kind`.
    pub(crate) fn recorder(self, kind: &str) -> Arc<Recorder> {
        Recorder::new(Spec {
            slow_wait: self.slow_wait,
            slow_hold: self.slow_hold,
            ..Spec::new(&self.sink, &self.name, kind, self.sample_every)
        })
    }
}

/// Generates a builder type for one in-process lock type: `sink`, `sample_every`, `build`.
macro_rules! builder {
    ($(#[$doc:meta])* $builder:ident => $lock:ident, $new:expr) => {
        $(#[$doc])*
        #[derive(Debug)]
        #[must_use = "call .build(value) to create the lock"]
        pub struct $builder(crate::sync::Options);

        impl $builder {
            /// Where to record (default [`Sink::global`](crate::metrics::Sink::global)).
            pub fn sink(mut self, sink: crate::metrics::Sink) -> Self {
                self.0.sink = sink;
                self
            }

            /// Time 1 in `n` acquisitions, uncontended and contended alike, plus the first
            /// after each metrics collection (`n` rounded up to a power of two; default
            /// [`DEFAULT_SAMPLE_EVERY`](crate::sync::DEFAULT_SAMPLE_EVERY), 64; `1` times every
            /// one). Counts are always exact.
            pub fn sample_every(mut self, n: u32) -> Self {
                self.0.sample_every = n.max(1);
                self
            }

            /// Report acquires that waited at least `d` as `lock.slow_wait` events (default
            /// [`profile::default_slow_wait`](crate::profile::default_slow_wait): 10 ms or
            /// `LOCKMETER_SLOW_WAIT_MS`). See [`crate::profile`].
            pub fn slow_wait(mut self, d: std::time::Duration) -> Self {
                self.0.slow_wait = Some(d);
                self
            }

            /// Report timed holds of at least `d` as `lock.slow_hold` events (default
            /// [`profile::default_slow_hold`](crate::profile::default_slow_hold): 100 ms or
            /// `LOCKMETER_SLOW_HOLD_MS`). See [`crate::profile`].
            pub fn slow_hold(mut self, d: std::time::Duration) -> Self {
                self.0.slow_hold = Some(d);
                self
            }

            #[doc = concat!("Builds the [`", stringify!($lock), "`] holding `value`.")]
            pub fn build<T>(self, value: T) -> $lock<T> {
                let new: fn(crate::sync::Options, T) -> $lock<T> = $new;
                new(self.0, value)
            }
        }
    };
}
#[cfg(feature = "tokio")]
pub(crate) use builder;

/// What a guard needs to record its release.
#[cfg(feature = "tokio")]
pub(crate) struct Hold<'a> {
    pub(crate) recorder: &'a Recorder,
    pub(crate) mode: LockMode,
    /// Set when this acquisition is timed.
    pub(crate) since: Option<HoldStart>,
    /// Where it was acquired.
    pub(crate) site: Site,
}

#[cfg(feature = "tokio")]
impl Hold<'_> {
    /// Counts the release and records the hold if this acquisition is timed.
    #[inline]
    pub(crate) fn release(&self) {
        self.recorder.released(self.mode, self.since, self.site);
    }
}

/// Counts an uncontended acquisition; for 1 in N starts timing it (its wait, 0 s: one
/// successful try, a few nanoseconds, inside the lowest bucket, is recorded with the hold).
#[cfg(feature = "tokio")]
#[inline]
pub(crate) fn uncontended(recorder: &Recorder, mode: LockMode, site: Site) -> Hold<'_> {
    let since = recorder.acquired_uncontended_in(shard::slot(), mode);
    Hold {
        recorder,
        mode,
        since,
        site,
    }
}

/// Wraps `g` as std does: `Err(PoisonError)` when the lock was poisoned.
#[inline(always)]
fn poison<G>(g: G, poisoned: bool) -> LockResult<G> {
    if poisoned {
        Err(PoisonError::new(g))
    } else {
        Ok(g)
    }
}

/// What sits beside the lock word: std's poison flag (std's own is private), set when a
/// `Mutex` guard or an `RwLock` write guard is dropped by a thread that started panicking while
/// holding it, and the call site of the latest acquisition, which a releasing holder hands to
/// waiters (the lock profile's "caused" column). Written by the holder, on the line it owns.
#[derive(Debug, Default)]
#[repr(align(8))]
struct State {
    poisoned: AtomicBool,
    site: AtomicPtr<Location<'static>>,
}

impl State {
    #[inline(always)]
    fn poisoned(&self) -> bool {
        self.poisoned.load(Relaxed)
    }

    /// Records where the lock was just acquired.
    #[inline(always)]
    fn acquired_at(&self, site: Site) {
        let p: *const Location<'static> = site;
        self.site.store(p.cast_mut(), Relaxed);
    }

    /// Where the lock was last acquired (by the caller, while it holds the lock exclusively;
    /// by the latest reader for shared holds).
    #[inline]
    fn site(&self) -> Option<Site> {
        // SAFETY: only `&'static Location` pointers are stored (`acquired_at`).
        unsafe { self.site.load(Relaxed).cast_const().as_ref() }
    }
}

/// A guard's reference to its lock's [`State`], with whether the guard poisons the lock if its
/// thread panics in the low bit (exclusive guards taken while not panicking, as std). One word:
/// the guard stays four words, small enough for its drop to be inlined.
#[derive(Clone, Copy)]
struct StateRef<'a> {
    tagged: std::ptr::NonNull<State>,
    _lock: std::marker::PhantomData<&'a State>,
}

// SAFETY: a `StateRef` is a `&State` plus a bit; `State` is all atomics.
unsafe impl Send for StateRef<'_> {}
// SAFETY: as above.
unsafe impl Sync for StateRef<'_> {}

impl<'a> StateRef<'a> {
    #[inline(always)]
    fn new(state: &'a State, poisons: bool) -> StateRef<'a> {
        let p = std::ptr::NonNull::from(state);
        StateRef {
            // `State` is 8-aligned: bit 0 of its address is free.
            tagged: p.map_addr(|a| a | usize::from(poisons)),
            _lock: std::marker::PhantomData,
        }
    }

    #[inline(always)]
    fn get(self) -> &'a State {
        // SAFETY: built from a `&'a State` in `new`; clearing the tag bit restores its address.
        unsafe {
            self.tagged
                .map_addr(|a| std::num::NonZeroUsize::new(a.get() & !1).unwrap_or(a))
                .as_ref()
        }
    }

    /// Whether dropping the guard while panicking poisons the lock.
    #[inline(always)]
    fn poisons(self) -> bool {
        self.tagged.addr().get() & 1 != 0
    }
}

/// The release of a timed hold, or one someone waits for: counts it, tells waiters where the
/// hold was acquired (read while still held: the next holder overwrites it), poisons as std,
/// unlocks (drops `inner`), then records the hold outside the critical section.
#[cold]
#[inline(never)]
fn release_rare<G>(
    recorder: &Recorder,
    mode: LockMode,
    since: Option<HoldStart>,
    state: StateRef<'_>,
    inner: G,
) {
    let st = state.get();
    let site = st.site();
    recorder.count_release_holding(mode);
    recorder.releasing_from(|| site);
    if state.poisons() && std::thread::panicking() {
        st.poisoned.store(true, Relaxed);
    }
    drop(inner);
    if let Some(since) = since {
        recorder.hold_done(mode, since, site);
    }
}

/// Generates a guard around a parking_lot guard: counts the release while still holding the
/// lock (so `lock.held` never over-reports), poisons if the thread is panicking, unlocks, then
/// records the hold if it was timed (outside the critical section; a panic there cannot leave
/// the lock held). Also generates `$lock`'s `Wrap` into this guard (`$poisons`: whether a
/// panic while it is held poisons the lock). The inner guard sits in a `ManuallyDrop` so the guard's drop glue is just
/// this `Drop`, small enough to inline: an out-of-line glue call kept the critical section
/// several times longer than the bare lock's and cut contended throughput accordingly.
macro_rules! guard {
    ($(#[$doc:meta])* $guard:ident($inner:ident) of $lock:ident, $mode:expr, poisons $poisons:expr) => {
        $(#[$doc])*
        #[must_use = "the lock is released as soon as the guard is dropped"]
        pub struct $guard<'a, T: ?Sized> {
            recorder: &'a Recorder,
            /// Set when this acquisition is timed.
            since: Option<HoldStart>,
            /// The lock's poison flag and holder's site; whether this guard poisons.
            state: StateRef<'a>,
            inner: ManuallyDrop<parking_lot::$inner<'a, T>>,
        }

        impl<T: ?Sized> Drop for $guard<'_, T> {
            #[inline(always)]
            fn drop(&mut self) {
                // One branch for the rare cases, released out of line: a timed hold, someone
                // waiting. What stays inline is small enough to be inlined wherever a guard
                // is dropped. The rare path gets the fields by value, not `&mut self`: a guard
                // whose address escaped into a call would live in memory, and copying the
                // lock's result into it cost a store-forwarding stall per acquisition.
                if self.since.is_some() | self.recorder.has_waiters() {
                    // SAFETY: `inner` is taken here, once, and never used again.
                    let inner = unsafe { ManuallyDrop::take(&mut self.inner) };
                    release_rare(self.recorder, $mode, self.since, self.state, inner);
                    return;
                }
                self.recorder.count_release_holding($mode);
                if self.state.poisons() && std::thread::panicking() {
                    self.state.get().poisoned.store(true, Relaxed);
                }
                // SAFETY: `inner` is dropped here, once, and never used again.
                unsafe { ManuallyDrop::drop(&mut self.inner) };
            }
        }

        impl<T: ?Sized> Deref for $guard<'_, T> {
            type Target = T;
            fn deref(&self) -> &T {
                &self.inner
            }
        }

        impl<T: ?Sized + fmt::Debug> fmt::Debug for $guard<'_, T> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&**self, f)
            }
        }

        impl<'a, T: ?Sized + 'a> Wrap<'a, parking_lot::$inner<'a, T>> for $lock<T> {
            type Out = $guard<'a, T>;
            #[inline(always)]
            fn wrap(
                &'a self,
                inner: parking_lot::$inner<'a, T>,
                since: Option<HoldStart>,
                site: Site,
            ) -> LockResult<$guard<'a, T>> {
                self.state.acquired_at(site);
                // As std: a guard taken while the thread is already panicking does not poison.
                let poisons = $poisons && !std::thread::panicking();
                let guard = $guard {
                    recorder: &self.recorder,
                    since,
                    state: StateRef::new(&self.state, poisons),
                    inner: ManuallyDrop::new(inner),
                };
                poison(guard, self.state.poisoned())
            }
        }
    };
}

/// Generates the acquire methods of one mode: a blocking one (the lock's non-blocking try
/// first, the hot path: one per-thread counter update; on failure a cold path that counts the
/// conflict, blocks in parking_lot, and times the wait for 1 in N) and a non-blocking one.
/// `$exclusive` says the lock is held exclusively when counters are updated.
macro_rules! acquire {
    ($(#[$doc:meta])* fn $name:ident / $slow:ident, $(#[$tdoc:meta])* fn $try_name:ident -> $guard:ident,
     try $try:ident, block $block:ident -> $inner:ident, $mode:expr, exclusive $exclusive:expr) => {
        $(#[$doc])*
        #[inline(always)]
        #[track_caller]
        pub fn $name(&self) -> LockResult<$guard<'_, T>> {
            let site = Location::caller();
            // Both paths meet with two words in registers and the guard is built inline: a
            // slow path returning the whole `LockResult` would keep it in memory on the fast
            // path too, and copying it out cost a store-forwarding stall per acquisition.
            let (g, since) = match self.inner.$try() {
                Some(g) => (g, self.recorder.acquired_holding($mode)),
                None => self.$slow(site),
            };
            self.wrap(g, since, site)
        }

        #[cold]
        #[inline(never)]
        fn $slow(&self, site: Site) -> (parking_lot::$inner<'_, T>, Option<HoldStart>) {
            let w = self.recorder.contended_start($mode, $exclusive);
            let g = self.inner.$block();
            let since = self.recorder.contended_acquired($mode, $exclusive, w, site);
            (g, since)
        }

        $(#[$tdoc])*
        #[inline]
        #[track_caller]
        pub fn $try_name(&self) -> TryLockResult<$guard<'_, T>> {
            let site = Location::caller();
            match self.inner.$try() {
                Some(g) => {
                    let since = self.recorder.acquired_holding($mode);
                    Ok(self.wrap(g, since, site)?)
                }
                None => Err(self.would_block($mode)),
            }
        }
    };
}

/// Generates what both lock types share: the `WouldBlock` path, poisoning, unlocked access and
/// `Debug`.
macro_rules! common {
    ($lock:ident) => {
        impl<T: ?Sized> $lock<T> {
            #[cold]
            fn would_block<G>(&self, mode: LockMode) -> TryLockError<G> {
                self.recorder.conflict(mode);
                self.recorder.record_wait(mode, Outcome::WouldBlock, 0.0);
                TryLockError::WouldBlock
            }

            /// Whether the lock is poisoned (a holder panicked), as std's.
            pub fn is_poisoned(&self) -> bool {
                self.state.poisoned()
            }

            /// Clears the poisoned state, as std's.
            pub fn clear_poison(&self) {
                self.state.poisoned.store(false, Relaxed);
            }

            /// Mutable access without locking (an error if poisoned, as std).
            pub fn get_mut(&mut self) -> LockResult<&mut T> {
                let poisoned = self.state.poisoned();
                poison(self.inner.get_mut(), poisoned)
            }
        }

        impl<T> $lock<T> {
            /// Consumes the lock, returning the value (an error if poisoned, as std).
            pub fn into_inner(self) -> LockResult<T> {
                let poisoned = self.state.poisoned();
                poison(self.inner.into_inner(), poisoned)
            }
        }

        impl<T: ?Sized + fmt::Debug> fmt::Debug for $lock<T> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($lock))
                    .field("name", &self.recorder.name())
                    .field("inner", &&self.inner)
                    .field("poisoned", &self.state.poisoned())
                    .finish()
            }
        }
    };
}

/// Wraps a parking_lot guard of a lock into lockmeter's (poisoned or not): one impl per guard
/// type (generated by `guard!`), all called `wrap` by the `acquire!` expansions.
trait Wrap<'a, G> {
    type Out;
    fn wrap(&'a self, inner: G, since: Option<HoldStart>, site: Site) -> LockResult<Self::Out>;
}

// ---- Mutex --------------------------------------------------------------------------------

/// An instrumented mutex with `std::sync::Mutex`'s API and poisoning (on parking_lot's lock,
/// see the [module docs](self)). `Send`/`Sync` exactly when std's is.
pub struct Mutex<T: ?Sized> {
    recorder: Arc<Recorder>,
    state: State,
    inner: parking_lot::Mutex<T>,
}

builder! {
    /// Builder for a [`Mutex`]; see [`Mutex::builder`].
    MutexBuilder => Mutex, |o, value| Mutex {
        recorder: o.recorder("mutex"),
        state: State::default(),
        inner: parking_lot::Mutex::new(value),
    }
}

impl<T> Mutex<T> {
    /// A mutex recording as `lock.name = name` on the global meter.
    pub fn named(name: impl Into<String>, value: T) -> Mutex<T> {
        Mutex::builder(name).build(value)
    }
}

impl Mutex<()> {
    /// A builder for a mutex named `name` (sink, sampling); finish with
    /// [`MutexBuilder::build`].
    pub fn builder(name: impl Into<String>) -> MutexBuilder {
        MutexBuilder(Options::new(name.into()))
    }
}

impl<T: ?Sized> Mutex<T> {
    acquire! {
        /// Acquires the mutex, blocking; poisoned as std's is after a panic while held.
        fn lock / lock_contended,
        /// Tries to acquire without blocking; `WouldBlock` is counted as a conflict.
        fn try_lock -> MutexGuard,
        try try_lock, block lock -> MutexGuard, LockMode::Exclusive, exclusive true
    }
}

common!(Mutex);

guard! {
    /// Guard of a [`Mutex`]; `Send`/`Sync` exactly as `std::sync::MutexGuard`.
    MutexGuard(MutexGuard) of Mutex, LockMode::Exclusive, poisons true
}

impl<T: ?Sized> DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

// ---- RwLock -------------------------------------------------------------------------------

/// An instrumented reader-writer lock with `std::sync::RwLock`'s API and poisoning (on
/// parking_lot's lock, see the [module docs](self)): `read` is `lock.mode = shared`, `write`
/// exclusive.
pub struct RwLock<T: ?Sized> {
    recorder: Arc<Recorder>,
    state: State,
    inner: parking_lot::RwLock<T>,
}

builder! {
    /// Builder for an [`RwLock`]; see [`RwLock::builder`].
    RwLockBuilder => RwLock, |o, value| RwLock {
        recorder: o.recorder("rwlock"),
        state: State::default(),
        inner: parking_lot::RwLock::new(value),
    }
}

impl<T> RwLock<T> {
    /// A reader-writer lock recording as `lock.name = name` on the global meter.
    pub fn named(name: impl Into<String>, value: T) -> RwLock<T> {
        RwLock::builder(name).build(value)
    }
}

impl RwLock<()> {
    /// A builder for a lock named `name` (sink, sampling); finish with
    /// [`RwLockBuilder::build`].
    pub fn builder(name: impl Into<String>) -> RwLockBuilder {
        RwLockBuilder(Options::new(name.into()))
    }
}

impl<T: ?Sized> RwLock<T> {
    acquire! {
        /// Shared access, blocking (an error if poisoned, as std; readers never poison).
        fn read / read_contended,
        /// Shared access without blocking.
        fn try_read -> RwLockReadGuard,
        try try_read, block read -> RwLockReadGuard, LockMode::Shared, exclusive false
    }

    acquire! {
        /// Exclusive access, blocking; poisoned as std's is after a panic while held.
        fn write / write_contended,
        /// Exclusive access without blocking.
        fn try_write -> RwLockWriteGuard,
        try try_write, block write -> RwLockWriteGuard, LockMode::Exclusive, exclusive true
    }
}

common!(RwLock);

guard! {
    /// Shared guard of an [`RwLock`].
    RwLockReadGuard(RwLockReadGuard) of RwLock, LockMode::Shared, poisons false
}

guard! {
    /// Exclusive guard of an [`RwLock`].
    RwLockWriteGuard(RwLockWriteGuard) of RwLock, LockMode::Exclusive, poisons true
}

impl<T: ?Sized> DerefMut for RwLockWriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}
