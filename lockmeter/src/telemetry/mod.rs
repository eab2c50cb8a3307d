//! Telemetry set-up for applications (feature `telemetry`): one call installs an SDK meter
//! provider (and, when asked, a tracer provider and a `tracing` subscriber) from the standard
//! `OTEL_*` variables, serves Prometheus `/metrics` over HTTP, and pushes OTLP.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let _telemetry = lockmeter::telemetry::init()?; // flushes and shuts down on drop
//! let lock = lockmeter::FileLock::open("/tmp/app.lock")?;
//! let _guard = lock.lock()?;
//! # Ok(())
//! # }
//! ```
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` | resource | the program name |
//! | `OTEL_METRICS_EXPORTER` | `prometheus`, `otlp`, `none`, comma-separated | builder default: `prometheus`, plus `otlp` when an OTLP endpoint is set |
//! | `OTEL_TRACES_EXPORTER` | `otlp` or `none` | `otlp` when an OTLP endpoint is set, else `none` |
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` | collector address | unset |
//! | `OTEL_EXPORTER_OTLP_PROTOCOL` | `grpc` or `http/protobuf` | `http/protobuf` (as the OTLP spec says) |
//! | `OTEL_METRIC_EXPORT_INTERVAL` | OTLP push period, ms | 60000 |
//! | `OTEL_EXPORTER_OTLP_TIMEOUT` (`_METRICS_`/`_TRACES_TIMEOUT`) | limit for one export, and for flush and shutdown as a whole, ms | 10000, or the builder's [`default_export_timeout`](TelemetryBuilder::default_export_timeout) |
//! | `OTEL_EXPORTER_PROMETHEUS_HOST` | listen address | `127.0.0.1` |
//! | `OTEL_EXPORTER_PROMETHEUS_PORT` | listen port | `9464` |
//!
//! Recording never waits on the network: OTLP is pushed from the SDK's reader thread, so an
//! unreachable collector costs the lock path nothing (failed exports are logged by the SDK).
//! [`Telemetry::flush`] and [`Telemetry::shutdown`] (and the drop) give up after the export
//! timeout, and their errors name the endpoint and protocol they tried. A busy Prometheus port
//! is an error from [`TelemetryBuilder::init`].

mod config;
mod serve;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::metrics::{Aggregation, Instrument, SdkMeterProvider, Stream};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::metrics::{names, Sink, DEFAULT_BOUNDARIES, SCOPE};
use config::{
    env_set, otlp_endpoint, otlp_protocol, otlp_timeout_from_env, parse_metrics_exporters,
    parse_traces_exporter, program_name, prometheus_addr_from_env, Signal,
};
pub use config::{otlp_metrics_endpoint_set, MetricsExporter, OtlpProtocol};
use serve::BackgroundRuntime;

/// The OTLP export timeout when neither `OTEL_EXPORTER_OTLP_TIMEOUT` nor the builder sets one
/// (the OTLP specification's default).
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors from setting telemetry up and from delivering it.
///
/// `Debug` prints the same sentence as `Display`, followed by any cause it does not already
/// name: `fn main() -> Result<(), Box<dyn Error>>` with `?` shows
/// `cannot serve Prometheus metrics on 127.0.0.1:9464: Address in use (os error 98)`.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// The Prometheus listen address could not be bound (busy port, bad address, permission).
    #[error("cannot serve Prometheus metrics on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The bind error (`EADDRINUSE`, `EACCES`, ...).
        source: std::io::Error,
    },
    /// A variable has a value lockmeter cannot use.
    #[error("bad value {value:?} for {var}: {reason}")]
    BadVariable {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An exporter could not be built.
    #[error("cannot build the {what} exporter: {message}")]
    Exporter {
        /// Which exporter.
        what: &'static str,
        /// The exporter's error.
        message: String,
    },
    /// Pending telemetry could not be delivered at flush or shutdown (an unreachable collector,
    /// a timeout). Recording was not affected.
    #[error("could not deliver telemetry at {stage} to {target}: {message}")]
    Flush {
        /// `flush` or `shutdown`.
        stage: &'static str,
        /// Where it was going: protocol and endpoint (`OTLP (grpc) at http://127.0.0.1:4317`).
        target: String,
        /// What went wrong: the exporter's error, or that no answer came in time.
        message: String,
    },
    /// The background runtime could not be started.
    #[error("cannot start the telemetry runtime: {0}")]
    Runtime(std::io::Error),
}

