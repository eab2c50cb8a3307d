//! The soak's workload: the demo's kind of contention plus faults on purpose, for as long as
//! asked, with its own tally checked against `/metrics` at the end.
//!
//! ```text
//! cargo run --release -p lockmeter-bench --bin soak -- --seconds 120
//! ```
//!
//! In one process, with telemetry as an application installs it (Prometheus `/metrics`, and
//! OTLP to a collector that is not there: every export is refused):
//!
//! - contention: 3 threads on one `flock` lock, one thread each on an OFD and a POSIX lock,
//!   shared and exclusive, holds of 0-200 µs, on tmpfs; 2 threads on a `sync::Mutex`;
//! - faults: a thread locking through the fault-injecting FUSE file system (`testkit::faultfs`)
//!   with owner records, kinds in turn, and before every fourth acquire one fault for one
//!   call: the lock call fails (EIO, ENOLCK), the unlock fails (EIO), the check after locking
//!   fails (EIO), the owner record cannot be written (ENOSPC), a lock call answered EINTR
//!   (retried), or a slow lock call;
//! - a thread that opens and drops short-lived locks under fresh names (churn).
//!
//! Every second it samples open descriptors, threads and resident memory. At the end it stops
//! the workers, scrapes `/metrics` once and checks, exiting 1 on failure:
//!
//! - every lock's `lock_acquisitions_total` equals the workers' own count of guards had, and
//!   `lock_held` is 0;
//! - every `lock_errors_total{lock_operation, error_type}` equals the count of errors the
//!   calls returned, and there are no others;
//! - with every worker stopped, descriptors and threads at the end equal their values after
//!   the warm-up (the first tenth of the run, at least 2 s), and resident memory never grew by
//!   8 MiB or more above its warm-up value.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lockmeter::{FileLock, LockKind};
use lockmeter_testkit::{Action, Fault, FaultFs, Op};

const RSS_GROWTH_LIMIT_KB: u64 = 8 * 1024;

/// The workers' own count: acquisitions by lock name, errors by (name, operation, errno).
#[derive(Default)]
struct Tally {
    acquisitions: BTreeMap<String, u64>,
    errors: BTreeMap<(String, String, String), u64>,
}

impl Tally {
    fn acquired(&mut self, name: &str) {
        *self.acquisitions.entry(name.to_owned()).or_default() += 1;
    }

    fn failed(&mut self, name: &str, e: &lockmeter::Error) {
        *self
            .errors
            .entry((
                name.to_owned(),
                e.operation().as_str().to_owned(),
                e.errno_name().to_owned(),
            ))
            .or_default() += 1;
    }

    fn merge(&mut self, o: Tally) {
        for (k, v) in o.acquisitions {
            *self.acquisitions.entry(k).or_default() += v;
        }
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

fn rss_kb() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * rustix::param::page_size() as u64 / 1024
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A small xorshift: the workload's choices, reproducible per thread.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn hold(rng: &mut Rng) {
    let us = rng.below(200);
    if us > 20 {
        std::thread::sleep(Duration::from_micros(us));
    }
}

/// Contention on one file lock: shared and exclusive acquires, blocking and timed.
fn contend(lock: &FileLock, stop: &AtomicBool, seed: u64) -> Tally {
    let mut t = Tally::default();
    let mut rng = Rng(seed);
    while !stop.load(Ordering::Relaxed) {
        let shared = rng.below(4) == 0;
        let r = match (rng.below(3), shared) {
            (0, false) => lock.try_lock(),
            (0, true) => lock.try_lock_shared(),
            (1, false) => lock.lock_timeout(Duration::from_millis(5)),
            (1, true) => lock.lock_shared_timeout(Duration::from_millis(5)),
            (_, false) => lock.lock().map(Some),
            (_, true) => lock.lock_shared().map(Some),
        };
        match r {
            Ok(Some(g)) => {
                t.acquired(lock.name());
                hold(&mut rng);
                if let Err(e) = g.unlock() {
                    t.failed(lock.name(), &e);
                }
            }
            Ok(None) => {}
            Err(e) => t.failed(lock.name(), &e),
        }
    }
    t
}

/// Locks through the fault-injecting file system, one fault before every fourth acquire.
fn faulty(fs: &FaultFs, stop: &AtomicBool) -> Tally {
    let mut t = Tally::default();
    let mut rng = Rng(0x5eed_f00d);
    let kinds = [LockKind::Flock, LockKind::Ofd, LockKind::Posix];
    let locks: Vec<FileLock> = kinds
        .iter()
        .map(|k| {
            FileLock::builder(fs.path(&format!("faulty-{k}.lock")))
                .name(format!("soak.faulty.{k}"))
                .kind(*k)
                .owner_record(true)
                .fs_policy(lockmeter::FsPolicy::Allow)
                .open()
                .unwrap()
        })
        .collect();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let lock = &locks[(n % 3) as usize];
        let rel = format!("faulty-{}.lock", lock.kind());
        n += 1;
        if n % 4 == 0 {
            let fault = match rng.below(7) {
                0 => Fault::fail(Op::Lock, libc::EIO),
                1 => Fault::fail(Op::Lock, libc::ENOLCK),
                2 => Fault::fail(Op::Unlock, libc::EIO),
                3 => Fault::fail(Op::Stat, libc::EIO).after(0),
                4 => Fault::fail(Op::Write, libc::ENOSPC),
                5 => Fault::fail(Op::Lock, libc::EINTR),
                _ => Fault::new(Op::Lock, Action::Delay(Duration::from_millis(2))),
            };
            fs.inject(fault.path(rel.as_str()).times(1));
        }
        match lock.lock() {
            Ok(g) => {
                t.acquired(lock.name());
                if let Err(e) = g.unlock() {
                    t.failed(lock.name(), &e);
                }
            }
            Err(e) => t.failed(lock.name(), &e),
        }
        // A fault that found no call to hit (the stat of a verify the fast path did not make)
        // must not carry over to the next lock.
        fs.clear();
    }
    t
}

