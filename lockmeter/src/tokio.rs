//! Instrumented drop-ins for `tokio::sync::Mutex` and `tokio::sync::RwLock` (feature `tokio`).
//!
//! `lock.kind` = `tokio_mutex` / `tokio_rwlock`. Same cost model as [`crate::sync`]: counts
//! exact, 1 in `sample_every` acquisitions timed. An acquire future dropped while waiting
//! records `lock.outcome = cancelled` (always: cancellations are rare and worth seeing). Like
//! tokio's own locks, every acquire spends a unit of the task's cooperative budget, so a task
//! that takes a free lock in a loop still lets the other tasks on its worker run.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::sync::Arc;
//!
//! let sessions = lockmeter::tokio::Mutex::named("sessions", 0u64);
//! *sessions.lock().await += 1;
//!
//! // Owned guards move into other tasks, as tokio's do.
//! let catalog = Arc::new(lockmeter::tokio::RwLock::named("catalog", vec![1, 2]));
//! let guard = catalog.clone().read_owned().await;
//! let len = tokio::spawn(async move { guard.len() }).await.unwrap();
//! assert_eq!(len, 2);
//! # }
//! ```
//!
//! The API is tokio's: `lock`/`read`/`write` and their `try_`s, `lock_owned`/`read_owned`/
//! `write_owned` and theirs (needing `T: 'static`, and a mapped part `'static`, which tokio's
//! do not), `blocking_lock`/
//! `blocking_read`/`blocking_write` for synchronous code (panicking in an async context as
//! tokio's do), `get_mut`, `into_inner`; `new`, `Default` and `From` name the lock after where
//! it is made (see [`Mutex::new`]); the guards' `map`/`try_map` (a mapped guard carries on the
//! same hold), the write guards' `downgrade` and `downgrade_map` (the exclusive hold ends, a
//! shared one begins, counted as an uncontended shared acquisition: see
//! [`RwLockWriteGuard::downgrade`]), borrowed and owned alike; guards print with `{}` and
//! `{:?}`; [`RwLock::with_max_readers`] (and [`RwLockBuilder::max_readers`]); the locks are
//! `UnwindSafe` when the value is, as tokio's. Not there: `const_new`, and the borrowed guards'
//! `mutex()`/`rwlock()` (the owned guards have them).
//!
//! ```
//! use lockmeter::tokio::{RwLock, RwLockWriteGuard};
//!
//! // From synchronous code (outside the runtime, or in `spawn_blocking`).
//! let config = RwLock::named("config", (String::from("v1"), 0u32));
//! let mut w = config.blocking_write();
//! w.1 += 1;
//! // Readers may come in now; no writer gets in between.
//! let version = RwLockWriteGuard::downgrade_map(w, |c| &c.0);
//! assert_eq!(*version, "v1");
//! assert!(config.try_read().is_ok() && config.try_write().is_err());
//! ```

use std::fmt;
use std::future::Future;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::panic::Location;
use std::sync::atomic::{AtomicPtr, Ordering::Relaxed};
use std::sync::Arc;

use crate::clock::Ticks;
use crate::kind::LockMode;
use crate::metrics::{Outcome, Recorder, WaitStart};
use crate::profile::Site;
use crate::sync::{builder, Hold, Options};

/// Records `cancelled` if an acquire future is dropped while waiting.
struct Waiting<'a> {
    recorder: &'a Recorder,
    mode: LockMode,
    start: WaitStart,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.done {
            let secs = self.recorder.wait_abandoned(self.start);
            self.recorder
                .record_wait(self.mode, Outcome::Cancelled, secs);
        }
    }
}

/// The call site of a tokio lock's latest acquisition, beside the lock: the next waiter to get
/// the lock reads it as the site whose hold it waited for (the lock profile's "caused").
#[derive(Debug, Default)]
struct HolderSite(AtomicPtr<Location<'static>>);

impl HolderSite {
    /// Records where the lock was just acquired (stored only when it changes).
    fn acquired_at(&self, site: Site) {
        let p: *const Location<'static> = site;
        if self.0.load(Relaxed).cast_const() != p {
            self.0.store(p.cast_mut(), Relaxed);
        }
    }

    /// Where the lock was last acquired.
    fn get(&self) -> Option<Site> {
        // SAFETY: only `&'static Location` pointers are stored (`acquired_at`).
        unsafe { self.0.load(Relaxed).cast_const().as_ref() }
    }
}

/// `try_` (a synchronous `try_*` of the inner lock) once the task has cooperative budget,
/// spending a unit of it if that takes the lock: the budget an acquire through tokio's own
/// `lock()` spends (a task out of budget yields first, as it would there; tokio's yields after
/// taking the lock, this before). Without it a task taking a free lock in a loop never
/// yielded, and other tasks on its worker starved. (`poll_proceed` is public from tokio 1.47,
/// the workspace's floor.)
async fn try_with_budget<G>(mut try_: impl FnMut() -> Option<G>) -> Option<G> {
    std::future::poll_fn(|cx| {
        let coop = std::task::ready!(::tokio::task::coop::poll_proceed(cx));
        let g = try_();
        if g.is_some() {
            coop.made_progress();
        }
        std::task::Poll::Ready(g)
    })
    .await
}

/// A lock taken by a synchronous try: counted (and, 1 in N, timed) as uncontended.
#[inline]
fn took<'s>(recorder: &'s Recorder, holder: &HolderSite, mode: LockMode, site: Site) -> Hold<'s> {
    holder.acquired_at(site);
    crate::sync::uncontended(recorder, mode, site)
}

impl<'s> Waiting<'s> {
    /// A try found the lock taken: counts the conflict and starts the wait.
    fn begin(recorder: &'s Recorder, mode: LockMode) -> Self {
        Waiting {
            recorder,
            mode,
            start: recorder.contended_start(mode),
            done: false,
        }
    }

    /// The wait ended with the lock taken at `site`: the hold, which records the wait after
    /// its release.
    fn acquired(mut self, holder: &HolderSite, site: Site) -> Hold<'s> {
        self.done = true;
        let (since, end) = self.recorder.contended_acquired(self.mode, self.start);
        let waited_for = holder.get();
        holder.acquired_at(site);
        Hold {
            recorder: self.recorder,
            mode: self.mode,
            since,
            site,
            waited: Some((self.start, end, waited_for)),
        }
    }
}

