//! PROXY protocol on the miner listener: the header's source address stands for the miner in the
//! workers API and the per-IP limit; untrusted sources and bad headers are closed and counted.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use loka_stratum::config::{Config, Mode};
use ppp::v2::{Addresses, Builder, Command, Protocol, Version};
use serde_json::{json, Value};
use support::*;

fn proxied_config(mode: Mode, pool: SocketAddr, trusted: &[&str]) -> Config {
    let mut config = mode_config(mode, pool);
    config.server.proxy_protocol = true;
    config.server.proxy_protocol_trusted = trusted.iter().map(|s| s.to_string()).collect();
    config
}

fn v1(client: &str) -> Vec<u8> {
    let client: SocketAddr = client.parse().unwrap();
    let family = if client.is_ipv4() { "TCP4 " } else { "TCP6 " };
    let local = if client.is_ipv4() { "127.0.0.1" } else { "::1" };
    format!("PROXY {family}{} {local} {} 3333\r\n", client.ip(), client.port()).into_bytes()
}

fn v2(client: &str) -> Vec<u8> {
    let client: SocketAddr = client.parse().unwrap();
    let local: SocketAddr = if client.is_ipv4() { "127.0.0.1:3333" } else { "[::1]:3333" }.parse().unwrap();
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, Addresses::from((client, local)))
        .build()
        .unwrap()
}

/// The peers `/api/v1/connections` lists, by worker name.
async fn worker_peers(proxy: &Proxy) -> Vec<(String, String)> {
    let (status, body) = proxy.http_get("/api/v1/connections").await;
    assert_eq!(status, 200, "{body}");
    let workers: Vec<Value> = serde_json::from_str(&body).unwrap();
    let mut peers: Vec<_> = workers
        .iter()
        .map(|w| (w["worker"].as_str().unwrap_or_default().to_owned(), w["peer"].as_str().unwrap().to_owned()))
        .collect();
    peers.sort();
    peers
}

async fn rejected(proxy: &Proxy, reason: &str) -> f64 {
    let (_, text) = proxy.http_get("/metrics").await;
    metric(&text, "loka_connections_rejected_total", &[("reason", reason)]).unwrap_or(0.0)
}

/// Connects, sends `header`, handshakes as `worker` and submits one share.
async fn proxied_miner(proxy: &Proxy, header: &[u8], worker: &str) -> SimMiner {
    let mut miner = proxy.miner().await;
    miner.send_bytes(header).await;
    miner.handshake(worker).await;
    let share = miner.any_share();
    let id = miner.submit(worker, &share).await;
    assert_eq!(miner.wait_reply(&id).await.expect("a submit reply")["result"], json!(true));
    miner
}

in_both_modes!(tokio::test, v1_and_v2_headers_name_the_real_client);
async fn v1_and_v2_headers_name_the_real_client(mode: Mode) {
    let pool = MockPool::start(PoolOptions::default()).await;
    let proxy = spawn_proxy(proxied_config(mode, pool.addr, &["127.0.0.1/32"])).await;

    let _a = proxied_miner(&proxy, &v1("203.0.113.7:50000"), "v1").await;
    let _b = proxied_miner(&proxy, &v2("198.51.100.9:40000"), "v2").await;
    let _c = proxied_miner(&proxy, &v2("[2001:db8::7]:4242"), "v2six").await;
    let _d = proxied_miner(&proxy, &v1("[2001:db8::8]:4243"), "v1six").await;

    let expected = [
        ("v1", "203.0.113.7:50000"),
        ("v1six", "[2001:db8::8]:4243"),
        ("v2", "198.51.100.9:40000"),
        ("v2six", "[2001:db8::7]:4242"),
    ];
    let expected: Vec<_> = expected.iter().map(|(w, p)| (w.to_string(), p.to_string())).collect();
    assert_eq!(worker_peers(&proxy).await, expected);
    assert_eq!(pool.accepted(), 4);
    proxy.shutdown().await;
}

