//! `lockmeter demo` scraped like Prometheus would, and linted by promtool.
#![allow(clippy::unwrap_used)]

use lockmeter_testkit::cli::Cli;
use lockmeter_testkit::prometheus::promtool_check_metrics;
use lockmeter_testkit::{eventually, http_get, require_tool};

fn lm() -> Cli {
    Cli::new(env!("CARGO_BIN_EXE_lockmeter"))
}

#[test]
fn demo_serves_metrics_that_promtool_accepts_and_stops_on_ctrl_c() {
    if !require_tool("promtool") {
        return;
    }
    let demo = lm().demo(1);
    let url = demo.url.clone();

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

    promtool_check_metrics(&body).unwrap_or_else(|report| panic!("promtool: {report}"));

    // Ctrl-C stops it cleanly with a final table.
    let (status, rest) = demo.interrupt();
    assert!(status.success(), "{status}: {rest}");
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
    let o = lm().output(["demo", "--listen", &addr, "--duration", "1"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&addr) && err.contains("in use"), "{err}");
}
