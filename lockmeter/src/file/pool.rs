//! Idle lock descriptors of one `FileLock` (flock and OFD locks), kept for reuse.
//!
//! Every holder locks through its own open file description, so the kernel excludes threads of
//! one process as it excludes processes. The common case (one holder at a time) takes and
//! returns the same descriptor through one atomic slot: a swap to take it, a compare-exchange
//! to give it back, no lock and no allocation. Further idle descriptors (after concurrent
//! shared holds) wait in a mutex-protected list.

use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use parking_lot::Mutex;

use super::LockFd;

/// Most idle descriptors kept per lock; more are closed when given back.
const MAX_IDLE: usize = 8;

pub(super) struct FdPool {
    /// One idle descriptor, or null. Owns the `Box` it points to.
    slot: AtomicPtr<LockFd>,
    /// Boxed like the slot's: descriptors move between the two without allocating.
    #[allow(clippy::vec_box)]
    more: Mutex<Vec<Box<LockFd>>>,
}

impl FdPool {
    pub(super) fn new(fd: Box<LockFd>) -> FdPool {
        FdPool {
            slot: AtomicPtr::new(Box::into_raw(fd)),
            more: Mutex::new(Vec::new()),
        }
    }

    /// An idle descriptor, if there is one.
    #[inline(always)]
    pub(super) fn take(&self) -> Option<Box<LockFd>> {
        self.take_slot().or_else(|| self.take_more())
    }

    #[cold]
    fn take_more(&self) -> Option<Box<LockFd>> {
        self.more.lock().pop()
    }

    /// Gives an idle descriptor back (closed if the pool is full).
    #[inline(always)]
    pub(super) fn put(&self, fd: Box<LockFd>) {
        let p = Box::into_raw(fd);
        let stored =
            self.slot
                .compare_exchange(ptr::null_mut(), p, Ordering::Release, Ordering::Relaxed);
        if stored.is_err() {
            // SAFETY: `p` came from `Box::into_raw` just above and was not stored (the error
            // carries the slot's current value, not ours).
            self.put_more(unsafe { Box::from_raw(p) });
        }
    }

    #[cold]
    fn put_more(&self, fd: Box<LockFd>) {
        let mut more = self.more.lock();
        if more.len() < MAX_IDLE - 1 {
            more.push(fd);
        }
    }

    /// Closes every idle descriptor for which `keep` is false.
    pub(super) fn retain(&self, keep: impl Fn(&LockFd) -> bool) {
        if let Some(fd) = self.take_slot() {
            if keep(&fd) {
                self.put(fd);
            }
        }
        self.more.lock().retain(|fd| keep(fd));
    }

    #[inline(always)]
    fn take_slot(&self) -> Option<Box<LockFd>> {
        let p = self.slot.swap(ptr::null_mut(), Ordering::Acquire);
        // SAFETY: a non-null slot pointer came from `Box::into_raw` in `new`/`put`, and the swap
        // made this call its only owner.
        (!p.is_null()).then(|| unsafe { Box::from_raw(p) })
    }
}

impl Drop for FdPool {
    fn drop(&mut self) {
        drop(self.take_slot());
    }
}
