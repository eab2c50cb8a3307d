//! `lockmeter exec --etcd URL | --redis URL | --postgres URL NAME -- COMMAND…` and
//! `lockmeter who --etcd URL NAME` (and the other backends): distributed locks from the shell.
//!
//! Kept apart from the file-lock `exec`/`who` parsing: `main` hands a command line here when
//! one of the backend options comes before `--`.

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[cfg_attr(
    not(any(feature = "etcd", feature = "redis", feature = "postgres")),
    allow(dead_code)
)]
/// sysexits `EX_UNAVAILABLE`: the lock server cannot be reached.
const EX_UNAVAILABLE: u8 = 69;
/// sysexits `EX_OSERR`: locking failed for another reason.
const EX_OSERR: u8 = 71;
#[cfg_attr(
    not(any(feature = "etcd", feature = "redis", feature = "postgres")),
    allow(dead_code)
)]
/// sysexits `EX_TEMPFAIL`: the lock was lost while COMMAND ran.
const EX_TEMPFAIL: u8 = 75;

const BACKEND_FLAGS: [&str; 3] = ["--etcd", "--redis", "--postgres"];

/// If the command line is `exec` or `who` with a backend option before `--`, runs it here.
pub fn intercept() -> Option<ExitCode> {
    let args: Vec<OsString> = std::env::args_os().collect();
    let sub = args.get(1)?.to_str()?;
    if sub != "exec" && sub != "who" {
        return None;
    }
    let wanted = args[2..]
        .iter()
        .take_while(|a| a.to_str() != Some("--"))
        .filter_map(|a| a.to_str())
        .any(|a| {
            BACKEND_FLAGS
                .iter()
                .any(|f| a == *f || a.starts_with(&format!("{f}=")))
        });
    if !wanted {
        return None;
    }
    Some(match LeaseCli::try_parse_from(args) {
        Ok(cli) => match cli.command {
            LeaseCommand::Exec(a) => exec(a),
            LeaseCommand::Who(a) => who(a),
        },
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return Some(ExitCode::SUCCESS);
            }
            let rendered = e.render().to_string();
            let msg = rendered
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ")
                .to_owned();
            eprintln!("lockmeter: {msg}");
            ExitCode::from(crate::EX_USAGE)
        }
    })
}

#[derive(Parser, Debug)]
#[command(name = "lockmeter")]
struct LeaseCli {
    #[command(subcommand)]
    command: LeaseCommand,
}

#[derive(Subcommand, Debug)]
enum LeaseCommand {
    /// Run COMMAND while holding a distributed lock NAME.
    Exec(LeaseExecArgs),
    /// Show who holds the distributed lock NAME, its fencing token, and who waits.
    Who(LeaseWhoArgs),
}

/// Which server holds the lock (exactly one).
#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false)]
struct Backend {
    /// etcd endpoint(s), `http://host:2379[,http://host2:2379]` (locks as `etcdctl lock NAME`).
    #[arg(long, value_name = "URL")]
    etcd: Option<String>,
    /// Redis URL, `redis://[:password@]host:6379[/db]` (single instance).
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// PostgreSQL connection string, `postgresql://user@host:5432/db` (session advisory lock).
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
}

/// What to do to COMMAND when the lock is lost while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OnLost {
    /// SIGTERM, then SIGKILL after the grace period.
    Term,
    /// SIGKILL at once.
    Kill,
    /// Let it run (the loss is still reported and the exit status is 75).
    Ignore,
}

