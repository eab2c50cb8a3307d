//! In-process wrappers and LockMeter: exact counts under contention, sampling, poisoning,
//! leaked guards, cancellation, and Send/Sync bounds identical to the wrapped types'.
#![allow(clippy::unwrap_used)]

use std::cell::Cell;
use std::rc::Rc;
use std::sync::{Arc, TryLockError};

use lockmeter::metrics::Sink;
use lockmeter::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use lockmeter::{LockMeter, LockMode};
use lockmeter_testkit::Recorder;
use static_assertions::{assert_impl_all, assert_not_impl_any};

// Send/Sync exactly as std's.
assert_impl_all!(Mutex<u8>: Send, Sync);
assert_impl_all!(Mutex<Cell<u8>>: Send, Sync);
assert_not_impl_any!(Mutex<Rc<u8>>: Send, Sync);
assert_impl_all!(std::sync::Mutex<Cell<u8>>: Send, Sync);
assert_not_impl_any!(MutexGuard<'static, u8>: Send);
assert_not_impl_any!(std::sync::MutexGuard<'static, u8>: Send);
assert_impl_all!(MutexGuard<'static, u8>: Sync);
assert_not_impl_any!(MutexGuard<'static, Cell<u8>>: Sync);
assert_not_impl_any!(std::sync::MutexGuard<'static, Cell<u8>>: Sync);
assert_impl_all!(RwLock<u8>: Send, Sync);
assert_not_impl_any!(RwLock<Cell<u8>>: Sync);
assert_not_impl_any!(std::sync::RwLock<Cell<u8>>: Sync);
assert_not_impl_any!(RwLockReadGuard<'static, u8>: Send);
assert_not_impl_any!(RwLockWriteGuard<'static, u8>: Send);
#[cfg(feature = "tokio")]
assert_impl_all!(lockmeter::tokio::Mutex<u8>: Send, Sync);
#[cfg(feature = "tokio")]
assert_impl_all!(lockmeter::tokio::MutexGuard<'static, u8>: Send, Sync);
assert_impl_all!(tokio::sync::MutexGuard<'static, u8>: Send, Sync);
#[cfg(feature = "tokio")]
assert_not_impl_any!(lockmeter::tokio::Mutex<Rc<u8>>: Send, Sync);
#[cfg(feature = "tokio")]
assert_impl_all!(lockmeter::tokio::MappedMutexGuard<'static, u8>: Send, Sync);
assert_impl_all!(tokio::sync::MappedMutexGuard<'static, u8>: Send, Sync);
#[cfg(feature = "tokio")]
assert_impl_all!(lockmeter::tokio::RwLockMappedWriteGuard<'static, u8>: Send, Sync);
assert_impl_all!(tokio::sync::RwLockMappedWriteGuard<'static, u8>: Send, Sync);
#[cfg(feature = "tokio")]
assert_not_impl_any!(lockmeter::tokio::MappedMutexGuard<'static, Cell<u8>>: Sync);
assert_not_impl_any!(tokio::sync::MappedMutexGuard<'static, Cell<u8>>: Sync);
// Unwind safety as std's and tokio's (`catch_unwind` around code that takes the lock).
use std::panic::{RefUnwindSafe, UnwindSafe};
assert_impl_all!(Mutex<Cell<u8>>: UnwindSafe, RefUnwindSafe);
assert_impl_all!(std::sync::Mutex<Cell<u8>>: UnwindSafe, RefUnwindSafe);
assert_impl_all!(RwLock<u8>: UnwindSafe, RefUnwindSafe);
#[cfg(feature = "tokio")]
assert_impl_all!(lockmeter::tokio::Mutex<u8>: UnwindSafe);
assert_impl_all!(tokio::sync::Mutex<u8>: UnwindSafe);
#[cfg(feature = "tokio")]
assert_impl_all!(lockmeter::tokio::RwLock<u8>: UnwindSafe);
// The owned guards as tokio's: `Send` and `Sync` for `T: Send + Sync`, neither for `Rc`.
#[cfg(feature = "tokio")]
assert_impl_all!(lockmeter::tokio::OwnedMutexGuard<u8>: Send, Sync);
assert_impl_all!(tokio::sync::OwnedMutexGuard<u8>: Send, Sync);
#[cfg(feature = "tokio")]
assert_not_impl_any!(lockmeter::tokio::OwnedMutexGuard<Rc<u8>>: Send, Sync);
#[cfg(feature = "tokio")]
assert_impl_all!(lockmeter::tokio::OwnedRwLockReadGuard<u8>: Send, Sync);
#[cfg(feature = "tokio")]
assert_impl_all!(lockmeter::tokio::OwnedRwLockWriteGuard<u8>: Send, Sync);
#[cfg(feature = "tokio")]
assert_impl_all!(lockmeter::tokio::OwnedMappedMutexGuard<u8, u16>: Send, Sync);
assert_impl_all!(tokio::sync::OwnedMappedMutexGuard<u8, u16>: Send, Sync);
#[cfg(feature = "tokio")]
assert_impl_all!(lockmeter::tokio::OwnedRwLockMappedWriteGuard<u8, u16>: Send, Sync);
assert_impl_all!(tokio::sync::OwnedRwLockMappedWriteGuard<u8, u16>: Send, Sync);
#[cfg(feature = "tokio")]
assert_not_impl_any!(lockmeter::tokio::OwnedMappedMutexGuard<u8, Rc<u8>>: Send, Sync);
assert_not_impl_any!(tokio::sync::OwnedMappedMutexGuard<u8, Rc<u8>>: Send, Sync);

#[test]
fn eight_threads_hammering_one_mutex_are_counted_exactly() {
    for sample in [1, 16, lockmeter::sync::DEFAULT_SAMPLE_EVERY] {
        let rec = Recorder::new();
        let sink = Sink::new(rec.meter());
        let m = Arc::new(
            Mutex::builder("hammered")
                .sink(sink.clone())
                .sample_every(sample)
                .build(0u64),
        );
        let started = std::time::Instant::now();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let m = Arc::clone(&m);
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        *m.lock().unwrap() += 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*m.lock().unwrap(), 80_000);
        let s = rec.snapshot();
        let acq = s.counter("lock.acquisitions", &[("lock.kind", "mutex")]);
        assert_eq!(acq, 80_001, "sample_every({sample})");
        let contended = s.counter("lock.acquisitions", &[("lock.contended", "true")]);
        assert_eq!(
            s.counter("lock.conflicts", &[]),
            contended,
            "one conflict per contended acquire"
        );
        assert_eq!(s.updown("lock.held", &[]), 0);
        let holds = s.hist_count("lock.duration", &[]);
        let contended_holds = s.hist_count("lock.duration", &[("lock.contended", "true")]);
        let waits = s.hist_count("lock.wait.duration", &[("lock.outcome", "acquired")]);
        if sample == 1 {
            assert_eq!(holds, 80_001);
            assert_eq!(contended_holds, contended);
            assert_eq!(waits, 80_001);
        } else {
            // Each acquisition is timed with probability 1 / `sample` (a draw from the
            // thread's generator), plus the first after each collection: the uncontended timed
            // holds are binomial, within six standard deviations of their mean (a false
            // failure about once in 10^9 runs), plus up to two per collection.
            let n = (80_001 - contended) as f64;
            let p = 1.0 / f64::from(sample);
            let (mean, sd) = (n * p, (n * p * (1.0 - p)).sqrt());
            let ticks = started.elapsed().as_millis() as f64 / 100.0 + 1.0;
            let timed = (holds - contended_holds) as f64;
            assert!(
                timed >= mean - 6.0 * sd && timed <= mean + 6.0 * sd + 2.0 * ticks,
                "{timed} timed of {n} uncontended at 1 in {sample}, {ticks} ticks"
            );
            assert!(
                contended_holds <= contended,
                "{contended_holds} of {contended}"
            );
            assert_eq!(waits, holds);
        }
    }
}

#[test]
fn rwlock_counts_shared_and_exclusive() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let l = Arc::new(
        RwLock::builder("table")
            .sink(sink.clone())
            .sample_every(1)
            .build(0u32),
    );
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let l = Arc::clone(&l);
            std::thread::spawn(move || {
                for _ in 0..2_000 {
                    let _ = *l.read().unwrap();
                }
            })
        })
        .collect();
    for _ in 0..1_000 {
        *l.write().unwrap() += 1;
    }
    for r in readers {
        r.join().unwrap();
    }
    let r = l.try_read().unwrap();
    assert!(matches!(l.try_write(), Err(TryLockError::WouldBlock)));
    drop(r);
    let s = rec.snapshot();
    assert_eq!(
        s.counter("lock.acquisitions", &[("lock.mode", "shared")]),
        8_001
    );
    assert_eq!(
        s.counter("lock.acquisitions", &[("lock.mode", "exclusive")]),
        1_000
    );
    assert_eq!(
        s.hist_count("lock.wait.duration", &[("lock.outcome", "would_block")]),
        1
    );
    assert_eq!(s.updown("lock.held", &[]), 0);
    assert_eq!(
        s.hist_count("lock.duration", &[("lock.kind", "rwlock")]),
        9_001
    );
}

#[test]
fn a_panicking_holder_poisons_like_std_and_its_release_is_counted() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let m = Arc::new(Mutex::builder("fragile").sink(sink.clone()).build(1));
    let m2 = Arc::clone(&m);
    let r = std::thread::spawn(move || {
        let _g = m2.lock().unwrap();
        panic!("boom while holding");
    })
    .join();
    assert!(r.is_err());
    assert!(m.is_poisoned());
    let g = m.lock();
    assert!(g.is_err(), "poisoned like std");
    assert_eq!(*g.unwrap_err().into_inner(), 1);
    assert!(matches!(m.try_lock(), Err(TryLockError::Poisoned(_))));
    m.clear_poison();
    assert!(m.lock().is_ok());
    let s = rec.snapshot();
    assert_eq!(s.counter("lock.acquisitions", &[]), 4);
    assert_eq!(
        s.updown("lock.held", &[]),
        0,
        "the panicking holder's release was counted"
    );
}

/// The wrappers keep their own poison flag (their lock is parking_lot's): each rule of std's
/// poisoning, side by side with std's own lock doing the same.
#[test]
fn rwlock_downgrade_lets_waiting_readers_in_keeps_writers_out_and_is_counted() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let l = Arc::new(
        RwLock::builder("downgrade")
            .sink(sink)
            .sample_every(1)
            .build(0u64),
    );
    let of = |mode: &'static str| [("lock.name", "downgrade"), ("lock.mode", mode)];
    let mut w = l.write().unwrap();
    *w = 1;
    let reader = std::thread::spawn({
        let l = Arc::clone(&l);
        move || *l.read().unwrap()
    });
    rec.wait_for("the reader to wait behind the writer", |s| {
        s.counter("lock.conflicts", &of("shared")) == 1
    });
    let r = RwLockWriteGuard::downgrade(w);
    // The reader gets in beside the downgraded hold, and sees the write.
    assert_eq!(reader.join().unwrap(), 1);
    assert_eq!(*r, 1);
    assert!(matches!(l.try_write(), Err(TryLockError::WouldBlock)));
    let s = rec.snapshot();
    assert_eq!(s.updown("lock.held", &of("shared")), 1);
    assert_eq!(s.updown("lock.held", &of("exclusive")), 0);
    drop(r);
    let s = rec.snapshot();
    assert_eq!(s.counter("lock.acquisitions", &of("exclusive")), 1);
    // The downgrade's shared hold (uncontended) and the reader's (contended).
    assert_eq!(s.counter("lock.acquisitions", &of("shared")), 2);
    assert_eq!(
        s.counter(
            "lock.acquisitions",
            &[
                ("lock.name", "downgrade"),
                ("lock.mode", "shared"),
                ("lock.contended", "true")
            ]
        ),
        1
    );
    assert_eq!(s.hist_count("lock.duration", &of("exclusive")), 1);
    assert_eq!(s.hist_count("lock.duration", &of("shared")), 2);
    assert_eq!(s.counter("lock.conflicts", &of("exclusive")), 1);
    assert_eq!(s.updown("lock.held", &[("lock.name", "downgrade")]), 0);
    assert!(l.try_write().is_ok());
}

/// A thread keeps its timed holds and records several at once (a record right after each
/// release costs a contended loop a handoff), so every way a kept hold can be left behind must
/// still reach the histograms: the next collection records what threads kept, including a
/// thread that has exited, and a dropped lock records its own.
#[test]
fn kept_timed_holds_reach_the_histograms_at_collection_thread_exit_and_drop() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let a = Arc::new(
        Mutex::builder("kept-a")
            .sink(sink.clone())
            .sample_every(1)
            .build(0u32),
    );
    let b = RwLock::builder("kept-b")
        .sink(sink)
        .sample_every(1)
        .build(0u32);
    std::thread::spawn({
        let a = Arc::clone(&a);
        move || {
            for _ in 0..3 {
                *a.lock().unwrap() += 1;
            }
        }
    })
    .join()
    .unwrap();
    for _ in 0..2 {
        *b.write().unwrap() += 1;
    }
    drop(b.read().unwrap());
    drop(b);
    // More than a thread records at once, and a rest.
    for _ in 0..21 {
        *a.lock().unwrap() += 1;
    }
    let s = rec.snapshot();
    let of = |name: &'static str| [("lock.name", name)];
    assert_eq!(s.hist_count("lock.duration", &of("kept-a")), 24);
    assert_eq!(s.hist_count("lock.wait.duration", &of("kept-a")), 24);
    assert_eq!(s.hist_count("lock.duration", &of("kept-b")), 3);
    assert_eq!(
        s.hist_count(
            "lock.duration",
            &[("lock.name", "kept-b"), ("lock.mode", "shared")]
        ),
        1
    );
    // Recorded once: a second collection adds nothing.
    let s = rec.snapshot();
    assert_eq!(s.hist_count("lock.duration", &of("kept-a")), 24);
}

#[test]
fn rwlock_poisoning_follows_std_rule_by_rule() {
    fn panic_holding<F: FnOnce() + Send + 'static>(f: F) {
        assert!(std::thread::spawn(f).join().is_err());
    }
    // A reader that panics does not poison; a writer does.
    let ours = Arc::new(RwLock::named("poison-rw", 1));
    let std_ = Arc::new(std::sync::RwLock::new(1));
    let (o, s) = (Arc::clone(&ours), Arc::clone(&std_));
    panic_holding(move || {
        let _r = o.read().unwrap();
        let _s = s.read().unwrap();
        panic!("boom while reading");
    });
    assert_eq!(ours.is_poisoned(), std_.is_poisoned());
    assert!(!ours.is_poisoned());
    let (o, s) = (Arc::clone(&ours), Arc::clone(&std_));
    panic_holding(move || {
        let _w = o.write().unwrap();
        panic!("boom while writing");
    });
    panic_holding(move || {
        let _w = s.write().unwrap();
        panic!("boom while writing");
    });
    assert!(ours.is_poisoned() && std_.is_poisoned());
    // Every acquire reports it, with the guard inside; readers too.
    assert!(ours.read().is_err() && std_.read().is_err());
    assert!(ours.write().is_err() && std_.write().is_err());
    assert!(matches!(ours.try_read(), Err(TryLockError::Poisoned(_))));
    assert!(matches!(ours.try_write(), Err(TryLockError::Poisoned(_))));
    *ours.write().unwrap_err().into_inner() += 1;
    ours.clear_poison();
    assert_eq!(*ours.read().unwrap(), 2);

    // A guard taken while the thread is already panicking does not poison (std's rule).
    let m = Arc::new(Mutex::named("poison-unwinding", 0));
    struct LockOnDrop(Arc<Mutex<i32>>);
    impl Drop for LockOnDrop {
        fn drop(&mut self) {
            *self.0.lock().unwrap() += 1;
        }
    }
    let m2 = Arc::clone(&m);
    panic_holding(move || {
        let _d = LockOnDrop(m2);
        panic!("boom, then lock while unwinding");
    });
    assert!(!m.is_poisoned(), "locked and released during unwinding");
    assert_eq!(*m.lock().unwrap(), 1);

    // Unlocked access reports poisoning like std's.
    let mut m = Mutex::named("poison-owned", 5);
    assert!(m.get_mut().is_ok());
    let m = Arc::new(m);
    let m2 = Arc::clone(&m);
    panic_holding(move || {
        let _g = m2.lock().unwrap();
        panic!("boom");
    });
    let mut m = Arc::into_inner(m).unwrap();
    assert_eq!(*m.get_mut().unwrap_err().into_inner(), 5);
    assert_eq!(m.into_inner().unwrap_err().into_inner(), 5);
}

#[test]
fn a_leaked_guard_keeps_the_lock_held_and_says_so() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let m = Mutex::builder("leaky").sink(sink.clone()).build(());
    std::mem::forget(m.lock().unwrap());
    // As with std, the mutex stays locked: lock.held reports exactly that.
    assert!(matches!(m.try_lock(), Err(TryLockError::WouldBlock)));
    let s = rec.snapshot();
    assert_eq!(s.updown("lock.held", &[]), 1);
    assert_eq!(s.counter("lock.conflicts", &[]), 1);
    assert_eq!(
        s.hist_count("lock.wait.duration", &[("lock.outcome", "would_block")]),
        1
    );
}

/// A multi-thread runtime on 2 workers (the machine's cores), timers on.
#[cfg(feature = "tokio")]
fn two_workers() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
#[cfg(feature = "tokio")]
fn tokio_mutex_counts_contention_and_cancellation() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let rt = two_workers();
    let m = Arc::new(
        lockmeter::tokio::Mutex::builder("sessions")
            .sink(sink.clone())
            .sample_every(1)
            .build(0u64),
    );
    rt.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let m = Arc::clone(&m);
                tokio::spawn(async move {
                    for _ in 0..500 {
                        let mut g = m.lock().await;
                        *g += 1;
                        tokio::task::yield_now().await; // hold across an await point
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*m.lock().await, 4_000);
        // A waiter that gives up.
        let held = m.lock().await;
        let r = tokio::time::timeout(std::time::Duration::from_millis(20), m.lock()).await;
        assert!(r.is_err());
        assert!(m.try_lock().is_err());
        drop(held);
    });
    let s = rec.snapshot();
    assert_eq!(
        s.counter("lock.acquisitions", &[("lock.kind", "tokio_mutex")]),
        4_002
    );
    assert_eq!(
        s.hist_count("lock.wait.duration", &[("lock.outcome", "cancelled")]),
        1
    );
    assert_eq!(
        s.hist_count("lock.wait.duration", &[("lock.outcome", "would_block")]),
        1
    );
    let contended = s.counter("lock.acquisitions", &[("lock.contended", "true")]);
    assert!(contended > 0, "8 tasks yielding while holding must contend");
    assert_eq!(s.counter("lock.conflicts", &[]), contended + 2);
    assert_eq!(s.updown("lock.held", &[]), 0);
}

/// `new`, `Default` and `From` make a drop-in swap compile as it is: each lock is named after
/// the place in the source that creates it.
#[test]
fn locks_made_with_new_are_named_after_where_they_are_made() {
    fn name_of(debug: String) -> String {
        let at = debug.find("name: \"").unwrap() + "name: \"".len();
        debug[at..].split('"').next().unwrap().to_owned()
    }
    let here = |line: u32| format!("{}:{line}", file!());
    let (m, line) = (Mutex::new(1u8), line!());
    assert_eq!(name_of(format!("{m:?}")), here(line));
    let (rw, line) = (RwLock::new(1u8), line!());
    assert_eq!(name_of(format!("{rw:?}")), here(line));
    let (d, line) = (Mutex::<Vec<u8>>::default(), line!());
    assert_eq!(name_of(format!("{d:?}")), here(line));
    let (f, line) = (RwLock::from(7u8), line!());
    assert_eq!(name_of(format!("{f:?}")), here(line));
    assert_eq!(*f.read().unwrap(), 7);
    // A derived `Default` makes its lock fields at the derive's line.
    #[derive(Default)]
    struct Stats {
        hits: Mutex<u64>,
    }
    let line = line!() - 4;
    assert_eq!(name_of(format!("{:?}", Stats::default().hits)), here(line));
    // Made where the standard library calls `default()`: named after the value's type.
    let shared: Arc<Mutex<std::collections::HashMap<String, u64>>> = Arc::default();
    assert_eq!(name_of(format!("{shared:?}")), "HashMap<String, u64>");
    #[cfg(feature = "tokio")]
    {
        let (t, line) = (lockmeter::tokio::Mutex::new(1u8), line!());
        assert_eq!(name_of(format!("{t:?}")), here(line));
        let (t, line) = (lockmeter::tokio::RwLock::<u8>::default(), line!());
        assert_eq!(name_of(format!("{t:?}")), here(line));
    }
}

/// Guards print their value, with `{}` as with `{:?}`, as std's and tokio's do.
#[test]
fn guards_print_their_value_as_std_and_tokio_do() {
    let m = Mutex::named("printed", 7u32);
    let g = m.lock().unwrap();
    assert_eq!(format!("{g} {g:?}"), "7 7");
    drop(g);
    let rw = RwLock::named("printed-rw", "x");
    assert_eq!(format!("{}", rw.read().unwrap()), "x");
    assert_eq!(format!("{}", rw.write().unwrap()), "x");
    #[cfg(feature = "tokio")]
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let m = Arc::new(lockmeter::tokio::Mutex::named("printed-t", 8u32));
            let g = m.lock().await;
            assert_eq!(format!("{g} {g:?}"), "8 8");
            drop(g);
            assert_eq!(format!("{}", Arc::clone(&m).lock_owned().await), "8");
            let rw = Arc::new(lockmeter::tokio::RwLock::named("printed-trw", 9u32));
            assert_eq!(format!("{}", rw.read().await), "9");
            assert_eq!(format!("{:?}", rw.write().await), "9");
            assert_eq!(format!("{}", Arc::clone(&rw).read_owned().await), "9");
            assert_eq!(format!("{}", Arc::clone(&rw).write_owned().await), "9");
        });
    }
}

/// `lock_owned`, `read_owned`, `write_owned` and their `try_` forms: guards that move into
/// other tasks, counted and timed as the borrowed ones, and a cancelled owned acquire.
/// Polls `f` once: whether it is still pending (an acquire that now waits in the queue).
#[cfg(feature = "tokio")]
async fn first_poll_waits<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> bool {
    let mut f = f;
    std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx).is_pending())).await
}

