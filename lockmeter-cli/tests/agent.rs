//! `lockmeter agent` and `lockmeter locks` beside programs that do not link lockmeter:
//! flock(1), Python's fcntl.lockf (POSIX) and OFD locks, a holder killed with SIGKILL.
//! The agent is a real process; its /metrics page is read over HTTP.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use lockmeter_testkit::{eventually, free_port, read_line_starting, require_tool};

fn lm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lockmeter"));
    for (k, _) in std::env::vars() {
        if k.starts_with("OTEL_") {
            c.env_remove(k);
        }
    }
    c
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A running `lockmeter agent`, restricted to one test's directory, stopped on drop.
struct Agent {
    child: Child,
    url: String,
    /// The agent's stderr goes to a file, readable while it runs.
    stderr: PathBuf,
    _stderr_dir: tempfile::TempDir,
}

impl Agent {
    fn start(dir: &Path, extra: &[&str]) -> Agent {
        Self::start_with(lm(), dir, extra)
    }

    fn start_with(mut cmd: Command, dir: &Path, extra: &[&str]) -> Agent {
        let port = free_port();
        let stderr_dir = tempfile::tempdir().unwrap();
        let stderr = stderr_dir.path().join("agent.stderr");
        let mut child = cmd
            .args(["agent", "--interval", "0.1", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--include")
            .arg(format!("{}/**", dir.display()))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let ready = read_line_starting(&mut child, "lockmeter agent: ready");
        assert!(ready.contains(&format!("127.0.0.1:{port}")), "{ready}");
        Agent {
            child,
            url: format!("http://127.0.0.1:{port}/metrics"),
            stderr,
            _stderr_dir: stderr_dir,
        }
    }

    fn metrics(&self) -> String {
        lockmeter_testkit::http_get(&self.url)
    }

    /// Sum of the samples of `metric` whose labels include `want`.
    fn value(&self, metric: &str, want: &[(&str, &str)]) -> f64 {
        value(&self.metrics(), metric, want)
    }

    /// Waits until `metric{want}` equals `v`.
    fn wait_for(&self, metric: &str, want: &[(&str, &str)], v: f64) {
        let mut last = f64::NAN;
        let mut body = String::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            if std::time::Instant::now() >= deadline {
                panic!(
                    "timed out waiting for {metric}{want:?} == {v} (last {last}); /metrics:\n{}\nagent stderr:\n{}",
                    lock_lines(&body),
                    self.stderr_now()
                );
            }
            body = self.metrics();
            last = value(&body, metric, want);
            if last == v {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// What the agent wrote to stderr so far.
    fn stderr_now(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn stop(mut self) -> String {
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        let st = self.child.wait().unwrap();
        let log = self.stderr_now();
        assert!(st.success(), "agent exited with {st}: {log}");
        log
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lock_lines(body: &str) -> String {
    body.lines()
        .filter(|l| l.starts_with("lock_") && !l.contains("_bucket{"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn labels(line: &str) -> Option<(&str, HashMap<String, String>, f64)> {
    let (head, v) = line.rsplit_once(' ')?;
    let (name, rest) = head.split_once('{')?;
    let rest = rest.strip_suffix('}')?;
    let mut m = HashMap::new();
    let mut s = rest;
    while let Some((k, r)) = s.split_once("=\"") {
        let end = r.find('"')?;
        m.insert(k.trim_start_matches(',').to_owned(), r[..end].to_owned());
        s = &r[end + 1..];
    }
    Some((name, m, v.parse().ok()?))
}

fn value(body: &str, metric: &str, want: &[(&str, &str)]) -> f64 {
    body.lines()
        .filter_map(labels)
        .filter(|(n, m, _)| {
            *n == metric
                && want
                    .iter()
                    .all(|(k, v)| m.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap()
        .trim()
        .to_owned()
}

/// `flock [-s] PATH sh -c 'echo locked; read _'`, returned once it holds the lock.
fn flock_holder(path: &Path, shared: bool) -> Child {
    lockmeter_testkit::flock_holder(path, shared)
}

/// A blocking `flock [-s] PATH true`, returned at once (it waits for the lock).
fn flock_waiter(path: &Path, shared: bool) -> Child {
    let mut c = Command::new("flock");
    if shared {
        c.arg("-s");
    }
    c.arg(path).arg("true").spawn().unwrap()
}

fn release(mut c: Child) {
    c.stdin.take().unwrap().write_all(b"\n").unwrap();
    assert!(c.wait().unwrap().success());
}

/// A Python process that takes a lock with `how` ("lockf": fcntl.lockf, POSIX; "ofd":
/// F_OFD_SETLKW), prints `locked`, and releases and exits on a line on stdin.
fn python_holder(path: &Path, how: &str) -> Child {
    let script = r#"
import fcntl, os, struct, sys
path, how = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
if how == "lockf":
    fcntl.lockf(fd, fcntl.LOCK_EX)
else:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
print("locked", flush=True)
sys.stdin.readline()
"#;
    let mut c = Command::new("python3")
        .args(["-c", script, p(path), how])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    read_line_starting(&mut c, "locked");
    c
}

/// Python doing `n` lock+unlock cycles with `how` ("lockf", "ofd", "flock"), then exiting.
#[cfg(feature = "ebpf")]
fn python_cycles(path: &Path, how: &str, n: u32) {
    let script = r#"
import fcntl, os, struct, sys
path, how, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
for _ in range(n):
    if how == "lockf":
        fcntl.lockf(fd, fcntl.LOCK_EX); fcntl.lockf(fd, fcntl.LOCK_UN)
    elif how == "ofd":
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_UNLCK, 0, 0, 0, 0))
    else:
        fcntl.flock(fd, fcntl.LOCK_EX); fcntl.flock(fd, fcntl.LOCK_UN)
"#;
    let st = Command::new("python3")
        .args(["-c", script, p(path), how, &n.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// The tools every test here runs; false (a skip, recorded) only when missing tools are
/// explicitly allowed (`LOCKMETER_TEST_ALLOW_MISSING=1`), otherwise a missing one fails.
fn tools() -> bool {
    require_tool("flock") && require_tool("python3")
}

fn key(path: &Path) -> (&'static str, String) {
    ("lock_name", path.to_str().unwrap().to_owned())
}

fn with<'a>(
    path: &'a (&'static str, String),
    more: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut v = vec![(path.0, path.1.as_str())];
    v.extend_from_slice(more);
    v
}

#[test]
fn sampling_flock_holder_and_waiters() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("cron.lock");
    let agent = Agent::start(dir.path(), &["--source", "sampling"]);
    let k = key(&lock);
    let holder = flock_holder(&lock, false);
    agent.wait_for(
        "lock_held",
        &with(
            &k,
            &[
                ("lock_kind", "flock"),
                ("lock_mode", "exclusive"),
                ("process_executable_name", "flock"),
            ],
        ),
        1.0,
    );
    let w1 = flock_waiter(&lock, false);
    let w2 = flock_waiter(&lock, false);
    let w3 = flock_waiter(&lock, true);
    agent.wait_for(
        "lock_waiters",
        &with(
            &k,
            &[
                ("lock_kind", "flock"),
                ("lock_mode", "exclusive"),
                ("process_executable_name", "flock"),
            ],
        ),
        2.0,
    );
    agent.wait_for("lock_waiters", &with(&k, &[("lock_mode", "shared")]), 1.0);
    let body = agent.metrics();
    assert!(value(&body, "lock_hold_age_seconds", &with(&k, &[])) >= 0.0);
    assert!(body.contains("fs_type=\""), "fs.type is exported");
    assert!(
        !body.contains(&format!("{}", holder.id())),
        "no pids in labels"
    );

    // The table shows the same.
    let out = lm()
        .args(["locks", "--json", "--include"])
        .arg(format!("{}/**", dir.path().display()))
        .output()
        .unwrap();
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let locks = doc["locks"].as_array().unwrap();
    assert_eq!(locks.len(), 1, "{doc}");
    assert_eq!(locks[0]["path"], p(&lock));
    assert_eq!(locks[0]["kind"], "flock");
    assert_eq!(locks[0]["holders"][0]["command"], "flock");
    assert_eq!(locks[0]["holders"][0]["pid"], holder.id());
    assert_eq!(locks[0]["waiters"].as_array().unwrap().len(), 3);
    assert_eq!(locks[0]["fs_trust"], "host-wide");
    let text = lm()
        .args(["locks", "--include"])
        .arg(format!("{}/**", dir.path().display()))
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("COMMAND") && text.contains("HELD FOR"),
        "{text}"
    );
    assert_eq!(text.matches("└ waiting: flock pid").count(), 3, "{text}");

    release(holder);
    for mut w in [w1, w2, w3] {
        assert!(w.wait().unwrap().success());
    }
    agent.wait_for("lock_held", &with(&k, &[]), 0.0);
    agent.wait_for("lock_waiters", &with(&k, &[]), 0.0);
    // Sampled hold times: the holder's hold was seen start and end.
    let holds = agent.value(
        "lock_duration_seconds_count",
        &with(
            &k,
            &[
                ("process_executable_name", "flock"),
                ("lock_mode", "exclusive"),
            ],
        ),
    );
    assert!(holds >= 1.0, "sampled hold recorded: {holds}");
    let log = agent.stop();
    assert!(
        !log.contains("falling back"),
        "sampling was asked for: {log}"
    );
}

#[test]
fn sampling_python_posix_and_ofd_holders() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &["--source", "sampling"]);
    let posix = dir.path().join("posix.lock");
    let ofd = dir.path().join("ofd.lock");
    let a = python_holder(&posix, "lockf");
    let b = python_holder(&ofd, "ofd");
    let exe = comm(a.id());
    let (kp, ko) = (key(&posix), key(&ofd));
    agent.wait_for(
        "lock_held",
        &with(
            &kp,
            &[
                ("lock_kind", "posix"),
                ("lock_mode", "exclusive"),
                ("process_executable_name", &exe),
            ],
        ),
        1.0,
    );
    // OFD locks have no pid in /proc/locks: holder and path come from fdinfo.
    agent.wait_for(
        "lock_held",
        &with(
            &ko,
            &[
                ("lock_kind", "ofd"),
                ("lock_mode", "exclusive"),
                ("process_executable_name", &exe),
            ],
        ),
        1.0,
    );
    // A waiter behind the OFD lock (an OFD waiter has no pid either).
    let mut waiter = Command::new("python3")
        .args([
            "-c",
            "import fcntl,os,struct,sys; fd=os.open(sys.argv[1], os.O_RDWR); \
             fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, struct.pack('hhqqi', fcntl.F_WRLCK, 0, 0, 0, 0))",
            p(&ofd),
        ])
        .spawn()
        .unwrap();
    agent.wait_for("lock_waiters", &with(&ko, &[("lock_kind", "ofd")]), 1.0);
    release(a);
    release(b);
    assert!(waiter.wait().unwrap().success());
    agent.wait_for("lock_held", &with(&kp, &[]), 0.0);
    agent.wait_for("lock_held", &with(&ko, &[]), 0.0);
    agent.stop();
}

#[test]
fn killed_holder_releases_and_the_hold_is_recorded() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("killed.lock");
    let k = key(&lock);
    let agent = Agent::start(dir.path(), &["--source", "sampling"]);
    let mut holder = python_holder(&lock, "lockf");
    let exe = comm(holder.id());
    agent.wait_for("lock_held", &with(&k, &[("lock_kind", "posix")]), 1.0);
    // Wait until a later sample saw it again (its age is then above zero), so the hold has a
    // known start.
    eventually("a second sample of the hold", || {
        agent.value("lock_hold_age_seconds", &with(&k, &[])) > 0.0
    });
    holder.kill().unwrap();
    holder.wait().unwrap();
    agent.wait_for("lock_held", &with(&k, &[]), 0.0);
    agent.wait_for(
        "lock_duration_seconds_count",
        &with(
            &k,
            &[("lock_kind", "posix"), ("process_executable_name", &exe)],
        ),
        1.0,
    );
    agent.stop();
}

#[test]
fn migration_seen_from_outside() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("moved.lock");
    let gone = dir.path().join("gone.lock");
    let agent = Agent::start(dir.path(), &["--source", "sampling"]);
    let a = flock_holder(&lock, false);
    let b = flock_holder(&gone, false);
    let (k, kg) = (key(&lock), key(&gone));
    agent.wait_for("lock_held", &with(&k, &[]), 1.0);
    agent.wait_for("lock_held", &with(&kg, &[]), 1.0);
    // Replace one lock file under its holder, unlink the other.
    let tmp = dir.path().join("new.tmp");
    std::fs::write(&tmp, b"").unwrap();
    std::fs::rename(&tmp, &lock).unwrap();
    std::fs::remove_file(&gone).unwrap();
    agent.wait_for(
        "lock_inode_migrations_total",
        &with(
            &k,
            &[
                ("migration_kind", "replaced"),
                ("migration_detected_at", "agent"),
                ("lock_kind", "flock"),
            ],
        ),
        1.0,
    );
    agent.wait_for(
        "lock_inode_migrations_total",
        &with(
            &kg,
            &[
                ("migration_kind", "unlinked"),
                ("migration_detected_at", "agent"),
            ],
        ),
        1.0,
    );
    // Counted once per hold, not once per sample.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        agent.value("lock_inode_migrations_total", &with(&k, &[])),
        1.0
    );
    release(a);
    release(b);
    let log = agent.stop();
    assert!(
        log.contains("replaced"),
        "a warning names the migration: {log}"
    );
}

#[test]
fn name_map_folds_and_top_bounds_series() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let map = format!("{}/job-*.lock=jobs", dir.path().display());
    let agent = Agent::start(
        dir.path(),
        &["--source", "sampling", "--name-map", &map, "--top", "1"],
    );
    let a = flock_holder(&dir.path().join("job-1.lock"), false);
    let b = flock_holder(&dir.path().join("job-2.lock"), false);
    let c = flock_holder(&dir.path().join("job-3.lock"), true);
    agent.wait_for("lock_held", &[("lock_name", "jobs")], 3.0);
    // A second name beyond --top 1 (less busy than "jobs") is folded into "(other)".
    let d = flock_holder(&dir.path().join("other.lock"), false);
    agent.wait_for("lock_held", &[("lock_name", "(other)")], 1.0);
    let body = agent.metrics();
    assert!(
        !body.contains("job-1.lock"),
        "per-resource names folded:\n{}",
        lock_lines(&body)
    );
    for h in [a, b, c, d] {
        release(h);
    }
    agent.stop();
}

#[test]
fn untrusted_file_system_is_flagged_once() {
    if !tools() {
        return;
    }
    // None only when missing tools are explicitly allowed (the skip is recorded).
    let Some(fuse) = lockmeter_testkit::Bindfs::new(&[]) else {
        return;
    };
    let lock = fuse.a().join("fuse.lock");
    let agent = Agent::start(fuse.dir.path(), &["--source", "sampling"]);
    let h = flock_holder(&lock, false);
    let k = key(&lock);
    agent.wait_for(
        "lock_untrusted",
        &with(
            &k,
            &[
                ("fs_type", "fuse"),
                ("fs_coherence", "unknown"),
                ("lock_kind", "flock"),
            ],
        ),
        1.0,
    );
    agent.wait_for("lock_held", &with(&k, &[("fs_type", "fuse")]), 1.0);
    release(h);
    let log = agent.stop();
    assert_eq!(
        log.matches("may not exclude").count(),
        1,
        "one warning per path: {log}"
    );
}

#[test]
fn locks_one_shot_and_bad_usage() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("t.lock");
    let h = flock_holder(&lock, true);
    let out = lm()
        .args(["locks", "--include"])
        .arg(format!("{}/**", dir.path().display()))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains(p(&lock)))
        .expect("a row for the lock");
    for want in ["flock", "shared", "≤", "ext4", "host-wide"] {
        if want == "ext4" && !line.contains(want) {
            continue; // the test directory may be on another local file system
        }
        assert!(line.contains(want), "{want} in {line:?}");
    }
    release(h);
    let bad = lm()
        .args(["locks", "--name-map", "nonsense"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(64));
    let bad = lm()
        .args(["locks", "--proc-root", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(71));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("/nonexistent/locks"), "names the path: {err}");
}

/// Without the privileges to load BPF programs, `--source auto` falls back with one log line.
#[test]
fn falls_back_to_sampling_without_privileges() {
    if !tools() {
        return;
    }
    if !require_tool("setpriv") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    // A copy nobody can execute (the build directory may not be searchable by nobody).
    let bin = dir.path().join("lockmeter");
    std::fs::copy(env!("CARGO_BIN_EXE_lockmeter"), &bin).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ])
    .arg(&bin);
    let agent = Agent::start_with(cmd, dir.path(), &["--source", "auto"]);
    let lock = dir.path().join("nobody.lock");
    let h = flock_holder(&lock, false);
    // /proc/locks is readable by anyone; another user's fds are not, so the path is unknown
    // and the lock is named by device and inode (not admitted by --include), but the agent
    // keeps running and serving.
    assert!(
        agent.metrics().contains("target_info"),
        "still serving /metrics"
    );
    release(h);
    let log = agent.stop();
    assert_eq!(
        log.matches("falling back to /proc/locks sampling").count(),
        1,
        "one clear line: {log}"
    );
}

#[cfg(feature = "ebpf")]
mod tracepoints {
    use super::*;

