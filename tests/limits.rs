//! Limits the proxy enforces on miners: connections, line length, idle, share and handshake time.

mod support;

use std::time::Duration;

use loka_stratum::config::Mode;
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn connection_limit_closes_extra_connections() {
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut config = proxy_config(pool.addr);
    config.server.max_connections = 3;
    let proxy = spawn_proxy(config).await;

    let mut miners = Vec::new();
    for i in 0..3 {
        let mut miner = proxy.miner().await;
        miner.handshake(&format!("w{i}")).await;
        miners.push(miner);
    }
    let mut extra = proxy.miner().await;
    assert!(extra.expect_closed(WAIT).await, "the fourth connection is closed at once");
    assert!(extra.raw.is_empty(), "{:?}", extra.raw);

    let (status, text) = proxy.http_get("/metrics").await;
    assert_eq!(status, 200);
    let rejected = metric(&text, "loka_connections_rejected_total", &[]).unwrap_or(0.0);
    assert!(rejected >= 1.0, "loka_connections_rejected_total = {rejected}");

    // The three keep working, and a slot freed is a slot a new miner can take.
    let share = miners[0].any_share();
    let id = miners[0].submit("w0", &share).await;
    assert_eq!(miners[0].wait_reply(&id).await.unwrap()["result"], json!(true));
    drop(miners.pop());
    let mut admitted = false;
    for _ in 0..100 {
        let mut miner = proxy.miner().await;
        let id = miner.request("mining.subscribe", json!([])).await;
        if miner.wait_reply_within(&id, Duration::from_secs(2)).await.is_some() {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(admitted, "a new miner gets in once a slot is free");
    proxy.shutdown().await;
}

#[tokio::test]
async fn line_over_the_cap_closes_the_miner() {
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut config = proxy_config(pool.addr);
    config.server.max_line_bytes = 1024;
    let proxy = spawn_proxy(config).await;

    let mut miner = proxy.miner().await;
    miner.handshake("w").await;
    // Just under the cap is fine.
    let filler = "x".repeat(900);
    let id = miner.request("mining.extranonce.subscribe", json!([filler])).await;
    assert_eq!(miner.wait_reply(&id).await.unwrap()["result"], json!(true));
    assert!(pool.recorded().iter().any(|l| l.contains(&filler)));

    let long = format!(r#"{{"id":99,"method":"mining.extranonce.subscribe","params":["{}"]}}"#, "y".repeat(2000));
    miner.send(&long).await;
    assert!(miner.expect_closed(WAIT).await, "a line over max_line_bytes closes the miner");
    assert!(pool.recorded().iter().all(|l| !l.contains("yyyy")), "the long line is not relayed");

    // Also without a newline: the cap holds before the line ends.
    let partial = format!(r#"{{"id":1,"method":"mining.subscribe","params":["{}"#, "z".repeat(3000));
    let mut raw = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    raw.write_all(partial.as_bytes()).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(WAIT, raw.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "an unterminated line over the cap closes: {read:?}");
    proxy.shutdown().await;
}

async fn metric_now(proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, text) = proxy.http_get("/metrics").await;
    metric(&text, name, labels).unwrap_or(0.0)
}

// The idle timeout and a slow miner: `slow_bitaxe` in tests/zoo.rs. The jobs cross real sockets
// from the mock pool, so these cases run on the real clock with timeouts of a second or two:
// paused time races real sockets.

in_both_modes!(tokio::test, share_timeout_closes_a_miner_without_shares);
/// `share_timeout`, off by default, closes an authorized miner that sends no share for that
/// long, as `no_shares`; a miner that keeps submitting stays.
async fn share_timeout_closes_a_miner_without_shares(mode: Mode) {
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut config = mode_config(mode, pool.addr);
    config.server.idle_timeout = 1;
    config.server.share_timeout = 2;
    let proxy = spawn_proxy(config).await;
    let before = metric_now(&proxy, "loka_connections_closed_total", &[("reason", "no_shares")]).await;
    let mut silent = proxy.miner().await;
    silent.handshake("farm.silent").await;
    let mut busy = proxy.miner().await;
    busy.handshake("farm.busy").await;

    let mut closed = false;
    let started = tokio::time::Instant::now();
    while !closed && started.elapsed() < Duration::from_secs(10) {
        let share = busy.any_share();
        let id = busy.submit("farm.busy", &share).await;
        assert_eq!(busy.wait_reply(&id).await.unwrap()["result"], json!(true), "a submitting miner stays");
        closed = silent.expect_closed(Duration::from_millis(500)).await;
    }
    assert!(closed, "an authorized miner without a share for share_timeout is closed");
    assert!(started.elapsed() >= Duration::from_secs(1), "not before share_timeout");
    assert!(!busy.closed);
    let no_shares = metric_now(&proxy, "loka_connections_closed_total", &[("reason", "no_shares")]).await - before;
    assert_eq!(no_shares, 1.0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn silent_connections_are_evicted_after_handshake_timeout() {
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut config = proxy_config(pool.addr);
    config.server.handshake_timeout = 10;
    let proxy = spawn_proxy(config).await;
    let mut silent = proxy.miner().await;
    let mut subscribed = proxy.miner().await;
    subscribed.subscribe().await;
    let registered = eventually(WAIT, || async { proxy.registry.len() == 2 }).await;
    assert!(registered);

    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(9)).await;
    assert!(!silent.expect_closed(Duration::from_millis(100)).await);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(silent.expect_closed(Duration::from_secs(5)).await, "a connection that never subscribes is evicted");
    assert!(silent.raw.is_empty(), "{:?}", silent.raw);
    assert!(!subscribed.expect_closed(Duration::from_secs(2)).await, "a subscribed miner stays");
    tokio::time::resume();
    let reply = subscribed.authorize("late", "x").await;
    assert_eq!(reply["result"], json!(true));
    proxy.shutdown().await;
}
