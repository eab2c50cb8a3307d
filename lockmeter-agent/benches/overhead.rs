//! The agent's overhead, measured side by side in one run (figures in the README):
//!
//! 1. a raw `flock` LOCK_EX + LOCK_UN loop with the tracepoint source attached vs detached,
//!    in interleaved rounds (target: attached ≤ 1.5× detached);
//! 2. the agent's own CPU (a child process running the whole agent: sampling every second,
//!    tracepoints, Prometheus exporter) while this process does 10,000 lock operations a
//!    second (target ≤ 5 % of one core), next to the same agent idle;
//! 3. the agent's resident memory with 10,000 distinct lock files held (target ≤ 50 MiB).
//!
//! `cargo bench -p lockmeter-agent --features ebpf --bench overhead [-- loop|agent]` (root:
//! the tracepoint source needs it). Without root the first part fails with the loader's
//! error. `LOCKMETER_RING_MIB=16` measures another ring size; the kernel side alone is
//! measured by rebuilding the BPF program with `LOCKMETER_BPF_CFLAGS=-DLOCKMETER_BPF_NOOP`
//! (the programs return at once: the tracepoint trampolines' cost) or
//! `-DLOCKMETER_BPF_DISCARD` (events staged, batches never sent: everything but the ring and
//! the reader).
#![allow(missing_docs, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write as _};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};

const CHILD_ENV: &str = "LOCKMETER_AGENT_BENCH_CHILD";

fn main() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child_agent();
        return;
    }
    // `cargo bench` passes --bench; `-- loop` or `-- agent` runs one part.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let part = |p: &str| only.is_empty() || only.iter().any(|o| o == p);
    println!("lockmeter-agent overhead (2-core VM figures are noisy when others compile)\n");
    if part("loop") {
        flock_loop_ratio();
    }
    if part("agent") {
        agent_cpu_and_rss();
    }
}

/// Runs the whole agent until stdin closes; prints `ready ADDR` first.
fn child_agent() {
    let telemetry = lockmeter::telemetry::Telemetry::builder()
        .service_name("lockmeter-agent-bench")
        .prometheus_addr("127.0.0.1:0".parse().unwrap())
        .tracing_subscriber(false)
        .metrics_exporters(&[lockmeter::telemetry::MetricsExporter::Prometheus])
        .init()
        .unwrap();
    let addr = telemetry.prometheus_addr().unwrap();
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::stdin().read_line(&mut s);
        drop(tx);
    });
    let meter = telemetry.meter();
    lockmeter_agent::run(
        lockmeter_agent::AgentConfig {
            ring_bytes: ring_bytes(),
            ..Default::default()
        },
        &meter,
        &rx,
        |active| {
            println!("ready {addr} {active:?}");
            let _ = std::io::stdout().flush();
        },
    )
    .unwrap();
}

fn lock_file(dir: &std::path::Path, name: &str) -> std::fs::File {
    std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(name))
        .unwrap()
}

#[inline(never)]
fn flock_round(f: &std::fs::File, n: u32) -> f64 {
    let fd = f.as_fd();
    let t = Instant::now();
    for _ in 0..n {
        flock(fd, FlockOperation::LockExclusive).unwrap();
        flock(fd, FlockOperation::Unlock).unwrap();
    }
    t.elapsed().as_nanos() as f64 / f64::from(n)
}

