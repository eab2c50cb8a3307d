//! A dead or hung collector for a long time: does a process that keeps locking keep its lock
//! latency and bounded memory, and does it recover when the collector comes back?
//!
//! ```text
//! cargo run --release -p lockmeter-bench --bin collector -- [--seconds 60] [--protocol grpc]
//! ```
//!
//! Launches itself once per scenario: three rounds of `none`, `refused`, `hung` (a third of
//! `--seconds` each, so drifting load on a shared machine weighs on all alike), then `recover`
//! for `--seconds`:
//!
//! | scenario | OTLP endpoint |
//! |---|---|
//! | `none` | no exporter (`OTEL_METRICS_EXPORTER=none`): the baseline |
//! | `refused` | a loopback port nothing listens on: every export is refused |
//! | `hung` | a listener that accepts and never answers: every export waits for its timeout |
//! | `recover` | refused for the first third, then rotel-agent starts on that port |
//!
//! Each child locks and unlocks 64 `flock` locks on tmpfs in batches of 1000, timing every
//! batch, while exporting every 500 ms; it samples its resident memory every second. The parent
//! prints each scenario's median batch cost per lock + unlock per round, its ratio to `none`
//! in the same round, the worst p99, the CPU the process's other threads (SDK reader, exporter
//! client) used per second, and
//! resident memory at the start (after 2 s), its maximum and at the end, then checks: memory
//! grew by less than 32 MiB, and after `recover` the receiver holds every acquisition the child
//! counted (cumulative counters: the live period's counts all arrive with the first export that
//! gets through). Exits 1 if a check fails. Needs `rotel-agent` (pip package rotel).
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use lockmeter::FileLock;

const LOCKS: usize = 64;
const BATCH: u32 = 1000;
const RSS_GROWTH_LIMIT_KB: u64 = 32 * 1024;

fn rss_kb() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * rustix::param::page_size() as u64 / 1024
}

/// CPU time of every thread of this process but the main one, in milliseconds.
fn other_threads_cpu_ms() -> u64 {
    let me = std::process::id().to_string();
    let tick = 1000 / rustix::param::clock_ticks_per_second();
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| {
            let t = t.ok()?;
            if t.file_name().to_string_lossy() == me {
                return None;
            }
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            let f: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
            Some((f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?) * tick)
        })
        .sum()
}

/// The workload, in a child: prints `result ...`.
fn child(seconds: u64) {
    let telemetry = lockmeter::telemetry::Telemetry::builder()
        .service_name("collector-bench")
        .tracing_subscriber(false)
        .init()
        .unwrap();
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let locks: Vec<FileLock> = (0..LOCKS)
        .map(|i| {
            FileLock::builder(dir.path().join(format!("l{i}")))
                .name(format!("bench-{i}"))
                .open()
                .unwrap()
        })
        .collect();
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    // Batch costs in 10 ns buckets: a fixed 32 KiB, so the measurement itself does not grow
    // with the run (a list of every batch did, by ~7 kB/s).
    let mut hist = vec![0u64; 4096];
    let mut rss = Vec::with_capacity(seconds as usize + 2);
    let mut next_sample = start;
    let mut n: u64 = 0;
    while Instant::now() < end {
        let t = Instant::now();
        for i in 0..BATCH {
            let g = locks[(i as usize) % LOCKS].lock().unwrap();
            drop(g);
        }
        n += u64::from(BATCH);
        let ns = t.elapsed().as_nanos() as u64 / u64::from(BATCH);
        hist[(ns / 10).min(4095) as usize] += 1;
        if Instant::now() >= next_sample {
            rss.push((start.elapsed().as_secs(), rss_kb()));
            next_sample += Duration::from_secs(1);
        }
    }
    // The first two seconds warm up (the exporter's first connection attempts, allocations).
    let warm = rss.iter().find(|(s, _)| *s >= 2).map_or(rss[0].1, |r| r.1);
    let max = rss.iter().map(|r| r.1).max().unwrap();
    let last = rss.last().unwrap().1;
    let batches: u64 = hist.iter().sum();
    let p = |q: f64| {
        let want = (batches as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (i, c) in hist.iter().enumerate() {
            seen += c;
            if seen >= want.max(1) {
                return i as f64 * 10.0 + 5.0;
            }
        }
        40960.0
    };
    // CPU the process's other threads (the SDK's reader, the exporter's client) used: what a
    // dead or hung collector could take from the locking thread on a busy machine.
    let others_ms = other_threads_cpu_ms();
    println!(
        "result median_ns={:.0} p99_ns={:.0} rss_start_kb={warm} rss_max_kb={max} rss_end_kb={last} acquisitions={n} others_cpu_ms={others_ms}",
        p(0.5),
        p(0.99)
    );
    let curve: Vec<String> = rss.iter().map(|(s, kb)| format!("{s}s:{kb}")).collect();
    println!("rss_kb {}", curve.join(" "));
    drop(locks);
    // Shutdown flushes within OTEL_EXPORTER_OTLP_TIMEOUT; a dead collector makes that an error.
    if let Err(e) = telemetry.shutdown() {
        eprintln!("collector bench: shutdown: {e}");
    }
}

struct Result {
    median: f64,
    p99: f64,
    rss: [u64; 3],
    acquisitions: u64,
    others_cpu_ms: u64,
    seconds: u64,
    curve: String,
}

fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .parse()
        .unwrap()
}