impl std::fmt::Debug for TelemetryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::error::fmt_sentence(self, f)
    }
}

/// Builder for [`Telemetry`]. Explicit settings win over variables, which win over defaults.
#[derive(Debug)]
#[must_use = "call .init() to install telemetry"]
pub struct TelemetryBuilder {
    service_name: Option<String>,
    metrics_exporters: Option<Vec<MetricsExporter>>,
    default_metrics_exporters: Option<Vec<MetricsExporter>>,
    traces: Option<bool>,
    prometheus_addr: Option<SocketAddr>,
    export_interval: Option<Duration>,
    default_export_timeout: Option<Duration>,
    boundaries: Vec<f64>,
    tracing_subscriber: bool,
    compact_console: bool,
    log_filter: String,
    set_global: bool,
    profile_metrics: Option<bool>,
}

impl Default for TelemetryBuilder {
    fn default() -> Self {
        TelemetryBuilder {
            service_name: None,
            metrics_exporters: None,
            default_metrics_exporters: None,
            traces: None,
            prometheus_addr: None,
            export_interval: None,
            default_export_timeout: None,
            boundaries: DEFAULT_BOUNDARIES.to_vec(),
            tracing_subscriber: true,
            compact_console: false,
            log_filter: "warn".to_owned(),
            set_global: true,
            profile_metrics: None,
        }
    }
}

/// Installs telemetry from the environment with default settings; see the module docs.
pub fn init() -> Result<Telemetry, TelemetryError> {
    Telemetry::builder().init()
}

