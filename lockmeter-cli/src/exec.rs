//! `lockmeter exec`: run a command while holding a lock, like `flock(1)`, with metrics.

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use lockmeter::telemetry::{MetricsExporter, Telemetry};
use lockmeter::{FileLock, LockKind};

/// sysexits `EX_NOINPUT`: the lock file cannot be opened (as `flock(1)`).
const EX_NOINPUT: u8 = 66;
/// sysexits `EX_OSERR`: locking failed for another reason.
const EX_OSERR: u8 = 71;

/// Arguments of `lockmeter exec`.
#[derive(Args, Debug)]
#[command(
    after_help = "Exit status: COMMAND's status (128+N if it was killed by signal N); 1 (or -E N) \
on conflict (-n) or timeout (-w); 64 bad usage; 66 lock file cannot be opened; 71 locking \
failed; 126/127 COMMAND cannot be run.\n\nLike flock(1), COMMAND inherits the locked descriptor \
(flock and ofd kinds), so the lock outlives lockmeter if lockmeter is killed; -o prevents that. \
POSIX locks are never inherited: with --kind posix the lock lives as long as lockmeter.\n\n\
Metrics are pushed over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set, and flushed before exit."
)]
pub struct ExecArgs {
    /// Take a shared lock.
    #[arg(short = 's', long = "shared", conflicts_with = "exclusive")]
    shared: bool,
    /// Take an exclusive lock (the default).
    #[arg(short = 'x', long = "exclusive")]
    exclusive: bool,
    /// Fail instead of waiting if the lock is held.
    #[arg(short = 'n', long = "nonblock", conflicts_with = "timeout")]
    nonblock: bool,
    /// Give up after SECS seconds (fractions allowed).
    #[arg(short = 'w', long = "timeout", value_name = "SECS", value_parser = parse_timeout, allow_negative_numbers = true)]
    timeout: Option<Duration>,
    /// Exit status on conflict or timeout.
    #[arg(
        short = 'E',
        long = "conflict-exit-code",
        value_name = "N",
        default_value_t = 1,
        value_parser = clap::value_parser!(u8)
    )]
    conflict_exit_code: u8,
    /// Close the lock descriptor in COMMAND (the lock then lives only as long as lockmeter).
    #[arg(short = 'o', long = "close")]
    close: bool,
    /// Kernel lock to take.
    #[arg(long, value_name = "flock|ofd|posix", default_value = "flock")]
    kind: LockKind,
    /// Write an owner record with a fencing token into LOCKFILE (exclusive locks) and check it
    /// at release: another holder's record means the lock did not exclude (a violation).
    #[arg(long)]
    owner_record: bool,
    /// Watch the lock while COMMAND runs: warn if LOCKFILE is replaced, renamed or unlinked
    /// (inotify, plus re-validation every SECS seconds: `--watch=0.5`; default 1).
    #[arg(long, value_name = "SECS", num_args = 0..=1, require_equals = true, default_missing_value = "1", value_parser = parse_timeout)]
    watch: Option<Duration>,
    /// Stable lock name for metrics (default: LOCKFILE as given).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// The lock file (created with mode 0644 if missing; never deleted).
    #[arg(value_name = "LOCKFILE")]
    lockfile: PathBuf,
    /// The command to run and its arguments.
    #[arg(
        value_name = "COMMAND",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<OsString>,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} must be a non-negative number of seconds"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is too large"))
}

/// Runs `lockmeter exec`.
pub fn run(args: ExecArgs) -> ExitCode {
    // Short-lived: push over OTLP if a collector is configured, serve nothing by default.
    let defaults: &[MetricsExporter] = if lockmeter::telemetry::otlp_metrics_endpoint_set() {
        &[MetricsExporter::Otlp]
    } else {
        &[]
    };
    let telemetry = match Telemetry::builder()
        .service_name("lockmeter-exec")
        .compact_console(true)
        .default_metrics_exporters(defaults)
        .init()
    {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("lockmeter: warning: telemetry disabled: {e}");
            None
        }
    };
    let spans = telemetry.as_ref().is_some_and(Telemetry::traces_enabled);
    let code = run_locked(&args, spans);
    if let Some(t) = telemetry {
        if let Err(e) = t.shutdown() {
            eprintln!("lockmeter: warning: {e}");
        }
    }
    code
}

