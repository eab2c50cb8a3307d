//! `lockmeter demo`: real kernel contention on a few lock files, served on `/metrics`, with a
//! live summary table read from the same registry Prometheus scrapes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use lockmeter::telemetry::Telemetry;
use lockmeter::{FileLock, LockKind};

mod summary;
use summary::{print_table, Snapshot};

/// Arguments of `lockmeter demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Worker threads; each opens its own descriptors, so they contend in the kernel.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: u16,
    /// Stop after SECS seconds (default: run until Ctrl-C).
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Directory for the lock files (default: a fresh temporary directory, removed at exit).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Address to serve /metrics on (default: OTEL_EXPORTER_PROMETHEUS_HOST:PORT, else
    /// 127.0.0.1:9464). Port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Seconds between summary tables.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    interval: f64,
}

/// One lock file of the demo and how workers use it.
struct Scenario {
    name: &'static str,
    file: &'static str,
    kind: LockKind,
    /// Share of operations on this lock (weights).
    weight: u32,
    /// Probability of a shared acquire.
    shared: f64,
    /// Hold time range, microseconds.
    hold_us: (u64, u64),
    /// How the acquire is made.
    how: How,
}

#[derive(Clone, Copy)]
enum How {
    Blocking,
    /// `try_lock` first; on conflict wait with a timeout.
    TryThenTimeout(Duration),
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "orders",
        file: "orders.lock",
        kind: LockKind::Flock,
        weight: 5,
        shared: 0.0,
        hold_us: (200, 2_000),
        how: How::Blocking,
    },
    Scenario {
        name: "inventory",
        file: "inventory.lock",
        kind: LockKind::Ofd,
        weight: 4,
        shared: 0.8,
        hold_us: (500, 5_000),
        how: How::Blocking,
    },
    Scenario {
        name: "reports",
        file: "reports.lock",
        kind: LockKind::Posix,
        weight: 1,
        shared: 0.0,
        hold_us: (10_000, 60_000),
        how: How::TryThenTimeout(Duration::from_millis(20)),
    },
    Scenario {
        name: "rotating",
        file: "rotating.lock",
        kind: LockKind::Flock,
        weight: 2,
        shared: 0.0,
        hold_us: (1_000, 8_000),
        how: How::Blocking,
    },
];

/// Runs the demo.
pub fn run(args: DemoArgs) -> ExitCode {
    match demo(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("lockmeter demo: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn demo(args: DemoArgs) -> Result<(), String> {
    if !(args.interval.is_finite() && args.interval > 0.0) {
        return Err(format!(
            "--interval {} must be a positive number",
            args.interval
        ));
    }
    let duration = match args.duration {
        Some(d) if d.is_finite() && d > 0.0 => Some(Duration::from_secs_f64(d)),
        Some(d) => {
            return Err(format!(
                "--duration {d} must be a positive number of seconds"
            ))
        }
        None => None,
    };
    // The builder's default exporters: Prometheus, plus OTLP when an endpoint is configured.
    let mut tb = Telemetry::builder()
        .service_name("lockmeter-demo")
        // Migrations are the point of the `rotating` lock; the table counts them. RUST_LOG=warn
        // shows each one as it happens.
        .default_log_filter("error");
    if let Some(addr) = args.listen {
        tb = tb.prometheus_addr(addr);
    }
    let telemetry = tb.init().map_err(|e| e.to_string())?;

    let (dir, _tmp) = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
            (d.clone(), None)
        }
        None => {
            let t = TempDir::new()?;
            (t.0.clone(), Some(t))
        }
    };

    match telemetry.prometheus_addr() {
        Some(addr) => println!("lockmeter demo: serving metrics on http://{addr}/metrics"),
        None => println!("lockmeter demo: Prometheus endpoint disabled by OTEL_METRICS_EXPORTER"),
    }
    println!(
        "lockmeter demo: {} workers contending on {} lock files in {}; {}",
        args.workers,
        SCENARIOS.len(),
        dir.display(),
        match duration {
            Some(d) => format!("stopping after {:.0?}", d),
            None => "Ctrl-C to stop".to_owned(),
        }
    );

    let stop = Arc::new(AtomicBool::new(false));
    let cache = Arc::new(lockmeter::sync::Mutex::named(
        "demo-cache",
        Vec::<u64>::new(),
    ));
    let mut threads = Vec::new();
    for w in 0..args.workers {
        let stop = Arc::clone(&stop);
        let dir = dir.clone();
        let cache = Arc::clone(&cache);
        let t = std::thread::Builder::new()
            .name(format!("demo-worker-{w}"))
            .spawn(move || worker(w as u64, &dir, &cache, &stop))
            .map_err(|e| format!("cannot start worker: {e}"))?;
        threads.push(t);
    }
    {
        let stop = Arc::clone(&stop);
        let dir = dir.clone();
        let t = std::thread::Builder::new()
            .name("demo-janitor".into())
            .spawn(move || janitor(&dir, &stop))
            .map_err(|e| format!("cannot start janitor: {e}"))?;
        threads.push(t);
    }

    let started = Instant::now();
    let interval = Duration::from_secs_f64(args.interval);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))?;
    let mut prev = Snapshot::take(&telemetry);
    let mut prev_at = Instant::now();
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let deadline = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = &mut deadline => break,
                _ = tick.tick() => {
                    let now = Snapshot::take(&telemetry);
                    let secs = prev_at.elapsed().as_secs_f64();
                    print_table(
                        &format!("last {:.0}s (t={:.0}s)", secs, started.elapsed().as_secs_f64()),
                        &now.minus(&prev),
                        secs,
                    );
                    prev = now;
                    prev_at = Instant::now();
                }
            }
        }
        Ok::<(), String>(())
    })?;

    stop.store(true, Ordering::Relaxed);
    for t in threads {
        if t.join().is_err() {
            eprintln!("lockmeter demo: a worker panicked");
        }
    }
    let total = Snapshot::take(&telemetry);
    print_table(
        &format!("whole run ({:.1}s)", started.elapsed().as_secs_f64()),
        &total,
        started.elapsed().as_secs_f64(),
    );
    println!();
    println!(
        "lock profile: which code waited, which code's holds made others wait, and timed holds"
    );
    println!("(also served as JSON at /debug/lockmeter/profile)");
    for lock in lockmeter::profile::snapshot() {
        print!("{lock}");
    }
    drop(telemetry);
    Ok(())
}