/// The try failed: count the conflict and await `wait`, recording the wait (or its
/// cancellation).
async fn acquire<'s, G, F>(
    recorder: &'s Recorder,
    holder: &HolderSite,
    mode: LockMode,
    wait: F,
    site: Site,
) -> (G, Hold<'s>)
where
    F: Future<Output = G>,
{
    let waiting = Waiting::begin(recorder, mode);
    let g = wait.await;
    (g, waiting.acquired(holder, site))
}

/// A `blocking_*` call: [`may_block`], then `try_` (a synchronous `try_*` of the inner lock)
/// and, if it found the lock taken, `wait` (tokio's `blocking_*`), counted and recorded as
/// the async acquires are.
#[track_caller]
fn acquire_blocking<'s, G, E>(
    recorder: &'s Recorder,
    holder: &HolderSite,
    mode: LockMode,
    site: Site,
    try_: impl FnOnce() -> Result<G, E>,
    wait: impl FnOnce() -> G,
) -> (G, Hold<'s>) {
    may_block();
    if let Ok(g) = try_() {
        return (g, took(recorder, holder, mode, site));
    }
    let waiting = Waiting::begin(recorder, mode);
    let g = wait();
    (g, waiting.acquired(holder, site))
}

/// Panics, as tokio's `blocking_*` calls do, when this thread drives asynchronous tasks
/// (blocking it there can stall or deadlock the runtime), whether or not the lock is free,
/// so that the mistake shows in the first test, not under load. tokio decides: one acquire of
/// a free lock of its own through its `blocking_lock`.
#[track_caller]
fn may_block() {
    drop(::tokio::sync::Mutex::new(()).blocking_lock());
}

/// A synchronous `try_*` of the inner lock (`r`, tried from `t0`), counted: an uncontended
/// acquisition, or a conflict and a `would_block` wait.
fn tried<'s, G, E>(
    recorder: &'s Recorder,
    holder: &HolderSite,
    mode: LockMode,
    t0: Ticks,
    r: Result<G, E>,
    site: Site,
) -> Result<(G, Hold<'s>), E> {
    match r {
        Ok(g) => Ok((g, took(recorder, holder, mode, site))),
        Err(e) => {
            recorder.conflict(mode);
            recorder.record_wait(mode, Outcome::WouldBlock, t0.elapsed_secs());
            Err(e)
        }
    }
}

/// A `'static` borrow of the lock `lock` points to, for an owned guard (tokio's `*_owned`).
///
/// # Safety
///
/// The borrow, and everything made from it, must be gone before the last `Arc` of the lock:
/// an owned guard keeps an `Arc` and releases the borrowing guard first, in its `Drop`; an
/// acquire future keeps one in a local declared before the borrowing future, so that it is
/// dropped after it if the acquire is cancelled.
unsafe fn borrow_for_guard<L: ?Sized + 'static>(lock: &Arc<L>) -> &'static L {
    // SAFETY: the allocation lives while any `Arc` does; the caller keeps one longer than the
    // borrow.
    unsafe { &*Arc::as_ptr(lock) }
}

/// Generates a guard: a tokio guard of the same name (`inner`), and the [`Hold`] it records
/// when dropped (the release counted before tokio's guard unlocks, the rest after).
macro_rules! guard {
    ($(#[$doc:meta])* $name:ident($inner:ident) $(, $deref_mut:ident)?) => {
        $(#[$doc])*
        #[must_use = "the lock is released as soon as the guard is dropped"]
        pub struct $name<'a, T: ?Sized> {
            hold: Hold<'a>,
            inner: ManuallyDrop<::tokio::sync::$inner<'a, T>>,
        }

        impl<'a, T: ?Sized> $name<'a, T> {
            fn new(hold: Hold<'a>, inner: ::tokio::sync::$inner<'a, T>) -> Self {
                $name {
                    hold,
                    inner: ManuallyDrop::new(inner),
                }
            }

            /// Turns tokio's guard into `M` through `f` (a map), keeping the hold; if `f`
            /// panics, tokio's guard unlocks and the release is recorded.
            fn remap<M>(this: Self, f: impl FnOnce(::tokio::sync::$inner<'a, T>) -> M) -> (Hold<'a>, M) {
                let (hold, inner) = Self::into_parts(this);
                let hold = Unwinding::new(hold, false);
                let m = f(inner);
                (hold.done(), m)
            }

            /// Takes the guard apart without releasing anything (to map or downgrade it).
            fn into_parts(this: Self) -> (Hold<'a>, ::tokio::sync::$inner<'a, T>) {
                let mut this = ManuallyDrop::new(this);
                // SAFETY: `this` is never dropped, so each field is moved out exactly once.
                unsafe {
                    (
                        std::ptr::read(&this.hold),
                        ManuallyDrop::take(&mut this.inner),
                    )
                }
            }
        }

        impl<T: ?Sized> Drop for $name<'_, T> {
            fn drop(&mut self) {
                self.hold.count_release();
                // SAFETY: dropped here, once; never used again.
                unsafe { ManuallyDrop::drop(&mut self.inner) };
                self.hold.released();
            }
        }

        impl<T: ?Sized> Deref for $name<'_, T> {
            type Target = T;
            fn deref(&self) -> &T {
                &self.inner
            }
        }

        $(
            impl<T: ?Sized> DerefMut for $name<'_, T> {
                fn $deref_mut(&mut self) -> &mut T {
                    &mut self.inner
                }
            }
        )?

        crate::sync::guard_fmt!($name);
    };
}

/// A hold whose guard was taken apart to be mapped: if the caller's closure panics, tokio's
/// guard unlocks as it unwinds, and dropping this records the release (`counted`: the
/// release was already counted, as a downgrade counts it first).
struct Unwinding<'a> {
    hold: ManuallyDrop<Hold<'a>>,
    counted: bool,
}

impl<'a> Unwinding<'a> {
    fn new(hold: Hold<'a>, counted: bool) -> Self {
        Unwinding {
            hold: ManuallyDrop::new(hold),
            counted,
        }
    }

    /// The closure returned: the hold, for the guard put back together.
    fn done(self) -> Hold<'a> {
        let mut this = ManuallyDrop::new(self);
        // SAFETY: `this` is never dropped, so the hold is moved out exactly once.
        unsafe { ManuallyDrop::take(&mut this.hold) }
    }
}

impl Drop for Unwinding<'_> {
    fn drop(&mut self) {
        if !self.counted {
            self.hold.count_release();
        }
        self.hold.released();
    }
}

