//! [`FileLockGuard`] and the release path: one per kind (`flock`/OFD through the descriptor
//! pool, POSIX through the in-process gate), shared by `Drop`, [`FileLockGuard::unlock`] and
//! the migration path.

use std::fmt;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::time::Duration;

use rustix::io::Errno;

use super::acquire::{Acquired, Started};
use super::verify::OwnerState;
use super::watch::WatchHandle;
use super::{trace, Backend, FileLock, Held, LockFd, PosixHandle};
use crate::clock::Ticks;
use crate::error::{Operation, Result};
use crate::kind::{LockKind, LockMode};
use crate::metrics::Outcome;
use crate::owner;
use crate::profile::Site;
use crate::sys;

/// A held file lock. Dropping it releases the lock with an explicit unlock (`LOCK_UN` /
/// `F_UNLCK`); a failed unlock is counted in `lock.errors` and logged at `error` level. Call
/// [`FileLockGuard::unlock`] to get the error instead.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct FileLockGuard<'a> {
    lock: &'a FileLock,
    /// `None` once released. `ManuallyDrop` (here and below) keeps the guard's drop glue down to
    /// `Drop::drop`, small enough to be inlined into the caller: see `Drop`.
    held: ManuallyDrop<Option<Held>>,
    /// Watch, owner record and span; `None` in the common case (a small guard is cheap to move).
    extra: ManuallyDrop<Option<Box<GuardExtra>>>,
    /// When the lock was acquired, for an acquisition in the timing sample (its hold is
    /// recorded at release); `None` for the others, which read no clock.
    since: Option<Ticks>,
    /// Where the lock was acquired.
    site: Site,
    mode: LockMode,
    contended: bool,
}

/// The parts of a guard only some locks have.
struct GuardExtra {
    watch: Option<WatchHandle>,
    owner: Option<Box<OwnerState>>,
    /// The `lock.hold` span, kept for its lifetime: it closes when the guard goes.
    _span: tracing::Span,
}

impl fmt::Debug for FileLockGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileLockGuard")
            .field("lock", &self.lock.name)
            .field("mode", &self.mode)
            .field("contended", &self.contended)
            .finish_non_exhaustive()
    }
}

