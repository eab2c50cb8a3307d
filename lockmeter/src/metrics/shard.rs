//! Per-thread counter shards.
//!
//! A thread claims a slot the first time it counts anything (one of [`OWNED`], released when
//! the thread exits) and from then on updates slot `i` of every lock's shards with a plain
//! load and store: it is the only writer there. Threads beyond [`OWNED`] share the last slot
//! and update it with atomic adds. Readers (the SDK's collection, through
//! [`super::series`]) sum the slots.

use std::cell::Cell;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering::Relaxed};

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
static FREE: AtomicU16 = AtomicU16::new((1 << OWNED) - 1);

thread_local! {
    static SLOT: Cell<u8> = const { Cell::new(UNCLAIMED) };
    static RELEASE: Release = const { Release };
}

/// Gives the slot back when the thread exits.
struct Release;

impl Drop for Release {
    fn drop(&mut self) {
        let _ = SLOT.try_with(|s| {
            let slot = s.replace(SHARED);
            if slot < SHARED {
                // Release: the next owner sees every count this thread made.
                FREE.fetch_or(1 << slot, std::sync::atomic::Ordering::Release);
            }
        });
    }
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

#[cfg(test)]
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
