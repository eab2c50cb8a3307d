//! `lockmeter exec`: `flock(1)` (util-linux 2.38–2.41), every form, with metrics.
//!
//! ```text
//! lockmeter exec [OPTIONS] FILE|DIRECTORY COMMAND [ARGS...]
//! lockmeter exec [OPTIONS] FILE|DIRECTORY -c COMMAND
//! lockmeter exec [OPTIONS] NUMBER
//! lockmeter exec [OPTIONS] FILE -- COMMAND [ARGS...]        (lockmeter's form)
//! ```
//!
//! The flow, whatever holds the lock: [`ExecArgs::plan`] reads flock's grammar into a
//! [`Plan`]; a backend acquires and returns an [`Acquired`] (a [`Held`] lock, a conflict, or a
//! failure with flock's exit status); [`hold_and_run`] does the rest the same way for every
//! backend: `--verbose`, running COMMAND (forked, or in place of lockmeter with `-F`),
//! releasing, and only then delivering telemetry. Backends here: a lock file or directory
//! ([`run_path`]) and an inherited descriptor ([`run_fd`]); another lock service plugs in as
//! one more function returning [`Acquired`].

use std::ffi::OsString;
use std::os::fd::{AsFd as _, BorrowedFd, RawFd};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use lockmeter::metrics::{keys, Sink};
use lockmeter::{Errno, FileLock, FileLockGuard, Hold, LockKind, LockMeter, LockMode};

use crate::delivery::Delivery;
use crate::timefmt::flock_seconds;
use crate::EX_USAGE;

/// sysexits `EX_DATAERR`: locking failed (flock(1) for errors other than `ENOLCK`/`ENOMEM`).
pub const EX_DATAERR: u8 = 65;
/// sysexits `EX_NOINPUT`: the lock file cannot be opened.
pub const EX_NOINPUT: u8 = 66;
/// sysexits `EX_UNAVAILABLE`: COMMAND cannot be executed.
pub const EX_UNAVAILABLE: u8 = 69;
/// sysexits `EX_OSERR`: out of memory or descriptors, `ENOLCK`, a failed fork.
pub const EX_OSERR: u8 = 71;
/// sysexits `EX_CANTCREAT`: the lock file cannot be created (`EROFS`, `ENOSPC`).
pub const EX_CANTCREAT: u8 = 73;

/// Arguments of `lockmeter exec`. Parsing stops at the first argument that is not an option
/// (FILE or NUMBER), as flock(1)'s does: what follows is COMMAND's.
#[derive(Args, Debug)]
#[command(
    override_usage = "lockmeter exec [OPTIONS] FILE|DIRECTORY COMMAND [ARGS...]\n       \
lockmeter exec [OPTIONS] FILE|DIRECTORY -c COMMAND\n       \
lockmeter exec [OPTIONS] NUMBER\n       \
lockmeter exec [OPTIONS] FILE -- COMMAND [ARGS...]",
    args_override_self = true,
    infer_long_args = true,
    disable_version_flag = true,
    after_help = "A drop-in for flock(1): same forms, options and exit statuses. Exit status: \
COMMAND's (128+N if it was killed by signal N); 1 (or -E N) on conflict (-n) or timeout (-w); \
64 bad usage; 65 locking failed; 66 the lock file cannot be opened; 69 COMMAND cannot be \
executed; 71 out of resources or ENOLCK; 73 the lock file cannot be created (read-only file \
system, no space).\n\n\
FILE is created (mode 0666, minus the umask) if missing, never deleted. A DIRECTORY is locked \
through a read-only descriptor. A symbolic link is refused unless --follow-symlinks: a link \
planted in a shared directory such as /tmp could otherwise make lockmeter create, lock or \
(with --owner-record) write the file it points to.\n\n\
NUMBER locks a descriptor the shell opened: ( lockmeter exec -n 9 || exit 1; ... ) \
9>/var/lock/job. The lock belongs to the shell's open file description and stays after \
lockmeter exits; lockmeter records the wait, outcome and conflicts, but no hold time (it cannot \
see the release). The same goes for -F, where COMMAND replaces lockmeter.\n\n\
Like flock(1), COMMAND inherits the locked descriptor, so the lock outlives lockmeter if \
lockmeter is killed; -o prevents that. POSIX locks are never inherited.\n\n\
Metrics are pushed over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set, after the lock is \
released, within OTEL_EXPORTER_OTLP_TIMEOUT milliseconds (default 2000) in all. Without a way \
to deliver them, lockmeter says so once on stderr; OTEL_METRICS_EXPORTER=none silences that."
)]
pub struct ExecArgs {
    /// Take a shared lock.
    #[arg(short = 's', long = "shared", overrides_with_all = ["exclusive", "unlock"])]
    shared: bool,
    /// Take an exclusive lock (the default).
    #[arg(short = 'x', short_alias = 'e', long = "exclusive", overrides_with_all = ["shared", "unlock"])]
    exclusive: bool,
    /// Remove a lock: with NUMBER, unlock the shell's descriptor; with FILE, run COMMAND
    /// without a lock (unlocking a fresh open of the file releases nothing, as with flock(1)).
    #[arg(short = 'u', long = "unlock", overrides_with_all = ["shared", "exclusive"])]
    unlock: bool,
    /// Fail instead of waiting if the lock is held.
    #[arg(short = 'n', long = "nonblock", aliases = ["nonblocking", "nb"])]
    nonblock: bool,
    /// Give up after SECS seconds (fractions allowed; 0 is -n).
    #[arg(
        short = 'w',
        long = "timeout",
        alias = "wait",
        value_name = "SECS",
        allow_hyphen_values = true
    )]
    timeout: Option<String>,
    /// Exit status on conflict or timeout (0-255).
    #[arg(
        short = 'E',
        long = "conflict-exit-code",
        value_name = "N",
        allow_hyphen_values = true
    )]
    conflict_exit_code: Option<String>,
    /// Close the lock descriptor in COMMAND (the lock then lives only as long as lockmeter).
    #[arg(short = 'o', long = "close")]
    close: bool,
    /// Run COMMAND in place of lockmeter (no fork): it keeps the lock until it exits.
    #[arg(short = 'F', long = "no-fork")]
    no_fork: bool,
    /// Report how long getting the lock took (and the lock's kind, file-system trust and
    /// fencing token), or why it could not be had.
    #[arg(long)]
    verbose: bool,
    /// Take an OFD lock (fcntl F_OFD_SETLK) instead of flock(2): util-linux 2.40's name for
    /// --kind ofd.
    #[arg(long, conflicts_with = "kind")]
    fcntl: bool,
    /// Kernel lock to take.
    #[arg(long, value_name = "flock|ofd|posix", default_value = "flock")]
    kind: LockKind,
    /// Write an owner record with a fencing token into FILE (exclusive locks) and check it
    /// at release: another holder's record means the lock did not exclude (a violation).
    #[arg(long)]
    owner_record: bool,
    /// Watch the lock while COMMAND runs: warn if FILE is replaced, renamed or unlinked
    /// (inotify, plus re-validation every SECS seconds: `--watch=0.5`; default 1).
    #[arg(long, value_name = "SECS", num_args = 0..=1, require_equals = true, default_missing_value = "1", value_parser = parse_watch)]
    watch: Option<Duration>,
    /// Stable lock name for metrics and the owner record (default: FILE as given).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Lock the file a symbolic link FILE points to (refused by default).
    #[arg(long)]
    follow_symlinks: bool,
    /// Print the version.
    #[arg(short = 'V', long = "version")]
    version: bool,
    /// FILE, DIRECTORY or NUMBER, then COMMAND and its arguments.
    #[arg(value_name = "FILE|NUMBER", trailing_var_arg = true, num_args = 0..)]
    args: Vec<OsString>,
}