/// An acquire of the lock `lock` points to through `take` (an acquire of the borrowed lock),
/// for an owned guard: the borrowing guard, and the `Arc` that keeps what it borrows alive
/// (the caller puts both in the owned guard at once).
async fn acquire_owned<L: ?Sized + 'static, G, F>(
    lock: Arc<L>,
    take: impl FnOnce(&'static L) -> F,
) -> (G, Arc<L>)
where
    F: Future<Output = G>,
{
    // SAFETY: `lock`, a parameter, is dropped after the acquire future that borrows it (a
    // temporary of the body) if this is cancelled; then it goes with the guard.
    let this = unsafe { borrow_for_guard(&lock) };
    let guard = take(this).await;
    (guard, lock)
}

/// [`acquire_owned`] through a synchronous `take` (a `try_*` or a `blocking_*`), whose error
/// borrows nothing.
fn take_owned<L: ?Sized + 'static, G, E>(
    lock: Arc<L>,
    take: impl FnOnce(&'static L) -> Result<G, E>,
) -> Result<(G, Arc<L>), E> {
    // SAFETY: the guard goes with `lock`; on failure nothing borrowed is kept.
    let this = unsafe { borrow_for_guard(&lock) };
    let guard = take(this)?;
    Ok((guard, lock))
}

/// Generates a guard that owns an `Arc` of its lock, as tokio's `Owned*Guard`s: a borrowed
/// guard of the value (`T`) or of a part of it (`U`, for the mapped ones), and the `Arc` that
/// keeps what it borrows alive.
macro_rules! owned_guard {
    (
        $(#[$doc:meta])*
        $owned:ident<T $(, $u:ident)?>($guard:ident<$v:ident>) of $lock:ident, $get:ident, mut
    ) => {
        owned_guard! {
            $(#[$doc])*
            $owned<T $(, $u)?>($guard<$v>) of $lock, $get
        }

        impl<T: ?Sized + 'static $(, $u: ?Sized + 'static)?> DerefMut for $owned<T $(, $u)?> {
            fn deref_mut(&mut self) -> &mut $v {
                &mut self.guard
            }
        }
    };
    (
        $(#[$doc:meta])*
        $owned:ident<T $(, $u:ident)?>($guard:ident<$v:ident>) of $lock:ident, $get:ident
    ) => {
        $(#[$doc])*
        #[must_use = "the lock is released as soon as the guard is dropped"]
        pub struct $owned<T: ?Sized + 'static $(, $u: ?Sized + 'static = T)?> {
            /// Borrows from `lock`'s allocation (`'static` is this struct's promise, never
            /// handed out): released first, in `Drop`, while `lock` still keeps it alive.
            guard: ManuallyDrop<$guard<'static, $v>>,
            lock: Arc<$lock<T>>,
        }

        impl<T: ?Sized + 'static $(, $u: ?Sized + 'static)?> $owned<T $(, $u)?> {
            /// The lock this guard holds.
            pub fn $get(this: &Self) -> &Arc<$lock<T>> {
                &this.lock
            }

            /// Puts a guard together from a borrowing guard and the `Arc` that keeps what it
            /// borrows alive.
            fn from_parts((guard, lock): ($guard<'static, $v>, Arc<$lock<T>>)) -> Self {
                Self {
                    guard: ManuallyDrop::new(guard),
                    lock,
                }
            }

            /// Takes the guard apart without releasing anything (to map or downgrade it): the
            /// borrowing guard, and the `Arc` to keep until it is gone.
            fn into_parts(this: Self) -> ($guard<'static, $v>, Arc<$lock<T>>) {
                let mut this = ManuallyDrop::new(this);
                // SAFETY: `this` is never dropped, so each field is moved out exactly once.
                unsafe { (ManuallyDrop::take(&mut this.guard), std::ptr::read(&this.lock)) }
            }
        }

        impl<T: ?Sized + 'static $(, $u: ?Sized + 'static)?> Drop for $owned<T $(, $u)?> {
            fn drop(&mut self) {
                // SAFETY: dropped once, here; `self.lock`, dropped after this, keeps the lock
                // the guard borrows alive until then.
                unsafe { ManuallyDrop::drop(&mut self.guard) };
            }
        }

        impl<T: ?Sized + 'static $(, $u: ?Sized + 'static)?> Deref for $owned<T $(, $u)?> {
            type Target = $v;
            fn deref(&self) -> &$v {
                &self.guard
            }
        }

        impl<T: ?Sized + 'static $(, $u: ?Sized + 'static)?> fmt::Debug for $owned<T $(, $u)?>
        where
            $v: fmt::Debug,
        {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&**self, f)
            }
        }

        impl<T: ?Sized + 'static $(, $u: ?Sized + 'static)?> fmt::Display for $owned<T $(, $u)?>
        where
            $v: fmt::Display,
        {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&**self, f)
            }
        }
    };
}

/// An instrumented `tokio::sync::Mutex`.
pub struct Mutex<T: ?Sized> {
    recorder: Arc<Recorder>,
    holder: HolderSite,
    inner: ::tokio::sync::Mutex<T>,
}

// As tokio's: unwind-safe when the value is (the recorder's state is counts and atomics, which
// a panic cannot leave half-made).
impl<T: ?Sized + std::panic::UnwindSafe> std::panic::UnwindSafe for Mutex<T> {}

crate::sync::constructors!(Mutex, "mutex");

impl<T> Mutex<T> {
    /// Consumes the mutex, returning the value.
    pub fn into_inner(self) -> T {
        self.inner.into_inner()
    }
}

impl Mutex<()> {
    /// A builder (sink, sampling); finish with [`MutexBuilder::build`].
    /// Called as `Mutex::builder(..)`: it is defined on `Mutex<()>` so that no type needs
    /// spelling out; `build(value)` makes the `Mutex<T>` (`Mutex::<u64>::builder` does not
    /// exist).
    pub fn builder(name: impl Into<String>) -> MutexBuilder {
        MutexBuilder(Options::new(name.into()))
    }
}

builder! {
    /// Builder for a tokio [`Mutex`]; see [`Mutex::builder`].
    MutexBuilder => Mutex, |o, value| Mutex {
        recorder: o.recorder("tokio_mutex"),
        holder: HolderSite::default(),
        inner: ::tokio::sync::Mutex::new(value),
    }
}

