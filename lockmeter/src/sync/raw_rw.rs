//! The raw lock under [`super::RwLock`]: one word that is the lock and also counts its holds,
//! as [`super::raw::RawMutex`] does for the `Mutex`. A reader takes the lock with one
//! compare-and-swap, a writer with one too; each releases it with one atomic add that
//! also counts the hold. A writer's compare-and-swap starts from a guess at the word, not from
//! a load of it: the thread's own guess if the last lock it held exclusively was this one
//! (kept in a thread-local, off the lock's line), else the one kept beside the word (`hint`:
//! the word as the last release left it). A wrong guess costs one failed compare-and-swap,
//! which returns the word. Nothing else is written inside a critical section but that guess,
//! on the word's own line, so waiters spinning on the word never make the holder miss its
//! cache line twice.
//!
//! The word, from bit 0: `WRITER` (held exclusively), `PARKED` (someone may be parked),
//! `WRITER_WAITING` (a writer is parked, or was woken and is retrying: new readers stay out,
//! so a stream of readers cannot starve writers), `BUSY` (a writer that waited is counting its
//! wait into [`RawRwLock::waited`], right after taking the lock, as the `Mutex`'s holders do);
//! then the number of readers holding it (15 bits), and three counters of 15 bits: completed
//! shared holds, completed exclusive holds, and shared holds that waited (counted by the same
//! compare-and-swap that takes the hold, so the two shared counts are always read together). A
//! counter that reaches half its range is moved into a 64-bit base by the operation that got
//! it there, so the fields never overflow and the counts stay exact.
//!
//! Waiters spin a little, then park in `parking_lot_core`'s parking lot, keyed by the lock's
//! address. A release that finds someone parked wakes one parked writer if there is one,
//! otherwise every parked reader. Writers may take a free lock ahead of a woken waiter
//! (unfair, as std's futex locks are); readers may not while a writer waits.

use std::cell::Cell;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{AtomicU32, AtomicU64};

use parking_lot_core::{FilterOp, ParkToken, UnparkResult, DEFAULT_UNPARK_TOKEN};

use super::raw::{count_waited, wait, Waiter, PARKED};

const WRITER: u64 = 1;
const WRITER_WAITING: u64 = 1 << 2;
const BUSY: u64 = 1 << 3;

const READERS_SHIFT: u32 = 4;
const READER_BITS: u32 = 15;
const ONE_READER: u64 = 1 << READERS_SHIFT;
const READERS_MASK: u64 = ((1 << READER_BITS) - 1) << READERS_SHIFT;
/// Readers beyond this many at once wait for one to leave.
const MAX_READERS: u64 = (1 << READER_BITS) - 1;

const FIELD_BITS: u32 = 15;
const FIELD_MASK: u64 = (1 << FIELD_BITS) - 1;
/// The counters' positions: completed shared holds, completed exclusive holds, shared holds
/// that waited (also the index of each one's base).
const SHARED_DONE: usize = 0;
const EXCL_DONE: usize = 1;
const READ_WAITED: usize = 2;
const FIELD_SHIFT: [u32; 3] = [
    READERS_SHIFT + READER_BITS,
    READERS_SHIFT + READER_BITS + FIELD_BITS,
    READERS_SHIFT + READER_BITS + 2 * FIELD_BITS,
];
const ONE_SHARED_DONE: u64 = 1 << FIELD_SHIFT[SHARED_DONE];
const ONE_EXCL_DONE: u64 = 1 << FIELD_SHIFT[EXCL_DONE];
const ONE_READ_WAITED: u64 = 1 << FIELD_SHIFT[READ_WAITED];
/// What a shared release adds to the word: one completed shared hold, one reader fewer.
const READ_RELEASE: u64 = ONE_SHARED_DONE.wrapping_sub(ONE_READER);
/// A counter that reaches this is moved into its base.
const HALF: u64 = 1 << (FIELD_BITS - 1);