/// Arguments of `lockmeter exec --etcd|--redis|--postgres`.
#[derive(Args, Debug)]
#[command(
    after_help = "Exit status: COMMAND's status (128+N if it was killed by signal N); \
1 (or -E N) on conflict (-n) or timeout (-w) without running COMMAND; 64 bad usage; 69 the \
lock server cannot be reached; 71 locking failed for another reason; 75 the lock was lost \
while COMMAND ran (COMMAND was signalled as --on-lost says; its own status is printed); \
126/127 COMMAND cannot be run.\n\nCOMMAND gets LOCKMETER_FENCING_TOKEN (strictly greater than \
every earlier holder's: pass it to the storage it writes), LOCKMETER_LOCK_KEY, and with etcd \
ETCD_LOCK_KEY and ETCD_LOCK_REV as `etcdctl lock` sets them. Unlike `etcdctl lock`, the lease \
is watched while COMMAND runs: a loss is detected within --ttl."
)]
struct LeaseExecArgs {
    #[command(flatten)]
    backend: Backend,
    /// Lease TTL in seconds (etcd, Redis), or the health-check bound (PostgreSQL).
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_secs)]
    ttl: Duration,
    /// Take a shared lock (PostgreSQL only).
    #[arg(short = 's', long = "shared", conflicts_with = "exclusive")]
    shared: bool,
    /// Take an exclusive lock (the default).
    #[arg(short = 'x', long = "exclusive")]
    exclusive: bool,
    /// Fail instead of waiting if the lock is held.
    #[arg(short = 'n', long = "nonblock", conflicts_with = "timeout")]
    nonblock: bool,
    /// Give up after SECS seconds (fractions allowed).
    #[arg(short = 'w', long = "timeout", value_name = "SECS", value_parser = parse_secs)]
    timeout: Option<Duration>,
    /// Exit status on conflict or timeout.
    #[arg(
        short = 'E',
        long = "conflict-exit-code",
        value_name = "N",
        default_value_t = 1
    )]
    conflict_exit_code: u8,
    /// What to do to COMMAND if the lock is lost while it runs.
    #[arg(long, value_enum, default_value = "term")]
    on_lost: OnLost,
    /// Seconds between SIGTERM and SIGKILL with --on-lost term.
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_secs)]
    grace: Duration,
    /// Seconds to wait for the server when connecting.
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_secs)]
    connect_timeout: Duration,
    /// The lock name (etcd: the key prefix, as `etcdctl lock NAME`).
    #[arg(value_name = "NAME")]
    name: String,
    /// The command to run and its arguments.
    #[arg(
        value_name = "COMMAND",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<OsString>,
}

/// Arguments of `lockmeter who --etcd|--redis|--postgres`.
#[derive(Args, Debug)]
struct LeaseWhoArgs {
    #[command(flatten)]
    backend: Backend,
    /// Seconds to wait for the server when connecting.
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_secs)]
    connect_timeout: Duration,
    /// The lock name.
    #[arg(value_name = "NAME")]
    name: String,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} must be a non-negative number of seconds"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is too large"))
}

/// A connected lock of any backend this binary was built with.
enum Lock {
    #[cfg(feature = "etcd")]
    Etcd(lockmeter::lease::EtcdLock),
    #[cfg(feature = "redis")]
    Redis(lockmeter::lease::RedisLock),
    #[cfg(feature = "postgres")]
    Pg(lockmeter::lease::PgAdvisoryLock),
}

/// Why no lock object could be made.
enum ConnectError {
    Usage(String),
    #[cfg(any(feature = "etcd", feature = "redis", feature = "postgres"))]
    Lease(lockmeter::lease::LeaseError),
}

