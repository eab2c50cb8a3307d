//! The raw lock under [`super::Mutex`]: one word that is the lock and also counts its holds,
//! so an uncontended acquisition costs one `lock bts` and its release one atomic add, and a
//! contended one tells the caller it waited without a second compare-and-swap on the contended
//! line.
//!
//! The word: bit 0 locked, bit 1 someone may be parked, bit 2 a holder that waited is counting
//! its wait into [`RawMutex::waited`] (readers retry), bits 3.. the number of completed holds.
//! A holder that waited counts itself right after the compare-and-swap that took the lock,
//! while the line is still its core's, and releases like any other.
//!
//! Waiters spin a little, then park in `parking_lot_core`'s parking lot (the one `parking_lot`'s
//! locks use), keyed by the lock's address. A release unlocks first and then wakes one parked
//! waiter, which competes for the lock with any thread arriving meanwhile: unfair, as std's
//! futex mutex is (parking_lot's eventual-fairness handoff is not offered).

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use parking_lot_core::{
    ParkToken, SpinWait, UnparkResult, DEFAULT_PARK_TOKEN, DEFAULT_UNPARK_TOKEN,
};

const LOCKED: u64 = 1;
/// Someone may be parked: the same bit in [`super::raw_rw`]'s word.
pub(super) const PARKED: u64 = 2;
const BUSY: u64 = 4;
const ONE: u64 = 8;

/// See the [module docs](self). Lives at a fixed address (at the start of the lock's heap
/// block, before the value) so that the metrics collection can read its counts and the parking
/// lot can key on it.
#[derive(Debug, Default)]
pub(crate) struct RawMutex {
    word: AtomicU64,
    /// Holds that waited (the current one included); written only by such a holder, right
    /// after it took the lock.
    waited: AtomicU64,
}

/// What the word says, read consistently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Holds begun (completed ones and the current one).
    pub(crate) acquisitions: u64,
    /// Of those, holds that had to wait.
    pub(crate) waited: u64,
    /// Whether the lock is held now.
    pub(crate) held: bool,
}

impl RawMutex {
    /// Takes the lock if it is free.
    #[inline(always)]
    pub(crate) fn try_lock(&self) -> bool {
        // Only the locked bit of the old value is looked at, so this is one `lock bts` on
        // x86 (a compare-and-swap loop if the whole old value were used), and nothing else
        // of the word is read: another core's failing try can take the line between the two.
        self.word.fetch_or(LOCKED, Acquire) & LOCKED == 0
    }

    /// Blocks until the lock is taken (after [`Self::try_lock`] failed): spins a little, then
    /// parks until a release wakes it, and tries again; then counts the hold as one that
    /// waited. Released with [`Self::unlock`] as any other. `before_park` runs before each
    /// park (a wait that only spun never calls it).
    #[cold]
    #[inline(never)]
    pub(crate) fn lock_slow(&self, before_park: impl FnMut()) {
        wait(
            &self.word,
            self.key(),
            Waiter {
                ready: |s| s & LOCKED == 0,
                take: |s| s | LOCKED | BUSY,
                park_bits: PARKED,
                token: DEFAULT_PARK_TOKEN,
                blocked: |s| s & (LOCKED | PARKED) == LOCKED | PARKED,
            },
            before_park,
        );
        count_waited(&self.word, &self.waited, BUSY);
    }

    /// Releases the lock: one atomic add that counts the hold and clears the locked bit.
    #[inline(always)]
    pub(crate) fn unlock(&self) {
        let old = self.word.fetch_add(ONE - LOCKED, Release);
        if old & PARKED != 0 {
            self.wake();
        }
    }

    /// Wakes one parked waiter; clears the parked bit if it was the last.
    #[cold]
    #[inline(never)]
    fn wake(&self) {
        // SAFETY: the key is this lock's address (see `wait`); the callback runs under the
        // parking lot's bucket lock and only touches the word.
        unsafe {
            parking_lot_core::unpark_one(self.key(), |r: UnparkResult| {
                if !r.have_more_threads {
                    self.word.fetch_and(!PARKED, Relaxed);
                }
                DEFAULT_UNPARK_TOKEN
            });
        }
    }

    fn key(&self) -> usize {
        std::ptr::from_ref(self).addr()
    }

    /// The counts, read consistently: retried while a holder that waited is counting its
    /// wait.
    pub(crate) fn counts(&self) -> Counts {
        loop {
            let w1 = self.waited.load(Acquire);
            let s = self.word.load(Acquire);
            let w2 = self.waited.load(Acquire);
            if w1 == w2 && s & BUSY == 0 {
                let held = s & LOCKED != 0;
                return Counts {
                    acquisitions: s / ONE + u64::from(held),
                    waited: w1,
                    held,
                };
            }
            std::hint::spin_loop();
        }
    }
}

