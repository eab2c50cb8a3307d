//! A million lock names: does memory stay within the documented bound, and does nothing grow
//! once locks are dropped?
//!
//! ```text
//! cargo run --release -p lockmeter-bench --bin cardinality -- [--names 1000000] [--fs fuse]
//! ```
//!
//! One process, telemetry installed as an application would (`lockmeter::telemetry`, a
//! Prometheus `/metrics` endpoint), locks `--names` distinct lock files one after another, each
//! under its own name (the path, the default `lock.name`): create, open, lock, unlock, drop,
//! unlink. It prints resident memory every 10% (read before any scrape), and scrapes `/metrics` at 10% and at the end
//! (`--scrape-each`: every 10%) for the page's size and series counts. lockmeter keeps at most
//! `metrics::SERIES_LIMIT` series per sink for its counts and folds the rest into
//! `otel.metric.overflow`; the SDK caps each histogram at 2000 attribute sets (its own
//! overflow). With `--fs fuse` the files live on a bindfs FUSE mount (a file
//! system lockmeter cannot trust: each new lock file is warned about). Checks, exit 1 on
//! failure: resident memory at the end within 16 MiB of its value at 10%; the page no larger
//! at the end than at 10%; the overflow series carries every name past the limit; the
//! acquisition total equals the number of names.
//!
//! Diagnosis flags: `--no-telemetry` (no provider), `--same-name`, `--distinct N` (names cycle
//! through N), `--steps N`, `--rescrape K` (K more scrapes at the end, printing memory).
//!
//! Resident memory once seemed to grow by a page per scrape (`--scrape-each`): it was this
//! program keeping every page it scraped (heaptrack: the growth was live memory held by
//! `main`, freed at exit). It keeps only the last page now, and the sizes.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Instant;

const RSS_GROWTH_LIMIT_KB: u64 = 16 * 1024;

fn rss_kb() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * rustix::param::page_size() as u64 / 1024
}

/// Sum of a metric's samples in a Prometheus text page, and how many samples it has.
fn prom_sum(page: &str, metric: &str, having: &str) -> (f64, usize) {
    let mut sum = 0.0;
    let mut n = 0;
    for l in page.lines() {
        if l.starts_with(metric)
            && (l.as_bytes().get(metric.len()) == Some(&b'{'))
            && l.contains(having)
        {
            sum += l.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
            n += 1;
        }
    }
    (sum, n)
}

/// GET `/metrics` (no size limit: past the SDK's 2000 series per histogram the page is tens of
/// MB).
fn scrape(addr: std::net::SocketAddr) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    let at = body.find("\r\n\r\n").unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{}", &body[..at]);
    body.split_off(at + 4)
}

