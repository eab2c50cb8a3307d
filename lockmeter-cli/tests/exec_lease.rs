//! `lockmeter exec --etcd|--redis|--postgres` and `lockmeter who` against real servers: shell
//! processes sharing a counter, `etcdctl lock` as a peer both ways, a holder paused past its
//! TTL, a server killed or a session terminated while COMMAND runs, and a server that is down.
#![cfg(all(feature = "etcd", feature = "redis", feature = "postgres"))]
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write as _};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lockmeter_testkit::free_port;
use lockmeter_testkit::servers::{Etcd, Postgres, Redis};

fn lm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lockmeter"));
    for (k, _) in std::env::vars() {
        if k.starts_with("OTEL_") {
            c.env_remove(k);
        }
    }
    c
}

/// A running `lockmeter exec` whose stdout lines arrive on a channel (stderr collected).
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Its stderr so far (read by a thread as it comes).
    err: std::sync::Arc<std::sync::Mutex<String>>,
    err_done: std::thread::JoinHandle<()>,
}

impl Running {
    fn spawn(backend: &str, url: &str, flags: &[&str], name: &str, script: &str) -> Running {
        let mut child = lm()
            .arg("exec")
            .arg(backend)
            .arg(url)
            .args(flags)
            .arg(name)
            .args(["--", "sh", "-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let errp = child.stderr.take().unwrap();
        let err = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = std::sync::Arc::clone(&err);
        let err_done = std::thread::spawn(move || {
            for l in BufReader::new(errp).lines() {
                let Ok(l) = l else { break };
                let mut s = sink.lock().unwrap();
                s.push_str(&l);
                s.push('\n');
            }
        });
        Running {
            child,
            lines,
            err,
            err_done,
        }
    }

    /// The next stdout line starting with `prefix` (panics after `within`).
    fn expect(&self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(e) => {
                    let err = self.err.lock().unwrap().clone();
                    panic!("no line starting with {prefix:?} within {within:?}: {e}; its stderr: {err}")
                }
            }
        }
    }

    fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }

    /// Exit code and stderr.
    fn finish(mut self) -> (Option<i32>, String) {
        drop(self.child.stdin.take());
        let st = self.child.wait().unwrap();
        self.err_done.join().unwrap();
        let err = self.err.lock().unwrap().clone();
        (st.code(), err)
    }
}

fn token_of(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("token="))
        .unwrap_or_else(|| panic!("no token= in {line:?}"))
        .parse()
        .unwrap()
}

/// The script a holder runs: prints `ready token=N`, then loops until SIGTERM, on which it
/// prints `got-term` and exits 3.
const HOLD: &str = "trap 'echo got-term; exit 3' TERM; echo ready token=$LOCKMETER_FENCING_TOKEN; \
                    while :; do sleep 0.05; done";

/// Four shell loops x 10 `lockmeter exec` each, incrementing a counter file with a
/// non-atomic read-then-write and appending their fencing tokens: no increment lost, tokens
/// strictly increasing in the order the critical sections ran.
fn exclusion_through_processes(backend: &str, url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("counter");
    let tokens = dir.path().join("tokens");
    std::fs::write(&counter, "0").unwrap();
    let lm = env!("CARGO_BIN_EXE_lockmeter");
    let body = format!(
        "n=$(cat {c}); echo $LOCKMETER_FENCING_TOKEN >> {t}; echo $((n+1)) > {c}",
        c = counter.display(),
        t = tokens.display()
    );
    let loops: Vec<Child> = (0..4)
        .map(|_| {
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "for i in 1 2 3 4 5 6 7 8 9 10; do {lm} exec {backend} {url} load -- sh -c '{body}' || exit 9; done"
                ))
                .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
                .spawn()
                .unwrap()
        })
        .collect();
    for mut l in loops {
        assert!(
            l.wait().unwrap().success(),
            "{backend}: a lockmeter exec failed"
        );
    }
    let n: u64 = std::fs::read_to_string(&counter)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(n, 40, "{backend}: increments lost");
    let toks: Vec<u64> = std::fs::read_to_string(&tokens)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(toks.len(), 40);
    assert!(
        toks.windows(2).all(|w| w[0] < w[1]),
        "{backend}: tokens not strictly increasing: {toks:?}"
    );
}

