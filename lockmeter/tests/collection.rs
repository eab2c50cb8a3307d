//! Counts are read when the SDK collects: whatever reads them (a force_flush, a shutdown, a
//! periodic export) right after an acquisition sees it, dropped locks keep their counts, and
//! series stay bounded.
#![allow(clippy::unwrap_used)]

use lockmeter::metrics::{Sink, SERIES_LIMIT};
use lockmeter::sync::Mutex;
use lockmeter::FileLock;
use lockmeter_testkit::Recorder;

#[test]
fn force_flush_right_after_one_acquisition_sees_every_count() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let dir = tempfile::tempdir().unwrap();
    let lock = FileLock::builder(dir.path().join("once.lock"))
        .name("once")
        .sink(sink.clone())
        .open()
        .unwrap();
    let guard = lock.lock().unwrap();
    // While held: one acquisition, held 1.
    let s = rec.snapshot();
    assert_eq!(s.counter("lock.acquisitions", &[("lock.name", "once")]), 1);
    assert_eq!(s.updown("lock.held", &[("lock.name", "once")]), 1);
    drop(guard);
    let s = rec.snapshot();
    assert_eq!(s.updown("lock.held", &[("lock.name", "once")]), 0);
    assert_eq!(s.hist_count("lock.duration", &[("lock.name", "once")]), 1);

    let m = Mutex::builder("once-mutex").sink(sink).build(0u8);
    *m.lock().unwrap() += 1;
    let s = rec.snapshot();
    assert_eq!(
        s.counter("lock.acquisitions", &[("lock.name", "once-mutex")]),
        1
    );
    assert_eq!(s.updown("lock.held", &[("lock.name", "once-mutex")]), 0);
}

#[test]
fn shutdown_right_after_an_acquisition_exports_it() {
    let rec = Recorder::new();
    let m = Mutex::builder("at-exit")
        .sink(Sink::new(rec.meter()))
        .build(());
    for _ in 0..3 {
        drop(m.lock().unwrap());
    }
    let s = rec.shutdown_snapshot();
    assert_eq!(
        s.counter("lock.acquisitions", &[("lock.name", "at-exit")]),
        3
    );
    assert_eq!(s.updown("lock.held", &[("lock.name", "at-exit")]), 0);
}

#[test]
fn counts_of_dropped_locks_stay_and_never_go_backwards() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short-lived.lock");
    for round in 1..=3u64 {
        let lock = FileLock::builder(&path)
            .name("short-lived")
            .sink(sink.clone())
            .open()
            .unwrap();
        drop(lock.lock().unwrap());
        drop(lock.try_lock().unwrap());
        drop(lock);
        let s = rec.snapshot();
        assert_eq!(
            s.counter("lock.acquisitions", &[("lock.name", "short-lived")]),
            2 * round
        );
        assert_eq!(s.updown("lock.held", &[("lock.name", "short-lived")]), 0);
    }
    // Two live locks with one name are one series: summed, not overwritten.
    let a = Mutex::builder("twins").sink(sink.clone()).build(());
    let b = Mutex::builder("twins").sink(sink.clone()).build(());
    drop(a.lock().unwrap());
    drop(b.lock().unwrap());
    drop(b.lock().unwrap());
    let s = rec.snapshot();
    assert_eq!(s.counter("lock.acquisitions", &[("lock.name", "twins")]), 3);
}

#[test]
fn series_past_the_limit_fold_into_the_overflow_series() {
    let rec = Recorder::new();
    let sink = Sink::new(rec.meter());
    let extra = 7;
    let locks: Vec<_> = (0..SERIES_LIMIT + extra)
        .map(|i| {
            Mutex::builder(format!("job-{i}"))
                .sink(sink.clone())
                .build(())
        })
        .collect();
    for l in &locks {
        drop(l.lock().unwrap());
    }
    drop(locks);
    let s = rec.snapshot();
    assert_eq!(
        s.counter("lock.acquisitions", &[]),
        (SERIES_LIMIT + extra) as u64,
        "every acquisition counted"
    );
    assert_eq!(
        s.counter("lock.acquisitions", &[("otel.metric.overflow", "true")]),
        extra as u64,
        "the locks past the limit share the overflow series"
    );
    assert_eq!(
        s.attribute_sets("lock.acquisitions").len(),
        SERIES_LIMIT + 1,
        "bounded: one series per name up to the limit, then one overflow series"
    );
}

/// Locks dropped while another thread collects: every collection sees each acquisition of a
/// dropped lock either live or kept, never neither (the exported counter never dips), and a
/// collection that holds the last reference to a lock for a moment does not deadlock when it
/// lets go (the drop retires the lock under the lock the collection held: it did, once).
#[test]
fn a_lock_dropped_during_a_collection_is_never_missing_from_it() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::sync::Arc;
    const LOCKS: u64 = 3_000;
    let (finished, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rec = Recorder::new();
        let sink = Sink::new(rec.meter());
        let done = Arc::new(AtomicBool::new(false));
        let churn = {
            let (sink, done) = (sink.clone(), done.clone());
            std::thread::spawn(move || {
                for _ in 0..LOCKS {
                    let m = Mutex::builder("churn").sink(sink.clone()).build(());
                    drop(m.lock().unwrap());
                }
                done.store(true, SeqCst);
            })
        };
        let mut last = 0;
        let mut collections = 0;
        let mut dips = Vec::new();
        while !done.load(SeqCst) {
            let n = rec
                .snapshot()
                .counter("lock.acquisitions", &[("lock.name", "churn")]);
            if n < last {
                dips.push((last, n));
            }
            last = n;
            collections += 1;
        }
        churn.join().unwrap();
        let n = rec
            .snapshot()
            .counter("lock.acquisitions", &[("lock.name", "churn")]);
        let _ = finished.send((n, collections, dips));
    });
    let (n, collections, dips) = result
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("no result within 60 s: a collection deadlocked with a lock's drop");
    assert!(dips.is_empty(), "lock.acquisitions went back: {dips:?}");
    assert_eq!(n, LOCKS, "after {collections} collections");
    assert!(collections > 1, "the locks were dropped while collecting");
}
