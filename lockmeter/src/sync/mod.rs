//! Instrumented drop-ins for `std::sync::Mutex` and `std::sync::RwLock`.
//!
//! Same API shape and poisoning as std; each lock is named at construction (`named`, or
//! `new`/`Default`/`From`, which name it after the place in the source that makes it: see
//! [`Mutex::new`]) and records the metric schema with `lock.kind` = `mutex` / `rwlock`:
//!
//! ```
//! use lockmeter::sync::Mutex;
//!
//! let cache = Mutex::named("cache", Vec::<u32>::new());
//! cache.lock().unwrap().push(1);
//! assert_eq!(cache.lock().unwrap().len(), 1);
//! ```
//!
//! The locks underneath are lockmeter's own raw locks (`sync/raw.rs` and `sync/raw_rw.rs` in
//! the source): each one 64-bit word that is the lock and also counts its holds (an `RwLock`'s
//! word also counts its readers and the shared holds that waited), with waiters parked in
//! `parking_lot_core`'s parking lot, the one `parking_lot`'s locks use. std's cannot be built
//! on: it offers no way to wait for a lock found taken without another compare-and-swap.
//! What you see is std's: `lock`/`try_lock`/`read`/`write` return `LockResult`/ `TryLockResult`, a
//! panic while holding a `Mutex` or a `RwLock` write guard poisons the lock,
//! `is_poisoned`/`clear_poison`/`into_inner`/`get_mut` behave as std's,
//! [`RwLockWriteGuard::downgrade`] is std's (Rust 1.92) and available on any toolchain the crate
//! builds with, and `Send`/`Sync` bounds are std's. What differs: waiters spin with back-off before
//! parking. `Mutex` is unfair as std's futex mutex is (a released lock goes to whichever thread
//! takes it first, the woken waiter or a newcomer); `RwLock` prefers writers: while a writer is
//! parked, new readers wait, and a release wakes a parked writer before any parked reader (writers
//! may still take a free lock ahead of a woken one). The value lives in the lock's heap block (see
//! Memory below), so a `Mutex<dyn Trait>` or `Mutex<[T]>` cannot be made by unsizing, as std's can.
//! As with std, a thread that locks a mutex it already holds deadlocks, and a recursive `read` may
//! deadlock if a writer is waiting.
//!
//! Cost model. `Mutex`, uncontended: the lock word's own atomic operations (one `lock bts` to take
//! it, one atomic add to count the hold and release it), a draw from a per-thread generator and a
//! load of the sampling mask, and a compare of the holder's call site with the one already stored
//! (stored only when it changes); no counter of its own, and nothing else of the word read (a load
//! right after the `bts` stalls, and under contention can miss). Contended: the waiter that takes
//! the lock counts its wait right away, while the line is still its core's, and releases with the
//! same one atomic add; a wait in the timing sample is measured from its start, any other from its
//! first park (a wait that only spun, a few microseconds at most, reads no clock); everything else
//! (the profile, a slow-wait event, histograms) is done by the guard after the release, outside the
//! critical section. `RwLock`: the same for writers (one compare-and-swap, one atomic add); a
//! reader takes it with one compare-and-swap and releases it with one atomic add that counts the
//! hold; a reader that finds it taken counts the conflict in this thread's shard of the lock's
//! counters (see [`crate::metrics`]) and is timed from there. Timing (two clock reads and two
//! histogram records) is done for 1 in `sample_every` acquisitions (default 64, a power of two;
//! [`MutexBuilder::sample_every`]; drawn at random per thread, so two locks taken in turn are both
//! sampled) plus the first acquisition of a lock and the first after each metrics collection,
//! chosen without regard to durations, among uncontended and contended ones alike, so the
//! histograms' quantiles are unbiased estimates and locks taken less often than metrics are
//! collected are timed every time. The records are made after the release, and not at once: the
//! releasing thread keeps its timed holds in its slot of the lock (its own, or beyond eight threads
//! a shared one) and records eight at a time, and every metrics collection, lock-profile read and
//! the lock's drop record what is kept first, so what they read is complete (a record at each
//! release let the other thread of a contended loop take the lock meanwhile, a handoff per timed
//! hold; a slow hold is recorded at once, its event due now). Memory: two allocations at
//! construction, the lock's recorder (~1.5 KB: one 128-byte counter shard per thread slot, and
//! lines of their own for what every acquisition reads; plus ~200 bytes per thread slot that times
//! a hold, for the holds it keeps) and its block: the raw lock, the poison flag and the last
//! holder's site, then the value, from a 64-byte boundary (a `Mutex`'s value starts 32 bytes in, an
//! `RwLock`'s 104: its word starts the block's second line, after fields a collection reads), so
//! that a small value shares the lock word's line as it does in std's and `parking_lot`'s locks and
//! a hold hands one line from core to core. `lock_acquisitions_total`, `lock_conflicts_total` and
//! `lock_held` are exact: every acquisition and every contended wait is counted, and the SDK reads
//! them when it collects. `sample_every(1)` times every acquisition. An uncontended timed
//! acquisition, and a `try_*` that found the lock taken, record a wait of 0 s: one attempt of a few
//! nanoseconds, inside the lowest bucket (1 µs). Measured costs: the README's overhead table and
//! `cargo bench -p lockmeter-bench --bench sync` (an outside crate, side by side with the locks
//! underneath).
//!
//! Leaked guards and panics: a guard leaked with `mem::forget` never unlocks the lock
//! either, so `lock_held` stays raised, which is the truth. A thread that panics while holding
//! the lock drops the guard during unwinding: the release is counted and, as with std, the lock
//! is poisoned.