#[allow(unused_variables)]
async fn connect(
    backend: &Backend,
    name: &str,
    ttl: Duration,
    connect_timeout: Duration,
    shared: bool,
) -> Result<Lock, ConnectError> {
    let missing = |f: &str| {
        ConnectError::Usage(format!(
            "this lockmeter was built without the {f} feature \
             (cargo install lockmeter-cli --features {f})"
        ))
    };
    if shared && backend.postgres.is_none() {
        return Err(ConnectError::Usage(
            "shared locks (-s) exist only with --postgres; etcd and Redis locks are exclusive"
                .into(),
        ));
    }
    if let Some(url) = &backend.etcd {
        #[cfg(feature = "etcd")]
        return lockmeter::lease::EtcdLock::builder(url, name)
            .ttl(ttl)
            .connect_timeout(connect_timeout)
            .connect()
            .await
            .map(Lock::Etcd)
            .map_err(ConnectError::Lease);
        #[cfg(not(feature = "etcd"))]
        return Err(missing("etcd"));
    }
    if let Some(url) = &backend.redis {
        #[cfg(feature = "redis")]
        return lockmeter::lease::RedisLock::builder(url, name)
            .ttl(ttl)
            .connect_timeout(connect_timeout)
            .connect()
            .await
            .map(Lock::Redis)
            .map_err(ConnectError::Lease);
        #[cfg(not(feature = "redis"))]
        return Err(missing("redis"));
    }
    if let Some(url) = &backend.postgres {
        #[cfg(feature = "postgres")]
        return lockmeter::lease::PgAdvisoryLock::builder(url, name)
            .ttl(ttl)
            .connect_timeout(connect_timeout)
            .mode(if shared {
                lockmeter::LockMode::Shared
            } else {
                lockmeter::LockMode::Exclusive
            })
            .connect()
            .await
            .map(Lock::Pg)
            .map_err(ConnectError::Lease);
        #[cfg(not(feature = "postgres"))]
        return Err(missing("postgres"));
    }
    Err(ConnectError::Usage(
        "one of --etcd, --redis, --postgres is required".into(),
    ))
}

#[cfg(any(feature = "etcd", feature = "redis", feature = "postgres"))]
mod held {
    use super::Lock;
    use lockmeter::lease::{LeaseError, LeaseGuard, LockStatus};
    use std::time::Duration;

    impl Lock {
        pub(super) fn is_etcd(&self) -> bool {
            #[cfg(feature = "etcd")]
            if let Lock::Etcd(_) = self {
                return true;
            }
            false
        }

        pub(super) async fn acquire(
            &self,
            nonblock: bool,
            timeout: Option<Duration>,
        ) -> Result<Option<LeaseGuard>, LeaseError> {
            macro_rules! go {
                ($l:expr) => {
                    match (nonblock, timeout) {
                        (true, _) => $l.try_lock().await,
                        (false, Some(t)) => $l.lock_timeout(t).await,
                        (false, None) => $l.lock().await.map(Some),
                    }
                };
            }
            match self {
                #[cfg(feature = "etcd")]
                Lock::Etcd(l) => go!(l),
                #[cfg(feature = "redis")]
                Lock::Redis(l) => go!(l),
                #[cfg(feature = "postgres")]
                Lock::Pg(l) => go!(l),
            }
        }

        pub(super) async fn status(&self) -> Result<LockStatus, LeaseError> {
            match self {
                #[cfg(feature = "etcd")]
                Lock::Etcd(l) => l.status().await,
                #[cfg(feature = "redis")]
                Lock::Redis(l) => l.status().await,
                #[cfg(feature = "postgres")]
                Lock::Pg(l) => l.status().await,
            }
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("lockmeter: cannot start: {e}");
            ExitCode::from(EX_OSERR)
        })
}

fn connect_failed(e: ConnectError) -> ExitCode {
    match e {
        ConnectError::Usage(msg) => {
            eprintln!("lockmeter: {msg}");
            ExitCode::from(crate::EX_USAGE)
        }
        #[cfg(any(feature = "etcd", feature = "redis", feature = "postgres"))]
        ConnectError::Lease(e) => lease_failed(&e),
    }
}

#[cfg(any(feature = "etcd", feature = "redis", feature = "postgres"))]
fn lease_failed(e: &lockmeter::lease::LeaseError) -> ExitCode {
    use lockmeter::lease::LeaseError;
    eprintln!("lockmeter: {e}");
    match e {
        LeaseError::InvalidArgument { .. } => ExitCode::from(crate::EX_USAGE),
        e if e.is_unavailable() => ExitCode::from(EX_UNAVAILABLE),
        _ => ExitCode::from(EX_OSERR),
    }
}