const _: () = assert!(FIELD_SHIFT[READ_WAITED] + FIELD_BITS == 64);

thread_local! {
    /// This thread's guess at the word of the lock it last held exclusively: that lock's
    /// address, and the word its release leaves if nobody else writes it meanwhile. Read and
    /// written without touching the lock's line (see [`RawRwLock::try_write`]).
    static GUESS: Cell<(usize, u64)> = const { Cell::new((0, 0)) };
}

const READER_TOKEN: ParkToken = ParkToken(0);
const WRITER_TOKEN: ParkToken = ParkToken(1);

/// See the [module docs](self). Lives at a fixed address (at the start of the lock's heap
/// block, before the value) so that the metrics collection can read its counts and the parking
/// lot can key on it.
#[derive(Debug, Default)]
#[repr(C)]
pub(crate) struct RawRwLock {
    /// The counters' values moved out of the word.
    base: [AtomicU64; 3],
    /// Moves into `base` in progress, and moves completed: readers of the counts retry while
    /// either says one overlapped their reads.
    moving: AtomicU32,
    moved: AtomicU32,
    /// Puts the word at the start of the next cache line of the lock's (128-aligned) block,
    /// with the state and the value after it: the line the holders hand to each other.
    _line: [u8; 32],
    word: AtomicU64,
    /// Exclusive holds that waited (the current one included); written only by such a holder,
    /// right after it took the lock (on the word's line: the holders hand it over anyway).
    waited: AtomicU64,
    /// A guess at the word, from which [`Self::try_write`] tries its compare-and-swap when
    /// the thread has no guess of its own for this lock: what a release leaves in the word if
    /// nobody else writes it in between (set by a writer when it takes the lock, by a reader
    /// after its release). Never trusted: the compare-and-swap checks it.
    hint: AtomicU64,
}

const _: () = assert!(std::mem::offset_of!(RawRwLock, word) == 64);

/// What the word says, read consistently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RwCounts {
    /// Shared holds begun (completed ones and the current ones).
    pub(crate) shared: u64,
    /// Exclusive holds begun.
    pub(crate) exclusive: u64,
    /// Of those, exclusive holds that had to wait.
    pub(crate) exclusive_waited: u64,
    /// Shared holds that had to wait.
    pub(crate) shared_waited: u64,
    /// Readers holding it now.
    pub(crate) readers: u64,
    /// Whether a writer holds it now.
    pub(crate) writer: bool,
}

#[inline(always)]
fn readers(s: u64) -> u64 {
    (s & READERS_MASK) >> READERS_SHIFT
}

#[inline(always)]
fn field(s: u64, i: usize) -> u64 {
    (s >> FIELD_SHIFT[i]) & FIELD_MASK
}

impl RawRwLock {
    /// Takes a shared hold if no writer holds or waits for the lock.
    #[inline(always)]
    pub(crate) fn try_read(&self) -> bool {
        let mut s = self.word.load(Relaxed);
        loop {
            if s & (WRITER | WRITER_WAITING) != 0 || readers(s) == MAX_READERS {
                return false;
            }
            match self
                .word
                .compare_exchange_weak(s, s + ONE_READER, Acquire, Relaxed)
            {
                Ok(_) => return true,
                Err(now) => s = now,
            }
        }
    }

    /// Blocks until a shared hold is taken (after [`Self::try_read`] failed): spins a little,
    /// then parks until a release wakes it. `before_park` runs before each park. The hold is
    /// counted as one that waited by the compare-and-swap that takes it.
    #[cold]
    #[inline(never)]
    pub(crate) fn read_slow(&self, before_park: impl FnMut()) {
        let old = wait(
            &self.word,
            self.key(),
            Waiter {
                ready: |s| s & (WRITER | WRITER_WAITING) == 0 && readers(s) < MAX_READERS,
                take: |s| s + ONE_READER + ONE_READ_WAITED,
                park_bits: PARKED,
                token: READER_TOKEN,
                blocked: |s| s & (WRITER | WRITER_WAITING) != 0 && s & PARKED != 0,
            },
            before_park,
        );
        if field(old, READ_WAITED) == HALF - 1 {
            self.move_field(READ_WAITED);
        }
    }