use std::cell::UnsafeCell;
use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::panic::Location;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering::Relaxed};
use std::sync::{Arc, LockResult, PoisonError, TryLockError, TryLockResult};
use std::time::Duration;

use crate::clock::{HoldStart, Ticks};
use crate::kind::LockMode;
use crate::metrics::{Outcome, Recorder, Sink, Spec, Word};
use crate::profile::Site;

pub(crate) mod raw;
pub(crate) mod raw_rw;

use raw::RawMutex;
use raw_rw::RawRwLock;

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
    /// Readers at once (a tokio `RwLock`'s `max_readers`; nothing else reads it).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) max_readers: Option<u32>,
}

impl Options {
    pub(crate) fn new(name: String) -> Options {
        Options {
            name,
            sink: Sink::global(),
            sample_every: DEFAULT_SAMPLE_EVERY,
            slow_wait: None,
            slow_hold: None,
            max_readers: None,
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

/// Generates an in-process lock type's constructors: `named`; `new`, named after its call site,
/// and `Default` and `From<T>`, as std's and tokio's locks have them, so that swapping the type
/// is all a drop-in takes.
macro_rules! constructors {
    ($lock:ident, $what:literal) => {
        impl<T> $lock<T> {
            #[doc = concat!("A ", $what, " recording as `lock.name = name` on the global meter.")]
            pub fn named(name: impl Into<String>, value: T) -> $lock<T> {
                $lock::builder(name).build(value)
            }

            #[doc = concat!("A ", $what, " named after the place in the source that creates it")]
            /// (`lock.name` = `src/cache.rs:42`), so that a drop-in swap of the type compiles
            /// as it is. Prefer [`Self::named`] for locks on dashboards and in alert rules: a
            /// line number moves with every edit above it. Every lock created at one place
            /// records into one series (a lock per shard, made in a loop, is one name; so are
            /// the lock fields of a `#[derive(Default)]` struct, all made at the derive's
            /// line). A lock made where the standard library calls `default()` (in
            /// `Arc::default()`, `entry(..).or_default()`) is named after its value's type
            /// instead (`HashMap<String, u64>`); one made in a dependency's code, after the
            /// place there (`dashmap-6.1.0/src/lib.rs:90`). Not `const`, unlike std's: a
            /// `static` one goes in a `LazyLock`.
            #[track_caller]
            pub fn new(value: T) -> $lock<T> {
                $lock::named(crate::sync::site_name::<T>(Location::caller()), value)
            }
        }

        impl<T: Default> Default for $lock<T> {
            /// `T::default()` in a lock named after the caller's place in the source (see
            /// `new`).
            #[track_caller]
            fn default() -> $lock<T> {
                $lock::new(T::default())
            }
        }

        impl<T> From<T> for $lock<T> {
            /// `value` in a lock named after the caller's place in the source (see `new`).
            #[track_caller]
            fn from(value: T) -> $lock<T> {
                $lock::new(value)
            }
        }
    };
}
#[cfg(feature = "tokio")]
pub(crate) use constructors;

/// Generates `Debug` and `Display` for a guard type (`Guard<'_, T>`): the value's, as std's
/// and tokio's guards print.
macro_rules! guard_fmt {
    ($guard:ident) => {
        impl<T: ?Sized + fmt::Debug> fmt::Debug for $guard<'_, T> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&**self, f)
            }
        }

        impl<T: ?Sized + fmt::Display> fmt::Display for $guard<'_, T> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&**self, f)
            }
        }
    };
}
#[cfg(feature = "tokio")]
pub(crate) use guard_fmt;