/// `lockmeter who` while a holder runs: the holder's token, and one waiter.
fn who_shows_holder_and_waiter(backend: &str, url: &str) {
    let holder = Running::spawn(backend, url, &[], "who", HOLD);
    let token = token_of(&holder.expect("ready", Duration::from_secs(10)));
    let waiter = Running::spawn(
        backend,
        url,
        &[],
        "who",
        "echo ready token=$LOCKMETER_FENCING_TOKEN",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let o = lm().args(["who", backend, url, "who"]).output().unwrap();
        assert!(
            o.status.success(),
            "who: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        if out.contains("waiters: 1") {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "{backend}: no waiter shown:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let holder_line = out.lines().find(|l| l.starts_with("holder: ")).unwrap();
    assert!(
        holder_line.contains(&format!("token {token}")),
        "{backend}: holder line {holder_line:?} lacks token {token}:\n{out}"
    );
    holder.signal(rustix::process::Signal::TERM); // forwarded to COMMAND
    let (code, _) = holder.finish();
    assert_eq!(code, Some(3));
    let next = token_of(&waiter.expect("ready", Duration::from_secs(10)));
    assert!(next > token);
    assert_eq!(waiter.finish().0, Some(0));
}

#[test]
fn etcd_exec_excludes_processes_and_who_reports() {
    let etcd = Etcd::start();
    exclusion_through_processes("--etcd", &etcd.url);
    who_shows_holder_and_waiter("--etcd", &etcd.url);
}

#[test]
fn redis_exec_excludes_processes_and_who_reports() {
    let redis = Redis::start();
    exclusion_through_processes("--redis", &redis.url);
    who_shows_holder_and_waiter("--redis", &redis.url);
}

#[test]
fn postgres_exec_excludes_processes_and_who_reports() {
    let pg = Postgres::start();
    exclusion_through_processes("--postgres", &pg.url);
    who_shows_holder_and_waiter("--postgres", &pg.url);
}

/// `etcdctl lock` holds: `lockmeter exec -n` fails with 1, and lockmeter gets in once etcdctl
/// lets go. lockmeter holds: `etcdctl lock NAME CMD` waits, and runs CMD after the release.
/// COMMAND sees ETCD_LOCK_KEY / ETCD_LOCK_REV as etcdctl sets them.
#[test]
fn etcd_exec_and_etcdctl_lock_exclude_each_other() {
    let etcd = Etcd::start();
    let mut ctl = etcd
        .ctl()
        .args(["lock", "shared-job"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Its stdout stays open until it exits: etcdctl prints the key's value after the key, and
    // a closed pipe killed it with SIGPIPE before it could unlock (the key then outlived it by
    // its session's 10 s TTL, racing this test's deadline).
    let (first_tx, first_rx) = mpsc::channel();
    let ctl_out = ctl.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(ctl_out).lines() {
            let Ok(l) = l else { break };
            let _ = first_tx.send(l);
        }
    });
    let first = first_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(first.starts_with("shared-job/"), "{first:?}");
    let o = lm()
        .args(["exec", "--etcd", &etcd.url, "-n", "shared-job", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "-n while etcdctl holds");
    let o = lm()
        .args([
            "exec",
            "--etcd",
            &etcd.url,
            "-w",
            "0.3",
            "-E",
            "42",
            "shared-job",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(42),
        "-w 0.3 -E 42 while etcdctl holds"
    );
    // The two that gave up left no key queued behind etcdctl's (each revokes its lease before
    // it answers; a key left to expire with its lease held every later waiter for its TTL).
    let keys = etcd.ctl_ok(&["get", "--prefix", "shared-job/", "--keys-only"]);
    let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(keys, [first.trim()], "keys after -n and -w gave up");
    let waiting = Running::spawn(
        "--etcd",
        &etcd.url,
        &[],
        "shared-job",
        "echo ready key=$ETCD_LOCK_KEY rev=$ETCD_LOCK_REV token=$LOCKMETER_FENCING_TOKEN; read _ || true",
    );
    // SIGINT: etcdctl lock unlocks on it (it catches os.Interrupt only); on SIGTERM it dies
    // holding, and the lock comes free only when its session's lease (TTL 10 s) runs out,
    // which raced this test's 10 s deadline.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(ctl.id() as i32).unwrap(),
        rustix::process::Signal::INT,
    )
    .unwrap();
    ctl.wait().unwrap();
    let line = waiting.expect("ready", Duration::from_secs(10));
    let key = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("key="))
        .unwrap()
        .to_owned();
    assert!(key.starts_with("shared-job/"), "{line}");
    let rev: u64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("rev="))
        .unwrap()
        .parse()
        .unwrap();
    let token = token_of(&line);
    assert!(rev >= token, "{line}");

    // Now etcdctl must wait for lockmeter.
    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("etcdctl-ran");
    let mut ctl = etcd
        .ctl()
        .args(["lock", "shared-job", "--", "sh", "-c"])
        .arg(format!("echo $ETCD_LOCK_KEY > {}", ran.display()))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = lm()
            .args(["who", "--etcd", &etcd.url, "shared-job"])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        if out.contains("waiters: 1") {
            assert!(
                out.contains(&format!("holder: {key}  token {token}")),
                "{out}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "etcdctl never queued:\n{out}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !ran.exists(),
        "etcdctl ran its command while lockmeter held the lock"
    );
    let (code, err) = waiting.finish(); // closes stdin: `read` returns, COMMAND exits 0
    assert_eq!(code, Some(0), "{err}");
    assert!(ctl.wait().unwrap().success());
    let theirs = std::fs::read_to_string(&ran).unwrap();
    assert!(theirs.starts_with("shared-job/") && theirs.trim() != key);
}

/// The holder (lockmeter itself) is stopped with SIGSTOP past its TTL: a second holder gets
/// the lock with a higher token; when the first resumes it reports the loss, SIGTERMs its
/// COMMAND (which was still running) and exits 75.
fn paused_holder(backend: &str, url: &str) {
    let first = Running::spawn(backend, url, &["--ttl", "2"], "paused", HOLD);
    let t1 = token_of(&first.expect("ready", Duration::from_secs(10)));
    first.signal(rustix::process::Signal::STOP);
    let t0 = Instant::now();
    let second = Running::spawn(
        backend,
        url,
        &["--ttl", "2", "-w", "10"],
        "paused",
        "echo ready token=$LOCKMETER_FENCING_TOKEN",
    );
    let t2 = token_of(&second.expect("ready", Duration::from_secs(10)));
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "second holder got in too early"
    );
    assert!(
        t2 > t1,
        "{backend}: token {t2} not above the paused holder's {t1}"
    );
    assert_eq!(second.finish().0, Some(0));
    first.signal(rustix::process::Signal::CONT);
    first.expect("got-term", Duration::from_secs(3));
    let (code, err) = first.finish();
    assert_eq!(code, Some(75), "{backend}: {err}");
    assert!(err.contains("lost (expired)"), "{backend}: {err}");
}

#[test]
fn etcd_paused_holder_is_told_and_its_command_stopped() {
    let etcd = Etcd::start();
    paused_holder("--etcd", &etcd.url);
}

#[test]
fn redis_paused_holder_is_told_and_its_command_stopped() {
    let redis = Redis::start();
    paused_holder("--redis", &redis.url);
}

/// A server killed (or a session terminated) while COMMAND runs: COMMAND gets SIGTERM within
/// the TTL and lockmeter exits 75 naming the reason.
fn loss_while_running(backend: &str, url: &str, flags: &[&str], cause: impl FnOnce()) -> String {
    let mut all = vec!["--ttl", "2"];
    all.extend_from_slice(flags);
    let holder = Running::spawn(backend, url, &all, "fault", HOLD);
    holder.expect("ready", Duration::from_secs(10));
    let t0 = Instant::now();
    cause();
    holder.expect("got-term", Duration::from_secs(4));
    let took = t0.elapsed();
    assert!(
        took <= Duration::from_millis(2500),
        "{backend}: COMMAND told after {took:?}"
    );
    let (code, err) = holder.finish();
    assert_eq!(code, Some(75), "{backend}: {err}");
    err
}

#[test]
fn etcd_server_killed_stops_the_command() {
    let mut etcd = Etcd::start();
    let url = etcd.url.clone();
    let err = loss_while_running("--etcd", &url, &[], || etcd.kill());
    assert!(err.contains("lost (connection)"), "{err}");
}

#[test]
fn redis_server_killed_and_key_deleted_stop_the_command() {
    let mut redis = Redis::start();
    let url = redis.url.clone();
    let err = loss_while_running("--redis", &url, &["--on-lost", "term"], || {
        redis.cli(&["DEL", "lockmeter:fault"]);
    });
    assert!(err.contains("lost (overwritten)"), "{err}");
    let err = loss_while_running("--redis", &url, &[], || redis.kill());
    assert!(err.contains("lost (connection)"), "{err}");
}

#[test]
fn postgres_terminated_session_stops_the_command_at_once() {
    let pg = Postgres::start();
    let key = lockmeter::lease::advisory_key("fault");
    let err = loss_while_running("--postgres", &pg.url, &[], || {
        let n = pg.psql(&format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' \
             AND granted AND ((classid::bigint << 32) | objid::bigint) = {key}"
        ));
        assert_eq!(n, "1");
    });
    assert!(err.contains("lost (connection)"), "{err}");
}

