//! Shutdown: the proxy stops reading, answers what is in flight, closes, and `run` returns.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

/// Each miner's submit, sent and received by the pool before the drain starts.
async fn miners_with_a_submit_in_flight(proxy: &Proxy, pool: &MockPool, count: usize) -> Vec<(SimMiner, Value)> {
    let mut miners = Vec::new();
    for i in 0..count {
        let worker = format!("w{i}");
        let mut miner = proxy.miner().await;
        miner.handshake(&worker).await;
        miners.push(miner);
    }
    let mut pending = Vec::new();
    for (i, mut miner) in miners.into_iter().enumerate() {
        let share = miner.any_share();
        let id = miner.submit(&format!("w{i}"), &share).await;
        pending.push((miner, id));
    }
    // Only lines the proxy has read and forwarded are "in flight"; wait until all are.
    assert!(pool.wait_submits(count).await, "the pool got {} of {count} submits", pool.submits().len());
    pending
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_in_flight_replies() {
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut proxy = spawn_proxy(proxy_config(pool.addr)).await;
    pool.set_submit_replies(SubmitReplies::Delay(Duration::from_millis(300)));
    let pending = miners_with_a_submit_in_flight(&proxy, &pool, 20).await;

    proxy.trigger_shutdown();
    let drains = pending.into_iter().map(|(mut miner, id)| async move {
        let (messages, closed) = miner.drain_until_closed(WAIT).await;
        (messages, closed, id)
    });
    for (messages, closed, id) in futures::future::join_all(drains).await {
        assert!(closed, "the miner is closed after the drain");
        let replies: Vec<&Value> = messages.iter().filter(|m| is_reply(m)).collect();
        assert_eq!(replies.len(), 1, "{messages:?}");
        assert_eq!(replies[0], &json!({"id": id, "result": true, "error": null}));
    }
    assert!(proxy.stopped_within(WAIT).await, "Server::run returns after the drain");
    assert_eq!(pool.accepted(), 20);
    assert!(tokio::net::TcpStream::connect(proxy.addr).await.is_err(), "the listener is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_errors_requests_the_pool_never_answers() {
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut config = proxy_config(pool.addr);
    config.server.shutdown_grace = 1;
    let mut proxy = spawn_proxy(config).await;
    pool.set_submit_replies(SubmitReplies::Never);
    let pending = miners_with_a_submit_in_flight(&proxy, &pool, 5).await;

    let started = tokio::time::Instant::now();
    proxy.trigger_shutdown();
    let drains = pending.into_iter().map(|(mut miner, id)| async move {
        let (messages, closed) = miner.drain_until_closed(WAIT).await;
        (messages, closed, id)
    });
    for (messages, closed, id) in futures::future::join_all(drains).await {
        assert!(closed, "the miner is closed after the grace period");
        let replies: Vec<&Value> = messages.iter().filter(|m| is_reply(m)).collect();
        assert_eq!(replies.len(), 1, "{messages:?}");
        assert_eq!(replies[0], &json!({"id": id, "result": null, "error": [20, "proxy shutting down", null]}));
    }
    assert!(proxy.stopped_within(WAIT).await, "Server::run returns after the grace period");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "the drain waited for the grace period, took {took:?}");
    assert!(took < Duration::from_secs(5), "the drain took {took:?}");
}