impl<T: ?Sized> Mutex<T> {
    /// Locks, waiting asynchronously. Cancel-safe like tokio's: dropping the future while it
    /// waits gives up the place in the queue (recorded as `cancelled`). A plain function
    /// returning the future, so that it can capture its caller's location.
    #[track_caller]
    pub fn lock(&self) -> impl Future<Output = MutexGuard<'_, T>> + '_ {
        self.lock_at(Location::caller())
    }

    async fn lock_at(&self, site: Site) -> MutexGuard<'_, T> {
        let (inner, hold) = match try_with_budget(|| self.inner.try_lock().ok()).await {
            Some(g) => (
                g,
                took(&self.recorder, &self.holder, LockMode::Exclusive, site),
            ),
            None => {
                let mode = LockMode::Exclusive;
                acquire(&self.recorder, &self.holder, mode, self.inner.lock(), site).await
            }
        };
        MutexGuard::new(hold, inner)
    }

    /// Locks from synchronous code, blocking the thread, as tokio's `blocking_lock` (for code
    /// outside the runtime, or in `spawn_blocking`, sharing state with tasks). Recorded as
    /// [`Self::lock`].
    ///
    /// # Panics
    ///
    /// As tokio's: when called from an asynchronous context, even if the lock is free.
    #[track_caller]
    pub fn blocking_lock(&self) -> MutexGuard<'_, T> {
        self.blocking_lock_at(Location::caller())
    }

    #[track_caller]
    fn blocking_lock_at(&self, site: Site) -> MutexGuard<'_, T> {
        let (inner, hold) = acquire_blocking(
            &self.recorder,
            &self.holder,
            LockMode::Exclusive,
            site,
            || self.inner.try_lock(),
            || self.inner.blocking_lock(),
        );
        MutexGuard::new(hold, inner)
    }

    /// Tries to lock without waiting; a failure is counted as a conflict.
    #[track_caller]
    pub fn try_lock(&self) -> Result<MutexGuard<'_, T>, ::tokio::sync::TryLockError> {
        self.try_lock_at(Location::caller())
    }

    fn try_lock_at(&self, site: Site) -> Result<MutexGuard<'_, T>, ::tokio::sync::TryLockError> {
        let t0 = Ticks::now();
        let r = self.inner.try_lock();
        let mode = LockMode::Exclusive;
        let (inner, hold) = tried(&self.recorder, &self.holder, mode, t0, r, site)?;
        Ok(MutexGuard::new(hold, inner))
    }

    /// Mutable access without locking.
    pub fn get_mut(&mut self) -> &mut T {
        self.inner.get_mut()
    }
}

impl<T: ?Sized + 'static> Mutex<T> {
    /// Locks through an `Arc`, as tokio's `lock_owned`: the guard keeps the `Arc`, so it can
    /// outlive the borrow (be moved into a spawned task). Recorded as [`Self::lock`]. Needs
    /// `T: 'static`, which tokio's does not; a lock shared between tasks has it.
    #[track_caller]
    pub fn lock_owned(self: Arc<Self>) -> impl Future<Output = OwnedMutexGuard<T>> {
        let site = Location::caller();
        let parts = acquire_owned(self, move |l| l.lock_at(site));
        async move { OwnedMutexGuard::from_parts(parts.await) }
    }

    /// [`Self::blocking_lock`] through an `Arc`, as tokio's `blocking_lock_owned`.
    ///
    /// # Panics
    ///
    /// As tokio's: when called from an asynchronous context.
    #[track_caller]
    pub fn blocking_lock_owned(self: Arc<Self>) -> OwnedMutexGuard<T> {
        let site = Location::caller();
        let Ok(parts) = take_owned(self, |l| {
            Ok::<_, std::convert::Infallible>(l.blocking_lock_at(site))
        });
        OwnedMutexGuard::from_parts(parts)
    }

    /// Tries to lock through an `Arc` without waiting, as tokio's `try_lock_owned`; a
    /// failure is counted as a conflict.
    #[track_caller]
    pub fn try_lock_owned(
        self: Arc<Self>,
    ) -> Result<OwnedMutexGuard<T>, ::tokio::sync::TryLockError> {
        let site = Location::caller();
        take_owned(self, |l| l.try_lock_at(site)).map(OwnedMutexGuard::from_parts)
    }
}

owned_guard! {
    /// Guard of a tokio [`Mutex`] locked through an `Arc` ([`Mutex::lock_owned`]).
    OwnedMutexGuard<T>(MutexGuard<T>) of Mutex, mutex, mut
}

owned_guard! {
    /// An [`OwnedMutexGuard`] mapped to part of the value ([`OwnedMutexGuard::map`]), as
    /// tokio's `OwnedMappedMutexGuard`: the hold goes on until it is dropped.
    OwnedMappedMutexGuard<T, U>(MappedMutexGuard<U>) of Mutex, mutex, mut
}

impl<T: ?Sized + 'static> OwnedMutexGuard<T> {
    /// A guard for a part of the value, as tokio's `OwnedMutexGuard::map`; see
    /// [`MutexGuard::map`].
    pub fn map<U: ?Sized + 'static, F>(this: Self, f: F) -> OwnedMappedMutexGuard<T, U>
    where
        F: FnOnce(&mut T) -> &mut U,
    {
        let (guard, lock) = Self::into_parts(this);
        OwnedMappedMutexGuard::from_parts((MutexGuard::map(guard, f), lock))
    }

    /// [`Self::map`] for a part that may not be there: `Err` gives the guard back.
    pub fn try_map<U: ?Sized + 'static, F>(
        this: Self,
        f: F,
    ) -> Result<OwnedMappedMutexGuard<T, U>, Self>
    where
        F: FnOnce(&mut T) -> Option<&mut U>,
    {
        let (guard, lock) = Self::into_parts(this);
        match MutexGuard::try_map(guard, f) {
            Ok(g) => Ok(OwnedMappedMutexGuard::from_parts((g, lock))),
            Err(g) => Err(Self::from_parts((g, lock))),
        }
    }
}

impl<T: ?Sized + 'static, U: ?Sized + 'static> OwnedMappedMutexGuard<T, U> {
    /// Maps again, as tokio's `OwnedMappedMutexGuard::map`.
    pub fn map<S: 'static, F>(this: Self, f: F) -> OwnedMappedMutexGuard<T, S>
    where
        F: FnOnce(&mut U) -> &mut S,
    {
        let (guard, lock) = Self::into_parts(this);
        OwnedMappedMutexGuard::from_parts((MappedMutexGuard::map(guard, f), lock))
    }