    /// Waits (the source drains every 20 ms) until `metric{want}` reaches `v`, then checks it
    /// stays there.
    fn exactly(agent: &Agent, metric: &str, want: &[(&str, &str)], v: f64) {
        agent.wait_for(metric, want, v);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(
            agent.value(metric, want),
            v,
            "{metric}{want:?} went past {v}"
        );
    }

    #[test]
    fn counts_equal_operations_for_flock_posix_and_ofd() {
        if !tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::start(dir.path(), &["--source", "tracepoints"]);
        let f = dir.path().join("flock.lock");
        let (kf, n) = (key(&f), 5);
        for _ in 0..n {
            let st = Command::new("flock").arg(&f).arg("true").status().unwrap();
            assert!(st.success());
        }
        let fl = [
            ("lock_kind", "flock"),
            ("lock_mode", "exclusive"),
            ("process_executable_name", "flock"),
        ];
        exactly(
            &agent,
            "lock_wait_duration_seconds_count",
            &with(&kf, &[&fl[..], &[("lock_outcome", "acquired")]].concat()),
            5.0,
        );
        exactly(
            &agent,
            "lock_duration_seconds_count",
            &with(&kf, &fl),
            f64::from(n),
        );
        exactly(
            &agent,
            "lock_acquisitions_total",
            &with(&kf, &[&fl[..], &[("lock_contended", "false")]].concat()),
            5.0,
        );

        // POSIX (lockf) and OFD from Python: 3 and 4 lock+unlock cycles.
        let px = dir.path().join("posix.lock");
        let ofd = dir.path().join("ofd.lock");
        python_cycles(&px, "lockf", 3);
        python_cycles(&ofd, "ofd", 4);
        let (kp, ko) = (key(&px), key(&ofd));
        exactly(
            &agent,
            "lock_wait_duration_seconds_count",
            &with(&kp, &[("lock_kind", "posix"), ("lock_outcome", "acquired")]),
            3.0,
        );
        exactly(
            &agent,
            "lock_duration_seconds_count",
            &with(&kp, &[("lock_kind", "posix"), ("lock_mode", "exclusive")]),
            3.0,
        );
        exactly(
            &agent,
            "lock_wait_duration_seconds_count",
            &with(&ko, &[("lock_kind", "ofd"), ("lock_outcome", "acquired")]),
            4.0,
        );
        exactly(
            &agent,
            "lock_duration_seconds_count",
            &with(&ko, &[("lock_kind", "ofd"), ("lock_mode", "exclusive")]),
            4.0,
        );
        assert_eq!(agent.value("lock_conflicts_total", &with(&kf, &[])), 0.0);
        // The file system is found (through the mount table) for tracepoint series too.
        assert_eq!(
            agent.value(
                "lock_acquisitions_total",
                &with(&kf, &[("fs_type", "unknown")])
            ),
            0.0
        );
        agent.stop();
    }