/// The `lock.name` of a lock holding a `T` made with `new`, `Default` or `From` at `site`: its
/// place in the source, `file:line`; a dependency's file from its crate's directory on; the
/// value's type (without module paths) when the place is inside the standard library, which
/// says nothing about the lock.
#[cold]
pub(crate) fn site_name<T: ?Sized>(site: Site) -> String {
    let file = site.file();
    if file.starts_with("/rustc/") || file.contains("/rustlib/src/rust/library/") {
        return short_type_name(std::any::type_name::<T>());
    }
    // `~/.cargo/registry/src/<index>/<crate>-<version>/...` and `~/.cargo/git/checkouts/...`.
    let file = match file.split_once("/registry/src/") {
        // Past the index's directory: `<crate>-<version>/src/...`.
        Some((_, rest)) => rest.split_once('/').map_or(rest, |(_, in_index)| in_index),
        None => file
            .split_once("/git/checkouts/")
            .map_or(file, |(_, rest)| rest),
    };
    format!("{file}:{}", site.line())
}

/// A type's name without module paths: `HashMap<String, u64>` for
/// `std::collections::hash::map::HashMap<alloc::string::String, u64>`.
fn short_type_name(full: &str) -> String {
    let mut out = String::with_capacity(full.len());
    let mut start = 0;
    for (i, c) in full.char_indices() {
        if !(c.is_alphanumeric() || c == '_' || c == ':') {
            out.push_str(last_segment(&full[start..i]));
            out.push(c);
            start = i + c.len_utf8();
        }
    }
    out.push_str(last_segment(&full[start..]));
    out
}

fn last_segment(path: &str) -> &str {
    path.rsplit("::").next().unwrap_or(path)
}

/// What a tokio guard needs to record its release.
#[cfg(feature = "tokio")]
pub(crate) struct Hold<'a> {
    pub(crate) recorder: &'a Recorder,
    pub(crate) mode: LockMode,
    /// Set when this acquisition is timed.
    pub(crate) since: Option<HoldStart>,
    /// Where it was acquired.
    pub(crate) site: Site,
    /// The wait before it, if it had to wait: its start (and whether it is timed), its end,
    /// and the site of the hold it waited for; turned into seconds and recorded after the
    /// release.
    pub(crate) waited: Option<(crate::metrics::WaitStart, Ticks, Option<Site>)>,
}

#[cfg(feature = "tokio")]
impl Hold<'_> {
    /// Counts the release (before the unlock: `lock.held` never over-reports).
    #[inline]
    pub(crate) fn count_release(&self) {
        self.recorder.count_release(self.mode);
    }

    /// After the unlock: records the wait (profile, slow-wait event, histogram if timed) and
    /// the hold if timed, outside the critical section.
    #[inline]
    pub(crate) fn released(&self) {
        if let Some((start, end, holder)) = self.waited {
            let secs = start.secs_until(end);
            self.recorder
                .wait_done(self.mode, self.site, holder, secs, start.timed());
        }
        if let Some(t) = self.since {
            self.recorder.hold_done(self.mode, t, Some(self.site));
        }
    }
}

/// Counts an uncontended acquisition; for 1 in N starts timing it (its wait, 0 s: one
/// successful try, a few nanoseconds, inside the lowest bucket, is recorded with the hold).
#[cfg(feature = "tokio")]
#[inline]
pub(crate) fn uncontended(recorder: &Recorder, mode: LockMode, site: Site) -> Hold<'_> {
    let since = recorder.acquired_uncontended(mode);
    Hold {
        recorder,
        mode,
        since,
        site,
        waited: None,
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
/// holding it; and the call site of the latest acquisition, which the next waiter to get the
/// lock reads as the site whose hold it waited for (the lock profile's "caused" column).
/// Written by holders, on the line the lock word brings along.
#[derive(Debug, Default)]
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
        if self.site.load(Relaxed) != p.cast_mut() {
            self.site.store(p.cast_mut(), Relaxed);
        }
    }

    /// Where the lock was last acquired (by the caller, while it holds the lock exclusively;
    /// by the latest reader for shared holds).
    #[inline]
    fn site(&self) -> Option<Site> {
        // SAFETY: only `&'static Location` pointers are stored (`acquired_at`).
        unsafe { self.site.load(Relaxed).cast_const().as_ref() }
    }
}

/// A lock's heap block: its raw lock (the word that is the lock and counts its holds), the
/// state beside it and the value, so that for a small value a hold hands one cache line from
/// core to core, as `parking_lot`'s and std's locks do. On the heap so that the word stays at
/// one address, where the metrics collection reads its counts (the recorder is told where at
/// construction, and told to keep the last counts before the block is freed) and the parking
/// lot keys its waiters. Aligned to a pair of cache lines, which x86's adjacent-line prefetch
/// fetches together: the word's line never pairs with another allocation's line, whose misses
/// on other cores would prefetch it away from the holder (`RwLock` write, 2 pinned threads:
/// ~+3% throughput over five launches each).
#[repr(C, align(128))]
struct Block<R, T: ?Sized> {
    raw: R,
    state: State,
    value: UnsafeCell<T>,
}