/// `spans`: one acquisition per process, so a span for it costs nothing next to the process;
/// with traces exported it is what a trace backend shows for the job.
fn run_locked(args: &ExecArgs, spans: bool) -> ExitCode {
    let mut builder = FileLock::builder(&args.lockfile)
        .kind(args.kind)
        .owner_record(args.owner_record)
        .spans(spans);
    if let Some(interval) = args.watch {
        builder = builder.watch(interval);
    }
    if let Some(name) = &args.name {
        builder = builder.name(name.clone());
    }
    let lock = match builder.open() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("lockmeter: {e}");
            return ExitCode::from(EX_NOINPUT);
        }
    };
    let acquired = match (args.shared, args.nonblock, args.timeout) {
        (false, true, _) => lock.try_lock(),
        (true, true, _) => lock.try_lock_shared(),
        (false, false, Some(t)) => lock.lock_timeout(t),
        (true, false, Some(t)) => lock.lock_shared_timeout(t),
        (false, false, None) => lock.lock().map(Some),
        (true, false, None) => lock.lock_shared().map(Some),
    };
    let guard = match acquired {
        Ok(Some(g)) => g,
        Ok(None) => return ExitCode::from(args.conflict_exit_code),
        Err(e) => {
            eprintln!("lockmeter: {e}");
            return ExitCode::from(EX_OSERR);
        }
    };

    // Hand the locked descriptor to COMMAND (flock(1) semantics) unless -o.
    let inherit = !args.close && args.kind != LockKind::Posix;
    if inherit {
        if let Err(e) = rustix::io::fcntl_setfd(guard.as_fd(), rustix::io::FdFlags::empty()) {
            eprintln!("lockmeter: cannot pass the lock to COMMAND: {e}");
            return ExitCode::from(EX_OSERR);
        }
    }
    let status = run_command(&args.command);
    if inherit {
        // Back to close-on-exec; failure here only matters for later children, of which
        // there are none.
        let _ = rustix::io::fcntl_setfd(guard.as_fd(), rustix::io::FdFlags::CLOEXEC);
    }
    // Explicit unlock, even if COMMAND left background processes holding the descriptor.
    if let Err(e) = guard.unlock() {
        eprintln!("lockmeter: warning: {e}");
    }
    status
}

/// Spawns COMMAND, forwards SIGINT/SIGTERM/SIGHUP to it and returns its exit status
/// (128+N when killed by signal N).
fn run_command(command: &[OsString]) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lockmeter: cannot start: {e}");
            return ExitCode::from(EX_OSERR);
        }
    };
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (program, rest) = match command.split_first() {
            Some(x) => x,
            None => {
                eprintln!("lockmeter: no COMMAND given");
                return ExitCode::from(crate::EX_USAGE);
            }
        };
        // Register handlers before spawning so no signal is missed in between.
        let streams = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        );
        let (mut int, mut term, mut hup) = match streams {
            (Ok(a), Ok(b), Ok(c)) => (a, b, c),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                eprintln!("lockmeter: cannot install signal handlers: {e}");
                return ExitCode::from(EX_OSERR);
            }
        };
        let mut child = match tokio::process::Command::new(program).args(rest).spawn() {
            Ok(c) => c,
            Err(e) => {
                let code = if e.kind() == std::io::ErrorKind::NotFound {
                    127
                } else {
                    126
                };
                eprintln!("lockmeter: cannot run {}: {e}", program.to_string_lossy());
                return ExitCode::from(code);
            }
        };
        let pid = child
            .id()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32));
        let forward = |sig: rustix::process::Signal| {
            if let Some(pid) = pid {
                // ESRCH (already exited) is harmless: `wait` reports the exit next.
                let _ = rustix::process::kill_process(pid, sig);
            }
        };
        use rustix::process::Signal;
        loop {
            tokio::select! {
                status = child.wait() => {
                    return match status {
                        Ok(st) => exit_code_of(st),
                        Err(e) => {
                            eprintln!("lockmeter: waiting for COMMAND failed: {e}");
                            ExitCode::from(EX_OSERR)
                        }
                    };
                }
                _ = int.recv() => forward(Signal::INT),
                _ = term.recv() => forward(Signal::TERM),
                _ = hup.recv() => forward(Signal::HUP),
            }
        }
    })
}

fn exit_code_of(st: std::process::ExitStatus) -> ExitCode {
    if let Some(code) = st.code() {
        ExitCode::from(code as u8)
    } else if let Some(sig) = st.signal() {
        ExitCode::from((128 + sig) as u8)
    } else {
        ExitCode::from(EX_OSERR)
    }
}