/// A temporary directory removed on drop (lock files included: they are the demo's own).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self, String> {
        let base = std::env::temp_dir();
        for i in 0..100u32 {
            let p = base.join(format!("lockmeter-demo-{}-{i}", std::process::id()));
            match std::fs::create_dir(&p) {
                Ok(()) => return Ok(TempDir(p)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(format!("cannot create {}: {e}", p.display())),
            }
        }
        Err("cannot create a temporary directory".into())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("lockmeter demo: cannot remove {}: {e}", self.0.display());
        }
    }
}

/// A shared in-memory cache behind an instrumented mutex, used from two places: a reader that
/// holds it briefly and a refresher that holds it for milliseconds. The lock profile tells
/// them apart by call site.
type Cache = lockmeter::sync::Mutex<Vec<u64>>;

fn read_cache(cache: &Cache, key: u64) -> Option<u64> {
    let entries = cache.lock().unwrap_or_else(|p| p.into_inner());
    entries.iter().copied().find(|e| *e == key)
}

fn refresh_cache(cache: &Cache, rng: &mut fastrand::Rng) {
    let mut entries = cache.lock().unwrap_or_else(|p| p.into_inner());
    entries.clear();
    entries.extend((0..64).map(|_| rng.u64(0..1_000)));
    // Rebuilding while holding the lock: the mistake the profile points at.
    std::thread::sleep(Duration::from_millis(rng.u64(2..=6)));
}

fn worker(seed: u64, dir: &Path, cache: &Cache, stop: &AtomicBool) {
    let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5eed);
    let locks: Vec<FileLock> = SCENARIOS
        .iter()
        .filter_map(|s| {
            FileLock::builder(dir.join(s.file))
                .name(s.name)
                .kind(s.kind)
                .open()
                .map_err(|e| eprintln!("lockmeter demo: {e}"))
                .ok()
        })
        .collect();
    if locks.len() != SCENARIOS.len() {
        return;
    }
    let total: u32 = SCENARIOS.iter().map(|s| s.weight).sum();
    while !stop.load(Ordering::Relaxed) {
        let mut pick = rng.u32(0..total);
        let idx = SCENARIOS
            .iter()
            .position(|s| {
                if pick < s.weight {
                    true
                } else {
                    pick -= s.weight;
                    false
                }
            })
            .unwrap_or(0);
        let (s, lock) = (&SCENARIOS[idx], &locks[idx]);
        let shared = rng.f64() < s.shared;
        let hold = Duration::from_micros(rng.u64(s.hold_us.0..=s.hold_us.1));
        let guard = match (s.how, shared) {
            (How::Blocking, false) => lock.lock().map(Some),
            (How::Blocking, true) => lock.lock_shared().map(Some),
            (How::TryThenTimeout(t), _) => match lock.try_lock() {
                Ok(None) => lock.lock_timeout(t),
                other => other,
            },
        };
        match guard {
            Ok(Some(g)) => {
                // The critical section.
                std::thread::sleep(hold);
                if let Err(e) = g.unlock() {
                    eprintln!("lockmeter demo: {e}");
                }
            }
            Ok(None) => {}
            Err(e) => eprintln!("lockmeter demo: {e}"),
        }
        if rng.f64() < 0.02 {
            refresh_cache(cache, &mut rng);
        } else {
            read_cache(cache, rng.u64(0..1_000));
        }
        // Think time between operations.
        std::thread::sleep(Duration::from_micros(rng.u64(100..=1_500)));
    }
}

/// Replaces `rotating.lock` every couple of seconds, as a careless cleanup job would: holders
/// of the old inode keep a lock that guards nothing, and their waiters detect the migration.
fn janitor(dir: &Path, stop: &AtomicBool) {
    let target = dir.join("rotating.lock");
    let tmp = dir.join("rotating.lock.new");
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        if last.elapsed() < Duration::from_secs(2) {
            continue;
        }
        last = Instant::now();
        let r = std::fs::write(&tmp, b"").and_then(|()| std::fs::rename(&tmp, &target));
        if let Err(e) = r {
            eprintln!(
                "lockmeter demo: janitor cannot replace {}: {e}",
                target.display()
            );
        }
    }
}