// The offsets the module docs give: a small value shares the word's line.
const _: () = assert!(std::mem::offset_of!(Block<RawMutex, u64>, value) == 32);
const _: () = assert!(std::mem::offset_of!(Block<RawRwLock, u64>, value) == 104);

/// The owning pointer to a lock's [`Block`]: allocated by [`Self::attached`], freed by
/// [`Self::free`] or taken apart by [`Self::take_value`] (the lock's drop or `into_inner`,
/// after detaching the word from the recorder). A raw pointer rather than a `Box`: the recorder
/// reads the word through its own pointer while the lock is moved around.
struct Owned<R, T: ?Sized>(NonNull<Block<R, T>>);

impl<R, T> Owned<R, T> {
    /// A block of `raw` and `value`, its word attached to `recorder` (as `word` says).
    fn attached(recorder: &Recorder, raw: R, value: T, word: fn(NonNull<R>) -> Word) -> Self {
        let b = Box::new(Block {
            raw,
            state: State::default(),
            value: UnsafeCell::new(value),
        });
        let block = Owned(NonNull::from(Box::leak(b)));
        // SAFETY: the lock that owns the block detaches the recorder before freeing it (its
        // drop, or `into_inner`).
        unsafe { recorder.attach(word(NonNull::from(&block.get().raw))) };
        block
    }
}

impl<R, T: ?Sized> Owned<R, T> {
    #[inline(always)]
    fn get(&self) -> &Block<R, T> {
        // SAFETY: allocated by `attached`; freed only by `free`/`take_value`, which the lock
        // calls once, when it goes.
        unsafe { self.0.as_ref() }
    }

    /// The value (what guards and `get_mut` hand out, as their locks allow).
    #[inline(always)]
    fn value(&self) -> *mut T {
        self.get().value.get()
    }

    /// Frees the block, dropping the value.
    ///
    /// # Safety
    ///
    /// Nothing uses the block afterwards (the recorder has been detached).
    unsafe fn free(&mut self) {
        // SAFETY: allocated by `Box` in `attached`; the caller does not use it again.
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
    }
}

impl<R, T> Owned<R, T> {
    /// Frees the block, returning the value.
    ///
    /// # Safety
    ///
    /// As [`Self::free`].
    unsafe fn take_value(&mut self) -> T {
        // SAFETY: as `free`.
        let b = unsafe { Box::from_raw(self.0.as_ptr()) };
        b.value.into_inner()
    }
}

/// Generates what both lock types share: the `WouldBlock` path, poisoning, unlocked access, and
/// the drop that detaches the word from the recorder before freeing the block.
macro_rules! common {
    ($lock:ident) => {
        impl<T: ?Sized> $lock<T> {
            #[cold]
            fn would_block<G>(&self, mode: LockMode) -> TryLockError<G> {
                self.recorder.conflict(mode);
                self.recorder.record_wait(mode, Outcome::WouldBlock, 0.0);
                TryLockError::WouldBlock
            }

            #[inline(always)]
            fn state(&self) -> &State {
                &self.block.get().state
            }

            /// Whether the lock is poisoned (a holder panicked), as std's.
            pub fn is_poisoned(&self) -> bool {
                self.state().poisoned()
            }

            /// Clears the poisoned state, as std's.
            pub fn clear_poison(&self) {
                self.state().poisoned.store(false, Relaxed);
            }

            /// Mutable access without locking (an error if poisoned, as std).
            pub fn get_mut(&mut self) -> LockResult<&mut T> {
                let poisoned = self.state().poisoned();
                // SAFETY: `&mut self`: no guard and no other reference to the value exists.
                poison(unsafe { &mut *self.block.value() }, poisoned)
            }
        }

        impl<T> $lock<T> {
            /// Consumes the lock, returning the value (an error if poisoned, as std).
            pub fn into_inner(self) -> LockResult<T> {
                let poisoned = self.state().poisoned();
                let mut this = std::mem::ManuallyDrop::new(self);
                this.recorder.detach();
                // SAFETY: detached, and `this` is not used again (its drop does not run); the
                // recorder is moved out once.
                let (value, recorder) =
                    unsafe { (this.block.take_value(), std::ptr::read(&this.recorder)) };
                drop(recorder);
                poison(value, poisoned)
            }
        }

        impl<T: ?Sized> Drop for $lock<T> {
            fn drop(&mut self) {
                self.recorder.detach();
                // SAFETY: detached; the block is not used again.
                unsafe { self.block.free() };
            }
        }
    };
}

// ---- Mutex --------------------------------------------------------------------------------

