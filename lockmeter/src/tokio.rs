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
//! let sessions = lockmeter::tokio::Mutex::named("sessions", 0u64);
//! *sessions.lock().await += 1;
//! # }
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

/// Try first; on conflict count it and await `wait`, recording the wait (or its cancellation).
async fn acquire<'s, G, F>(
    recorder: &'s Recorder,
    holder: &HolderSite,
    mode: LockMode,
    tried: Option<G>,
    wait: F,
    site: Site,
) -> (G, Hold<'s>)
where
    F: Future<Output = G>,
{
    if let Some(g) = tried {
        holder.acquired_at(site);
        return (g, crate::sync::uncontended(recorder, mode, site));
    }
    let start = recorder.contended_start(mode);
    let mut waiting = Waiting {
        recorder,
        mode,
        start,
        done: false,
    };
    let g = wait.await;
    waiting.done = true;
    let (since, end) = recorder.contended_acquired(mode, start);
    let waited_for = holder.get();
    holder.acquired_at(site);
    (
        g,
        Hold {
            recorder,
            mode,
            since,
            site,
            waited: Some((start, end, waited_for)),
        },
    )
}

/// An instrumented `tokio::sync::Mutex`.
pub struct Mutex<T: ?Sized> {
    recorder: Arc<Recorder>,
    holder: HolderSite,
    inner: ::tokio::sync::Mutex<T>,
}

impl<T> Mutex<T> {
    /// A mutex recording as `lock.name = name` on the global meter.
    pub fn named(name: impl Into<String>, value: T) -> Mutex<T> {
        Mutex::builder(name).build(value)
    }

    /// Consumes the mutex, returning the value.
    pub fn into_inner(self) -> T {
        self.inner.into_inner()
    }
}

impl Mutex<()> {
    /// A builder (sink, sampling); finish with [`MutexBuilder::build`].
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
        let site = Location::caller();
        async move {
            let tried = try_with_budget(|| self.inner.try_lock().ok()).await;
            let (inner, hold) = acquire(
                &self.recorder,
                &self.holder,
                LockMode::Exclusive,
                tried,
                self.inner.lock(),
                site,
            )
            .await;
            MutexGuard {
                hold,
                inner: ManuallyDrop::new(inner),
            }
        }
    }

    /// Tries to lock without waiting; a failure is counted as a conflict.
    #[track_caller]
    pub fn try_lock(&self) -> Result<MutexGuard<'_, T>, ::tokio::sync::TryLockError> {
        let t0 = Ticks::now();
        match self.inner.try_lock() {
            Ok(inner) => {
                let site = Location::caller();
                self.holder.acquired_at(site);
                Ok(MutexGuard {
                    hold: crate::sync::uncontended(&self.recorder, LockMode::Exclusive, site),
                    inner: ManuallyDrop::new(inner),
                })
            }
            Err(e) => {
                self.recorder.conflict(LockMode::Exclusive);
                self.recorder.record_wait(
                    LockMode::Exclusive,
                    Outcome::WouldBlock,
                    t0.elapsed_secs(),
                );
                Err(e)
            }
        }
    }

    /// Mutable access without locking.
    pub fn get_mut(&mut self) -> &mut T {
        self.inner.get_mut()
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

/// Guard of a tokio [`Mutex`].
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct MutexGuard<'a, T: ?Sized> {
    hold: Hold<'a>,
    inner: ManuallyDrop<::tokio::sync::MutexGuard<'a, T>>,
}

impl<T: ?Sized> Drop for MutexGuard<'_, T> {
    fn drop(&mut self) {
        self.hold.count_release();
        // SAFETY: dropped here, once; never used again.
        unsafe { ManuallyDrop::drop(&mut self.inner) };
        self.hold.released();
    }
}

impl<T: ?Sized> Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T: ?Sized> DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for MutexGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.inner, f)
    }
}

/// An instrumented `tokio::sync::RwLock`.
pub struct RwLock<T: ?Sized> {
    recorder: Arc<Recorder>,
    holder: HolderSite,
    inner: ::tokio::sync::RwLock<T>,
}

impl<T> RwLock<T> {
    /// A reader-writer lock recording as `lock.name = name` on the global meter.
    pub fn named(name: impl Into<String>, value: T) -> RwLock<T> {
        RwLock::builder(name).build(value)
    }

    /// Consumes the lock, returning the value.
    pub fn into_inner(self) -> T {
        self.inner.into_inner()
    }
}

impl RwLock<()> {
    /// A builder (sink, sampling); finish with [`RwLockBuilder::build`].
    pub fn builder(name: impl Into<String>) -> RwLockBuilder {
        RwLockBuilder(Options::new(name.into()))
    }
}

builder! {
    /// Builder for a tokio [`RwLock`]; see [`RwLock::builder`].
    RwLockBuilder => RwLock, |o, value| RwLock {
        recorder: o.recorder("tokio_rwlock"),
        holder: HolderSite::default(),
        inner: ::tokio::sync::RwLock::new(value),
    }
}

impl<T: ?Sized> RwLock<T> {
    /// Shared access, waiting asynchronously (a plain function returning the future, so that
    /// it can capture its caller's location).
    #[track_caller]
    pub fn read(&self) -> impl Future<Output = RwLockReadGuard<'_, T>> + '_ {
        let site = Location::caller();
        async move {
            let tried = try_with_budget(|| self.inner.try_read().ok()).await;
            let (inner, hold) = acquire(
                &self.recorder,
                &self.holder,
                LockMode::Shared,
                tried,
                self.inner.read(),
                site,
            )
            .await;
            RwLockReadGuard {
                hold,
                inner: ManuallyDrop::new(inner),
            }
        }
    }

    /// Exclusive access, waiting asynchronously (a plain function returning the future).
    #[track_caller]
    pub fn write(&self) -> impl Future<Output = RwLockWriteGuard<'_, T>> + '_ {
        let site = Location::caller();
        async move {
            let tried = try_with_budget(|| self.inner.try_write().ok()).await;
            let (inner, hold) = acquire(
                &self.recorder,
                &self.holder,
                LockMode::Exclusive,
                tried,
                self.inner.write(),
                site,
            )
            .await;
            RwLockWriteGuard {
                hold,
                inner: ManuallyDrop::new(inner),
            }
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

/// Shared guard of a tokio [`RwLock`].
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct RwLockReadGuard<'a, T: ?Sized> {
    hold: Hold<'a>,
    inner: ManuallyDrop<::tokio::sync::RwLockReadGuard<'a, T>>,
}

/// Exclusive guard of a tokio [`RwLock`].
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct RwLockWriteGuard<'a, T: ?Sized> {
    hold: Hold<'a>,
    inner: ManuallyDrop<::tokio::sync::RwLockWriteGuard<'a, T>>,
}

impl<T: ?Sized> Drop for RwLockReadGuard<'_, T> {
    fn drop(&mut self) {
        self.hold.count_release();
        // SAFETY: dropped here, once; never used again.
        unsafe { ManuallyDrop::drop(&mut self.inner) };
        self.hold.released();
    }
}

impl<T: ?Sized> Drop for RwLockWriteGuard<'_, T> {
    fn drop(&mut self) {
        self.hold.count_release();
        // SAFETY: dropped here, once; never used again.
        unsafe { ManuallyDrop::drop(&mut self.inner) };
        self.hold.released();
    }
}

impl<T: ?Sized> Deref for RwLockReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T: ?Sized> Deref for RwLockWriteGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T: ?Sized> DerefMut for RwLockWriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}