fn parse_watch(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("{s:?} must be a positive number of seconds"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is too large"))
}

/// What `exec` was asked to do, from flock(1)'s grammar.
#[derive(Debug)]
pub struct Plan {
    /// What to lock.
    pub target: Target,
    /// What to run holding it (`None` for the descriptor form).
    pub command: Option<Vec<OsString>>,
    /// Lock in a mode, or unlock.
    pub op: Op,
    /// How long to wait.
    pub wait: Wait,
    /// Exit status on conflict or timeout.
    pub conflict_exit_code: u8,
    /// `-o`: COMMAND does not inherit the lock.
    pub close: bool,
    /// `-F`: COMMAND replaces lockmeter.
    pub no_fork: bool,
    /// `--verbose`.
    pub verbose: bool,
    /// Kernel lock kind (`--kind`, `--fcntl`).
    pub kind: LockKind,
    /// `--name`.
    pub name: Option<String>,
    /// `--owner-record`.
    pub owner_record: bool,
    /// `--watch`.
    pub watch: Option<Duration>,
    /// `--follow-symlinks`.
    pub follow_symlinks: bool,
}

/// What to lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A lock file or directory.
    Path(PathBuf),
    /// A descriptor inherited from the caller.
    Fd(RawFd),
}

/// Lock (in a mode) or unlock (`-u`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `-s` / `-x`.
    Lock(LockMode),
    /// `-u`.
    Unlock,
}

/// How long to wait for the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// `-n` or `-w 0`: not at all.
    NonBlock,
    /// `-w SECS`.
    Timeout(Duration),
    /// As long as it takes.
    Forever,
}

