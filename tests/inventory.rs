//! The worker inventory over real sockets: states and transitions, counters folded in on close,
//! the API's paging, filters, sorting and errors, the history, and the store across restarts.

mod support;

use loka_stratum::config::{Config, Mode};
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DIFFICULTY: f64 = 1e-6;

/// A proxy in `mode` whose miners work at the pool's difficulty, with quick states.
fn config(mode: Mode, pool: &MockPool) -> Config {
    let mut c = mode_config(mode, pool.addr);
    c.vardiff.start_difficulty = DIFFICULTY;
    c.vardiff.min_difficulty = DIFFICULTY;
    c.vardiff.max_difficulty = DIFFICULTY;
    c.inventory.worker_offline_after = 1;
    c.inventory.flush_interval = 1;
    c
}

async fn pool() -> MockPool {
    MockPool::start(PoolOptions { validate: true, difficulty: DIFFICULTY, ..PoolOptions::default() }).await
}

/// One HTTP request: (status, body).
async fn http(proxy: &Proxy, method: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    let request = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut buf)).await.expect("an answer").unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.split_whitespace().nth(1).unwrap().parse().unwrap(), body.to_owned())
}

async fn get(proxy: &Proxy, path: &str) -> Value {
    let (status, body) = proxy.http_get(path).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

async fn worker(proxy: &Proxy, name: &str) -> Value {
    get(proxy, &format!("/api/v1/workers/{name}")).await
}

/// A miner that authorizes `name` and sends `shares` accepted shares.
async fn mine(proxy: &Proxy, name: &str, shares: usize) -> SimMiner {
    let mut miner = proxy.miner().await;
    miner.handshake(name).await;
    for _ in 0..shares {
        let share = miner.grind(None);
        let id = miner.submit(name, &share).await;
        assert_eq!(miner.wait_reply(&id).await.expect("a reply")["result"], json!(true));
    }
    miner
}

in_both_modes!(tokio::test(flavor = "multi_thread", worker_threads = 2), list_filter_sort_page_and_delete);
async fn list_filter_sort_page_and_delete(mode: Mode) {
    let pool = pool().await;
    let proxy = spawn_proxy(config(mode, &pool)).await;
    let mut miners = Vec::new();
    for (i, name) in ["farm.a", "farm.b", "Farm.C", "other/x y"].iter().enumerate() {
        miners.push(mine(&proxy, name, i).await);
    }
    let page = get(&proxy, "/api/v1/workers").await;
    assert_eq!(
        (page["total"].clone(), page["offset"].clone(), page["limit"].clone()),
        (json!(4), json!(0), json!(100))
    );
    assert_eq!(page["counts"], json!({"online": 4, "stale": 0, "offline": 0, "never_seen": 0}), "{page}");
    let names: Vec<_> = page["workers"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["Farm.C", "farm.a", "farm.b", "other/x y"], "by name by default");
    let w = &page["workers"][0];
    let keys: Vec<_> = w.as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        keys,
        [
            "accepted",
            "address",
            "difficulty",
            "first_seen",
            "hashrate_10m",
            "hashrate_1h",
            "hashrate_24h",
            "last_seen",
            "last_share",
            "name",
            "pool",
            "pool_accepted",
            "pool_rejected",
            "reconnects_24h",
            "rejected",
            "rejected_by",
            "sessions",
            "stale",
            "state"
        ]
    );
    assert_eq!((&w["state"], &w["address"], &w["sessions"]), (&json!("online"), &json!("127.0.0.1"), &json!(1)));
    assert_eq!(w["pool"], json!(pool.label()), "{w}");
    assert_eq!(w["difficulty"], json!(DIFFICULTY), "{w}");

    // The shares arrive with the next sample.
    assert!(eventually(WAIT, || async { worker(&proxy, "other%2Fx%20y").await["accepted"] == 3 }).await);
    let w = worker(&proxy, "other%2Fx%20y").await;
    assert_eq!((&w["name"], &w["pool_accepted"]), (&json!("other/x y"), &json!(3)), "{w}");
    assert!(w["hashrate_10m"].as_f64().unwrap() > 0.0, "{w}");
    assert!(w["history"].is_array(), "{w}");

    let page = get(&proxy, "/api/v1/workers?sort=accepted&order=desc&limit=2&offset=1&q=FARM").await;
    assert_eq!((&page["total"], &page["limit"], &page["offset"]), (&json!(3), &json!(2), &json!(1)), "{page}");
    let names: Vec<_> = page["workers"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["farm.b", "farm.a"], "{page}");
    for bad in ["limit=0", "limit=1001", "offset=-1", "state=dead", "sort=speed", "order=sideways"] {
        let (status, body) = proxy.http_get(&format!("/api/v1/workers?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string(), "{body}");
    }
    let (status, body) = http(&proxy, "GET", "/api/v1/workers/nobody").await;
    assert_eq!((status, serde_json::from_str::<Value>(&body).unwrap()["error"].is_string()), (404, true));
    assert_eq!(http(&proxy, "DELETE", "/api/v1/workers/nobody").await.0, 404);
    assert_eq!(http(&proxy, "DELETE", "/api/v1/workers/farm.a").await.0, 409, "online");

    // farm.a leaves: online through the grace, then offline, then it can be forgotten.
    drop(miners.remove(0));
    let state = |name: &'static str| {
        let proxy = &proxy;
        async move { worker(proxy, name).await["state"].clone() }
    };
    assert!(
        eventually(WAIT, || async { state("farm.a").await == "offline" }).await,
        "{}",
        worker(&proxy, "farm.a").await
    );
    let page = get(&proxy, "/api/v1/workers?state=offline,stale").await;
    assert_eq!((&page["total"], &page["workers"][0]["name"]), (&json!(1), &json!("farm.a")), "{page}");
    let summary = get(&proxy, "/api/v1/summary").await;
    assert_eq!(summary["worker_states"], json!({"online": 3, "stale": 0, "offline": 1, "never_seen": 0}));
    assert_eq!(http(&proxy, "DELETE", "/api/v1/workers/farm.a").await.0, 204);
    assert_eq!(http(&proxy, "GET", "/api/v1/workers/farm.a").await.0, 404);
    assert_eq!(get(&proxy, "/api/v1/workers").await["total"], 3);
    proxy.shutdown().await;
}