    /// Maps again to a part that may not be there: `Err` gives the guard back.
    pub fn try_map<S: 'static, F>(this: Self, f: F) -> Result<OwnedMappedMutexGuard<T, S>, Self>
    where
        F: FnOnce(&mut U) -> Option<&mut S>,
    {
        let (guard, lock) = Self::into_parts(this);
        match MappedMutexGuard::try_map(guard, f) {
            Ok(g) => Ok(OwnedMappedMutexGuard::from_parts((g, lock))),
            Err(g) => Err(Self::from_parts((g, lock))),
        }
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for Mutex<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mutex")
            .field("name", &self.recorder.name())
            .field("inner", &&self.inner)
            .finish()
    }
}

guard! {
    /// Guard of a tokio [`Mutex`].
    MutexGuard(MutexGuard), deref_mut
}

guard! {
    /// A [`MutexGuard`] mapped to part of the value ([`MutexGuard::map`]): the lock stays held
    /// until it is dropped, and the hold is recorded as the original guard's.
    MappedMutexGuard(MappedMutexGuard), deref_mut
}

impl<'a, T: ?Sized> MutexGuard<'a, T> {
    /// A guard for a part of the locked value, as tokio's `MutexGuard::map` (an associated
    /// function: `MutexGuard::map(guard, |v| &mut v.field)`). The hold goes on.
    pub fn map<U: ?Sized, F>(this: Self, f: F) -> MappedMutexGuard<'a, U>
    where
        F: FnOnce(&mut T) -> &mut U,
    {
        let (hold, inner) = Self::remap(this, |g| ::tokio::sync::MutexGuard::map(g, f));
        MappedMutexGuard::new(hold, inner)
    }

    /// [`Self::map`] for a part that may not be there: `Err` gives the guard back.
    pub fn try_map<U: ?Sized, F>(this: Self, f: F) -> Result<MappedMutexGuard<'a, U>, Self>
    where
        F: FnOnce(&mut T) -> Option<&mut U>,
    {
        match Self::remap(this, |g| ::tokio::sync::MutexGuard::try_map(g, f)) {
            (hold, Ok(inner)) => Ok(MappedMutexGuard::new(hold, inner)),
            (hold, Err(inner)) => Err(Self::new(hold, inner)),
        }
    }
}

impl<'a, T: ?Sized> MappedMutexGuard<'a, T> {
    /// Maps again, as tokio's `MappedMutexGuard::map`.
    pub fn map<U, F>(this: Self, f: F) -> MappedMutexGuard<'a, U>
    where
        F: FnOnce(&mut T) -> &mut U,
    {
        let (hold, inner) = Self::remap(this, |g| ::tokio::sync::MappedMutexGuard::map(g, f));
        MappedMutexGuard::new(hold, inner)
    }

    /// Maps again to a part that may not be there: `Err` gives the guard back.
    pub fn try_map<U, F>(this: Self, f: F) -> Result<MappedMutexGuard<'a, U>, Self>
    where
        F: FnOnce(&mut T) -> Option<&mut U>,
    {
        match Self::remap(this, |g| ::tokio::sync::MappedMutexGuard::try_map(g, f)) {
            (hold, Ok(inner)) => Ok(MappedMutexGuard::new(hold, inner)),
            (hold, Err(inner)) => Err(Self::new(hold, inner)),
        }
    }
}

/// An instrumented `tokio::sync::RwLock`.
pub struct RwLock<T: ?Sized> {
    recorder: Arc<Recorder>,
    holder: HolderSite,
    inner: ::tokio::sync::RwLock<T>,
}

// As tokio's (see `Mutex`'s).
impl<T: ?Sized + std::panic::UnwindSafe> std::panic::UnwindSafe for RwLock<T> {}

crate::sync::constructors!(RwLock, "reader-writer lock");

impl<T> RwLock<T> {
    /// Consumes the lock, returning the value.
    pub fn into_inner(self) -> T {
        self.inner.into_inner()
    }
}

impl RwLock<()> {
    /// A builder (sink, sampling); finish with [`RwLockBuilder::build`].
    /// Called as `RwLock::builder(..)`: it is defined on `RwLock<()>` so that no type needs
    /// spelling out; `build(value)` makes the `RwLock<T>` (`RwLock::<u64>::builder` does not
    /// exist).
    pub fn builder(name: impl Into<String>) -> RwLockBuilder {
        RwLockBuilder(Options::new(name.into()))
    }
}

builder! {
    /// Builder for a tokio [`RwLock`]; see [`RwLock::builder`].
    RwLockBuilder => RwLock, |o, value| RwLock {
        inner: match o.max_readers {
            Some(n) => ::tokio::sync::RwLock::with_max_readers(value, n.clamp(1, MAX_READS)),
            None => ::tokio::sync::RwLock::new(value),
        },
        recorder: o.recorder("tokio_rwlock"),
        holder: HolderSite::default(),
    }
}

/// The most readers a tokio `RwLock` admits at once (its `MAX_READS`, the default).
const MAX_READS: u32 = u32::MAX >> 3;

impl RwLockBuilder {
    /// At most `n` readers at once, as tokio's `RwLock::with_max_readers` (default
    /// `u32::MAX >> 3`, tokio's). Where tokio's panics (`0`, or more than that), `n` is
    /// clamped to `1..=u32::MAX >> 3`.
    pub fn max_readers(mut self, n: u32) -> Self {
        self.0.max_readers = Some(n);
        self
    }
}

impl<T> RwLock<T> {
    /// A lock admitting at most `max_reads` readers at once, as tokio's `with_max_readers`,
    /// named after the place in the source that creates it (see [`Self::new`]); `max_reads`
    /// is clamped as [`RwLockBuilder::max_readers`] says, where tokio's panics.
    #[track_caller]
    pub fn with_max_readers(value: T, max_reads: u32) -> RwLock<T> {
        RwLock::builder(crate::sync::site_name::<T>(Location::caller()))
            .max_readers(max_reads)
            .build(value)
    }
}

impl<T: ?Sized> RwLock<T> {
    /// Shared access, waiting asynchronously (a plain function returning the future, so that
    /// it can capture its caller's location).
    #[track_caller]
    pub fn read(&self) -> impl Future<Output = RwLockReadGuard<'_, T>> + '_ {
        self.read_at(Location::caller())
    }