impl ExecArgs {
    /// Reads flock(1)'s grammar; `Err` is a usage message (exit 64), in flock's words where it
    /// has some.
    pub fn plan(self) -> Result<Plan, String> {
        let op = if self.unlock {
            Op::Unlock
        } else if self.shared {
            Op::Lock(LockMode::Shared)
        } else {
            Op::Lock(LockMode::Exclusive)
        };
        let wait = match (&self.timeout, self.nonblock) {
            (_, true) => Wait::NonBlock,
            (None, false) => Wait::Forever,
            (Some(s), false) => match parse_flock_timeout(s)? {
                d if d.is_zero() => Wait::NonBlock,
                d => Wait::Timeout(d),
            },
        };
        let conflict_exit_code = match &self.conflict_exit_code {
            None => 1,
            Some(s) => {
                let n: i32 = s
                    .trim_start()
                    .parse()
                    .map_err(|_| format!("invalid exit code: '{s}'"))?;
                u8::try_from(n)
                    .map_err(|_| "exit code out of range (expected 0 to 255)".to_owned())?
            }
        };
        if self.no_fork && self.close {
            return Err("the --no-fork and --close options are incompatible".into());
        }
        let kind = if self.fcntl { LockKind::Ofd } else { self.kind };
        let mut args = self.args.into_iter();
        let Some(first) = args.next() else {
            return Err("requires file descriptor, file or directory".into());
        };
        let rest: Vec<OsString> = args.collect();
        let (target, command) = if rest.is_empty() {
            (Target::Fd(parse_fd(&first)?), None)
        } else {
            (Target::Path(PathBuf::from(first)), Some(command_of(rest)?))
        };
        if let Target::Fd(_) = target {
            let refused = [
                (self.owner_record, "--owner-record"),
                (self.watch.is_some(), "--watch"),
                (self.follow_symlinks, "--follow-symlinks"),
            ];
            if let Some((_, flag)) = refused.iter().find(|(on, _)| *on) {
                return Err(format!(
                    "{flag} needs a lock file path, not a descriptor number"
                ));
            }
            if kind == LockKind::Posix {
                return Err(
                    "a POSIX lock on a descriptor would end when lockmeter exits: use \
                     --kind flock or ofd (--fcntl)"
                        .into(),
                );
            }
        }
        if self.no_fork && self.watch.is_some() {
            return Err("--watch needs lockmeter to stay, which --no-fork does not".into());
        }
        Ok(Plan {
            target,
            command,
            op,
            wait,
            conflict_exit_code,
            close: self.close,
            no_fork: self.no_fork,
            verbose: self.verbose,
            kind,
            name: self.name,
            owner_record: self.owner_record,
            watch: self.watch,
            follow_symlinks: self.follow_symlinks,
        })
    }
}

/// `-w SECS` as flock(1) reads it: a non-negative decimal number of seconds.
fn parse_flock_timeout(s: &str) -> Result<Duration, String> {
    let invalid = || format!("invalid timeout value: '{s}'");
    let secs: f64 = s.trim_start().parse().map_err(|_| invalid())?;
    if !secs.is_finite() {
        return Err(invalid());
    }
    if secs < 0.0 {
        return Err(format!(
            "invalid timeout value: '{s}' (a timeout cannot be negative)"
        ));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| invalid())
}

/// The descriptor form's NUMBER, with flock(1)'s messages.
fn parse_fd(arg: &std::ffi::OsStr) -> Result<RawFd, String> {
    let text = arg.to_string_lossy();
    match text.trim_start().parse::<i64>() {
        Ok(n) => RawFd::try_from(n)
            .map_err(|_| format!("bad file descriptor: '{text}': Numerical result out of range")),
        Err(e)
            if matches!(
                e.kind(),
                std::num::IntErrorKind::PosOverflow | std::num::IntErrorKind::NegOverflow
            ) =>
        {
            Err(format!(
                "bad file descriptor: '{text}': Numerical result out of range"
            ))
        }
        Err(_) => Err(format!(
            "bad file descriptor: '{text}' (give a COMMAND to run holding a lock on it, or the \
             number of a descriptor to lock)"
        )),
    }
}

/// COMMAND from what follows FILE: `-c CMD` (through `$SHELL -c`, as flock(1)), `-- ARGV`
/// (lockmeter's form), or ARGV.
fn command_of(rest: Vec<OsString>) -> Result<Vec<OsString>, String> {
    match rest[0].to_str() {
        Some(flag @ ("-c" | "--command")) => {
            if rest.len() != 2 {
                return Err(format!("{flag} requires exactly one command argument"));
            }
            let shell = std::env::var_os("SHELL")
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "/bin/sh".into());
            Ok(vec![shell, "-c".into(), rest[1].clone()])
        }
        Some("--") => {
            if rest.len() == 1 {
                return Err("no COMMAND after --".into());
            }
            Ok(rest[1..].to_vec())
        }
        _ => Ok(rest),
    }
}