impl FileLock {
    /// The guard of a fast-path acquisition (no extras).
    #[inline(always)]
    pub(super) fn fast_guard(
        &self,
        fd: Box<LockFd>,
        mode: LockMode,
        start: Option<Ticks>,
        site: Site,
    ) -> FileLockGuard<'_> {
        self.recorder.acquired(mode, false);
        let since = start.map(|start| self.timed_acquired(mode, start));
        FileLockGuard {
            lock: self,
            held: ManuallyDrop::new(Some(Held::Fd(fd))),
            extra: ManuallyDrop::new(None),
            since,
            site,
            mode,
            contended: false,
        }
    }

    /// A timed fast-path acquisition: records its wait, returns when the hold started.
    #[cold]
    #[inline(never)]
    fn timed_acquired(&self, mode: LockMode, start: Ticks) -> Ticks {
        let now = Ticks::now();
        self.recorder
            .record_wait(mode, Outcome::Acquired, start.secs_until(now));
        now
    }

    /// The guard of a full-path acquisition: watch, owner record and span as configured.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn guard(
        &self,
        acquired: Acquired,
        mode: LockMode,
        contended: bool,
        start: Started,
        holder: Option<Site>,
        site: Site,
        acquire_span: &tracing::Span,
    ) -> FileLockGuard<'_> {
        let now = Ticks::now();
        self.recorder.acquired(mode, contended);
        let wait = start.at.secs_until(now);
        if start.timed {
            self.recorder.record_wait(mode, Outcome::Acquired, wait);
        }
        if contended {
            // Every wait for a lock found taken: the profile and slow-wait events.
            self.recorder.waited(mode, site, holder, wait);
        }
        trace::acquire_done(acquire_span, Outcome::Acquired, contended);
        let watch = self
            .watch
            .map(|interval| self.start_watch(&acquired, interval));
        let span = trace::hold(self.span_attrs(), mode, contended, self.spans);
        let extra = (watch.is_some() || acquired.owner.is_some() || !span.is_none()).then(|| {
            Box::new(GuardExtra {
                watch,
                owner: acquired.owner,
                _span: span,
            })
        });
        FileLockGuard {
            lock: self,
            held: ManuallyDrop::new(Some(acquired.held)),
            extra: ManuallyDrop::new(extra),
            since: start.timed.then_some(now),
            site,
            mode,
            contended,
        }
    }

    /// Records the hold of a timed (sampled) acquisition made at `site`, ending now.
    #[cold]
    #[inline(never)]
    fn record_hold(&self, mode: LockMode, contended: bool, since: Ticks, site: Site) {
        let secs = since.elapsed_secs();
        self.recorder.record_hold(mode, contended, secs);
        self.recorder.held(mode, site, secs);
    }

    // ---- release: one path per kind -----------------------------------------------------

    /// Releases a held lock of any kind.
    pub(super) fn unlock(&self, held: Held, mode: LockMode) -> std::result::Result<(), Errno> {
        match held {
            Held::Fd(fd) if self.kind == LockKind::Flock => self.unlock_flock(fd),
            Held::Fd(fd) => self.unlock_ofd(fd),
            Held::Posix(handle) => self.unlock_posix(handle, mode),
        }
    }

    /// flock: `LOCK_UN`, and the descriptor back to the pool. Inlined, system call included,
    /// into the guard's `Drop` (see there). A descriptor whose unlock failed is closed instead:
    /// closing the last descriptor of an open file description releases the lock.
    #[inline(always)]
    fn unlock_flock(&self, fd: Box<LockFd>) -> std::result::Result<(), Errno> {
        let r = rustix::fs::flock(fd.fd.as_fd(), rustix::fs::FlockOperation::Unlock);
        self.return_fd(fd, r);
        r
    }

    /// OFD: `F_UNLCK` over the whole file, and the descriptor back to the pool (closed if the
    /// unlock failed, which releases the lock).
    #[cold]
    #[inline(never)]
    fn unlock_ofd(&self, fd: Box<LockFd>) -> std::result::Result<(), Errno> {
        let r = sys::unlock(fd.fd.as_fd(), self.kind);
        self.return_fd(fd, r);
        r
    }

    #[inline(always)]
    fn return_fd(&self, fd: Box<LockFd>, unlocked: std::result::Result<(), Errno>) {
        match (&self.backend, unlocked) {
            (Backend::Fds(pool), Ok(())) => pool.put(fd),
            _ => close_failed(fd),
        }
    }

    /// POSIX: the kernel lock (the last shared holder in this process releases the shared
    /// kernel lock), then the in-process gate.
    #[cold]
    #[inline(never)]
    fn unlock_posix(&self, handle: PosixHandle, mode: LockMode) -> std::result::Result<(), Errno> {
        let file = handle.file();
        let r = match mode {
            LockMode::Exclusive => sys::unlock(file.fd(), self.kind),
            LockMode::Shared => {
                let mut readers = file.readers.lock();
                *readers -= 1;
                if *readers == 0 {
                    sys::unlock(file.fd(), self.kind)
                } else {
                    Ok(())
                }
            }
        };
        // SAFETY: a `Held::Posix` in `mode` owns one lock of the gate in that mode.
        unsafe { file.unlock_gate(mode) };
        r
    }
}

/// Closes the descriptor of a failed unlock.
#[cold]
#[inline(never)]
fn close_failed(fd: Box<LockFd>) {
    drop(fd);
}

