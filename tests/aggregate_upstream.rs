//! Aggregate mode facing its pool: the difficulty each pool session asks the pool for, miners'
//! difficulties above the pool's, and what a failover does and logs.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use loka_stratum::config::{Config, Mode, PoolConfig};
use serde_json::json;
use support::*;

/// An aggregate proxy in front of `pools`, in priority order, with miners starting at `difficulty`.
fn config(pools: &[&MockPool], difficulty: f64) -> Config {
    let mut c = mode_config(Mode::Aggregate, pools[0].addr);
    c.pools = pools
        .iter()
        .map(|p| PoolConfig { url: p.url(), user: "acct".into(), password: "pw".into(), ..PoolConfig::default() })
        .collect();
    c.vardiff.start_difficulty = difficulty;
    c.vardiff.max_difficulty = 1e6;
    c
}

fn validating(difficulty: f64) -> PoolOptions {
    PoolOptions { extranonce2_size: 8, difficulty, validate: true, reject_duplicates: true, ..PoolOptions::default() }
}

/// The difficulties the pool was asked for with `mining.suggest_difficulty`, in order.
fn suggestions(pool: &MockPool) -> Vec<f64> {
    let asked = pool.recorded_json().into_iter().filter(|m| m["method"] == "mining.suggest_difficulty");
    asked.filter_map(|m| m["params"][0].as_f64()).collect()
}

async fn suggested(pool: &MockPool, difficulty: f64) -> bool {
    let close = |d: f64| (d / difficulty - 1.0).abs() < 1e-9;
    eventually(WAIT, || async { suggestions(pool).last().is_some_and(|d| close(*d)) }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pool_session_asks_the_pool_for_its_miners_work() {
    let pool = MockPool::start(PoolOptions::default()).await;
    let proxy = spawn_proxy(config(&[&pool], 0.5)).await;
    let mut first = proxy.miner().await;
    first.handshake("farm.rig1").await;
    assert!(suggested(&pool, 0.5).await, "one miner at 0.5: {:?}", suggestions(&pool));
    let mut second = proxy.miner().await;
    second.handshake("farm.rig2").await;
    assert!(suggested(&pool, 1.0).await, "two at 0.5: {:?}", suggestions(&pool));
    let id = second.request("mining.suggest_difficulty", json!([2.0])).await;
    assert_eq!(second.wait_reply(&id).await.unwrap()["result"], json!(true));
    assert!(suggested(&pool, 2.5).await, "0.5 + 2: {:?}", suggestions(&pool));
    drop(second);
    assert!(suggested(&pool, 0.5).await, "the second left: {:?}", suggestions(&pool));
    // Asked again only when the work moves: a steady group asks nothing more.
    let asked = suggestions(&pool).len();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(suggestions(&pool).len(), asked, "{:?}", suggestions(&pool));
    assert!(!first.closed);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_miner_rises_above_the_pools_difficulty() {
    // The pool ignores suggestions and stays at 1e-9; the miner starts 10 times below it and is
    // far too fast for either.
    const POOL: f64 = 1e-9;
    let pool = MockPool::start(validating(POOL)).await;
    let proxy = spawn_proxy(config(&[&pool], POOL / 10.0)).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig1").await;
    for _ in 0..300 {
        if miner.difficulty > POOL {
            break;
        }
        let share = miner.grind(None);
        let id = miner.submit("farm.rig1", &share).await;
        assert_eq!(miner.wait_reply(&id).await.unwrap()["result"], json!(true));
    }
    assert!(miner.difficulty > POOL, "held at {} by the pool's {POOL}", miner.difficulty);
    // Its shares meet the pool's easier target: each goes up, and the pool takes it.
    let forwarded = pool.accepted();
    for _ in 0..3 {
        let share = miner.grind(None);
        let id = miner.submit("farm.rig1", &share).await;
        assert_eq!(miner.wait_reply(&id).await.unwrap()["result"], json!(true));
    }
    assert!(eventually(WAIT, || async { pool.accepted() >= forwarded + 3 }).await);
    assert_eq!(pool.rejected(), 0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_miner_gets_a_difficulty_with_the_backups_first_job() {
    // Both pools and the miner at one difficulty: nothing changes it, and it is sent all the same.
    let mut primary = MockPool::start(validating(1e-12)).await;
    let backup = MockPool::start(validating(1e-12)).await;
    let proxy = spawn_proxy(config(&[&primary, &backup], 1e-12)).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig1").await;
    let mark = miner.notifications.len();
    primary.kill().await;
    assert!(miner.clean_job(WAIT).await.is_some(), "the backup's job");
    let methods: Vec<&str> = miner.notifications[mark..].iter().filter_map(|n| n["method"].as_str()).collect();
    assert_eq!(methods, ["mining.set_difficulty", "mining.notify"]);
    assert_eq!(miner.difficulty, 1e-12);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miner_that_leaves_while_its_authorize_waits_is_counted_as_gone() {
    let pool = MockPool::start(validating(1e-12)).await;
    let mut c = config(&[&pool], 1e-12);
    c.aggregate.worker_passthrough = true;
    c.upstream.user_template = "{pool_user}.{worker}".into();
    let proxy = spawn_proxy(c).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig1").await;
    // The pool stops answering; the miner authorizes another worker and is cut while it waits.
    pool.freeze();
    miner.request("mining.authorize", json!(["farm.rig2", "x"])).await;
    let closed = |reason: &'static str| {
        let proxy = &proxy;
        async move {
            let (_, text) = proxy.http_get("/metrics").await;
            metric(&text, "loka_connections_closed_total", &[("reason", reason)]).unwrap_or(0.0)
        }
    };
    let (gone, failed) = (closed("miner_closed").await, closed("write_failed").await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    miner.reset();
    assert!(eventually(WAIT, || async { proxy.registry.is_empty() }).await, "the connection is closed");
    assert!(closed("miner_closed").await > gone);
    assert_eq!(closed("write_failed").await, failed, "a miner that left is not a failed write");
    proxy.shutdown().await;
}

/// Everything logged at info and above in this test binary.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().write(buf)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the first subscriber of this binary");
        logs
    })
    .clone()
}

// One thread: the group tries the killed primary before its monitor finds it down.
#[tokio::test]
async fn a_refused_connect_is_logged_as_one() {
    let logs = logs();
    let mut primary = MockPool::start(validating(1e-12)).await;
    let backup = MockPool::start(validating(1e-12)).await;
    let proxy = spawn_proxy(config(&[&primary, &backup], 1e-12)).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig1").await;
    primary.kill().await;
    assert!(miner.clean_job(WAIT).await.is_some(), "the backup's job");
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let label = primary.label();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(&label)).collect();
    assert!(!lines.iter().any(|l| l.contains("refused for aggregation")), "{lines:#?}");
    assert!(lines.iter().any(|l| l.contains("pool connect failed")), "{lines:#?}");
    proxy.shutdown().await;
}