/// Runs `lockmeter exec`.
pub fn run(args: ExecArgs) -> ExitCode {
    if args.version {
        println!(
            "lockmeter exec from lockmeter {} (the forms and options of flock(1) from \
             util-linux 2.38-2.41)",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    // `lockmeter exec` alone: flock(1) with no arguments.
    let bare = std::env::args_os().len() <= 2;
    let plan = match args.plan() {
        Ok(p) => p,
        Err(msg) => {
            let msg = if bare {
                "not enough arguments".into()
            } else {
                msg
            };
            eprintln!("lockmeter: {msg}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match plan.target.clone() {
        Target::Path(path) => run_path(&plan, &path),
        Target::Fd(fd) => run_fd(&plan, fd),
    }
}

// ---- the common part: hold, run, release, deliver ----------------------------------------

/// A lock `exec` holds around COMMAND.
pub trait Held {
    /// For `--verbose`: kind, mode, what is locked, file-system trust, fencing token.
    fn describe(&self) -> String;
    /// The locked descriptor, which COMMAND inherits so that the lock outlives lockmeter as
    /// with flock(1) (and which `-F` must keep open across the exec); `None` when there is
    /// none (`-u`, a network lease).
    fn inheritable_fd(&self) -> Option<BorrowedFd<'_>>;
    /// Releases the lock; called before any telemetry delivery.
    fn release(self: Box<Self>) -> Result<(), String>;
    /// The lock stays held after lockmeter (the descriptor form, or `-F`): the hold is handed
    /// over, uncounted as a release and with no hold time.
    fn hand_off(self: Box<Self>);
}

/// What acquiring gave.
pub enum Acquired<'a> {
    /// The lock is ours.
    Held(Box<dyn Held + 'a>),
    /// A conflict (`-n`) or a timeout (`-w`): exit with `-E`'s status, COMMAND not run.
    Busy {
        /// A timeout rather than a conflict.
        timed_out: bool,
    },
    /// Locking failed: the message (after `lockmeter: `) and flock's exit status.
    Failed {
        /// What went wrong.
        message: String,
        /// The exit status.
        code: u8,
    },
}

/// Everything after acquiring, the same for every backend: `--verbose`, COMMAND (forked or,
/// with `-F`, in lockmeter's place), the release, then telemetry delivery.
pub fn hold_and_run(
    plan: &Plan,
    waited: Duration,
    acquired: Acquired<'_>,
    delivery: &mut Delivery,
) -> ExitCode {
    let held = match acquired {
        Acquired::Held(h) => h,
        Acquired::Busy { timed_out } => {
            if plan.verbose {
                eprintln!(
                    "lockmeter: {}",
                    if timed_out {
                        "timeout while waiting to get lock"
                    } else {
                        "failed to get lock"
                    }
                );
            }
            return ExitCode::from(plan.conflict_exit_code);
        }
        Acquired::Failed { message, code } => {
            eprintln!("lockmeter: {message}");
            delivery.failed();
            return ExitCode::from(code);
        }
    };
    if plan.verbose {
        println!(
            "lockmeter: getting lock took {} seconds",
            flock_seconds(waited)
        );
        println!("lockmeter: {}", held.describe());
    }
    let Some(command) = &plan.command else {
        // The descriptor form: the lock is the shell's from here on.
        held.hand_off();
        return ExitCode::SUCCESS;
    };
    if plan.verbose {
        println!("lockmeter: executing {}", command[0].to_string_lossy());
    }
    // flock(1) leaves its own lines in stdio's buffer; lockmeter's come before COMMAND's.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    // A forked COMMAND gains nothing from a POSIX lock's descriptor (POSIX locks are not
    // inherited); with -F it must stay open, or closing it at exec drops the lock.
    let inherit = !plan.close
        && held.inheritable_fd().is_some()
        && (plan.no_fork || plan.kind != LockKind::Posix);
    if inherit {
        if let Some(fd) = held.inheritable_fd() {
            if let Err(e) = rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty()) {
                eprintln!("lockmeter: cannot pass the lock to COMMAND: {e}");
                return ExitCode::from(EX_OSERR);
            }
        }
    }
    if plan.no_fork {
        // COMMAND replaces lockmeter holding the lock: deliver what there is to deliver now.
        held.hand_off();
        delivery.finish();
        return exec_in_place(command);
    }
    let status = run_command(command);
    // Explicit unlock, even if COMMAND left background processes holding the descriptor;
    // and before delivering telemetry, which may take a while.
    if let Err(e) = held.release() {
        eprintln!("lockmeter: warning: {e}");
    }
    delivery.finish();
    status
}

/// `-F`: replaces lockmeter with COMMAND; returns only if that failed.
fn exec_in_place(command: &[OsString]) -> ExitCode {
    use std::os::unix::process::CommandExt as _;
    let e = std::process::Command::new(&command[0])
        .args(&command[1..])
        .exec();
    exec_failed(&command[0], &e)
}

/// flock(1)'s message and status for a COMMAND that could not be executed.
fn exec_failed(program: &std::ffi::OsStr, e: &std::io::Error) -> ExitCode {
    eprintln!(
        "lockmeter: failed to execute {}: {}",
        program.to_string_lossy(),
        strerror(e)
    );
    ExitCode::from(if e.raw_os_error() == Some(libc::ENOMEM) {
        EX_OSERR
    } else {
        EX_UNAVAILABLE
    })
}

/// An OS error's text without Rust's ` (os error N)`: what `strerror` says, as flock prints.
pub fn strerror(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
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
                return ExitCode::from(EX_USAGE);
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
            Err(e) => return exec_failed(program, &e),
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

/// flock(1)'s status for a failed lock call: `EX_OSERR` for `ENOLCK`/`ENOMEM`, else
/// `EX_DATAERR`.
fn lock_failure_code(errno: Errno) -> u8 {
    if errno == Errno::NOLCK || errno == Errno::NOMEM {
        EX_OSERR
    } else {
        EX_DATAERR
    }
}

// ---- a lock file or directory -------------------------------------------------------------

/// The file form: lock FILE (or DIRECTORY) through `lockmeter::FileLock`.
fn run_path(plan: &Plan, path: &Path) -> ExitCode {
    let mut delivery = Delivery::start("lockmeter-exec");
    let lock = match open_lock(plan, path, delivery.spans()) {
        Ok(l) => l,
        Err((message, code)) => {
            eprintln!("lockmeter: {message}");
            delivery.failed();
            return ExitCode::from(code);
        }
    };
    // With -F the hold outlives lockmeter: the acquisition is recorded through a LockMeter
    // that can hand the hold over, and the FileLock itself records nowhere (see `open_lock`).
    let meter = plan.no_fork.then(|| {
        LockMeter::with_attributes(
            lock.name(),
            plan.kind.as_str(),
            &Sink::global(),
            &[opentelemetry::KeyValue::new(keys::FS_TYPE, lock.fs_type())],
        )
    });
    let started = Instant::now();
    let acquired = match plan.op {
        Op::Unlock => Acquired::Held(Box::new(Unlocked { lock: &lock })),
        Op::Lock(mode) => acquire_file(plan, &lock, mode, meter.as_ref()),
    };
    hold_and_run(plan, started.elapsed(), acquired, &mut delivery)
}

/// Opens the lock file as flock(1) would (creating it 0666 minus the umask, a directory
/// read-only), refusing a symbolic link unless `--follow-symlinks`. `Err` carries the message
/// and flock's exit status.
fn open_lock(plan: &Plan, given: &Path, spans: bool) -> Result<FileLock, (String, u8)> {
    let path = if plan.follow_symlinks {
        resolve_symlinks(given)
    } else {
        given.to_path_buf()
    };
    let name = plan
        .name
        .clone()
        .unwrap_or_else(|| given.to_string_lossy().into_owned());
    let mut builder = FileLock::builder(&path)
        .name(name)
        .kind(plan.kind)
        .mode(0o666)
        .allow_directory(true)
        .owner_record(plan.owner_record)
        .spans(spans)
        // One acquisition per process: time it.
        .sample_every(1);
    if let Some(interval) = plan.watch {
        builder = builder.watch(interval);
    }
    if plan.no_fork {
        let noop = opentelemetry::metrics::MeterProvider::meter(
            &opentelemetry::metrics::noop::NoopMeterProvider::new(),
            lockmeter::metrics::SCOPE,
        );
        builder = builder.sink(Sink::new(noop));
    }
    builder.open().map_err(|e| open_failure(given, &e))
}

/// flock(1)'s message and status for a lock file that cannot be opened.
fn open_failure(path: &Path, e: &lockmeter::Error) -> (String, u8) {
    let shown = path.display();
    match e {
        lockmeter::Error::Symlink { .. } => (
            format!(
                "cannot open lock file {shown}: it is a symbolic link (not followed by default: \
                 a link planted in a shared directory could point the lock at another file; \
                 --follow-symlinks locks its target)"
            ),
            EX_NOINPUT,
        ),
        lockmeter::Error::NotRegularFile { .. } => (
            format!("cannot open lock file {shown}: not a regular file or directory"),
            EX_NOINPUT,
        ),
        lockmeter::Error::IsDirectory { .. } => (
            format!(
                "cannot open lock file {shown}: it is a directory (owner records need a \
                 regular file)"
            ),
            EX_NOINPUT,
        ),
        e => {
            let errno = e.errno();
            let code = if errno == Errno::NOMEM || errno == Errno::MFILE || errno == Errno::NFILE {
                EX_OSERR
            } else if errno == Errno::ROFS || errno == Errno::NOSPC {
                EX_CANTCREAT
            } else {
                EX_NOINPUT
            };
            (
                format!(
                    "cannot open lock file {shown}: {}",
                    strerror(&std::io::Error::from(errno))
                ),
                code,
            )
        }
    }
}

/// The file a chain of symbolic links ends at (`--follow-symlinks`); a dangling link's
/// target, to be created. Gives up after 40 links, leaving the last link for the open to
/// refuse.
fn resolve_symlinks(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::read_link(&p) {
            Ok(target) if target.is_absolute() => p = target,
            Ok(target) => {
                p = match p.parent() {
                    Some(dir) => dir.join(target),
                    None => target,
                }
            }
            Err(_) => break,
        }
    }
    p
}

/// Takes the file lock as `plan` says; records through `meter` when given (`-F`).
fn acquire_file<'a>(
    plan: &Plan,
    lock: &'a FileLock,
    mode: LockMode,
    meter: Option<&'a LockMeter>,
) -> Acquired<'a> {
    let attempt = meter.map(|m| m.start(mode));
    let shared = mode == LockMode::Shared;
    let r = match (plan.wait, shared) {
        (Wait::NonBlock, false) => lock.try_lock(),
        (Wait::NonBlock, true) => lock.try_lock_shared(),
        (Wait::Timeout(t), false) => lock.lock_timeout(t),
        (Wait::Timeout(t), true) => lock.lock_shared_timeout(t),
        (Wait::Forever, false) => lock.lock().map(Some),
        (Wait::Forever, true) => lock.lock_shared().map(Some),
    };
    match r {
        Ok(Some(guard)) => {
            let handoff = attempt.map(|a| {
                if guard.was_contended() {
                    a.conflict();
                }
                a.acquired(guard.was_contended())
            });
            Acquired::Held(Box::new(FileHeld {
                lock,
                guard,
                handoff,
            }))
        }
        Ok(None) => {
            let timed_out = matches!(plan.wait, Wait::Timeout(_));
            if let Some(a) = attempt {
                if timed_out {
                    a.timed_out();
                } else {
                    a.would_block();
                }
            }
            Acquired::Busy { timed_out }
        }
        Err(e) => {
            if let Some(a) = attempt {
                a.failed(e.errno_name());
            }
            Acquired::Failed {
                // flock(1)'s "PATH: strerror", then which step failed and the errno's name
                // (the step may be the check after locking, or the owner record's write).
                message: match &e {
                    lockmeter::Error::Os {
                        path,
                        errno,
                        operation,
                        ..
                    } => format!(
                        "{}: {} ({} during {operation})",
                        path.display(),
                        strerror(&std::io::Error::from(*errno)),
                        e.errno_name(),
                    ),
                    e => e.to_string(),
                },
                code: lock_failure_code(e.errno()),
            }
        }
    }
}

/// A held file lock.
struct FileHeld<'a> {
    lock: &'a FileLock,
    guard: FileLockGuard<'a>,
    /// With `-F`: the hold as the LockMeter recording this run sees it.
    handoff: Option<Hold<'a>>,
}

