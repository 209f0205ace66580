//! `promtool` for the alert tests: `promtool check metrics` on a scrape, and a `promtool test
//! rules` file made of two scrapes of a real proxy, extrapolated minute by minute.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Minutes of extrapolated series: the alerts look up to 15 minutes back and wait up to 10.
pub const MINUTES: u32 = 30;
pub const EVAL_AT: &str = "20m";
/// The proxy's `instance` label in the rules test, as a Prometheus scrape would add it.
pub const INSTANCE: &str = "loka";

pub fn require_promtool() {
    if let Err(e) = Command::new("promtool").arg("--version").output() {
        panic!(
            "promtool cannot run ({e}): these tests need it. Install Debian's `prometheus` package \
             (apt-get install prometheus); .ci/run does so when it is missing."
        );
    }
}

pub fn promtool(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

/// The samples of a scrape by series (`name{labels}` as exported), and each family's type.
pub fn samples(text: &str) -> (BTreeMap<String, f64>, BTreeMap<String, String>) {
    let mut values = BTreeMap::new();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            types.insert(name.to_owned(), kind.trim().to_owned());
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let (series, value) = line.rsplit_once(' ').expect("name{labels} value");
            values.insert(series.to_owned(), value.parse::<f64>().expect("a number"));
        }
    }
    (values, types)
}

/// Counters, and histograms' and summaries' series, only grow; gauges hold still.
pub fn grows(series: &str, types: &BTreeMap<String, String>) -> bool {
    let name = series.split('{').next().unwrap();
    let kind = |n: &str| types.get(n).map(String::as_str);
    match kind(name) {
        Some(k) => k == "counter",
        None => ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .any(|base| matches!(kind(base), Some("histogram" | "summary"))),
    }
}

/// A `promtool test rules` file: every series of the second scrape, each minute growing by what
/// it grew between the scrapes (gauges at their value), with the firing alerts among `alerts` (a
/// regular expression of alert names) expected to be exactly `expected`.
pub fn rules_test(first: &str, second: &str, alerts: &str, expected: &[String]) -> String {
    let (before, _) = samples(first);
    let (after, types) = samples(second);
    let mut input = String::new();
    for (series, value) in &after {
        let step =
            if grows(series, &types) { (value - before.get(series).copied().unwrap_or(0.0)).max(0.0) } else { 0.0 };
        let labelled = match series.split_once('{') {
            Some((name, labels)) => format!(r#"{name}{{instance="{INSTANCE}",{labels}"#),
            None => format!(r#"{series}{{instance="{INSTANCE}"}}"#),
        };
        input.push_str(&format!("      - series: '{labelled}'\n        values: '{value}+{step}x{MINUTES}'\n"));
    }
    let exp = if expected.is_empty() {
        " []\n".to_owned()
    } else {
        expected
            .iter()
            .map(|labels| format!("\n          - labels: '{labels}'\n            value: 1"))
            .collect::<String>()
            + "\n"
    };
    let rules: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/alerts.yml");
    format!(
        "rule_files:\n  - {}\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{input}    \
         promql_expr_test:\n      - expr: 'ALERTS{{alertstate=\"firing\", alertname=~\"{alerts}\"}}'\n        \
         eval_time: {EVAL_AT}\n        exp_samples:{exp}",
        rules.display()
    )
}