    #[test]
    fn contention_would_block_and_killed_holder() {
        if !tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::start(dir.path(), &["--source", "tracepoints"]);
        let f = dir.path().join("busy.lock");
        let k = key(&f);
        let holder = flock_holder(&f, false);
        // A non-blocking attempt that finds it taken: would_block, a conflict.
        let st = Command::new("flock")
            .args(["-n"])
            .arg(&f)
            .arg("true")
            .status()
            .unwrap();
        assert_eq!(st.code(), Some(1));
        exactly(
            &agent,
            "lock_wait_duration_seconds_count",
            &with(&k, &[("lock_outcome", "would_block")]),
            1.0,
        );
        // A blocking waiter: it waits, then acquires (contended).
        let mut waiter = flock_waiter(&f, false);
        agent.wait_for("lock_waiters", &with(&k, &[]), 1.0); // sampling sees it blocked
        release(holder);
        assert!(waiter.wait().unwrap().success());
        exactly(
            &agent,
            "lock_conflicts_total",
            &with(&k, &[("lock_kind", "flock")]),
            2.0,
        );
        exactly(
            &agent,
            "lock_acquisitions_total",
            &with(&k, &[("lock_contended", "true")]),
            1.0,
        );
        exactly(
            &agent,
            "lock_acquisitions_total",
            &with(&k, &[("lock_contended", "false")]),
            1.0,
        );
        exactly(
            &agent,
            "lock_wait_duration_seconds_count",
            &with(&k, &[("lock_outcome", "acquired")]),
            2.0,
        );
        exactly(&agent, "lock_duration_seconds_count", &with(&k, &[]), 2.0);
        let body = agent.metrics();
        let waited = value(
            &body,
            "lock_wait_duration_seconds_sum",
            &with(&k, &[("lock_outcome", "acquired")]),
        );
        assert!(waited > 0.0, "the contended wait took time: {waited}");

        // A POSIX holder killed with SIGKILL: the kernel's release at exit ends the hold.
        let px = dir.path().join("killed.lock");
        let kp = key(&px);
        let mut h = python_holder(&px, "lockf");
        exactly(
            &agent,
            "lock_acquisitions_total",
            &with(&kp, &[("lock_kind", "posix")]),
            1.0,
        );
        h.kill().unwrap();
        h.wait().unwrap();
        exactly(
            &agent,
            "lock_duration_seconds_count",
            &with(&kp, &[("lock_kind", "posix")]),
            1.0,
        );
        agent.stop();
    }
}

/// Every query of the host-locks dashboard is valid PromQL (promtool parses it as a rule).
#[test]
fn host_locks_dashboard_queries_are_valid_promql() {
    if !require_tool("promtool") {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(repo.join("grafana/dashboards/host-locks.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::String(e)) = m.get("expr") {
                    out.push(e.clone());
                }
                m.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dash["panels"], &mut exprs);
    assert!(exprs.len() >= 15, "{} queries", exprs.len());
    let mut rules = String::from("groups:\n  - name: host-locks\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$job", ".*")
            .replace("$lock_kind", ".*")
            .replace("$fs_type", ".*");
        assert!(e.contains("lock_"), "{e}");
        rules.push_str(&format!(
            "      - record: host_locks:q{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, rules).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