impl TelemetryBuilder {
    /// Service name used when neither `OTEL_SERVICE_NAME` nor `service.name` in
    /// `OTEL_RESOURCE_ATTRIBUTES` is set (default: the program's file name).
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service_name = Some(name.into());
        self
    }

    /// Metrics exporters, overriding `OTEL_METRICS_EXPORTER`.
    pub fn metrics_exporters(mut self, exporters: &[MetricsExporter]) -> Self {
        self.metrics_exporters = Some(exporters.to_vec());
        self
    }

    /// Metrics exporters used when `OTEL_METRICS_EXPORTER` is unset (default: Prometheus, plus
    /// OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` or `..._METRICS_ENDPOINT` is set).
    pub fn default_metrics_exporters(mut self, exporters: &[MetricsExporter]) -> Self {
        self.default_metrics_exporters = Some(exporters.to_vec());
        self
    }

    /// Whether to export traces over OTLP, overriding `OTEL_TRACES_EXPORTER`.
    pub fn traces(mut self, on: bool) -> Self {
        self.traces = Some(on);
        self
    }

    /// Prometheus listen address, overriding `OTEL_EXPORTER_PROMETHEUS_HOST`/`_PORT`. Port 0
    /// picks a free port; read it back with [`Telemetry::prometheus_addr`].
    pub fn prometheus_addr(mut self, addr: SocketAddr) -> Self {
        self.prometheus_addr = Some(addr);
        self
    }

    /// OTLP push period, overriding `OTEL_METRIC_EXPORT_INTERVAL`.
    pub fn export_interval(mut self, interval: Duration) -> Self {
        self.export_interval = Some(interval);
        self
    }

    /// The OTLP export timeout used when `OTEL_EXPORTER_OTLP_TIMEOUT` (or its `_METRICS_` /
    /// `_TRACES_` form) is unset (default [`DEFAULT_EXPORT_TIMEOUT`], 10 s). It limits each
    /// export, and [`Telemetry::flush`] and [`Telemetry::shutdown`] as a whole: a collector
    /// that accepts connections and never answers costs a short-lived program at most this
    /// much at exit.
    pub fn default_export_timeout(mut self, timeout: Duration) -> Self {
        self.default_export_timeout = Some(timeout);
        self
    }

    /// Histogram boundaries (seconds) for `lock.duration` and `lock.wait.duration`, installed as
    /// an SDK view (default [`DEFAULT_BOUNDARIES`]).
    pub fn histogram_boundaries(mut self, boundaries: &[f64]) -> Self {
        self.boundaries = boundaries.to_vec();
        self
    }

    /// Install a global `tracing` subscriber: `fmt` to stderr filtered by `RUST_LOG` (default
    /// `warn`), plus the OpenTelemetry layer when traces are exported (default `true`). If the
    /// application already installed one, it is left alone.
    pub fn tracing_subscriber(mut self, install: bool) -> Self {
        self.tracing_subscriber = install;
        self
    }

    /// Print console events as single lines without timestamp or target, for command-line
    /// tools whose stderr a person reads (default `false`).
    pub fn compact_console(mut self, on: bool) -> Self {
        self.compact_console = on;
        self
    }

    /// The `tracing` filter used when `RUST_LOG` is unset (default `warn`: migrations and
    /// failed unlocks are shown).
    pub fn default_log_filter(mut self, filter: impl Into<String>) -> Self {
        self.log_filter = filter.into();
        self
    }

    /// Export the lock profile's per-call-site totals as metrics (`lock.site.waited`,
    /// `lock.site.caused`, `lock.site.held`; see [`crate::profile::register_metrics`]),
    /// overriding `LOCKMETER_PROFILE_METRICS=1`. Off by default: call sites multiply series
    /// and change with every release. The profile is always served at
    /// `/debug/lockmeter/profile`.
    pub fn profile_metrics(mut self, on: bool) -> Self {
        self.profile_metrics = Some(on);
        self
    }

    /// Make the meter (and tracer) provider global (default `true`), so that locks created
    /// without an explicit sink record into it.
    pub fn set_global(mut self, global: bool) -> Self {
        self.set_global = global;
        self
    }

    /// Installs the providers and starts the exporters.
    pub fn init(self) -> Result<Telemetry, TelemetryError> {
        let otlp_endpoint_set = otlp_metrics_endpoint_set();
        let metrics_exporters = match self.metrics_exporters.clone() {
            Some(e) => e,
            None => match std::env::var("OTEL_METRICS_EXPORTER") {
                Ok(v) if !v.trim().is_empty() => parse_metrics_exporters(&v)?,
                _ => self.default_metrics_exporters.clone().unwrap_or_else(|| {
                    let mut d = vec![MetricsExporter::Prometheus];
                    if otlp_endpoint_set {
                        d.push(MetricsExporter::Otlp);
                    }
                    d
                }),
            },
        };
        let traces = match self.traces {
            Some(t) => t,
            None => match std::env::var("OTEL_TRACES_EXPORTER") {
                Ok(v) if !v.trim().is_empty() => parse_traces_exporter(&v)?,
                _ => {
                    env_set("OTEL_EXPORTER_OTLP_ENDPOINT")
                        || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                }
            },
        };
        let needs_otlp = traces || metrics_exporters.contains(&MetricsExporter::Otlp);
        let protocol = if needs_otlp {
            otlp_protocol()?
        } else {
            OtlpProtocol::HttpProtobuf
        };
        let default_timeout = self
            .default_export_timeout
            .unwrap_or(DEFAULT_EXPORT_TIMEOUT);
        let metrics_timeout = otlp_timeout_from_env(Signal::Metrics)?.unwrap_or(default_timeout);
        let traces_timeout = otlp_timeout_from_env(Signal::Traces)?.unwrap_or(default_timeout);
        let resource = self.resource();

        // A runtime of our own, on its own thread: tonic's gRPC client and the HTTP server run
        // there whatever runtime (or none) the application has.
        let needs_runtime = metrics_exporters.contains(&MetricsExporter::Prometheus)
            || (needs_otlp && protocol == OtlpProtocol::Grpc);
        let runtime = if needs_runtime {
            Some(BackgroundRuntime::start()?)
        } else {
            None
        };

        let mut mp = SdkMeterProvider::builder().with_resource(resource.clone());
        let boundaries = self.boundaries.clone();
        mp = mp.with_view(move |i: &Instrument| {
            if i.name() == names::DURATION || i.name() == names::WAIT_DURATION {
                Stream::builder()
                    .with_aggregation(Aggregation::ExplicitBucketHistogram {
                        boundaries: boundaries.clone(),
                        record_min_max: true,
                    })
                    .build()
                    .ok()
            } else {
                None
            }
        });

        let mut prometheus = None;
        let mut prom_registry = None;
        let scrapes = Arc::new(AtomicU64::new(0));
        if metrics_exporters.contains(&MetricsExporter::Prometheus) {
            let addr = match self.prometheus_addr {
                Some(a) => a,
                None => prometheus_addr_from_env()?,
            };
            let registry = prometheus::Registry::new();
            let exporter = opentelemetry_prometheus::exporter()
                .with_registry(registry.clone())
                .build()
                .map_err(|e| TelemetryError::Exporter {
                    what: "prometheus",
                    message: e.to_string(),
                })?;
            mp = mp.with_reader(exporter);
            let listener = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|source| TelemetryError::Bind { addr, source })?;
            let local = listener
                .local_addr()
                .map_err(|source| TelemetryError::Bind { addr, source })?;
            if let Some(rt) = &runtime {
                rt.serve_prometheus(listener, registry.clone(), Arc::clone(&scrapes))?;
            }
            prom_registry = Some(registry);
            prometheus = Some(local);
        }

        let last_export_error = Arc::new(Mutex::new(None));
        let mut otlp_metrics = None;
        if metrics_exporters.contains(&MetricsExporter::Otlp) {
            let _enter = runtime.as_ref().map(|rt| rt.handle.enter());
            let endpoint = otlp_endpoint(Signal::Metrics, protocol);
            let exporter = match protocol {
                OtlpProtocol::Grpc => opentelemetry_otlp::MetricExporter::builder()
                    .with_tonic()
                    .with_endpoint(&endpoint)
                    .with_timeout(metrics_timeout)
                    .build(),
                OtlpProtocol::HttpProtobuf => opentelemetry_otlp::MetricExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(&endpoint)
                    .with_timeout(metrics_timeout)
                    .build(),
            }
            .map_err(|e| TelemetryError::Exporter {
                what: "OTLP metrics",
                message: format!("{e} (endpoint {endpoint})"),
            })?;
            let exporter = ReportingExporter {
                inner: exporter,
                last_error: Arc::clone(&last_export_error),
            };
            otlp_metrics = Some(endpoint);
            let mut reader = opentelemetry_sdk::metrics::PeriodicReader::builder(exporter);
            if let Some(i) = self.export_interval {
                reader = reader.with_interval(i);
            }
            mp = mp.with_reader(reader.build());
        }
        let meter_provider = mp.build();

        let mut otlp_traces = None;
        let tracer_provider = if traces {
            let _enter = runtime.as_ref().map(|rt| rt.handle.enter());
            let endpoint = otlp_endpoint(Signal::Traces, protocol);
            let exporter = match protocol {
                OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(&endpoint)
                    .with_timeout(traces_timeout)
                    .build(),
                OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(&endpoint)
                    .with_timeout(traces_timeout)
                    .build(),
            }
            .map_err(|e| TelemetryError::Exporter {
                what: "OTLP traces",
                message: format!("{e} (endpoint {endpoint})"),
            })?;
            otlp_traces = Some(endpoint);
            Some(
                SdkTracerProvider::builder()
                    .with_resource(resource)
                    .with_batch_exporter(exporter)
                    .build(),
            )
        } else {
            None
        };

        let profile_metrics = self.profile_metrics.unwrap_or_else(|| {
            std::env::var("LOCKMETER_PROFILE_METRICS")
                .is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes"))
        });
        if profile_metrics {
            crate::profile::register_metrics(&meter_provider.meter(SCOPE));
        }
        let mut tracing_installed = false;
        if self.tracing_subscriber {
            use tracing_subscriber::Layer as _;
            // Per-layer filters: the console shows warnings (or RUST_LOG), while spans at INFO
            // (`lock.acquire`, `lock.hold`) and warnings go to OpenTelemetry when traces are on.
            let console = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&self.log_filter));
            let fmt = tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
            let fmt = if self.compact_console {
                fmt.without_time().with_target(false).boxed()
            } else {
                fmt.boxed()
            }
            .with_filter(console);
            let otel = tracer_provider.as_ref().map(|tp| {
                tracing_opentelemetry::layer()
                    .with_tracer(tp.tracer(SCOPE))
                    .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
            });
            tracing_installed = tracing_subscriber::registry()
                .with(fmt)
                .with(otel)
                .try_init()
                .is_ok();
        }

        // After the subscriber, so that what installing the provider says (locks used before
        // it: `metrics::refresh`'s notice) reaches the console.
        let sink = if self.set_global {
            opentelemetry::global::set_meter_provider(meter_provider.clone());
            if let Some(tp) = &tracer_provider {
                opentelemetry::global::set_tracer_provider(tp.clone());
            }
            // Locks created before now start counting into the new provider at once.
            crate::metrics::refresh();
            Sink::global()
        } else {
            Sink::new(meter_provider.meter(SCOPE))
        };

        Ok(Telemetry {
            sink,
            meter_provider,
            tracer_provider,
            prometheus,
            registry: prom_registry,
            metrics_exporters,
            protocol: needs_otlp.then_some(protocol),
            otlp_metrics,
            otlp_traces,
            export_timeout: metrics_timeout.max(traces_timeout),
            last_export_error,
            scrapes,
            registry_taken: AtomicBool::new(false),
            shut_down: false,
            tracing_installed,
            runtime,
        })
    }

    fn resource(&self) -> Resource {
        let env_names_service = env_set("OTEL_SERVICE_NAME")
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES")
                .map(|v| {
                    v.split(',')
                        .any(|kv| kv.trim().starts_with("service.name="))
                })
                .unwrap_or(false);
        let mut b = Resource::builder();
        if !env_names_service {
            let name = self.service_name.clone().unwrap_or_else(program_name);
            b = b.with_service_name(name);
        }
        b.build()
    }
}