    async fn read_at(&self, site: Site) -> RwLockReadGuard<'_, T> {
        let (inner, hold) = match try_with_budget(|| self.inner.try_read().ok()).await {
            Some(g) => (
                g,
                took(&self.recorder, &self.holder, LockMode::Shared, site),
            ),
            None => {
                let mode = LockMode::Shared;
                acquire(&self.recorder, &self.holder, mode, self.inner.read(), site).await
            }
        };
        RwLockReadGuard::new(hold, inner)
    }

    /// Exclusive access, waiting asynchronously (a plain function returning the future).
    #[track_caller]
    pub fn write(&self) -> impl Future<Output = RwLockWriteGuard<'_, T>> + '_ {
        self.write_at(Location::caller())
    }

    async fn write_at(&self, site: Site) -> RwLockWriteGuard<'_, T> {
        let (inner, hold) = match try_with_budget(|| self.inner.try_write().ok()).await {
            Some(g) => (
                g,
                took(&self.recorder, &self.holder, LockMode::Exclusive, site),
            ),
            None => {
                let mode = LockMode::Exclusive;
                acquire(&self.recorder, &self.holder, mode, self.inner.write(), site).await
            }
        };
        RwLockWriteGuard::new(hold, inner)
    }

    /// Shared access from synchronous code, blocking the thread, as tokio's `blocking_read`.
    /// Recorded as [`Self::read`].
    ///
    /// # Panics
    ///
    /// As tokio's: when called from an asynchronous context, even if the lock is free.
    #[track_caller]
    pub fn blocking_read(&self) -> RwLockReadGuard<'_, T> {
        let site = Location::caller();
        let (inner, hold) = acquire_blocking(
            &self.recorder,
            &self.holder,
            LockMode::Shared,
            site,
            || self.inner.try_read(),
            || self.inner.blocking_read(),
        );
        RwLockReadGuard::new(hold, inner)
    }

    /// Exclusive access from synchronous code, blocking the thread, as tokio's
    /// `blocking_write`. Recorded as [`Self::write`].
    ///
    /// # Panics
    ///
    /// As tokio's: when called from an asynchronous context, even if the lock is free.
    #[track_caller]
    pub fn blocking_write(&self) -> RwLockWriteGuard<'_, T> {
        let site = Location::caller();
        let (inner, hold) = acquire_blocking(
            &self.recorder,
            &self.holder,
            LockMode::Exclusive,
            site,
            || self.inner.try_write(),
            || self.inner.blocking_write(),
        );
        RwLockWriteGuard::new(hold, inner)
    }

    /// Shared access without waiting; a failure is counted as a conflict.
    #[track_caller]
    pub fn try_read(&self) -> Result<RwLockReadGuard<'_, T>, ::tokio::sync::TryLockError> {
        self.try_read_at(Location::caller())
    }

    fn try_read_at(
        &self,
        site: Site,
    ) -> Result<RwLockReadGuard<'_, T>, ::tokio::sync::TryLockError> {
        let t0 = Ticks::now();
        let r = self.inner.try_read();
        let mode = LockMode::Shared;
        let (inner, hold) = tried(&self.recorder, &self.holder, mode, t0, r, site)?;
        Ok(RwLockReadGuard::new(hold, inner))
    }

    /// Exclusive access without waiting; a failure is counted as a conflict.
    #[track_caller]
    pub fn try_write(&self) -> Result<RwLockWriteGuard<'_, T>, ::tokio::sync::TryLockError> {
        self.try_write_at(Location::caller())
    }

    fn try_write_at(
        &self,
        site: Site,
    ) -> Result<RwLockWriteGuard<'_, T>, ::tokio::sync::TryLockError> {
        let t0 = Ticks::now();
        let r = self.inner.try_write();
        let mode = LockMode::Exclusive;
        let (inner, hold) = tried(&self.recorder, &self.holder, mode, t0, r, site)?;
        Ok(RwLockWriteGuard::new(hold, inner))
    }

    /// Mutable access without locking.
    pub fn get_mut(&mut self) -> &mut T {
        self.inner.get_mut()
    }
}

impl<T: ?Sized + 'static> RwLock<T> {
    /// Shared access through an `Arc`, as tokio's `read_owned`: the guard keeps the `Arc`.
    /// Recorded as [`Self::read`]. Needs `T: 'static`, which tokio's does not.
    #[track_caller]
    pub fn read_owned(self: Arc<Self>) -> impl Future<Output = OwnedRwLockReadGuard<T>> {
        let site = Location::caller();
        let parts = acquire_owned(self, move |l| l.read_at(site));
        async move { OwnedRwLockReadGuard::from_parts(parts.await) }
    }

    /// Exclusive access through an `Arc`, as tokio's `write_owned`: the guard keeps the
    /// `Arc`. Recorded as [`Self::write`]. Needs `T: 'static`, which tokio's does not.
    #[track_caller]
    pub fn write_owned(self: Arc<Self>) -> impl Future<Output = OwnedRwLockWriteGuard<T>> {
        let site = Location::caller();
        let parts = acquire_owned(self, move |l| l.write_at(site));
        async move { OwnedRwLockWriteGuard::from_parts(parts.await) }
    }

    /// Shared access through an `Arc` without waiting, as tokio's `try_read_owned`.
    #[track_caller]
    pub fn try_read_owned(
        self: Arc<Self>,
    ) -> Result<OwnedRwLockReadGuard<T>, ::tokio::sync::TryLockError> {
        let site = Location::caller();
        take_owned(self, |l| l.try_read_at(site)).map(OwnedRwLockReadGuard::from_parts)
    }

    /// Exclusive access through an `Arc` without waiting, as tokio's `try_write_owned`.
    #[track_caller]
    pub fn try_write_owned(
        self: Arc<Self>,
    ) -> Result<OwnedRwLockWriteGuard<T>, ::tokio::sync::TryLockError> {
        let site = Location::caller();
        take_owned(self, |l| l.try_write_at(site)).map(OwnedRwLockWriteGuard::from_parts)
    }
}

owned_guard! {
    /// Shared guard of a tokio [`RwLock`] taken through an `Arc` ([`RwLock::read_owned`]), of
    /// the value or, mapped ([`OwnedRwLockReadGuard::map`]), of a part of it (`U`), as tokio's.
    OwnedRwLockReadGuard<T, U>(RwLockReadGuard<U>) of RwLock, rwlock
}

owned_guard! {
    /// Exclusive guard of a tokio [`RwLock`] taken through an `Arc` ([`RwLock::write_owned`]).
    OwnedRwLockWriteGuard<T>(RwLockWriteGuard<T>) of RwLock, rwlock, mut
}

