//! SIGHUP re-reads the config file without dropping a miner; an invalid file, or one that needs
//! a restart, leaves the running configuration in force.

mod support;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn config_text(listen: std::net::SocketAddr, http: std::net::SocketAddr, pool: &MockPool, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"{listen}\"\n{extra}\n[http]\nlisten = \"{http}\"\n\n[[pools]]\nurl = \"{}\"\nuser = \"acct\"\npassword = \"x\"\n",
        pool.url()
    )
}

/// Waits (bounded) until the proxy's log has `needle` at least `count` times.
async fn logged(log: &Mutex<String>, needle: &str, count: usize) -> bool {
    eventually(Duration::from_secs(10), || async { log.lock().unwrap().matches(needle).count() >= count }).await
}

fn hangup(pid: u32) {
    assert!(std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_pools_limits_and_log_level_without_dropping_miners() {
    let a = MockPool::start(PoolOptions::default()).await;
    let b = MockPool::start(PoolOptions::default()).await;
    let (listen, http) = (reserve_port(), reserve_port());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("loka.toml");
    std::fs::write(&file, config_text(listen, http, &a, "")).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_loka-stratum"))
        .arg("--config")
        .arg(&file)
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let sink = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    assert!(
        eventually(Duration::from_secs(20), || async { tokio::net::TcpStream::connect(listen).await.is_ok() }).await
    );

    let mut first = SimMiner::connect(listen).await;
    first.handshake("farm.first").await;
    assert_eq!(a.connections(), 1, "the first miner's session is on pool A");

    // New pool, a connection limit of 2 and debug logging.
    std::fs::write(&file, config_text(listen, http, &b, "max_connections = 2\n\n[log]\nlevel = \"debug\"\n")).unwrap();
    hangup(pid);
    assert!(logged(&log, "configuration reloaded", 1).await, "{}", log.lock().unwrap());

    // The miner that was there stays, on its pool.
    let share = first.any_share();
    let id = first.submit("farm.first", &share).await;
    assert_eq!(first.wait_reply(&id).await.unwrap()["result"], true);
    assert_eq!(a.submits().len(), 1);
    // A new miner gets the new pool, and the debug level is in force.
    let mut second = SimMiner::connect(listen).await;
    second.handshake("farm.second").await;
    assert_eq!(b.connections(), 1, "a new session goes to pool B");
    assert!(logged(&log, "DEBUG", 1).await, "debug lines after the reload");
    // The new limit holds.
    let mut third = SimMiner::connect(listen).await;
    assert!(third.expect_closed(Duration::from_secs(5)).await, "max_connections = 2 is in force");

    // An invalid file is refused; the running configuration (limit 2, pool B) stays.
    std::fs::write(&file, "[server]\nmax_conections = 5\n").unwrap();
    hangup(pid);
    assert!(logged(&log, "reload refused", 1).await);
    let mut fourth = SimMiner::connect(listen).await;
    assert!(fourth.expect_closed(Duration::from_secs(5)).await, "the limit of 2 still holds");

    // A new listen address needs a restart: refused, nothing changes.
    let elsewhere = reserve_port();
    std::fs::write(&file, config_text(elsewhere, http, &a, "")).unwrap();
    hangup(pid);
    assert!(logged(&log, "reload refused", 2).await);
    assert!(log.lock().unwrap().contains("server.listen changed"), "{}", log.lock().unwrap());
    let share = second.any_share();
    let id = second.submit("farm.second", &share).await;
    assert_eq!(second.wait_reply(&id).await.unwrap()["result"], true);
    assert_eq!(b.submits().len(), 1, "still pool B");
    assert!(!first.expect_closed(Duration::from_millis(100)).await, "no miner was dropped");

    assert!(std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("exits").unwrap();
    assert!(status.success(), "{status}");
}
