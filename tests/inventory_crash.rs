//! The worker store against the real binary: `kill -9` in the middle of writes loses at most the
//! last seconds of counts and never the store; a store that cannot be opened stops start-up.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use loka_stratum::config::Mode;
use serde_json::{json, Value};
use support::*;
use tokio::process::{Child, Command};

const DIFFICULTY: f64 = 1e-6;

fn config_text(mode: Mode, listen: SocketAddr, http: SocketAddr, pool: &MockPool, data_dir: &Path) -> String {
    let mode = match mode {
        Mode::Passthrough => "passthrough",
        Mode::Aggregate => "aggregate",
    };
    format!(
        "[server]\nlisten = \"{listen}\"\n[http]\nlisten = \"{http}\"\n[upstream]\nmode = \"{mode}\"\n\
         [vardiff]\nstart_difficulty = {DIFFICULTY:e}\nmin_difficulty = {DIFFICULTY:e}\nmax_difficulty = {DIFFICULTY:e}\n\
         [inventory]\ndata_dir = \"{}\"\nflush_interval = 1\n\
         [[pools]]\nurl = \"{}\"\nuser = \"acct\"\npassword = \"x\"\n",
        data_dir.display(),
        pool.url()
    )
}

fn start(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_loka-stratum"))
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts")
}

async fn accepted(http: SocketAddr, name: &str) -> Option<(u64, String)> {
    let (status, body) = http_get(http, &format!("/api/v1/workers/{name}")).await;
    if status != 200 {
        return None;
    }
    let w: Value = serde_json::from_str(&body).unwrap();
    Some((w["accepted"].as_u64().unwrap(), w["state"].as_str().unwrap().to_owned()))
}

async fn listening(addr: SocketAddr) -> bool {
    eventually(Duration::from_secs(20), || async { tokio::net::TcpStream::connect(addr).await.is_ok() }).await
}

in_both_modes!(tokio::test(flavor = "multi_thread", worker_threads = 2), kill_9_mid_writes_loses_only_the_last_seconds);
async fn kill_9_mid_writes_loses_only_the_last_seconds(mode: Mode) {
    let pool = MockPool::start(PoolOptions { validate: true, difficulty: DIFFICULTY, ..PoolOptions::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let (listen, http) = (reserve_port(), reserve_port());
    let file = dir.path().join("loka.toml");
    std::fs::write(&file, config_text(mode, listen, http, &pool, &dir.path().join("data"))).unwrap();
    let mut child = start(&file);
    assert!(listening(listen).await, "the proxy never listened");

    // Three miners submit without pause; the store commits every second meanwhile.
    let mut miners = Vec::new();
    for i in 0..3 {
        let mut miner = SimMiner::connect(listen).await;
        miner.handshake(&format!("crash.rig{i}")).await;
        miners.push(miner);
    }
    let mut sent = [0u64; 3];
    let mut seen_early = None;
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        for (i, miner) in miners.iter_mut().enumerate() {
            let name = format!("crash.rig{i}");
            let share = miner.grind(None);
            let id = miner.submit(&name, &share).await;
            assert_eq!(miner.wait_reply(&id).await.expect("a reply")["result"], json!(true));
            sent[i] += 1;
        }
        // What the API showed, four seconds before the kill: a sample and a commit ago.
        if seen_early.is_none() && started.elapsed() >= Duration::from_secs(2) {
            seen_early = Some(accepted(http, "crash.rig0").await.expect("a known worker").0);
        }
    }
    let seen_early = seen_early.unwrap();
    assert!(seen_early > 0, "the sampler counted nothing");
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    assert!(!status.success(), "killed, not exited: {status:?}");
    drop(miners);

    let _child = start(&file);
    assert!(listening(listen).await, "the proxy did not start again on the same store");
    let (restored, state) = accepted(http, "crash.rig0").await.expect("the worker is still known");
    assert_eq!(state, "never_seen");
    assert!(
        restored >= seen_early && restored <= sent[0],
        "restored {restored}, seen 4 s before the kill {seen_early}, sent {}",
        sent[0]
    );
    for i in 1..3 {
        assert!(accepted(http, &format!("crash.rig{i}")).await.is_some(), "crash.rig{i} is known");
    }
}

#[tokio::test]
async fn the_binary_refuses_a_store_it_cannot_open_unless_told_to_run_in_memory() {
    let pool = MockPool::start(PoolOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("a-file");
    std::fs::write(&not_a_dir, "not a directory").unwrap();
    let (listen, http) = (reserve_port(), reserve_port());
    let file = dir.path().join("loka.toml");
    std::fs::write(&file, config_text(Mode::Passthrough, listen, http, &pool, &not_a_dir)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_loka-stratum"))
        .arg("--config")
        .arg(&file)
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("cannot open the worker store"), "{stderr}");

    let mut child = Command::new(env!("CARGO_BIN_EXE_loka-stratum"))
        .arg("--config")
        .arg(&file)
        .env("LOKA_INVENTORY__ON_STORE_ERROR", "memory")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    assert!(listening(listen).await, "the proxy runs with an in-memory inventory");
    child.start_kill().unwrap();
    let out = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("kept in memory only"), "{stderr}");
}
