//! SIGHUP re-reads the config file without dropping a miner; an invalid file, or one that needs
//! a restart, leaves the running configuration in force.

mod support;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use loka_stratum::config::{Config, Mode};
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn config_text(
    mode: Mode,
    listen: std::net::SocketAddr,
    http: std::net::SocketAddr,
    pool: &MockPool,
    extra: &str,
) -> String {
    let mode = match mode {
        Mode::Passthrough => "passthrough",
        Mode::Aggregate => "aggregate",
    };
    // Aggregated miners work at 1e-12, so that `any_share` passes the proxy's check and is forwarded.
    format!(
        "[server]\nlisten = \"{listen}\"\n{extra}\n[http]\nlisten = \"{http}\"\n\n[upstream]\nmode = \"{mode}\"\n\n\
         [vardiff]\nstart_difficulty = 1e-12\nmin_difficulty = 1e-12\n\n[[pools]]\nurl = \"{}\"\nuser = \"acct\"\npassword = \"x\"\n",
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

in_both_modes!(
    tokio::test(flavor = "multi_thread", worker_threads = 2),
    sighup_reloads_pools_limits_and_log_level_without_dropping_miners
);
async fn sighup_reloads_pools_limits_and_log_level_without_dropping_miners(mode: Mode) {
    let a = MockPool::start(PoolOptions::default()).await;
    let b = MockPool::start(PoolOptions::default()).await;
    let (listen, http) = (reserve_port(), reserve_port());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("loka.toml");
    std::fs::write(&file, config_text(mode, listen, http, &a, "")).unwrap();

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
    assert_eq!(a.subscribes(), 1, "the first miner's session is on pool A");
    // The pool monitor's probe may still be open beside it.
    assert!(eventually(WAIT, || async { a.connections() == 1 }).await, "{} connections", a.connections());

    // New pool, a connection limit of 2 and debug logging.
    std::fs::write(&file, config_text(mode, listen, http, &b, "max_connections = 2\n\n[log]\nlevel = \"debug\"\n"))
        .unwrap();
    hangup(pid);
    assert!(logged(&log, "configuration reloaded", 1).await, "{}", log.lock().unwrap());

    // The miner that was there stays: a passthrough miner on its pool session, while an aggregate
    // session moves to the new pool under its miners (make before break).
    if mode == Mode::Aggregate {
        assert!(wait_clean_job(&mut first).await, "the session's first job on pool B");
        assert!(!first.closed);
    }
    let share = first.any_share();
    let id = first.submit("farm.first", &share).await;
    assert_eq!(first.wait_reply(&id).await.unwrap()["result"], true);
    let (on_a, on_b) = match mode {
        Mode::Passthrough => (&a, &b),
        Mode::Aggregate => (&b, &a),
    };
    assert!(on_a.wait_submits(1).await);
    assert_eq!((on_a.submits().len(), on_b.submits().len()), (1, 0));
    // A new miner gets the new pool, and the debug level is in force.
    let mut second = SimMiner::connect(listen).await;
    second.handshake("farm.second").await;
    // Its own session in passthrough; in aggregate mode a seat in the one session, already on B.
    assert_eq!(b.subscribes(), 1, "a new session goes to pool B");
    assert!(eventually(WAIT, || async { b.connections() == 1 }).await, "{} connections", b.connections());
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
    std::fs::write(&file, config_text(mode, elsewhere, http, &a, "")).unwrap();
    hangup(pid);
    assert!(logged(&log, "reload refused", 2).await);
    assert!(log.lock().unwrap().contains("server.listen changed"), "{}", log.lock().unwrap());
    let share = second.any_share();
    let id = second.submit("farm.second", &share).await;
    assert_eq!(second.wait_reply(&id).await.unwrap()["result"], true);
    // The second miner's share, and in aggregate mode the first's before it.
    let on_b = match mode {
        Mode::Passthrough => 1,
        Mode::Aggregate => 2,
    };
    assert!(b.wait_submits(on_b).await, "still pool B");
    assert_eq!(b.submits().len(), on_b, "still pool B");
    assert!(!first.expect_closed(Duration::from_millis(100)).await, "no miner was dropped");

    assert!(std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("exits").unwrap();
    assert!(status.success(), "{status}");
}

/// Reads until a clean job arrives; false if none comes within the wait.
async fn wait_clean_job(miner: &mut SimMiner) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match miner.recv_json(left).await {
            Some(msg) if msg["method"] == "mining.notify" && msg["params"][8] == serde_json::json!(true) => {
                return true
            }
            Some(_) => {}
            None => return false,
        }
    }
}

/// An aggregate proxy in front of `pool`, with `count` miners handshaken on its one session.
async fn aggregate_with_miners(pool: &MockPool, count: usize) -> (Proxy, Config, Vec<SimMiner>) {
    let config = mode_config(Mode::Aggregate, pool.addr);
    let proxy = spawn_proxy(config.clone()).await;
    let mut miners = Vec::new();
    for i in 0..count {
        let mut miner = proxy.miner().await;
        miner.handshake(&format!("farm.rig{i}")).await;
        miners.push(miner);
    }
    (proxy, config, miners)
}

fn subscribes(pool: &MockPool) -> usize {
    pool.recorded_methods().iter().filter(|m| *m == "mining.subscribe").count()
}

/// Clean jobs a miner reads within `within`.
async fn clean_jobs(miner: &mut SimMiner, within: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + within;
    let mut clean = 0;
    while let Some(msg) = miner.recv_json(deadline.saturating_duration_since(tokio::time::Instant::now())).await {
        if msg["method"] == "mining.notify" && msg["params"][8] == serde_json::json!(true) {
            clean += 1;
        }
    }
    clean
}

async fn submit_accepted(miner: &mut SimMiner, worker: &str) {
    let share = miner.any_share();
    let id = miner.submit(worker, &share).await;
    assert_eq!(miner.wait_reply(&id).await.unwrap()["result"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_leaves_the_pools_alone_moves_no_aggregate_session() {
    let pool = MockPool::start(PoolOptions::default()).await;
    let (proxy, config, mut miners) = aggregate_with_miners(&pool, 3).await;
    assert_eq!(subscribes(&pool), 1);

    let mut new = config.clone();
    new.upstream.keepalive += 30;
    new.upstream.job_timeout += 30;
    new.validate().unwrap();
    proxy.reloader.reload(new).unwrap();
    // Several of the groups' pool checks go by.
    for miner in &mut miners {
        assert_eq!(clean_jobs(miner, Duration::from_millis(700)).await, 0, "no clean job after the reload");
    }
    assert_eq!(subscribes(&pool), 1, "no new pool session");
    assert_eq!(pool.connections(), 1);
    for (i, miner) in miners.iter_mut().enumerate() {
        submit_accepted(miner, &format!("farm.rig{i}")).await;
    }
    assert!(eventually(Duration::from_secs(10), || async { pool.accepted() == 3 }).await);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_new_credentials_moves_the_session_make_before_break() {
    let pool = MockPool::start(PoolOptions::default()).await;
    let (proxy, config, mut miners) = aggregate_with_miners(&pool, 3).await;
    let old_share = miners[0].any_share();

    let mut new = config.clone();
    new.pools[0].password = "pw2".into();
    new.validate().unwrap();
    proxy.reloader.reload(new).unwrap();
    for (i, miner) in miners.iter_mut().enumerate() {
        assert_eq!(clean_jobs(miner, Duration::from_secs(2)).await, 1, "miner {i}: one clean job of the new session");
        assert!(!miner.closed, "miner {i} keeps its connection");
    }
    assert_eq!(subscribes(&pool), 2, "one new pool session");
    let login = pool
        .recorded_with_sessions()
        .into_iter()
        .find(|(line, _)| line.contains("mining.authorize") && line.contains("\"pw2\""))
        .expect("the new session logs in with the new password");
    assert_eq!(login.1, 2, "the old session was still open while the new one logged in: {}", login.0);
    assert!(eventually(Duration::from_secs(5), || async { pool.connections() == 1 }).await, "the old session closes");

    let id = miners[0].submit("farm.rig0", &old_share).await;
    assert_eq!(miners[0].wait_reply(&id).await.unwrap()["error"][0], 21, "the old session's job is stale");
    for (i, miner) in miners.iter_mut().enumerate() {
        submit_accepted(miner, &format!("farm.rig{i}")).await;
    }
    assert!(eventually(Duration::from_secs(10), || async { pool.accepted() == 3 }).await);
    let (_, text) = proxy.http_get("/metrics").await;
    assert_eq!(metric(&text, "loka_failovers_total", &[("kind", "failover")]), Some(0.0), "not a failover");
    assert_eq!(metric(&text, "loka_failovers_total", &[("kind", "reload")]), Some(1.0));
    proxy.shutdown().await;
}