    /// Releases a shared hold: one atomic add that counts it and drops the reader.
    #[inline(always)]
    pub(crate) fn unlock_read(&self) {
        let old = self.word.fetch_add(READ_RELEASE, Release);
        // The word as this release left it, for the next writer's try (measured: a reader that
        // stores it before its release, and takes its own hold from it, lost a quarter or more
        // of the throughput of two threads reading at once: the line moves once more per hold).
        self.hint.store(old.wrapping_add(READ_RELEASE), Relaxed);
        if field(old, SHARED_DONE) == HALF - 1 {
            self.move_field(SHARED_DONE);
        }
        // Only a parked waiter needs waking: `WRITER_WAITING` alone is a writer spinning (or
        // woken and retrying), which sees the lock free by itself.
        if readers(old) == 1 && old & PARKED != 0 {
            self.wake();
        }
    }

    /// Takes the lock exclusively if nobody holds it.
    #[inline(always)]
    pub(crate) fn try_write(&self) -> bool {
        // A compare-and-swap from a guess at the word, not from a load of it. Uncontended, a
        // load of the word right after the locked instruction that last wrote it (the previous
        // release, in a loop) waits for that instruction. Contended, a load before the
        // compare-and-swap moves the line twice (to read it, then to own it) where the
        // compare-and-swap alone moves it once; a wrong guess costs one failed
        // compare-and-swap, which returns the word (the line now this core's), and the loop
        // goes on from that. So the guess is this thread's own when it last held this lock
        // (no access to the line at all), else the hint beside the word. See the README for
        // the measurements.
        let mut s = self.guess();
        if s & (WRITER | READERS_MASK) != 0 {
            s = self.word.load(Relaxed);
        }
        while s & (WRITER | READERS_MASK) == 0 {
            match self.word.compare_exchange(s, s | WRITER, Acquire, Relaxed) {
                Ok(_) => {
                    self.predict(s.wrapping_add(ONE_EXCL_DONE));
                    return true;
                }
                Err(now) => s = now,
            }
        }
        false
    }

    /// Where [`Self::try_write`] starts: this thread's guess if the last lock it held
    /// exclusively was this one, else the hint.
    #[inline(always)]
    fn guess(&self) -> u64 {
        match GUESS.try_with(Cell::get) {
            Ok((lock, w)) if lock == self.key() => w,
            _ => self.hint.load(Relaxed),
        }
    }

    /// An exclusive hold was just taken: records `w`, the word its release leaves if nobody
    /// else writes it meanwhile, as this thread's guess and as the hint (stored now, while
    /// the line is this core's, not after the release).
    #[inline(always)]
    fn predict(&self, w: u64) {
        // A thread being torn down has no guess: it tries from the hint.
        let _ = GUESS.try_with(|g| g.set((self.key(), w)));
        self.hint.store(w, Relaxed);
    }

    /// Blocks until the lock is taken exclusively (after [`Self::try_write`] failed), then
    /// counts the hold as one that waited. Released with [`Self::unlock_write`] as any other.
    /// `before_park` runs before each park (a wait that only spun never calls it).
    #[cold]
    #[inline(never)]
    pub(crate) fn write_slow(&self, before_park: impl FnMut()) {
        let old = wait(
            &self.word,
            self.key(),
            Waiter {
                ready: |s| s & (WRITER | READERS_MASK) == 0,
                // Readers are kept out by `WRITER` once it is taken, and a writer still parked
                // is woken by this one's release (which sets `WRITER_WAITING` again then).
                take: |s| (s | WRITER | BUSY) & !WRITER_WAITING,
                park_bits: PARKED | WRITER_WAITING,
                token: WRITER_TOKEN,
                blocked: |s| s & (WRITER | READERS_MASK) != 0 && s & PARKED != 0,
            },
            before_park,
        );
        count_waited(&self.word, &self.waited, BUSY);
        self.predict((old & !WRITER_WAITING).wrapping_add(ONE_EXCL_DONE));
    }

