//! `lockmeter exec` against a file system that fails on purpose (`testkit::faultfs`): every
//! step (open, lock, the check after locking, unlock) x every kind x each errno, in the file
//! form and (lock faults) the descriptor form. Each run: flock(1)'s exit status for the failure,
//! a message naming the path, the step and the errno, COMMAND not run when the lock was not
//! had, nothing left locked behind the mount, and (read back from a real OTLP receiver)
//! `lock.errors{lock.operation, error.type}` exactly once for the run.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

use lockmeter_testkit::{eventually, require_tool, text, Cli, Fault, FaultFs, Op, Rotel};

fn lm() -> Cli {
    Cli::new(env!("CARGO_BIN_EXE_lockmeter"))
}

const KINDS: [&str; 3] = ["flock", "ofd", "posix"];
const ERRNOS: [(i32, &str, &str); 5] = [
    (libc::EIO, "EIO", "Input/output error"),
    (libc::ENOLCK, "ENOLCK", "No locks available"),
    (libc::EINTR, "EINTR", "Interrupted system call"),
    (libc::EACCES, "EACCES", "Permission denied"),
    (libc::ENOSPC, "ENOSPC", "No space left on device"),
];

/// A run's expected `lock.errors` point: (operation, error type), or none.
type Expected = BTreeMap<String, Option<(&'static str, &'static str)>>;

struct Runner<'a> {
    fs: &'a FaultFs,
    rotel: &'a Rotel,
    expected: Expected,
}

impl Runner<'_> {
    /// `lockmeter exec --kind KIND FLAGS --name NAME PATH -- sh -c 'touch MARKER'`.
    fn exec(&mut self, name: &str, kind: &str, flags: &[&str], rel: &str) -> (Output, bool) {
        let marker = self.fs.backing(&format!("{name}.ran"));
        let out = lm()
            .command(["exec", "--kind", kind])
            .args(flags)
            .args(["--name", name])
            .arg(self.fs.path(rel))
            .args(["--", "sh", "-c"])
            .arg(format!("touch '{}'", marker.display()))
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                self.rotel.endpoint("http/protobuf"),
            )
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
            .env("OTEL_SERVICE_NAME", "faults")
            .output()
            .unwrap();
        (out, marker.exists())
    }

    fn expect(&mut self, name: &str, point: Option<(&'static str, &'static str)>) {
        self.expected.insert(name.to_owned(), point);
    }

    /// Every run's `lock.errors`, as the receiver got them: exactly the expected point.
    fn check_metrics(&self) {
        let mut got: BTreeMap<String, Vec<(String, String, f64)>> = BTreeMap::new();
        eventually("every run's export at the receiver", || {
            let (metrics, _) = self.rotel.dump();
            let seen: std::collections::BTreeSet<String> = metrics
                .iter()
                .filter(|m| m.service == "faults")
                .flat_map(|m| m.points.iter())
                .filter_map(|p| p.attrs.get("lock.name").cloned())
                .collect();
            got.clear();
            for m in metrics
                .iter()
                .filter(|m| m.service == "faults" && m.name == "lock.errors")
            {
                for p in &m.points {
                    let name = p.attrs.get("lock.name").cloned().unwrap_or_default();
                    got.entry(name).or_default().push((
                        p.attrs.get("lock.operation").cloned().unwrap_or_default(),
                        p.attrs.get("error.type").cloned().unwrap_or_default(),
                        p.value.unwrap_or(0.0),
                    ));
                }
            }
            self.expected.keys().all(|n| seen.contains(n))
        });
        for (name, want) in &self.expected {
            let points = got.get(name).cloned().unwrap_or_default();
            match want {
                Some((op, errno)) => assert_eq!(
                    points,
                    vec![(op.to_string(), errno.to_string(), 1.0)],
                    "{name}: lock.errors"
                ),
                None => assert!(points.is_empty(), "{name}: no error expected: {points:?}"),
            }
        }
    }
}