/// The ring size: `LOCKMETER_RING_MIB` or the agent's default.
fn ring_bytes() -> u32 {
    std::env::var("LOCKMETER_RING_MIB")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .map(|m| m << 20)
        .unwrap_or(lockmeter_agent::ebpf::DEFAULT_RING_BYTES)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn flock_loop_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let f = lock_file(dir.path(), "loop.lock");
    let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_reader(opentelemetry_sdk::metrics::ManualReader::builder().build())
        .build();
    let meter = opentelemetry::metrics::MeterProvider::meter(&provider, "lockmeter");
    let metrics = Arc::new(lockmeter_agent::metrics::AgentMetrics::new(&meter));
    const N: u32 = 100_000;
    const ROUNDS: usize = 15;
    flock_round(&f, N / 4); // warm up
    let (mut off, mut on, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut calls = 0;
    for _ in 0..ROUNDS {
        let a = flock_round(&f, N);
        let model = lockmeter_agent::tracepoints::TraceModel::new(
            metrics.clone(),
            lockmeter_agent::LabelRules::default(),
            500,
            "/proc",
        );
        let src = lockmeter_agent::ebpf::TracepointSource::start(model, ring_bytes())
            .expect("attach the tracepoint source (root needed)");
        let b = flock_round(&f, N);
        let stats = src.stop();
        calls += stats.calls;
        off.push(a);
        on.push(b);
        ratios.push(b / a);
    }
    let (off_m, on_m, r_m) = (median(&mut off), median(&mut on), median(&mut ratios));
    // The fastest round of each arm: what a round costs when nothing else ran on its CPU.
    let best = on[0] / off[0];
    println!(
        "1. raw flock LOCK_EX+LOCK_UN, {ROUNDS} interleaved rounds of {N} (ring {} MiB, drained every {:?}):",
        ring_bytes() >> 20,
        lockmeter_agent::ebpf::drain_every(ring_bytes())
    );
    println!(
        "   detached      {off_m:7.0} ns/op (median; rounds {:.0}..{:.0})",
        off[0],
        off[ROUNDS - 1]
    );
    println!(
        "   attached      {on_m:7.0} ns/op (median; rounds {:.0}..{:.0})",
        on[0],
        on[ROUNDS - 1]
    );
    println!(
        "   ratio         {r_m:7.2}x  (median of per-round ratios; range {:.2}..{:.2}x; target <= 1.5x, {})",
        ratios[0],
        ratios[ROUNDS - 1],
        if r_m <= 1.5 { "met" } else { "NOT met" }
    );
    println!(
        "   best rounds   {best:7.2}x  ({:.0} / {:.0} ns: the least disturbed round of each arm)",
        on[0], off[0]
    );
    println!(
        "   lock calls seen by the source: {calls} of {} ({})\n",
        u64::from(N) * ROUNDS as u64,
        if calls >= u64::from(N) * ROUNDS as u64 {
            "none lost"
        } else {
            "some lost"
        }
    );
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// "anon A, file F, shmem S MiB": the BPF ring buffer's pages, mapped into the agent, count
/// as shared memory once read.
fn rss_parts(pid: u32) -> String {
    let m = |f| status_kib(pid, f) as f64 / 1024.0;
    format!(
        "anon {:.1}, file {:.1}, shared {:.1} MiB",
        m("RssAnon:"),
        m("RssFile:"),
        m("RssShmem:")
    )
}

fn cpu_share(pid: u32, f: impl FnOnce()) -> f64 {
    let hz = procfs::ticks_per_second() as f64;
    let t0 = Instant::now();
    let c0 = cpu_ticks(pid);
    f();
    let c1 = cpu_ticks(pid);
    (c1 - c0) as f64 / hz / t0.elapsed().as_secs_f64()
}

fn agent_cpu_and_rss() {
    let mut child: Child = Command::new(std::env::current_exe().unwrap())
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("ready "), "agent child said {line:?}");
    let addr = line.split_whitespace().nth(1).unwrap().to_owned();
    println!(
        "2. agent CPU (child process, sources: {})",
        line.split_whitespace().nth(2).unwrap_or("?")
    );

    const SECS: u64 = 5;
    let idle = cpu_share(pid, || std::thread::sleep(Duration::from_secs(SECS)));
    println!(
        "   idle                        {:5.2} % of one core",
        idle * 100.0
    );

    // 10,000 lock operations (LOCK_EX + LOCK_UN) a second on 16 files, paced in 10 ms steps.
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<_> = (0..16)
        .map(|i| lock_file(dir.path(), &format!("busy-{i}.lock")))
        .collect();
    let mut done = 0u64;
    let busy = cpu_share(pid, || {
        let start = Instant::now();
        let mut step = 0u64;
        while start.elapsed() < Duration::from_secs(SECS) {
            for k in 0..100 {
                let f = &files[(k % 16) as usize];
                flock(f.as_fd(), FlockOperation::LockExclusive).unwrap();
                flock(f.as_fd(), FlockOperation::Unlock).unwrap();
            }
            done += 100;
            step += 1;
            let next = start + Duration::from_millis(10 * step);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    });
    let rate = done as f64 / SECS as f64;
    println!(
        "   at {rate:6.0} lock ops/s      {:5.2} % of one core (target <= 5 %, {})",
        busy * 100.0,
        if busy <= 0.05 { "met" } else { "NOT met" }
    );
    let rss_small = rss_kib(pid);
    let parts_small = rss_parts(pid);

    // 10,000 distinct lock files held by this process.
    let want = 10_000u64;
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let _ = rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(want + 1024),
            maximum: lim.maximum.map(|m| m.max(want + 1024)),
        },
    );
    let many = tempfile::tempdir().unwrap();
    let held: Vec<_> = (0..want)
        .map(|i| {
            let f = lock_file(many.path(), &format!("held-{i}.lock"));
            flock(f.as_fd(), FlockOperation::LockExclusive).unwrap();
            f
        })
        .collect();
    // Wait until the agent's scrape shows them all (plus whatever else the host holds).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body = ureq::get(&format!("http://{addr}/metrics"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .unwrap_or_default();
        let total: f64 = body
            .lines()
            .filter(|l| l.starts_with("lock_held{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if total >= want as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent never showed {want} held locks (saw {total})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let held_cpu = cpu_share(pid, || std::thread::sleep(Duration::from_secs(SECS)));
    let rss = rss_kib(pid);
    let parts = rss_parts(pid);
    println!(
        "   with {want} locks held       {:5.2} % of one core (a /proc/locks scan of {want} lines each second)",
        held_cpu * 100.0
    );
    println!("\n3. agent resident memory");
    println!(
        "   after the CPU runs          {:6.1} MiB ({parts_small})",
        rss_small as f64 / 1024.0
    );
    println!(
        "   with {want} lock files held {:6.1} MiB ({parts}; target <= 50 MiB, {})",
        rss as f64 / 1024.0,
        if rss <= 50 * 1024 { "met" } else { "NOT met" }
    );
    drop(held);
    drop(child.stdin.take());
    let _ = child.wait();
}
