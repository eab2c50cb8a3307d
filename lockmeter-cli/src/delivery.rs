//! Telemetry for short-lived commands (`lockmeter exec`): never silent, never slow.
//!
//! - OTLP when an endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT`), else nothing by default:
//!   a Prometheus endpoint in a process that lives as long as one cron job is rarely scraped.
//! - Delivery at exit is bounded: `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds) if set, else
//!   [`EXEC_EXPORT_TIMEOUT`], for the whole shutdown (metrics and traces side by side).
//! - When the run's metrics went nowhere (no OTLP, and no Prometheus endpoint that was scraped)
//!   one note says so on stderr, unless `OTEL_METRICS_EXPORTER=none` asked for nothing.
//! - Failures name the endpoint and protocol tried.

use std::time::Duration;

use lockmeter::telemetry::{MetricsExporter, Telemetry};

/// Default bound on the time `exec` spends delivering telemetry at exit.
pub const EXEC_EXPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// The telemetry of one `exec` run.
#[derive(Debug)]
pub struct Delivery {
    telemetry: Option<Telemetry>,
    finished: bool,
    /// Say when metrics went nowhere (not after an error message: it would bury it).
    note: bool,
}

impl Delivery {
    /// Sets telemetry up from `OTEL_*` for a short-lived command; a problem is one warning and
    /// the run goes on without telemetry.
    pub fn start(service: &str) -> Delivery {
        let defaults: &[MetricsExporter] = if lockmeter::telemetry::otlp_metrics_endpoint_set() {
            &[MetricsExporter::Otlp]
        } else {
            &[]
        };
        let telemetry = match Telemetry::builder()
            .service_name(service)
            .compact_console(true)
            .default_metrics_exporters(defaults)
            .default_export_timeout(EXEC_EXPORT_TIMEOUT)
            .init()
        {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("lockmeter: warning: telemetry disabled: {e}");
                None
            }
        };
        Delivery {
            telemetry,
            finished: false,
            note: true,
        }
    }

    /// Whether spans are exported (one acquisition per process: a span for it costs nothing
    /// next to the process, and is what a trace backend shows for the job).
    pub fn spans(&self) -> bool {
        self.telemetry
            .as_ref()
            .is_some_and(Telemetry::traces_enabled)
    }

    /// The run failed with a message of its own: no note about undelivered metrics after it.
    pub fn failed(&mut self) {
        self.note = false;
    }

    /// Delivers what was recorded, within the export timeout, and says once when it went
    /// nowhere. Call it after the lock is released; later calls do nothing.
    pub fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let Some(t) = self.telemetry.take() else {
            return;
        };
        let exporters = t.metrics_exporters().to_vec();
        let prometheus = t.prometheus_addr();
        let scraped = t.prometheus_scrapes() > 0;
        if let Err(e) = t.shutdown() {
            eprintln!("lockmeter: warning: {e}");
        }
        if !self.note || exporters.contains(&MetricsExporter::Otlp) || metrics_exporter_is_none() {
            return;
        }
        let why = match prometheus {
            Some(_) if scraped => return,
            Some(addr) => format!("nothing scraped http://{addr}/metrics before lockmeter exited"),
            None => "no OTLP endpoint is set".to_owned(),
        };
        eprintln!(
            "lockmeter: note: this run's lock metrics were not delivered: {why} (set \
             OTEL_EXPORTER_OTLP_ENDPOINT to push them to a collector, or \
             OTEL_METRICS_EXPORTER=none to silence this note)"
        );
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `OTEL_METRICS_EXPORTER=none`: the user asked for no metrics, so none is not news.
fn metrics_exporter_is_none() -> bool {
    let Ok(v) = std::env::var("OTEL_METRICS_EXPORTER") else {
        return false;
    };
    let parts: Vec<&str> = v
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    !parts.is_empty() && parts.iter().all(|p| *p == "none")
}
