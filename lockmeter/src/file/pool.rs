//! Idle lock descriptors of one `FileLock` (flock and OFD locks), kept for reuse.
//!
//! Every holder locks through its own open file description, so the kernel excludes threads of
//! one process as it excludes processes. The common case (one holder at a time) takes and
//! returns the same descriptor through one atomic slot: a swap to take it, a compare-exchange
//! to give it back, no lock and no allocation. Further idle descriptors (after concurrent
//! shared holds) wait in a mutex-protected list.

use std::ptr;
use std::sync::atomic::Ordering;

// Under `--cfg loom` the slot and the list's lock are loom's (see the model tests below).
#[cfg(loom)]
use loom::sync::atomic::AtomicPtr;
#[cfg(not(loom))]
use parking_lot::Mutex;
#[cfg(not(loom))]
use std::sync::atomic::AtomicPtr;

/// loom's mutex with parking_lot's `lock()`.
#[cfg(loom)]
#[derive(Default)]
struct Mutex<T>(loom::sync::Mutex<T>);

#[cfg(loom)]
impl<T> Mutex<T> {
    fn new(v: T) -> Self {
        Mutex(loom::sync::Mutex::new(v))
    }

    fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

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

/// Model tests: `RUSTFLAGS="--cfg loom" cargo test -p lockmeter --lib --release loom`
/// (`scripts/loom`): every interleaving of concurrent takes and puts, with real descriptors.
#[cfg(all(test, loom))]
#[allow(clippy::unwrap_used)]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    fn fd() -> Box<LockFd> {
        let f = std::fs::File::open("/dev/null").unwrap();
        Box::new(LockFd {
            fd: f.into(),
            id: crate::sys::FileId { dev: 0, ino: 0 },
        })
    }

    /// Descriptors in the pool: the slot's and the list's.
    fn idle(pool: &FdPool) -> usize {
        let mut n = pool.more.lock().len();
        while let Some(fd) = pool.take_slot() {
            n += 1;
            drop(fd);
        }
        n
    }

    /// Threads taking and giving back descriptors at once: none is lost, none handed to two
    /// takers (each taker owns its descriptor: the count at the end is exact).
    #[test]
    fn takes_and_puts_lose_and_duplicate_nothing() {
        loom::model(|| {
            let pool = Arc::new(FdPool::new(fd()));
            pool.put(fd());
            let ts: Vec<_> = (0..2)
                .map(|_| {
                    let pool = Arc::clone(&pool);
                    loom::thread::spawn(move || {
                        let a = pool.take();
                        let b = pool.take();
                        if let Some(a) = a {
                            pool.put(a);
                        }
                        if let Some(b) = b {
                            pool.put(b);
                        }
                    })
                })
                .collect();
            for t in ts {
                t.join().unwrap();
            }
            assert_eq!(idle(&pool), 2);
        });
    }

    /// A holder gives its descriptor back while another takes one and a third opens a new
    /// one because the pool looked empty: all three end up idle (up to the limit).
    #[test]
    fn a_put_racing_a_take_keeps_every_descriptor() {
        loom::model(|| {
            let pool = Arc::new(FdPool::new(fd()));
            let held = pool.take().unwrap();
            let p = Arc::clone(&pool);
            let t = loom::thread::spawn(move || p.put(held));
            let taken = pool.take();
            let created = if taken.is_some() { 2 } else { 3 };
            pool.put(taken.unwrap_or_else(fd));
            pool.put(fd());
            t.join().unwrap();
            assert_eq!(idle(&pool), created);
        });
    }
}

/// The pool's ownership rules with real descriptors, also under Miri (`scripts/miri`): every
/// descriptor put in comes out once, the list keeps at most `MAX_IDLE - 1`, `retain` closes
/// what it drops, and dropping the pool frees the slot's.
#[cfg(all(test, not(loom)))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn fd(ino: u64) -> Box<LockFd> {
        let f = std::fs::File::open("/dev/null").unwrap();
        Box::new(LockFd {
            fd: f.into(),
            id: crate::sys::FileId { dev: 0, ino },
        })
    }

    #[test]
    fn descriptors_come_out_as_often_as_they_go_in() {
        let pool = FdPool::new(fd(0));
        for i in 1..12 {
            pool.put(fd(i));
        }
        let mut seen = Vec::new();
        while let Some(f) = pool.take() {
            seen.push(f.id.ino);
        }
        // The slot's, and the list's up to its limit: the rest were closed when put.
        assert_eq!(seen.len(), MAX_IDLE, "{seen:?}");
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), MAX_IDLE, "none handed out twice");
        for i in 0..4 {
            pool.put(fd(i % 2));
        }
        pool.retain(|f| f.id.ino == 1);
        let mut left = Vec::new();
        while let Some(f) = pool.take() {
            left.push(f.id.ino);
        }
        assert_eq!(left, [1, 1]);
        pool.put(fd(7));
        drop(pool); // frees the slot's descriptor (Miri reports a leak otherwise)
    }
}
