//! What miners see when the pool fails or is missing, and when they send garbage.

mod support;

use std::time::Duration;

use loka_stratum::config::PoolConfig;
use serde_json::{json, Value};
use support::*;

#[tokio::test]
async fn pool_death_fails_each_pending_request_once_then_closes() {
    let mut pool = MockPool::start(PoolOptions::default()).await;
    let proxy = spawn_proxy(proxy_config(pool.addr)).await;
    let mut miner = proxy.miner().await;
    miner.handshake("w").await;

    pool.set_submit_replies(SubmitReplies::Never);
    let mut ids = Vec::new();
    for id in [10, 11, 12] {
        let share = miner.any_share();
        let params = json!(["w", share.job_id, share.extranonce2, share.ntime, share.nonce]);
        miner.request_with_id(json!(id), "mining.submit", params).await;
        ids.push(json!(id));
    }
    // A notification in flight has no id to answer.
    miner.send(r#"{"id":null,"method":"mining.suggest_difficulty","params":[64]}"#).await;
    assert!(pool.wait_submits(3).await);
    assert!(pool.wait_recorded(|v| v["method"] == "mining.suggest_difficulty").await);

    pool.kill().await;
    let (messages, closed) = miner.drain_until_closed(WAIT).await;
    assert!(closed, "the miner is closed after its pool dies");
    let replies: Vec<&Value> = messages.iter().filter(|m| is_reply(m)).collect();
    assert_eq!(replies.iter().map(|r| r["id"].clone()).collect::<Vec<_>>(), ids, "{messages:?}");
    for reply in replies {
        assert_eq!(reply["result"], Value::Null);
        assert_eq!(reply["error"], json!([20, "upstream unavailable", null]));
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn unreachable_pool_refuses_miners_until_it_comes_up() {
    let addr = reserve_port();
    let proxy = spawn_proxy(proxy_config(addr)).await;

    let (status, body) = proxy.http_get("/ready").await;
    assert_eq!(status, 503, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready, json!({"ready": false, "pools": [{"pool": addr.to_string(), "up": false}]}));

    let mut miner = proxy.miner().await;
    miner.request_with_id(json!("s1"), "mining.subscribe", json!(["cpuminer/2.5"])).await;
    let reply = miner.wait_reply(&json!("s1")).await.expect("an error reply");
    assert_eq!(
        reply,
        json!({"id": "s1", "result": null, "error": [20, "no upstream pool available, retry later", null]})
    );
    assert!(miner.expect_closed(WAIT).await, "the refused miner is closed");

    let pool = MockPool::start_at(addr, PoolOptions::default()).await;
    let ready = eventually(WAIT, || async { proxy.http_get("/ready").await.0 == 200 }).await;
    assert!(ready, "/ready turns 200 once the pool listens");
    let (_, body) = proxy.http_get("/ready").await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"ready": true, "pools": [{"pool": addr.to_string(), "up": true}]})
    );

    let mut miner = proxy.miner().await;
    miner.handshake("w").await;
    let share = miner.any_share();
    let id = miner.submit("w", &share).await;
    assert_eq!(miner.wait_reply(&id).await.unwrap()["result"], json!(true));
    assert_eq!(pool.accepted(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn malformed_lines_get_errors_and_two_in_a_row_close() {
    let pool = MockPool::start(PoolOptions::default()).await;
    let proxy = spawn_proxy(proxy_config(pool.addr)).await;
    let mut miner = proxy.miner().await;
    miner.handshake("w").await;
    let before = pool.recorded().len();

    miner.send("this is not json").await;
    let reply = miner.wait_reply(&Value::Null).await.expect("an error for unparseable JSON");
    assert_eq!(reply["error"][0], 20, "{reply}");

    // A good line in between resets the streak.
    miner.request_with_id(json!(5), "mining.suggest_difficulty", json!([32])).await;
    assert_eq!(miner.wait_reply(&json!(5)).await.unwrap()["result"], json!(true));

    miner.request_with_id(json!(6), "mining.authorize", json!([123, "x"])).await;
    let reply = miner.wait_reply(&json!(6)).await.expect("an error for wrong param types");
    assert_eq!(reply["error"][0], 20, "{reply}");
    assert_eq!(reply["result"], Value::Null);

    miner.send(r#"{"id":7,"method":"mining.submit","params":"nope"}"#).await;
    let reply = miner.wait_reply(&json!(7)).await.expect("an error for params that are not an array");
    assert_eq!(reply["error"][0], 20, "{reply}");
    assert!(miner.expect_closed(WAIT).await, "two malformed lines in a row close the connection");

    // Only the good line went upstream.
    let upstream: Vec<String> = pool.recorded()[before..].to_vec();
    assert_eq!(upstream.len(), 1, "{upstream:?}");
    assert!(upstream[0].contains("mining.suggest_difficulty"));

    // Two unparseable lines close as well.
    let mut miner = proxy.miner().await;
    miner.handshake("w").await;
    miner.send("{\"id\":").await;
    miner.send("]]]").await;
    let (messages, closed) = miner.drain_until_closed(WAIT).await;
    assert!(closed);
    let errors: Vec<_> = messages.iter().filter(|m| is_reply(m)).collect();
    assert_eq!(errors.len(), 2, "{messages:?}");
    assert!(errors.iter().all(|e| e["id"].is_null() && e["error"][0] == 20));
    proxy.shutdown().await;
}

#[tokio::test]
async fn pool_line_over_the_cap_drops_the_session() {
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut config = proxy_config(pool.addr);
    config.upstream.max_line_bytes = 1024;
    let proxy = spawn_proxy(config).await;
    let mut miner = proxy.miner().await;
    miner.handshake("w").await;

    pool.set_submit_replies(SubmitReplies::Never);
    let share = miner.any_share();
    let id = miner.submit("w", &share).await;
    assert!(pool.wait_submits(1).await);
    let long = json!({"id": null, "method": "client.show_message", "params": ["m".repeat(2000)]}).to_string();
    pool.broadcast(&long);
    let (messages, closed) = miner.drain_until_closed(WAIT).await;
    assert!(closed, "a pool line over the cap ends the miner's session");
    assert_eq!(messages, vec![json!({"id": id, "result": null, "error": [20, "upstream unavailable", null]})]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn readiness_follows_a_pool_that_dies() {
    let mut pool = MockPool::start(PoolOptions::default()).await;
    let mut config = proxy_config(pool.addr);
    config.upstream.retry_initial_ms = 50;
    let proxy = spawn_proxy(config).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig1").await;
    assert_eq!(proxy.http_get("/ready").await.0, 200);
    pool.kill().await;
    assert!(miner.expect_closed(Duration::from_secs(5)).await);
    // No miner connects meanwhile: the session's loss alone makes the proxy look again.
    let not_ready = eventually(Duration::from_secs(5), || async { proxy.http_get("/ready").await.0 == 503 }).await;
    assert!(not_ready, "/ready still 200 after the pool died");
    let (_, text) = proxy.http_get("/metrics").await;
    assert_eq!(metric(&text, "loka_pool_up", &[("pool", &pool.label())]), Some(0.0));
    proxy.shutdown().await;
}

/// Passthrough mode: a miner whose pool died is closed, and its next session goes to the best
/// pool that is up.
#[tokio::test]
async fn passthrough_miners_of_a_dead_pool_reconnect_to_the_backup() {
    let mut primary = MockPool::start(PoolOptions::default()).await;
    let backup = MockPool::start(PoolOptions::default()).await;
    let mut config = proxy_config(primary.addr);
    config.pools.push(PoolConfig {
        url: backup.url(),
        user: "acct".into(),
        password: "pw".into(),
        ..PoolConfig::default()
    });
    let proxy = spawn_proxy(config).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig1").await;
    primary.kill().await;
    assert!(miner.expect_closed(Duration::from_secs(5)).await, "the miner is closed to reconnect fresh");
    let mut again = proxy.miner().await;
    again.handshake("farm.rig1").await;
    let share = again.any_share();
    let id = again.submit("farm.rig1", &share).await;
    assert_eq!(again.wait_reply(&id).await.unwrap()["result"], json!(true));
    assert_eq!(backup.accepted(), 1, "the new session went to the backup");
    proxy.shutdown().await;
}
