//! Per-thread counter shards.
//!
//! A thread claims a slot the first time it counts anything (one of [`OWNED`], released when
//! the thread exits) and from then on updates slot `i` of every lock's shards with a plain
//! load and store: it is the only writer there. Threads beyond [`OWNED`] share the last slot
//! and update it with atomic adds. Readers (the SDK's collection, through
//! [`super::series`]) sum the slots.

use std::cell::Cell;
use std::sync::atomic::Ordering::Relaxed;

// Under `--cfg loom` the atomics, the free-slot mask and the thread-locals are loom's, so its
// model tests (below) explore every interleaving of the real code.
#[cfg(loom)]
use loom::sync::atomic::{AtomicU16, AtomicU64};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU16, AtomicU64};

/// Slots owned by one thread each.
pub(crate) const OWNED: usize = 8;
/// All slots: the owned ones and the shared one.
pub(crate) const SHARDS: usize = OWNED + 1;
const SHARED: u8 = OWNED as u8;
const UNCLAIMED: u8 = u8::MAX;

/// One thread's counters of one lock, on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(128))] // two lines: adjacent-line prefetch pairs 64-byte lines on x86
pub(crate) struct Shard(pub(crate) [AtomicU64; 16]);

/// Index of the acquisitions counter of `mode` (0 exclusive, 1 shared), `contended` (0 or 1).
#[inline(always)]
pub(crate) const fn acquisitions(mode: usize, contended: usize) -> usize {
    mode * 2 + contended
}

/// Index of the releases counter of `mode`.
#[inline(always)]
pub(crate) const fn releases(mode: usize) -> usize {
    4 + mode
}

/// Index of the conflicts counter of `mode`.
#[inline(always)]
pub(crate) const fn conflicts(mode: usize) -> usize {
    6 + mode
}

/// Index of the acquire-attempts counter (file locks' timing sample; not exported).
pub(crate) const ATTEMPTS: usize = 8;

/// Free owned slots, one bit each.
#[cfg(not(loom))]
static FREE: AtomicU16 = AtomicU16::new((1 << OWNED) - 1);

#[cfg(not(loom))]
thread_local! {
    static SLOT: Cell<u8> = const { Cell::new(UNCLAIMED) };
    static RELEASE: Release = const { Release };
}

#[cfg(loom)]
loom::lazy_static! {
    static ref FREE: AtomicU16 = AtomicU16::new((1 << OWNED) - 1);
}

#[cfg(loom)]
loom::thread_local! {
    static SLOT: Cell<u8> = Cell::new(UNCLAIMED);
    static RELEASE: Release = Release;
}

/// Gives the slot back when the thread exits.
struct Release;

// loom runs thread-local destructors only when a model's execution ends (and cannot reach a
// thread-local from one): its tests call `release_slot` where a thread would exit.
#[cfg(not(loom))]
impl Drop for Release {
    fn drop(&mut self) {
        release_slot();
    }
}

/// Gives this thread's slot back: the thread is exiting.
fn release_slot() {
    let _ = SLOT.try_with(|s| {
        let slot = s.replace(SHARED);
        if slot < SHARED {
            // Release: the next owner sees every count this thread made.
            FREE.fetch_or(1 << slot, std::sync::atomic::Ordering::Release);
        }
    });
}

/// This thread's slot, claiming one on first use. Always `< SHARDS` (the `min`s let the
/// compiler drop the bounds checks from the inlined hot paths).
#[inline(always)]
pub(crate) fn slot() -> usize {
    let s = SLOT.try_with(Cell::get).unwrap_or(SHARED);
    if s == UNCLAIMED {
        return claim().min(SHARDS - 1);
    }
    usize::from(s.min(SHARED))
}

/// This thread's slot if it has claimed one, else the shared slot: for releases, whose
/// thread claimed its slot when it acquired (no claim path to inline).
#[inline(always)]
pub(crate) fn current() -> usize {
    usize::from(SLOT.try_with(Cell::get).unwrap_or(SHARED).min(SHARED))
}

