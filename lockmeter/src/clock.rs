//! The hot path's clock: raw TSC reads through one process-wide `quanta::Clock`.
//!
//! `raw()` is a bare `rdtsc` where the TSC is invariant (quanta falls back to
//! `CLOCK_MONOTONIC` elsewhere); ticks are scaled to seconds only when a duration is recorded.
//! About 10 ns per read on the reference VM, against ~24 ns for `Instant::now()`.

use std::sync::OnceLock;

/// A raw clock reading. Never zero (a reading of 0 is taken as 1, one tick of error), so
/// `Option<Ticks>` is 8 bytes: guards carry it, and a 16-byte field made the guard copies stall
/// on store forwarding.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ticks(std::num::NonZeroU64);

#[inline]
fn clock() -> &'static quanta::Clock {
    static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();
    CLOCK.get_or_init(quanta::Clock::new)
}

/// Whether quanta's raw reading is the TSC itself, so `now` can read it inline (no call: see
/// the overhead benchmark on returns after system calls). One relaxed load once known.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn raw_is_tsc() -> bool {
    match RAW_IS_TSC.load(std::sync::atomic::Ordering::Relaxed) {
        TSC => true,
        NOT_TSC => false,
        _ => check_raw_is_tsc(),
    }
}

#[cfg(target_arch = "x86_64")]
static RAW_IS_TSC: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(UNKNOWN);
#[cfg(target_arch = "x86_64")]
const UNKNOWN: u8 = 0;
#[cfg(target_arch = "x86_64")]
const TSC: u8 = 1;
#[cfg(target_arch = "x86_64")]
const NOT_TSC: u8 = 2;

#[cfg(target_arch = "x86_64")]
#[cold]
#[inline(never)]
fn check_raw_is_tsc() -> bool {
    let c = clock();
    let is_tsc = (0..3).all(|_| {
        // SAFETY: `rdtsc` has no preconditions on x86_64.
        let before = unsafe { core::arch::x86_64::_rdtsc() };
        let r = c.raw();
        // SAFETY: as above.
        let after = unsafe { core::arch::x86_64::_rdtsc() };
        before <= r && r <= after
    });
    RAW_IS_TSC.store(
        if is_tsc { TSC } else { NOT_TSC },
        std::sync::atomic::Ordering::Relaxed,
    );
    is_tsc
}

impl Ticks {
    /// Reads the clock.
    #[inline(always)]
    pub(crate) fn now() -> Ticks {
        #[cfg(target_arch = "x86_64")]
        let raw = if raw_is_tsc() {
            // SAFETY: `rdtsc` has no preconditions on x86_64.
            unsafe { core::arch::x86_64::_rdtsc() }
        } else {
            clock().raw()
        };
        #[cfg(not(target_arch = "x86_64"))]
        let raw = clock().raw();
        Ticks(std::num::NonZeroU64::new(raw).unwrap_or(std::num::NonZeroU64::MIN))
    }

    /// Seconds from `self` to `later` (0 if the clock went backwards).
    #[inline]
    pub(crate) fn secs_until(self, later: Ticks) -> f64 {
        clock().delta_as_nanos(self.0.get(), later.0.get()) as f64 * 1e-9
    }

    /// The raw reading (never 0), to keep in an atomic.
    #[inline]
    pub(crate) fn raw(self) -> u64 {
        self.0.get()
    }

    /// A reading kept by [`Self::raw`] (0, never a reading, gives the smallest).
    #[inline]
    pub(crate) fn from_raw(raw: u64) -> Ticks {
        Ticks(std::num::NonZeroU64::new(raw).unwrap_or(std::num::NonZeroU64::MIN))
    }

    /// Seconds elapsed since `self`.
    #[inline]
    pub(crate) fn elapsed_secs(self) -> f64 {
        self.secs_until(Ticks::now())
    }
}

const _: () = assert!(std::mem::size_of::<Option<Ticks>>() == 8);

/// The start of a hold, whether its acquisition had to wait, whether the hold is timed, and
/// whether the wait was measured, in one word: bit 63 is the contended flag, bit 62 says *not*
/// timed, bit 61 *not* measured (a raw reading reaches 2^61 only after ~24 years of TSC ticks
/// at 3 GHz, or 73 years of nanoseconds). Guards carry
/// `Option<HoldStart>` instead of a `Ticks` and two `bool`s: the byte store of a `bool` made the
/// guard's copies stall on store forwarding inside the critical section.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HoldStart(std::num::NonZeroU64);

const CONTENDED: u64 = 1 << 63;
const UNTIMED: u64 = 1 << 62;
const UNMEASURED: u64 = 1 << 61;
const FLAGS: u64 = CONTENDED | UNTIMED | UNMEASURED;

impl HoldStart {
    /// A timed hold starting `at`.
    #[inline(always)]
    pub(crate) fn new(at: Ticks, contended: bool) -> HoldStart {
        HoldStart(at.0 | (u64::from(contended) << 63))
    }

    /// A hold acquired after a wait that ended `at`, whose hold is not in the timing sample
    /// (the wait still has work to do at release: the lock profile, a slow-wait event).
    #[inline(always)]
    pub(crate) fn contended_untimed(at: Ticks) -> HoldStart {
        HoldStart(at.0 | CONTENDED | UNTIMED)
    }

    /// A hold acquired after a short wait that was neither timed nor measured (it only spun:
    /// no clock was read), and whose hold is not timed either.
    #[inline(always)]
    pub(crate) fn contended_unmeasured() -> HoldStart {
        HoldStart(std::num::NonZeroU64::MIN | FLAGS)
    }

    /// Whether the wait before this hold was measured (false only for
    /// [`Self::contended_unmeasured`]).
    #[inline]
    pub(crate) fn wait_measured(self) -> bool {
        self.0.get() & UNMEASURED == 0
    }

    /// When the hold started.
    #[inline]
    pub(crate) fn at(self) -> Ticks {
        let raw = self.0.get() & !FLAGS;
        Ticks(std::num::NonZeroU64::new(raw).unwrap_or(std::num::NonZeroU64::MIN))
    }

    /// Whether the acquisition had to wait.
    #[inline]
    pub(crate) fn contended(self) -> bool {
        self.0.get() & CONTENDED != 0
    }

    /// Whether the hold is in the timing sample.
    #[inline]
    pub(crate) fn timed(self) -> bool {
        self.0.get() & UNTIMED == 0
    }
}

const _: () = assert!(std::mem::size_of::<Option<HoldStart>>() == 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_start_keeps_the_reading_and_the_flag() {
        let t = Ticks::now();
        for contended in [false, true] {
            let h = HoldStart::new(t, contended);
            assert_eq!(h.contended(), contended);
            assert!(h.timed());
            assert_eq!(h.at().0, t.0);
        }
        let h = HoldStart::contended_untimed(t);
        assert!(h.contended() && !h.timed() && h.wait_measured());
        assert_eq!(h.at().0, t.0);
        let h = HoldStart::contended_unmeasured();
        assert!(h.contended() && !h.timed() && !h.wait_measured());
    }
}