fn run(
    seconds: u64,
    env: &[(&str, String)],
    during: impl FnOnce(&mut std::process::Child),
) -> Result {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--child", &seconds.to_string()])
        .env("OTEL_METRIC_EXPORT_INTERVAL", "500")
        .env("OTEL_EXPORTER_OTLP_TIMEOUT", "2000")
        .env_remove("OTEL_METRICS_EXPORTER")
        .stdout(std::process::Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    during(&mut child);
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(child.wait().unwrap().success(), "child failed: {out}");
    let line = out.lines().find(|l| l.starts_with("result ")).unwrap();
    Result {
        median: field(line, "median_ns"),
        p99: field(line, "p99_ns"),
        rss: [
            field(line, "rss_start_kb") as u64,
            field(line, "rss_max_kb") as u64,
            field(line, "rss_end_kb") as u64,
        ],
        acquisitions: field(line, "acquisitions") as u64,
        others_cpu_ms: field(line, "others_cpu_ms") as u64,
        seconds,
        curve: out
            .lines()
            .find_map(|l| l.strip_prefix("rss_kb "))
            .unwrap_or("")
            .to_owned(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        child(args[2].parse().unwrap());
        return;
    }
    let mut seconds = 60;
    let mut protocol = "http/protobuf".to_owned();
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => seconds = it.next().unwrap().parse().unwrap(),
            "--protocol" => protocol = it.next().unwrap().clone(),
            other => {
                panic!("unknown argument {other} (--seconds N, --protocol grpc|http/protobuf)")
            }
        }
    }
    if !lockmeter_testkit::require_tool("rotel-agent") {
        return;
    }
    let otlp = |port: u16| {
        vec![
            ("OTEL_METRICS_EXPORTER", "otlp".to_owned()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.clone()),
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{port}"),
            ),
        ]
    };
    let none = vec![("OTEL_METRICS_EXPORTER", "none".to_owned())];
    // Accepts every connection and keeps it, answering nothing.
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_port = hung.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        for s in hung.incoming() {
            kept.push(s);
        }
    });
    // Side by side: rounds of none / refused / hung, each a third of `seconds`, so a machine
    // whose load drifts (other builds) weighs on every scenario alike; ratios are per round.
    let rounds = 3;
    let per = (seconds / rounds).max(2);
    let mut by: BTreeMap<&str, Vec<Result>> = BTreeMap::new();
    for _ in 0..rounds {
        by.entry("none").or_default().push(run(per, &none, |_| {}));
        let refused = otlp(lockmeter_testkit::free_port());
        by.entry("refused")
            .or_default()
            .push(run(per, &refused, |_| {}));
        by.entry("hung")
            .or_default()
            .push(run(per, &otlp(hung_port), |_| {}));
    }
    let ratios = |name: &str| -> Vec<f64> {
        by[name]
            .iter()
            .zip(&by["none"])
            .map(|(r, n)| r.median / n.median)
            .collect()
    };

    let (grpc, http) = (
        lockmeter_testkit::free_port(),
        lockmeter_testkit::free_port(),
    );
    let port = if protocol == "grpc" { grpc } else { http };
    let mut rotel = None;
    let recover = run(seconds, &otlp(port), |_| {
        std::thread::sleep(Duration::from_secs(seconds / 3));
        rotel = Some(lockmeter_testkit::Rotel::start_on(grpc, http));
    });
    let rotel = rotel.unwrap();
    // Cumulative sums: the latest value of each series is its total.
    let mut latest = BTreeMap::new();
    for m in rotel
        .dump()
        .0
        .iter()
        .filter(|m| m.name == "lock.acquisitions")
    {
        for p in &m.points {
            let key = format!("{:?}", p.attrs);
            let v = p.value.unwrap_or(0.0) as u64;
            let e = latest.entry(key).or_insert(0);
            *e = (*e).max(v);
        }
    }
    let received: u64 = latest.values().sum();
    let tally = recover.acquisitions;

    println!(
        "collector bench: {rounds} rounds of {per} s per scenario, then recover for {seconds} s; \
         OTLP {protocol}, export every 500 ms, timeout 2 s"
    );
    println!(
        "{:<9} {:>20} {:>24} {:>8} {:>22} {:>14}",
        "scenario",
        "median ns by round",
        "ratio to none by round",
        "p99 ns",
        "rss min/max/end kB",
        "other cpu ms/s"
    );
    let mut ok = true;
    let mut show = |name: &str, rs: &[Result], ratio: Option<Vec<f64>>| {
        let medians: Vec<String> = rs.iter().map(|r| format!("{:.0}", r.median)).collect();
        let ratio = ratio.map_or("-".to_owned(), |v| {
            v.iter()
                .map(|x| format!("{x:.2}x"))
                .collect::<Vec<_>>()
                .join(" ")
        });
        let p99 = rs.iter().map(|r| r.p99).fold(0.0, f64::max);
        let rss = format!(
            "{}/{}/{}",
            rs.iter().map(|r| r.rss[0]).min().unwrap(),
            rs.iter().map(|r| r.rss[1]).max().unwrap(),
            rs.last().unwrap().rss[2]
        );
        // CPU the exporter's and the SDK's threads used, per second of run.
        let cpu: Vec<String> = rs
            .iter()
            .map(|r| format!("{:.1}", r.others_cpu_ms as f64 / r.seconds as f64))
            .collect();
        println!(
            "{name:<9} {:>20} {:>24} {p99:>8.0} {rss:>22} {:>14}",
            medians.join(" "),
            ratio,
            cpu.join(" ")
        );
        for r in rs {
            if r.rss[1].saturating_sub(r.rss[0]) > RSS_GROWTH_LIMIT_KB {
                println!(
                    "  FAIL {name}: resident memory grew by more than {RSS_GROWTH_LIMIT_KB} kB: {}",
                    r.curve
                );
                ok = false;
            }
        }
    };
    show("none", &by["none"], None);
    show("refused", &by["refused"], Some(ratios("refused")));
    show("hung", &by["hung"], Some(ratios("hung")));
    show("recover", std::slice::from_ref(&recover), None);
    println!("rss curve recover: {}", recover.curve);
    println!(
        "rss curve hung (last round): {}",
        by["hung"].last().unwrap().curve
    );
    println!("recover: the workload counted {tally} acquisitions; the receiver got {received}");
    if received != tally {
        println!("  FAIL recover: counts lost after the collector came back");
        ok = false;
    }
    if !ok {
        std::process::exit(1);
    }
}
