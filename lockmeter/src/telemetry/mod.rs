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
//! | `OTEL_EXPORTER_PROMETHEUS_HOST` | listen address | `127.0.0.1` |
//! | `OTEL_EXPORTER_PROMETHEUS_PORT` | listen port | `9464` |
//!
//! Recording never waits on the network: OTLP is pushed from the SDK's reader thread, so an
//! unreachable collector costs the lock path nothing (failed exports are logged by the SDK).
//! A busy Prometheus port is an error from [`TelemetryBuilder::init`].

mod config;
mod serve;

use std::net::SocketAddr;
use std::time::Duration;

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
    env_set, otlp_protocol, parse_metrics_exporters, parse_traces_exporter, program_name,
    prometheus_addr_from_env,
};
pub use config::{otlp_metrics_endpoint_set, MetricsExporter, OtlpProtocol};
use serve::BackgroundRuntime;

/// Errors from setting telemetry up.
#[derive(Debug, thiserror::Error)]
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
    #[error("could not deliver telemetry at {stage}: {message} (is the collector at OTEL_EXPORTER_OTLP_ENDPOINT reachable?)")]
    Flush {
        /// `flush` or `shutdown`.
        stage: &'static str,
        /// The SDK's error.
        message: String,
    },
    /// The background runtime could not be started.
    #[error("cannot start the telemetry runtime: {0}")]
    Runtime(std::io::Error),
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
    boundaries: Vec<f64>,
    tracing_subscriber: bool,
    compact_console: bool,
    log_filter: String,
    set_global: bool,
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
            boundaries: DEFAULT_BOUNDARIES.to_vec(),
            tracing_subscriber: true,
            compact_console: false,
            log_filter: "warn".to_owned(),
            set_global: true,
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

    /// Make the meter (and tracer) provider global (default `true`), so that locks created
    /// without an explicit meter record into it.
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
                rt.serve_prometheus(listener, registry.clone())?;
            }
            prom_registry = Some(registry);
            prometheus = Some(local);
        }

        if metrics_exporters.contains(&MetricsExporter::Otlp) {
            let _enter = runtime.as_ref().map(|rt| rt.handle.enter());
            let exporter = match protocol {
                OtlpProtocol::Grpc => opentelemetry_otlp::MetricExporter::builder()
                    .with_tonic()
                    .build(),
                OtlpProtocol::HttpProtobuf => opentelemetry_otlp::MetricExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .build(),
            }
            .map_err(|e| TelemetryError::Exporter {
                what: "OTLP metrics",
                message: e.to_string(),
            })?;
            let mut reader = opentelemetry_sdk::metrics::PeriodicReader::builder(exporter);
            if let Some(i) = self.export_interval {
                reader = reader.with_interval(i);
            }
            mp = mp.with_reader(reader.build());
        }
        let meter_provider = mp.build();

        let tracer_provider = if traces {
            let _enter = runtime.as_ref().map(|rt| rt.handle.enter());
            let exporter = match protocol {
                OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .build(),
                OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .build(),
            }
            .map_err(|e| TelemetryError::Exporter {
                what: "OTLP traces",
                message: e.to_string(),
            })?;
            Some(
                SdkTracerProvider::builder()
                    .with_resource(resource)
                    .with_batch_exporter(exporter)
                    .build(),
            )
        } else {
            None
        };

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

        Ok(Telemetry {
            sink,
            meter_provider,
            tracer_provider,
            prometheus,
            registry: prom_registry,
            metrics_exporters,
            protocol: needs_otlp.then_some(protocol),
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
    tracing_installed: bool,
    runtime: Option<BackgroundRuntime>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("metrics_exporters", &self.metrics_exporters)
            .field("prometheus", &self.prometheus)
            .field("otlp_protocol", &self.protocol)
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
    /// (the demo's summary table does).
    pub fn prometheus_registry(&self) -> Option<&prometheus::Registry> {
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

    /// Pushes pending metrics and spans now (for short-lived programs).
    pub fn flush(&self) -> Result<(), TelemetryError> {
        let m = self.meter_provider.force_flush();
        let t = self
            .tracer_provider
            .as_ref()
            .map(|tp| tp.force_flush())
            .unwrap_or(Ok(()));
        m.and(t).map_err(|e| TelemetryError::Flush {
            stage: "flush",
            message: e.to_string(),
        })
    }

    /// Flushes and shuts down, returning the first error (dropping does the same and logs it).
    pub fn shutdown(mut self) -> Result<(), TelemetryError> {
        self.shutdown_inner()
    }

    fn shutdown_inner(&mut self) -> Result<(), TelemetryError> {
        let t = match self.tracer_provider.take() {
            Some(tp) => tp.shutdown(),
            None => Ok(()),
        };
        let m = self.meter_provider.shutdown();
        // Stop the server and the runtime only after the final export went out through it.
        drop(self.runtime.take());
        match (m, t) {
            (Ok(()), Ok(())) => Ok(()),
            // Already shut down (explicit `shutdown` then drop) is not an error.
            (Err(opentelemetry_sdk::error::OTelSdkError::AlreadyShutdown), Ok(())) => Ok(()),
            (Err(e), _) | (_, Err(e)) => Err(TelemetryError::Flush {
                stage: "shutdown",
                message: e.to_string(),
            }),
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown_inner() {
            // The subscriber may be gone at exit; make sure the message is seen.
            eprintln!("lockmeter: telemetry shutdown: {e}");
        }
    }
}