/// Installed telemetry. Dropping it flushes pending metrics and spans, shuts the providers down
/// and stops the `/metrics` server.
pub struct Telemetry {
    sink: Sink,
    meter_provider: SdkMeterProvider,
    tracer_provider: Option<SdkTracerProvider>,
    prometheus: Option<SocketAddr>,
    registry: Option<prometheus::Registry>,
    metrics_exporters: Vec<MetricsExporter>,
    protocol: Option<OtlpProtocol>,
    /// OTLP endpoint of metrics and of traces, when exported.
    otlp_metrics: Option<String>,
    otlp_traces: Option<String>,
    /// The longer of the two export timeouts: the bound on flush and shutdown.
    export_timeout: Duration,
    /// The OTLP metrics exporter's last error, for messages that say what went wrong.
    last_export_error: Arc<Mutex<Option<String>>>,
    /// `/metrics` requests served.
    scrapes: Arc<AtomicU64>,
    /// [`Self::prometheus_registry`] was called: the program reads the values itself.
    registry_taken: AtomicBool,
    shut_down: bool,
    tracing_installed: bool,
    runtime: Option<BackgroundRuntime>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("metrics_exporters", &self.metrics_exporters)
            .field("prometheus", &self.prometheus)
            .field("otlp_protocol", &self.protocol)
            .field("otlp_metrics_endpoint", &self.otlp_metrics)
            .field("export_timeout", &self.export_timeout)
            .field("traces", &self.tracer_provider.is_some())
            .field("tracing_installed", &self.tracing_installed)
            .finish()
    }
}

