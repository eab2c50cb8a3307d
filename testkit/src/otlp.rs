//! An OTLP receiver that is not ours: `rotel-agent` (pip package `rotel`) listening on gRPC
//! and HTTP, dumping what it receives in the collector's debug-exporter format, and a parser
//! for that dump ([`parse_debug_dump`]).
//!
//! Callers require the tool first (`require_tool("rotel-agent")`).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use crate::http::{free_port, listening};
use crate::proc::{until_up, KillOnDrop};
use crate::tools;

/// `rotel-agent` on two free loopback ports (OTLP gRPC and HTTP), exporting nowhere and logging
/// every metric and span in detail to a file; killed on drop.
pub struct Rotel {
    /// The OTLP/gRPC port.
    pub grpc: u16,
    /// The OTLP/HTTP port.
    pub http: u16,
    log: PathBuf,
    _agent: KillOnDrop,
    _dir: tempfile::TempDir,
}

impl Rotel {
    /// Starts the agent and returns once both ports accept connections.
    pub fn start() -> Rotel {
        Rotel::start_on(free_port(), free_port())
    }

    /// Starts the agent on the given loopback ports (a collector coming back where a process
    /// was already sending) and returns once both accept connections.
    pub fn start_on(grpc: u16, http: u16) -> Rotel {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("rotel.out");
        let agent = tools::command("rotel-agent")
            .args(["start", "--exporter", "blackhole"])
            .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc}")])
            .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http}")])
            .args(["--debug-log", "metrics", "--debug-log", "traces"])
            .args(["--debug-log-verbosity", "detailed"])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut agent = KillOnDrop(agent);
        until_up(
            &mut agent,
            "rotel-agent to listen",
            Duration::from_secs(30),
            Some(&log),
            || listening(grpc) && listening(http),
        );
        Rotel {
            grpc,
            http,
            log,
            _agent: agent,
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT` for `OTEL_EXPORTER_OTLP_ENDPOINT`: the gRPC port for `grpc`,
    /// the HTTP port for `http/protobuf`.
    pub fn endpoint(&self, protocol: &str) -> String {
        let port = match protocol {
            "grpc" => self.grpc,
            "http/protobuf" => self.http,
            other => panic!("unknown OTLP protocol {other}"),
        };
        format!("http://127.0.0.1:{port}")
    }

    /// Everything received so far, parsed.
    pub fn dump(&self) -> (Vec<DebugMetric>, Vec<DebugSpan>) {
        parse_debug_dump(&std::fs::read_to_string(&self.log).unwrap())
    }
}

/// One metric data point as printed by a collector debug exporter (`--debug-log-verbosity
/// detailed`, as rotel-agent and otelcol's `debug` exporter print them).
#[derive(Debug, Default, Clone)]
pub struct DebugPoint {
    pub attrs: std::collections::BTreeMap<String, String>,
    pub count: Option<u64>,
    pub value: Option<f64>,
    pub bounds: Vec<f64>,
}

/// One metric from a debug-exporter dump.
#[derive(Debug, Default, Clone)]
pub struct DebugMetric {
    pub service: String,
    pub scope: String,
    pub name: String,
    pub unit: String,
    pub data_type: String,
    pub points: Vec<DebugPoint>,
}

/// One span from a debug-exporter dump.
#[derive(Debug, Default, Clone)]
pub struct DebugSpan {
    pub service: String,
    pub scope: String,
    pub name: String,
    pub attrs: std::collections::BTreeMap<String, String>,
}

/// Parses a debug-exporter dump into metrics and spans.
pub fn parse_debug_dump(text: &str) -> (Vec<DebugMetric>, Vec<DebugSpan>) {
    #[derive(PartialEq)]
    enum Ctx {
        None,
        Resource,
        Descriptor,
        Point,
        Span,
    }
    fn attr(line: &str) -> Option<(String, String)> {
        let rest = line.trim().strip_prefix("-> ")?;
        let (k, v) = rest.split_once(": ")?;
        let v = match v.find('(') {
            Some(i) if v.ends_with(')') => &v[i + 1..v.len() - 1],
            _ => v,
        };
        Some((k.to_owned(), v.to_owned()))
    }
    let (mut metrics, mut spans) = (Vec::<DebugMetric>::new(), Vec::<DebugSpan>::new());
    let (mut service, mut scope, mut ctx) = (String::new(), String::new(), Ctx::None);
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("ResourceMetrics #") || t.starts_with("ResourceSpans #") {
            service.clear();
            ctx = Ctx::None;
        } else if t == "Resource attributes:" {
            ctx = Ctx::Resource;
        } else if let Some(s) = t.strip_prefix("InstrumentationScope ") {
            scope = s.split_whitespace().next().unwrap_or("").to_owned();
        } else if t.starts_with("Metric #") {
            metrics.push(DebugMetric {
                service: service.clone(),
                scope: scope.clone(),
                ..Default::default()
            });
            ctx = Ctx::None;
        } else if t == "Descriptor:" {
            ctx = Ctx::Descriptor;
        } else if t.starts_with("HistogramDataPoints #") || t.starts_with("NumberDataPoints #") {
            if let Some(m) = metrics.last_mut() {
                m.points.push(DebugPoint::default());
            }
            ctx = Ctx::Point;
        } else if t.starts_with("Span #") {
            spans.push(DebugSpan {
                service: service.clone(),
                scope: scope.clone(),
                ..Default::default()
            });
            ctx = Ctx::Span;
        } else if let Some(n) = t.strip_prefix("Name").filter(|_| ctx == Ctx::Span) {
            if let (Some(s), Some((_, v))) = (spans.last_mut(), n.split_once(": ")) {
                s.name = v.trim().to_owned();
            }
        } else if let Some((k, v)) = attr(t) {
            match ctx {
                Ctx::Resource if k == "service.name" => service = v,
                Ctx::Descriptor => {
                    if let Some(m) = metrics.last_mut() {
                        match k.as_str() {
                            "Name" => m.name = v,
                            "Unit" => m.unit = v,
                            "DataType" => m.data_type = v,
                            _ => {}
                        }
                    }
                }
                Ctx::Point => {
                    if let Some(p) = metrics.last_mut().and_then(|m| m.points.last_mut()) {
                        p.attrs.insert(k, v);
                    }
                }
                Ctx::Span => {
                    if let Some(s) = spans.last_mut() {
                        s.attrs.insert(k, v);
                    }
                }
                _ => {}
            }
        } else if ctx == Ctx::Point {
            let p = metrics.last_mut().and_then(|m| m.points.last_mut());
            if let Some(p) = p {
                if let Some(v) = t.strip_prefix("Count: ") {
                    p.count = v.parse().ok();
                } else if let Some(v) = t.strip_prefix("Value: ") {
                    p.value = v.parse().ok();
                } else if t.starts_with("ExplicitBounds #") {
                    if let Some(v) = t.split_once(": ").and_then(|(_, v)| v.parse().ok()) {
                        p.bounds.push(v);
                    }
                }
            }
        }
    }
    (metrics, spans)
}
