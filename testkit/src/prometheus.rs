//! A real Prometheus server for tests (scraping given targets, evaluating given rule files),
//! PromQL queries against it, and `promtool` (config, rules, rule tests, exposition lint).
//!
//! Callers require the tools first (`require_tool("prometheus")`, `require_tool("promtool")`).

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use crate::http::free_port;
use crate::proc::{until_up, KillOnDrop};
use crate::tools;

/// A Prometheus server on a free loopback port, with its own data directory; killed on drop.
pub struct Prometheus {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    _server: KillOnDrop,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts `prometheus` scraping `targets` (`host:port`, job `lockmeter`) and evaluating
    /// `rule_files`, both every second; returns once `/-/ready` answers.
    pub fn start(targets: &[&str], rule_files: &[&Path]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        let rules: String = rule_files
            .iter()
            .map(|r| format!("  - {}\n", r.display()))
            .collect();
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{rules}\
                 scrape_configs:\n  - job_name: lockmeter\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .unwrap();
        let port = free_port();
        let log = dir.path().join("prometheus.log");
        let server = tools::command("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut server = KillOnDrop(server);
        let base = format!("http://127.0.0.1:{port}");
        let ready = format!("{base}/-/ready");
        until_up(
            &mut server,
            "prometheus to be ready",
            Duration::from_secs(30),
            Some(&log),
            || ureq::get(&ready).call().is_ok(),
        );
        Prometheus {
            base,
            _server: server,
            _dir: dir,
        }
    }

    /// [`prom_query`] against this server.
    pub fn query(&self, expr: &str) -> serde_json::Value {
        prom_query(&self.base, expr)
    }

    /// Whether an instant query returns at least one series.
    pub fn has_data(&self, expr: &str) -> bool {
        !self.query(expr)["result"].as_array().unwrap().is_empty()
    }

    /// Values of `label` on the series matching `selector` (`/api/v1/label/LABEL/values`).
    pub fn label_values(&self, label: &str, selector: &str) -> Vec<String> {
        let url = format!("{}/api/v1/label/{label}/values", self.base);
        let body = ureq::get(&url)
            .query("match[]", selector)
            .call()
            .unwrap_or_else(|e| panic!("{url} match[]={selector}: {e}"))
            .body_mut()
            .read_to_string()
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    }
}

/// Runs an instant PromQL query against a Prometheus server; returns the `data` object.
/// Panics when Prometheus rejects the expression, with the expression and the error.
pub fn prom_query(base: &str, expr: &str) -> serde_json::Value {
    let url = format!("{base}/api/v1/query");
    let mut resp = ureq::get(&url)
        .query("query", expr)
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap_or_else(|e| panic!("query {expr}: {e}"));
    let body: serde_json::Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap())
        .unwrap_or_else(|e| panic!("query {expr}: bad JSON: {e}"));
    assert_eq!(body["status"], "success", "invalid PromQL {expr}: {body}");
    body["data"].clone()
}

/// Runs `promtool ARGS` in `dir`; returns its output (the caller checks the status).
pub fn promtool(args: &[&str], dir: &Path) -> Output {
    tools::command("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// `promtool check metrics` on an exposition: `Err(report)` unless it exits 0 and prints
/// nothing (no lint findings either).
pub fn promtool_check_metrics(exposition: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut check = tools::command("promtool")
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
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && report.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("{} {report}", out.status))
    }
}
