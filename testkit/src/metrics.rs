//! An in-memory OpenTelemetry metrics pipeline for assertions: [`Recorder`] is an SDK meter
//! provider whose exports stay in memory, [`Snapshot`] reads counters, up-down counters and
//! histograms out of one export by attribute.

use std::time::{Duration, Instant};

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};

/// An SDK meter provider exporting into memory, read on demand.
pub struct Recorder {
    exporter: InMemoryMetricExporter,
    provider: SdkMeterProvider,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        let exporter = InMemoryMetricExporter::default();
        let provider = SdkMeterProvider::builder()
            .with_reader(
                PeriodicReader::builder(exporter.clone())
                    .with_interval(Duration::from_secs(3600))
                    .build(),
            )
            .build();
        Recorder { exporter, provider }
    }

    /// The provider's `lockmeter` meter: wrap it in one `lockmeter::metrics::Sink` per test
    /// and pass clones of that to every lock (this crate cannot: a test's `lockmeter` is not
    /// the one a dependency of this crate would link).
    pub fn meter(&self) -> Meter {
        self.provider.meter("lockmeter")
    }

    /// The SDK provider (to install it globally, or shut it down).
    pub fn provider(&self) -> &SdkMeterProvider {
        &self.provider
    }

    /// Shuts the provider down and returns what its final export carried.
    pub fn shutdown_snapshot(&self) -> Snapshot {
        self.exporter.reset();
        self.provider.shutdown().unwrap();
        let mut all = self.exporter.get_finished_metrics().unwrap();
        Snapshot(all.pop())
    }

    /// Collects (lockmeter's counts are read now) and returns the newest cumulative export.
    pub fn snapshot(&self) -> Snapshot {
        self.exporter.reset();
        self.provider.force_flush().unwrap();
        let mut all = self.exporter.get_finished_metrics().unwrap();
        // The SDK skips the export when nothing was recorded yet.
        Snapshot(all.pop())
    }

    /// Waits until `pred` holds on a fresh snapshot (for "the waiter is now waiting").
    pub fn wait_for(&self, what: &str, pred: impl Fn(&Snapshot) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if pred(&self.snapshot()) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

pub struct Snapshot(Option<ResourceMetrics>);

fn matches<'a>(
    attrs: impl Iterator<Item = &'a opentelemetry::KeyValue>,
    want: &[(&str, &str)],
) -> bool {
    let attrs: Vec<_> = attrs.collect();
    want.iter().all(|(k, v)| {
        attrs
            .iter()
            .any(|kv| kv.key.as_str() == *k && kv.value.as_str() == *v)
    })
}

impl Snapshot {
    fn metric(&self, name: &str) -> Option<&opentelemetry_sdk::metrics::data::Metric> {
        self.0
            .as_ref()?
            .scope_metrics()
            .filter(|s| s.scope().name() == "lockmeter")
            .flat_map(|s| s.metrics())
            .find(|m| m.name() == name)
    }

    /// Sum of a u64 counter over the data points matching `want`.
    pub fn counter(&self, name: &str, want: &[(&str, &str)]) -> u64 {
        match self.metric(name).map(|m| m.data()) {
            Some(AggregatedMetrics::U64(MetricData::Sum(s))) => s
                .data_points()
                .filter(|dp| matches(dp.attributes(), want))
                .map(|dp| dp.value())
                .sum(),
            None => 0,
            Some(_) => panic!("{name} is not a u64 sum"),
        }
    }

    /// Sum of an i64 up-down counter over the data points matching `want`.
    pub fn updown(&self, name: &str, want: &[(&str, &str)]) -> i64 {
        match self.metric(name).map(|m| m.data()) {
            Some(AggregatedMetrics::I64(MetricData::Sum(s))) => s
                .data_points()
                .filter(|dp| matches(dp.attributes(), want))
                .map(|dp| dp.value())
                .sum(),
            None => 0,
            Some(_) => panic!("{name} is not an i64 sum"),
        }
    }

    /// Count of an f64 histogram over the data points matching `want`.
    pub fn hist_count(&self, name: &str, want: &[(&str, &str)]) -> u64 {
        match self.metric(name).map(|m| m.data()) {
            Some(AggregatedMetrics::F64(MetricData::Histogram(h))) => h
                .data_points()
                .filter(|dp| matches(dp.attributes(), want))
                .map(|dp| dp.count())
                .sum(),
            None => 0,
            Some(_) => panic!("{name} is not an f64 histogram"),
        }
    }

    /// Bucket boundaries of a histogram (first data point).
    pub fn hist_bounds(&self, name: &str) -> Vec<f64> {
        match self.metric(name).map(|m| m.data()) {
            Some(AggregatedMetrics::F64(MetricData::Histogram(h))) => h
                .data_points()
                .next()
                .map(|dp| dp.bounds().collect())
                .unwrap_or_default(),
            _ => panic!("{name} is not an f64 histogram"),
        }
    }

    /// Unit of a metric.
    pub fn unit(&self, name: &str) -> String {
        self.metric(name)
            .map(|m| m.unit().to_owned())
            .unwrap_or_default()
    }

    /// All attribute sets of a metric's data points, as sorted `key=value` strings.
    pub fn attribute_sets(&self, name: &str) -> Vec<Vec<String>> {
        fn sets<'a, I: Iterator<Item = &'a opentelemetry::KeyValue>>(
            it: impl Iterator<Item = I>,
        ) -> Vec<Vec<String>> {
            it.map(|a| {
                let mut v: Vec<String> = a.map(|kv| format!("{}={}", kv.key, kv.value)).collect();
                v.sort();
                v
            })
            .collect()
        }
        match self.metric(name).map(|m| m.data()) {
            Some(AggregatedMetrics::U64(MetricData::Sum(s))) => {
                sets(s.data_points().map(|d| d.attributes()))
            }
            Some(AggregatedMetrics::I64(MetricData::Sum(s))) => {
                sets(s.data_points().map(|d| d.attributes()))
            }
            Some(AggregatedMetrics::F64(MetricData::Sum(s))) => {
                sets(s.data_points().map(|d| d.attributes()))
            }
            Some(AggregatedMetrics::F64(MetricData::Histogram(h))) => {
                sets(h.data_points().map(|d| d.attributes()))
            }
            _ => vec![],
        }
    }
}