fn exec(args: LeaseExecArgs) -> ExitCode {
    use lockmeter::telemetry::{MetricsExporter, Telemetry};
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
    let code = match runtime() {
        Ok(rt) => rt.block_on(exec_locked(&args)),
        Err(code) => code,
    };
    if let Some(t) = telemetry {
        if let Err(e) = t.shutdown() {
            eprintln!("lockmeter: warning: {e}");
        }
    }
    code
}

#[cfg(not(any(feature = "etcd", feature = "redis", feature = "postgres")))]
async fn exec_locked(args: &LeaseExecArgs) -> ExitCode {
    match connect(
        &args.backend,
        &args.name,
        args.ttl,
        args.connect_timeout,
        args.shared,
    )
    .await
    {
        Err(e) => connect_failed(e),
        Ok(never) => match never {},
    }
}

#[cfg(any(feature = "etcd", feature = "redis", feature = "postgres"))]
async fn exec_locked(args: &LeaseExecArgs) -> ExitCode {
    use rustix::process::{kill_process, Pid, Signal};
    use tokio::signal::unix::{signal, SignalKind};

    let lock = match connect(
        &args.backend,
        &args.name,
        args.ttl,
        args.connect_timeout,
        args.shared,
    )
    .await
    {
        Ok(l) => l,
        Err(e) => return connect_failed(e),
    };
    let guard = match lock.acquire(args.nonblock, args.timeout).await {
        Ok(Some(g)) => g,
        Ok(None) => return ExitCode::from(args.conflict_exit_code),
        Err(e) => return lease_failed(&e),
    };
    let Some((program, rest)) = args.command.split_first() else {
        eprintln!("lockmeter: no COMMAND given");
        return ExitCode::from(crate::EX_USAGE);
    };
    // Handlers before the spawn so no signal is missed in between.
    let (mut int, mut term, mut hup) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            eprintln!("lockmeter: cannot install signal handlers: {e}");
            return ExitCode::from(EX_OSERR);
        }
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(rest)
        .env("LOCKMETER_FENCING_TOKEN", guard.fencing_token().to_string())
        .env("LOCKMETER_LOCK_KEY", guard.key());
    if lock.is_etcd() {
        cmd.env("ETCD_LOCK_KEY", guard.key());
        if let Some(rev) = guard.revision() {
            cmd.env("ETCD_LOCK_REV", rev.to_string());
        }
    }
    let mut child = match cmd.spawn() {
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
    let pid = child.id().and_then(|p| Pid::from_raw(p as i32));
    let send = |sig: Signal| {
        if let Some(pid) = pid {
            // ESRCH (already exited) is harmless: `wait` reports the exit next.
            let _ = kill_process(pid, sig);
        }
    };
    let mut lost = None;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let status = loop {
        let grace_over = async {
            match kill_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            st = child.wait() => break st,
            reason = guard.invalidated(), if lost.is_none() => {
                lost = Some(reason);
                let what = match args.on_lost {
                    OnLost::Term => {
                        send(Signal::TERM);
                        kill_at = Some(tokio::time::Instant::now() + args.grace);
                        format!("sent SIGTERM to COMMAND (SIGKILL in {:?})", args.grace)
                    }
                    OnLost::Kill => {
                        send(Signal::KILL);
                        "sent SIGKILL to COMMAND".to_owned()
                    }
                    OnLost::Ignore => "COMMAND keeps running (--on-lost ignore)".to_owned(),
                };
                eprintln!(
                    "lockmeter: lock {:?} lost ({}) while COMMAND ran (fencing token {}); {what}",
                    args.name,
                    reason.as_str(),
                    guard.fencing_token()
                );
            }
            _ = grace_over => {
                kill_at = None;
                eprintln!("lockmeter: COMMAND still running after {:?}: SIGKILL", args.grace);
                send(Signal::KILL);
            }
            _ = int.recv() => send(Signal::INT),
            _ = term.recv() => send(Signal::TERM),
            _ = hup.recv() => send(Signal::HUP),
        }
    };
    let code = match status {
        Ok(st) => exit_code_of(st),
        Err(e) => {
            eprintln!("lockmeter: waiting for COMMAND failed: {e}");
            EX_OSERR
        }
    };
    if let Some(reason) = lost {
        eprintln!(
            "lockmeter: COMMAND exited with status {code} after the lock was lost ({}); exiting {EX_TEMPFAIL}",
            reason.as_str()
        );
        drop(guard);
        return ExitCode::from(EX_TEMPFAIL);
    }
    if let Err(e) = guard.release().await {
        use lockmeter::lease::LeaseError;
        eprintln!("lockmeter: {e}");
        if let LeaseError::Lost { .. } = e {
            // Lost between COMMAND's exit and the release: COMMAND ran without the lock.
            return ExitCode::from(EX_TEMPFAIL);
        }
        eprintln!("lockmeter: warning: the lock ends when its lease does");
    }
    ExitCode::from(code)
}