/// An instrumented mutex with `std::sync::Mutex`'s API and poisoning (on lockmeter's own raw
/// lock, see the [module docs](self)). `Send`/`Sync` exactly when std's is.
pub struct Mutex<T: ?Sized> {
    /// Where it records; reads the counts from the raw lock's word at each collection.
    recorder: Arc<Recorder>,
    /// The raw lock, the state beside it and the value.
    block: Owned<RawMutex, T>,
}

// SAFETY: as std's `Mutex`: the lock hands out access to the value to one thread at a time, so
// sending or sharing the mutex needs only `T: Send`.
unsafe impl<T: ?Sized + Send> Send for Mutex<T> {}
// SAFETY: as above.
unsafe impl<T: ?Sized + Send> Sync for Mutex<T> {}
// As std's: a panic while the lock is held poisons it, so code that catches the panic sees what
// it left behind.
impl<T: ?Sized> std::panic::UnwindSafe for Mutex<T> {}
impl<T: ?Sized> std::panic::RefUnwindSafe for Mutex<T> {}

builder! {
    /// Builder for a [`Mutex`]; see [`Mutex::builder`].
    MutexBuilder => Mutex, |o, value| {
        let recorder = o.recorder("mutex");
        let block = Owned::attached(&recorder, RawMutex::default(), value, Word::Mutex);
        Mutex { recorder, block }
    }
}

constructors!(Mutex, "mutex");

impl Mutex<()> {
    /// A builder for a mutex named `name` (sink, sampling); finish with
    /// [`MutexBuilder::build`].
    /// Called as `Mutex::builder(..)`: it is defined on `Mutex<()>` so that no type needs
    /// spelling out; `build(value)` makes the `Mutex<T>` (`Mutex::<u64>::builder` does not
    /// exist).
    pub fn builder(name: impl Into<String>) -> MutexBuilder {
        MutexBuilder(Options::new(name.into()))
    }
}

impl<T: ?Sized> Mutex<T> {
    #[inline(always)]
    fn raw(&self) -> &RawMutex {
        &self.block.get().raw
    }

    /// Acquires the mutex, blocking; poisoned as std's is after a panic while held.
    #[inline(always)]
    #[track_caller]
    pub fn lock(&self) -> LockResult<MutexGuard<'_, T>> {
        let site = Location::caller();
        let since = if self.raw().try_lock() {
            self.recorder.hold_sampled()
        } else {
            Some(self.lock_contended())
        };
        self.guard(since, site)
    }

    /// The lock was taken: wait for it (measured as [`exclusive_wait`] says; the lock counts
    /// the wait, and a collection the conflict with it).
    #[cold]
    #[inline(never)]
    fn lock_contended(&self) -> HoldStart {
        let raw = self.raw();
        let timed = self.recorder.wait_sampled();
        exclusive_wait(&self.recorder, self.state(), timed, |before_park| {
            raw.lock_slow(before_park);
        })
    }

    /// Tries to acquire without blocking; `WouldBlock` is counted as a conflict.
    #[inline]
    #[track_caller]
    pub fn try_lock(&self) -> TryLockResult<MutexGuard<'_, T>> {
        let site = Location::caller();
        if self.raw().try_lock() {
            Ok(self.guard(self.recorder.hold_sampled(), site)?)
        } else {
            Err(self.would_block(LockMode::Exclusive))
        }
    }

    #[inline(always)]
    fn guard(&self, since: Option<HoldStart>, site: Site) -> LockResult<MutexGuard<'_, T>> {
        self.state().acquired_at(site);
        let guard = MutexGuard {
            lock: self,
            since,
            // As std: a guard taken while the thread is already panicking does not poison.
            poisons: !std::thread::panicking(),
            _not_send: PhantomData,
        };
        poison(guard, self.state().poisoned())
    }
}

common!(Mutex);

impl<T: ?Sized + fmt::Debug> fmt::Debug for Mutex<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Mutex");
        d.field("name", &self.recorder.name());
        // Looked at under the lock, as std's `Debug` does (a real, counted hold).
        let raw = self.raw();
        if raw.try_lock() {
            // SAFETY: held until the unlock below.
            d.field("data", &unsafe { &*self.block.value() });
            raw.unlock();
        } else {
            d.field("data", &format_args!("<locked>"));
        }
        d.field("poisoned", &self.state().poisoned())
            .finish_non_exhaustive()
    }
}

/// Guard of a [`Mutex`]; `Send`/`Sync` exactly as `std::sync::MutexGuard`.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct MutexGuard<'a, T: ?Sized> {
    lock: &'a Mutex<T>,
    /// Set when this hold is timed or had to wait.
    since: Option<HoldStart>,
    /// Whether a panic while it is held poisons the lock.
    poisons: bool,
    /// Not `Send`, as std's.
    _not_send: PhantomData<*const ()>,
}