#[test]
#[cfg(feature = "tokio")]
fn tokio_owned_guards_move_between_tasks_and_are_counted() {
    use lockmeter::tokio::{
        OwnedMappedMutexGuard, OwnedMutexGuard, OwnedRwLockMappedWriteGuard, OwnedRwLockReadGuard,
        OwnedRwLockWriteGuard,
    };
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let rt = two_workers();
    let m = Arc::new(
        lockmeter::tokio::Mutex::builder("owned")
            .sink(sink.clone())
            .sample_every(1)
            .build(0u64),
    );
    let rw = Arc::new(
        lockmeter::tokio::RwLock::builder("owned-rw")
            .sink(sink.clone())
            .sample_every(1)
            .build(0u64),
    );
    rt.block_on(async {
        // Taken here, released in another task.
        let g = Arc::clone(&m).lock_owned().await;
        assert!(Arc::ptr_eq(
            lockmeter::tokio::OwnedMutexGuard::mutex(&g),
            &m
        ));
        assert!(Arc::clone(&m).try_lock_owned().is_err());
        let r = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            Arc::clone(&m).lock_owned(),
        )
        .await;
        assert!(r.is_err(), "the owned acquire waits, and is cancelled");
        let mut waiter = std::pin::pin!(Arc::clone(&m).lock_owned());
        assert!(first_poll_waits(waiter.as_mut()).await);
        tokio::spawn(async move {
            let mut g = g;
            *g += 1;
        })
        .await
        .unwrap();
        let mut g = waiter.await;
        *g += 1;
        drop(g);
        assert_eq!(*Arc::clone(&m).try_lock_owned().unwrap(), 2);
        assert_eq!(
            Arc::strong_count(&m),
            1,
            "every owned guard gave its Arc back"
        );

        // Owned guards map as tokio's, keeping the lock and the Arc; a failed try_map gives
        // the guard back; the mapped guard moves into another task.
        let g = OwnedMutexGuard::map(Arc::clone(&m).lock_owned().await, |v| v);
        let mut g = OwnedMappedMutexGuard::try_map(g, |_| None::<&mut u64>).unwrap_err();
        *g += 1;
        assert!(Arc::ptr_eq(OwnedMappedMutexGuard::mutex(&g), &m));
        assert!(m.try_lock().is_err(), "a mapped owned guard keeps the lock");
        tokio::spawn(async move { drop(g) }).await.unwrap();
        assert_eq!(*m.try_lock().unwrap(), 3);
        assert_eq!(Arc::strong_count(&m), 1);

        let r1 = Arc::clone(&rw).read_owned().await;
        let r2 = Arc::clone(&rw).try_read_owned().unwrap();
        assert!(rw.try_write().is_err());
        assert!(Arc::clone(&rw).try_write_owned().is_err());
        let mut writer = std::pin::pin!(Arc::clone(&rw).write_owned());
        assert!(first_poll_waits(writer.as_mut()).await);
        tokio::spawn(async move { drop((r1, r2)) }).await.unwrap();
        let mut w = writer.await;
        *w += 1;
        assert!(rw.try_read().is_err());
        drop(w);
        assert_eq!(*rw.try_read().unwrap(), 1);

        // An owned write guard downgrades to an owned read guard, keeping the Arc.
        let r = Arc::clone(&rw).write_owned().await.downgrade();
        assert_eq!(*rw.try_read().unwrap(), 1);
        assert!(rw.try_write().is_err(), "a downgraded guard is a reader");
        assert!(Arc::ptr_eq(
            lockmeter::tokio::OwnedRwLockReadGuard::rwlock(&r),
            &rw
        ));
        drop(r);
        assert_eq!(
            Arc::strong_count(&rw),
            1,
            "the downgraded guard gave its Arc back"
        );

        let w = OwnedRwLockWriteGuard::map(Arc::clone(&rw).write_owned().await, |v| v);
        let mut w = OwnedRwLockMappedWriteGuard::map(w, |v| v);
        *w += 1;
        drop(w);
        let r = OwnedRwLockWriteGuard::downgrade_map(Arc::clone(&rw).write_owned().await, |v| v);
        let r: OwnedRwLockReadGuard<u64, u64> = OwnedRwLockReadGuard::map(r, |v| v);
        assert_eq!(*r, 2);
        assert!(
            rw.try_write().is_err(),
            "a downgraded owned guard is a reader"
        );
        drop(r);
        let w = Arc::clone(&rw).try_write_owned().unwrap();
        let w = OwnedRwLockWriteGuard::try_downgrade_map(w, |_| None::<&u64>).unwrap_err();
        drop(OwnedRwLockWriteGuard::into_mapped(w));
        assert_eq!(Arc::strong_count(&rw), 1);
    });
    drop(rt);
    let s = rec.snapshot();
    let of = |name: &'static str| [("lock.name", name)];
    // lock_owned, try_lock_owned (would block), timed out, the waiter, try_lock_owned, the
    // mapped lock_owned, try_lock (would block), try_lock.
    assert_eq!(s.counter("lock.acquisitions", &of("owned")), 5);
    assert_eq!(s.counter("lock.conflicts", &of("owned")), 4);
    assert_eq!(
        s.hist_count(
            "lock.wait.duration",
            &[("lock.name", "owned"), ("lock.outcome", "cancelled")]
        ),
        1
    );
    assert_eq!(
        s.hist_count(
            "lock.wait.duration",
            &[("lock.name", "owned"), ("lock.outcome", "would_block")]
        ),
        2
    );
    assert_eq!(s.hist_count("lock.duration", &of("owned")), 5);
    // read_owned, try_read_owned, write_owned, try_read, write_owned, its downgrade, try_read,
    // the mapped write_owned, write_owned and its downgrade_map, try_write_owned; two failed
    // tries of a write, one failed try of a read, the writer's wait, and the two tries of a
    // write beside the downgraded guards.
    assert_eq!(s.counter("lock.acquisitions", &of("owned-rw")), 11);
    assert_eq!(
        s.counter(
            "lock.acquisitions",
            &[("lock.name", "owned-rw"), ("lock.mode", "shared")]
        ),
        6
    );
    assert_eq!(s.counter("lock.conflicts", &of("owned-rw")), 6);
    assert_eq!(s.updown("lock.held", &of("owned")), 0);
    assert_eq!(s.updown("lock.held", &of("owned-rw")), 0);
}

