//! Helpers shared by lockmeter's test suites: an in-memory metrics pipeline, required external
//! tools (which fail the test under `CI=true` instead of skipping), child-process plumbing and a
//! small HTTP GET.
#![allow(missing_docs, clippy::unwrap_used, clippy::missing_panics_doc)]

pub mod servers;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};

/// An SDK meter provider exporting into memory, read on demand.
pub struct Recorder {
    exporter: InMemoryMetricExporter,
    provider: SdkMeterProvider,
    before_snapshot: Option<fn()>,
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
        Recorder {
            exporter,
            provider,
            before_snapshot: None,
        }
    }

    /// Calls `f` before every snapshot: pass `lockmeter::metrics::flush`, which publishes the
    /// counts lockmeter keeps in atomics (this crate cannot call it: a test's `lockmeter` is
    /// not the one a dependency of this crate would link).
    pub fn with_flush(mut self, f: fn()) -> Self {
        self.before_snapshot = Some(f);
        self
    }

    pub fn meter(&self) -> Meter {
        self.provider.meter("lockmeter")
    }

    /// Flushes and returns the newest cumulative export.
    pub fn snapshot(&self) -> Snapshot {
        if let Some(f) = self.before_snapshot {
            f();
        }
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
            Some(AggregatedMetrics::F64(MetricData::Histogram(h))) => {
                sets(h.data_points().map(|d| d.attributes()))
            }
            _ => vec![],
        }
    }
}

/// Fails when a required external tool is missing and `CI=true`; otherwise tells the caller to
/// skip (returns false) with a visible message.
pub fn require_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("required tool {tool} is not installed (CI=true: .ci/run must install it)");
        }
        eprintln!("SKIPPED: {tool} is not installed");
    }
    found
}

/// Runs `flock -n PATH true` (util-linux) and returns whether it got the lock.
pub fn flock_cli_can_lock(path: &Path) -> bool {
    let st = Command::new("flock")
        .arg("-n")
        .arg(path)
        .arg("true")
        .status()
        .expect("run flock(1)");
    match st.code() {
        Some(0) => true,
        Some(1) => false,
        other => panic!("flock(1) exited with {other:?}"),
    }
}

/// Starts `flock [-s] PATH sh -c 'echo locked; read _'` (util-linux) and returns once it holds
/// the lock; [`release_flock_holder`] lets it go.
pub fn flock_holder(path: &Path, shared: bool) -> Child {
    let mut c = Command::new("flock");
    if shared {
        c.arg("-s");
    }
    let mut c = c
        .arg(path)
        .args(["sh", "-c", "echo locked; read _"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run flock(1)");
    read_line_starting(&mut c, "locked");
    c
}

/// Lets a [`flock_holder`] go (a line on its stdin) and checks that it exited cleanly.
pub fn release_flock_holder(mut c: Child) {
    use std::io::Write as _;
    c.stdin
        .take()
        .expect("piped stdin")
        .write_all(b"\n")
        .expect("write to flock(1)");
    let st = c.wait().expect("wait for flock(1)");
    assert!(st.success(), "flock(1) holder exited with {st}");
}

/// Reads lines from a child's stdout until one starts with `prefix`; returns it.
pub fn read_line_starting(child: &mut Child, prefix: &str) -> String {
    let out = child.stdout.as_mut().expect("piped stdout");
    let mut r = BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        let n = r.read_line(&mut line).unwrap();
        assert!(n > 0, "child closed stdout before printing {prefix:?}");
        if line.starts_with(prefix) {
            return line.trim_end().to_owned();
        }
    }
}

/// Retries `f` until it returns true or 10 s pass.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// GET `url` and return the body (status must be 200).
pub fn http_get(url: &str) -> String {
    let mut resp = ureq::get(url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    resp.body_mut().read_to_string().unwrap()
}

/// GET with retries until it answers (a server that is still starting).
pub fn http_get_eventually(url: &str) -> String {
    let mut body = None;
    eventually(&format!("{url} to answer"), || {
        body = ureq::get(url)
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok());
        body.is_some()
    });
    body.unwrap_or_default()
}

/// Finds a free TCP port on 127.0.0.1 (bind to 0, read it, release it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs an instant PromQL query against a Prometheus server; returns the `data` object.
/// Panics when Prometheus rejects the expression, with the expression and the error.
pub fn prom_query(base: &str, expr: &str) -> serde_json::Value {
    let url = format!("{base}/api/v1/query");
    let mut resp = ureq::get(&url)
        .query("query", expr)
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap_or_else(|e| panic!("query {expr}: {e}"));
    let body: serde_json::Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap())
        .unwrap_or_else(|e| panic!("query {expr}: bad JSON: {e}"));
    assert_eq!(body["status"], "success", "invalid PromQL {expr}: {body}");
    body["data"].clone()
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

/// Two bindfs (FUSE) mounts `a` and `b` of one directory `src`, unmounted on drop. Plain mounts
/// are two lock domains; `--multithreaded --enable-lock-forwarding` makes them one.
pub struct Bindfs {
    /// Holds `src`, `a` and `b`.
    pub dir: tempfile::TempDir,
    mounts: Vec<std::path::PathBuf>,
}

impl Bindfs {
    /// Mounts `src` twice with `extra` bindfs options; `None` (skip) if bindfs is missing.
    pub fn new(extra: &[&str]) -> Option<Bindfs> {
        if !require_tool("bindfs") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let mut mounts = Vec::new();
        for name in ["a", "b"] {
            let mp = dir.path().join(name);
            std::fs::create_dir(&mp).unwrap();
            let st = Command::new("bindfs")
                .args(extra)
                .arg(&src)
                .arg(&mp)
                .status()
                .unwrap();
            assert!(st.success(), "bindfs failed");
            mounts.push(mp);
        }
        Some(Bindfs { dir, mounts })
    }
    /// The first mount.
    pub fn a(&self) -> std::path::PathBuf {
        self.mounts[0].clone()
    }

    /// The second mount.
    pub fn b(&self) -> std::path::PathBuf {
        self.mounts[1].clone()
    }
}

impl Drop for Bindfs {
    fn drop(&mut self) {
        for m in &self.mounts {
            let _ = Command::new("fusermount").arg("-u").arg(m).status();
        }
    }
}