// SAFETY: sharing the guard shares `&T`, as std's `MutexGuard`.
unsafe impl<T: ?Sized + Sync> Sync for MutexGuard<'_, T> {}

impl<T: ?Sized> Drop for MutexGuard<'_, T> {
    #[inline(always)]
    fn drop(&mut self) {
        let lock = self.lock;
        let raw = lock.raw();
        exclusive_release(
            &lock.recorder,
            lock.state(),
            self.since,
            self.poisons,
            || {
                raw.unlock();
            },
        );
    }
}

/// An exclusive wait (a `Mutex`'s, an `RwLock` writer's) through `slow`, which blocks until
/// the lock is taken and calls the function it is given before each park: a wait in the timing
/// sample (`timed`) is measured from here, any other from its first park, and one that only
/// spun is not measured at all (no clock read, nothing kept). A measured wait is kept, with the
/// site it waited for (read before this acquisition overwrites it), for the release to record.
#[inline(always)]
fn exclusive_wait(
    recorder: &Recorder,
    state: &State,
    timed: bool,
    slow: impl FnOnce(&mut dyn FnMut()),
) -> HoldStart {
    let mut start = timed.then(Ticks::now);
    slow(&mut || {
        start.get_or_insert_with(Ticks::now);
    });
    match start {
        Some(start) => {
            recorder.keep_wait(start, state.site());
            recorder.waited_hold(timed)
        }
        None => HoldStart::contended_unmeasured(),
    }
}

/// The release of an exclusive hold (a `Mutex` guard's, an `RwLock` write guard's), `since`
/// as the guard kept it: one branch for the rare cases (a timed hold, a hold that waited),
/// released out of line; inline, the poison check and `unlock` (one atomic add that counts the
/// hold and unlocks).
#[inline(always)]
fn exclusive_release(
    recorder: &Recorder,
    state: &State,
    since: Option<HoldStart>,
    poisons: bool,
    unlock: impl FnOnce(),
) {
    if let Some(since) = since {
        exclusive_release_rare(recorder, state, since, poisons, unlock);
        return;
    }
    if poisons && std::thread::panicking() {
        state.poisoned.store(true, Relaxed);
    }
    unlock();
}

/// The release of a timed exclusive hold or of one that waited (a `Mutex`'s, an `RwLock`
/// writer's): poisons as std, counts and unlocks (`unlock`), then, outside the critical
/// section, records the wait (profile, slow-wait event, histogram if timed) and the hold if
/// timed.
#[cold]
#[inline(never)]
fn exclusive_release_rare(
    recorder: &Recorder,
    state: &State,
    since: HoldStart,
    poisons: bool,
    unlock: impl FnOnce(),
) {
    let site = state.site();
    let waited = (since.contended() && since.wait_measured()).then(|| recorder.kept_wait());
    if poisons && std::thread::panicking() {
        state.poisoned.store(true, Relaxed);
    }
    unlock();
    if let (Some((start, holder)), Some(site)) = (waited, site) {
        let secs = start.secs_until(since.at());
        recorder.wait_done(LockMode::Exclusive, site, holder, secs, since.timed());
    }
    if since.timed() {
        recorder.hold_done(LockMode::Exclusive, since, site);
    }
}

impl<T: ?Sized> Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.lock.block.value() }
    }
}

impl<T: ?Sized> DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock exclusively.
        unsafe { &mut *self.lock.block.value() }
    }
}

guard_fmt!(MutexGuard);

// ---- RwLock -------------------------------------------------------------------------------

/// An instrumented reader-writer lock with `std::sync::RwLock`'s API and poisoning (on
/// lockmeter's own raw lock, see the [module docs](self)): `read` is `lock.mode = shared`,
/// `write` exclusive. `Send`/`Sync` exactly when std's is.
pub struct RwLock<T: ?Sized> {
    /// Where it records; reads the counts from the raw lock's word at each collection.
    recorder: Arc<Recorder>,
    /// The raw lock, the state beside it and the value.
    block: Owned<RawRwLock, T>,
}

// SAFETY: as std's `RwLock`: sending it sends the value; sharing it hands `&T` to several
// readers at once and `&mut T` to one writer, so sharing needs `T: Send + Sync`.
unsafe impl<T: ?Sized + Send> Send for RwLock<T> {}
// SAFETY: as above.
unsafe impl<T: ?Sized + Send + Sync> Sync for RwLock<T> {}
// As std's (see `Mutex`'s).
impl<T: ?Sized> std::panic::UnwindSafe for RwLock<T> {}
impl<T: ?Sized> std::panic::RefUnwindSafe for RwLock<T> {}

