//! `lockmeter agent` and `lockmeter locks`: every file lock on the host, for programs that do
//! not link lockmeter. The logic lives in the `lockmeter-agent` crate; this is the command line.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use lockmeter_agent::model::Tracker;
use lockmeter_agent::scan::Scanner;
use lockmeter_agent::{ActiveSource, AgentConfig, LabelRules, SourceChoice};

use crate::EX_USAGE;

/// `EX_OSERR`: `/proc/locks` could not be read.
const EX_OSERR: u8 = 71;

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(0.01..=86400.0).contains(&v) {
        return Err(format!("{s}: expected 0.01 to 86400 seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

fn parse_ring(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(m) if m.is_power_of_two() && m <= 1024 => Ok(m),
        _ => Err(format!("{s}: expected a power of two from 1 to 1024")),
    }
}

/// Path selection and naming, shared by `agent` and `locks`.
#[derive(Args, Debug, Clone)]
pub struct Selection {
    /// Fold lock files matching GLOB into one lock.name (repeatable; first match wins),
    /// e.g. '/var/lock/job-*.lock=jobs'.
    #[arg(long = "name-map", value_name = "GLOB=NAME")]
    name_map: Vec<String>,
    /// Only locks whose path matches GLOB (repeatable).
    #[arg(long, value_name = "GLOB")]
    include: Vec<String>,
    /// Not locks whose path matches GLOB (repeatable).
    #[arg(long, value_name = "GLOB")]
    exclude: Vec<String>,
    /// The proc file system to read (the host's /proc mounted elsewhere in a container).
    #[arg(long, value_name = "DIR", default_value = "/proc")]
    proc_root: PathBuf,
}

impl Selection {
    fn rules(&self) -> Result<LabelRules, ExitCode> {
        LabelRules::new(&self.name_map, &self.include, &self.exclude).map_err(|e| {
            eprintln!("lockmeter: {e}");
            ExitCode::from(EX_USAGE)
        })
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Source {
    /// Tracepoints when they can be attached (root, BTF), else sampling.
    Auto,
    /// /proc/locks sampling only.
    Sampling,
    /// Tracepoints required.
    Tracepoints,
}

/// Arguments of `lockmeter agent`.
#[derive(Args, Debug)]
#[command(
    after_help = "Exports every file lock on this host in lockmeter's schema: \
lock_held, lock_waiters, lock_hold_age_seconds, lock_untrusted and \
lock_inode_migrations_total{migration_detected_at=\"agent\"} from /proc/locks every --interval; \
with the tracepoint source (root, a build with the `ebpf` feature) also exact \
lock_wait_duration_seconds, lock_duration_seconds, lock_acquisitions_total, lock_conflicts_total \
and lock_errors_total. Without tracepoints, lock_duration_seconds holds sampled hold times \
(resolution: the interval). Metrics: Prometheus /metrics on OTEL_EXPORTER_PROMETHEUS_HOST:PORT \
(127.0.0.1:9464) or --listen, OTLP with OTEL_EXPORTER_OTLP_ENDPOINT."
)]
pub struct AgentArgs {
    /// Sampling interval in seconds.
    #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_secs)]
    interval: Duration,
    /// Sources to run.
    #[arg(long, value_enum, default_value_t = Source::Auto)]
    source: Source,
    /// At most N lock names get series of their own; the rest are lock_name="(other)".
    #[arg(long, value_name = "N", default_value_t = 500)]
    top: usize,
    /// The tracepoint source's ring buffer in MiB (a power of two): larger holds bigger bursts
    /// and is drained less often (cheaper for lock calls), and is resident in the agent.
    #[arg(long, value_name = "MIB", default_value_t = 8, value_parser = parse_ring)]
    ring_mib: u32,
    /// Serve /metrics here (overrides OTEL_EXPORTER_PROMETHEUS_HOST and _PORT).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    #[command(flatten)]
    selection: Selection,
}

/// Runs `lockmeter agent` until SIGINT or SIGTERM.
pub fn run_agent(args: AgentArgs) -> ExitCode {
    let rules = match args.selection.rules() {
        Ok(r) => r,
        Err(c) => return c,
    };
    let mut builder = lockmeter::telemetry::Telemetry::builder()
        .service_name("lockmeter-agent")
        .default_log_filter("info");
    if let Some(addr) = args.listen {
        builder = builder.prometheus_addr(addr);
    }
    let telemetry = match builder.init() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("lockmeter: {e}");
            return ExitCode::from(EX_OSERR);
        }
    };
    let meter = telemetry.meter();
    let config = AgentConfig {
        interval: args.interval,
        source: match args.source {
            Source::Auto => SourceChoice::Auto,
            Source::Sampling => SourceChoice::Sampling,
            Source::Tracepoints => SourceChoice::Tracepoints,
        },
        rules,
        top: args.top,
        proc_root: args.selection.proc_root.clone(),
        ring_bytes: args.ring_mib << 20,
    };
    let (stop_tx, stop_rx) = mpsc::channel();
    if let Err(e) = on_signals(stop_tx) {
        eprintln!("lockmeter: cannot handle signals: {e}");
        return ExitCode::from(EX_OSERR);
    }
    let prom = telemetry.prometheus_addr();
    let result = lockmeter_agent::run(config, &meter, &stop_rx, |active| {
        let sources = match active {
            ActiveSource::Sampling => "/proc/locks sampling",
            ActiveSource::SamplingAndTracepoints => "/proc/locks sampling + kernel tracepoints",
        };
        match prom {
            Some(a) => println!(
                "lockmeter agent: ready, sources: {sources}; metrics at http://{a}/metrics"
            ),
            None => println!("lockmeter agent: ready, sources: {sources}"),
        }
        let _ = std::io::stdout().flush();
    });
    drop(telemetry);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lockmeter: {e}");
            ExitCode::from(EX_OSERR)
        }
    }
}