#[cold]
#[inline(never)]
fn claim() -> usize {
    use std::sync::atomic::Ordering::{Acquire, Relaxed as R};
    let mut free = FREE.load(R);
    let slot = loop {
        if free == 0 {
            break SHARED;
        }
        let bit = free.trailing_zeros() as u8;
        match FREE.compare_exchange_weak(free, free & !(1 << bit), Acquire, R) {
            Ok(_) => break bit,
            Err(now) => free = now,
        }
    };
    // Register the release first: if the thread is already exiting, count as shared.
    if slot < SHARED && RELEASE.try_with(|_| ()).is_err() {
        FREE.fetch_or(1 << slot, std::sync::atomic::Ordering::Release);
        return usize::from(SHARED);
    }
    let _ = SLOT.try_with(|s| s.set(slot));
    usize::from(slot)
}

/// Adds one to counter `i` of `shard` (this thread's `slot`); returns the previous value.
#[inline(always)]
pub(crate) fn bump(shard: &Shard, slot: usize, i: usize) -> u64 {
    let c = &shard.0[i];
    if slot < OWNED {
        let n = c.load(Relaxed);
        c.store(n.wrapping_add(1), Relaxed);
        n
    } else {
        c.fetch_add(1, Relaxed)
    }
}

#[cfg(all(test, not(loom)))]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn exited_threads_give_their_slot_back() {
        for _ in 0..(3 * super::OWNED) {
            let slot = std::thread::spawn(super::slot).join().unwrap();
            assert!(
                slot < super::OWNED,
                "slot {slot}: not returned by exited threads"
            );
        }
    }
}

/// Model tests: `RUSTFLAGS="--cfg loom" cargo test -p lockmeter --lib --release loom`
/// (`scripts/loom`). loom runs each body under every interleaving of its threads' atomic
/// operations (bounded by `LOOM_MAX_PREEMPTIONS`, 3 in the script).
#[cfg(all(test, loom))]
#[allow(clippy::unwrap_used)]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    /// Two threads count into one lock's shards while a third reads the sum (as the SDK's
    /// collection does): no count is lost, and a reader never sees a counter go back.
    #[test]
    fn counts_from_concurrent_threads_all_arrive() {
        loom::model(|| {
            let shard: Arc<[Shard; SHARDS]> = Arc::new(Default::default());
            let total = |s: &[Shard; SHARDS]| s.iter().map(|x| x.0[0].load(Relaxed)).sum::<u64>();
            let writers: Vec<_> = (0..2)
                .map(|_| {
                    let shard = Arc::clone(&shard);
                    loom::thread::spawn(move || {
                        for _ in 0..2 {
                            let s = slot();
                            bump(&shard[s], s, 0);
                        }
                    })
                })
                .collect();
            let first = total(&shard);
            let second = total(&shard);
            assert!(
                second >= first,
                "a counter went back: {first} then {second}"
            );
            for w in writers {
                w.join().unwrap();
            }
            assert_eq!(total(&shard), 4);
        });
    }

    /// Live threads never own the same slot, also while others exit and give theirs back, and
    /// a slot given back is claimed again.
    #[test]
    fn no_two_live_threads_share_a_slot() {
        loom::model(|| {
            let owners: Arc<[AtomicU16; SHARDS]> = Arc::new(Default::default());
            let run = |owners: Arc<[AtomicU16; SHARDS]>, exits: bool| {
                move || {
                    let s = slot();
                    if s < OWNED {
                        let before = owners[s].fetch_add(1, Relaxed);
                        assert_eq!(before, 0, "slot {s} owned twice");
                        owners[s].fetch_sub(1, Relaxed);
                    }
                    if exits {
                        release_slot();
                    }
                    s
                }
            };
            let a = loom::thread::spawn(run(Arc::clone(&owners), true));
            let b = loom::thread::spawn(run(Arc::clone(&owners), true));
            // Exclusivity is the `owners` check inside `run`: a slot given back may be had
            // again by a thread that claims later, so the slots seen may repeat.
            let _mine = run(Arc::clone(&owners), false)();
            a.join().unwrap();
            b.join().unwrap();
            // The exited threads' slots are free again (this thread keeps its own) ...
            let free = FREE.load(std::sync::atomic::Ordering::Acquire);
            assert_eq!(free.count_ones() as usize, OWNED - 1, "{free:#b}");
            // ... and the lowest free one is what the next thread gets.
            let c = loom::thread::spawn(run(Arc::clone(&owners), true));
            assert_eq!(c.join().unwrap(), free.trailing_zeros() as usize);
        });
    }
}