#[test]
#[cfg(feature = "tokio")]
fn tokio_guards_map_downgrade_and_block_as_tokios_do() {
    use lockmeter::tokio::{
        MappedMutexGuard, MutexGuard as TMutexGuard, RwLockMappedWriteGuard,
        RwLockReadGuard as TReadGuard, RwLockWriteGuard as TWriteGuard,
    };
    use std::panic::{catch_unwind, AssertUnwindSafe};

    #[derive(Debug)]
    struct Pair {
        a: u64,
        b: Option<u64>,
    }
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let m = Arc::new(
        lockmeter::tokio::Mutex::builder("mapped")
            .sink(sink.clone())
            .sample_every(1)
            .build(Pair { a: 0, b: None }),
    );
    let rw = lockmeter::tokio::RwLock::builder("downgraded")
        .sink(sink.clone())
        .sample_every(1)
        .build(Pair { a: 0, b: Some(1) });
    let of = |name: &'static str| [("lock.name", name)];
    let in_mode =
        |name: &'static str, mode: &'static str| [("lock.name", name), ("lock.mode", mode)];

    // A mapped guard keeps the lock; a failed try_map gives the guard back, still held.
    let mut a = TMutexGuard::map(m.blocking_lock(), |p| &mut p.a);
    *a += 1;
    assert!(m.try_lock().is_err(), "a mapped guard keeps the lock");
    let a = MappedMutexGuard::try_map(a, |_| None::<&mut u64>).unwrap_err();
    assert!(
        m.try_lock().is_err(),
        "try_map's Err is the guard, still held"
    );
    let mut a = MappedMutexGuard::map(a, |a| a);
    *a += 1;
    drop(a);
    assert_eq!(m.try_lock().unwrap().a, 2);

    // blocking_lock from a plain thread waits for the holder, counted as contended.
    let g = m.blocking_lock();
    let waiter = std::thread::spawn({
        let m = Arc::clone(&m);
        move || m.blocking_lock_owned().a += 1
    });
    rec.wait_for("the blocking waiter to count its conflict", |s| {
        s.counter("lock.conflicts", &of("mapped")) == 3
    });
    drop(g);
    waiter.join().unwrap();

    // A panic in the mapping closure releases the lock, and the release is counted.
    let r = catch_unwind(AssertUnwindSafe(|| {
        TMutexGuard::map(m.blocking_lock(), |_| -> &mut u64 {
            panic!("mapping failed")
        })
    }));
    assert!(r.is_err());
    assert_eq!(m.try_lock().unwrap().a, 3);

    // In an async context blocking_* panic as tokio's do, free lock or not, counting nothing.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let msg = rt.block_on(async {
        let e = catch_unwind(AssertUnwindSafe(|| drop(m.blocking_lock()))).unwrap_err();
        assert!(catch_unwind(AssertUnwindSafe(|| drop(rw.blocking_read()))).is_err());
        assert!(catch_unwind(AssertUnwindSafe(|| drop(rw.blocking_write()))).is_err());
        *e.downcast::<String>().unwrap()
    });
    assert!(msg.contains("Cannot block the current thread"), "{msg}");

    // Downgrade: the exclusive hold ends and a shared one begins, without a writer between.
    let r = TWriteGuard::downgrade(rw.blocking_write());
    drop(rw.try_read().unwrap());
    assert!(rw.try_write().is_err(), "a downgraded guard is a reader");
    let s = rec.snapshot();
    assert_eq!(s.updown("lock.held", &in_mode("downgraded", "shared")), 1);
    assert_eq!(
        s.updown("lock.held", &in_mode("downgraded", "exclusive")),
        0
    );
    drop(r);
    let r = TWriteGuard::try_downgrade_map(rw.blocking_write(), |p| p.b.as_ref()).unwrap();
    assert_eq!(*r, 1);
    drop(r);
    // A failed try_downgrade_map keeps the write guard, still exclusive.
    let w = TWriteGuard::try_downgrade_map(rw.try_write().unwrap(), |_| None::<&u64>).unwrap_err();
    assert!(rw.try_read().is_err(), "still exclusive");
    let mut w = RwLockMappedWriteGuard::map(TWriteGuard::map(w, |p| &mut p.a), |a| a);
    *w = 7;
    drop(w);
    let r = TReadGuard::map(rw.blocking_read(), |p| &p.a);
    let r = TReadGuard::try_map(r, |_| None::<&u64>).unwrap_err();
    assert_eq!(*r, 7);
    drop(r);
    assert_eq!(
        *TWriteGuard::downgrade_map(rw.blocking_write(), |p| &p.a),
        7
    );
    let r = catch_unwind(AssertUnwindSafe(|| {
        TWriteGuard::downgrade_map(rw.blocking_write(), |_| -> &u64 {
            panic!("mapping failed")
        })
    }));
    assert!(r.is_err());
    drop(rw.try_write().unwrap());

    let s = rec.snapshot();
    // blocking_lock, the map's try, try_lock, blocking_lock, its waiter (contended), the
    // panicking map's lock, try_lock; the panics in the runtime count nothing.
    assert_eq!(s.counter("lock.acquisitions", &of("mapped")), 6);
    assert_eq!(
        s.counter(
            "lock.acquisitions",
            &[("lock.name", "mapped"), ("lock.contended", "true")]
        ),
        1
    );
    assert_eq!(s.counter("lock.conflicts", &of("mapped")), 3);
    assert_eq!(
        s.hist_count("lock.duration", &of("mapped")),
        6,
        "every hold timed, the panicking one too"
    );
    assert_eq!(s.updown("lock.held", &of("mapped")), 0);
    // Writes: downgrade, try_downgrade_map, try_write, downgrade_map, the panicking one,
    // try_write; reads: the three downgrades, try_read, blocking_read.
    assert_eq!(
        s.counter("lock.acquisitions", &in_mode("downgraded", "exclusive")),
        6
    );
    assert_eq!(
        s.counter("lock.acquisitions", &in_mode("downgraded", "shared")),
        5
    );
    assert_eq!(
        s.hist_count("lock.duration", &in_mode("downgraded", "exclusive")),
        6
    );
    assert_eq!(
        s.hist_count("lock.duration", &in_mode("downgraded", "shared")),
        5
    );
    assert_eq!(
        s.counter("lock.conflicts", &in_mode("downgraded", "exclusive")),
        1
    );
    assert_eq!(
        s.counter("lock.conflicts", &in_mode("downgraded", "shared")),
        1
    );
    assert_eq!(s.updown("lock.held", &of("downgraded")), 0);
}