fn assert_failed(what: &str, out: &Output, ran: bool, code: i32, path: &Path, needles: &[&str]) {
    let t = text(out);
    assert_eq!(out.status.code(), Some(code), "{what}: {t}");
    assert!(!ran, "{what}: COMMAND ran without the lock");
    assert!(
        t.contains(&path.display().to_string()),
        "{what}: names the path: {t}"
    );
    for n in needles {
        assert!(t.contains(n), "{what}: says {n:?}: {t}");
    }
}

#[test]
fn exec_under_faults() {
    if !require_tool("rotel-agent") {
        return;
    }
    let fs = FaultFs::mount();
    let rotel = Rotel::start();
    let mut r = Runner {
        fs: &fs,
        rotel: &rotel,
        expected: Expected::new(),
    };
    for kind in KINDS {
        for (errno, name, strerror) in ERRNOS {
            // Open: flock(1)'s "cannot open lock file"; 73 when it cannot be created for lack
            // of space, else 66.
            let case = format!("open-{kind}-{name}");
            let rel = format!("{case}.lock");
            fs.inject(Fault::fail(Op::Open, errno).path(rel.as_str()));
            let (out, ran) = r.exec(&case, kind, &[], &rel);
            let code = if errno == libc::ENOSPC { 73 } else { 66 };
            assert_failed(
                &case,
                &out,
                ran,
                code,
                &fs.path(&rel),
                &["cannot open lock file", strerror],
            );
            r.expect(&case, Some(("open", name)));
            fs.clear();

            // Lock, blocking and -n: 71 for ENOLCK, else 65. With -n, EACCES from fcntl is
            // "held elsewhere" (fcntl(2)): a conflict, status 1.
            for nb in [false, true] {
                let case = format!("lock-{kind}-{name}-{}", if nb { "n" } else { "wait" });
                let rel = format!("{case}.lock");
                fs.inject(Fault::fail(Op::Lock, errno).path(rel.as_str()));
                let flags: &[&str] = if nb { &["-n"] } else { &[] };
                let (out, ran) = r.exec(&case, kind, flags, &rel);
                if nb && errno == libc::EACCES && kind != "flock" {
                    assert_eq!(out.status.code(), Some(1), "{case}: {}", text(&out));
                    assert!(!ran);
                    r.expect(&case, None);
                } else {
                    let code = if errno == libc::ENOLCK { 71 } else { 65 };
                    let during = format!("{name} during lock");
                    assert_failed(&case, &out, ran, code, &fs.path(&rel), &[strerror, &during]);
                    r.expect(&case, Some(("lock", name)));
                }
                assert!(!fs.held(&rel), "{case}: held behind the failure");
                fs.clear();
            }

            // The check after locking (a stat of the path).
            let case = format!("verify-{kind}-{name}");
            let rel = format!("{case}.lock");
            std::fs::write(fs.backing(&rel), b"").unwrap();
            // Let the stats of opening through, then fail every one.
            let opened_after = stats_to_open(&fs, kind, &rel);
            fs.inject(
                Fault::fail(Op::Stat, errno)
                    .path(rel.as_str())
                    .after(opened_after),
            );
            let (out, ran) = r.exec(&case, kind, &[], &rel);
            let code = if errno == libc::ENOLCK { 71 } else { 65 };
            let during = format!("{name} during verify");
            assert_failed(&case, &out, ran, code, &fs.path(&rel), &[strerror, &during]);
            r.expect(&case, Some(("verify", name)));
            assert!(!fs.held(&rel), "{case}: held behind the failure");
            fs.clear();

            // Unlock after COMMAND: COMMAND's status, a warning naming the step, and the lock
            // gone once lockmeter exits (its descriptor closes).
            let case = format!("unlock-{kind}-{name}");
            let rel = format!("{case}.lock");
            fs.inject(Fault::fail(Op::Unlock, errno).path(rel.as_str()));
            let (out, ran) = r.exec(&case, kind, &[], &rel);
            let t = text(&out);
            assert_eq!(out.status.code(), Some(0), "{case}: {t}");
            assert!(ran, "{case}: COMMAND ran under the lock");
            let path = fs.path(&rel).display().to_string();
            for n in ["warning", "cannot unlock", &path, name] {
                assert!(t.contains(n), "{case}: says {n:?}: {t}");
            }
            r.expect(&case, Some(("unlock", name)));
            eventually(&format!("{case}: released at exit"), || !fs.held(&rel));
            fs.clear();
        }
    }
    r.check_metrics();
}