owned_guard! {
    /// An [`OwnedRwLockWriteGuard`] mapped to part of the value
    /// ([`OwnedRwLockWriteGuard::map`]), as tokio's `OwnedRwLockMappedWriteGuard`.
    OwnedRwLockMappedWriteGuard<T, U>(RwLockMappedWriteGuard<U>) of RwLock, rwlock, mut
}

impl<T: ?Sized + 'static, U: ?Sized + 'static> OwnedRwLockReadGuard<T, U> {
    /// A guard for a part of the value, as tokio's `OwnedRwLockReadGuard::map`.
    pub fn map<F, V: ?Sized + 'static>(this: Self, f: F) -> OwnedRwLockReadGuard<T, V>
    where
        F: FnOnce(&U) -> &V,
    {
        let (guard, lock) = Self::into_parts(this);
        OwnedRwLockReadGuard::from_parts((RwLockReadGuard::map(guard, f), lock))
    }

    /// [`Self::map`] for a part that may not be there: `Err` gives the guard back.
    pub fn try_map<F, V: ?Sized + 'static>(
        this: Self,
        f: F,
    ) -> Result<OwnedRwLockReadGuard<T, V>, Self>
    where
        F: FnOnce(&U) -> Option<&V>,
    {
        let (guard, lock) = Self::into_parts(this);
        match RwLockReadGuard::try_map(guard, f) {
            Ok(g) => Ok(OwnedRwLockReadGuard::from_parts((g, lock))),
            Err(g) => Err(Self::from_parts((g, lock))),
        }
    }
}

impl<T: ?Sized + 'static> OwnedRwLockWriteGuard<T> {
    /// A guard for a part of the value, as tokio's `OwnedRwLockWriteGuard::map`.
    pub fn map<F, U: ?Sized + 'static>(this: Self, f: F) -> OwnedRwLockMappedWriteGuard<T, U>
    where
        F: FnOnce(&mut T) -> &mut U,
    {
        let (guard, lock) = Self::into_parts(this);
        OwnedRwLockMappedWriteGuard::from_parts((RwLockWriteGuard::map(guard, f), lock))
    }

    /// [`Self::map`] for a part that may not be there: `Err` gives the guard back.
    pub fn try_map<F, U: ?Sized + 'static>(
        this: Self,
        f: F,
    ) -> Result<OwnedRwLockMappedWriteGuard<T, U>, Self>
    where
        F: FnOnce(&mut T) -> Option<&mut U>,
    {
        let (guard, lock) = Self::into_parts(this);
        match RwLockWriteGuard::try_map(guard, f) {
            Ok(g) => Ok(OwnedRwLockMappedWriteGuard::from_parts((g, lock))),
            Err(g) => Err(Self::from_parts((g, lock))),
        }
    }

    /// The whole value as a mapped guard, as tokio's `into_mapped`.
    pub fn into_mapped(this: Self) -> OwnedRwLockMappedWriteGuard<T> {
        let (guard, lock) = Self::into_parts(this);
        OwnedRwLockMappedWriteGuard::from_parts((RwLockWriteGuard::into_mapped(guard), lock))
    }

    /// Turns the exclusive hold into a shared one without letting a writer in, as tokio's
    /// `OwnedRwLockWriteGuard::downgrade`; recorded as [`RwLockWriteGuard::downgrade`].
    #[track_caller]
    pub fn downgrade(self) -> OwnedRwLockReadGuard<T> {
        let (guard, lock) = Self::into_parts(self);
        OwnedRwLockReadGuard::from_parts((guard.downgrade(), lock))
    }

    /// [`Self::map`] then [`Self::downgrade`], as tokio's `downgrade_map`.
    #[track_caller]
    pub fn downgrade_map<F, U: ?Sized + 'static>(this: Self, f: F) -> OwnedRwLockReadGuard<T, U>
    where
        F: FnOnce(&T) -> &U,
    {
        let (guard, lock) = Self::into_parts(this);
        OwnedRwLockReadGuard::from_parts((RwLockWriteGuard::downgrade_map(guard, f), lock))
    }

    /// [`Self::downgrade_map`] for a part that may not be there: `Err` gives the write guard
    /// back, still exclusive.
    #[track_caller]
    pub fn try_downgrade_map<F, U: ?Sized + 'static>(
        this: Self,
        f: F,
    ) -> Result<OwnedRwLockReadGuard<T, U>, Self>
    where
        F: FnOnce(&T) -> Option<&U>,
    {
        let (guard, lock) = Self::into_parts(this);
        match RwLockWriteGuard::try_downgrade_map(guard, f) {
            Ok(g) => Ok(OwnedRwLockReadGuard::from_parts((g, lock))),
            Err(g) => Err(Self::from_parts((g, lock))),
        }
    }
}

impl<T: ?Sized + 'static, U: ?Sized + 'static> OwnedRwLockMappedWriteGuard<T, U> {
    /// Maps again, as tokio's `OwnedRwLockMappedWriteGuard::map`.
    pub fn map<F, V: ?Sized + 'static>(this: Self, f: F) -> OwnedRwLockMappedWriteGuard<T, V>
    where
        F: FnOnce(&mut U) -> &mut V,
    {
        let (guard, lock) = Self::into_parts(this);
        OwnedRwLockMappedWriteGuard::from_parts((RwLockMappedWriteGuard::map(guard, f), lock))
    }

    /// Maps again to a part that may not be there: `Err` gives the guard back.
    pub fn try_map<F, V: ?Sized + 'static>(
        this: Self,
        f: F,
    ) -> Result<OwnedRwLockMappedWriteGuard<T, V>, Self>
    where
        F: FnOnce(&mut U) -> Option<&mut V>,
    {
        let (guard, lock) = Self::into_parts(this);
        match RwLockMappedWriteGuard::try_map(guard, f) {
            Ok(g) => Ok(OwnedRwLockMappedWriteGuard::from_parts((g, lock))),
            Err(g) => Err(Self::from_parts((g, lock))),
        }
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for RwLock<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RwLock")
            .field("name", &self.recorder.name())
            .field("inner", &&self.inner)
            .finish()
    }
}

guard! {
    /// Shared guard of a tokio [`RwLock`].
    RwLockReadGuard(RwLockReadGuard)
}

guard! {
    /// Exclusive guard of a tokio [`RwLock`].
    RwLockWriteGuard(RwLockWriteGuard), deref_mut
}

