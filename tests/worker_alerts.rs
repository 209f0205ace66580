//! The shipped worker alerts against what a real proxy exports: workers that go offline past the
//! threshold fire `LokaWorkersOffline`, a connected worker without shares fires
//! `LokaWorkersStale`, and a farm that stays put fires neither. Each scrape passes
//! `promtool check metrics`. Alone in its binary: the metrics recorder is process-global.

mod support;

use std::path::Path;

use loka_stratum::config::Mode;
use serde_json::{json, Value};
use support::promtool::*;
use support::*;

const ALERTS: &str = "LokaWorkersOffline|LokaWorkersStale";
const MINERS: usize = 3;

async fn state_count(proxy: &Proxy, state: &str) -> u64 {
    let (_, body) = proxy.http_get("/api/v1/workers").await;
    serde_json::from_str::<Value>(&body).unwrap()["counts"][state].as_u64().unwrap()
}

/// Two scrapes: with `MINERS` connected, and after `leaving` of them left, with one of those
/// that stay not mining when `idle` (it goes stale).
async fn scrapes(leaving: usize, idle: bool) -> (String, String) {
    let pool = MockPool::start(PoolOptions { validate: true, ..PoolOptions::default() }).await;
    let mut config = proxy_config(pool.addr);
    config.upstream.mode = Mode::Passthrough;
    config.inventory.worker_offline_after = 1;
    config.inventory.worker_stale_after = if idle { 3 } else { 3600 };
    let proxy = spawn_proxy(config).await;
    let mut miners = Vec::new();
    for i in 0..MINERS {
        let mut miner = proxy.miner().await;
        let name = format!("alert.rig{i}");
        miner.handshake(&name).await;
        if !(idle && i == MINERS - 1) {
            let share = miner.grind(None);
            let id = miner.submit(&name, &share).await;
            assert_eq!(miner.wait_reply(&id).await.expect("a reply")["result"], json!(true));
        }
        miners.push(miner);
    }
    assert!(eventually(WAIT, || async { state_count(&proxy, "online").await == MINERS as u64 }).await);
    let (_, first) = proxy.http_get("/metrics").await;
    miners.drain(..leaving);
    let stale = u64::from(idle);
    let settled = eventually(WAIT, || async {
        state_count(&proxy, "offline").await == leaving as u64 && state_count(&proxy, "stale").await == stale
    })
    .await;
    assert!(settled, "{}", proxy.http_get("/api/v1/workers").await.1);
    let (_, second) = proxy.http_get("/metrics").await;
    drop(miners);
    proxy.shutdown().await;
    (first, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_alerts_fire_on_offline_and_stale_workers_only() {
    require_promtool();
    for (case, leaving, idle) in [("steady", 0, false), ("leaving", 2, true)] {
        let (first, second) = scrapes(leaving, idle).await;
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("worker-alerts").join(case);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, text) in [&first, &second].into_iter().enumerate() {
            std::fs::write(dir.join(format!("metrics-{}.txt", i + 1)), text).unwrap();
            let lint = promtool(&["check", "metrics"], Some(text));
            assert!(
                lint.status.success() && lint.stdout.is_empty() && lint.stderr.is_empty(),
                "{case}: promtool check metrics: {}{}",
                String::from_utf8_lossy(&lint.stdout),
                String::from_utf8_lossy(&lint.stderr)
            );
        }
        // Two workers a minute, extrapolated: past the shipped threshold of 5 in 15 minutes.
        let expected: Vec<String> = match case {
            "steady" => Vec::new(),
            _ => ["LokaWorkersOffline", "LokaWorkersStale"]
                .iter()
                .map(|alert| {
                    format!(
                        r#"ALERTS{{alertname="{alert}",alertstate="firing",instance="{INSTANCE}",severity="warning"}}"#
                    )
                })
                .collect(),
        };
        let file = dir.join("test.yml");
        std::fs::write(&file, rules_test(&first, &second, ALERTS, &expected)).unwrap();
        let out = promtool(&["test", "rules", file.to_str().unwrap()], None);
        assert!(
            out.status.success(),
            "{case} ({}):\n{}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