fn main() {
    let mut names: u64 = 1_000_000;
    let mut fuse = false;
    let mut no_telemetry = false;
    let mut same_name = false;
    let mut steps: u64 = 10;
    let mut rescrape = 0;
    let mut scrape_each = false;
    let mut distinct: Option<u64> = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--names" => names = it.next().unwrap().parse().unwrap(),
            "--fs" => fuse = it.next().unwrap() == "fuse",
            "--no-telemetry" => no_telemetry = true,
            "--same-name" => same_name = true,
            "--steps" => steps = it.next().unwrap().parse().unwrap(),
            "--distinct" => distinct = Some(it.next().unwrap().parse::<u64>().unwrap()),
            "--scrape-each" => scrape_each = true,
            "--rescrape" => rescrape = it.next().unwrap().parse().unwrap(),
            other => panic!("unknown argument {other} (--names N, --fs tmpfs|fuse)"),
        }
    }
    let telemetry = (!no_telemetry).then(|| {
        lockmeter::telemetry::Telemetry::builder()
            .service_name("cardinality-bench")
            .metrics_exporters(&[lockmeter::telemetry::MetricsExporter::Prometheus])
            .prometheus_addr("127.0.0.1:0".parse().unwrap())
            .tracing_subscriber(false)
            .init()
            .unwrap()
    });
    let addr = telemetry.as_ref().map(|t| t.prometheus_addr().unwrap());
    // bindfs: a FUSE file system in a process of its own, so only lockmeter's memory counts.
    let bindfs = if fuse {
        lockmeter_testkit::Bindfs::new(&[])
    } else {
        None
    };
    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    let dir = bindfs
        .as_ref()
        .map_or_else(|| tmp.path().to_owned(), |b| b.a());
    println!(
        "cardinality bench: {names} lock names on {}, SERIES_LIMIT {}",
        if fuse { "FUSE (bindfs)" } else { "tmpfs" },
        lockmeter::metrics::SERIES_LIMIT
    );
    println!(
        "{:>9} {:>9} {:>10} {:>11} {:>11} {:>9}",
        "names", "rss kB", "scrape kB", "acq series", "hold series", "secs"
    );
    let start = Instant::now();
    let step = (names / steps).max(1);
    let mut at_10 = None;
    let mut sizes: Vec<usize> = Vec::new();
    let mut last_scrape: Option<(u64, String)> = None;
    for i in 0..names {
        let path = dir.join(format!("job-{i}.lock"));
        let mut b = lockmeter::FileLock::builder(&path);
        if same_name {
            b = b.name("job");
        }
        if let Some(d) = distinct {
            b = b.name(format!("job-{}", i % d));
        }
        let lock = b.open().unwrap();
        drop(lock.lock().unwrap());
        drop(lock);
        std::fs::remove_file(&path).unwrap();
        if (i + 1) % step == 0 {
            let first = at_10.is_none();
            let last = i + 1 + step > names;
            // Before the scrape: a scrape's own buffers (tens of MB past the SDK's histogram
            // limit) stay with the allocator and would hide what the locks cost.
            let rss = rss_kb();
            let page = if scrape_each || first || last {
                addr.map(scrape).unwrap_or_default()
            } else {
                String::new()
            };
            let (_, series) = prom_sum(&page, "lock_acquisitions_total", "");
            let (_, holds) = prom_sum(&page, "lock_duration_seconds_count", "");
            println!(
                "{:>9} {:>9} {:>10} {:>11} {:>11} {:>9.1}",
                i + 1,
                rss,
                page.len() / 1024,
                series,
                holds,
                start.elapsed().as_secs_f64()
            );
            if first {
                // The baseline: after the first scrape (its buffers stay with the allocator).
                at_10 = Some(rss_kb());
            }
            if !page.is_empty() {
                // Sizes of every page, and only the last page itself: keeping every page made
                // this program's own memory grow by a page per scrape (once reported here as
                // lockmeter's).
                sizes.push(page.len());
                last_scrape = Some((rss, page));
            }
        }
    }
    for k in 0..rescrape {
        let page = addr.map(scrape).unwrap_or_default();
        println!(
            "rescrape {k}: rss {} kB, page {} kB",
            rss_kb(),
            page.len() / 1024
        );
    }
    let (rss, page) = last_scrape.as_ref().unwrap();
    let mut ok = true;
    let (total, _) = prom_sum(page, "lock_acquisitions_total", "");
    let (overflow, _) = prom_sum(
        page,
        "lock_acquisitions_total",
        "otel_metric_overflow=\"true\"",
    );
    println!("acquisitions on /metrics: {total} (overflow series: {overflow}); locked: {names}");
    if telemetry.is_some() && total as u64 != names {
        println!("FAIL: /metrics counts {total} acquisitions, the program made {names}");
        ok = false;
    }
    if telemetry.is_some()
        && distinct.is_none()
        && !same_name
        && names > lockmeter::metrics::SERIES_LIMIT as u64
        && overflow as u64 != names - lockmeter::metrics::SERIES_LIMIT as u64
    {
        println!("FAIL: the overflow series has {overflow}");
        ok = false;
    }
    println!("resident memory after the last scrape: {} kB", rss_kb());
    let growth = rss.saturating_sub(at_10.unwrap());
    println!(
        "resident memory grew {growth} kB from 10% to the end (limit {RSS_GROWTH_LIMIT_KB} kB)"
    );
    if growth > RSS_GROWTH_LIMIT_KB {
        println!("FAIL: memory grows with the number of names");
        ok = false;
    }
    if sizes.len() >= 2 && sizes[sizes.len() - 1] > sizes[0] + 65536 {
        println!("FAIL: /metrics keeps growing: {sizes:?}");
        ok = false;
    }
    drop(telemetry);
    if !ok {
        std::process::exit(1);
    }
}