    /// Releases an exclusive hold: one atomic add that counts it and unlocks.
    #[inline(always)]
    pub(crate) fn unlock_write(&self) {
        let old = self
            .word
            .fetch_add(ONE_EXCL_DONE.wrapping_sub(WRITER), Release);
        self.after_write_release(old);
    }

    /// Turns the exclusive hold into a shared one, with no moment where the lock is free: one
    /// atomic add that counts the exclusive hold as completed, clears `WRITER` and adds this
    /// reader (so the shared hold is counted as begun, without a wait). Parked readers are
    /// woken unless a writer waits (then they stay out, as for any reader, and the last
    /// reader's release wakes the writer).
    pub(crate) fn downgrade(&self) {
        let old = self.word.fetch_add(
            ONE_EXCL_DONE.wrapping_sub(WRITER).wrapping_add(ONE_READER),
            Release,
        );
        if field(old, EXCL_DONE) == HALF - 1 {
            self.move_field(EXCL_DONE);
        }
        if old & PARKED != 0 && old & WRITER_WAITING == 0 {
            self.wake_readers();
        }
    }

    #[inline(always)]
    fn after_write_release(&self, old: u64) {
        if field(old, EXCL_DONE) == HALF - 1 {
            self.move_field(EXCL_DONE);
        }
        // As in `unlock_read`: a woken writer that is retrying leaves `WRITER_WAITING` set
        // with nobody parked; waking nobody would search the parking lot twice per release.
        if old & PARKED != 0 {
            self.wake();
        }
    }

    /// Moves `HALF` from counter `i` in the word into `base[i]`; done by the operation that
    /// brought the counter to `HALF` (once per half range).
    ///
    /// Until the word gives up `HALF`, the other `HALF` values of the field are all that stands
    /// between its count and the next field: a mover preempted here while other threads take
    /// 16384 more holds of that kind would carry into it. So the word goes first, right after
    /// `moving` (which readers of the counts need to see before either changes), and the base
    /// after it; readers retry across the whole move as before.
    #[cold]
    #[inline(never)]
    fn move_field(&self, i: usize) {
        self.moving.fetch_add(1, SeqCst);
        self.word.fetch_sub(HALF << FIELD_SHIFT[i], SeqCst);
        self.base[i].fetch_add(HALF, SeqCst);
        self.moved.fetch_add(1, SeqCst);
        self.moving.fetch_sub(1, SeqCst);
    }

    /// Someone is parked and the lock was just freed: wakes one parked writer if there is one
    /// (readers stay out: `WRITER_WAITING` stays set), otherwise every parked reader (and
    /// clears the bits no parked thread needs any more).
    #[cold]
    #[inline(never)]
    fn wake(&self) {
        let mut writer = false;
        // SAFETY: the key is this lock's address (see `raw::wait`); the callbacks run under the
        // parking lot's bucket lock and only touch the word.
        let r = unsafe {
            parking_lot_core::unpark_filter(
                self.key(),
                |t| {
                    if t == WRITER_TOKEN && !writer {
                        writer = true;
                        FilterOp::Unpark
                    } else if writer {
                        FilterOp::Stop
                    } else {
                        FilterOp::Skip
                    }
                },
                |r: UnparkResult| {
                    if r.unparked_threads > 0 {
                        // A writer was woken: readers stay out until it has had its turn.
                        if !r.have_more_threads {
                            self.word.fetch_and(!PARKED, Relaxed);
                        }
                        self.word.fetch_or(WRITER_WAITING, Relaxed);
                    }
                    DEFAULT_UNPARK_TOKEN
                },
            )
        };
        if r.unparked_threads > 0 {
            return;
        }
        // No writer parked: every parked reader goes.
        self.wake_readers();
    }

