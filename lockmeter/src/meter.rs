//! [`LockMeter`]: the metric schema for any lock call lockmeter does not wrap itself: a
//! `parking_lot` lock, a Redis `SET NX PX`, an etcd or database advisory lock.
//!
//! ```
//! use lockmeter::{LockMeter, LockMode};
//!
//! let meter = LockMeter::new("jobs", "parking_lot_mutex");
//! let jobs = parking_lot::Mutex::new(Vec::<u32>::new());
//!
//! // Try first, then block: contention is measured, not guessed.
//! let mut guard = meter.lock(LockMode::Exclusive, || jobs.try_lock(), || jobs.lock());
//! guard.push(7);
//! drop(guard); // hold time recorded
//!
//! // Any call that may fail or give up: report how it ended.
//! let attempt = meter.start(LockMode::Exclusive);
//! let got_it = true; // e.g. redis SET key token NX PX 30000 returned OK
//! if got_it {
//!     let hold = attempt.acquired(false);
//!     // ... critical section ...
//!     hold.released();
//! } else {
//!     attempt.would_block();
//! }
//! ```

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::panic::Location;
use std::sync::Arc;

use crate::clock::Ticks;
use crate::kind::LockMode;
use crate::metrics::{LostReason, Outcome, Recorder, Sink, Spec};
use crate::profile::Site;

/// Records the schema for one lock whose acquire and release calls are not lockmeter's.
#[derive(Debug, Clone)]
pub struct LockMeter {
    recorder: Arc<Recorder>,
}

impl LockMeter {
    /// A meter for the lock `name` of kind `kind` (`lock.kind`: `redis`, `etcd`,
    /// `parking_lot_mutex`, `pg_advisory`, ...) on the global meter provider.
    pub fn new(name: &str, kind: &str) -> LockMeter {
        LockMeter::with_sink(name, kind, &Sink::global())
    }

    /// The same, recording into `sink`. Every attempt is timed (no sampling: a lock call
    /// worth wrapping this way costs far more than two histogram records).
    pub fn with_sink(name: &str, kind: &str, sink: &Sink) -> LockMeter {
        LockMeter::with_attributes(name, kind, sink, &[])
    }

    /// The same, with `attributes` added to every series (as file locks add `fs.type`). Keep
    /// them few and bounded: each distinct set is a series.
    pub fn with_attributes(
        name: &str,
        kind: &str,
        sink: &Sink,
        attributes: &[opentelemetry::KeyValue],
    ) -> LockMeter {
        LockMeter {
            recorder: Recorder::new(Spec {
                extra: attributes,
                ..Spec::new(sink, name, kind, 1)
            }),
        }
    }

    /// Starts measuring an acquire call: the wait runs from now until the attempt is resolved
    /// with [`Attempt::acquired`], [`Attempt::would_block`], [`Attempt::timed_out`] or
    /// [`Attempt::failed`]. An attempt dropped unresolved (an async acquire cancelled) records
    /// `lock.outcome = cancelled`. The caller's location is the attempt's call site (see
    /// [`crate::profile`]).
    #[track_caller]
    pub fn start(&self, mode: LockMode) -> Attempt<'_> {
        Attempt {
            recorder: &self.recorder,
            mode,
            start: Ticks::now(),
            site: Location::caller(),
            resolved: false,
            conflicted: std::cell::Cell::new(false),
        }
    }

    /// Measures a lock with a non-blocking and a blocking acquire (most lock APIs): tries
    /// first; if that fails, counts a conflict and blocks. Returns the lock's guard wrapped so
    /// that dropping it records the hold.
    #[track_caller]
    pub fn lock<G>(
        &self,
        mode: LockMode,
        try_lock: impl FnOnce() -> Option<G>,
        lock: impl FnOnce() -> G,
    ) -> Metered<'_, G> {
        let attempt = self.start(mode);
        match try_lock() {
            Some(g) => Metered {
                guard: Some(g),
                hold: attempt.acquired(false),
            },
            None => {
                attempt.conflict();
                let g = lock();
                Metered {
                    guard: Some(g),
                    hold: attempt.acquired(true),
                }
            }
        }
    }

    /// Measures an async acquire (any future yielding the lock). Cancelled futures record
    /// `cancelled`. `contended` is unknown for an opaque future: pass what you know. A plain
    /// function returning the future, so that it can capture its caller's location.
    #[track_caller]
    pub fn lock_async<'a, G, F>(
        &'a self,
        mode: LockMode,
        contended: bool,
        acquire: F,
    ) -> impl Future<Output = Metered<'a, G>> + 'a
    where
        F: Future<Output = G> + 'a,
        G: 'a,
    {
        let attempt = self.start(mode);
        async move {
            let g = acquire.await;
            Metered {
                guard: Some(g),
                hold: attempt.acquired(contended),
            }
        }
    }
}

/// An acquire in progress; resolve it with how it ended.
#[must_use = "resolve the attempt (acquired, would_block, timed_out, failed); dropping it records a cancellation"]
#[derive(Debug)]
pub struct Attempt<'a> {
    recorder: &'a Recorder,
    mode: LockMode,
    start: Ticks,
    site: Site,
    resolved: bool,
    /// A conflict is counted at most once per attempt.
    conflicted: std::cell::Cell<bool>,
}

