//! Scale-out behind HAProxy: two proxies with `proxy_protocol` on, HAProxy in front of them
//! sending PROXY v2 headers, miners through HAProxy. Needs the `haproxy` binary (`.ci/run`
//! installs it).

mod support;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const MINERS: usize = 10;

/// HAProxy as a child process, killed when dropped so a failing test leaves nothing behind.
struct HaProxy {
    child: Child,
    log: std::path::PathBuf,
}

impl HaProxy {
    fn start(dir: &Path, frontend: SocketAddr, backends: &[SocketAddr]) -> HaProxy {
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, addr)| format!("    server loka{i} {addr} send-proxy-v2 check inter 200ms rise 1 fall 3\n"))
            .collect();
        let config = format!(
            "global\n    maxconn 1000\n\n\
             defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n\n\
             frontend miners\n    bind {frontend}\n    default_backend loka\n\n\
             backend loka\n    balance roundrobin\n{servers}"
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let log = dir.join("haproxy.log");
        let out = File::create(&log).unwrap();
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start haproxy");
        HaProxy { child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn require_haproxy() {
    let found =
        Command::new("sh").args(["-c", "command -v haproxy"]).stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    assert!(found, "haproxy is not installed: run `bash .ci/run` (it installs it) or `apt-get install haproxy`");
}

async fn workers(proxy: &Proxy) -> Vec<Value> {
    let (status, body) = proxy.http_get("/api/v1/connections").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn miners_through_haproxy_spread_over_two_proxies_with_their_own_addresses() {
    require_haproxy();
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut proxies = Vec::new();
    for _ in 0..2 {
        let mut config = proxy_config(pool.addr);
        config.server.proxy_protocol = true;
        config.server.proxy_protocol_trusted = vec!["127.0.0.1/32".into()];
        proxies.push(spawn_proxy(config).await);
    }
    let dir = tempfile::tempdir().unwrap();
    let frontend = reserve_port();
    let mut haproxy = HaProxy::start(dir.path(), frontend, &[proxies[0].addr, proxies[1].addr]);

    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(frontend).await.is_err() {
        if let Ok(Some(status)) = haproxy.child.try_wait() {
            panic!("haproxy exited with {status}:\n{}", haproxy.output());
        }
        assert!(tokio::time::Instant::now() < deadline, "haproxy did not listen on {frontend}:\n{}", haproxy.output());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Both servers pass a health check (a PROXY v2 LOCAL header) before miners arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut miners = Vec::new();
    let mut expected = BTreeMap::new();
    for i in 0..MINERS {
        let worker = format!("w{i}");
        let mut miner = SimMiner::connect(frontend).await;
        miner.handshake(&worker).await;
        let share = miner.any_share();
        let id = miner.submit(&worker, &share).await;
        let reply = miner.wait_reply(&id).await.expect("a submit reply through haproxy");
        assert_eq!(reply["result"], json!(true), "{reply}");
        expected.insert(worker, miner.local_addr().to_string());
        miners.push(miner);
    }
    assert_eq!(pool.accepted(), MINERS as u64);

    let mut seen = BTreeMap::new();
    for (i, proxy) in proxies.iter().enumerate() {
        let listed = workers(proxy).await;
        assert!(!listed.is_empty(), "proxy {i} got no miners; haproxy:\n{}", haproxy.output());
        assert_eq!(proxy.registry.len(), listed.len(), "proxy {i}: only authorized miners are live");
        for w in listed {
            let worker = w["worker"].as_str().unwrap().to_owned();
            assert!(seen.insert(worker, w["peer"].as_str().unwrap().to_owned()).is_none());
        }
    }
    // Every miner is listed once, under its own address, not HAProxy's.
    assert_eq!(seen, expected);

    let (_, text) = proxies[0].http_get("/metrics").await;
    assert_eq!(
        metric(&text, "loka_connections_rejected_total", &[("reason", "bad_proxy_header")]),
        Some(0.0),
        "health checks and miners all sent good headers"
    );

    drop(miners);
    drop(haproxy);
    for proxy in proxies {
        proxy.shutdown().await;
    }
}