impl FileLockGuard<'_> {
    /// The mode the lock is held in.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// Whether the acquire found the lock taken and had to wait.
    pub fn was_contended(&self) -> bool {
        self.contended
    }

    /// The fencing number of this acquisition (with owner records, exclusive mode): one more
    /// than the previous holder's. Pass it to the storage the lock protects and have it reject
    /// writes carrying a smaller one.
    pub fn fencing_token(&self) -> Option<u64> {
        self.owner().map(|o| o.fence)
    }

    /// Re-reads the owner record (bypassing caches) and checks it is still ours. `Ok(false)`
    /// means another holder acquired this "exclusive" lock while we held it: the lock does not
    /// exclude. The first such finding per guard is counted in `lock.violations` and logged at
    /// `error` level. Always `Ok(true)` without owner records. Also done at release.
    pub fn check_owner(&mut self) -> Result<bool> {
        let (Some(owner), Some(held)) = (
            self.extra.as_ref().and_then(|x| x.owner.as_deref()),
            self.held.as_ref(),
        ) else {
            return Ok(true);
        };
        let current =
            owner::read(held.fd()).map_err(|errno| self.lock.err(Operation::Verify, errno))?;
        if current.as_ref().map(|r| r.token.as_str()) == Some(owner.token.as_str()) {
            return Ok(true);
        }
        if !owner.violated.swap(true, Ordering::AcqRel) {
            self.lock
                .violation(&owner.token, owner.fence, current.as_ref());
        }
        Ok(false)
    }

    /// Whether the lock still protects what it should: the path still names the locked inode
    /// and (with owner records) no other holder's record appeared. With
    /// [`watch`](crate::FileLockBuilder::watch) this reads what the watcher found (cheap);
    /// without it, it checks the path now. A holder that sees `false` should stop its critical
    /// section.
    pub fn is_valid(&self) -> bool {
        match (self.watch(), &*self.held) {
            (Some(w), _) => w.watch().is_valid(),
            (None, Some(h)) => sys::path_id(&self.lock.path).is_ok_and(|id| id == h.id()),
            (None, None) => false,
        }
    }

    /// Blocks until the watcher finds the lock invalid (returns `true`) or `timeout` passes
    /// (`false`). Needs [`watch`](crate::FileLockBuilder::watch); without it, returns
    /// `!is_valid()` at once.
    pub fn wait_invalidated(&self, timeout: Duration) -> bool {
        match self.watch() {
            Some(w) => w.watch().wait_invalid(timeout),
            None => !self.is_valid(),
        }
    }

    /// Resolves when the watcher finds the lock invalid (pending forever without
    /// [`watch`](crate::FileLockBuilder::watch) while the lock stays valid). Use it in a
    /// `select!` beside the critical section's work.
    #[cfg(feature = "tokio")]
    pub async fn invalidated(&self) {
        match self.watch() {
            Some(w) => w.watch().invalidated().await,
            None if !self.is_valid() => {}
            None => std::future::pending().await,
        }
    }

    fn owner(&self) -> Option<&OwnerState> {
        self.extra.as_ref().and_then(|x| x.owner.as_deref())
    }

    fn watch(&self) -> Option<&WatchHandle> {
        self.extra.as_ref().and_then(|x| x.watch.as_ref())
    }

    /// Releases the lock, returning the unlock error if there is one (it is also counted).
    pub fn unlock(mut self) -> Result<()> {
        self.release()
            .map_err(|errno| self.lock.err(Operation::Unlock, errno))
    }

    /// Releases (once; later calls do nothing): the owner and watch checks, the counts, then
    /// the kind's unlock. The error is the unlock call's, not yet counted.
    #[inline(never)]
    fn release(&mut self) -> std::result::Result<(), Errno> {
        if self.extra.is_some() {
            self.release_checks();
        }
        let Some(held) = self.held.take() else {
            return Ok(());
        };
        self.count_release();
        self.lock.unlock(held, self.mode)
    }

    /// Counts the release; records the hold if this acquisition is timed and tells in-process
    /// waiters where it was acquired if any wait (one branch inline, the rest out of line).
    #[inline(always)]
    fn count_release(&self) {
        if self.since.is_some() | self.lock.recorder.has_waiters() {
            self.release_extras();
        }
        self.lock.recorder.count_release(self.mode);
    }

    #[cold]
    #[inline(never)]
    fn release_extras(&self) {
        if let Some(since) = self.since {
            self.lock
                .record_hold(self.mode, self.contended, since, self.site);
        }
        self.lock.recorder.releasing(self.site);
    }

    #[cold]
    fn release_checks(&mut self) {
        // Last chance to notice that someone else held the lock with us. A failed read is
        // counted (lock.errors, verify) and does not stop the release.
        let _ = self.check_owner();
        if let Some(w) = self.extra.as_mut().and_then(|x| x.watch.take()) {
            // Once more at release; counted only if the watcher has not already.
            w.watch().revalidate(crate::metrics::DetectedAt::Release);
        }
    }
}

