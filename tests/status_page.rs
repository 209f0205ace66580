//! The status page on the admin port: its JSON endpoints over plain HTTP, and the page itself in
//! a real headless browser (Debian's `chromium`; `.ci/run` installs it).

mod support;

use serde_json::{json, Value};
use support::browser::{dump_dom, screenshot, section};
use support::*;

/// A worker name that would become an element if the page ever used it as markup.
const HOSTILE_WORKER: &str = "farm.<img src=x id=injected>";

/// A proxy in front of a mock pool, with three miners (plus one with a hostile name) that have
/// each had two shares accepted.
struct Farm {
    pool: MockPool,
    proxy: Proxy,
    miners: Vec<(String, SimMiner)>,
}

async fn farm() -> Farm {
    let pool = MockPool::start(PoolOptions::default()).await;
    let proxy = spawn_proxy(proxy_config(pool.addr)).await;
    let mut miners = Vec::new();
    let workers = (1..=3).map(|n| format!("farm.rig{n}")).chain([HOSTILE_WORKER.to_owned()]);
    for worker in workers {
        let mut miner = proxy.miner().await;
        miner.handshake(&worker).await;
        for _ in 0..2 {
            let share = miner.any_share();
            let id = miner.submit(&worker, &share).await;
            let reply = miner.wait_reply(&id).await.expect("submit reply");
            assert_eq!(reply["result"], json!(true), "{reply}");
        }
        miners.push((worker, miner));
    }
    // The proxy records an outcome right after writing the reply, so poll briefly.
    let settled = eventually(WAIT, || async {
        let summary = get_json(&proxy, "/api/v1/summary").await;
        summary["accepted"] == json!(8) && summary["hashrate_5m"].as_f64().is_some_and(|h| h > 0.0)
    })
    .await;
    assert!(settled, "{}", get_json(&proxy, "/api/v1/summary").await);
    Farm { pool, proxy, miners }
}