impl Held for FileHeld<'_> {
    fn describe(&self) -> String {
        let mode = match self.guard.mode() {
            LockMode::Exclusive => "exclusive",
            LockMode::Shared => "shared",
        };
        let mut s = format!(
            "lock: {} {mode} on {}; {}",
            self.lock.kind(),
            self.lock.path().display(),
            trust_text(self.lock.fs_info())
        );
        if let Some(t) = self.guard.fencing_token() {
            s.push_str(&format!("; fencing token {t}"));
        }
        s
    }

    fn inheritable_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.guard.as_fd())
    }

    fn release(self: Box<Self>) -> Result<(), String> {
        let FileHeld { guard, .. } = *self;
        // Back to close-on-exec first; failure only matters for later children (none).
        let _ = rustix::io::fcntl_setfd(guard.as_fd(), rustix::io::FdFlags::CLOEXEC);
        guard.unlock().map_err(|e| e.to_string())
    }

    fn hand_off(self: Box<Self>) {
        let FileHeld { guard, handoff, .. } = *self;
        if let Some(h) = handoff {
            h.handed_off();
        }
        // Keep the descriptor open and locked for COMMAND: the guard must not unlock it.
        std::mem::forget(guard);
    }
}

/// `-u` on a file: nothing is held (unlocking a fresh open file description releases nothing).
struct Unlocked<'a> {
    lock: &'a FileLock,
}

