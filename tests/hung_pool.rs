//! A hung pool: a pool process stopped with SIGSTOP keeps its socket open, takes TCP connects,
//! and neither reads nor answers. It is found within `upstream.submit_timeout` by a forwarded
//! share it leaves unanswered, and its probe, which speaks Stratum, never calls it up.

mod support;

use std::time::Duration;

use loka_stratum::config::Mode;
use serde_json::{json, Value};
use support::*;

async fn accepted(miner: &mut SimMiner, worker: &str) {
    let share = miner.any_share();
    let id = miner.submit(worker, &share).await;
    let reply = miner.wait_reply(&id).await.expect("submit reply");
    assert_eq!(reply["result"], json!(true), "{reply}");
}

async fn metrics(proxy: &Proxy) -> String {
    proxy.http_get("/metrics").await.1
}

async fn pool_state(proxy: &Proxy, pool: &MockPool) -> String {
    let (_, body) = proxy.http_get("/api/v1/pools").await;
    let pools: Vec<Value> = serde_json::from_str(&body).unwrap();
    let entry = pools.iter().find(|p| p["pool"] == pool.label()).expect("the pool is listed");
    entry["state"].as_str().unwrap().to_owned()
}

async fn pool_up(proxy: &Proxy, pool: &MockPool) -> bool {
    let (_, body) = proxy.http_get("/api/v1/pools").await;
    let pools: Vec<Value> = serde_json::from_str(&body).unwrap();
    pools.iter().any(|p| p["pool"] == pool.label() && p["up"] == json!(true))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_pool_is_left_within_seconds_and_no_miner_is_disconnected() {
    const MINERS: usize = 10;
    let primary = MockPool::start(PoolOptions::validating()).await;
    let backup = MockPool::start(PoolOptions::validating()).await;
    let c = pools_config(Mode::Aggregate, &[&primary, &backup]);
    assert_eq!(c.upstream.submit_timeout, 10, "the default");
    let proxy = spawn_proxy(c).await;
    let mut miners = Vec::new();
    for i in 0..MINERS {
        let mut miner = proxy.miner().await;
        miner.handshake(&format!("farm.rig{i}")).await;
        accepted(&mut miner, &format!("farm.rig{i}")).await;
        miners.push(miner);
    }
    assert!(eventually(WAIT, || async { primary.accepted() == MINERS as u64 }).await);

    primary.freeze();
    let frozen_at = tokio::time::Instant::now();
    // Answered at once by the proxy, forwarded, and never answered by the pool.
    for (i, miner) in miners.iter_mut().enumerate() {
        accepted(miner, &format!("farm.rig{i}")).await;
    }
    let bound = frozen_at + Duration::from_secs(15);
    for (i, miner) in miners.iter_mut().enumerate() {
        assert!(
            miner.clean_job(bound.saturating_duration_since(tokio::time::Instant::now())).await.is_some(),
            "miner {i} got the backup's job within 15 s"
        );
    }
    let failover = frozen_at.elapsed();
    eprintln!("hung pool failover: {failover:?} after the pool froze (submit_timeout = 10 s)");
    assert!(miners.iter().all(|m| !m.closed), "no miner was disconnected");
    assert_eq!(proxy.registry.len(), MINERS);
    assert_eq!(backup.connections(), 1, "the session moved to the backup");
    for (i, miner) in miners.iter_mut().enumerate() {
        accepted(miner, &format!("farm.rig{i}")).await;
    }
    assert!(eventually(WAIT, || async { backup.accepted() == MINERS as u64 }).await, "{}", backup.accepted());
    assert_eq!(backup.rejected(), 0);

    let text = metrics(&proxy).await;
    let label = primary.label();
    let unanswered = metric(&text, "loka_upstream_shares_total", &[("pool", &label), ("result", "unanswered")]);
    assert_eq!(unanswered, Some(MINERS as f64), "the shares the hung pool held are counted");
    let reason = "no answer within upstream.submit_timeout";
    assert_eq!(metric(&text, "loka_upstream_faults_total", &[("pool", &label), ("reason", reason)]), Some(1.0));
    // Its probe subscribes and waits for a job, which a stopped pool never sends.
    assert!(eventually(WAIT, || async { pool_state(&proxy, &primary).await == "down" }).await);
    let text = metrics(&proxy).await;
    assert_eq!(metric(&text, "loka_pool_up", &[("pool", &label)]), Some(0.0));
    assert_eq!(proxy.http_get("/ready").await.0, 200, "the backup serves");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passthrough_miner_on_a_hung_pool_is_answered_and_closed_then_served_by_the_backup() {
    let primary = MockPool::start(PoolOptions::validating()).await;
    let backup = MockPool::start(PoolOptions::validating()).await;
    let mut c = pools_config(Mode::Passthrough, &[&primary, &backup]);
    c.upstream.submit_timeout = 2;
    let proxy = spawn_proxy(c).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig1").await;
    assert_eq!(primary.subscribes(), 1, "on the primary");

    primary.freeze();
    let share = miner.any_share();
    let id = miner.submit("farm.rig1", &share).await;
    let reply = miner.wait_reply(&id).await.expect("the share is answered, though the pool never does");
    assert_eq!(reply["error"][0], 20, "{reply}");
    assert!(miner.expect_closed(WAIT).await, "the session of a hung pool ends");
    let label = primary.label();
    let text = metrics(&proxy).await;
    let reason = "no answer within upstream.submit_timeout";
    assert_eq!(metric(&text, "loka_upstream_faults_total", &[("pool", &label), ("reason", reason)]), Some(1.0));
    assert_eq!(metric(&text, "loka_upstream_shares_total", &[("pool", &label), ("result", "unanswered")]), Some(1.0));

    // The miner reconnects, and its new session goes to the backup.
    let mut again = proxy.miner().await;
    again.handshake("farm.rig1").await;
    accepted(&mut again, "farm.rig1").await;
    assert!(eventually(WAIT, || async { backup.accepted() == 1 }).await);
    assert_eq!(primary.subscribes(), 1, "nothing more went to the hung pool");
    assert!(eventually(WAIT, || async { pool_state(&proxy, &primary).await == "down" }).await, "the probe agrees");
    proxy.shutdown().await;
}

/// A pool that hangs after its probe found it up: the first passthrough miner to arrive gives it
/// `connect_timeout` to answer its subscribe, then its session moves to the backup with the
/// miner's lines. The miner hears the backup's answer and is never closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passthrough_miner_arriving_at_a_pool_hung_since_its_probe_moves_to_the_backup() {
    let primary = MockPool::start(PoolOptions::validating()).await;
    let backup = MockPool::start(PoolOptions::validating()).await;
    let mut c = pools_config(Mode::Passthrough, &[&primary, &backup]);
    c.upstream.connect_timeout = 2;
    assert_eq!(c.upstream.submit_timeout, 10, "the default, which must not be what ends the wait");
    let proxy = spawn_proxy(c).await;
    assert!(eventually(WAIT, || async { pool_state(&proxy, &primary).await == "up" }).await);
    primary.freeze();

    let mut miner = proxy.miner().await;
    let started = tokio::time::Instant::now();
    miner.handshake("farm.rig1").await;
    eprintln!("hung pool, passthrough miner served by the backup after {:?}", started.elapsed());
    accepted(&mut miner, "farm.rig1").await;
    assert!(!miner.closed, "the miner never knew");
    assert_eq!(backup.accepted(), 1);
    assert_eq!(backup.subscribes(), 1, "the miner's subscribe, replayed on the backup");
    let text = metrics(&proxy).await;
    let reason = "no answer within upstream.connect_timeout";
    assert_eq!(
        metric(&text, "loka_upstream_faults_total", &[("pool", &primary.label()), ("reason", reason)]),
        Some(1.0)
    );
    assert_eq!(metric(&text, "loka_connections_closed_total", &[("reason", "pool_fault")]).unwrap_or(0.0), 0.0);
    // The probe agrees: the pool is down, and the next miner goes straight to the backup.
    assert!(eventually(WAIT, || async { pool_state(&proxy, &primary).await == "down" }).await);
    let mut next = proxy.miner().await;
    next.handshake("farm.rig2").await;
    accepted(&mut next, "farm.rig2").await;
    assert_eq!(backup.subscribes(), 2);
    proxy.shutdown().await;
}

/// One session's fault (here one bad line to a passthrough miner's session, or to an aggregate
/// group's) is not the pool's health: the probe checks the pool at once and finds it up, so the
/// pool is never down and the proxy stays ready. The session that failed goes to the backup while
/// the pool is in doubt (the backoff its fault earned), and then the pool takes sessions again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sessions_fault_does_not_mark_the_pool_down() {
    for mode in MODES {
        let primary = MockPool::start(PoolOptions::validating()).await;
        let backup = MockPool::start(PoolOptions::validating()).await;
        let mut c = pools_config(mode, &[&primary, &backup]);
        c.upstream.retry_initial_ms = 1_000;
        c.upstream.retry_max_ms = 4_000;
        c.upstream.failback_after = 1;
        let proxy = spawn_proxy(c).await;
        assert!(eventually(WAIT, || async { pool_up(&proxy, &primary).await }).await);
        let mut steady = proxy.miner().await;
        steady.handshake("farm.steady").await;
        let mut faulted = proxy.miner().await;
        faulted.handshake("farm.faulted").await;
        let (probes, sessions) = (primary.probes(), primary.subscribes());

        let conn = primary.newest_connection().expect("a session on the primary");
        assert!(primary.send_to(conn, "this is not json"));
        assert!(eventually(WAIT, || async { primary.probes() > probes }).await, "{mode:?}: the probe checks the pool");
        let label = primary.label();
        let reason = [("pool", label.as_str()), ("reason", "unparseable message")];
        assert_eq!(metric(&metrics(&proxy).await, "loka_upstream_faults_total", &reason), Some(1.0), "{mode:?}");
        match mode {
            // The faulted session's miner reconnects, to the backup.
            Mode::Passthrough => {
                assert!(faulted.expect_closed(WAIT).await);
                faulted = proxy.miner().await;
                faulted.handshake("farm.faulted").await;
                assert_eq!(backup.subscribes(), 1, "the primary is in doubt");
            }
            // The group moves to the backup, and no miner is closed.
            Mode::Aggregate => {
                for miner in [&mut faulted, &mut steady] {
                    assert!(miner.clean_job(WAIT).await.is_some(), "the backup's job");
                }
                assert_eq!(backup.subscribes(), 1, "the primary is in doubt");
            }
        }
        accepted(&mut faulted, "farm.faulted").await;
        assert!(eventually(WAIT, || async { backup.accepted() == 1 }).await, "{mode:?}");
        assert!(pool_up(&proxy, &primary).await, "{mode:?}");
        assert_eq!(proxy.http_get("/ready").await.0, 200, "{mode:?}");
        let text = metrics(&proxy).await;
        assert_eq!(metric(&text, "loka_pool_up", &[("pool", &label)]), Some(1.0), "{mode:?}: never down");
        assert!(!steady.closed, "{mode:?}");

        // The doubt passes: new passthrough sessions go to the primary again, and the group fails
        // back to it after failback_after.
        let mut back = false;
        for i in 0..20 {
            if mode == Mode::Passthrough {
                proxy.miner().await.handshake(&format!("farm.new{i}")).await;
            }
            if primary.subscribes() > sessions {
                back = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(back, "{mode:?}: the primary takes sessions again");
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_takes_connects_and_never_answers_is_not_up() {
    for mode in MODES {
        let pool = MockPool::start(PoolOptions::default()).await;
        pool.freeze();
        let mut c = mode_config(mode, pool.addr);
        c.upstream.connect_timeout = 1;
        let proxy = spawn_proxy(c).await;
        // Past a probe's connect_timeout, and more: never ready.
        let started = tokio::time::Instant::now();
        while started.elapsed() < Duration::from_secs(3) {
            let (status, body) = proxy.http_get("/ready").await;
            assert_eq!(status, 503, "{mode:?}: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(pool.connections_accepted() > 0, "{mode:?}: the pool was tried");
        assert_eq!(pool_state(&proxy, &pool).await, "down", "{mode:?}");
        let text = metrics(&proxy).await;
        assert_eq!(metric(&text, "loka_pool_up", &[("pool", &pool.label())]), Some(0.0), "{mode:?}");
        proxy.shutdown().await;
    }
}

/// Between the moment a group leaves a hung pool and the next pool's first job, a new difficulty
/// (here from the miner's suggestion) goes out with that job, not with a re-send of the hung
/// pool's job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_job_of_a_pool_being_left_is_sent_again() {
    let primary = MockPool::start(PoolOptions::validating()).await;
    let backup = MockPool::start(PoolOptions::validating()).await;
    let mut c = pools_config(Mode::Aggregate, &[&primary, &backup]);
    c.upstream.submit_timeout = 1;
    c.upstream.connect_timeout = 3;
    let proxy = spawn_proxy(c).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig1").await;
    assert!(eventually(WAIT, || async { pool_state(&proxy, &backup).await == "up" }).await, "the backup was probed");

    // The backup stalls the handshake of the session that moves to it, holding the group between
    // pools for as long as the test needs.
    backup.freeze();
    primary.freeze();
    accepted(&mut miner, "farm.rig1").await;
    let label = primary.label();
    let left = eventually(WAIT, || async {
        metric(&metrics(&proxy).await, "loka_upstream_faults_total", &[("pool", &label)]).is_some()
    })
    .await;
    assert!(left, "the hung primary is being left");
    let mark = miner.notifications.len();
    let id = miner.request("mining.suggest_difficulty", json!([1e-9])).await;
    assert_eq!(miner.wait_reply(&id).await.unwrap()["result"], json!(true));
    backup.thaw();
    let clean = miner.clean_job(WAIT).await;
    assert!(clean.is_some(), "the backup's job");
    let between = &miner.notifications[mark..];
    let methods: Vec<&str> = between.iter().filter_map(|n| n["method"].as_str()).collect();
    assert_eq!(methods, ["mining.set_difficulty", "mining.notify"], "{between:?}");
    assert_eq!(between[0]["params"], json!([1e-9]));
    assert!(!miner.closed);
    proxy.shutdown().await;
}