#[test]
#[cfg(feature = "tokio")]
fn tokio_rwlock_max_readers_caps_readers_and_counts_the_turned_away() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let two = lockmeter::tokio::RwLock::builder("two-readers")
        .sink(sink.clone())
        .max_readers(2)
        .build(0u8);
    let (a, b) = (two.try_read().unwrap(), two.try_read().unwrap());
    assert!(two.try_read().is_err(), "a third reader waits");
    drop((a, b));
    // 0 would make tokio's panic: clamped to one reader.
    let one = lockmeter::tokio::RwLock::builder("one-reader")
        .sink(sink)
        .max_readers(0)
        .build(0u8);
    let a = one.try_read().unwrap();
    assert!(one.try_read().is_err(), "one reader at a time");
    drop(a);
    // The drop-in constructor, named after its place in the source.
    let site = lockmeter::tokio::RwLock::with_max_readers(0u8, 1);
    let line = line!() - 1;
    let debug = format!("{site:?}");
    assert!(debug.contains(&format!("in_process.rs:{line}")), "{debug}");
    let a = site.try_read().unwrap();
    assert!(site.try_read().is_err());
    drop(a);
    let s = rec.snapshot();
    let of = |name: &'static str| [("lock.name", name), ("lock.mode", "shared")];
    assert_eq!(s.counter("lock.acquisitions", &of("two-readers")), 2);
    assert_eq!(s.counter("lock.conflicts", &of("two-readers")), 1);
    assert_eq!(s.counter("lock.acquisitions", &of("one-reader")), 1);
    assert_eq!(s.counter("lock.conflicts", &of("one-reader")), 1);
}

