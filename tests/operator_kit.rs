//! The operator kit in `config/` is sound without a server: the Prometheus config and alert rules pass
//! `promtool`, the alert rules fire as their unit tests say, the Grafana dashboard's queries parse as PromQL,
//! and every metric the dashboard or the alerts name is one Flywheel exports (docs/OPERATIONS.md lists them).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Every metric Flywheel exports (histograms and summaries without their `_bucket`/`_count`/`_sum` suffix).
const KNOWN_METRICS: &[&str] = &[
    "flywheel_request_duration_seconds",
    "flywheel_request_latency_seconds",
    "flywheel_requests_total",
    "flywheel_requests_rejected_total",
    "flywheel_requests_in_flight",
    "flywheel_queue_depth",
    "flywheel_feedback_total",
    "flywheel_adapters_loaded",
    "flywheel_model_ready",
    "flywheel_model_info",
    "flywheel_queue_duration_seconds",
    "flywheel_tokenize_duration_seconds",
    "flywheel_inference_duration_seconds",
    "flywheel_batch_size",
    "flywheel_batch_tokens",
    "flywheel_adapter_load_duration_seconds",
    "flywheel_online_accuracy",
    "flywheel_online_judgements_total",
    "flywheel_drift_score",
    "flywheel_drift_detected",
    "flywheel_rollout_traffic",
    "flywheel_rollout_events_total",
    "flywheel_training_jobs_total",
    "flywheel_training_loss",
    "flywheel_training_grad_norm",
    "flywheel_training_samples_per_second",
    "flywheel_training_duration_seconds",
    "flywheel_thread_panics_total",
    "flywheel_num_requests_waiting",
    "flywheel_num_requests_running",
    "flywheel_drift_window_size",
    "flywheel_drift_inputs_total",
    "flywheel_autopilot_leader",
    "flywheel_training_yield_seconds_total",
];

/// Metrics exported for LoRA-aware routers (docs/OPERATIONS.md, "Behind an inference gateway"), not for
/// people: exported and documented, but no dashboard panel (one is constant, one is a label list).
const FOR_ROUTERS: &[&str] = &[
    "flywheel_kv_cache_usage_perc",
    "flywheel_lora_requests_info",
];

/// The alerts docs/OPERATIONS.md explains; each must exist in config/alerts.yml.
const EXPECTED_ALERTS: &[&str] = &[
    "FlywheelP99OverBudget",
    "FlywheelDriftDetected",
    "FlywheelRollbackHappened",
    "FlywheelTrainingFailed",
    "FlywheelOnlineAccuracyLow",
    "FlywheelNotReady",
    "FlywheelShedding",
    "FlywheelThreadPanicked",
];

fn config_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(relative)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Runs `promtool ARGS` and fails the test with promtool's output (and `context`) unless it succeeds.
fn promtool(args: &[&str], context: &str) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("promtool is needed: install Debian's prometheus package (scripts/test.sh does)");
    assert!(
        out.status.success(),
        "promtool {} failed ({}):\n{}{}{context}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The metric names (`flywheel_` followed by lowercase letters, digits and underscores) an expression uses,
/// with a histogram's or summary's `_bucket`, `_count` or `_sum` suffix removed.
fn metric_names(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let is_name_char = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    let mut names = Vec::new();
    let mut i = 0;
    while let Some(found) = expr[i..].find("flywheel_") {
        let start = i + found;
        let mut end = start + "flywheel_".len();
        while end < bytes.len() && is_name_char(bytes[end]) {
            end += 1;
        }
        let preceded_by_name = start > 0
            && (bytes[start - 1].is_ascii_alphanumeric()
                || bytes[start - 1] == b'_'
                || bytes[start - 1] == b':');
        if !preceded_by_name {
            let name = &expr[start..end];
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            names.push(base.to_owned());
        }
        i = end;
    }
    names
}

/// Fails with every (where, name) pair whose metric is not in `KNOWN_METRICS`.
fn assert_known(uses: &[(String, String)]) {
    let unknown: Vec<_> = uses
        .iter()
        .filter(|(_, name)| {
            !KNOWN_METRICS.contains(&name.as_str()) && !FOR_ROUTERS.contains(&name.as_str())
        })
        .collect();
    assert!(
        unknown.is_empty(),
        "metrics Flywheel does not export (fix the query or add the metric to KNOWN_METRICS and \
         docs/OPERATIONS.md): {unknown:#?}"
    );
}

/// Every panel with queries: rows' nested panels included, the rows themselves left out.
fn query_panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a [Value], out: &mut Vec<&'a Value>) {
        for panel in panels {
            if panel["type"] == "row" {
                walk(
                    panel["panels"].as_array().map_or(&[][..], Vec::as_slice),
                    out,
                );
            } else {
                out.push(panel);
            }
        }
    }
    let mut out = Vec::new();
    walk(
        dashboard["panels"]
            .as_array()
            .expect("the dashboard has a panels array"),
        &mut out,
    );
    out
}

fn dashboard() -> Value {
    let path = config_path("grafana/flywheel.json");
    serde_json::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Each panel's title with its query expressions.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    for panel in query_panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                exprs.push((title.to_owned(), expr.to_owned()));
            }
        }
    }
    exprs
}

/// The `expr:` values of a rules file, read line by line (a `|` or `>` block takes the lines indented below it).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let Some(value) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if value.is_empty() || value.starts_with('|') || value.starts_with('>') {
            let indent = line.len() - trimmed.len();
            let block: Vec<&str> = lines[n + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            exprs.push(block.join(" ").trim().to_owned());
        } else {
            exprs.push(value.to_owned());
        }
    }
    exprs
}

