//! Real lock servers for tests: etcd, Redis and PostgreSQL, each started on a free 127.0.0.1
//! port with its own data directory, waited for by its ready line, and stopped by its pid on
//! drop. A missing server binary fails the test, naming the Debian package to install.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::free_port;

/// Fails (never skips: the servers' tests cannot run half-way) when `tool` is missing, with
/// the message [`crate::tools`] gives: the tool, its package, and that `.ci/run` installs it.
/// `package` is the fallback for tools missing from [`crate::tools::TOOLS`].
pub fn need(tool: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if crate::tools::source_of(tool).is_some() {
            panic!("{}", crate::tools::missing_message(tool));
        }
        panic!("required tool `{tool}` is not installed: apt-get install {package} (.ci/run installs it)");
    }
}

/// A child process whose output is drained into a log by background threads.
struct Server {
    child: Child,
    log: Arc<Mutex<String>>,
    what: &'static str,
}

impl Server {
    /// Spawns `cmd`, and returns once a line of its stdout or stderr contains `ready`
    /// (panics with the log if it exits or 30 s pass first).
    fn spawn(what: &'static str, mut cmd: Command, ready: &'static str) -> Server {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel::<()>();
        let pipes: Vec<Box<dyn Read + Send>> = vec![
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for pipe in pipes {
            let log = Arc::clone(&log);
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if line.contains(ready) {
                        let _ = tx.send(());
                    }
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        drop(tx);
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(()) => Server { child, log, what },
            Err(_) => {
                let _ = child.kill();
                let st = child.wait();
                panic!(
                    "{what} did not print {ready:?} within 30 s (exit: {st:?}); its log:\n{}",
                    log.lock().unwrap()
                );
            }
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(st.success(), "kill -{sig} {} ({})", self.pid(), self.what);
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn run(what: &str, cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    out
}

/// A single-member etcd 3.4 cluster on 127.0.0.1.
pub struct Etcd {
    server: Server,
    _dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Etcd {
    pub fn start() -> Etcd {
        need("etcd", "etcd-server");
        need("etcdctl", "etcd-client");
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "lockmeter-test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("lockmeter-test={peer_url}")])
            .args(["--initial-cluster-state", "new"]);
        let server = Server::spawn("etcd", cmd, "ready to serve client requests");
        Etcd {
            server,
            _dir: dir,
            url,
        }
    }

    pub fn pid(&self) -> i32 {
        self.server.pid()
    }

    /// SIGKILL the server.
    pub fn kill(&mut self) {
        self.server.kill();
    }

    pub fn log(&self) -> String {
        self.server.log()
    }

    /// An `etcdctl` command (API v3) aimed at this server.
    pub fn ctl(&self) -> Command {
        let mut c = Command::new("etcdctl");
        c.env("ETCDCTL_API", "3").arg("--endpoints").arg(&self.url);
        c
    }

    /// Runs `etcdctl ARGS`, panics on failure, returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = run("etcdctl", self.ctl().args(args));
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A Redis server on 127.0.0.1 without persistence.
pub struct Redis {
    server: Server,
    _dir: tempfile::TempDir,
    /// `redis://127.0.0.1:PORT/`.
    pub url: String,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Redis {
        need("redis-server", "redis-server");
        need("redis-cli", "redis-tools");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path());
        let server = Server::spawn("redis-server", cmd, "Ready to accept connections");
        Redis {
            server,
            _dir: dir,
            url: format!("redis://127.0.0.1:{port}/"),
            port,
        }
    }

    pub fn pid(&self) -> i32 {
        self.server.pid()
    }

    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Runs `redis-cli -p PORT ARGS`, panics on failure, returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = run(
            "redis-cli",
            Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(args),
        );
        assert!(
            out.status.success(),
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// Where the PostgreSQL server binaries are (`initdb` is not on Debian's PATH).
pub fn pg_bin(tool: &str) -> PathBuf {
    if let Ok(out) = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
    {
        let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() && !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(tool))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found
        .pop()
        .unwrap_or_else(|| panic!("{}", crate::tools::missing_message(tool)))
}

/// A throwaway PostgreSQL cluster on 127.0.0.1 (trust authentication, fsync off). As root the
/// server runs as the `postgres` user through `setpriv` (which execs, so the pid is the
/// postmaster's).
pub struct Postgres {
    server: Server,
    dir: tempfile::TempDir,
    /// `postgresql://postgres@127.0.0.1:PORT/postgres`.
    pub url: String,
    pub port: u16,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn as_postgres(program: &Path) -> Command {
    if is_root() {
        need("setpriv", "util-linux");
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Postgres {
    pub fn start() -> Postgres {
        let (initdb, postgres) = (pg_bin("initdb"), pg_bin("postgres"));
        need("psql", "postgresql-client");
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        if is_root() {
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(st.success(), "chown postgres {}", dir.path().display());
        }
        let out = run(
            "initdb",
            as_postgres(&initdb)
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "-D",
                ])
                .arg(&data),
        );
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let mut cmd = as_postgres(&postgres);
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "max_connections=200"]);
        let server = Server::spawn(
            "postgres",
            cmd,
            "database system is ready to accept connections",
        );
        Postgres {
            server,
            dir,
            url: format!("postgresql://postgres@127.0.0.1:{port}/postgres"),
            port,
        }
    }

    pub fn pid(&self) -> i32 {
        self.server.pid()
    }

    /// SIGKILL the postmaster (its backends notice and exit).
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Runs one SQL command through `psql`, panics on failure, returns the unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        let out = run(
            "psql",
            Command::new("psql").args([
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.url,
                "-c",
                sql,
            ]),
        );
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The data directory's parent (the Unix socket is there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Immediate shutdown (SIGQUIT) so the backends go too, then reap.
        if self.server.child.try_wait().ok().flatten().is_none() {
            self.server.signal("QUIT");
            let _ = self.server.child.wait();
        }
    }
}
