//! Set-up order does not matter: locks created before a global meter provider is installed
//! record into it once it is. One test: the global provider is process-wide state.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use lockmeter::sync::{Mutex, DEFAULT_SAMPLE_EVERY};
use lockmeter::FileLock;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};

fn provider() -> (SdkMeterProvider, InMemoryMetricExporter) {
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_reader(
            PeriodicReader::builder(exporter.clone())
                .with_interval(Duration::from_secs(3600))
                .build(),
        )
        .build();
    (provider, exporter)
}

fn latest(p: &SdkMeterProvider, e: &InMemoryMetricExporter) -> Option<ResourceMetrics> {
    e.reset();
    p.force_flush().unwrap();
    e.get_finished_metrics().unwrap().pop()
}

fn acquisitions(rm: &Option<ResourceMetrics>, name: &str) -> u64 {
    let Some(rm) = rm else { return 0 };
    rm.scope_metrics()
        .flat_map(|s| s.metrics())
        .filter(|m| m.name() == "lock.acquisitions")
        .map(|m| match m.data() {
            AggregatedMetrics::U64(MetricData::Sum(s)) => s
                .data_points()
                .filter(|d| {
                    d.attributes()
                        .any(|kv| kv.key.as_str() == "lock.name" && kv.value.as_str() == name)
                })
                .map(|d| d.value())
                .sum::<u64>(),
            _ => panic!("not a u64 sum"),
        })
        .sum()
}

fn hold_count(rm: &Option<ResourceMetrics>, name: &str) -> u64 {
    let Some(rm) = rm else { return 0 };
    rm.scope_metrics()
        .flat_map(|s| s.metrics())
        .filter(|m| m.name() == "lock.duration")
        .map(|m| match m.data() {
            AggregatedMetrics::F64(MetricData::Histogram(h)) => h
                .data_points()
                .filter(|d| {
                    d.attributes()
                        .any(|kv| kv.key.as_str() == "lock.name" && kv.value.as_str() == name)
                })
                .map(|d| d.count())
                .sum::<u64>(),
            _ => panic!("not a histogram"),
        })
        .sum()
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
    let (p1, e1) = provider();
    opentelemetry::global::set_meter_provider(p1.clone());

    // Each lock notices at its next timed acquisition: at most `sample_every` acquisitions.
    for _ in 0..DEFAULT_SAMPLE_EVERY {
        *early.lock().unwrap() += 1;
    }
    for _ in 0..lockmeter::metrics::DEFAULT_SAMPLE_EVERY {
        drop(file.lock().unwrap());
    }
    let rm = latest(&p1, &e1);
    assert_eq!(
        acquisitions(&rm, "early"),
        100 + u64::from(DEFAULT_SAMPLE_EVERY),
        "counts are complete from the lock's creation"
    );
    assert_eq!(
        acquisitions(&rm, "early-file"),
        10 + u64::from(lockmeter::metrics::DEFAULT_SAMPLE_EVERY)
    );
    // From then on hold times go to the new provider too.
    let holds = hold_count(&rm, "early-file");
    for _ in 0..3 {
        let _g = file.lock().unwrap();
        // Each snapshot is a collection: the next acquisition is timed.
        latest(&p1, &e1);
    }
    assert_eq!(hold_count(&latest(&p1, &e1), "early-file"), holds + 3);
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
    let (p2, e2) = provider();
    opentelemetry::global::set_meter_provider(p2.clone());
    lockmeter::metrics::refresh();
    let rm = latest(&p2, &e2);
    assert_eq!(
        acquisitions(&rm, "early"),
        100 + u64::from(DEFAULT_SAMPLE_EVERY)
    );

    // A lock created after the provider records into it from its first acquisition.
    let late = Mutex::named("late", ());
    drop(late.lock().unwrap());
    assert_eq!(acquisitions(&latest(&p2, &e2), "late"), 1);
    assert_eq!(hold_count(&latest(&p2, &e2), "late"), 1);
}
