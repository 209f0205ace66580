//! Aggregate mode over real sockets: many miners on shared pool sessions, each with its own
//! extranonce1 prefix, shares validated by mock pools with their own extranonce1 and
//! extranonce2 = P ‖ en2, failover and failback without a disconnect.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use loka_stratum::config::{Config, Mode, PoolConfig};
use serde_json::{json, Value};
use support::*;

const WAIT: Duration = Duration::from_secs(10);

/// An aggregate proxy in front of `pools`, with miner difficulty starting at `difficulty`.
fn config(pools: &[&MockPool], difficulty: f64) -> Config {
    let mut c = proxy_config(pools[0].addr);
    c.pools = pools
        .iter()
        .map(|p| PoolConfig { url: p.url(), user: "acct".into(), password: "pw".into(), ..PoolConfig::default() })
        .collect();
    c.upstream.mode = Mode::Aggregate;
    c.vardiff.start_difficulty = difficulty;
    c.vardiff.min_difficulty = 1e-12;
    c.vardiff.max_difficulty = 1e6;
    c
}

fn validating(extranonce2_size: usize, difficulty: f64) -> PoolOptions {
    PoolOptions { extranonce2_size, difficulty, validate: true, reject_duplicates: true, ..PoolOptions::default() }
}

/// The share's own difficulty, as the miner computed it.
fn share_difficulty(miner: &SimMiner, share: &Share) -> f64 {
    let job = miner.job.as_ref().expect("a job");
    let en2 = hex::decode(&share.extranonce2).unwrap();
    let ntime = u32::from_str_radix(&share.ntime, 16).unwrap();
    let nonce = u32::from_str_radix(&share.nonce, 16).unwrap();
    hash_difficulty(&job.share_hash(&miner.extranonce1, &en2, ntime, nonce, job.version))
}

async fn accepted(miner: &mut SimMiner, worker: &str, share: &Share) {
    let id = miner.submit(worker, share).await;
    let reply = miner.wait_reply(&id).await.expect("submit reply");
    assert_eq!(reply["result"], json!(true), "{reply}");
}