async fn get_json(proxy: &Proxy, path: &str) -> Value {
    let (status, body) = proxy.http_get(path).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_endpoints_and_page_over_http() {
    let Farm { pool, proxy, miners } = farm().await;

    let (head, body) = http_get_with_head(proxy.http, "/").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/html; charset=utf-8"), "{head}");
    assert!(head.contains("content-security-policy: default-src 'none'"), "{head}");
    assert!(body.contains("<title>loka-stratum status</title>"), "{body}");
    // Self-contained: no external script, style sheet or image.
    for external in ["src=\"http", "href=\"http", "src=\"//", "href=\"//", "@import"] {
        assert!(!body.contains(external), "the page loads {external}…");
    }
    assert!(!body.contains("innerHTML"), "data goes into the page through textContent only");

    let pools = get_json(&proxy, "/api/v1/pools").await;
    let latency = pools[0]["latency_ms"].as_f64().expect("submits were answered");
    let age = pools[0]["last_notify_age_s"].as_f64().expect("the pool sent jobs");
    assert!(latency > 0.0 && (0.0..60.0).contains(&age), "{pools}");
    assert_eq!(
        pools,
        json!([{
            "pool": pool.label(),
            "url": pool.url(),
            "state": "up",
            "up": true,
            "upstream_sessions": miners.len(),
            "miners": miners.len(),
            "latency_ms": latency,
            "accepted": 2 * miners.len(),
            "rejected": 0,
            "last_notify_age_s": age,
        }])
    );

    let summary = get_json(&proxy, "/api/v1/summary").await;
    let object = summary.as_object().expect("an object");
    let mut keys: Vec<_> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "accepted",
            "connections",
            "hashrate_5m",
            "pool_accepted",
            "pool_rejected",
            "rejected",
            "uptime_s",
            "version",
            "worker_states",
            "workers"
        ]
    );
    assert_eq!(summary["connections"], json!(miners.len()));
    assert_eq!(summary["workers"], json!(miners.len()));
    assert_eq!(summary["accepted"], json!(2 * miners.len()));
    assert_eq!(summary["rejected"], json!(0));
    assert_eq!(summary["pool_accepted"], json!(2 * miners.len()));
    assert_eq!(summary["pool_rejected"], json!(0));
    assert_eq!(summary["version"], json!(env!("CARGO_PKG_VERSION")));
    assert!(summary["uptime_s"].is_u64(), "{summary}");
    let workers = get_json(&proxy, "/api/v1/connections").await;
    let sum: f64 = workers.as_array().unwrap().iter().map(|w| w["hashrate_5m"].as_f64().unwrap()).sum();
    let total = summary["hashrate_5m"].as_f64().unwrap();
    // The same figures, read moments later: a rate's divisor, the seconds the session has been
    // open, may have grown, never shrunk.
    assert!(sum > 0.0 && sum <= total * (1.0 + 1e-9) && sum >= total * 0.25, "summary {total}, workers {sum}");

    // The sampler takes its first sample as the server starts, the next 10 s later.
    let samples = get_json(&proxy, "/api/v1/hashrate").await;
    let samples = samples.as_array().expect("an array");
    assert!(!samples.is_empty() && samples.len() <= 360, "{samples:?}");
    for sample in samples {
        let object = sample.as_object().unwrap();
        assert_eq!(object.len(), 2, "{sample}");
        assert!(sample["t"].is_u64() && sample["hashrate"].is_f64(), "{sample}");
    }
    assert!(samples.windows(2).all(|w| w[0]["t"].as_u64() <= w[1]["t"].as_u64()), "oldest first");

    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_a_browser() {
    let Farm { pool, proxy, miners } = farm().await;
    let url = format!("http://{}/", proxy.http);

    let dom = dump_dom(&url).await;
    let workers = section(&dom, "connections");
    for (worker, miner) in miners.iter().filter(|(w, _)| w != HOSTILE_WORKER) {
        assert!(workers.contains(&format!("<td>{worker}</td>")), "{worker} missing from\n{workers}");
        let peer = miner.local_addr().to_string();
        assert!(workers.contains(&format!("<td>{peer}</td>")), "{peer} missing from\n{workers}");
    }
    // The hostile name is shown as text: escaped in the DOM, and no element was made from it.
    assert!(workers.contains("<td>farm.&lt;img src=x id=injected&gt;</td>"), "{workers}");
    assert!(!dom.contains("id=\"injected\""), "a worker name became markup:\n{dom}");
    // The inventory's table lists the same workers, as links to their detail; none needs a look.
    let inventory = section(&dom, "workers");
    assert!(inventory.contains("1–4 of 4 workers"), "{inventory}");
    for (worker, _) in miners.iter().filter(|(w, _)| w != HOSTILE_WORKER) {
        assert!(inventory.contains(&format!("\">{worker}</a>")), "{worker} missing from\n{inventory}");
    }
    assert!(inventory.contains("\">farm.&lt;img src=x id=injected&gt;</a>"), "{inventory}");
    let attention = section(&dom, "attention");
    assert!(attention.contains("id=\"c-online\">4<") && attention.contains("every worker is online"), "{attention}");
    let pools = section(&dom, "pools");
    assert!(pools.contains(&format!("<td>{}</td>", pool.label())), "{pools}");
    assert!(pools.contains("data-state=\"up\""), "the pool is not shown as up:\n{pools}");
    let totals = section(&dom, "totals");
    assert!(totals.contains("id=\"t-workers\">4<"), "{totals}");
    assert!(totals.contains("id=\"t-accepted\">8<"), "{totals}");
    // The chart was drawn: axes and the first sample at least.
    let chart = section(&dom, "hashrate");
    assert!(chart.contains("<line") && chart.contains("H/s</text>"), "{chart}");

    screenshot(&url, "status-page.png", 1280, 1000).await;

    proxy.shutdown().await;
}