builder! {
    /// Builder for an [`RwLock`]; see [`RwLock::builder`].
    RwLockBuilder => RwLock, |o, value| {
        let recorder = o.recorder("rwlock");
        let block = Owned::attached(&recorder, RawRwLock::default(), value, Word::RwLock);
        RwLock { recorder, block }
    }
}

constructors!(RwLock, "reader-writer lock");

impl RwLock<()> {
    /// A builder for a lock named `name` (sink, sampling); finish with
    /// [`RwLockBuilder::build`].
    /// Called as `RwLock::builder(..)`: it is defined on `RwLock<()>` so that no type needs
    /// spelling out; `build(value)` makes the `RwLock<T>` (`RwLock::<u64>::builder` does not
    /// exist).
    pub fn builder(name: impl Into<String>) -> RwLockBuilder {
        RwLockBuilder(Options::new(name.into()))
    }
}

impl<T: ?Sized> RwLock<T> {
    #[inline(always)]
    fn raw(&self) -> &RawRwLock {
        &self.block.get().raw
    }

    /// Shared access, blocking (an error if poisoned, as std; readers never poison).
    #[inline(always)]
    #[track_caller]
    pub fn read(&self) -> LockResult<RwLockReadGuard<'_, T>> {
        let site = Location::caller();
        let since = if self.raw().try_read() {
            self.recorder.hold_sampled()
        } else {
            self.read_contended(site)
        };
        self.read_guard(since, site)
    }

    /// The lock was taken (or a writer waits): count the conflict, wait, measured from here,
    /// and record the wait at once (the lock counts the hold that waited).
    #[cold]
    #[inline(never)]
    fn read_contended(&self, site: Site) -> Option<HoldStart> {
        let w = self.recorder.contended_start(LockMode::Shared);
        self.raw().read_slow(|| {});
        self.recorder
            .read_acquired_contended(w, site, self.state().site())
    }

    /// Shared access without blocking.
    #[inline]
    #[track_caller]
    pub fn try_read(&self) -> TryLockResult<RwLockReadGuard<'_, T>> {
        let site = Location::caller();
        if self.raw().try_read() {
            Ok(self.read_guard(self.recorder.hold_sampled(), site)?)
        } else {
            Err(self.would_block(LockMode::Shared))
        }
    }

    #[inline(always)]
    fn read_guard(
        &self,
        since: Option<HoldStart>,
        site: Site,
    ) -> LockResult<RwLockReadGuard<'_, T>> {
        self.state().acquired_at(site);
        let guard = RwLockReadGuard {
            lock: self,
            since,
            _not_send: PhantomData,
        };
        poison(guard, self.state().poisoned())
    }

    /// Exclusive access, blocking; poisoned as std's is after a panic while held.
    #[inline(always)]
    #[track_caller]
    pub fn write(&self) -> LockResult<RwLockWriteGuard<'_, T>> {
        let site = Location::caller();
        let since = if self.raw().try_write() {
            self.recorder.hold_sampled()
        } else {
            Some(self.write_contended())
        };
        self.write_guard(since, site)
    }

    /// The lock was taken: wait for it as `Mutex::lock` does ([`exclusive_wait`]); the
    /// conflict is counted now, the hold that waited by the lock when it gets it.
    #[cold]
    #[inline(never)]
    fn write_contended(&self) -> HoldStart {
        let raw = self.raw();
        let timed = self.recorder.waiting(LockMode::Exclusive);
        exclusive_wait(&self.recorder, self.state(), timed, |before_park| {
            raw.write_slow(before_park);
        })
    }

    /// Exclusive access without blocking.
    #[inline]
    #[track_caller]
    pub fn try_write(&self) -> TryLockResult<RwLockWriteGuard<'_, T>> {
        let site = Location::caller();
        if self.raw().try_write() {
            Ok(self.write_guard(self.recorder.hold_sampled(), site)?)
        } else {
            Err(self.would_block(LockMode::Exclusive))
        }
    }

    #[inline(always)]
    fn write_guard(
        &self,
        since: Option<HoldStart>,
        site: Site,
    ) -> LockResult<RwLockWriteGuard<'_, T>> {
        self.state().acquired_at(site);
        let guard = RwLockWriteGuard {
            lock: self,
            since,
            // As std: a guard taken while the thread is already panicking does not poison.
            poisons: !std::thread::panicking(),
            _not_send: PhantomData,
        };
        poison(guard, self.state().poisoned())
    }
}

common!(RwLock);

impl<T: ?Sized + fmt::Debug> fmt::Debug for RwLock<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("RwLock");
        d.field("name", &self.recorder.name());
        // Looked at under a shared hold, as std's `Debug` does (a real, counted hold).
        let raw = self.raw();
        if raw.try_read() {
            // SAFETY: held shared until the unlock below.
            d.field("data", &unsafe { &*self.block.value() });
            raw.unlock_read();
        } else {
            d.field("data", &format_args!("<locked>"));
        }
        d.field("poisoned", &self.state().poisoned())
            .finish_non_exhaustive()
    }
}