impl AsFd for FileLockGuard<'_> {
    /// The locked descriptor (for handing the lock to a child process, as `lockmeter exec`
    /// does). Closing a duplicate of it does not release a `flock`/OFD lock; for POSIX locks
    /// any close of any descriptor of the file does.
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &*self.held {
            Some(h) => h.fd(),
            None => unreachable_released(),
        }
    }
}

#[cold]
fn unreachable_released() -> ! {
    // `held` is `None` only inside `release`, which is reached from `unlock(self)` or `drop`;
    // no `&self` method can observe it.
    std::process::abort()
}

impl Drop for FileLockGuard<'_> {
    /// Inlined into the caller, with the unlock system call: on hosts with return-stack
    /// mitigations (AMD's SRSO "Safe RET" here), the first `ret` after a system call into a
    /// frame entered before it costs ~130 ns, a fifth of the whole `flock` + unlock. Keeping
    /// the system calls in the caller's frame avoids that ret.
    ///
    ///
    /// So only the unlock system call of the common case (a `flock` guard without extras) is
    /// inlined; what comes before it and after it are ordinary out-of-line calls (see the fast
    /// path in `acquire.rs`), and everything else goes out of line.
    #[inline(always)]
    fn drop(&mut self) {
        if let Some(fd) = self.flock_release_begin() {
            let r = rustix::fs::flock(fd.fd.as_fd(), rustix::fs::FlockOperation::Unlock);
            self.lock.flock_release_end(fd, r);
        }
    }
}

impl FileLockGuard<'_> {
    /// Before the unlock call: for a `flock` guard without extras, counts the release and
    /// returns the descriptor to unlock; anything else it releases itself (returns `None`).
    #[inline(never)]
    fn flock_release_begin(&mut self) -> Option<Box<LockFd>> {
        if let (LockKind::Flock, Some(Held::Fd(_)), None) =
            (self.lock.kind, &*self.held, &*self.extra)
        {
            let Some(Held::Fd(fd)) = self.held.take() else {
                return None;
            };
            self.count_release();
            Some(fd)
        } else {
            self.drop_slow();
            None
        }
    }
}

impl FileLock {
    /// After a guard's `flock` unlock: the descriptor back to the pool, or closed and the
    /// failure reported.
    #[inline(never)]
    fn flock_release_end(&self, fd: Box<LockFd>, r: std::result::Result<(), Errno>) {
        self.return_fd(fd, r);
        if let Err(errno) = r {
            release_failed(self, errno);
        }
    }
}

impl FileLockGuard<'_> {
    #[cold]
    #[inline(never)]
    fn drop_slow(&mut self) {
        if let Err(errno) = self.release() {
            release_failed(self.lock, errno);
        }
        if self.extra.is_some() {
            // SAFETY: dropped once, here; `extra` is not used after `drop`.
            unsafe { drop_extra(&mut self.extra) };
        }
    }
}

/// Closes the watch and span of a guard.
///
/// # Safety
/// `extra` must not be used afterwards.
#[cold]
#[inline(never)]
unsafe fn drop_extra(extra: &mut ManuallyDrop<Option<Box<GuardExtra>>>) {
    // SAFETY: per the caller's contract.
    unsafe { ManuallyDrop::drop(extra) }
}

#[cold]
#[inline(never)]
fn release_failed(lock: &FileLock, errno: Errno) {
    let e = lock.err(Operation::Unlock, errno);
    tracing::error!(error = %e, lock.name = %lock.name, "failed to release lock");
}
