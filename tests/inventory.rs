//! The worker inventory over real sockets: states and transitions, counters folded in on close,
//! the API's paging, filters, sorting and errors, the history, and the store across restarts.

mod support;

use loka_stratum::config::{Config, Mode, StoreErrorPolicy};
use loka_stratum::inventory::{Transition, WorkerState};
use loka_stratum::server::Server;
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

in_both_modes!(tokio::test(flavor = "multi_thread", worker_threads = 2), counts_are_folded_in_when_a_session_closes);
async fn counts_are_folded_in_when_a_session_closes(mode: Mode) {
    let pool = pool().await;
    let proxy = spawn_proxy(config(mode, &pool)).await;
    // Shares and the close within far less than a sample: only the close can count them.
    let miner = mine(&proxy, "quick.rig", 6).await;
    drop(miner);
    assert!(eventually(WAIT, || async { worker(&proxy, "quick.rig").await["sessions"] == 0 }).await);
    let w = worker(&proxy, "quick.rig").await;
    assert_eq!((&w["accepted"], &w["rejected"]), (&json!(6), &json!(0)), "{w}");
    if mode == Mode::Passthrough {
        // In aggregate mode the pool's verdicts come to the group, and may come after the close.
        assert_eq!(w["pool_accepted"], json!(6), "{w}");
    }
    assert!(w["last_share"].as_u64().is_some(), "{w}");
    proxy.shutdown().await;
}

/// The next transition, within `WAIT`.
async fn next(events: &mut tokio::sync::broadcast::Receiver<Transition>) -> (String, WorkerState, WorkerState) {
    let t = tokio::time::timeout(WAIT, events.recv()).await.expect("a transition in time").expect("no lag");
    (t.worker, t.from, t.to)
}

in_both_modes!(tokio::test(flavor = "multi_thread", worker_threads = 2), stale_online_offline_and_their_events);
async fn stale_online_offline_and_their_events(mode: Mode) {
    use WorkerState::*;
    let pool = pool().await;
    let mut c = config(mode, &pool);
    // Longer than a sample, so that a share is seen before it is old.
    c.inventory.worker_stale_after = 3;
    let proxy = spawn_proxy(c).await;
    let mut events = proxy.inventory.subscribe();
    let name = || "idle.rig".to_owned();
    let mut miner = mine(&proxy, "idle.rig", 0).await;
    assert_eq!(next(&mut events).await, (name(), NeverSeen, Online), "a new worker comes online");
    assert_eq!(next(&mut events).await, (name(), Online, Stale), "connected, with no share");
    assert_eq!(worker(&proxy, "idle.rig").await["state"], "stale");
    assert_eq!(get(&proxy, "/api/v1/workers?state=stale").await["total"], 1);
    let share = miner.grind(None);
    let id = miner.submit("idle.rig", &share).await;
    assert_eq!(miner.wait_reply(&id).await.expect("a reply")["result"], json!(true));
    assert_eq!(next(&mut events).await, (name(), Stale, Online), "a share brings it back");
    let at = std::time::SystemTime::now();
    drop(miner);
    let t = tokio::time::timeout(WAIT, async {
        loop {
            let t = events.recv().await.unwrap();
            if t.to == Offline {
                return t;
            }
        }
    })
    .await
    .expect("offline after the grace");
    assert!(t.at.duration_since(at).unwrap() >= std::time::Duration::from_secs(1), "not before the grace");
    assert_eq!((t.address, t.pool), (Some("127.0.0.1".parse().unwrap()), Some(pool.label())));
    let (_, text) = proxy.http_get("/metrics").await;
    assert!(metric(&text, "loka_worker_offline_transitions_total", &[]).unwrap() >= 1.0, "{text}");
    for state in ["online", "stale", "offline", "never_seen"] {
        assert!(metric(&text, "loka_workers", &[("state", state)]).is_some(), "{state}: {text}");
    }
    proxy.shutdown().await;
}

