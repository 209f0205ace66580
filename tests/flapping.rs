//! A pool flapping up and down 200 times: every miner session ends with its pool, miners that
//! arrive while it is down are refused, and afterwards the proxy holds no more file descriptors,
//! tasks or memory than it did before the flapping began.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const FLAPS: usize = 200;
/// Descriptors and tasks the proxy may legitimately hold beyond the baseline (e.g. a monitor
/// probe that is still connecting).
const FD_SLACK: usize = 4;
const TASK_SLACK: usize = 2;
const RSS_GROWTH_MAX_KB: u64 = 32 * 1024;

/// Open file descriptors of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd is readable").count()
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current().metrics().num_alive_tasks()
}

fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status is readable");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Connects and subscribes. `Err(reply)` when the proxy refuses the miner for want of a pool;
/// the refused miner must then be closed.
async fn try_handshake(proxy: &Proxy, worker: &str) -> Result<SimMiner, Value> {
    let mut miner = proxy.miner().await;
    let id = miner.request("mining.subscribe", json!(["simminer/1.0"])).await;
    let reply = miner.wait_reply(&id).await.expect("a reply to subscribe, success or refusal");
    if !reply["error"].is_null() {
        assert!(miner.expect_closed(WAIT).await, "a refused miner is closed");
        return Err(reply);
    }
    miner.extranonce1 = hex::decode(reply["result"][1].as_str().expect("extranonce1")).unwrap();
    miner.extranonce2_size = reply["result"][2].as_u64().expect("extranonce2_size") as usize;
    let reply = miner.authorize(worker, "x").await;
    assert_eq!(reply["result"], json!(true), "authorize failed: {reply}");
    assert!(miner.wait_job().await, "no job after the handshake");
    Ok(miner)
}

fn assert_refusal(reply: &Value) {
    assert_eq!(reply["result"], Value::Null, "{reply}");
    assert_eq!(reply["error"], json!([20, "no upstream pool available, retry later", null]), "{reply}");
}

/// Retries the handshake (bounded) until the proxy has found the pool again. Returns the miner
/// and how many refusals it took.
async fn handshake_when_up(proxy: &Proxy, worker: &str) -> (SimMiner, usize) {
    let deadline = Instant::now() + WAIT;
    let mut refusals = 0;
    loop {
        match try_handshake(proxy, worker).await {
            Ok(miner) => return (miner, refusals),
            Err(reply) => {
                assert_refusal(&reply);
                refusals += 1;
                assert!(Instant::now() < deadline, "the proxy did not find the pool again within {WAIT:?}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// Polls `value` (bounded) until it is at most `limit`; returns the last value seen.
async fn settle(limit: usize, mut value: impl FnMut() -> usize) -> usize {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = value();
        if v <= limit || Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_flapping_200_times_leaks_nothing() {
    let started = Instant::now();
    let addr = reserve_port();
    let mut config = proxy_config(addr);
    config.upstream.retry_initial_ms = 5;
    config.upstream.retry_max_ms = 20;
    let proxy = spawn_proxy(config).await;

    // Warm up once, so that lazily created state (metric handles, allocator arenas, the
    // resolver) is part of the baseline.
    let mut pool = MockPool::start_at(addr, PoolOptions::default()).await;
    let (mut miner, _) = handshake_when_up(&proxy, "warm").await;
    pool.kill().await;
    assert!(miner.expect_closed(WAIT).await, "the warm-up miner is closed with its pool");
    drop(miner);
    drop(pool);
    assert!(eventually(WAIT, || async { proxy.registry.is_empty() }).await, "the warm-up session left the registry");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (fds_before, tasks_before, rss_before) = (open_fds(), alive_tasks(), rss_kb());

    let (mut refusals, mut refused_while_down, mut shares_accepted, mut failed_in_flight) = (0, 0, 0, 0);
    for i in 0..FLAPS {
        let worker = format!("w{i}");
        let mut pool = MockPool::start_at(addr, PoolOptions::default()).await;
        let (mut miner, refused) = handshake_when_up(&proxy, &worker).await;
        refusals += refused;
        match i % 3 {
            // A share answered by the pool.
            0 => {
                let share = miner.any_share();
                let id = miner.submit(&worker, &share).await;
                let reply = miner.wait_reply(&id).await.expect("a reply to the share");
                assert_eq!(reply, json!({"id": id, "result": true, "error": null}));
                shares_accepted += 1;
            }
            // A share in flight when the pool dies: answered once, with an error.
            1 => {
                pool.set_submit_replies(SubmitReplies::Never);
                let share = miner.any_share();
                let id = miner.submit(&worker, &share).await;
                assert!(pool.wait_submits(1).await, "the share reached the pool");
                pool.kill().await;
                let (messages, closed) = miner.drain_until_closed(WAIT).await;
                assert!(closed, "the miner is closed after its pool dies (flap {i})");
                let replies: Vec<&Value> = messages.iter().filter(|m| is_reply(m)).collect();
                assert_eq!(
                    replies,
                    vec![&json!({"id": id, "result": null, "error": [20, "upstream unavailable", null]})],
                    "flap {i}"
                );
                failed_in_flight += 1;
            }
            // Nothing in flight.
            _ => {}
        }
        pool.kill().await;
        assert!(miner.expect_closed(WAIT).await, "the miner is closed after its pool dies (flap {i})");
        drop(miner);
        drop(pool);

        // Now and then a miner arrives while the pool is down and is refused.
        if i % 4 == 3 {
            let mut miner = proxy.miner().await;
            let id = miner.request("mining.subscribe", json!(["simminer/1.0"])).await;
            let reply = miner.wait_reply(&id).await.expect("a refusal while the pool is down");
            assert_refusal(&reply);
            assert!(miner.expect_closed(WAIT).await, "the refused miner is closed (flap {i})");
            refused_while_down += 1;
        }
    }

    let drained = eventually(WAIT, || async { proxy.registry.is_empty() }).await;
    assert!(drained, "{} sessions still registered after the flapping", proxy.registry.len());
    let fds_after = settle(fds_before + FD_SLACK, open_fds).await;
    let tasks_after = settle(tasks_before + TASK_SLACK, alive_tasks).await;
    let rss_after = rss_kb();
    eprintln!(
        "flapping: {FLAPS} flaps in {:?}; refusals while reconnecting {refusals}, refused while down \
         {refused_while_down}, shares accepted {shares_accepted}, failed in flight {failed_in_flight}; \
         fds {fds_before} -> {fds_after}, alive tasks {tasks_before} -> {tasks_after}, \
         VmRSS {rss_before} kB -> {rss_after} kB",
        started.elapsed()
    );
    assert!(fds_after <= fds_before + FD_SLACK, "open fds grew from {fds_before} to {fds_after}");
    assert!(tasks_after <= tasks_before + TASK_SLACK, "alive tasks grew from {tasks_before} to {tasks_after}");
    let growth = rss_after.saturating_sub(rss_before);
    assert!(growth < RSS_GROWTH_MAX_KB, "VmRSS grew by {growth} kB ({rss_before} -> {rss_after})");
    assert_eq!(refused_while_down, FLAPS / 4);
    proxy.shutdown().await;
}