impl<'a> Attempt<'a> {
    /// Counts a conflict (the lock was found taken) without resolving the attempt: call it
    /// when a try failed and the caller goes on waiting. Counted once per attempt, however
    /// often it is called.
    pub fn conflict(&self) {
        if !self.conflicted.replace(true) {
            self.recorder.conflict(self.mode);
            self.recorder.wait_begins();
        }
    }

    /// The lock was acquired (`contended`: the acquire had to wait for another holder).
    pub fn acquired(mut self, contended: bool) -> Hold<'a> {
        self.resolved = true;
        let now = Ticks::now();
        let secs = self.start.secs_until(now);
        self.recorder
            .record_wait(self.mode, Outcome::Acquired, secs);
        self.recorder.acquired(self.mode, contended);
        let holder = self.stop_waiting();
        if contended || self.recorder.is_slow_wait(secs) {
            self.recorder.waited(self.mode, self.site, holder, secs);
        }
        Hold {
            recorder: self.recorder,
            mode: self.mode,
            contended,
            since: now,
            site: self.site,
            released: false,
        }
    }

    /// No longer a waiter (if [`Self::conflict`] made it one): the releasing holder's site.
    fn stop_waiting(&self) -> Option<Site> {
        if self.conflicted.get() {
            self.recorder.wait_over()
        } else {
            None
        }
    }

    /// A non-blocking attempt found the lock taken (a conflict, unless already counted).
    pub fn would_block(self) {
        self.conflict();
        self.end(Outcome::WouldBlock);
    }

    /// The caller's deadline passed (a conflict, unless already counted).
    pub fn timed_out(self) {
        self.conflict();
        self.end(Outcome::Timeout);
    }

    /// The acquire failed; `error_type` is recorded as `error.type` on `lock.errors`
    /// (an errno name, or the client's error kind such as `ConnectionRefused`).
    pub fn failed(self, error_type: &str) {
        self.recorder.error("lock", error_type);
        self.end(Outcome::Error);
    }

    fn end(mut self, outcome: Outcome) {
        self.resolved = true;
        self.stop_waiting();
        self.recorder
            .record_wait(self.mode, outcome, self.start.elapsed_secs());
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.resolved {
            self.stop_waiting();
            self.recorder
                .record_wait(self.mode, Outcome::Cancelled, self.start.elapsed_secs());
        }
    }
}

/// A measured hold: [`Hold::released`] (or dropping it) records the hold time.
#[derive(Debug)]
#[must_use = "the hold ends (and is recorded) when this is dropped"]
pub struct Hold<'a> {
    recorder: &'a Recorder,
    mode: LockMode,
    contended: bool,
    since: Ticks,
    site: Site,
    released: bool,
}

impl Hold<'_> {
    /// The lock was released.
    pub fn released(mut self) {
        self.release();
    }

    /// The release call failed: counted in `lock.errors` (operation `unlock`) and the hold
    /// ends here.
    pub fn release_failed(mut self, error_type: &str) {
        self.recorder.error("unlock", error_type);
        self.release();
    }

    /// The hold ended without a release: the lock was taken away (a lease expired, the key was
    /// deleted or overwritten, the connection dropped). Counted in `lock.lost` with `reason`;
    /// the hold time is recorded up to now.
    pub fn lost(mut self, reason: LostReason) {
        self.recorder.lost(reason);
        self.release();
    }

    /// The lock stays held after this process stops measuring it: a descriptor borrowed from
    /// a parent shell, a command this process `exec`s into. The hold ends here as far as this
    /// process's metrics go (`lock.held` does not stay up for a holder that is gone), and no
    /// hold time is recorded: when the lock is released is not known here.
    pub fn handed_off(mut self) {
        if !self.released {
            self.released = true;
            self.recorder.count_release(self.mode);
        }
    }

    fn release(&mut self) {
        if !self.released {
            self.released = true;
            self.recorder.count_release(self.mode);
            self.recorder.releasing(self.site);
            let secs = self.since.elapsed_secs();
            self.recorder.record_hold(self.mode, self.contended, secs);
            self.recorder.held(self.mode, self.site, secs);
        }
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

/// A lock guard with its measured hold; derefs to the guard.
#[derive(Debug)]
#[must_use = "the lock is released (and the hold recorded) as soon as this is dropped"]
pub struct Metered<'a, G> {
    // Dropped first: the underlying lock is released before the hold is recorded as ended.
    guard: Option<G>,
    hold: Hold<'a>,
}

impl<G> Metered<'_, G> {
    /// Whether the acquire had to wait.
    pub fn was_contended(&self) -> bool {
        self.hold.contended
    }
}

impl<G> Deref for Metered<'_, G> {
    type Target = G;
    fn deref(&self) -> &G {
        match &self.guard {
            Some(g) => g,
            None => unreachable_taken(),
        }
    }
}

impl<G> DerefMut for Metered<'_, G> {
    fn deref_mut(&mut self) -> &mut G {
        match &mut self.guard {
            Some(g) => g,
            None => unreachable_taken(),
        }
    }
}

#[cold]
fn unreachable_taken() -> ! {
    // `guard` is only taken in `Drop`, after which no method can run.
    std::process::abort()
}

impl<G> Drop for Metered<'_, G> {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.hold.release();
    }
}