/// A holder that waited, its hold marked `busy` in `word` by the compare-and-swap that took
/// it, counts the wait in `waited` and clears the mark: right after taking the lock, while the
/// line is most likely still this core's, so that its release is one atomic add as any other.
/// Readers of the counts retry while the mark is set; only holders write `waited`.
#[inline(always)]
pub(super) fn count_waited(word: &AtomicU64, waited: &AtomicU64, busy: u64) {
    // Release: a reader that sees the new count sees the compare-and-swap before it.
    waited.store(waited.load(Relaxed).wrapping_add(1), Release);
    word.fetch_and(!busy, Release);
}

/// How a waiter of one of the raw locks waits (`PARKED`, bit 1, means the same in both).
pub(super) struct Waiter<R, T, B> {
    /// Whether the lock can be taken from this state.
    pub(super) ready: R,
    /// The state after taking it.
    pub(super) take: T,
    /// Set before parking (with `PARKED`, whatever else tells releasers who waits).
    pub(super) park_bits: u64,
    /// Who parks (releasers may choose whom to wake by it).
    pub(super) token: ParkToken,
    /// Whether, in this state, sleeping is still right (checked under the parking lot's lock).
    pub(super) blocked: B,
}

/// The wait both raw locks share: spin a little (with back-off, then yields) while nobody is
/// parked, then mark the word and park until a release wakes it, and try again. Returns the
/// state the taking compare-and-swap replaced. `before_park` runs before each park (a wait
/// that only spun never calls it).
#[inline(always)]
pub(super) fn wait<R, T, B>(
    word: &AtomicU64,
    key: usize,
    w: Waiter<R, T, B>,
    mut before_park: impl FnMut(),
) -> u64
where
    R: Fn(u64) -> bool,
    T: Fn(u64) -> u64,
    B: Fn(u64) -> bool,
{
    let mut spin = SpinWait::new();
    let mut s = word.load(Relaxed);
    loop {
        if (w.ready)(s) {
            match word.compare_exchange_weak(s, (w.take)(s), Acquire, Relaxed) {
                Ok(old) => return old,
                Err(now) => s = now,
            }
            continue;
        }
        if s & PARKED == 0 && spin.spin() {
            s = word.load(Relaxed);
            continue;
        }
        if s & w.park_bits != w.park_bits {
            if let Err(now) = word.compare_exchange_weak(s, s | w.park_bits, Relaxed, Relaxed) {
                s = now;
                continue;
            }
        }
        before_park();
        // SAFETY: the key is the lock's address, which no other parking lot user keys on (the
        // lock lives in its own heap allocation); `validate` and the callbacks neither panic
        // nor call into the parking lot.
        unsafe {
            parking_lot_core::park(
                key,
                || (w.blocked)(word.load(Relaxed)),
                || {},
                |_, _| {},
                w.token,
                None,
            );
        }
        spin.reset();
        s = word.load(Relaxed);
    }
}

#[cfg(all(test, not(loom)))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn counts_follow_holds_and_waits() {
        let m = RawMutex::default();
        assert!(m.try_lock());
        assert!(!m.try_lock());
        let c = m.counts();
        assert_eq!((c.acquisitions, c.waited, c.held), (1, 0, true));
        m.unlock();
        assert!(m.try_lock());
        m.unlock();
        m.lock_slow(|| {});
        assert_eq!(
            m.counts(),
            Counts {
                acquisitions: 3,
                waited: 1,
                held: true
            }
        );
        m.unlock();
        assert_eq!(
            m.counts(),
            Counts {
                acquisitions: 3,
                waited: 1,
                held: false
            }
        );
    }

    /// Four threads, half of them made to wait: mutual exclusion holds, and every hold and
    /// every wait is counted.
    #[test]
    fn threads_exclude_each_other_and_are_counted() {
        struct Shared {
            m: RawMutex,
            value: std::cell::UnsafeCell<u64>,
        }
        // SAFETY: `value` is only touched while holding `m`.
        unsafe impl Sync for Shared {}
        let s = Arc::new(Shared {
            m: RawMutex::default(),
            value: std::cell::UnsafeCell::new(0),
        });
        let waits = Arc::new(AtomicU64::new(0));
        let per = 20_000u64;
        let ts: Vec<_> = (0..4)
            .map(|_| {
                let (s, waits) = (Arc::clone(&s), Arc::clone(&waits));
                std::thread::spawn(move || {
                    for _ in 0..per {
                        let waited = if s.m.try_lock() {
                            false
                        } else {
                            s.m.lock_slow(|| {});
                            true
                        };
                        // SAFETY: held.
                        unsafe { *s.value.get() += 1 };
                        if waited {
                            waits.fetch_add(1, Relaxed);
                        }
                        s.m.unlock();
                    }
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        // SAFETY: all threads joined.
        assert_eq!(unsafe { *s.value.get() }, 4 * per);
        let c = s.m.counts();
        assert_eq!(c.acquisitions, 4 * per);
        assert_eq!(c.waited, waits.load(Relaxed));
        assert!(!c.held);
    }
}