/// How many stat calls `lockmeter exec` makes on `rel` before it locks: a run with a lock
/// fault stops right after the lock call, so its stats are the open's.
fn stats_to_open(fs: &FaultFs, kind: &str, rel: &str) -> u64 {
    let before = fs.calls(Op::Stat, rel);
    let id = fs.inject(Fault::fail(Op::Lock, libc::EIO).path(rel));
    let out = lm()
        .command(["exec", "--kind", kind, "-n"])
        .arg(fs.path(rel))
        .args(["--", "true"])
        .env("OTEL_METRICS_EXPORTER", "none")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65), "{}", text(&out));
    fs.remove(id);
    fs.calls(Op::Stat, rel) - before
}

#[test]
fn the_descriptor_form_under_lock_faults() {
    let fs = FaultFs::mount();
    for (kind_flag, kind) in [("", "flock"), ("--fcntl", "ofd")] {
        for (errno, name, strerror) in ERRNOS {
            for nb in [false, true] {
                let rel = format!("fd-{kind}-{name}-{nb}.lock");
                let path = fs.path(&rel);
                fs.inject(Fault::fail(Op::Lock, errno).path(rel.as_str()));
                let script = format!(
                    "exec 9>'{}'; \"$LOCKMETER\" exec {kind_flag} {} 9; echo status $?",
                    path.display(),
                    if nb { "-n" } else { "" }
                );
                let out = lm()
                    .shell(&script)
                    .env("OTEL_METRICS_EXPORTER", "none")
                    .output()
                    .unwrap();
                let t = text(&out);
                let case = format!("fd {kind} {name} nb={nb}");
                if nb && errno == libc::EACCES && kind == "ofd" {
                    assert!(t.contains("status 1"), "{case}: {t}");
                } else {
                    let code = if errno == libc::ENOLCK { 71 } else { 65 };
                    assert!(t.contains(&format!("status {code}")), "{case}: {t}");
                    assert!(t.contains(strerror), "{case}: {t}");
                }
                assert!(!fs.held(&rel), "{case}: held behind the failure");
                fs.clear();
            }
        }
    }
}

/// Disks that say no, through `lockmeter exec`: a lock file that cannot be created on a
/// read-only file system (73, as flock(1)), and an owner record with no space for it (65, the
/// step named), COMMAND not run.
#[test]
fn exec_on_disks_that_say_no() {
    use lockmeter_testkit::disk::{fill, read_only_bind, tmpfs};
    let src = tempfile::tempdir().unwrap();
    let ro = read_only_bind(src.path());
    let out = lm()
        .command(["exec"])
        .arg(ro.path("new.lock"))
        .args(["--", "true"])
        .env("OTEL_METRICS_EXPORTER", "none")
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(73), "{t}");
    assert!(t.contains("Read-only file system"), "{t}");
    let full = tmpfs(64 << 10, 64);
    let filler = fill(full.root());
    let marker = src.path().join("ran");
    let out = lm()
        .command(["exec", "--owner-record"])
        .arg(full.path("job.lock"))
        .args(["--", "touch"])
        .arg(&marker)
        .env("OTEL_METRICS_EXPORTER", "none")
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(65), "{t}");
    assert!(t.contains("(ENOSPC during lock)"), "{t}");
    assert!(!marker.exists(), "COMMAND ran without the lock");
    std::fs::remove_file(filler).unwrap();
}
