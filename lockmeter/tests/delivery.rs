//! A short-lived program whose lock metrics were only served on `/metrics` and never scraped
//! is told so when its `Telemetry` is dropped; one that was scraped, or that used no lock, is
//! not. Real processes (this binary re-executed), a real HTTP scrape.
#![cfg(feature = "telemetry")]
#![allow(clippy::unwrap_used)]

use lockmeter::telemetry::Telemetry;
use lockmeter_testkit::http_get;
use lockmeter_testkit::proc::{helper, role_var};

lockmeter_testkit::helper_roles! {
    "short_lived" => role_short_lived,
    "late_init" => role_late_init,
}

/// Takes a lock, then sets telemetry up (the order the README's set-up section warns about).
fn role_late_init() {
    let m = lockmeter::sync::Mutex::named("before-init", 0u32);
    *m.lock().unwrap() += 1;
    let telemetry = Telemetry::builder()
        .prometheus_addr("127.0.0.1:0".parse().unwrap())
        .init()
        .unwrap();
    telemetry.shutdown().unwrap();
}

/// Serves `/metrics` on a free port; takes a lock `LOCKS` times; scrapes itself if `SCRAPE`
/// is 1; then drops the telemetry.
fn role_short_lived() {
    let telemetry = Telemetry::builder()
        .prometheus_addr("127.0.0.1:0".parse().unwrap())
        .init()
        .unwrap();
    let addr = telemetry.prometheus_addr().unwrap();
    println!("serving {addr}");
    let m = lockmeter::sync::Mutex::named("short-lived", 0u32);
    for _ in 0..role_var("LOCKS").parse::<u32>().unwrap() {
        *m.lock().unwrap() += 1;
    }
    if role_var("SCRAPE") == "1" {
        assert!(http_get(&format!("http://{addr}/metrics")).contains("short-lived"));
    }
    drop(telemetry);
}

/// Runs the role; returns (stdout, stderr).
fn run(locks: &str, scrape: &str) -> (String, String) {
    let o = helper("short_lived", &[("LOCKS", locks), ("SCRAPE", scrape)])
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        .env_remove("OTEL_METRICS_EXPORTER")
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "{out}\n{err}");
    (out, err)
}

#[test]
fn dropping_unscraped_telemetry_says_the_metrics_went_nowhere() {
    let (out, err) = run("3", "0");
    let addr = out
        .lines()
        .find_map(|l| l.strip_prefix("serving "))
        .unwrap_or_else(|| panic!("no address: {out}"));
    assert!(
        err.contains("lock metrics were not delivered")
            && err.contains(&format!("http://{addr}/metrics"))
            && err.contains("OTEL_EXPORTER_OTLP_ENDPOINT"),
        "{err}"
    );
}

#[test]
fn scraped_telemetry_or_no_lock_used_says_nothing() {
    let (_, err) = run("3", "1");
    assert!(!err.contains("not delivered"), "scraped: {err}");
    let (_, err) = run("0", "0");
    assert!(!err.contains("not delivered"), "nothing counted: {err}");
}

/// `telemetry::init()` after a lock was used says so on the console: the notice is made when
/// the provider is installed, so the console must be set up first (it was not, and the notice
/// went nowhere).
#[test]
fn telemetry_set_up_after_a_lock_was_used_says_so() {
    let o = helper("late_init", &[])
        .env_remove("RUST_LOG")
        .env_remove("OTEL_METRICS_EXPORTER")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(
        err.matches("installed after locks had been used").count(),
        1,
        "{err}"
    );
    assert!(err.contains("lockmeter::telemetry::init()"), "{err}");
}
