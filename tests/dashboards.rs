//! The Grafana dashboard and the alert rules in `config/` name only metrics a fresh proxy exports,
//! and a fresh proxy exports every series. Alone in its binary: the metrics recorder is
//! process-global, and this test needs it untouched by other proxies.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use loka_stratum::metrics as m;
use loka_stratum::registry::CloseReason;
use loka_stratum::submissions::RejectReason;
use serde_json::Value;
use support::*;

/// Appears only with its first sample: its `reason` label is not a set the proxy declares.
/// Series whose labels are known only later: fault reasons, and aggregate sessions' indexes.
const APPEARS_LATER: &[&str] = &[m::UPSTREAM_FAULTS, m::AGGREGATE_SESSION_MINERS];

const ALERTS: &[&str] = &["LokaNoUpstream", "LokaRejectRateHigh", "LokaConnectionsNearLimit", "LokaNoShares"];

#[tokio::test]
async fn dashboard_and_alerts_name_exported_metrics() {
    let pool = MockPool::start(PoolOptions::default()).await;
    let config = proxy_config(pool.addr);
    let max_connections = config.server.max_connections as f64;
    let proxy = spawn_proxy(config).await;
    let (status, text) = proxy.http_get("/metrics").await;
    assert_eq!(status, 200);
    let families = families(&text);

    // Every series with a closed label set is there at zero before any miner connects.
    let label = pool.label();
    for name in [m::CONNECTIONS_ACCEPTED, m::CONNECTIONS_REJECTED, m::CONNECTIONS_CLOSED, m::MESSAGES] {
        assert_eq!(metric(&text, name, &[]), Some(0.0), "{name} in\n{text}");
    }
    assert_eq!(metric(&text, m::CONNECTIONS_MAX, &[]), Some(max_connections), "{text}");
    for reason in CloseReason::ALL {
        assert_eq!(metric(&text, m::CONNECTIONS_CLOSED, &[("reason", reason.as_str())]), Some(0.0), "{text}");
    }
    for reason in RejectReason::LOCAL {
        let labels = [("pool", label.as_str()), ("reason", reason.as_str())];
        assert_eq!(metric(&text, m::SHARES_REJECTED, &labels), Some(0.0), "{labels:?} in\n{text}");
    }
    for reason in RejectReason::POOL {
        let labels = [("pool", label.as_str()), ("reason", reason.as_str())];
        assert_eq!(metric(&text, m::UPSTREAM_REJECTS, &labels), Some(0.0), "{labels:?} in\n{text}");
    }
    for result in ["accepted", "rejected", "unanswered", "dropped"] {
        let labels = [("pool", label.as_str()), ("result", result)];
        assert_eq!(metric(&text, m::UPSTREAM_SHARES, &labels), Some(0.0), "{labels:?} in\n{text}");
    }
    assert_eq!(metric(&text, m::SHARES_ACCEPTED_WORK, &[("pool", &label)]), Some(0.0), "{text}");
    assert_eq!(metric(&text, "loka_upstream_submit_rtt_seconds_count", &[("pool", &label)]), Some(0.0), "{text}");

    let dashboard: Value = serde_json::from_str(&read("config/grafana-dashboard.json")).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("the dashboard has panels");
    assert!(panels.iter().filter(|p| p["type"] != "row").count() >= 10, "{} panels", panels.len());
    let mut strings = Vec::new();
    collect_strings(&dashboard, &mut strings);
    let exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() >= 20, "{} exprs", exprs.len());
    check_names("config/grafana-dashboard.json", &strings.join("\n"), &families);

    let alerts = read("config/alerts.yml");
    for name in ALERTS {
        assert!(alerts.contains(&format!("- alert: {name}\n")), "alert {name} missing from config/alerts.yml");
    }
    for key in ["expr:", "for:", "severity:", "summary:", "description:"] {
        assert!(
            alerts.matches(key).count() >= ALERTS.len(),
            "fewer than {} `{key}` in config/alerts.yml",
            ALERTS.len()
        );
    }
    check_names("config/alerts.yml", &alerts, &families);

    // And the other way round: every metric the proxy declares, bar the exceptions, is exported.
    let source = read("src/metrics.rs");
    let declared: Vec<&str> = source
        .lines()
        .filter_map(|l| l.strip_prefix("pub const ")?.split_once(": &str = \"")?.1.strip_suffix("\";"))
        .collect();
    assert!(declared.len() >= 20, "{declared:?}");
    for name in declared.iter().filter(|n| !APPEARS_LATER.contains(n)) {
        assert!(families.contains_key(*name), "{name} is declared in src/metrics.rs but not exported at start-up");
    }
    proxy.shutdown().await;
}

fn read(path: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Metric family names and their types, from the `# TYPE` lines.
fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.trim().to_owned()))
        .collect()
}

/// Asserts that every `loka_` identifier in `text` is an exported family, a histogram family's
/// `_bucket`, `_sum` or `_count` series, or one of the metrics that appear later.
fn check_names(file: &str, text: &str, families: &BTreeMap<String, String>) {
    let names = loka_names(text);
    assert!(!names.is_empty(), "no loka_ metric in {file}");
    for name in &names {
        let histogram_series = ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix).is_some_and(|base| families.get(base).is_some_and(|k| k == "histogram"))
        });
        assert!(
            families.contains_key(name) || histogram_series || APPEARS_LATER.contains(&name.as_str()),
            "{file} names {name}, which /metrics does not export; it exports {:?}",
            families.keys().collect::<Vec<_>>()
        );
    }
}

/// Every identifier that starts with `loka_` (and is not the tail of a longer identifier).
fn loka_names(text: &str) -> BTreeSet<String> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("loka_") {
        let preceded = rest[..start].chars().next_back().is_some_and(is_ident);
        let tail = &rest[start..];
        let end = tail.find(|c: char| !is_ident(c)).unwrap_or(tail.len());
        if !preceded {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

fn collect_strings<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::String(s) => out.push(s),
        Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| collect_strings(v, out)),
        _ => {}
    }
}

fn dashboard_exprs(value: &Value) -> Vec<&str> {
    let mut exprs = Vec::new();
    let mut stack = vec![value];
    while let Some(value) = stack.pop() {
        match value {
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => {
                exprs.extend(map.get("expr").and_then(Value::as_str));
                stack.extend(map.values());
            }
            _ => {}
        }
    }
    exprs
}