/// Sends on `stop` at the first SIGINT or SIGTERM.
fn on_signals(stop: mpsc::Sender<()>) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("lockmeter-signals".into())
        .spawn(move || {
            rt.block_on(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    let _ = ready_tx.send(false);
                    return;
                };
                let _ = ready_tx.send(true);
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                let _ = stop.send(());
            })
        })?;
    match ready_rx.recv() {
        Ok(true) => Ok(()),
        _ => Err(std::io::Error::other(
            "signal handlers could not be installed",
        )),
    }
}

/// Arguments of `lockmeter locks`.
#[derive(Args, Debug)]
#[command(
    after_help = "Lists every file lock on this host (from /proc/locks): holder command \
and pid, kind (flock, posix, ofd, lease), mode, how long it has been held, blocked waiters, the \
file system and whether its locks can be trusted (host-wide, across-clients, local-only, \
unknown), and the path. /proc/locks has no timestamps: a one-shot listing shows the holder \
process's age as an upper bound (≤); --watch shows how long each lock has been seen held (≥)."
)]
pub struct LocksArgs {
    /// Print JSON (one document; with --watch, one line per refresh).
    #[arg(long)]
    json: bool,
    /// Refresh every SECS seconds (default 1) until interrupted, like top.
    #[arg(long, value_name = "SECS", num_args = 0..=1, require_equals = true, default_missing_value = "1", value_parser = parse_secs)]
    watch: Option<Duration>,
    #[command(flatten)]
    selection: Selection,
}

/// Runs `lockmeter locks`.
pub fn run_locks(args: LocksArgs) -> ExitCode {
    let rules = match args.selection.rules() {
        Ok(r) => r,
        Err(c) => return c,
    };
    let mut scanner = Scanner::new(&args.selection.proc_root);
    let mut tracker = Tracker::new(rules, usize::MAX, &args.selection.proc_root);
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        let snap = match scanner.scan() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("lockmeter: {e}");
                return ExitCode::from(EX_OSERR);
            }
        };
        let up = tracker.update(&snap);
        let mut out = String::new();
        if args.json {
            let doc = serde_json::json!({
                "locks": up.rows,
                "skipped_lines": snap.skipped_lines,
            });
            out = doc.to_string();
            out.push('\n');
        } else {
            if args.watch.is_some() && interactive {
                out.push_str("\x1b[H\x1b[2J"); // home, clear
            }
            if let Some(w) = args.watch {
                out.push_str(&format!(
                    "lockmeter locks: {} held, {} waiting (every {:?}; Ctrl-C to stop)\n\n",
                    up.rows.len(),
                    up.rows.iter().map(|r| r.waiters.len()).sum::<usize>(),
                    w
                ));
            }
            out.push_str(&lockmeter_agent::table::render(&up.rows));
        }
        let mut stdout = std::io::stdout().lock();
        if stdout
            .write_all(out.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return ExitCode::SUCCESS; // a closed pipe (| head)
        }
        drop(stdout);
        match args.watch {
            Some(w) => std::thread::sleep(w),
            None => return ExitCode::SUCCESS,
        }
    }
}
