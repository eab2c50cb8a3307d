//! The one way tests launch the `lockmeter` CLI: [`Cli`] wraps the binary path the test passes
//! in (`Cli::new(env!("CARGO_BIN_EXE_lockmeter"))`, only known to the CLI crate's tests) and
//! gives commands with a clean environment, `exec` children started and ready, and a running
//! `demo` serving `/metrics`.

use std::ffi::OsStr;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};

use crate::proc::{spawn_ready, KillOnDrop};

/// The `lockmeter` binary under test.
#[derive(Debug, Clone)]
pub struct Cli {
    exe: PathBuf,
}

impl Cli {
    /// The binary at `exe` (pass `env!("CARGO_BIN_EXE_lockmeter")`).
    pub fn new(exe: impl Into<PathBuf>) -> Cli {
        Cli { exe: exe.into() }
    }

    /// `lockmeter ARGS` with a clean environment: no inherited `OTEL_*` variable or `RUST_LOG`
    /// (the test sets what it needs), so a developer's shell cannot change a test's outcome.
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = Command::new(&self.exe);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("OTEL_") || k == "RUST_LOG" {
                c.env_remove(k);
            }
        }
        c.args(args);
        c
    }

    /// `sh -c SCRIPT` with the same clean environment and `$LOCKMETER` naming the binary: for
    /// forms that need a shell around lockmeter, such as flock(1)'s descriptor form
    /// (`exec 9>FILE; "$LOCKMETER" exec -n 9; ...`), where the lock stays with the shell.
    pub fn shell(&self, script: &str) -> Command {
        let mut c = Command::new("sh");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("OTEL_") || k == "RUST_LOG" {
                c.env_remove(k);
            }
        }
        c.args(["-c", script]).env("LOCKMETER", &self.exe);
        c
    }

    /// Runs `lockmeter ARGS` to completion with captured output.
    pub fn output<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = self.command(args);
        c.output().unwrap_or_else(|e| panic!("run {c:?}: {e}"))
    }

    /// `lockmeter exec FLAGS LOCK -- sh -c SCRIPT` with stdin, stdout and stderr piped,
    /// returned once SCRIPT printed a line starting with `ready` (so the lock is held).
    pub fn exec_ready(&self, flags: &[&str], lock: &Path, script: &str) -> Child {
        let mut c = self.command(["exec"]);
        c.args(flags)
            .arg(lock)
            .args(["--", "sh", "-c", script])
            .stderr(Stdio::piped());
        spawn_ready(&mut c, "ready").0
    }

    /// Starts `lockmeter demo --listen 127.0.0.1:0 --workers 3 --interval INTERVAL` and
    /// returns once it serves `/metrics`.
    pub fn demo(&self, interval_secs: u32) -> Demo {
        let mut c = self.command(["demo", "--listen", "127.0.0.1:0", "--workers", "3"]);
        c.args(["--interval", &interval_secs.to_string()]);
        let (child, line) = spawn_ready(&mut c, "lockmeter demo: serving metrics on http://");
        let url = line.rsplit(' ').next().unwrap().to_owned();
        let addr = url
            .trim_start_matches("http://")
            .trim_end_matches("/metrics")
            .to_owned();
        assert!(
            url.ends_with("/metrics") && addr.starts_with("127.0.0.1:"),
            "{line}"
        );
        Demo {
            child: KillOnDrop(child),
            url,
            addr,
        }
    }
}

/// A running `lockmeter demo`; killed on drop unless [`Demo::interrupt`]ed.
pub struct Demo {
    child: KillOnDrop,
    /// `http://127.0.0.1:PORT/metrics`.
    pub url: String,
    /// `127.0.0.1:PORT`, for a scrape target.
    pub addr: String,
}

impl Demo {
    /// Sends SIGINT (Ctrl-C); returns the exit status and everything it printed afterwards
    /// (the final table).
    pub fn interrupt(mut self) -> (ExitStatus, String) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
        let mut rest = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut rest)
            .unwrap();
        (self.child.wait().unwrap(), rest)
    }
}

/// A finished command's stdout and stderr, together (for assertion messages and searches).
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