impl Held for Unlocked<'_> {
    fn describe(&self) -> String {
        format!(
            "lock: none (-u: {} opened, nothing to unlock on a fresh open)",
            self.lock.path().display()
        )
    }

    fn inheritable_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn release(self: Box<Self>) -> Result<(), String> {
        Ok(())
    }

    fn hand_off(self: Box<Self>) {}
}

/// `fs tmpfs: host-wide` or `fs fuse: unknown (…reasons…)`.
fn trust_text(info: &lockmeter::fs::FsInfo) -> String {
    let mut s = format!("fs {}: {}", info.fs_type, info.coherence);
    if !info.coherence.is_trustworthy() && !info.reasons.is_empty() {
        s.push_str(&format!(" ({})", info.reasons.join("; ")));
    }
    s
}

// ---- an inherited descriptor --------------------------------------------------------------

/// The descriptor form: lock (or unlock) the shell's descriptor `fd`. The lock belongs to the
/// shell's open file description and stays after lockmeter exits.
fn run_fd(plan: &Plan, fd: RawFd) -> ExitCode {
    // Checked before anything here opens a descriptor that could take the number.
    let Some(fd) = borrow_inherited(fd) else {
        eprintln!("lockmeter: {fd}: Bad file descriptor");
        return ExitCode::from(EX_DATAERR);
    };
    let mut delivery = Delivery::start("lockmeter-exec");
    let target = std::fs::read_link(format!("/proc/self/fd/{}", fd_number(fd))).ok();
    let shown = target.as_ref().map_or_else(
        || format!("fd {}", fd_number(fd)),
        |p| p.display().to_string(),
    );
    let started = Instant::now();
    let mode = match plan.op {
        Op::Unlock => {
            let acquired = match fd_unlock(fd, plan.kind) {
                Ok(()) => Acquired::Held(Box::new(FdUnlocked { shown })),
                Err(errno) => fd_failure(fd, errno),
            };
            return hold_and_run(plan, started.elapsed(), acquired, &mut delivery);
        }
        Op::Lock(mode) => mode,
    };
    let fs = target
        .as_deref()
        .map(|p| lockmeter::fs::fs_info(p, fd, plan.kind));
    let name = plan.name.clone().unwrap_or_else(|| shown.clone());
    let fs_type = fs
        .as_ref()
        .map_or("unknown", |f| f.metric_fs_type())
        .to_owned();
    let meter = LockMeter::with_attributes(
        &name,
        plan.kind.as_str(),
        &Sink::global(),
        &[opentelemetry::KeyValue::new(keys::FS_TYPE, fs_type)],
    );
    let attempt = meter.start(mode);
    let acquired = match fd_lock(fd, plan.kind, mode, plan.wait) {
        Ok(FdOutcome::Locked { contended }) => {
            if contended {
                attempt.conflict();
            }
            Acquired::Held(Box::new(FdHeld {
                description: format!(
                    "lock: {} {} on descriptor {} ({shown}){}",
                    plan.kind,
                    mode_text(mode),
                    fd_number(fd),
                    fs.as_ref()
                        .map(|f| format!("; {}", trust_text(f)))
                        .unwrap_or_default()
                ),
                hold: attempt.acquired(contended),
            }))
        }
        Ok(FdOutcome::Busy) => {
            attempt.would_block();
            Acquired::Busy { timed_out: false }
        }
        Ok(FdOutcome::TimedOut) => {
            attempt.timed_out();
            Acquired::Busy { timed_out: true }
        }
        Err(errno) => {
            attempt.failed(lockmeter_errno_name(errno));
            fd_failure(fd, errno)
        }
    };
    hold_and_run(plan, started.elapsed(), acquired, &mut delivery)
}