/// `--on-lost kill`: COMMAND is killed outright (its TERM trap never runs).
#[test]
fn on_lost_kill_kills_the_command() {
    let redis = Redis::start();
    let holder = Running::spawn(
        "--redis",
        &redis.url,
        &["--ttl", "1.5", "--on-lost", "kill"],
        "k",
        HOLD,
    );
    holder.expect("ready", Duration::from_secs(10));
    redis.cli(&["DEL", "lockmeter:k"]);
    let (code, err) = holder.finish();
    assert_eq!(code, Some(75), "{err}");
    assert!(err.contains("SIGKILL"), "{err}");
}

/// Nothing listening: exit 69 with a message naming the server, quickly.
#[test]
fn server_down_at_start_exits_69() {
    for (backend, url) in [
        ("--etcd", format!("http://127.0.0.1:{}", free_port())),
        ("--redis", format!("redis://127.0.0.1:{}/", free_port())),
        (
            "--postgres",
            format!("postgresql://postgres@127.0.0.1:{}/postgres", free_port()),
        ),
    ] {
        let t0 = Instant::now();
        let o = lm()
            .args([
                "exec",
                backend,
                &url,
                "--connect-timeout",
                "2",
                "down",
                "--",
                "true",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(69), "{backend}: {err}");
        assert!(
            err.contains("cannot connect") && err.contains("127.0.0.1"),
            "{backend}: {err}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(4),
            "{backend}: took {:?}",
            t0.elapsed()
        );
        let o = lm()
            .args(["who", backend, &url, "--connect-timeout", "2", "down"])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(69), "who {backend}");
    }
}

/// Usage errors: shared locks exist only for PostgreSQL; two backends at once.
#[test]
fn usage_errors_exit_64() {
    let o = lm()
        .args(["exec", "--etcd", "http://127.0.0.1:1", "-s", "x", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&o.stderr).contains("only with --postgres"));
    let o = lm()
        .args([
            "exec",
            "--etcd",
            "http://a",
            "--redis",
            "redis://b",
            "x",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64));
    let mut c = lm()
        .args(["exec", "--redis"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = c.stdin.take().unwrap().write_all(b"");
    assert_eq!(c.wait().unwrap().code(), Some(64));
}