in_both_modes!(tokio::test(flavor = "multi_thread", worker_threads = 2), a_quick_reconnect_is_a_reconnect_not_offline);
async fn a_quick_reconnect_is_a_reconnect_not_offline(mode: Mode) {
    let pool = pool().await;
    let mut c = config(mode, &pool);
    c.inventory.worker_offline_after = 60;
    let proxy = spawn_proxy(c).await;
    let mut events = proxy.inventory.subscribe();
    drop(mine(&proxy, "flaky.rig", 1).await);
    assert!(eventually(WAIT, || async { worker(&proxy, "flaky.rig").await["sessions"] == 0 }).await);
    assert_eq!(worker(&proxy, "flaky.rig").await["state"], "online", "within the grace");
    let _miner = mine(&proxy, "flaky.rig", 1).await;
    let w = worker(&proxy, "flaky.rig").await;
    assert_eq!((&w["reconnects_24h"], &w["sessions"], &w["state"]), (&json!(1), &json!(1), &json!("online")), "{w}");
    assert!(eventually(WAIT, || async { worker(&proxy, "flaky.rig").await["accepted"] == 2 }).await);
    assert_eq!(next(&mut events).await.2, WorkerState::Online);
    assert!(events.try_recv().is_err(), "no other transition");
    proxy.shutdown().await;
}

in_both_modes!(tokio::test(flavor = "multi_thread", worker_threads = 2), workers_outlive_a_restart_as_never_seen);
async fn workers_outlive_a_restart_as_never_seen(mode: Mode) {
    let pool = pool().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(mode, &pool);
    c.inventory.data_dir = dir.path().display().to_string();
    c.inventory.history_interval = 1;
    let proxy = spawn_proxy(c.clone()).await;
    let miner = mine(&proxy, "kept.rig", 3).await;
    // History points, one a second, oldest first.
    assert!(
        eventually(WAIT, || async { worker(&proxy, "kept.rig").await["history"].as_array().unwrap().len() >= 2 }).await
    );
    let before = worker(&proxy, "kept.rig").await;
    let history = before["history"].as_array().unwrap();
    assert!(history.windows(2).all(|p| p[0]["t"].as_u64() < p[1]["t"].as_u64()), "{before}");
    assert!(history.iter().any(|p| p["hashrate"].as_f64().unwrap() > 0.0), "{before}");
    drop(miner);
    proxy.shutdown().await;

    let proxy = spawn_proxy(c).await;
    let page = get(&proxy, "/api/v1/workers").await;
    assert_eq!(page["counts"], json!({"online": 0, "stale": 0, "offline": 0, "never_seen": 1}), "{page}");
    let w = worker(&proxy, "kept.rig").await;
    assert_eq!(w["state"], "never_seen");
    for key in ["first_seen", "last_share", "accepted", "pool", "address", "difficulty"] {
        assert_eq!(w[key], before[key], "{key}: {w} vs {before}");
    }
    assert!(w["history"].as_array().unwrap().len() >= history.len(), "{w}");
    let _miner = mine(&proxy, "kept.rig", 0).await;
    let w = worker(&proxy, "kept.rig").await;
    assert_eq!((&w["state"], &w["reconnects_24h"]), (&json!("online"), &json!(1)), "{w}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_store_that_cannot_be_opened_stops_start_up_unless_memory_is_allowed() {
    let pool = pool().await;
    let file = tempfile::NamedTempFile::new().unwrap();
    let mut c = config(Mode::Passthrough, &pool);
    c.inventory.data_dir = file.path().display().to_string();
    let e = Server::bind(c.clone()).await.err().expect("a start-up error");
    assert!(e.to_string().contains("cannot open the worker store"), "{e}");
    c.inventory.on_store_error = StoreErrorPolicy::Memory;
    let proxy = spawn_proxy(c).await;
    let _miner = mine(&proxy, "mem.rig", 1).await;
    assert!(eventually(WAIT, || async { worker(&proxy, "mem.rig").await["accepted"] == 1 }).await);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_thresholds_but_not_the_store() {
    let pool = pool().await;
    let mut c = config(Mode::Passthrough, &pool);
    c.inventory.worker_stale_after = 3600;
    let proxy = spawn_proxy(c.clone()).await;
    let _miner = mine(&proxy, "slow.rig", 0).await;
    assert_eq!(worker(&proxy, "slow.rig").await["state"], "online");
    c.inventory.data_dir = proxy.data_dir.as_ref().unwrap().path().display().to_string();
    let mut moved = c.clone();
    moved.inventory.data_dir.push_str("/elsewhere");
    let refused = proxy.reloader.reload(moved).unwrap_err();
    assert!(refused.contains("inventory.data_dir"), "{refused}");
    c.inventory.worker_stale_after = 3;
    proxy.reloader.reload(c).unwrap();
    assert!(eventually(WAIT, || async { worker(&proxy, "slow.rig").await["state"] == "stale" }).await);
    proxy.shutdown().await;
}