fn mode_text(mode: LockMode) -> &'static str {
    match mode {
        LockMode::Exclusive => "exclusive",
        LockMode::Shared => "shared",
    }
}

fn fd_number(fd: BorrowedFd<'_>) -> RawFd {
    std::os::fd::AsRawFd::as_raw_fd(&fd)
}

/// flock(1)'s message (`9: Bad file descriptor`) and status for a failed lock call.
fn fd_failure(fd: BorrowedFd<'_>, errno: Errno) -> Acquired<'static> {
    Acquired::Failed {
        message: format!(
            "{}: {}",
            fd_number(fd),
            strerror(&std::io::Error::from(errno))
        ),
        code: lock_failure_code(errno),
    }
}

/// The errno's symbolic name as lockmeter records it (`EBADF`).
fn lockmeter_errno_name(errno: Errno) -> &'static str {
    lockmeter::Error::Os {
        path: PathBuf::new(),
        operation: lockmeter::Operation::Lock,
        errno,
    }
    .errno_name()
}

/// `fd` as a descriptor lockmeter may use for the rest of its life, if it is open.
fn borrow_inherited(fd: RawFd) -> Option<BorrowedFd<'static>> {
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is non-negative; whether it is open is checked next, and lockmeter never
    // closes a descriptor it did not open, so an open inherited descriptor stays open for the
    // rest of the process.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_getfd(borrowed).ok().map(|_| borrowed)
}

/// How a lock call on a descriptor ended.
enum FdOutcome {
    Locked { contended: bool },
    Busy,
    TimedOut,
}

/// Shortest and longest pause between tries with `-w` (as `FileLock::lock_timeout` polls).
const POLL_MIN: Duration = Duration::from_micros(100);
const POLL_MAX: Duration = Duration::from_millis(10);

/// Locks `fd`: a non-blocking try first (so a conflict is counted), then as `wait` says.
fn fd_lock(
    fd: BorrowedFd<'_>,
    kind: LockKind,
    mode: LockMode,
    wait: Wait,
) -> Result<FdOutcome, Errno> {
    if fd_try(fd, kind, mode, false)? {
        return Ok(FdOutcome::Locked { contended: false });
    }
    match wait {
        Wait::NonBlock => Ok(FdOutcome::Busy),
        Wait::Forever => {
            fd_try(fd, kind, mode, true)?;
            Ok(FdOutcome::Locked { contended: true })
        }
        Wait::Timeout(t) => {
            let deadline = Instant::now() + t;
            let mut pause = POLL_MIN;
            loop {
                let now = Instant::now();
                if now >= deadline {
                    return Ok(FdOutcome::TimedOut);
                }
                std::thread::sleep(pause.min(deadline - now));
                pause = (pause * 2).min(POLL_MAX);
                if fd_try(fd, kind, mode, false)? {
                    return Ok(FdOutcome::Locked { contended: true });
                }
            }
        }
    }
}

/// One lock call; `Ok(false)` when a non-blocking one found the lock taken. A blocking one
/// retries on `EINTR` (a signal handler ran); any other interruption, such as a FUSE daemon's
/// `EINTR` answer (errno 512, `ERESTARTSYS`, in user space), is retried up to 8 times and then
/// reported as `EINTR`, as `lockmeter::FileLock` does.
fn fd_try(fd: BorrowedFd<'_>, kind: LockKind, mode: LockMode, block: bool) -> Result<bool, Errno> {
    use rustix::fs::FlockOperation as F;
    const RESTARTSYS: i32 = 512;
    let mut restarts = 0;
    loop {
        let r = match kind {
            LockKind::Ofd => ofd(fd, Some(mode), block),
            _ => rustix::fs::flock(
                fd,
                match (mode, block) {
                    (LockMode::Exclusive, true) => F::LockExclusive,
                    (LockMode::Exclusive, false) => F::NonBlockingLockExclusive,
                    (LockMode::Shared, true) => F::LockShared,
                    (LockMode::Shared, false) => F::NonBlockingLockShared,
                },
            ),
        };
        match r {
            Ok(()) => return Ok(true),
            Err(Errno::WOULDBLOCK) if !block => return Ok(false),
            Err(Errno::ACCESS) if !block && kind == LockKind::Ofd => return Ok(false),
            Err(Errno::INTR) if block => continue,
            Err(e) if (e == Errno::INTR || e.raw_os_error() == RESTARTSYS) && restarts < 8 => {
                restarts += 1;
            }
            Err(e) if e.raw_os_error() == RESTARTSYS => return Err(Errno::INTR),
            Err(e) => return Err(e),
        }
    }
}

