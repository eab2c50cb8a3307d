//! Configuration from the standard `OTEL_*` variables (see the [module docs](super)).

use std::net::{IpAddr, SocketAddr};

use super::TelemetryError;

/// A metrics exporter selectable through `OTEL_METRICS_EXPORTER`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsExporter {
    /// Serve `/metrics` for Prometheus to scrape.
    Prometheus,
    /// Push OTLP to a collector.
    Otlp,
}

/// OTLP transport (`OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// gRPC (port 4317 by convention).
    Grpc,
    /// HTTP with protobuf bodies (port 4318 by convention).
    HttpProtobuf,
}

impl OtlpProtocol {
    /// The `OTEL_EXPORTER_OTLP_PROTOCOL` value: `grpc` or `http/protobuf`.
    pub fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::HttpProtobuf => "http/protobuf",
        }
    }
}

impl std::fmt::Display for OtlpProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An OTLP signal, for its per-signal variables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Signal {
    Metrics,
    Traces,
}

impl Signal {
    fn var(self, suffix: &str) -> String {
        let s = match self {
            Signal::Metrics => "METRICS",
            Signal::Traces => "TRACES",
        };
        format!("OTEL_EXPORTER_OTLP_{s}_{suffix}")
    }

    fn http_path(self) -> &'static str {
        match self {
            Signal::Metrics => "/v1/metrics",
            Signal::Traces => "/v1/traces",
        }
    }
}

/// The endpoint a signal is sent to, resolved as the OTLP exporter resolves it (and then
/// handed to it, so that messages name exactly what was tried): the per-signal variable as
/// given; else `OTEL_EXPORTER_OTLP_ENDPOINT`, plus `/v1/metrics` or `/v1/traces` over HTTP;
/// else `http://localhost:4317` (gRPC) or `http://localhost:4318/v1/…` (HTTP).
pub(super) fn otlp_endpoint(signal: Signal, protocol: OtlpProtocol) -> String {
    let nonempty = |v: &str| std::env::var(v).ok().filter(|s| !s.trim().is_empty());
    if let Some(e) = nonempty(&signal.var("ENDPOINT")) {
        return e;
    }
    let base = nonempty("OTEL_EXPORTER_OTLP_ENDPOINT");
    match protocol {
        OtlpProtocol::Grpc => base.unwrap_or_else(|| "http://localhost:4317".to_owned()),
        OtlpProtocol::HttpProtobuf => {
            let base = base.unwrap_or_else(|| "http://localhost:4318".to_owned());
            format!("{}{}", base.trim_end_matches('/'), signal.http_path())
        }
    }
}

/// `OTEL_EXPORTER_OTLP_{METRICS,TRACES}_TIMEOUT`, else `OTEL_EXPORTER_OTLP_TIMEOUT`
/// (milliseconds), if set.
pub(super) fn otlp_timeout_from_env(
    signal: Signal,
) -> Result<Option<std::time::Duration>, TelemetryError> {
    let specific = signal.var("TIMEOUT");
    for (var, name) in [
        (specific.as_str(), None),
        (
            "OTEL_EXPORTER_OTLP_TIMEOUT",
            Some("OTEL_EXPORTER_OTLP_TIMEOUT"),
        ),
    ] {
        let Ok(v) = std::env::var(var) else { continue };
        if v.trim().is_empty() {
            continue;
        }
        return match v.trim().parse::<u64>() {
            Ok(ms) => Ok(Some(std::time::Duration::from_millis(ms))),
            Err(_) => Err(TelemetryError::BadVariable {
                var: name.unwrap_or(match signal {
                    Signal::Metrics => "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT",
                    Signal::Traces => "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
                }),
                value: v,
                reason: "expected a whole number of milliseconds",
            }),
        };
    }
    Ok(None)
}

pub(super) fn program_name() -> String {
    std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "lockmeter".to_owned())
}

/// Whether an OTLP metrics endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`, non-empty): the condition under which the default
/// exporters include OTLP.
pub fn otlp_metrics_endpoint_set() -> bool {
    env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
}

pub(super) fn env_set(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.is_empty())
}

pub(super) fn parse_metrics_exporters(v: &str) -> Result<Vec<MetricsExporter>, TelemetryError> {
    let mut out = Vec::new();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "prometheus" => out.push(MetricsExporter::Prometheus),
            "otlp" => out.push(MetricsExporter::Otlp),
            "none" => {}
            _ => {
                return Err(TelemetryError::BadVariable {
                    var: "OTEL_METRICS_EXPORTER",
                    value: v.to_owned(),
                    reason: "expected a comma-separated list of prometheus, otlp, none",
                })
            }
        }
    }
    Ok(out)
}

pub(super) fn parse_traces_exporter(v: &str) -> Result<bool, TelemetryError> {
    let mut on = false;
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "otlp" => on = true,
            "none" => {}
            _ => {
                return Err(TelemetryError::BadVariable {
                    var: "OTEL_TRACES_EXPORTER",
                    value: v.to_owned(),
                    reason: "expected otlp or none",
                })
            }
        }
    }
    Ok(on)
}

pub(super) fn otlp_protocol() -> Result<OtlpProtocol, TelemetryError> {
    match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL") {
        Err(_) => Ok(OtlpProtocol::HttpProtobuf),
        Ok(v) => match v.trim() {
            "" | "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
            "grpc" => Ok(OtlpProtocol::Grpc),
            _ => Err(TelemetryError::BadVariable {
                var: "OTEL_EXPORTER_OTLP_PROTOCOL",
                value: v,
                reason: "expected grpc or http/protobuf",
            }),
        },
    }
}

pub(super) fn prometheus_addr_from_env() -> Result<SocketAddr, TelemetryError> {
    let host = std::env::var("OTEL_EXPORTER_PROMETHEUS_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "127.0.0.1".to_owned());
    let ip: IpAddr = match host.as_str() {
        "localhost" => IpAddr::from([127, 0, 0, 1]),
        h => h
            .trim_matches(|c| c == '[' || c == ']')
            .parse()
            .map_err(|_| TelemetryError::BadVariable {
                var: "OTEL_EXPORTER_PROMETHEUS_HOST",
                value: host.clone(),
                reason: "expected an IP address or localhost",
            })?,
    };
    let port = match std::env::var("OTEL_EXPORTER_PROMETHEUS_PORT") {
        Ok(p) if !p.is_empty() => p.parse().map_err(|_| TelemetryError::BadVariable {
            var: "OTEL_EXPORTER_PROMETHEUS_PORT",
            value: p.clone(),
            reason: "expected a port number 0-65535",
        })?,
        _ => 9464,
    };
    Ok(SocketAddr::new(ip, port))
}