/// Shared guard of an [`RwLock`]; `Send`/`Sync` exactly as `std::sync::RwLockReadGuard`.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct RwLockReadGuard<'a, T: ?Sized> {
    lock: &'a RwLock<T>,
    /// Set when this hold is timed.
    since: Option<HoldStart>,
    /// Not `Send`, as std's.
    _not_send: PhantomData<*const ()>,
}

// SAFETY: sharing the guard shares `&T`, as std's `RwLockReadGuard`.
unsafe impl<T: ?Sized + Sync> Sync for RwLockReadGuard<'_, T> {}

impl<T: ?Sized> Drop for RwLockReadGuard<'_, T> {
    #[inline(always)]
    fn drop(&mut self) {
        let lock = self.lock;
        // One atomic add that counts the hold and releases it.
        lock.raw().unlock_read();
        if let Some(since) = self.since {
            read_hold_done(&lock.recorder, lock.state(), since);
        }
    }
}

/// A timed shared hold ended: records it, outside the critical section.
#[cold]
#[inline(never)]
fn read_hold_done(recorder: &Recorder, state: &State, since: HoldStart) {
    recorder.hold_done(LockMode::Shared, since, state.site());
}

/// Exclusive guard of an [`RwLock`]; `Send`/`Sync` exactly as `std::sync::RwLockWriteGuard`.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct RwLockWriteGuard<'a, T: ?Sized> {
    lock: &'a RwLock<T>,
    /// Set when this hold is timed or had to wait.
    since: Option<HoldStart>,
    /// Whether a panic while it is held poisons the lock.
    poisons: bool,
    /// Not `Send`, as std's.
    _not_send: PhantomData<*const ()>,
}

// SAFETY: sharing the guard shares `&T`, as std's `RwLockWriteGuard`.
unsafe impl<T: ?Sized + Sync> Sync for RwLockWriteGuard<'_, T> {}

impl<T: ?Sized> Drop for RwLockWriteGuard<'_, T> {
    #[inline(always)]
    fn drop(&mut self) {
        let lock = self.lock;
        let raw = lock.raw();
        exclusive_release(
            &lock.recorder,
            lock.state(),
            self.since,
            self.poisons,
            || {
                raw.unlock_write();
            },
        );
    }
}

impl<'a, T: ?Sized> RwLockWriteGuard<'a, T> {
    /// Turns the exclusive hold into a shared one with no moment where the lock is free, as
    /// std's `RwLockWriteGuard::downgrade` (an associated function:
    /// `RwLockWriteGuard::downgrade(guard)`): one atomic add. Readers waiting get in at once
    /// unless a writer waits. Recorded as the end of the exclusive hold (counted; its wait and
    /// time recorded as any release records them) and an uncontended shared acquisition at the
    /// call site, timed as any other, so `lock_held` shows the shared hold.
    #[track_caller]
    pub fn downgrade(s: Self) -> RwLockReadGuard<'a, T> {
        let site = Location::caller();
        let this = std::mem::ManuallyDrop::new(s);
        let lock = this.lock;
        let raw = lock.raw();
        exclusive_release(
            &lock.recorder,
            lock.state(),
            this.since,
            this.poisons,
            || raw.downgrade(),
        );
        lock.state().acquired_at(site);
        RwLockReadGuard {
            lock,
            since: lock.recorder.hold_sampled(),
            _not_send: PhantomData,
        }
    }
}

impl<T: ?Sized> Deref for RwLockReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock shared.
        unsafe { &*self.lock.block.value() }
    }
}

impl<T: ?Sized> Deref for RwLockWriteGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock exclusively.
        unsafe { &*self.lock.block.value() }
    }
}

impl<T: ?Sized> DerefMut for RwLockWriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock exclusively.
        unsafe { &mut *self.lock.block.value() }
    }
}

guard_fmt!(RwLockReadGuard);

guard_fmt!(RwLockWriteGuard);

#[cfg(all(test, not(loom)))]
mod tests {
    use super::short_type_name;

    #[test]
    fn type_names_lose_their_module_paths() {
        let full = std::any::type_name::<std::collections::HashMap<String, Vec<(u8, &str)>>>();
        assert_eq!(short_type_name(full), "HashMap<String, Vec<(u8, &str)>>");
        assert_eq!(short_type_name("u64"), "u64");
        assert_eq!(
            short_type_name("[core::option::Option<i32>; 4]"),
            "[Option<i32>; 4]"
        );
    }
}