in_both_modes!(tokio::test, split_headers_and_trailing_stratum_bytes);
/// A header that arrives in pieces, and Stratum lines in the same segment as the header: the
/// proxy takes exactly the header's bytes and not one more.
async fn split_headers_and_trailing_stratum_bytes(mode: Mode) {
    let pool = MockPool::start(PoolOptions::default()).await;
    let proxy = spawn_proxy(proxied_config(mode, pool.addr, &["127.0.0.1/32"])).await;

    let header = v1("203.0.113.10:1000");
    let mut miner = proxy.miner().await;
    for chunk in header.chunks(7) {
        miner.send_bytes(chunk).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    miner.handshake("split1").await;

    let header = v2("203.0.113.11:1000");
    let mut miner2 = proxy.miner().await;
    miner2.send_bytes(&header[..10]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    miner2.send_bytes(&header[10..20]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The rest of the header and the whole subscribe in one write.
    let subscribe = json!({"id": 1, "method": "mining.subscribe", "params": ["sim/1.0"]}).to_string() + "\n";
    miner2.send_bytes(&[&header[20..], subscribe.as_bytes()].concat()).await;
    let reply = miner2.wait_reply(&json!(1)).await.expect("a subscribe reply");
    assert!(reply["error"].is_null(), "{reply}");
    let reply = miner2.authorize("split2", "x").await;
    assert_eq!(reply["result"], json!(true), "{reply}");

    let peers = worker_peers(&proxy).await;
    assert!(peers.contains(&("split1".into(), "203.0.113.10:1000".into())), "{peers:?}");
    assert!(peers.contains(&("split2".into(), "203.0.113.11:1000".into())), "{peers:?}");
    proxy.shutdown().await;
}

in_both_modes!(tokio::test, per_ip_limit_goes_by_the_real_address);
async fn per_ip_limit_goes_by_the_real_address(mode: Mode) {
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut config = proxied_config(mode, pool.addr, &["127.0.0.1/32"]);
    config.server.max_connections_per_ip = 1;
    let proxy = spawn_proxy(config).await;
    let before = rejected(&proxy, "max_connections_per_ip").await;

    let _first = proxied_miner(&proxy, &v1("198.51.100.1:1000"), "first").await;
    let mut second = proxy.miner().await;
    second.send_bytes(&v2("198.51.100.1:1001")).await;
    assert!(second.expect_closed(WAIT).await, "a second connection from the same real IP is closed");
    let _third = proxied_miner(&proxy, &v1("198.51.100.2:1000"), "third").await;

    assert_eq!(rejected(&proxy, "max_connections_per_ip").await - before, 1.0);
    let peers = worker_peers(&proxy).await;
    assert_eq!(peers.len(), 2, "{peers:?}");
    proxy.shutdown().await;
}

in_both_modes!(tokio::test, untrusted_sources_are_closed_and_counted);
async fn untrusted_sources_are_closed_and_counted(mode: Mode) {
    let pool = MockPool::start(PoolOptions::default()).await;
    let proxy = spawn_proxy(proxied_config(mode, pool.addr, &["10.0.0.0/8", "::1/128"])).await;
    let before = rejected(&proxy, "untrusted_proxy").await;

    let mut miner = proxy.miner().await;
    miner.send_bytes(&v1("203.0.113.7:50000")).await;
    miner.request("mining.subscribe", json!([])).await;
    assert!(miner.expect_closed(WAIT).await, "a connection from 127.0.0.1 is not trusted");
    assert!(eventually(WAIT, || async { rejected(&proxy, "untrusted_proxy").await - before >= 1.0 }).await);
    assert_eq!(proxy.registry.len(), 0);
    assert!(pool.subscribes() <= idle_pool_sessions(mode), "nothing reached the pool");
    proxy.shutdown().await;
}

in_both_modes!(tokio::test, bad_headers_are_closed_and_counted_and_health_checks_quietly);
async fn bad_headers_are_closed_and_counted_and_health_checks_quietly(mode: Mode) {
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut config = proxied_config(mode, pool.addr, &["127.0.0.1/32"]);
    config.server.handshake_timeout = 1;
    let proxy = spawn_proxy(config).await;
    let before = rejected(&proxy, "bad_proxy_header").await;
    let bad_headers = || async { rejected(&proxy, "bad_proxy_header").await - before };

    // Stratum without a header, a truncated v1 address, a v2 header with a bad version, an
    // oversize v2 header, and a v1 line that never ends.
    let mut bad_version = v2("203.0.113.7:1");
    bad_version[12] = 0x11;
    let mut oversize = v2("203.0.113.7:1")[..14].to_vec();
    oversize.extend_from_slice(&4096u16.to_be_bytes());
    let garbage: [Vec<u8>; 5] = [
        b"{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[]}\n".to_vec(),
        b"PROXY TCP4 203.0.113 127.0.0.1 1 2\r\n".to_vec(),
        bad_version,
        oversize,
        [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat(),
    ];
    for bytes in &garbage {
        let mut miner = proxy.miner().await;
        miner.send_bytes(bytes).await;
        assert!(miner.expect_closed(WAIT).await, "closed after {:?}", String::from_utf8_lossy(bytes));
    }
    // Silence past the deadline: handshake_timeout bounds the header too.
    let mut silent = proxy.miner().await;
    assert!(silent.expect_closed(Duration::from_secs(5)).await, "a silent connection is closed");
    let expected = garbage.len() as f64 + 1.0;
    assert!(
        eventually(WAIT, || async { bad_headers().await >= expected }).await,
        "{} bad headers counted",
        bad_headers().await
    );

    // A load balancer's health check: a v2 LOCAL header, or a connect and close. Closed, not counted.
    let local = Builder::with_addresses(Version::Two | Command::Local, Protocol::Unspecified, Addresses::Unspecified)
        .build()
        .unwrap();
    let mut check = proxy.miner().await;
    check.send_bytes(&local).await;
    assert!(check.expect_closed(WAIT).await, "a LOCAL header is closed");
    let mut check = proxy.miner().await;
    check.shutdown_write().await;
    assert!(check.expect_closed(WAIT).await);
    assert_eq!(bad_headers().await, expected);
    assert_eq!(proxy.registry.len(), 0);
    assert!(pool.subscribes() <= idle_pool_sessions(mode), "nothing reached the pool");
    proxy.shutdown().await;
}

in_both_modes!(tokio::test, off_by_default_a_header_is_malformed_json);
/// With `proxy_protocol` off, a PROXY line is what any other non-JSON line is.
async fn off_by_default_a_header_is_malformed_json(mode: Mode) {
    let pool = MockPool::start(PoolOptions::default()).await;
    let proxy = spawn_proxy(mode_config(mode, pool.addr)).await;

    let mut miner = proxy.miner().await;
    miner.send_bytes(&v1("203.0.113.7:50000")).await;
    let reply = miner.wait_reply(&Value::Null).await.expect("an error for the PROXY line");
    assert_eq!(reply["error"][0], 20, "{reply}");
    miner.handshake("plain").await;
    let own = miner.local_addr().to_string();
    assert_eq!(worker_peers(&proxy).await, [("plain".to_owned(), own)]);
    proxy.shutdown().await;
}