/// Short-lived locks under fresh names: what grows must shrink again.
fn churn(dir: &std::path::Path, stop: &AtomicBool) -> Tally {
    let mut t = Tally::default();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let name = format!("soak.churn.{}", i % 50);
        let lock = FileLock::builder(dir.join(format!("churn-{i}.lock")))
            .name(name.clone())
            .open()
            .unwrap();
        drop(lock.lock().unwrap());
        t.acquired(&name);
        drop(lock);
        std::fs::remove_file(dir.join(format!("churn-{i}.lock"))).unwrap();
        i += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    t
}

fn scrape(addr: std::net::SocketAddr) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    let at = body.find("\r\n\r\n").unwrap();
    body.split_off(at + 4)
}

/// `label="value"` of a sample line.
fn label<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!("{key}=\""))? + key.len() + 2;
    Some(&line[at..at + line[at..].find('"')?])
}

fn main() {
    let mut seconds: u64 = 120;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => seconds = it.next().unwrap().parse().unwrap(),
            other => panic!("unknown argument {other} (--seconds N)"),
        }
    }
    // A collector that is not there, for the whole run.
    let dead = lockmeter_testkit::free_port();
    std::env::set_var("OTEL_METRICS_EXPORTER", "prometheus,otlp");
    std::env::set_var(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        format!("http://127.0.0.1:{dead}"),
    );
    std::env::set_var("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc");
    std::env::set_var("OTEL_METRIC_EXPORT_INTERVAL", "1000");
    std::env::set_var("OTEL_EXPORTER_OTLP_TIMEOUT", "1000");
    let telemetry = lockmeter::telemetry::Telemetry::builder()
        .service_name("soak")
        .prometheus_addr("127.0.0.1:0".parse().unwrap())
        .tracing_subscriber(false)
        .init()
        .unwrap();
    let addr = telemetry.prometheus_addr().unwrap();
    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    let fs = FaultFs::mount();
    let open = |file: &str, name: &str, kind: LockKind| {
        FileLock::builder(tmp.path().join(file))
            .name(name)
            .kind(kind)
            .open()
            .unwrap()
    };
    let flock = open("flock.lock", "soak.flock", LockKind::Flock);
    let ofd = open("ofd.lock", "soak.ofd", LockKind::Ofd);
    let posix = open("posix.lock", "soak.posix", LockKind::Posix);
    let mutex = lockmeter::sync::Mutex::named("soak.mutex", 0u64);
    let mutex_count = AtomicU64::new(0);
    let tally = Mutex::new(Tally::default());
    let start = Instant::now();
    let mut samples: Vec<(u64, usize, usize, u64)> = Vec::new();
    println!(
        "soak: {seconds} s; /metrics on http://{addr}/metrics; OTLP to 127.0.0.1:{dead} (nothing there)"
    );
    let add = |t: Tally| tally.lock().unwrap().merge(t);
    let add = &add;
    // Runs the workers for `secs`, sampling every second; returns once they have all stopped.
    let phase = |secs: u64, samples: &mut Vec<(u64, usize, usize, u64)>| {
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            for seed in 1..=3 {
                let (flock, stop) = (&flock, &stop);
                s.spawn(move || add(contend(flock, stop, seed)));
            }
            s.spawn(|| add(contend(&ofd, &stop, 11)));
            s.spawn(|| add(contend(&posix, &stop, 12)));
            for _ in 0..2 {
                s.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        *mutex.lock().unwrap() += 1;
                        mutex_count.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            s.spawn(|| add(faulty(&fs, &stop)));
            s.spawn(|| add(churn(tmp.path(), &stop)));
            let begin = Instant::now();
            let mut next = begin;
            while begin.elapsed() < Duration::from_secs(secs) {
                next += Duration::from_secs(1);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                let sample = (start.elapsed().as_secs(), fds(), threads(), rss_kb());
                if sample.0 % 10 == 0 {
                    println!(
                        "{:>5} s  fds {:>4}  threads {:>3}  rss {:>7} kB",
                        sample.0, sample.1, sample.2, sample.3
                    );
                }
                samples.push(sample);
            }
            stop.store(true, Ordering::Relaxed);
        });
    };
    // Warm-up, then the figures of a quiet process (every worker stopped), then the run, then
    // the same figures again: what a leak would change.
    let warm_secs = (seconds / 10).max(2);
    phase(warm_secs, &mut Vec::new());
    // The least of 20 readings 50 ms apart: threads the file system daemon spawned for a
    // delayed answer, or a descriptor being closed, are gone by then.
    let quiet = |at: &str| {
        let mut q = (0, usize::MAX, usize::MAX, 0);
        for _ in 0..20 {
            q = (
                start.elapsed().as_secs(),
                q.1.min(fds()),
                q.2.min(threads()),
                rss_kb(),
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        println!(
            "{at}: fds {} threads {} rss {} kB (workers stopped)",
            q.1, q.2, q.3
        );
        q
    };
    let warm = quiet("after warm-up");
    phase(seconds.saturating_sub(warm_secs).max(1), &mut samples);
    let last = quiet("at the end");
    // After the workers: counts are final.
    let page = scrape(addr);
    let failures = std::cell::Cell::new(0u32);
    let fail = |what: String| {
        println!("FAIL {what}");
        failures.set(failures.get() + 1);
    };
    let mut tally = tally.into_inner().unwrap();
    tally
        .acquisitions
        .insert("soak.mutex".to_owned(), mutex_count.load(Ordering::Relaxed));
    let mut acquired: BTreeMap<String, f64> = BTreeMap::new();
    let mut errors: BTreeMap<(String, String, String), f64> = BTreeMap::new();
    let mut held = 0.0;
    for l in page.lines() {
        let value = || l.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
        if l.starts_with("lock_acquisitions_total{") {
            *acquired
                .entry(label(l, "lock_name").unwrap_or("").to_owned())
                .or_default() += value();
        } else if l.starts_with("lock_errors_total{") {
            let k = (
                label(l, "lock_name").unwrap_or("").to_owned(),
                label(l, "lock_operation").unwrap_or("").to_owned(),
                label(l, "error_type").unwrap_or("").to_owned(),
            );
            *errors.entry(k).or_default() += value();
        } else if l.starts_with("lock_held{") {
            held += value();
        }
    }
    for (name, n) in &tally.acquisitions {
        let got = acquired.get(name).copied().unwrap_or(0.0) as u64;
        if got != *n {
            fail(format!(
                "{name}: /metrics counts {got} acquisitions, the workers had {n}"
            ));
        }
    }
    for name in acquired.keys() {
        if !tally.acquisitions.contains_key(name) {
            fail(format!("{name}: on /metrics, not in the workload"));
        }
    }
    for (k, n) in &tally.errors {
        let got = errors.get(k).copied().unwrap_or(0.0) as u64;
        if got != *n {
            fail(format!(
                "{k:?}: /metrics counts {got} errors, the calls returned {n}"
            ));
        }
    }
    for (k, v) in &errors {
        if !tally.errors.contains_key(k) {
            fail(format!(
                "{k:?}: {v} errors on /metrics that no call returned"
            ));
        }
    }
    if held != 0.0 {
        fail(format!(
            "lock_held sums to {held} with every worker stopped"
        ));
    }
    let max_rss = samples
        .iter()
        .map(|s| s.3)
        .max()
        .unwrap_or(last.3)
        .max(last.3);
    let (fd_lo, fd_hi) = samples
        .iter()
        .fold((usize::MAX, 0), |(lo, hi), s| (lo.min(s.1), hi.max(s.1)));
    println!(
        "while running: fds {fd_lo}..{fd_hi}, max rss {max_rss} kB (warm-up {} kB)",
        warm.3
    );
    let total: u64 = tally.acquisitions.values().sum();
    let errs: u64 = tally.errors.values().sum();
    println!(
        "workload: {total} acquisitions over {} locks, {errs} errors returned ({} kinds); /metrics agrees: {}",
        tally.acquisitions.len(),
        tally.errors.len(),
        failures.get() == 0
    );
    if last.1 != warm.1 {
        fail(format!(
            "open descriptors went from {} to {}",
            warm.1, last.1
        ));
    }
    if last.2 != warm.2 {
        fail(format!("threads went from {} to {}", warm.2, last.2));
    }
    if max_rss.saturating_sub(warm.3) > RSS_GROWTH_LIMIT_KB {
        fail(format!(
            "resident memory grew from {} kB to {max_rss} kB",
            warm.3
        ));
    }
    drop(fs);
    drop(telemetry);
    if failures.get() > 0 {
        std::process::exit(1);
    }
    println!("soak: ok");
}