guard! {
    /// An [`RwLockWriteGuard`] mapped to part of the value ([`RwLockWriteGuard::map`]): the
    /// lock stays held exclusively until it is dropped, recorded as the original guard's hold.
    RwLockMappedWriteGuard(RwLockMappedWriteGuard), deref_mut
}

impl<'a, T: ?Sized> RwLockReadGuard<'a, T> {
    /// A guard for a part of the value, as tokio's `RwLockReadGuard::map` (an associated
    /// function). The hold goes on.
    pub fn map<U: ?Sized, F>(this: Self, f: F) -> RwLockReadGuard<'a, U>
    where
        F: FnOnce(&T) -> &U,
    {
        let (hold, inner) = Self::remap(this, |g| ::tokio::sync::RwLockReadGuard::map(g, f));
        RwLockReadGuard::new(hold, inner)
    }

    /// [`Self::map`] for a part that may not be there: `Err` gives the guard back.
    pub fn try_map<U: ?Sized, F>(this: Self, f: F) -> Result<RwLockReadGuard<'a, U>, Self>
    where
        F: FnOnce(&T) -> Option<&U>,
    {
        match Self::remap(this, |g| ::tokio::sync::RwLockReadGuard::try_map(g, f)) {
            (hold, Ok(inner)) => Ok(RwLockReadGuard::new(hold, inner)),
            (hold, Err(inner)) => Err(Self::new(hold, inner)),
        }
    }
}

impl<'a, T: ?Sized> RwLockWriteGuard<'a, T> {
    /// A guard for a part of the value, as tokio's `RwLockWriteGuard::map` (an associated
    /// function). The exclusive hold goes on.
    pub fn map<U: ?Sized, F>(this: Self, f: F) -> RwLockMappedWriteGuard<'a, U>
    where
        F: FnOnce(&mut T) -> &mut U,
    {
        let (hold, inner) = Self::remap(this, |g| ::tokio::sync::RwLockWriteGuard::map(g, f));
        RwLockMappedWriteGuard::new(hold, inner)
    }

    /// [`Self::map`] for a part that may not be there: `Err` gives the guard back.
    pub fn try_map<U: ?Sized, F>(this: Self, f: F) -> Result<RwLockMappedWriteGuard<'a, U>, Self>
    where
        F: FnOnce(&mut T) -> Option<&mut U>,
    {
        match Self::remap(this, |g| ::tokio::sync::RwLockWriteGuard::try_map(g, f)) {
            (hold, Ok(inner)) => Ok(RwLockMappedWriteGuard::new(hold, inner)),
            (hold, Err(inner)) => Err(Self::new(hold, inner)),
        }
    }

    /// The whole value as a mapped guard, as tokio's `into_mapped`.
    pub fn into_mapped(this: Self) -> RwLockMappedWriteGuard<'a, T> {
        let (hold, inner) = Self::into_parts(this);
        RwLockMappedWriteGuard::new(hold, ::tokio::sync::RwLockWriteGuard::into_mapped(inner))
    }

    /// Turns the exclusive hold into a shared one without letting a writer in, as tokio's
    /// `downgrade`. Recorded as the end of the exclusive hold (its release counted, its time
    /// recorded if timed) and an uncontended shared acquisition at the call site, so
    /// `lock_held` shows the shared hold and the hold times stay those of each mode.
    #[track_caller]
    pub fn downgrade(self) -> RwLockReadGuard<'a, T> {
        let site = Location::caller();
        let (hold, inner) = Self::into_parts(self);
        hold.count_release();
        let inner = inner.downgrade();
        hold.released();
        RwLockReadGuard::new(
            crate::sync::uncontended(hold.recorder, LockMode::Shared, site),
            inner,
        )
    }

    /// [`Self::map`] then [`Self::downgrade`], as tokio's `downgrade_map`.
    #[track_caller]
    pub fn downgrade_map<U: ?Sized, F>(this: Self, f: F) -> RwLockReadGuard<'a, U>
    where
        F: FnOnce(&T) -> &U,
    {
        let site = Location::caller();
        let (hold, inner) = Self::into_parts(this);
        hold.count_release();
        let hold = Unwinding::new(hold, true);
        let inner = ::tokio::sync::RwLockWriteGuard::downgrade_map(inner, f);
        let hold = hold.done();
        hold.released();
        RwLockReadGuard::new(
            crate::sync::uncontended(hold.recorder, LockMode::Shared, site),
            inner,
        )
    }

    /// [`Self::downgrade_map`] for a part that may not be there: `Err` gives the write guard
    /// back, still exclusive.
    #[track_caller]
    pub fn try_downgrade_map<U: ?Sized, F>(this: Self, f: F) -> Result<RwLockReadGuard<'a, U>, Self>
    where
        F: FnOnce(&T) -> Option<&U>,
    {
        let site = Location::caller();
        match Self::remap(this, |g| {
            ::tokio::sync::RwLockWriteGuard::try_downgrade_map(g, f)
        }) {
            (hold, Ok(inner)) => {
                hold.count_release();
                hold.released();
                let shared = crate::sync::uncontended(hold.recorder, LockMode::Shared, site);
                Ok(RwLockReadGuard::new(shared, inner))
            }
            (hold, Err(inner)) => Err(Self::new(hold, inner)),
        }
    }
}

impl<'a, T: ?Sized> RwLockMappedWriteGuard<'a, T> {
    /// Maps again, as tokio's `RwLockMappedWriteGuard::map`.
    pub fn map<U: ?Sized, F>(this: Self, f: F) -> RwLockMappedWriteGuard<'a, U>
    where
        F: FnOnce(&mut T) -> &mut U,
    {
        let (hold, inner) = Self::remap(this, |g| ::tokio::sync::RwLockMappedWriteGuard::map(g, f));
        RwLockMappedWriteGuard::new(hold, inner)
    }

    /// Maps again to a part that may not be there: `Err` gives the guard back.
    pub fn try_map<U: ?Sized, F>(this: Self, f: F) -> Result<RwLockMappedWriteGuard<'a, U>, Self>
    where
        F: FnOnce(&mut T) -> Option<&mut U>,
    {
        match Self::remap(this, |g| {
            ::tokio::sync::RwLockMappedWriteGuard::try_map(g, f)
        }) {
            (hold, Ok(inner)) => Ok(RwLockMappedWriteGuard::new(hold, inner)),
            (hold, Err(inner)) => Err(Self::new(hold, inner)),
        }
    }
}
