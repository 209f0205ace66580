//! The shipped alerts against what the proxy really exports, with the tools operators use.
//!
//! In each upstream mode, miners mine valid shares through a real proxy in front of a pool that
//! rejects every share, and in front of a healthy one. `/metrics` is scraped twice; each scrape
//! must pass `promtool check metrics`, and the increase between them, repeated every minute for
//! half an hour, becomes the input of a `promtool test rules` run over `config/alerts.yml`:
//! `LokaNoShares` and `LokaRejectRateHigh` must fire on the rejecting pool and stay quiet on the
//! healthy one.
//!
//! Needs `promtool` (Debian's `prometheus` package; `.ci/run` installs it). Alone in its binary:
//! the metrics recorder is process-global, so the cases run one after the other, each with a pool
//! of its own and so a `pool` label of its own.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use loka_stratum::config::Mode;
use serde_json::json;
use support::*;

const MINERS: usize = 2;
/// Shares each miner submits between scrapes. Two rounds stay under the 20 verdicts after which
/// an aggregate pool session judges the pool's reject rate and fails over.
const SHARES: usize = 4;
/// Minutes of extrapolated series: the alerts look 10 minutes back and wait up to 5.
const MINUTES: u32 = 30;
const EVAL_AT: &str = "20m";
/// The proxy's `instance` label in the rules test, as a Prometheus scrape would add it.
const INSTANCE: &str = "loka";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_fire_on_a_pool_that_rejects_everything_in_both_modes() {
    require_promtool();
    for mode in [Mode::Passthrough, Mode::Aggregate] {
        for rejecting in [false, true] {
            let case = format!("{}-{}", mode_name(mode), if rejecting { "rejecting" } else { "healthy" });
            let run = mine_and_scrape(mode, rejecting).await;
            // Kept for a look after a failure: both scrapes and the rules test made of them.
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("alerts").join(&case);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("metrics-1.txt"), &run.first).unwrap();
            std::fs::write(dir.join("metrics-2.txt"), &run.second).unwrap();
            for (i, text) in [&run.first, &run.second].into_iter().enumerate() {
                let lint = promtool(&["check", "metrics"], Some(text));
                assert!(
                    lint.status.success() && lint.stdout.is_empty() && lint.stderr.is_empty(),
                    "{case}: promtool check metrics on scrape {}: {}{}\n{text}",
                    i + 1,
                    String::from_utf8_lossy(&lint.stdout),
                    String::from_utf8_lossy(&lint.stderr)
                );
            }
            let expected = if rejecting {
                vec![
                    format!(
                        r#"ALERTS{{alertname="LokaNoShares",alertstate="firing",instance="{INSTANCE}",severity="warning"}}"#
                    ),
                    format!(
                        r#"ALERTS{{alertname="LokaRejectRateHigh",alertstate="firing",instance="{INSTANCE}",pool="{}",severity="warning"}}"#,
                        run.pool
                    ),
                ]
            } else {
                Vec::new()
            };
            let file = dir.join("test.yml");
            std::fs::write(&file, rules_test(&run.first, &run.second, &expected)).unwrap();
            let out = promtool(&["test", "rules", file.to_str().unwrap()], None);
            assert!(
                out.status.success(),
                "{case}: the alerts on the series the proxy exported ({}):\n{}{}",
                file.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Passthrough => "passthrough",
        Mode::Aggregate => "aggregate",
    }
}

/// Two scrapes of `/metrics`, a round of shares apart, and the pool's `pool` label.
struct Run {
    first: String,
    second: String,
    pool: String,
}

async fn mine_and_scrape(mode: Mode, rejecting: bool) -> Run {
    // Difficulty 1e-12 on both sides: in aggregate mode every share meets the pool's difficulty
    // and is forwarded.
    let pool = MockPool::start(PoolOptions { extranonce2_size: 8, validate: true, ..PoolOptions::default() }).await;
    if rejecting {
        pool.set_submit_replies(SubmitReplies::Reject);
    }
    let mut config = proxy_config(pool.addr);
    config.upstream.mode = mode;
    if mode == Mode::Aggregate {
        config.vardiff.start_difficulty = 1e-12;
        config.vardiff.min_difficulty = 1e-12;
        config.vardiff.max_difficulty = 1e6;
    }
    let proxy = spawn_proxy(config).await;
    let mut miners = Vec::new();
    for i in 0..MINERS {
        let mut miner = proxy.miner().await;
        miner.handshake(&format!("farm.w{i}")).await;
        miners.push(miner);
    }
    let label = pool.label();
    let mut scrapes = Vec::new();
    for round in 1..=2 {
        for (i, miner) in miners.iter_mut().enumerate() {
            for _ in 0..SHARES {
                let share = miner.grind(None);
                let id = miner.submit(&format!("farm.w{i}"), &share).await;
                let reply = miner.wait_reply(&id).await.expect("a submit reply");
                // Passthrough miners get the pool's verdict; aggregate miners the proxy's.
                let pool_verdict = mode == Mode::Passthrough;
                if rejecting && pool_verdict {
                    assert_eq!(reply["error"][0], json!(23), "{reply}");
                } else {
                    assert_eq!(reply["result"], json!(true), "{reply}");
                }
            }
        }
        // Every share forwarded so far has its verdict in the metrics.
        let answered = (round * MINERS * SHARES) as f64;
        let result = if rejecting { "rejected" } else { "accepted" };
        let settled = eventually(WAIT, || async {
            let (_, text) = proxy.http_get("/metrics").await;
            metric(&text, "loka_upstream_shares_total", &[("pool", &label), ("result", result)]) == Some(answered)
        })
        .await;
        let (status, text) = proxy.http_get("/metrics").await;
        assert_eq!(status, 200);
        assert!(settled, "{} pool verdicts expected in\n{text}", answered);
        scrapes.push(text);
    }
    drop(miners);
    proxy.shutdown().await;
    let second = scrapes.pop().unwrap();
    let first = scrapes.pop().unwrap();
    Run { first, second, pool: label }
}

fn require_promtool() {
    if let Err(e) = Command::new("promtool").arg("--version").output() {
        panic!(
            "promtool cannot run ({e}): these tests need it. Install Debian's `prometheus` package \
             (apt-get install prometheus); .ci/run does so when it is missing."
        );
    }
}

fn promtool(args: &[&str], stdin: Option<&str>) -> Output {
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
fn samples(text: &str) -> (BTreeMap<String, f64>, BTreeMap<String, String>) {
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
fn grows(series: &str, types: &BTreeMap<String, String>) -> bool {
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
/// it grew between the scrapes (gauges at their value), with the firing alerts of the two rules
/// under test expected to be exactly `expected`.
fn rules_test(first: &str, second: &str, expected: &[String]) -> String {
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
         promql_expr_test:\n      - expr: 'ALERTS{{alertstate=\"firing\", alertname=~\"LokaNoShares|LokaRejectRateHigh\"}}'\n        \
         eval_time: {EVAL_AT}\n        exp_samples:{exp}",
        rules.display()
    )
}
