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

    // The lock profile beside /metrics: the cache mutex's two call sites told apart.
    let profile_url = url.replace("/metrics", "/debug/lockmeter/profile");
    let mut profile = serde_json::Value::Null;
    eventually(
        "the profile to show the cache's reader and refresher",
        || {
            profile = serde_json::from_str(&http_get(&profile_url)).unwrap();
            let cache = profile
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["name"] == "demo-cache");
            cache.is_some_and(|c| {
                let sites = c["sites"].as_array().unwrap();
                sites.len() >= 2
                    && sites.iter().all(|s| {
                        s["file"]
                            .as_str()
                            .is_none_or(|f| f.ends_with("demo/mod.rs"))
                    })
            })
        },
    );
    let flock = profile
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "orders")
        .unwrap_or_else(|| panic!("orders missing from the profile: {profile}"));
    assert_eq!(flock["kind"], "flock");
    assert!(
        flock["sites"][0]["waited"]["count"].as_u64().unwrap() > 0
            || flock["sites"][0]["held"]["count"].as_u64().unwrap() > 0
    );

    // Ctrl-C stops it cleanly with a final table.
    let (status, rest) = demo.interrupt();
    assert!(status.success(), "{status}: {rest}");
    assert!(rest.contains("whole run"), "{rest}");
    assert!(rest.contains("lock profile"), "{rest}");
    assert!(rest.contains("demo-cache (mutex)"), "{rest}");
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
