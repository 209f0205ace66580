//! The binary's logs at the most verbose level, in both formats: one JSON object per line with
//! the connection span's fields, and never a password.

mod support;

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use support::*;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

const POOL_SECRET: &str = "pool-secret-7f3a";
const MINER_SECRET: &str = "miner-secret-91bc";

/// Runs the proxy binary with `format`, drives one miner through it, stops it with SIGTERM and
/// returns everything it logged.
async fn logs_of_a_session(format: &str) -> String {
    let pool = MockPool::start(PoolOptions::default()).await;
    let listen = reserve_port();
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_loka-stratum"))
        .env("LOKA_INVENTORY__DATA_DIR", data.path())
        .args(["--listen", &listen.to_string(), "--http-listen", "127.0.0.1:0", "--pool", &pool.url()])
        .args(["--pool-user", "acct", "--pool-password", POOL_SECRET, "--log-format", format, "-vv"])
        .env("LOKA_UPSTREAM__USER_TEMPLATE", "{pool_user}.{worker}")
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let mut stderr = child.stderr.take().unwrap();
    let collect = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    assert!(
        eventually(Duration::from_secs(20), || async { tokio::net::TcpStream::connect(listen).await.is_ok() }).await,
        "the proxy never listened"
    );

    let mut miner = SimMiner::connect(listen).await;
    miner.subscribe().await;
    let reply = miner.authorize("farm.rig1", MINER_SECRET).await;
    assert_eq!(reply["result"], Value::Bool(true));
    assert!(miner.wait_job().await);
    let share = miner.any_share();
    let id = miner.submit("farm.rig1", &share).await;
    miner.wait_reply(&id).await.expect("a reply to the submit");
    // The pool saw the pool's password, so the secret really passed through the proxy.
    assert!(pool.recorded().iter().any(|l| l.contains(POOL_SECRET)));
    drop(miner);

    let pid = child.id().expect("running").to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("exits").unwrap();
    assert!(status.success(), "{status}");
    tokio::time::timeout(Duration::from_secs(5), collect).await.expect("stderr closes").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_are_never_logged() {
    for format in ["text", "json"] {
        let logs = logs_of_a_session(format).await;
        assert!(logs.contains("authorized"), "trace-level logs cover the session:\n{logs}");
        assert!(!logs.contains(POOL_SECRET), "pool password in the {format} logs");
        assert!(!logs.contains(MINER_SECRET), "miner password in the {format} logs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_span_fields() {
    let logs = logs_of_a_session("json").await;
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {l}")))
        .collect();
    let authorized = lines
        .iter()
        .find(|l| l["fields"]["message"] == "authorized")
        .unwrap_or_else(|| panic!("no 'authorized' event in {logs}"));
    assert_eq!(authorized["span"]["name"], "miner");
    assert_eq!(authorized["span"]["worker"], "farm.rig1");
    assert!(authorized["span"]["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
}