#[test]
fn lock_meter_measures_a_parking_lot_mutex_and_arbitrary_calls() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let meter = LockMeter::with_sink("pl", "parking_lot_mutex", &sink);
    let m = Arc::new(parking_lot::Mutex::new(0u32));
    let held = m.lock();
    let waiter = {
        let (meter, m) = (meter.clone(), Arc::clone(&m));
        std::thread::spawn(move || {
            let mut g = meter.lock(LockMode::Exclusive, || m.try_lock(), || m.lock());
            assert!(g.was_contended());
            **g += 1;
        })
    };
    lockmeter_testkit::eventually("the waiter to conflict", || {
        rec.snapshot().counter("lock.conflicts", &[]) == 1
    });
    drop(held);
    waiter.join().unwrap();
    {
        let _g = meter.lock(LockMode::Exclusive, || m.try_lock(), || m.lock());
    }
    // Outcomes of opaque calls.
    meter.start(LockMode::Exclusive).would_block();
    meter.start(LockMode::Exclusive).timed_out();
    meter.start(LockMode::Exclusive).failed("ConnectionRefused");
    drop(meter.start(LockMode::Shared)); // cancelled
    let hold = meter.start(LockMode::Exclusive).acquired(false);
    hold.release_failed("EIO");
    let s = rec.snapshot();
    assert_eq!(
        s.counter("lock.acquisitions", &[("lock.kind", "parking_lot_mutex")]),
        3
    );
    assert_eq!(
        s.counter("lock.acquisitions", &[("lock.contended", "true")]),
        1
    );
    assert_eq!(
        s.counter("lock.conflicts", &[]),
        3,
        "contended + would_block + timeout"
    );
    for (o, n) in [
        ("acquired", 3),
        ("would_block", 1),
        ("timeout", 1),
        ("error", 1),
        ("cancelled", 1),
    ] {
        assert_eq!(
            s.hist_count("lock.wait.duration", &[("lock.outcome", o)]),
            n,
            "{o}"
        );
    }
    assert_eq!(
        s.counter(
            "lock.errors",
            &[
                ("lock.operation", "lock"),
                ("error.type", "ConnectionRefused")
            ]
        ),
        1
    );
    assert_eq!(
        s.counter(
            "lock.errors",
            &[("lock.operation", "unlock"), ("error.type", "EIO")]
        ),
        1
    );
    assert_eq!(s.hist_count("lock.duration", &[]), 3);
    assert_eq!(s.updown("lock.held", &[]), 0);
}

