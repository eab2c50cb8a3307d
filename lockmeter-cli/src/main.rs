//! `lockmeter`: an instrumented `flock(1)`, a demo, and lock diagnostics.

mod agent;
mod delivery;
mod demo;
mod exec;
mod exec_lease;
mod locks;
mod probe;
mod timefmt;
mod who;

use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

/// Exit status for bad usage, as `flock(1)` (sysexits `EX_USAGE`).
pub(crate) const EX_USAGE: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "lockmeter",
    version,
    about = "Observable, honest locks",
    long_about = "lockmeter measures how long locks are waited for and held, counts conflicts, \
and notices lock files that were replaced under a lock. Metrics go out through OpenTelemetry \
(OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set, or a Prometheus /metrics endpoint)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run COMMAND holding a lock on FILE, or lock a descriptor: flock(1), with metrics.
    Exec(exec::ExecArgs),
    /// Run workers that contend on a few lock files, serve /metrics and print a live summary.
    Demo(demo::DemoArgs),
    /// Check whether locking on PATH can be trusted (file system, exclusion, split brain).
    Probe(probe::ProbeArgs),
    /// Show who holds PATH: its owner record and the kernel's locks on it.
    Who(who::WhoArgs),
    /// Export every file lock on this host (/proc/locks, kernel tracepoints) as metrics.
    Agent(agent::AgentArgs),
    /// List every file lock on this host: holders, waiters, hold age, kind, fs trust.
    Locks(agent::LocksArgs),
    /// Internal: try a lock from a second process for `probe`.
    #[command(hide = true)]
    ProbeHelper(probe::HelperArgs),
}

/// The command line definition, its one-line summary naming every subcommand (so that
/// `lockmeter` alone, and `--help`, say at a glance what there is).
fn command() -> clap::Command {
    let cmd = Cli::command();
    let names: Vec<String> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| s.get_name().to_owned())
        .collect();
    let about = format!(
        "Observable, honest locks. Commands: {} (lockmeter COMMAND --help)",
        names.join(", ")
    );
    cmd.about(about)
}

fn main() -> ExitCode {
    // `exec`/`who` with --etcd, --redis or --postgres: distributed locks (exec_lease.rs).
    if let Some(code) = exec_lease::intercept() {
        return code;
    }
    let parsed = command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || matches!(
                    e.kind(),
                    ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                )
            {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(EX_USAGE)
                } else {
                    ExitCode::SUCCESS
                };
            }
            // One line naming the problem; `lockmeter exec --help` has the rest.
            let rendered = e.render().to_string();
            let mut lines = rendered.lines().map(str::trim).filter(|l| !l.is_empty());
            let mut msg = lines
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ")
                .to_owned();
            // "the following required arguments were not provided:" names them on the next line.
            if msg.ends_with(':') {
                if let Some(next) = lines.next() {
                    msg = format!("{msg} {next}");
                }
            }
            eprintln!("lockmeter: {msg}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match cli.command {
        Command::Exec(args) => exec::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Probe(args) => probe::run(args),
        Command::Who(args) => who::run(args),
        Command::Agent(args) => agent::run_agent(args),
        Command::Locks(args) => agent::run_locks(args),
        Command::ProbeHelper(args) => probe::helper(args),
    }
}