fn fd_unlock(fd: BorrowedFd<'_>, kind: LockKind) -> Result<(), Errno> {
    match kind {
        LockKind::Ofd => ofd(fd, None, false),
        _ => rustix::fs::flock(fd, rustix::fs::FlockOperation::Unlock),
    }
}

/// Whole-file OFD lock (`F_OFD_SETLK[W]`, which rustix does not wrap); `None` unlocks.
fn ofd(fd: BorrowedFd<'_>, mode: Option<LockMode>, block: bool) -> Result<(), Errno> {
    let l_type = match mode {
        Some(LockMode::Exclusive) => libc::F_WRLCK,
        Some(LockMode::Shared) => libc::F_RDLCK,
        None => libc::F_UNLCK,
    };
    // SAFETY: an all-zero `flock` is a valid value; the fields that matter are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    let cmd = if block {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    // SAFETY: `fd` is open for the duration of the borrow and `fl` is an initialised
    // `struct flock` that outlives the call.
    let r = unsafe { libc::fcntl(fd_number(fd), cmd, &mut fl as *mut libc::flock) };
    if r == -1 {
        Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO))
    } else {
        Ok(())
    }
}

/// The shell's lock, held.
struct FdHeld<'a> {
    description: String,
    hold: Hold<'a>,
}

impl Held for FdHeld<'_> {
    fn describe(&self) -> String {
        self.description.clone()
    }

    fn inheritable_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn release(self: Box<Self>) -> Result<(), String> {
        // Never reached for the descriptor form (no COMMAND), and the lock is the shell's.
        self.hand_off();
        Ok(())
    }

    fn hand_off(self: Box<Self>) {
        self.hold.handed_off();
    }
}

/// `-u NUMBER`, done.
struct FdUnlocked {
    shown: String,
}

impl Held for FdUnlocked {
    fn describe(&self) -> String {
        format!("unlocked {}", self.shown)
    }

    fn inheritable_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn release(self: Box<Self>) -> Result<(), String> {
        Ok(())
    }

    fn hand_off(self: Box<Self>) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser, Debug)]
    struct T {
        #[command(flatten)]
        args: ExecArgs,
    }

    fn plan(args: &[&str]) -> Result<Plan, String> {
        let mut v = vec!["exec"];
        v.extend_from_slice(args);
        T::try_parse_from(v)
            .map_err(|e| e.to_string())
            .and_then(|t| t.args.plan())
    }

    #[test]
    fn flock_grammar() {
        let p = plan(&["-n", "f", "cmd", "-x"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.target, Target::Path("f".into()));
        assert_eq!(
            p.command,
            Some(vec!["cmd".into(), "-x".into()]),
            "options after FILE are COMMAND's"
        );
        assert_eq!(p.wait, Wait::NonBlock);
        let p = plan(&["-s", "-x", "-e", "-s", "9"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (p.target, p.command, p.op),
            (Target::Fd(9), None, Op::Lock(LockMode::Shared)),
            "the last of -s/-x/-e wins"
        );
        let p = plan(&["-w", "0", "f", "true"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.wait, Wait::NonBlock, "-w 0 is -n");
        let p = plan(&["-w", "1", "-w", "2.5", "f", "true"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.wait, Wait::Timeout(Duration::from_millis(2500)));
        let p = plan(&["f", "--", "cmd"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.command, Some(vec!["cmd".into()]));
        let p = plan(&["--fcntl", "-u", "9"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((p.kind, p.op), (LockKind::Ofd, Op::Unlock));
        let p =
            plan(&["--nb", "--wait", "3", "f", "-c", "echo a b"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.wait, Wait::NonBlock, "-n wins over -w, as in flock(1)");
        let cmd = p.command.unwrap_or_default();
        assert_eq!(&cmd[1..], ["-c", "echo a b"]);
    }

    #[test]
    fn flock_messages_for_bad_usage() {
        let err = |a: &[&str]| plan(a).err().unwrap_or_default();
        assert_eq!(
            err(&["-w", "soon", "f", "true"]),
            "invalid timeout value: 'soon'"
        );
        assert_eq!(
            err(&["-E", "300", "f", "true"]),
            "exit code out of range (expected 0 to 255)"
        );
        assert_eq!(err(&["-E", "x", "f", "true"]), "invalid exit code: 'x'");
        assert_eq!(
            err(&["f", "-c", "a", "b"]),
            "-c requires exactly one command argument"
        );
        assert_eq!(
            err(&["-F", "-o", "f", "true"]),
            "the --no-fork and --close options are incompatible"
        );
        assert_eq!(err(&["-n"]), "requires file descriptor, file or directory");
        assert!(err(&["f"]).starts_with("bad file descriptor: 'f'"));
        assert_eq!(
            err(&["99999999999"]),
            "bad file descriptor: '99999999999': Numerical result out of range"
        );
        assert!(err(&["--kind", "posix", "9"]).contains("POSIX"));
    }
}