    /// Wakes every parked reader (and clears the bits no parked thread needs any more).
    #[cold]
    #[inline(never)]
    fn wake_readers(&self) {
        // SAFETY: as in `wake`.
        unsafe {
            parking_lot_core::unpark_filter(
                self.key(),
                |t| {
                    if t == READER_TOKEN {
                        FilterOp::Unpark
                    } else {
                        FilterOp::Skip
                    }
                },
                |r: UnparkResult| {
                    if !r.have_more_threads {
                        self.word.fetch_and(!(PARKED | WRITER_WAITING), Relaxed);
                    }
                    DEFAULT_UNPARK_TOKEN
                },
            );
        }
    }

    fn key(&self) -> usize {
        std::ptr::from_ref(self).addr()
    }

    /// The counts, read consistently: retried while a writer that waited is counting its
    /// wait, or while completed holds move out of the word.
    pub(crate) fn counts(&self) -> RwCounts {
        loop {
            let moved = self.moved.load(SeqCst);
            if self.moving.load(SeqCst) != 0 {
                std::hint::spin_loop();
                continue;
            }
            let w1 = self.waited.load(SeqCst);
            let base = [0, 1, 2].map(|i| self.base[i].load(SeqCst));
            let s = self.word.load(SeqCst);
            let w2 = self.waited.load(SeqCst);
            if w1 != w2
                || s & BUSY != 0
                || self.moving.load(SeqCst) != 0
                || self.moved.load(SeqCst) != moved
            {
                std::hint::spin_loop();
                continue;
            }
            let r = readers(s);
            // Never beside readers: writers and readers both take the lock by a
            // compare-and-swap that finds the other side absent.
            let writer = s & WRITER != 0;
            let count = |i: usize| base[i].wrapping_add(field(s, i));
            return RwCounts {
                shared: count(SHARED_DONE).wrapping_add(r),
                exclusive: count(EXCL_DONE).wrapping_add(u64::from(writer)),
                exclusive_waited: w1,
                shared_waited: count(READ_WAITED),
                readers: r,
                writer,
            };
        }
    }
}