impl Telemetry {
    /// A builder; see the module docs for the variables it reads.
    pub fn builder() -> TelemetryBuilder {
        TelemetryBuilder::default()
    }

    /// The installed meter provider.
    pub fn meter_provider(&self) -> &SdkMeterProvider {
        &self.meter_provider
    }

    /// The `lockmeter` meter of the installed provider (for instruments of your own).
    pub fn meter(&self) -> Meter {
        self.meter_provider.meter(SCOPE)
    }

    /// Where locks should record to reach this telemetry: [`Sink::global`] when the provider
    /// was made global (the default), else a sink on this provider (pass it to the lock
    /// builders' `sink`).
    pub fn sink(&self) -> Sink {
        self.sink.clone()
    }

    /// The address `/metrics` is served on, if the Prometheus exporter is on.
    pub fn prometheus_addr(&self) -> Option<SocketAddr> {
        self.prometheus
    }

    /// The Prometheus registry behind `/metrics`, for reading the current values in-process
    /// (the demo's summary table does). A program that asks for it delivers the values itself:
    /// dropping the `Telemetry` then says nothing of unscraped metrics.
    pub fn prometheus_registry(&self) -> Option<&prometheus::Registry> {
        self.registry_taken.store(true, Ordering::Relaxed);
        self.registry.as_ref()
    }

