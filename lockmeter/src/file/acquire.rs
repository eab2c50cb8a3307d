//! Every way to take a [`FileLock`]: the inlined fast path, then blocking, try, timeout and
//! async acquires through one [`FileLock::attempt`].

#[cfg(feature = "tokio")]
use std::future::Future;
use std::os::fd::{AsFd as _, BorrowedFd};
use std::panic::Location;
use std::time::{Duration, Instant};

use lock_api::RawRwLock as _;
use parking_lot::Mutex;
use rustix::io::Errno;

use super::guard::FileLockGuard;
use super::pool::FdPool;
use super::verify::OwnerState;
use super::{trace, Backend, FileLock, Held, LockFd, PosixHandle};
use crate::clock::Ticks;
use crate::error::{Error, Operation, Result};
use crate::kind::LockMode;
use crate::metrics::Outcome;
use crate::profile::Site;
use crate::sys;

/// Polling back-off for timed and async acquires (the kernel has no timed `flock`).
const POLL_MIN: Duration = Duration::from_micros(100);
const POLL_MAX: Duration = Duration::from_millis(10);

/// A fast-path acquire in progress: the descriptor it locks through, and its start time when
/// it is in the timing sample.
pub(super) struct Begun {
    fd: Box<LockFd>,
    start: Option<Ticks>,
}

/// What the fast path's system calls said.
struct Said {
    /// The non-blocking lock call.
    locked: std::result::Result<bool, Errno>,
    /// `lstat(path)`, when the lock was taken and verification is on.
    now_names: Option<std::result::Result<crate::sys::FileId, Errno>>,
}

/// What the fast path found.
enum FastOutcome {
    Locked(Box<LockFd>, Option<Ticks>),
    /// Held elsewhere (conflict counted).
    Busy(Option<Ticks>),
    /// Take the full path (it re-locks, re-verifies and counts what happened).
    Again(Option<Ticks>),
    Failed(Option<Ticks>, Errno),
}

/// How an acquire waits once it has found the lock taken.
#[derive(Clone, Copy)]
pub(super) enum Wait {
    /// Give up at once.
    No,
    /// Block in the kernel (and on the in-process gate for POSIX).
    Block,
}

/// When an acquire on a full path started, and whether it is in the timing sample.
#[derive(Clone, Copy)]
pub(super) struct Started {
    pub(super) at: Ticks,
    pub(super) timed: bool,
}

impl Started {
    /// `start` from the fast path (set when timed), or now.
    fn new(start: Option<Ticks>) -> Started {
        Started {
            at: start.unwrap_or_else(Ticks::now),
            timed: start.is_some(),
        }
    }
}

/// An acquire that may wait: counted as a waiter until [`Waiting::over`] or until dropped
/// (gave up, failed, or the future was cancelled).
struct Waiting<'a>(&'a crate::metrics::Recorder);

impl Waiting<'_> {
    /// Got the lock: where the holder that released it acquired, if it was in this process.
    fn over(self) -> Option<Site> {
        let holder = self.0.wait_over();
        std::mem::forget(self);
        holder
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.wait_over();
    }
}

/// A successful acquire: the lock and, with owner records, this holder's record state.
pub(super) struct Acquired {
    pub(super) held: Held,
    pub(super) owner: Option<Box<OwnerState>>,
}