#[cfg(any(feature = "etcd", feature = "redis", feature = "postgres"))]
fn exit_code_of(st: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt as _;
    if let Some(code) = st.code() {
        code as u8
    } else if let Some(sig) = st.signal() {
        (128 + sig) as u8
    } else {
        EX_OSERR
    }
}

fn who(args: LeaseWhoArgs) -> ExitCode {
    match runtime() {
        Ok(rt) => rt.block_on(who_async(&args)),
        Err(code) => code,
    }
}

#[cfg(not(any(feature = "etcd", feature = "redis", feature = "postgres")))]
async fn who_async(args: &LeaseWhoArgs) -> ExitCode {
    match connect(
        &args.backend,
        &args.name,
        Duration::from_secs(10),
        args.connect_timeout,
        false,
    )
    .await
    {
        Err(e) => connect_failed(e),
        Ok(never) => match never {},
    }
}

#[cfg(any(feature = "etcd", feature = "redis", feature = "postgres"))]
async fn who_async(args: &LeaseWhoArgs) -> ExitCode {
    let lock = match connect(
        &args.backend,
        &args.name,
        Duration::from_secs(10),
        args.connect_timeout,
        false,
    )
    .await
    {
        Ok(l) => l,
        Err(e) => return connect_failed(e),
    };
    let st = match lock.status().await {
        Ok(s) => s,
        Err(e) => return lease_failed(&e),
    };
    let kind = match &lock {
        #[cfg(feature = "etcd")]
        Lock::Etcd(_) => "etcd",
        #[cfg(feature = "redis")]
        Lock::Redis(_) => "redis",
        #[cfg(feature = "postgres")]
        Lock::Pg(_) => "postgres",
    };
    let mut extra = String::new();
    #[cfg(feature = "postgres")]
    if let Lock::Pg(l) = &lock {
        extra = format!(", advisory key {}", l.key());
    }
    #[cfg(feature = "redis")]
    if let Lock::Redis(l) = &lock {
        extra = format!(", key {}", l.key());
    }
    println!("lock {:?} ({kind}{extra})", args.name);
    let line = |p: &lockmeter::lease::Participant| {
        let mut s = p.id.clone();
        if let Some(t) = p.token {
            s.push_str(&format!("  token {t}"));
        }
        if let Some(ttl) = p.ttl {
            s.push_str(&format!("  ttl {:.1}s", ttl.as_secs_f64()));
        }
        if let Some(d) = &p.detail {
            s.push_str(&format!("  ({d})"));
        }
        s
    };
    if st.holders.is_empty() {
        println!("holder: none");
    }
    for h in &st.holders {
        println!("holder: {}", line(h));
    }
    println!("waiters: {}", st.waiters.len());
    for w in &st.waiters {
        println!("  {}", line(w));
    }
    if let Some(t) = st.last_token {
        println!("last fencing token: {t}");
    }
    ExitCode::SUCCESS
}