    /// The metrics exporters in use.
    pub fn metrics_exporters(&self) -> &[MetricsExporter] {
        &self.metrics_exporters
    }

    /// Whether spans are exported over OTLP.
    pub fn traces_enabled(&self) -> bool {
        self.tracer_provider.is_some()
    }

    /// The OTLP endpoint metrics are pushed to (the full URL for `http/protobuf`), if OTLP
    /// metrics are on.
    pub fn otlp_metrics_endpoint(&self) -> Option<&str> {
        self.otlp_metrics.as_deref()
    }

    /// The OTLP protocol in use, if anything is exported over OTLP.
    pub fn otlp_protocol(&self) -> Option<OtlpProtocol> {
        self.protocol
    }

    /// How long [`flush`](Self::flush) and [`shutdown`](Self::shutdown) may take at most
    /// (the export timeout; see [`TelemetryBuilder::default_export_timeout`]).
    pub fn export_timeout(&self) -> Duration {
        self.export_timeout
    }

    /// How many times `/metrics` was requested so far (0 without the Prometheus exporter): a
    /// short-lived program can tell whether anyone scraped what it recorded.
    pub fn prometheus_scrapes(&self) -> u64 {
        self.scrapes.load(Ordering::Relaxed)
    }

    /// Pushes pending metrics and spans now (for short-lived programs). Gives up after the
    /// [export timeout](Self::export_timeout).
    pub fn flush(&self) -> Result<(), TelemetryError> {
        let mp = self.meter_provider.clone();
        let tp = self.tracer_provider.clone();
        self.bounded(
            "flush",
            move || mp.force_flush(),
            move || tp.map(|tp| tp.force_flush()),
        )
    }

    /// Flushes and shuts down, returning the first error (dropping does the same and prints
    /// it). Gives up after the [export timeout](Self::export_timeout): a collector that never
    /// answers delays the caller by at most that much.
    pub fn shutdown(mut self) -> Result<(), TelemetryError> {
        self.shutdown_inner()
    }

    fn shutdown_inner(&mut self) -> Result<(), TelemetryError> {
        if std::mem::replace(&mut self.shut_down, true) {
            return Ok(());
        }
        let mp = self.meter_provider.clone();
        let tp = self.tracer_provider.take();
        let timeout = self.export_timeout;
        let r = self.bounded(
            "shutdown",
            move || mp.shutdown(),
            move || tp.map(|tp| tp.shutdown_with_timeout(timeout)),
        );
        // Stop the server and the runtime only after the final export went out through it
        // (or was given up on).
        drop(self.runtime.take());
        r
    }