impl FileLock {
    /// Takes the lock exclusively, waiting as long as it takes.
    #[inline(always)]
    #[track_caller]
    pub fn lock(&self) -> Result<FileLockGuard<'_>> {
        self.lock_mode(LockMode::Exclusive, Location::caller())
    }

    /// Takes the lock shared, waiting as long as it takes.
    #[inline(always)]
    #[track_caller]
    pub fn lock_shared(&self) -> Result<FileLockGuard<'_>> {
        self.lock_mode(LockMode::Shared, Location::caller())
    }

    /// Tries to take the lock exclusively; `Ok(None)` when it is held elsewhere.
    #[inline(always)]
    #[track_caller]
    pub fn try_lock(&self) -> Result<Option<FileLockGuard<'_>>> {
        self.try_lock_mode(LockMode::Exclusive, Location::caller())
    }

    /// Tries to take the lock shared; `Ok(None)` when it is held exclusively elsewhere.
    #[inline(always)]
    #[track_caller]
    pub fn try_lock_shared(&self) -> Result<Option<FileLockGuard<'_>>> {
        self.try_lock_mode(LockMode::Shared, Location::caller())
    }

    /// Takes the lock exclusively, giving up after `timeout` with `Ok(None)`.
    ///
    /// The kernel has no timed `flock`, so after a first non-blocking attempt this polls with
    /// exponential back-off (100 µs up to 10 ms): a release is noticed within 10 ms.
    #[track_caller]
    pub fn lock_timeout(&self, timeout: Duration) -> Result<Option<FileLockGuard<'_>>> {
        self.acquire_timeout(LockMode::Exclusive, timeout, Location::caller())
    }

    /// Takes the lock shared, giving up after `timeout` with `Ok(None)`.
    #[track_caller]
    pub fn lock_shared_timeout(&self, timeout: Duration) -> Result<Option<FileLockGuard<'_>>> {
        self.acquire_timeout(LockMode::Shared, timeout, Location::caller())
    }

    /// Takes the lock exclusively without blocking a runtime thread.
    ///
    /// Cancellation-safe: the future only ever holds the lock at the instant it resolves, so
    /// dropping it before then never leaves the lock held, not even later. Waits by polling
    /// with back-off (100 µs up to 10 ms) on the tokio timer.
    ///
    /// A plain function returning the future (so that it can capture its caller's location).
    #[cfg(feature = "tokio")]
    #[track_caller]
    pub fn lock_async(&self) -> impl Future<Output = Result<FileLockGuard<'_>>> + '_ {
        self.acquire_async(LockMode::Exclusive, Location::caller())
    }

    /// Takes the lock shared without blocking a runtime thread; see [`FileLock::lock_async`].
    #[cfg(feature = "tokio")]
    #[track_caller]
    pub fn lock_shared_async(&self) -> impl Future<Output = Result<FileLockGuard<'_>>> + '_ {
        self.acquire_async(LockMode::Shared, Location::caller())
    }

    // ---- the fast path --------------------------------------------------------------------
    //
    // On hosts with return-stack mitigations, the first `ret` after a system call into a frame
    // entered before that call costs as much as ~100 ns (AMD's SRSO "Safe RET"; Intel with
    // eIBRS here), a sixth of a whole `flock` + unlock. So the inlined part of an acquire is
    // the system calls and nothing else: everything before them (`fast_begin`) and after them
    // (`fast_end`) is an ordinary out-of-line call, whose return is predicted because it was
    // entered after the last system call or returns before the next. The inlined body stays
    // small enough that no caller shape (a closure, a generic function, `?`) makes the
    // compiler outline it.

    #[inline(always)]
    fn lock_mode(&self, mode: LockMode, site: Site) -> Result<FileLockGuard<'_>> {
        let Some(begun) = self.fast_begin() else {
            return self.lock_full(mode, site);
        };
        let said = self.fast_calls(&begun, mode);
        self.fast_end_lock(begun, mode, said, site)
    }

    #[inline(always)]
    fn try_lock_mode(&self, mode: LockMode, site: Site) -> Result<Option<FileLockGuard<'_>>> {
        let Some(begun) = self.fast_begin() else {
            return self.try_lock_full(mode, site);
        };
        let said = self.fast_calls(&begun, mode);
        self.fast_end_try(begun, mode, said, site)
    }

    /// The fast path's system calls, inline: the non-blocking lock, then `lstat` to verify.
    #[inline(always)]
    fn fast_calls(&self, begun: &Begun, mode: LockMode) -> Said {
        let locked = sys::lock(begun.fd.fd.as_fd(), self.kind, mode, false);
        let now_names = (self.verify && matches!(locked, Ok(true)))
            .then(|| sys::path_id(self.c_path.as_c_str()));
        Said { locked, now_names }
    }

    /// Before the fast path's system calls: whether it applies (flock/OFD without owner
    /// records, watching or per-acquisition spans, a descriptor idle in the pool), and whether
    /// this acquire is timed (decided by number, so no clock is read for the others).
    #[inline(never)]
    fn fast_begin(&self) -> Option<Begun> {
        let pool = self.fast_pool()?;
        let fd = pool.take()?;
        let start = self
            .recorder
            .file_attempt_timed()
            .then(|| self.recorder.timed_start());
        Some(Begun { fd, start })
    }

    /// The descriptor pool when the fast path applies. Per-acquisition spans (asked for, or
    /// `TRACE` enabled for target `lockmeter`) need the full path; no other log level does.
    #[inline(always)]
    fn fast_pool(&self) -> Option<&FdPool> {
        match &self.backend {
            Backend::Fds(pool) if self.fast_path && !trace::per_acquisition(self.spans) => {
                Some(pool)
            }
            _ => None,
        }
    }

    /// After a blocking acquire's fast system calls: the guard, or the full path.
    #[inline(never)]
    fn fast_end_lock(
        &self,
        begun: Begun,
        mode: LockMode,
        said: Said,
        site: Site,
    ) -> Result<FileLockGuard<'_>> {
        match self.fast_outcome(begun, mode, said) {
            FastOutcome::Locked(fd, start) => Ok(self.fast_guard(fd, mode, start, site)),
            FastOutcome::Busy(start) => self.acquire_blocking(mode, start, true, site),
            FastOutcome::Again(start) => self.acquire_blocking(mode, start, false, site),
            FastOutcome::Failed(start, errno) => Err(self.fast_failed(mode, start, errno)),
        }
    }

    /// After a try's fast system calls: the guard, `None`, or the full path.
    #[inline(never)]
    fn fast_end_try(
        &self,
        begun: Begun,
        mode: LockMode,
        said: Said,
        site: Site,
    ) -> Result<Option<FileLockGuard<'_>>> {
        match self.fast_outcome(begun, mode, said) {
            FastOutcome::Locked(fd, start) => Ok(Some(self.fast_guard(fd, mode, start, site))),
            FastOutcome::Busy(start) => Ok(self.fast_busy(mode, start)),
            FastOutcome::Again(start) => self.acquire_try(mode, start, site),
            FastOutcome::Failed(start, errno) => Err(self.fast_failed(mode, start, errno)),
        }
    }

    /// What the fast path's system calls mean; the descriptor goes back to the pool unless
    /// the lock was taken (or the lock call failed: it is closed, holding nothing).
    #[inline(always)]
    fn fast_outcome(&self, begun: Begun, mode: LockMode, said: Said) -> FastOutcome {
        let Begun { fd, start } = begun;
        let Backend::Fds(pool) = &self.backend else {
            // Unreachable: `fast_begin` took the descriptor from this pool.
            return FastOutcome::Again(start);
        };
        match (said.locked, said.now_names) {
            (Ok(true), None) => FastOutcome::Locked(fd, start),
            (Ok(true), Some(Ok(id))) if id == fd.id => FastOutcome::Locked(fd, start),
            // A migration (or a failing stat): let go; the full path counts it.
            (Ok(true), Some(_)) => {
                self.unlock_migrated(pool, fd);
                FastOutcome::Again(start)
            }
            (Ok(false), _) => {
                pool.put(fd);
                self.recorder.conflict(mode);
                FastOutcome::Busy(start)
            }
            // The descriptor is closed here; the error is counted and returned (a retry that
            // happened to succeed must not hide it).
            (Err(errno), _) => FastOutcome::Failed(start, errno),
        }
    }

    /// The full blocking path from the start (the fast path does not apply).
    #[cold]
    #[inline(never)]
    fn lock_full(&self, mode: LockMode, site: Site) -> Result<FileLockGuard<'_>> {
        let start = self.start_if_timed();
        self.acquire_blocking(mode, start, false, site)
    }

    /// The full try path from the start.
    #[cold]
    #[inline(never)]
    fn try_lock_full(&self, mode: LockMode, site: Site) -> Result<Option<FileLockGuard<'_>>> {
        let start = self.start_if_timed();
        self.acquire_try(mode, start, site)
    }

    /// Whether this acquire is timed; if so, its start.
    fn start_if_timed(&self) -> Option<Ticks> {
        self.recorder
            .file_attempt_timed()
            .then(|| self.recorder.timed_start())
    }

    /// A try found the lock taken on the fast path (the conflict is counted).
    #[cold]
    #[inline(never)]
    fn fast_busy(&self, mode: LockMode, start: Option<Ticks>) -> Option<FileLockGuard<'_>> {
        let start = start.unwrap_or_else(Ticks::now);
        self.not_acquired(mode, Outcome::WouldBlock, start, &tracing::Span::none());
        None
    }

    /// A migration (or a failing stat) on the fast path: let go; the full path counts it.
    #[cold]
    #[inline(never)]
    fn unlock_migrated(&self, pool: &FdPool, fd: Box<LockFd>) {
        if sys::unlock(fd.fd.as_fd(), self.kind).is_ok() {
            pool.put(fd);
        }
    }

    #[cold]
    #[inline(never)]
    fn fast_failed(&self, mode: LockMode, start: Option<Ticks>, errno: Errno) -> Error {
        let start = start.unwrap_or_else(Ticks::now);
        let e = self.err(Operation::Lock, errno);
        self.fail_wait(mode, start, &tracing::Span::none(), e)
    }

    // ---- the full paths -------------------------------------------------------------------

    #[cold]
    fn acquire_blocking(
        &self,
        mode: LockMode,
        start: Option<Ticks>,
        contended: bool,
        site: Site,
    ) -> Result<FileLockGuard<'_>> {
        let start = Started::new(start);
        let span = trace::acquire(self.span_attrs(), mode, self.spans);
        let _entered = span.enter();
        let mut contended = contended;
        self.recorder.wait_begins();
        let attempt = self.attempt(mode, Wait::Block, &mut contended);
        let holder = self.recorder.wait_over();
        match attempt {
            Ok(Some(acquired)) => {
                Ok(self.guard(acquired, mode, contended, start, holder, site, &span))
            }
            // A blocking attempt only returns None if the kernel said "would block" to a
            // blocking call, which it does not; treat it as an error rather than loop.
            Ok(None) => {
                let e = self.err(Operation::Lock, Errno::AGAIN);
                Err(self.fail_wait(mode, start.at, &span, e))
            }
            Err(e) => Err(self.fail_wait(mode, start.at, &span, e)),
        }
    }

    #[cold]
    fn acquire_try(
        &self,
        mode: LockMode,
        start: Option<Ticks>,
        site: Site,
    ) -> Result<Option<FileLockGuard<'_>>> {
        let start = Started::new(start);
        let span = trace::acquire(self.span_attrs(), mode, self.spans);
        let _entered = span.enter();
        let mut contended = false;
        match self.attempt(mode, Wait::No, &mut contended) {
            Ok(Some(acquired)) => Ok(Some(
                self.guard(acquired, mode, contended, start, None, site, &span),
            )),
            Ok(None) => {
                self.not_acquired(mode, Outcome::WouldBlock, start.at, &span);
                Ok(None)
            }
            Err(e) => Err(self.fail_wait(mode, start.at, &span, e)),
        }
    }

    fn acquire_timeout(
        &self,
        mode: LockMode,
        timeout: Duration,
        site: Site,
    ) -> Result<Option<FileLockGuard<'_>>> {
        let span = trace::acquire(self.span_attrs(), mode, self.spans);
        let _entered = span.enter();
        let start = Started::new(self.start_if_timed());
        let deadline = Instant::now() + timeout;
        let mut contended = false;
        let mut backoff = POLL_MIN;
        self.recorder.wait_begins();
        let waiting = Waiting(&self.recorder);
        loop {
            match self.attempt(mode, Wait::No, &mut contended) {
                Ok(Some(acquired)) => {
                    let holder = waiting.over();
                    return Ok(Some(
                        self.guard(acquired, mode, contended, start, holder, site, &span),
                    ));
                }
                Ok(None) => {}
                Err(e) => return Err(self.fail_wait(mode, start.at, &span, e)),
            }
            let now = Instant::now();
            if now >= deadline {
                self.not_acquired(mode, Outcome::Timeout, start.at, &span);
                return Ok(None);
            }
            std::thread::sleep(backoff.min(deadline - now));
            backoff = (backoff * 2).min(POLL_MAX);
        }
    }

    #[cfg(feature = "tokio")]
    async fn acquire_async(&self, mode: LockMode, site: Site) -> Result<FileLockGuard<'_>> {
        /// Records `cancelled` if the future is dropped before it resolves.
        struct Pending<'a> {
            lock: &'a FileLock,
            mode: LockMode,
            start: Ticks,
            span: tracing::Span,
            done: bool,
        }
        impl Drop for Pending<'_> {
            fn drop(&mut self) {
                if !self.done {
                    self.lock
                        .not_acquired(self.mode, Outcome::Cancelled, self.start, &self.span);
                }
            }
        }
        let start = Started::new(self.start_if_timed());
        let mut pending = Pending {
            lock: self,
            mode,
            start: start.at,
            span: trace::acquire(self.span_attrs(), mode, self.spans),
            done: false,
        };
        let mut contended = false;
        let mut backoff = POLL_MIN;
        self.recorder.wait_begins();
        let waiting = Waiting(&self.recorder);
        loop {
            // A non-blocking attempt holds nothing when it returns None, and returns the guard
            // in the same poll when it succeeds: there is no await point while the lock is held.
            let attempt = pending
                .span
                .in_scope(|| self.attempt(mode, Wait::No, &mut contended));
            match attempt {
                Ok(Some(acquired)) => {
                    pending.done = true;
                    let holder = waiting.over();
                    return Ok(self.guard(
                        acquired,
                        mode,
                        contended,
                        start,
                        holder,
                        site,
                        &pending.span,
                    ));
                }
                Ok(None) => {}
                Err(e) => {
                    pending.done = true;
                    return Err(self.fail_wait(mode, start.at, &pending.span, e));
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(POLL_MAX);
        }
    }

    #[inline]
    pub(super) fn span_attrs(&self) -> trace::SpanAttrs<'_> {
        trace::SpanAttrs {
            name: &self.name,
            kind: self.kind.as_str(),
            fs_type: Some(self.fs_type),
        }
    }

    /// An acquire call that ended without the lock (would block, timeout, cancelled).
    pub(super) fn not_acquired(
        &self,
        mode: LockMode,
        outcome: Outcome,
        start: Ticks,
        span: &tracing::Span,
    ) {
        self.recorder
            .record_wait(mode, outcome, start.elapsed_secs());
        trace::acquire_done(span, outcome, true);
    }

    /// An acquire call that failed with `e`.
    #[cold]
    fn fail_wait(&self, mode: LockMode, start: Ticks, span: &tracing::Span, e: Error) -> Error {
        self.recorder
            .record_wait(mode, Outcome::Error, start.elapsed_secs());
        trace::acquire_done(span, Outcome::Error, false);
        e
    }

    // ---- one attempt ------------------------------------------------------------------------

    /// One acquire: lock (first without blocking, then per `wait`), verify the inode and
    /// re-lock on a migration, then write the owner record if asked. Counts a conflict the
    /// first time the lock is found taken. Errors are counted here; the caller records the
    /// wait.
    #[inline]
    fn attempt(
        &self,
        mode: LockMode,
        wait: Wait,
        contended: &mut bool,
    ) -> Result<Option<Acquired>> {
        let Some(held) = self.lock_verified(mode, wait, contended)? else {
            return Ok(None);
        };
        let owner = if self.owner_record && mode == LockMode::Exclusive {
            match self.stamp(held.fd()) {
                Ok(o) => Some(o),
                Err(errno) => {
                    // Asked for a record and could not write it: do not hand out the lock.
                    let e = self.err(Operation::Lock, errno);
                    if let Err(errno) = self.unlock(held, mode) {
                        self.err(Operation::Unlock, errno);
                    }
                    return Err(e);
                }
            }
        } else {
            None
        };
        Ok(Some(Acquired { held, owner }))
    }

    /// Takes the kernel lock (and for POSIX the in-process gate) once, without verifying.
    #[inline]
    pub(super) fn lock_once(
        &self,
        mode: LockMode,
        wait: Wait,
        contended: &mut bool,
    ) -> Result<Option<Held>> {
        match &self.backend {
            Backend::Fds(pool) => self.lock_fd(pool, mode, wait, contended),
            Backend::Posix(current) => self.lock_posix(current, mode, wait, contended),
        }
    }

    #[inline]
    fn lock_fd(
        &self,
        pool: &FdPool,
        mode: LockMode,
        wait: Wait,
        contended: &mut bool,
    ) -> Result<Option<Held>> {
        let fd = match pool.take() {
            Some(fd) => fd,
            None => self.reopen()?,
        };
        match self.kernel_lock(fd.fd.as_fd(), mode, wait, contended) {
            Ok(true) => Ok(Some(Held::Fd(fd))),
            Ok(false) => {
                pool.put(fd);
                Ok(None)
            }
            Err(e) => Err(e), // the descriptor is closed; it holds nothing
        }
    }

    /// Kernel lock on `fd`: non-blocking first; on conflict count it, then block if asked.
    #[inline]
    fn kernel_lock(
        &self,
        fd: BorrowedFd<'_>,
        mode: LockMode,
        wait: Wait,
        contended: &mut bool,
    ) -> Result<bool> {
        match sys::lock(fd, self.kind, mode, false) {
            Ok(true) => return Ok(true),
            Ok(false) => self.conflict(mode, contended),
            Err(errno) => return Err(self.err(Operation::Lock, errno)),
        }
        match wait {
            Wait::No => Ok(false),
            Wait::Block => sys::lock(fd, self.kind, mode, true)
                .map_err(|errno| self.err(Operation::Lock, errno)),
        }
    }

    /// Counts the acquire's conflict, once.
    #[inline]
    fn conflict(&self, mode: LockMode, contended: &mut bool) {
        if !*contended {
            *contended = true;
            self.recorder.conflict(mode);
        }
    }

    fn lock_posix(
        &self,
        current: &Mutex<PosixHandle>,
        mode: LockMode,
        wait: Wait,
        contended: &mut bool,
    ) -> Result<Option<Held>> {
        let handle = current.lock().clone();
        let file = handle.file();
        // In-process gate first: threads of one process never exclude each other in the kernel.
        let gated = match mode {
            LockMode::Exclusive => file.gate.try_lock_exclusive(),
            LockMode::Shared => file.gate.try_lock_shared(),
        };
        if !gated {
            self.conflict(mode, contended);
            match wait {
                Wait::No => return Ok(None),
                Wait::Block => match mode {
                    LockMode::Exclusive => file.gate.lock_exclusive(),
                    LockMode::Shared => file.gate.lock_shared(),
                },
            }
        }
        let unlock_gate = || {
            // SAFETY: the gate was locked in `mode` above by this call.
            unsafe { file.unlock_gate(mode) }
        };
        let kernel = match mode {
            LockMode::Exclusive => self.kernel_lock(file.fd(), mode, wait, contended),
            LockMode::Shared => {
                // The first shared holder in this process takes the kernel read lock for all.
                // A thread may be blocked in the kernel holding `readers` (first reader waiting
                // for another process's writer): a non-blocking attempt must not wait for it.
                let readers = match wait {
                    Wait::Block => Some(file.readers.lock()),
                    Wait::No => file.readers.try_lock(),
                };
                let Some(mut readers) = readers else {
                    self.conflict(mode, contended);
                    unlock_gate();
                    return Ok(None);
                };
                if *readers == 0 {
                    let r = self.kernel_lock(file.fd(), mode, wait, contended);
                    if let Ok(true) = r {
                        *readers = 1;
                    }
                    r
                } else {
                    *readers += 1;
                    Ok(true)
                }
            }
        };
        match kernel {
            Ok(true) => Ok(Some(Held::Posix(handle))),
            Ok(false) => {
                unlock_gate();
                Ok(None)
            }
            Err(e) => {
                unlock_gate();
                Err(e)
            }
        }
    }
}