#[test]
#[cfg(feature = "tokio")]
fn tokio_rwlock_times_waits_and_holds_together() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let l = lockmeter::tokio::RwLock::builder("catalog")
        .sink(sink.clone())
        .sample_every(1)
        .build(0u32);
    rt.block_on(async {
        for _ in 0..10 {
            let _ = *l.read().await;
        }
        *l.write().await += 1;
    });
    let s = rec.snapshot();
    assert_eq!(
        s.counter("lock.acquisitions", &[("lock.mode", "shared")]),
        10
    );
    assert_eq!(
        s.hist_count("lock.duration", &[("lock.mode", "shared")]),
        10
    );
    assert_eq!(
        s.hist_count("lock.wait.duration", &[("lock.mode", "shared")]),
        10
    );
    assert_eq!(
        s.hist_count("lock.wait.duration", &[("lock.mode", "exclusive")]),
        1
    );
}

/// A task that takes a free tokio lock in a loop spends its cooperative budget as it would on
/// `tokio::sync`'s own locks, so another task on the same worker gets to run (a drop-in that
/// took free locks with `try_lock` alone never yielded: the other task starved until the loop
/// ended).
#[test]
#[cfg(feature = "tokio")]
fn tokio_locks_spend_the_task_budget_as_tokio_does() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const ROUNDS: u32 = 10_000;
    /// Rounds of `take` before a task spawned first on the same worker ran (None: never).
    fn rounds_until_other_task_ran<F: std::future::Future<Output = ()>>(
        take: impl Fn() -> F,
    ) -> Option<u32> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let ran = Arc::new(AtomicBool::new(false));
        rt.block_on(async {
            let flag = Arc::clone(&ran);
            let other = tokio::spawn(async move { flag.store(true, Ordering::SeqCst) });
            let mut seen = None;
            for i in 0..ROUNDS {
                take().await;
                if seen.is_none() && ran.load(Ordering::SeqCst) {
                    seen = Some(i);
                }
            }
            other.await.unwrap();
            seen
        })
    }
    let tokio_mutex = tokio::sync::Mutex::new(0u32);
    let theirs = rounds_until_other_task_ran(|| async {
        *tokio_mutex.lock().await += 1;
    });
    assert!(theirs.is_some(), "tokio's own Mutex let the other task run");
    let m = lockmeter::tokio::Mutex::named("budget", 0u32);
    let rw = lockmeter::tokio::RwLock::named("budget-rw", 0u32);
    let ours = [
        rounds_until_other_task_ran(|| async {
            *m.lock().await += 1;
        }),
        rounds_until_other_task_ran(|| async {
            let _ = *rw.read().await;
        }),
        rounds_until_other_task_ran(|| async {
            *rw.write().await += 1;
        }),
    ];
    for (what, n) in ["Mutex::lock", "RwLock::read", "RwLock::write"]
        .iter()
        .zip(ours)
    {
        assert_eq!(
            n, theirs,
            "{what}: the other task ran after {n:?} rounds, tokio's after {theirs:?}"
        );
    }
}

