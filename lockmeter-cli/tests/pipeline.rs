//! The collector pipeline, proven end to end with real binaries: a real Prometheus scraping
//! `lockmeter demo` and evaluating every dashboard and rule expression, promtool on the rules,
//! OTLP over gRPC and http/protobuf into a third-party receiver (rotel-agent), and structural
//! checks of the collector and compose files.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use lockmeter_testkit::cli::Cli;
use lockmeter_testkit::otlp::Rotel;
use lockmeter_testkit::prometheus::{promtool, Prometheus};
use lockmeter_testkit::{
    eventually, flock_holder, http_get_eventually, release_flock_holder, require_tool,
    require_tools, DebugPoint,
};
use yaml_rust2::{Yaml, YamlLoader};

fn lm() -> Cli {
    Cli::new(env!("CARGO_BIN_EXE_lockmeter"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn yaml(path: &Path) -> Yaml {
    let text = std::fs::read_to_string(path).unwrap();
    YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .remove(0)
}

/// Every PromQL expression of a Grafana dashboard, with its panel title.
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("").to_owned();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((title.clone(), e.to_owned()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// Grafana template variables replaced by match-all values and fixed intervals.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
        .replace("$job", ".*")
        .replace("$lock_name", ".*")
        .replace("$lock_kind", ".*")
        .replace("$fs_type", ".*")
}

fn rule_exprs(rules: &Yaml) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for g in rules["groups"].as_vec().unwrap() {
        for r in g["rules"].as_vec().unwrap() {
            let name = r["record"]
                .as_str()
                .or(r["alert"].as_str())
                .unwrap()
                .to_owned();
            out.push((name, r["expr"].as_str().unwrap().to_owned()));
        }
    }
    out
}

#[test]
fn prometheus_scrapes_the_demo_and_every_dashboard_and_rule_query_works() {
    if !require_tool("prometheus") {
        return;
    }
    let demo = lm().demo(3600);
    let rules = repo().join("prometheus/rules/lockmeter.yaml");
    let prom = Prometheus::start(&[&demo.addr], &[&rules]);
    let base = prom.base.clone();

    // Wait until the demo has shown everything the panels need, migrations included.
    eventually("a migration and enough samples for rate()", || {
        prom.has_data("sum(increase(lock_inode_migrations_total[30s])) > 0")
    });

    // Every dashboard expression is valid PromQL; the panels the demo drives return data.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("grafana/dashboards/lockmeter.json")).unwrap(),
    )
    .unwrap();
    let exprs = dashboard_exprs(&dash);
    assert!(exprs.len() >= 15, "{} expressions", exprs.len());
    let must_have_data = [
        "Locks held now",
        "Acquisitions/s",
        "Conflicts/s",
        "Conflict ratio",
        "Migrations",
        "Hold time p50 / p90 / p99 by lock",
        "Hold time distribution",
        "Wait time p50 / p90 / p99 by lock (acquired)",
        "Wait time distribution",
        "Acquire outcomes/s",
        "Conflicts/s by lock and mode",
        "Acquisitions/s by lock (contended or not)",
        "Locks held",
        "Migrations and violations by lock (selected range)",
        "Share of waits over 10 ms, by lock",
    ];
    let mut with_data = BTreeSet::new();
    for (title, expr) in &exprs {
        if prom.has_data(&substitute(expr)) {
            with_data.insert(title.clone());
        }
    }
    for title in must_have_data {
        assert!(with_data.contains(title), "panel {title:?} shows no data");
    }

    // Template variables: the label_values() queries find values.
    for var in dash["templating"]["list"].as_array().unwrap() {
        let Some(q) = var["query"]["query"].as_str() else {
            continue;
        };
        let inner = q.trim_start_matches("label_values(").trim_end_matches(')');
        let (selector, label) = inner.rsplit_once(',').unwrap();
        let selector = substitute(selector.trim());
        let name = var["name"].as_str().unwrap();
        assert!(
            !prom.label_values(label.trim(), &selector).is_empty(),
            "variable {name}: no values for {selector}"
        );
    }

    // Every rule expression is valid; the hold/wait recordings have data; Prometheus loaded the
    // rules healthy and the migration alert fires on the demo's replaced lock file.
    let rule_exprs = rule_exprs(&yaml(&rules));
    assert_eq!(rule_exprs.len(), 12);
    for (_, expr) in rule_exprs {
        prom.query(&expr); // panics with the expression if Prometheus rejects it
    }
    for rec in [
        "lockmeter:lock_duration_seconds:p50_5m",
        "lockmeter:lock_duration_seconds:p99_5m",
        "lockmeter:lock_wait_duration_seconds:p99_5m",
        "lockmeter:lock_conflict_ratio:rate5m",
    ] {
        eventually(&format!("recording rule {rec}"), || prom.has_data(rec));
    }
    eventually("LockInodeMigration to fire", || {
        prom.has_data("ALERTS{alertname=\"LockInodeMigration\", lock_name=\"rotating\"}")
    });
    let rules_state: serde_json::Value =
        serde_json::from_str(&http_get_eventually(&format!("{base}/api/v1/rules"))).unwrap();
    for g in rules_state["data"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            assert_eq!(r["health"], "ok", "rule {}: {}", r["name"], r["lastError"]);
        }
    }
}

#[test]
fn promtool_accepts_the_config_and_the_rules_and_their_tests_pass() {
    if !require_tool("promtool") {
        return;
    }
    let prom = repo().join("prometheus");
    for args in [
        vec!["check", "config", "prometheus.yml"],
        vec!["check", "rules", "rules/lockmeter.yaml"],
        vec!["test", "rules", "rules/lockmeter_test.yaml"],
    ] {
        let o = promtool(&args, &prom);
        assert!(
            o.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[test]
fn otlp_over_grpc_and_http_reaches_a_third_party_receiver() {
    if !require_tools(&["rotel-agent", "flock"]) {
        return;
    }
    let rotel = Rotel::start();
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("otlp.lock");
    for protocol in ["grpc", "http/protobuf"] {
        let service = format!("e2e-{}", protocol.replace('/', "-"));
        let run = |args: &[&str]| {
            lm().command(["exec"])
                .args(args)
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", rotel.endpoint(protocol))
                .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
                .env("OTEL_TRACES_EXPORTER", "otlp")
                .env("OTEL_SERVICE_NAME", &service)
                .status()
                .unwrap()
        };
        // One acquisition, held by the command ...
        assert!(run(&["--name", "otlp-job", lock.to_str().unwrap(), "--", "true"]).success());
        // ... and one conflict while flock(1) holds the lock.
        let holder = flock_holder(&lock, false);
        let st = run(&[
            "-n",
            "--name",
            "otlp-job",
            lock.to_str().unwrap(),
            "--",
            "true",
        ]);
        assert_eq!(st.code(), Some(1));
        release_flock_holder(holder);

        // Both pushes arrive (the exporter flushes before exit): 2 processes, 2 resources.
        let mut metrics = Vec::new();
        let mut spans = Vec::new();
        eventually(&format!("{protocol}: both exports in rotel's log"), || {
            let (m, s) = rotel.dump();
            metrics = m.into_iter().filter(|m| m.service == service).collect();
            spans = s.into_iter().filter(|s| s.service == service).collect();
            metrics
                .iter()
                .filter(|m| m.name == "lock.wait.duration")
                .count()
                >= 2
                && spans.iter().any(|s| s.name == "lock.hold")
        });

        let find = |name: &str| {
            metrics
                .iter()
                .filter(|m| m.name == name)
                .collect::<Vec<_>>()
        };
        let expect_units = [
            ("lock.duration", "s", "Histogram"),
            ("lock.wait.duration", "s", "Histogram"),
            ("lock.acquisitions", "{acquisition}", "Sum"),
            ("lock.conflicts", "{conflict}", "Sum"),
            ("lock.held", "{lock}", "Sum"),
        ];
        for (name, unit, ty) in expect_units {
            let ms = find(name);
            assert!(!ms.is_empty(), "{protocol}: {name} did not arrive");
            for m in ms {
                assert_eq!(m.unit, unit, "{protocol}: {name}");
                assert_eq!(m.data_type, ty, "{protocol}: {name}");
                assert_eq!(m.scope, "lockmeter", "{protocol}: {name}");
            }
        }
        let points = |name: &str| -> Vec<DebugPoint> {
            find(name)
                .into_iter()
                .flat_map(|m| m.points.clone())
                .collect()
        };
        // The acquisition: attributes, value, hold histogram with the schema's boundaries.
        let acq = points("lock.acquisitions");
        assert_eq!(acq.len(), 1, "{protocol}: {acq:?}");
        for key in [
            "lock.name",
            "lock.kind",
            "lock.mode",
            "lock.contended",
            "fs.type",
        ] {
            assert!(
                acq[0].attrs.contains_key(key),
                "{protocol}: {key} missing: {:?}",
                acq[0].attrs
            );
        }
        assert_eq!(acq[0].attrs["lock.name"], "otlp-job");
        assert_eq!(acq[0].attrs["lock.kind"], "flock");
        assert_eq!(acq[0].value, Some(1.0));
        let hold = points("lock.duration");
        assert_eq!(hold.len(), 1);
        assert_eq!(hold[0].count, Some(1));
        assert_eq!(hold[0].bounds, lockmeter::metrics::DEFAULT_BOUNDARIES);
        let held = points("lock.held");
        assert!(
            held.iter().all(|p| p.value == Some(0.0)),
            "{protocol}: {held:?}"
        );
        // The conflict: counted, and the wait recorded with outcome would_block.
        let conflicts = points("lock.conflicts");
        assert_eq!(conflicts.iter().filter_map(|p| p.value).sum::<f64>(), 1.0);
        let waits = points("lock.wait.duration");
        let outcome = |o: &str| {
            waits
                .iter()
                .filter(|p| p.attrs.get("lock.outcome").map(String::as_str) == Some(o))
                .filter_map(|p| p.count)
                .sum::<u64>()
        };
        assert_eq!(outcome("acquired"), 1, "{protocol}");
        assert_eq!(outcome("would_block"), 1, "{protocol}");

        // Spans with their attributes.
        let acquire = spans
            .iter()
            .find(|s| {
                s.name == "lock.acquire"
                    && s.attrs.get("lock.outcome").map(String::as_str) == Some("acquired")
            })
            .unwrap_or_else(|| panic!("{protocol}: no acquired lock.acquire span: {spans:?}"));
        for key in [
            "lock.name",
            "lock.kind",
            "lock.mode",
            "fs.type",
            "lock.contended",
        ] {
            assert!(
                acquire.attrs.contains_key(key),
                "{protocol}: span lacks {key}"
            );
        }
        assert!(spans.iter().any(|s| s.name == "lock.acquire"
            && s.attrs.get("lock.outcome").map(String::as_str) == Some("would_block")));
        let hold = spans.iter().find(|s| s.name == "lock.hold").unwrap();
        assert_eq!(hold.attrs["lock.name"], "otlp-job");
        assert_eq!(hold.attrs["lock.mode"], "exclusive");
        assert_eq!(hold.scope, "lockmeter");
    }
}

#[test]
fn holds_that_outlive_lockmeter_report_wait_and_outcome_but_no_hold_time() {
    if !require_tools(&["rotel-agent", "flock"]) {
        return;
    }
    let rotel = Rotel::start();
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("handoff.lock");
    let lock_s = lock.to_str().unwrap();
    let env = |c: &mut std::process::Command, service: &str| {
        c.env("OTEL_EXPORTER_OTLP_ENDPOINT", rotel.endpoint("grpc"))
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            .env("OTEL_SERVICE_NAME", service);
    };
    // flock(1)'s descriptor form: the shell keeps the lock after lockmeter exits; then a
    // conflict on the same descriptor form while flock(1) holds the file.
    let mut c = lm().shell(&format!(
        r#"exec 9>'{lock_s}'; "$LOCKMETER" exec --name fd-job 9 || exit 1; echo "shell holds it"; flock -n '{lock_s}' true; echo "others: $?""#
    ));
    env(&mut c, "handoff-fd");
    let o = c.output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "shell holds it\nothers: 1\n",
        "{o:?}"
    );
    let holder = flock_holder(&lock, false);
    let mut c = lm().shell(&format!(
        r#"exec 9>'{lock_s}'; "$LOCKMETER" exec -n --name fd-job 9; echo "status $?""#
    ));
    env(&mut c, "handoff-fd");
    assert_eq!(
        String::from_utf8_lossy(&c.output().unwrap().stdout),
        "status 1\n"
    );
    release_flock_holder(holder);
    // -F: COMMAND replaces lockmeter, which delivers before it goes.
    let mut c = lm().command(["exec", "-F", "--name", "nofork-job", lock_s, "true"]);
    env(&mut c, "handoff-nofork");
    assert!(c.status().unwrap().success());

    for (service, name, conflicts, outcomes) in [
        (
            "handoff-fd",
            "fd-job",
            1.0,
            &[("acquired", 1), ("would_block", 1)][..],
        ),
        ("handoff-nofork", "nofork-job", 0.0, &[("acquired", 1)][..]),
    ] {
        let mut metrics = Vec::new();
        eventually(&format!("{service}: exports in rotel's log"), || {
            metrics = rotel
                .dump()
                .0
                .into_iter()
                .filter(|m| m.service == service)
                .collect();
            let waits: usize = metrics
                .iter()
                .filter(|m| m.name == "lock.wait.duration")
                .map(|m| m.points.len())
                .sum();
            waits >= outcomes.len()
        });
        let points = |metric: &str| -> Vec<DebugPoint> {
            metrics
                .iter()
                .filter(|m| m.name == metric)
                .flat_map(|m| m.points.clone())
                .filter(|p| p.attrs.get("lock.name").map(String::as_str) == Some(name))
                .collect()
        };
        let acq = points("lock.acquisitions");
        assert_eq!(
            acq.iter().filter_map(|p| p.value).sum::<f64>(),
            1.0,
            "{service}: {acq:?}"
        );
        assert_eq!(acq[0].attrs["lock.kind"], "flock");
        assert!(acq[0].attrs.contains_key("fs.type"), "{acq:?}");
        let sum = |metric: &str| points(metric).iter().filter_map(|p| p.value).sum::<f64>();
        assert_eq!(sum("lock.conflicts"), conflicts, "{service}");
        assert_eq!(
            sum("lock.held"),
            0.0,
            "{service}: the hold was handed over, not left held by a process that is gone"
        );
        assert!(
            points("lock.duration")
                .iter()
                .all(|p| p.count.unwrap_or(0) == 0),
            "{service}: no hold time: lockmeter cannot see the release"
        );
        for (outcome, n) in outcomes {
            let got: u64 = points("lock.wait.duration")
                .iter()
                .filter(|p| p.attrs.get("lock.outcome").map(String::as_str) == Some(outcome))
                .filter_map(|p| p.count)
                .sum();
            assert_eq!(got, *n, "{service}: {outcome}");
        }
    }
}

/// Components used by otel-collector-config.yaml must exist in otelcol-contrib. This list is a
/// subset of the components built into otelcol-contrib, from its manifest
/// (opentelemetry-collector-releases, `distributions/otelcol-contrib/manifest.yaml`) and the
/// component tables in the opentelemetry-collector-contrib README; extend it when the config
/// starts using another component.
const OTELCOL_CONTRIB: &[(&str, &[&str])] = &[
    (
        "receivers",
        &[
            "otlp",
            "prometheus",
            "hostmetrics",
            "filelog",
            "jaeger",
            "zipkin",
            "kafka",
        ],
    ),
    (
        "processors",
        &[
            "batch",
            "memory_limiter",
            "attributes",
            "resource",
            "resourcedetection",
            "filter",
            "transform",
            "k8sattributes",
            "tail_sampling",
            "probabilistic_sampler",
            "cumulativetodelta",
            "deltatocumulative",
            "metricstransform",
            "groupbyattrs",
        ],
    ),
    (
        "exporters",
        &[
            "otlp",
            "otlphttp",
            "prometheus",
            "prometheusremotewrite",
            "debug",
            "file",
            "kafka",
            "loadbalancing",
            "zipkin",
        ],
    ),
    (
        "extensions",
        &[
            "health_check",
            "pprof",
            "zpages",
            "file_storage",
            "basicauth",
            "bearertokenauth",
        ],
    ),
];

/// `${env:VAR:-default}` → default.
fn env_default(v: &str) -> String {
    match (v.find(":-"), v.strip_prefix("${env:")) {
        (Some(i), Some(_)) => v[i + 2..].trim_end_matches('}').to_owned(),
        _ => v.to_owned(),
    }
}

#[test]
fn collector_config_uses_known_components_and_feeds_what_prometheus_scrapes() {
    let cfg = yaml(&repo().join("otel-collector-config.yaml"));
    let known = |section: &str, name: &str| {
        let base = name.split('/').next().unwrap(); // "otlp/2" is an instance of otlp
        OTELCOL_CONTRIB
            .iter()
            .any(|(s, names)| *s == section && names.contains(&base))
    };
    for section in ["receivers", "processors", "exporters", "extensions"] {
        for (name, _) in cfg[section].as_hash().unwrap() {
            let name = name.as_str().unwrap();
            assert!(
                known(section, name),
                "{section}.{name} is not an otelcol-contrib component"
            );
        }
    }
    // Pipelines reference only defined components, memory_limiter first.
    let pipelines = cfg["service"]["pipelines"].as_hash().unwrap();
    assert!(pipelines.contains_key(&Yaml::from_str("metrics")));
    assert!(pipelines.contains_key(&Yaml::from_str("traces")));
    for (pname, p) in pipelines {
        for section in ["receivers", "processors", "exporters"] {
            for c in p[section].as_vec().unwrap() {
                let c = c.as_str().unwrap();
                assert!(
                    !cfg[section][c].is_badvalue(),
                    "{pname:?} uses undefined {section}.{c}"
                );
            }
        }
        assert_eq!(
            p["processors"][0].as_str(),
            Some("memory_limiter"),
            "{pname:?}"
        );
    }
    for ext in cfg["service"]["extensions"].as_vec().unwrap() {
        assert!(!cfg["extensions"][ext.as_str().unwrap()].is_badvalue());
    }
    // OTLP on the conventional ports; the prometheus exporter on the port Prometheus scrapes.
    let grpc = env_default(
        cfg["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
            .as_str()
            .unwrap(),
    );
    let http = env_default(
        cfg["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
            .as_str()
            .unwrap(),
    );
    assert!(
        grpc.ends_with(":4317") && http.ends_with(":4318"),
        "{grpc} {http}"
    );
    let exporter = env_default(cfg["exporters"]["prometheus"]["endpoint"].as_str().unwrap());
    let port = exporter.rsplit(':').next().unwrap();
    let prom = yaml(&repo().join("prometheus/prometheus.yml"));
    let targets: Vec<String> = prom["scrape_configs"]
        .as_vec()
        .unwrap()
        .iter()
        .flat_map(|s| s["static_configs"].as_vec().unwrap().clone())
        .flat_map(|s| s["targets"].as_vec().unwrap().clone())
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    assert!(
        targets.iter().any(|t| t.ends_with(&format!(":{port}"))),
        "prometheus.yml scrapes {targets:?}, collector exports on {exporter}"
    );
    assert_eq!(
        cfg["exporters"]["prometheus"]["resource_to_telemetry_conversion"]["enabled"].as_bool(),
        Some(true)
    );
}

#[test]
fn compose_file_wires_the_same_config_files() {
    let compose = yaml(&repo().join("deploy/docker-compose.yaml"));
    let services = compose["services"].as_hash().unwrap();
    for s in ["lockmeter-demo", "otel-collector", "prometheus", "grafana"] {
        assert!(
            services.contains_key(&Yaml::from_str(s)),
            "service {s} missing"
        );
    }
    // Every mounted host path exists in the repository.
    let deploy = repo().join("deploy");
    for (_, svc) in services {
        for v in svc["volumes"].as_vec().into_iter().flatten() {
            let host = v.as_str().unwrap().split(':').next().unwrap();
            assert!(deploy.join(host).exists(), "mounted {host} does not exist");
        }
        for p in svc["ports"].as_vec().into_iter().flatten() {
            assert!(
                p.as_str().unwrap().starts_with("127.0.0.1:"),
                "published beyond loopback: {p:?}"
            );
        }
    }
    let dockerfile = compose["services"]["lockmeter-demo"]["build"]["dockerfile"]
        .as_str()
        .unwrap();
    assert!(repo().join(dockerfile).exists());
    // The demo pushes OTLP to the collector service the compose file defines.
    let env = &compose["services"]["lockmeter-demo"]["environment"];
    assert_eq!(
        env["OTEL_EXPORTER_OTLP_ENDPOINT"].as_str(),
        Some("http://otel-collector:4317")
    );
    // Grafana provisioning points at the dashboards folder it mounts.
    let prov = yaml(&repo().join("grafana/provisioning/dashboards/lockmeter.yaml"));
    assert_eq!(
        prov["providers"][0]["options"]["path"].as_str(),
        Some("/var/lib/grafana/dashboards")
    );
    let ds = yaml(&repo().join("grafana/provisioning/datasources/prometheus.yaml"));
    assert_eq!(ds["datasources"][0]["type"].as_str(), Some("prometheus"));
}