#[cfg(all(test, not(loom)))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn counts_follow_shared_and_exclusive_holds() {
        let l = RawRwLock::default();
        assert!(l.try_read() && l.try_read());
        assert!(!l.try_write());
        let c = l.counts();
        assert_eq!(
            (c.shared, c.readers, c.exclusive, c.writer),
            (2, 2, 0, false)
        );
        l.unlock_read();
        l.unlock_read();
        assert!(l.try_write());
        assert!(!l.try_read() && !l.try_write());
        l.unlock_write();
        l.write_slow(|| {});
        let c = l.counts();
        assert_eq!(
            (
                c.shared,
                c.readers,
                c.exclusive,
                c.exclusive_waited,
                c.writer
            ),
            (2, 0, 2, 1, true)
        );
        l.unlock_write();
        let c = l.counts();
        assert_eq!((c.exclusive, c.exclusive_waited, c.writer), (2, 1, false));
        l.read_slow(|| {});
        let c = l.counts();
        assert_eq!((c.shared, c.shared_waited, c.readers), (3, 1, 1));
        l.unlock_read();
    }

    /// Waits (with a deadline) until a thread is parked on `l` with `bits` set.
    fn until_parked(l: &RawRwLock, bits: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while l.word.load(Relaxed) & bits != bits {
            assert!(std::time::Instant::now() < deadline, "nobody parked");
            std::thread::yield_now();
        }
    }

    /// A downgrade lets a parked reader in at once (the downgrader still reading), keeps
    /// readers out while a writer waits, and counts one exclusive hold and one shared one.
    #[test]
    fn downgrade_wakes_readers_unless_a_writer_waits() {
        let l = Arc::new(RawRwLock::default());
        assert!(l.try_write());
        let reader = std::thread::spawn({
            let l = Arc::clone(&l);
            move || {
                assert!(!l.try_read());
                l.read_slow(|| {});
                l.unlock_read();
            }
        });
        until_parked(&l, PARKED);
        l.downgrade();
        // The reader got in beside this thread's shared hold.
        reader.join().unwrap();
        let c = l.counts();
        assert_eq!(
            (c.exclusive, c.writer, c.shared, c.shared_waited, c.readers),
            (1, false, 2, 1, 1)
        );
        assert!(!l.try_write());
        l.unlock_read();

        assert!(l.try_write());
        let writer = std::thread::spawn({
            let l = Arc::clone(&l);
            move || {
                assert!(!l.try_write());
                l.write_slow(|| {});
                l.unlock_write();
            }
        });
        until_parked(&l, PARKED | WRITER_WAITING);
        l.downgrade();
        assert!(!l.try_read(), "a waiting writer keeps new readers out");
        l.unlock_read();
        writer.join().unwrap();
        let c = l.counts();
        assert_eq!(
            (c.exclusive, c.exclusive_waited, c.shared, c.readers),
            (3, 1, 3, 0)
        );
        assert!(l.try_write());
        l.unlock_write();
    }

    /// `try_write` starts from a guess (the thread's own, else the hint) but never trusts it:
    /// a guess that says free while a reader holds, one that says taken while the lock is
    /// free, and one with other counts all give the right answer, and the counts stay exact.
    #[test]
    fn try_write_checks_its_guesses() {
        let l = RawRwLock::default();
        let mine = |w: u64| GUESS.with(|g| g.set((l.key(), w)));
        let other_lock = |w: u64| GUESS.with(|g| g.set((l.key() + 64, w)));
        for (guess, from) in [(&mine as &dyn Fn(u64), "own"), (&other_lock, "hint")] {
            let set = |w: u64| {
                guess(w);
                l.hint.store(w, Relaxed);
            };
            assert!(l.try_read());
            set(0);
            assert!(
                !l.try_write(),
                "{from}: a reader holds it, whatever the guess"
            );
            l.unlock_read();
            set(WRITER | (ONE_READER * 3));
            assert!(l.try_write(), "{from}: free, whatever the guess");
            assert!(!l.try_write());
            l.unlock_write();
            set(ONE_EXCL_DONE * 7);
            assert!(
                l.try_write(),
                "{from}: free, with other counts in the guess"
            );
            l.unlock_write();
        }
        // The hold taken by the last try predicted what its release left, in both places.
        assert_eq!(l.hint.load(Relaxed), l.word.load(Relaxed));
        assert_eq!(GUESS.with(Cell::get), (l.key(), l.word.load(Relaxed)));
        // Another lock's guess is not this one's: the hint is used, and wrong, and still
        // nothing goes wrong.
        other_lock(0);
        l.hint.store(0, Relaxed);
        assert!(l.try_write());
        l.unlock_write();
        let c = l.counts();
        assert_eq!(
            (c.shared, c.exclusive, c.readers, c.writer),
            (2, 5, 0, false)
        );
        // A hold that waited predicts too.
        l.write_slow(|| {});
        l.unlock_write();
        assert_eq!(GUESS.with(Cell::get), (l.key(), l.word.load(Relaxed)));
    }

    /// Waits until `flag` is set (a thread is about to park), failing after 10 s.
    fn until(flag: &AtomicBool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !flag.load(Relaxed) {
            assert!(std::time::Instant::now() < deadline, "never parked");
            std::thread::yield_now();
        }
    }

    /// A writer that parks behind a reader keeps new readers out and is woken by the last
    /// reader's release; readers parked behind a writer are woken by its release.
    #[test]
    fn parked_waiters_are_woken_and_a_waiting_writer_keeps_readers_out() {
        let l = Arc::new(RawRwLock::default());
        assert!(l.try_read());
        let parked = Arc::new(AtomicBool::new(false));
        let writer = {
            let (l, parked) = (Arc::clone(&l), Arc::clone(&parked));
            std::thread::spawn(move || {
                assert!(!l.try_write(), "a reader holds it");
                l.write_slow(|| parked.store(true, Relaxed));
                l.unlock_write();
            })
        };
        until(&parked);
        assert!(!l.try_read(), "a parked writer keeps new readers out");
        l.unlock_read();
        writer.join().unwrap();

        assert!(l.try_write());
        let parked = Arc::new(AtomicBool::new(false));
        let reader = {
            let (l, parked) = (Arc::clone(&l), Arc::clone(&parked));
            std::thread::spawn(move || {
                l.read_slow(|| parked.store(true, Relaxed));
                l.unlock_read();
            })
        };
        until(&parked);
        l.unlock_write();
        reader.join().unwrap();
        let c = l.counts();
        assert_eq!(
            (c.shared, c.shared_waited, c.exclusive, c.exclusive_waited),
            (2, 1, 2, 1)
        );
        assert_eq!((c.readers, c.writer), (0, false));
    }

    /// Eight threads on however many cores, holds that yield inside so that waiters park:
    /// nobody is lost asleep (the test would hang), writers exclude everyone, every hold is
    /// counted, and a collection reading all the while sees every count only grow.
    /// `LOCKMETER_STRESS_OPS=200000 cargo test --release -p lockmeter --lib parking_stress` runs
    /// it longer (a few seconds) after changing the lock.
    #[test]
    fn parking_stress() {
        struct Shared {
            l: RawRwLock,
            writing: AtomicBool,
            readers: AtomicU64,
        }
        let s = Arc::new(Shared {
            l: RawRwLock::default(),
            writing: AtomicBool::new(false),
            readers: AtomicU64::new(0),
        });
        let per: u64 = std::env::var("LOCKMETER_STRESS_OPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000);
        let parks = Arc::new(AtomicU64::new(0));
        let ts: Vec<_> = (0..8u64)
            .map(|t| {
                let (s, parks) = (Arc::clone(&s), Arc::clone(&parks));
                std::thread::spawn(move || {
                    for i in 0..per {
                        let slow = (i * 7 + t) % 10 == 0;
                        if (i + t) % 4 == 0 {
                            if !s.l.try_write() {
                                s.l.write_slow(|| {
                                    parks.fetch_add(1, Relaxed);
                                });
                            }
                            assert!(!s.writing.swap(true, Relaxed));
                            assert_eq!(s.readers.load(Relaxed), 0);
                            if slow {
                                std::thread::yield_now();
                            }
                            s.writing.store(false, Relaxed);
                            s.l.unlock_write();
                        } else {
                            if !s.l.try_read() {
                                s.l.read_slow(|| {
                                    parks.fetch_add(1, Relaxed);
                                });
                            }
                            s.readers.fetch_add(1, Relaxed);
                            assert!(!s.writing.load(Relaxed));
                            if slow {
                                std::thread::yield_now();
                            }
                            s.readers.fetch_sub(1, Relaxed);
                            s.l.unlock_read();
                        }
                    }
                })
            })
            .collect();
        // A collection's reads, all the while: every count only ever grows.
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let (s, done) = (Arc::clone(&s), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut last = s.l.counts();
                let mut reads = 0u64;
                while !done.load(Relaxed) {
                    let c = s.l.counts();
                    let grew = |a: u64, b: u64| b >= a;
                    assert!(
                        grew(last.shared - last.readers, c.shared - c.readers)
                            && grew(last.shared, c.shared)
                            && grew(last.exclusive, c.exclusive)
                            && grew(last.shared_waited, c.shared_waited)
                            && grew(last.exclusive_waited, c.exclusive_waited),
                        "{last:?} then {c:?}"
                    );
                    last = c;
                    reads += 1;
                }
                reads
            })
        };
        for t in ts {
            t.join().unwrap();
        }
        done.store(true, Relaxed);
        assert!(reader.join().unwrap() > 0);
        let c = s.l.counts();
        assert_eq!(c.shared + c.exclusive, 8 * per);
        assert_eq!((c.readers, c.writer), (0, false));
        assert!(
            parks.load(Relaxed) > 0,
            "nobody parked: not the stress it is meant to be"
        );
    }

    /// More than a field's range of holds: the counts stay exact across the moves into the
    /// bases.
    #[test]
    fn counts_stay_exact_past_the_fields_range() {
        let l = RawRwLock::default();
        let n = (1u64 << FIELD_BITS) * 2 + 7;
        for _ in 0..n {
            assert!(l.try_read());
            l.unlock_read();
            l.read_slow(|| {});
            l.unlock_read();
            assert!(l.try_write());
            l.unlock_write();
        }
        let c = l.counts();
        assert_eq!((c.shared, c.shared_waited, c.exclusive), (2 * n, n, n));
    }

    /// Writers and readers on four threads, some made to wait: writers exclude everyone,
    /// readers exclude writers, and every hold is counted.
    #[test]
    fn threads_exclude_each_other_and_are_counted() {
        struct Shared {
            l: RawRwLock,
            value: std::cell::UnsafeCell<u64>,
            writing: AtomicBool,
        }
        // SAFETY: `value` is written only under an exclusive hold, read under a shared one.
        unsafe impl Sync for Shared {}
        let s = Arc::new(Shared {
            l: RawRwLock::default(),
            value: std::cell::UnsafeCell::new(0),
            writing: AtomicBool::new(false),
        });
        let per = 200_000u64;
        let start = Arc::new(std::sync::Barrier::new(4));
        let waited = Arc::new(AtomicU64::new(0));
        let waited_reads = Arc::new(AtomicU64::new(0));
        let ts: Vec<_> = (0..4)
            .map(|t| {
                let (s, waited, waited_reads, start) = (
                    Arc::clone(&s),
                    Arc::clone(&waited),
                    Arc::clone(&waited_reads),
                    Arc::clone(&start),
                );
                std::thread::spawn(move || {
                    start.wait();
                    for i in 0..per {
                        if (i + t) % 3 == 0 {
                            let w = if s.l.try_write() {
                                false
                            } else {
                                s.l.write_slow(|| {});
                                true
                            };
                            assert!(!s.writing.swap(true, Relaxed));
                            // SAFETY: held exclusively.
                            unsafe { *s.value.get() += 1 };
                            s.writing.store(false, Relaxed);
                            if w {
                                waited.fetch_add(1, Relaxed);
                            }
                            s.l.unlock_write();
                        } else {
                            if !s.l.try_read() {
                                waited_reads.fetch_add(1, Relaxed);
                                s.l.read_slow(|| {});
                            }
                            assert!(!s.writing.load(Relaxed));
                            // SAFETY: held shared.
                            let _ = unsafe { *s.value.get() };
                            s.l.unlock_read();
                        }
                    }
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        let writes: u64 = (0..4u64)
            .map(|t| (0..per).filter(|i| (i + t) % 3 == 0).count() as u64)
            .sum();
        // SAFETY: all threads joined.
        assert_eq!(unsafe { *s.value.get() }, writes);
        let c = s.l.counts();
        assert_eq!(c.exclusive, writes);
        assert_eq!(c.shared, 4 * per - writes);
        assert_eq!(c.exclusive_waited, waited.load(Relaxed));
        assert_eq!(c.shared_waited, waited_reads.load(Relaxed));
        assert_eq!((c.readers, c.writer), (0, false));
    }
}