    /// Runs the metrics and traces parts of a flush or shutdown side by side, waiting for
    /// both at most the export timeout (plus a little for the exporters' own timeouts to
    /// fire first). A part still running then is left behind: it cannot delay the caller.
    fn bounded(
        &self,
        stage: &'static str,
        metrics: impl FnOnce() -> opentelemetry_sdk::error::OTelSdkResult + Send + 'static,
        traces: impl FnOnce() -> Option<opentelemetry_sdk::error::OTelSdkResult> + Send + 'static,
    ) -> Result<(), TelemetryError> {
        use opentelemetry_sdk::error::OTelSdkError;
        let start = Instant::now();
        let deadline = start + self.export_timeout + Duration::from_millis(200);
        type Part = Box<dyn FnOnce() -> Option<opentelemetry_sdk::error::OTelSdkResult> + Send>;
        let (tx, rx) = mpsc::channel();
        let spawn = |what: &'static str, f: Part| {
            let thread_tx = tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("lockmeter-{stage}"))
                .spawn(move || {
                    let _ = thread_tx.send((what, f()));
                });
            if let Err(e) = spawned {
                let _ = tx.send((
                    what,
                    Some(Err(OTelSdkError::InternalFailure(e.to_string()))),
                ));
            }
        };
        spawn("metrics", Box::new(move || Some(metrics())));
        spawn("traces", Box::new(traces));
        drop(tx);
        let mut pending = vec!["metrics", "traces"];
        let mut failures = Vec::new();
        while !pending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((what, result)) => {
                    pending.retain(|p| *p != what);
                    match result {
                        None | Some(Ok(())) | Some(Err(OTelSdkError::AlreadyShutdown)) => {}
                        Some(Err(e)) => {
                            // An exporter that gave up at its timeout does not always say so
                            // ("network error"): the clock does.
                            let slow = start.elapsed() >= self.export_timeout.mul_f32(0.9);
                            failures.push((what, self.explain(what, &e, slow)));
                        }
                    }
                }
                Err(_) => {
                    for what in pending.drain(..) {
                        failures.push((
                            what,
                            format!(
                                "no answer within {} (OTEL_EXPORTER_OTLP_TIMEOUT)",
                                secs_text(self.export_timeout)
                            ),
                        ));
                    }
                }
            }
        }
        if failures.is_empty() {
            return Ok(());
        }
        let target = self.target_text(failures.iter().map(|(w, _)| *w));
        let message = match failures.as_slice() {
            [(_, m)] => m.clone(),
            _ => failures
                .iter()
                .map(|(w, m)| format!("{w}: {m}"))
                .collect::<Vec<_>>()
                .join("; "),
        };
        Err(TelemetryError::Flush {
            stage,
            target,
            message,
        })
    }

    /// What went wrong, in words: the exporter's own error for a failed metrics export (the
    /// SDK only says "Failed to shutdown"), and "no answer within …" for a timeout.
    fn explain(
        &self,
        what: &str,
        sdk: &opentelemetry_sdk::error::OTelSdkError,
        slow: bool,
    ) -> String {
        let exporter = match what {
            "metrics" => self.last_export_error.lock().ok().and_then(|e| e.clone()),
            _ => None,
        };
        let text = exporter.unwrap_or_else(|| sdk.to_string());
        let text = text.trim_start_matches("Operation failed: ").to_owned();
        let timed_out = slow
            || matches!(sdk, opentelemetry_sdk::error::OTelSdkError::Timeout(_))
            || text.contains("Timeout")
            || text.contains("timed out");
        if !timed_out {
            return text;
        }
        let within = format!("no answer within {}", secs_text(self.export_timeout));
        // The SDK's own timeout text ("Shutdown errors: [Timeout(2s)]") adds nothing.
        if text.contains("Timeout(") || text.starts_with("Operation timed out") {
            within
        } else {
            format!("{within} ({text})")
        }
    }

    /// `OTLP (grpc) at http://127.0.0.1:4317`, naming both endpoints when they differ.
    fn target_text<'a>(&self, parts: impl Iterator<Item = &'a str>) -> String {
        let protocol = self.protocol.map_or("?", OtlpProtocol::as_str);
        let mut endpoints: Vec<&str> = Vec::new();
        for what in parts {
            let e = match what {
                "metrics" => self.otlp_metrics.as_deref(),
                _ => self.otlp_traces.as_deref(),
            };
            if let Some(e) = e {
                if !endpoints.contains(&e) {
                    endpoints.push(e);
                }
            }
        }
        if endpoints.is_empty() {
            "the metrics pipeline".to_owned()
        } else {
            format!("OTLP ({protocol}) at {}", endpoints.join(" and "))
        }
    }
}

