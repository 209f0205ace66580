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

use std::path::Path;

use loka_stratum::config::Mode;
use serde_json::json;
use support::promtool::*;
use support::*;

const MINERS: usize = 2;
/// Shares each miner submits between scrapes. Two rounds stay under the 20 verdicts after which
/// an aggregate pool session judges the pool's reject rate and fails over.
const SHARES: usize = 4;

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
            std::fs::write(&file, rules_test(&run.first, &run.second, "LokaNoShares|LokaRejectRateHigh", &expected))
                .unwrap();
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
