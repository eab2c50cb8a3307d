//! `lockmeter demo` scraped like Prometheus would, and linted by promtool.
#![allow(clippy::unwrap_used)]

use std::io::{Read as _, Write as _};
use std::process::{Command, Stdio};

use lockmeter_testkit::{eventually, http_get, read_line_starting, require_tool};

#[test]
fn demo_serves_metrics_that_promtool_accepts_and_stops_on_ctrl_c() {
    if !require_tool("promtool") {
        return;
    }
    let mut demo = Command::new(env!("CARGO_BIN_EXE_lockmeter"))
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--interval",
            "1",
            "--workers",
            "3",
        ])
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_METRICS_EXPORTER")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let line = read_line_starting(&mut demo, "lockmeter demo: serving metrics on ");
    let url = line.rsplit(' ').next().unwrap().to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    // Every schema metric the demo drives shows up, migrations included (the janitor replaces
    // rotating.lock every 2 s).
    let mut body = String::new();
    eventually("the demo to record a migration", || {
        body = http_get(&url);
        body.lines()
            .any(|l| l.starts_with("lock_inode_migrations_total{") && !l.ends_with(" 0"))
    });
    for name in [
        "lock_duration_seconds_bucket{",
        "lock_wait_duration_seconds_bucket{",
        "lock_acquisitions_total{",
        "lock_conflicts_total{",
        "lock_held{",
        "lock_inode_migrations_total{",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics");
    }
    for kind in ["flock", "ofd", "posix"] {
        assert!(body.contains(&format!("lock_kind=\"{kind}\"")), "{kind}");
    }
    assert!(body.contains("fs_type=\""));

    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool: {report}"
    );

    // Ctrl-C stops it cleanly with a final table.
    let pid = rustix::process::Pid::from_raw(demo.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let mut rest = String::new();
    demo.stdout
        .take()
        .unwrap()
        .read_to_string(&mut rest)
        .unwrap();
    assert!(demo.wait().unwrap().success());
    assert!(rest.contains("whole run"), "{rest}");
    for lock in ["orders", "inventory", "reports", "rotating"] {
        assert!(
            rest.contains(lock),
            "{lock} missing from the summary:\n{rest}"
        );
    }
}

#[test]
fn demo_refuses_a_busy_port_with_a_clear_error() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let o = Command::new(env!("CARGO_BIN_EXE_lockmeter"))
        .args(["demo", "--listen", &addr, "--duration", "1"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&addr) && err.contains("in use"), "{err}");
}