/// `2 s`, `1.5 s`, `250 ms`.
fn secs_text(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

impl Telemetry {
    /// The `/metrics` address, if what the program's locks counted was never delivered: served
    /// only there (no OTLP), never scraped, and the registry never read in-process.
    fn undelivered(&self) -> Option<SocketAddr> {
        let addr = self.prometheus?;
        let delivered = self.metrics_exporters.contains(&MetricsExporter::Otlp)
            || self.scrapes.load(Ordering::Relaxed) > 0
            || self.registry_taken.load(Ordering::Relaxed);
        (!delivered && crate::metrics::global_has_counts()).then_some(addr)
    }
}

impl Drop for Telemetry {
    /// Shuts down as [`Telemetry::shutdown`] does, printing its error if any; and says so when
    /// the program's lock metrics went nowhere (a short-lived program that exits before
    /// Prometheus's next scrape loses them: push them over OTLP instead). An explicit
    /// `shutdown()` leaves that to the caller ([`Telemetry::prometheus_scrapes`]).
    fn drop(&mut self) {
        let undelivered = if self.shut_down {
            None
        } else {
            self.undelivered()
        };
        if let Err(e) = self.shutdown_inner() {
            // The subscriber may be gone at exit; make sure the message is seen.
            eprintln!("lockmeter: warning: {e}");
        }
        if let Some(addr) = undelivered {
            eprintln!(
                "lockmeter: note: this program's lock metrics were not delivered: nothing \
                 scraped http://{addr}/metrics before it ended (set OTEL_EXPORTER_OTLP_ENDPOINT \
                 to push them to a collector, or OTEL_METRICS_EXPORTER=none where no metrics \
                 are wanted)"
            );
        }
    }
}

/// The OTLP metrics exporter, keeping its last error: the SDK reports a failed final export
/// only as "Failed to shutdown".
struct ReportingExporter<E> {
    inner: E,
    last_error: Arc<Mutex<Option<String>>>,
}

impl<E: opentelemetry_sdk::metrics::exporter::PushMetricExporter>
    opentelemetry_sdk::metrics::exporter::PushMetricExporter for ReportingExporter<E>
{
    async fn export(
        &self,
        metrics: &opentelemetry_sdk::metrics::data::ResourceMetrics,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let r = self.inner.export(metrics).await;
        if let Err(e) = &r {
            if let Ok(mut last) = self.last_error.lock() {
                *last = Some(e.to_string());
            }
        }
        r
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> opentelemetry_sdk::metrics::Temporality {
        self.inner.temporality()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_busy_port_reads_as_a_sentence_under_question_mark_in_main() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = Telemetry::builder()
            .metrics_exporters(&[MetricsExporter::Prometheus])
            .prometheus_addr(addr)
            .traces(false)
            .tracing_subscriber(false)
            .set_global(false)
            .init()
            .unwrap_err();
        // `fn main() -> Result<(), Box<dyn Error>>` prints the error with `{:?}`.
        let shown = format!("{e:?}");
        assert!(
            shown.starts_with(&format!("cannot serve Prometheus metrics on {addr}: ")),
            "{shown}"
        );
        assert!(shown.contains("os error 98"), "{shown}");
        assert!(
            !shown.contains("Bind {") && !shown.contains("Os {"),
            "{shown}"
        );
        let boxed: Box<dyn std::error::Error> = Box::new(e);
        assert_eq!(format!("{boxed:?}"), shown);
    }

    #[test]
    fn durations_in_messages() {
        assert_eq!(secs_text(Duration::from_secs(2)), "2 s");
        assert_eq!(secs_text(Duration::from_millis(1500)), "1.5 s");
        assert_eq!(secs_text(Duration::from_millis(250)), "250 ms");
    }
}