#[test]
fn the_metric_name_scanner_strips_suffixes_and_skips_other_names() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(flywheel_batch_size_bucket{task=~"$task"}[5m])))
               / flywheel_requests_total + up + job:flywheel_x + sum(flywheel_training_duration_seconds_sum)"#
        ),
        [
            "flywheel_batch_size",
            "flywheel_requests_total",
            "flywheel_training_duration_seconds"
        ]
    );
    assert_eq!(
        rule_exprs("  - alert: A\n    expr: |\n      max(flywheel_model_ready)\n        == 0\n    for: 5m\n    expr: up == 0\n"),
        ["max(flywheel_model_ready) == 0", "up == 0"]
    );
}

#[test]
fn the_prometheus_config_and_alert_rules_pass_promtool() {
    let config = config_path("prometheus.yml");
    let rules = config_path("alerts.yml");
    let rule_tests = config_path("alerts_test.yml");
    promtool(&["check", "config", config.to_str().unwrap()], "");
    promtool(&["check", "rules", rules.to_str().unwrap()], "");
    promtool(&["test", "rules", rule_tests.to_str().unwrap()], "");

    let text = read(&config);
    assert!(text.contains("job_name: flywheel"), "{text}");
    assert!(text.contains(r#"targets: ["localhost:8080"]"#), "{text}");
    assert!(text.contains("- alerts.yml"), "{text}");
}

#[test]
fn every_alert_exists_and_uses_only_exported_metrics() {
    let text = read(&config_path("alerts.yml"));
    for alert in EXPECTED_ALERTS {
        assert!(
            text.contains(&format!("alert: {alert}\n")),
            "config/alerts.yml lacks {alert}"
        );
    }
    let exprs = rule_exprs(&text);
    let alerts = text
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    assert_eq!(exprs.len(), alerts, "one expr per alert: {exprs:#?}");
    let uses: Vec<(String, String)> = exprs
        .iter()
        .flat_map(|e| metric_names(e).into_iter().map(move |m| (e.clone(), m)))
        .collect();
    assert!(uses.len() >= EXPECTED_ALERTS.len(), "{uses:#?}");
    assert_known(&uses);
}

#[test]
fn every_dashboard_panel_queries_exported_metrics_through_the_datasource() {
    let dashboard = dashboard();
    assert_eq!(dashboard["schemaVersion"], 39);
    let panels = query_panels(&dashboard);
    assert!(
        panels.len() >= 10,
        "the dashboard has {} panels",
        panels.len()
    );
    let rows: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    assert_eq!(
        rows,
        [
            "Latency",
            "Traffic",
            "Model quality & drift",
            "Rollouts",
            "Training"
        ]
    );

    let mut ids = BTreeSet::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        let id = panel["id"].as_u64();
        assert!(
            id.is_some_and(|id| ids.insert(id)),
            "{title} has a missing or duplicate id"
        );
        assert!(
            panel["gridPos"]["w"].as_u64().is_some_and(|w| w > 0)
                && panel["gridPos"]["h"].as_u64().is_some_and(|h| h > 0),
            "{title} has no gridPos"
        );
        let datasource = &panel["datasource"];
        assert!(
            datasource["uid"].as_str().is_some_and(|u| !u.is_empty())
                || datasource.as_str().is_some_and(|u| !u.is_empty()),
            "{title} has no datasource: {datasource}"
        );
        let targets = panel["targets"].as_array().map_or(&[][..], Vec::as_slice);
        assert!(
            targets
                .iter()
                .any(|t| t["expr"].as_str().is_some_and(|e| !e.trim().is_empty())),
            "{title} has no target with an expr"
        );
    }

    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("the dashboard has template variables");
    assert!(
        variables
            .iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "no Prometheus datasource variable: {variables:#?}"
    );
    let task = variables
        .iter()
        .find(|v| v["name"] == "task")
        .expect("a task variable");
    assert_eq!(
        task["definition"],
        "label_values(flywheel_request_duration_seconds_count, task)"
    );

    let mut uses: Vec<(String, String)> = dashboard_exprs(&dashboard)
        .into_iter()
        .flat_map(|(title, expr)| {
            metric_names(&expr)
                .into_iter()
                .map(move |m| (title.clone(), m))
        })
        .collect();
    uses.push((
        "variable task".to_owned(),
        metric_names(task["definition"].as_str().unwrap())[0].clone(),
    ));
    assert_known(&uses);
    let shown: BTreeSet<&str> = uses.iter().map(|(_, m)| m.as_str()).collect();
    let missing: Vec<_> = KNOWN_METRICS
        .iter()
        .filter(|m| !shown.contains(**m))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics without a dashboard panel: {missing:?}"
    );
}

#[test]
fn every_dashboard_query_parses_as_promql() {
    // promtool has no "check query"; a recording rule per expression makes `check rules` parse each one.
    // Grafana's variables are replaced by what they expand to.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut index = String::from("\nthe rules are the dashboard's queries:\n");
    for (n, (title, expr)) in dashboard_exprs(&dashboard()).iter().enumerate() {
        writeln!(index, "dashboard:expr_{n} ({title}): {expr}").unwrap();
        let expr = expr
            .replace("$task", ".*")
            .replace('\\', "\\\\")
            .replace('"', "\\\"");
        writeln!(
            rules,
            "      - record: dashboard:expr_{n}\n        expr: \"{expr}\""
        )
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard_rules.yml");
    std::fs::write(&path, &rules).unwrap();
    promtool(&["check", "rules", path.to_str().unwrap()], &index);
}
