//! Set-up order does not matter: locks created before a global meter provider is installed
//! record into it once it is. One test: the global provider is process-wide state.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex as StdMutex};

use lockmeter::sync::{Mutex, DEFAULT_SAMPLE_EVERY};
use lockmeter::FileLock;
use lockmeter_testkit::Recorder;

fn acquisitions(rec: &Recorder, name: &str) -> u64 {
    rec.snapshot()
        .counter("lock.acquisitions", &[("lock.name", name)])
}

fn holds(rec: &Recorder, name: &str) -> u64 {
    rec.snapshot()
        .hist_count("lock.duration", &[("lock.name", name)])
}

/// Captures WARN events (the one-time notice).
#[derive(Clone, Default)]
struct Warnings(Arc<StdMutex<Vec<String>>>);

impl std::io::Write for Warnings {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap()
            .push(String::from_utf8_lossy(buf).into_owned());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn locks_created_before_the_provider_record_into_it() {
    let warnings = Warnings::default();
    let w = warnings.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || w.clone())
        .init();

    // Before any provider: a static-like mutex used 100 times, a file lock used 10 times.
    let early = Mutex::named("early", 0u32);
    for _ in 0..100 {
        *early.lock().unwrap() += 1;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = FileLock::builder(dir.path().join("early.lock"))
        .name("early-file")
        .open()
        .unwrap();
    for _ in 0..10 {
        drop(file.lock().unwrap());
    }

    // The application installs its own provider, without telling lockmeter.
    let r1 = Recorder::new();
    opentelemetry::global::set_meter_provider(r1.provider().clone());

    // Each lock notices at its next timed acquisition: at most `sample_every` acquisitions.
    for _ in 0..DEFAULT_SAMPLE_EVERY {
        *early.lock().unwrap() += 1;
    }
    for _ in 0..lockmeter::metrics::DEFAULT_SAMPLE_EVERY {
        drop(file.lock().unwrap());
    }
    assert_eq!(
        acquisitions(&r1, "early"),
        100 + u64::from(DEFAULT_SAMPLE_EVERY),
        "counts are complete from the lock's creation"
    );
    assert_eq!(
        acquisitions(&r1, "early-file"),
        10 + u64::from(lockmeter::metrics::DEFAULT_SAMPLE_EVERY)
    );
    // From then on hold times go to the new provider too.
    let before = holds(&r1, "early-file");
    for _ in 0..3 {
        // Each snapshot (in `holds`) is a collection: the next acquisition is timed.
        drop(file.lock().unwrap());
        holds(&r1, "early-file");
    }
    assert_eq!(holds(&r1, "early-file"), before + 3);
    let said: Vec<String> = warnings.0.lock().unwrap().clone();
    assert_eq!(
        said.iter()
            .filter(|l| l.contains("installed after locks had been used"))
            .count(),
        1,
        "the late provider is reported once, with the fix: {said:?}"
    );
    assert!(said
        .iter()
        .any(|l| l.contains("lockmeter::metrics::refresh()")));

    // A second provider installed and announced with refresh(): every count visible at once,
    // before any further acquisition.
    let r2 = Recorder::new();
    opentelemetry::global::set_meter_provider(r2.provider().clone());
    lockmeter::metrics::refresh();
    assert_eq!(
        acquisitions(&r2, "early"),
        100 + u64::from(DEFAULT_SAMPLE_EVERY)
    );
    // And the early mutex's hold times follow: a thread keeps its timed holds and records
    // them in bulk, and what a collection records goes to the provider installed now, not to
    // the one the lock last recorded into.
    let before = holds(&r2, "early");
    for _ in 0..3 {
        *early.lock().unwrap() += 1;
        holds(&r2, "early");
    }
    assert_eq!(holds(&r2, "early"), before + 3);

    // A lock created after the provider records into it from its first acquisition.
    let late = Mutex::named("late", ());
    drop(late.lock().unwrap());
    assert_eq!(acquisitions(&r2, "late"), 1);
    assert_eq!(holds(&r2, "late"), 1);
}