/// Waits for a clean job whose coinb1 ends with `extranonce1` (a job of that pool session).
async fn wait_clean_job(miner: &mut SimMiner, timeout: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let msg = miner.recv_json(left).await?;
        if msg["method"] == "mining.notify" && msg["params"][8] == json!(true) {
            return Some(msg);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_below_the_pool_difficulty_stay_local_and_the_rest_validate_upstream() {
    // Miners work at 1e-8; the pool takes 1e-7: about one share in ten is forwarded.
    let pool = MockPool::start(validating(8, 1e-7)).await;
    let proxy = spawn_proxy(config(&[&pool], 1e-8)).await;
    let mut expected_forwarded = 0;
    let mut prefixes = HashSet::new();
    for m in 0..4 {
        let mut miner = proxy.miner().await;
        miner.handshake(&format!("farm.rig{m}")).await;
        assert_eq!((miner.extranonce1.len(), miner.extranonce2_size), (2, 6), "prefix_bytes 2 of the pool's 8");
        assert!(prefixes.insert(miner.extranonce1.clone()), "prefixes are unique");
        assert_eq!(miner.difficulty, 1e-8);
        for _ in 0..40 {
            let share = miner.grind(None);
            if share_difficulty(&miner, &share) >= 1e-7 {
                expected_forwarded += 1;
            }
            accepted(&mut miner, &format!("farm.rig{m}"), &share).await;
        }
    }
    assert!(expected_forwarded > 0, "some shares meet the pool's difficulty");
    assert!(pool.wait_submits(expected_forwarded).await, "every share that meets the pool's difficulty is forwarded");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let submits = pool.submits();
    assert_eq!(submits.len(), expected_forwarded, "and no other");
    assert!(eventually(WAIT, || async { pool.accepted() == expected_forwarded as u64 }).await);
    assert_eq!(pool.rejected(), 0, "the pool validated each one with its own extranonce1 and P ‖ en2");
    for submit in &submits {
        assert_eq!(submit["params"][0], "acct", "submitted as the pool's user");
        let en2 = submit["params"][2].as_str().unwrap();
        assert_eq!(en2.len(), 16);
        assert!(prefixes.contains(&hex::decode(&en2[..4]).unwrap()), "extranonce2 starts with a miner's prefix");
    }
    let (_, text) = proxy.http_get("/metrics").await;
    let label = pool.label();
    assert_eq!(metric(&text, "loka_shares_accepted_total", &[("pool", &label)]), Some(160.0));
    assert_eq!(metric(&text, "loka_shares_submitted_total", &[("pool", &label)]), Some(expected_forwarded as f64));
    assert_eq!(
        metric(&text, "loka_shares_local_only_total", &[("pool", &label)]),
        Some((160 - expected_forwarded) as f64)
    );
    assert_eq!(
        metric(&text, "loka_upstream_shares_total", &[("pool", &label), ("result", "accepted")]),
        Some(expected_forwarded as f64)
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_checks_run_before_anything_is_forwarded() {
    let pool = MockPool::start(validating(8, 1e-12)).await;
    let proxy = spawn_proxy(config(&[&pool], 1e-12)).await;
    let mut miner = proxy.miner().await;
    let reply = miner.configure("ffffffff").await;
    assert_eq!(reply["result"]["version-rolling.mask"], "1fffe000", "the miner's request ∩ the pool's mask");
    let mut narrow = proxy.miner().await;
    let reply = narrow.configure("00fff000").await;
    assert_eq!(reply["result"]["version-rolling.mask"], "00ffe000");
    miner.handshake("farm.rig1").await;
    let share = miner.grind(Some(0x0000_e000));
    accepted(&mut miner, "farm.rig1", &share).await;
    // Outside the mask, a duplicate, an unknown worker, an unknown job: refused here.
    let mut outside = miner.grind(None);
    outside.version_bits = Some("00001000".into());
    for (share, worker, code) in [
        (outside, "farm.rig1", 20),
        (share.clone(), "farm.rig1", 22),
        (miner.grind(None), "farm.other", 24),
        (Share { job_id: "zz".into(), ..miner.grind(None) }, "farm.rig1", 21),
    ] {
        let id = miner.submit(worker, &share).await;
        let reply = miner.wait_reply(&id).await.unwrap();
        assert_eq!(reply["error"][0], code, "{reply}");
    }
    assert!(pool.wait_submits(1).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pool.submits().len(), 1, "local rejects never reach the pool");
    assert_eq!((pool.accepted(), pool.rejected()), (1, 0), "rolled version bits validate upstream");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_miners_share_ceil_n_over_capacity_pool_sessions() {
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut c = config(&[&pool], 1e-12);
    c.aggregate.miners_per_upstream = 300;
    let proxy = spawn_proxy(c).await;
    let mut miners = Vec::new();
    for batch in 0..10 {
        let connected = join_all((0..100).map(|i| {
            let addr = proxy.addr;
            async move {
                let mut miner = SimMiner::connect(addr).await;
                miner.handshake(&format!("farm.rig{}", batch * 100 + i)).await;
                miner
            }
        }))
        .await;
        miners.extend(connected);
    }
    let prefixes: HashSet<_> = miners.iter().map(|m| m.extranonce1.clone()).collect();
    assert_eq!(prefixes.len(), 1000, "every live miner has its own prefix");
    let (_, body) = proxy.http_get("/api/v1/sessions").await;
    let sessions: Vec<Value> = serde_json::from_str(&body).unwrap();
    let mut counts: Vec<u64> = sessions.iter().map(|s| s["miners"].as_u64().unwrap()).collect();
    counts.sort_unstable();
    assert_eq!(counts, [100, 300, 300, 300], "⌈1000 / 300⌉ = 4 pool sessions: {body}");
    assert!(eventually(WAIT, || async { pool.connections() == 4 }).await, "{} pool connections", pool.connections());
    // A share from each, on its own session's job, reaches the pool.
    for (i, miner) in miners.iter_mut().enumerate().take(50) {
        let share = miner.any_share();
        accepted(miner, &format!("farm.rig{i}"), &share).await;
    }
    assert!(pool.wait_submits(50).await);
    let (_, text) = proxy.http_get("/metrics").await;
    assert_eq!(metric(&text, "loka_pool_miners", &[("pool", &pool.label())]), Some(1000.0));
    assert_eq!(metric(&text, "loka_pool_active", &[("pool", &pool.label())]), Some(1.0));
    drop(miners);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_and_failback_without_a_single_disconnect() {
    let mut primary = MockPool::start(validating(8, 1e-12)).await;
    let primary_addr = primary.addr;
    let backup = MockPool::start(validating(8, 1e-12)).await;
    let mut c = config(&[&primary, &backup], 1e-12);
    c.upstream.failback_after = 1;
    let proxy = spawn_proxy(c).await;
    let mut miners = Vec::new();
    for i in 0..20 {
        let mut miner = proxy.miner().await;
        miner.handshake(&format!("farm.rig{i}")).await;
        let share = miner.any_share();
        accepted(&mut miner, &format!("farm.rig{i}"), &share).await;
        miners.push(miner);
    }
    assert!(eventually(WAIT, || async { primary.accepted() == 20 }).await);

    primary.kill().await;
    let old_jobs: Vec<Share> = miners.iter_mut().map(|m| m.any_share()).collect();
    for (i, miner) in miners.iter_mut().enumerate() {
        let notify = wait_clean_job(miner, Duration::from_secs(5)).await;
        assert!(notify.is_some(), "miner {i} got the backup's job within seconds");
        assert!(!miner.closed);
    }
    assert_eq!(backup.connections(), 1, "one pool session moved");
    // A share on the dead pool's job is stale, and never reaches the backup.
    for (i, (miner, old)) in miners.iter_mut().zip(&old_jobs).enumerate() {
        let id = miner.submit(&format!("farm.rig{i}"), old).await;
        let reply = miner.wait_reply(&id).await.unwrap();
        assert_eq!(reply["error"][0], 21, "{reply}");
        let share = miner.any_share();
        accepted(miner, &format!("farm.rig{i}"), &share).await;
    }
    assert!(eventually(WAIT, || async { backup.accepted() == 20 }).await, "{}", backup.accepted());
    assert_eq!(backup.rejected(), 0, "no share of the old pool's jobs was sent to the backup");

    // The primary comes back: after failback_after, everyone moves back, still connected.
    let primary = MockPool::start_at(primary_addr, validating(8, 1e-12)).await;
    for (i, miner) in miners.iter_mut().enumerate() {
        assert!(wait_clean_job(miner, Duration::from_secs(15)).await.is_some(), "miner {i} failed back");
        let share = miner.any_share();
        accepted(miner, &format!("farm.rig{i}"), &share).await;
    }
    assert!(eventually(WAIT, || async { primary.accepted() == 20 }).await, "{}", primary.accepted());
    assert!(eventually(WAIT, || async { backup.connections() == 0 }).await, "the backup session is closed");
    assert!(miners.iter().all(|m| !m.closed), "no miner was disconnected");
    assert_eq!(proxy.registry.len(), 20);
    let (_, text) = proxy.http_get("/metrics").await;
    // Other tests in this process move the same counters: at least this test's moves are there.
    assert!(metric(&text, "loka_failovers_total", &[("kind", "failover")]) >= Some(1.0));
    assert!(metric(&text, "loka_failovers_total", &[("kind", "failback")]) >= Some(1.0));
    let (_, body) = proxy.http_get("/api/v1/pools").await;
    let pools: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(pools[0]["state"], "active", "{body}");
    assert_eq!(pools[0]["miners"], 20);
    assert_eq!(pools[1]["accepted"], 20);
    assert!(pools[0]["last_notify_age_s"].as_f64().unwrap() < 30.0);
    assert!(pools[1]["latency_ms"].as_f64().is_some());
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_with_less_extranonce2_gets_set_extranonce_or_reconnect() {
    let mut primary = MockPool::start(validating(8, 1e-12)).await;
    let backup = MockPool::start(validating(4, 1e-12)).await;
    let proxy = spawn_proxy(config(&[&primary, &backup], 1e-12)).await;
    let mut subscribed = proxy.miner().await;
    let id = subscribed.request("mining.extranonce.subscribe", json!([])).await;
    assert_eq!(subscribed.wait_reply(&id).await.unwrap()["result"], json!(true));
    subscribed.handshake("farm.a").await;
    let mut plain = proxy.miner().await;
    plain.handshake("farm.b").await;
    assert_eq!(subscribed.extranonce2_size, 6);
    let prefix = subscribed.extranonce1.clone();

    primary.kill().await;
    let clean = wait_clean_job(&mut subscribed, Duration::from_secs(5)).await;
    assert!(clean.is_some());
    let set = subscribed.notifications.iter().find(|n| n["method"] == "mining.set_extranonce").cloned();
    assert_eq!(set.unwrap()["params"], json!([hex::encode(&prefix), 2]), "the same prefix, 4 - 2 bytes of extranonce2");
    assert_eq!(subscribed.extranonce2_size, 2);
    let share = subscribed.any_share();
    accepted(&mut subscribed, "farm.a", &share).await;
    assert!(eventually(WAIT, || async { backup.accepted() == 1 }).await);

    let (messages, closed) = plain.drain_until_closed(Duration::from_secs(5)).await;
    assert!(closed, "a miner that cannot take set_extranonce is closed");
    assert!(messages.iter().any(|m| m["method"] == "client.reconnect" && m["params"] == json!([])), "{messages:?}");
    let mut again = proxy.miner().await;
    again.handshake("farm.b").await;
    assert_eq!(again.extranonce2_size, 2);
    let share = again.any_share();
    accepted(&mut again, "farm.b", &share).await;
    assert!(eventually(WAIT, || async { backup.accepted() == 2 }).await);
    assert_eq!(backup.rejected(), 0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suggest_difficulty_is_clamped_and_never_disconnects() {
    let pool = MockPool::start(validating(8, 1.0)).await;
    // Bounds low enough for the test miner to grind at them (difficulty 1e-6: ~4,300 hashes).
    let mut c = config(&[&pool], 1e-7);
    c.vardiff.min_difficulty = 1e-8;
    c.vardiff.max_difficulty = 1e-6;
    let proxy = spawn_proxy(c).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig1").await;
    assert_eq!(miner.difficulty, 1e-7);
    for (suggested, expected) in [(1e-12, 1e-8), (100.0, 1e-6), (5e-7, 5e-7)] {
        let id = miner.request("mining.suggest_difficulty", json!([suggested])).await;
        assert_eq!(miner.wait_reply(&id).await.unwrap()["result"], json!(true));
        // The new difficulty comes with a job it applies from.
        let mut difficulty = None;
        while let Some(msg) = miner.recv_json(WAIT).await {
            match msg["method"].as_str() {
                Some("mining.set_difficulty") => difficulty = msg["params"][0].as_f64(),
                Some("mining.notify") if difficulty.is_some() => break,
                _ => {}
            }
        }
        assert_eq!(difficulty, Some(expected), "suggested {suggested}");
        // The new difficulty applies to the job sent with it: a share ground at it is accepted.
        let share = miner.grind(None);
        accepted(&mut miner, "farm.rig1", &share).await;
    }
    assert!(!miner.closed);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_passthrough_authorizes_and_submits_each_worker_upstream() {
    let pool = MockPool::start(PoolOptions { reject_user: Some("acct.bad".into()), ..validating(8, 1e-12) }).await;
    let mut c = config(&[&pool], 1e-12);
    c.aggregate.worker_passthrough = true;
    c.upstream.user_template = "{pool_user}.{worker}".into();
    let proxy = spawn_proxy(c).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig7").await;
    let reply = miner.authorize("farm.bad", "x").await;
    assert_eq!(reply["error"][0], 24, "{reply}");
    let share = miner.any_share();
    accepted(&mut miner, "farm.rig7", &share).await;
    assert!(pool.wait_submits(1).await);
    assert_eq!(pool.submits()[0]["params"][0], "acct.rig7");
    assert!(pool.recorded_json().iter().any(|m| m["method"] == "mining.authorize" && m["params"][0] == "acct.rig7"));
    assert!(eventually(WAIT, || async { pool.accepted() == 1 }).await);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_that_leave_too_little_extranonce2_are_refused_for_aggregation() {
    // 3 bytes leave 1 beside the 2-byte prefix: not enough to roll.
    let narrow = MockPool::start(validating(3, 1e-12)).await;
    let wide = MockPool::start(validating(8, 1e-12)).await;
    let proxy = spawn_proxy(config(&[&narrow, &wide], 1e-12)).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig1").await;
    let share = miner.any_share();
    accepted(&mut miner, "farm.rig1", &share).await;
    assert!(eventually(WAIT, || async { wide.accepted() == 1 }).await);
    assert_eq!(narrow.submits().len(), 0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_rejects_most_shares_is_failed_over() {
    let primary = MockPool::start(validating(8, 1e-12)).await;
    let backup = MockPool::start(validating(8, 1e-12)).await;
    primary.set_submit_replies(SubmitReplies::Reject);
    let proxy = spawn_proxy(config(&[&primary, &backup], 1e-12)).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig1").await;
    // 20 verdicts make a rate; all rejected is over the default bound of 0.5.
    for _ in 0..20 {
        let share = miner.any_share();
        accepted(&mut miner, "farm.rig1", &share).await;
    }
    assert!(wait_clean_job(&mut miner, Duration::from_secs(5)).await.is_some(), "moved to the backup");
    let share = miner.any_share();
    accepted(&mut miner, "farm.rig1", &share).await;
    assert!(eventually(WAIT, || async { backup.accepted() == 1 }).await);
    assert!(!miner.closed);
    let (_, text) = proxy.http_get("/metrics").await;
    let rejected = metric(&text, "loka_upstream_shares_total", &[("pool", &primary.label()), ("result", "rejected")]);
    assert_eq!(rejected, Some(20.0));
    // The group credits each verdict to the miner whose share it was; the miner's own counts
    // are the proxy's verdicts.
    let worker = || async {
        let (_, body) = proxy.http_get("/api/v1/connections").await;
        serde_json::from_str::<Vec<Value>>(&body).unwrap().pop().expect("one worker")
    };
    assert!(eventually(WAIT, || async { worker().await["pool_accepted"] == 1 }).await, "{}", worker().await);
    let w = worker().await;
    assert_eq!((&w["accepted"], &w["rejected"]), (&json!(21), &json!(0)), "{w}");
    assert_eq!(w["pool_rejected"], 20, "{w}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_sends_no_job_within_job_timeout_is_failed_over() {
    // The primary sends one job and then nothing; the backup a job every 200 ms.
    let primary = MockPool::start(validating(8, 1e-12)).await;
    let backup = MockPool::start(validating(8, 1e-12)).await;
    let mut c = config(&[&primary, &backup], 1e-12);
    c.upstream.job_timeout = 1;
    let proxy = spawn_proxy(c).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig1").await;
    let started = tokio::time::Instant::now();
    let mut moved = false;
    while !moved && started.elapsed() < Duration::from_secs(10) {
        backup.new_job();
        moved = wait_clean_job(&mut miner, Duration::from_millis(200)).await.is_some() && backup.connections() == 1;
    }
    assert!(moved, "the silent primary was left for the backup");
    let share = miner.any_share();
    accepted(&mut miner, "farm.rig1", &share).await;
    assert!(eventually(WAIT, || async { backup.accepted() == 1 }).await);
    assert!(!miner.closed);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_reconnect_moves_the_session_without_touching_miners() {
    let pool = MockPool::start(validating(8, 1e-12)).await;
    let proxy = spawn_proxy(config(&[&pool], 1e-12)).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig1").await;
    let old = miner.any_share();
    assert_eq!(pool.broadcast(r#"{"id":null,"method":"client.reconnect","params":[]}"#), 1);
    assert!(wait_clean_job(&mut miner, Duration::from_secs(5)).await.is_some(), "a job of the new session");
    let id = miner.submit("farm.rig1", &old).await;
    assert_eq!(miner.wait_reply(&id).await.unwrap()["error"][0], 21, "the old session's job is stale");
    let share = miner.any_share();
    accepted(&mut miner, "farm.rig1", &share).await;
    assert!(eventually(WAIT, || async { pool.accepted() == 1 }).await);
    assert_eq!(pool.rejected(), 0);
    assert!(!miner.closed);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn miners_cut_while_waiting_for_a_seat_give_it_back() {
    // A pool that accepts and never says a word: the group stays connecting, and miners wait in
    // admission until the handshake deadline cuts them.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            sockets.push(socket);
        }
    });
    let mut c = proxy_config(silent_addr);
    c.upstream.mode = Mode::Aggregate;
    c.upstream.connect_timeout = 2;
    c.server.handshake_timeout = 2;
    let proxy = spawn_proxy(c).await;
    let mut miners = Vec::new();
    for _ in 0..3 {
        let mut miner = proxy.miner().await;
        miner.request("mining.subscribe", json!(["test/1"])).await;
        miners.push(miner);
    }
    let seats = || async {
        let (_, body) = proxy.http_get("/api/v1/sessions").await;
        let sessions: Vec<Value> = serde_json::from_str(&body).unwrap();
        sessions.iter().map(|s| s["miners"].as_u64().unwrap()).sum::<u64>()
    };
    assert!(eventually(WAIT, || async { seats().await == 3 }).await, "the three miners hold a place");
    for miner in &mut miners {
        assert!(miner.expect_closed(WAIT).await, "cut at the handshake deadline");
    }
    assert!(eventually(WAIT, || async { seats().await == 0 }).await, "places leaked: {}", seats().await);
    assert_eq!(proxy.registry.len(), 0);
    proxy.shutdown().await;
    held.abort();
}