#[test]
fn a_handed_off_hold_counts_the_acquisition_but_no_hold_time() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let meter = LockMeter::with_attributes(
        "/var/lock/job",
        "flock",
        &sink,
        &[opentelemetry::KeyValue::new("fs.type", "tmpfs")],
    );
    let attempt = meter.start(LockMode::Exclusive);
    attempt.conflict();
    let hold = attempt.acquired(true);
    assert_eq!(rec.snapshot().updown("lock.held", &[]), 1);
    hold.handed_off();
    let s = rec.snapshot();
    let attrs = [("lock.kind", "flock"), ("fs.type", "tmpfs")];
    assert_eq!(s.counter("lock.acquisitions", &attrs), 1);
    assert_eq!(s.counter("lock.conflicts", &attrs), 1);
    assert_eq!(s.hist_count("lock.wait.duration", &attrs), 1);
    assert_eq!(
        s.updown("lock.held", &[]),
        0,
        "the holder is gone from this process: lock.held must not stay up"
    );
    assert_eq!(
        s.hist_count("lock.duration", &[]),
        0,
        "when the lock is released is not known here: no hold time"
    );
}

/// Holds counted by the lock's word, conflicts in thread shards when the waits begin: with four
/// writers and two readers racing, every acquisition and every conflict is counted.
#[test]
fn racing_writers_and_readers_on_an_rwlock_are_counted_exactly() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let l = Arc::new(RwLock::builder("racing").sink(sink).build(0u64));
    // Held while the others start, until a writer is seen waiting: contention whatever the
    // scheduler does (under a loaded test run the threads may otherwise never overlap).
    let first = l.write().unwrap();
    // Writer 0 downgrades each of its holds: no other writer may get in between (the value it
    // reads back is the one it wrote), and each downgrade is also a shared hold.
    let writers: Vec<_> = (0..4)
        .map(|i| {
            let l = Arc::clone(&l);
            std::thread::spawn(move || {
                for _ in 0..5_000 {
                    let mut w = l.write().unwrap();
                    *w += 1;
                    if i == 0 {
                        let wrote = *w;
                        let r = RwLockWriteGuard::downgrade(w);
                        assert_eq!(*r, wrote, "a writer got in during a downgrade");
                    }
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let l = Arc::clone(&l);
            std::thread::spawn(move || {
                for _ in 0..5_000 {
                    std::hint::black_box(*l.read().unwrap());
                }
            })
        })
        .collect();
    let exclusive = [("lock.name", "racing"), ("lock.mode", "exclusive")];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while rec.snapshot().counter("lock.conflicts", &exclusive) == 0 {
        assert!(std::time::Instant::now() < deadline, "no writer waited");
        std::thread::yield_now();
    }
    drop(first);
    for t in writers.into_iter().chain(readers) {
        t.join().unwrap();
    }
    assert_eq!(*l.read().unwrap(), 20_000);
    let s = rec.snapshot();
    assert_eq!(s.counter("lock.acquisitions", &exclusive), 20_001);
    let contended = s.counter(
        "lock.acquisitions",
        &[("lock.mode", "exclusive"), ("lock.contended", "true")],
    );
    assert!(contended > 0, "four writers never waited");
    assert_eq!(s.counter("lock.conflicts", &exclusive), contended);
    assert_eq!(
        s.counter("lock.acquisitions", &[("lock.mode", "shared")]),
        15_001
    );
    assert_eq!(s.updown("lock.held", &[("lock.name", "racing")]), 0);
}

/// The counts live in the lock's heap block, beside the value, and the collection reads them
/// there: a lock moved after it was used keeps counting into the same series, and a lock
/// consumed by `into_inner` or dropped leaves its counts behind, held or not.
#[test]
fn moved_consumed_and_dropped_locks_keep_their_counts() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let acquisitions = |name: &str| {
        rec.snapshot()
            .counter("lock.acquisitions", &[("lock.name", name)])
    };
    let held = |name: &str| rec.snapshot().updown("lock.held", &[("lock.name", name)]);

    let m = Mutex::builder("moved").sink(sink.clone()).build(vec![1u8]);
    m.lock().unwrap().push(2);
    let mut boxed = vec![Box::new(m)]; // moved twice: into the box, the box into the vector
    boxed[0].lock().unwrap().push(3);
    let moved = boxed.pop().unwrap();
    assert_eq!(acquisitions("moved"), 2);
    assert_eq!(*moved.try_lock().unwrap(), [1, 2, 3]);
    assert_eq!(acquisitions("moved"), 3);
    assert_eq!(moved.into_inner().unwrap(), [1, 2, 3]);
    assert_eq!(acquisitions("moved"), 3, "kept after into_inner");
    assert_eq!(held("moved"), 0);

    let l = RwLock::builder("dropped")
        .sink(sink.clone())
        .build(String::new());
    l.write().unwrap().push('x');
    let read = l.read().unwrap();
    assert_eq!(held("dropped"), 1);
    drop(read);
    let l = std::thread::spawn(move || {
        // Moved to another thread, used and dropped there.
        assert_eq!(*l.read().unwrap(), "x");
        drop(l);
    });
    l.join().unwrap();
    let s = rec.snapshot();
    let mode = |m: &str| {
        s.counter(
            "lock.acquisitions",
            &[("lock.name", "dropped"), ("lock.mode", m)],
        )
    };
    assert_eq!(
        (mode("exclusive"), mode("shared")),
        (1, 2),
        "kept after drop"
    );
    assert_eq!(held("dropped"), 0);
}
