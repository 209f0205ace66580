//! Every share is judged by the proxy before it may leave: each local reject gets its Stratum
//! code at once, and none of them reaches the pool's recorder.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

/// A pool, a proxy, and a miner past subscribe and authorize (worker "farm.rig1") with a job.
async fn rig(opts: PoolOptions) -> (MockPool, Proxy, SimMiner) {
    let pool = MockPool::start(opts).await;
    let proxy = spawn_proxy(proxy_config(pool.addr)).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig1").await;
    (pool, proxy, miner)
}

/// Submits `params` and returns the error the proxy answered with, checking that nothing more
/// reached the pool than before.
async fn local_reject(pool: &MockPool, miner: &mut SimMiner, params: Value) -> Value {
    let before = pool.submits().len();
    let id = miner.request("mining.submit", params).await;
    let reply = miner.wait_reply(&id).await.expect("a reply");
    assert!(reply["result"].is_null() || reply["result"] == false, "{reply}");
    // A forwarded share would be at the pool by the time a later request's reply is back.
    let ping = miner.request("mining.extranonce.subscribe", json!([])).await;
    miner.wait_reply(&ping).await.expect("a reply to the ping");
    assert_eq!(pool.submits().len(), before, "a locally rejected share reached the pool");
    reply["error"].clone()
}

fn params(share: &Share) -> Value {
    let mut p = json!(["farm.rig1", share.job_id, share.extranonce2, share.ntime, share.nonce]);
    if let Some(bits) = &share.version_bits {
        p.as_array_mut().unwrap().push(json!(bits));
    }
    p
}

/// Reads until the miner has seen job `id` (bounded).
async fn wait_for_job(miner: &mut SimMiner, id: &str) {
    for _ in 0..50 {
        if miner.job.as_ref().is_some_and(|j| j.id == id) {
            return;
        }
        miner.recv_json(Duration::from_millis(200)).await;
    }
    panic!("job {id} never arrived");
}

/// Broadcasts a copy of the miner's job under a new id.
async fn new_job(pool: &MockPool, miner: &mut SimMiner, id: &str, clean: bool) {
    let mut job = miner.job.clone().unwrap();
    job.id = id.into();
    job.clean = clean;
    let line = json!({"id": null, "method": "mining.notify", "params": job.notify_params()}).to_string();
    assert_eq!(pool.broadcast(&line), 1);
    wait_for_job(miner, id).await;
}

#[tokio::test]
async fn submit_before_subscribe_or_authorize() {
    let pool = MockPool::start(PoolOptions::default()).await;
    let proxy = spawn_proxy(proxy_config(pool.addr)).await;
    let mut miner = proxy.miner().await;
    let share = json!(["farm.rig1", "1", "00000000", "00000000", "00000000"]);
    assert_eq!(local_reject(&pool, &mut miner, share.clone()).await, json!([25, "Not subscribed", null]));
    miner.subscribe().await;
    assert_eq!(local_reject(&pool, &mut miner, share).await, json!([24, "Unauthorized worker", null]));
    assert!(pool.submits().is_empty());
    proxy.shutdown().await;
}

#[tokio::test]
async fn worker_not_authorized_on_this_connection() {
    let (pool, proxy, mut miner) = rig(PoolOptions::default()).await;
    let mut p = params(&miner.any_share());
    p[0] = json!("farm.rig2");
    assert_eq!(local_reject(&pool, &mut miner, p).await, json!([24, "Unauthorized worker", null]));
    // Another connection's worker is not this connection's.
    let mut other = proxy.miner().await;
    other.handshake("farm.other").await;
    let mut p = params(&miner.any_share());
    p[0] = json!("farm.other");
    assert_eq!(local_reject(&pool, &mut miner, p).await[0], 24);
    proxy.shutdown().await;
}

#[tokio::test]
async fn unknown_and_stale_jobs() {
    let (pool, proxy, mut miner) = rig(PoolOptions::default()).await;
    let mut p = params(&miner.any_share());
    p[1] = json!("no-such-job");
    assert_eq!(local_reject(&pool, &mut miner, p).await, json!([21, "Job not found", null]));

    // The job before a clean one stays for the shares in flight: the pool judges them, and this
    // one takes it. Two clean jobs later, a share on it is stale here.
    let old = miner.any_share();
    let in_flight = miner.grind(None);
    new_job(&pool, &mut miner, "fresh", true).await;
    let id = miner.request("mining.submit", params(&in_flight)).await;
    assert_eq!(miner.wait_reply(&id).await.expect("a reply")["result"], true, "the pool took it");
    new_job(&pool, &mut miner, "fresher", true).await;
    assert_eq!(local_reject(&pool, &mut miner, params(&old)).await, json!([21, "Job not found (stale)", null]));
    let (_, text) = proxy.http_get("/metrics").await;
    let label = pool.label();
    let rejected = |reason| metric(&text, "loka_shares_rejected_total", &[("pool", &label), ("reason", reason)]);
    assert_eq!((rejected("stale"), rejected("bad_job")), (Some(1.0), Some(1.0)));
    proxy.shutdown().await;
}

#[tokio::test]
async fn field_widths_and_hex() {
    let (pool, proxy, mut miner) = rig(PoolOptions::default()).await;
    let share = miner.any_share();
    for (index, value, message) in [
        (2, "000000", "extranonce2 must be 8 hex characters"),
        (2, "0000000000", "extranonce2 must be 8 hex characters"),
        (2, "0000000", "extranonce2 must be 8 hex characters"),
        (2, "0000000x", "extranonce2 is not hex"),
        (3, "0x123456", "ntime must be 8 hex characters"),
        (3, "5c8f0a1", "ntime must be 8 hex characters"),
        (4, "0000000g", "nonce must be 8 hex characters"),
        (4, "000000001", "nonce must be 8 hex characters"),
        (5, "2000", "version bits must be 8 hex characters"),
    ] {
        let mut p = params(&share);
        if index == 5 {
            p.as_array_mut().unwrap().push(json!(value));
        } else {
            p[index] = json!(value);
        }
        assert_eq!(local_reject(&pool, &mut miner, p).await, json!([20, message, null]), "{value}");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn ntime_window_edges() {
    let (pool, proxy, mut miner) = rig(PoolOptions::default()).await;
    let job_ntime = miner.job.as_ref().unwrap().ntime;
    for (ntime, accepted) in
        [(job_ntime - 1, false), (job_ntime, true), (job_ntime + 7000, true), (job_ntime + 7001, false)]
    {
        let mut share = miner.any_share();
        share.ntime = format!("{ntime:08x}");
        if accepted {
            let id = miner.submit("farm.rig1", &share).await;
            assert_eq!(miner.wait_reply(&id).await.unwrap()["result"], true, "{ntime}");
        } else {
            assert_eq!(local_reject(&pool, &mut miner, params(&share)).await, json!([20, "ntime out of range", null]));
        }
    }
    assert_eq!(pool.submits().len(), 2);
    proxy.shutdown().await;
}

#[tokio::test]
async fn version_bits_outside_the_mask() {
    let (pool, proxy, mut miner) = rig(PoolOptions::default()).await;
    // Without mining.configure nothing may roll.
    let mut share = miner.any_share();
    share.version_bits = Some("00002000".into());
    let expected = json!([20, "version bits outside the negotiated mask", null]);
    assert_eq!(local_reject(&pool, &mut miner, params(&share)).await, expected);
    proxy.shutdown().await;

    let pool = MockPool::start(PoolOptions::default()).await;
    let proxy = spawn_proxy(proxy_config(pool.addr)).await;
    let mut miner = proxy.miner().await;
    miner.configure("1fffe000").await;
    miner.handshake("farm.rig1").await;
    let mut share = miner.any_share();
    share.version_bits = Some("00002000".into());
    let id = miner.submit("farm.rig1", &share).await;
    assert_eq!(miner.wait_reply(&id).await.unwrap()["result"], true);
    let mut share = miner.any_share();
    share.version_bits = Some("00001000".into());
    assert_eq!(local_reject(&pool, &mut miner, params(&share)).await, expected);
    assert_eq!(pool.submits().len(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn duplicates_in_any_case() {
    let (pool, proxy, mut miner) = rig(PoolOptions::default()).await;
    let mut share = miner.any_share();
    share.extranonce2 = "abcdef01".into();
    share.nonce = "deadbeef".into();
    let id = miner.submit("farm.rig1", &share).await;
    assert_eq!(miner.wait_reply(&id).await.unwrap()["result"], true);
    let duplicate = json!([22, "Duplicate share", null]);
    assert_eq!(local_reject(&pool, &mut miner, params(&share)).await, duplicate);
    let mut upper = share.clone();
    upper.extranonce2 = "ABCDEF01".into();
    upper.nonce = "DEADBEEF".into();
    assert_eq!(local_reject(&pool, &mut miner, params(&upper)).await, duplicate);
    assert_eq!(pool.submits().len(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn low_difficulty_and_a_difficulty_change_bound_to_the_next_job() {
    const DIFFICULTY: f64 = 1e-5;
    let (pool, proxy, mut miner) =
        rig(PoolOptions { validate: true, difficulty: DIFFICULTY, ..PoolOptions::default() }).await;
    let good = miner.grind(None);
    let id = miner.submit("farm.rig1", &good).await;
    assert_eq!(miner.wait_reply(&id).await.unwrap()["result"], true);

    // A share that misses the target.
    let job = miner.job.clone().unwrap();
    let mut low = miner.any_share();
    let en2 = hex::decode(&low.extranonce2).unwrap();
    let nonce = (0u32..1000)
        .find(|n| hash_difficulty(&job.share_hash(&miner.extranonce1, &en2, job.ntime, *n, job.version)) < DIFFICULTY)
        .unwrap();
    low.nonce = format!("{nonce:08x}");
    assert_eq!(local_reject(&pool, &mut miner, params(&low)).await, json!([23, "Low difficulty share", null]));

    // A harder difficulty binds to jobs sent after it: the current job keeps the old one.
    assert_eq!(pool.broadcast(r#"{"id":null,"method":"mining.set_difficulty","params":[1000]}"#), 1);
    let mut easy_share_on_old_job = None;
    for _ in 0..50 {
        if miner.difficulty == 1000.0 {
            miner.difficulty = DIFFICULTY;
            easy_share_on_old_job = Some(miner.grind(None));
            break;
        }
        miner.recv_json(Duration::from_millis(200)).await;
    }
    let share = easy_share_on_old_job.expect("set_difficulty arrived");
    let id = miner.submit("farm.rig1", &share).await;
    assert_eq!(miner.wait_reply(&id).await.unwrap()["result"], true, "the old job keeps its difficulty");

    new_job(&pool, &mut miner, "harder", false).await;
    let mut on_new = miner.grind(None);
    on_new.job_id = "harder".into();
    let reply = local_reject(&pool, &mut miner, params(&on_new)).await;
    assert_eq!(reply[0], 23, "a share at the old difficulty on the new job: {reply}");
    assert_eq!(pool.submits().len(), 2);
    assert_eq!(pool.rejected(), 0, "the pool never saw a bad share");
    proxy.shutdown().await;
}

#[tokio::test]
async fn workers_api_shows_best_share_and_validated_hashrate() {
    const DIFFICULTY: f64 = 1e-5;
    let (_pool, proxy, mut miner) =
        rig(PoolOptions { validate: true, difficulty: DIFFICULTY, ..PoolOptions::default() }).await;
    let mut best: f64 = 0.0;
    for _ in 0..3 {
        let share = miner.grind(None);
        let job = miner.job.clone().unwrap();
        let en2 = hex::decode(&share.extranonce2).unwrap();
        let nonce = u32::from_str_radix(&share.nonce, 16).unwrap();
        best = best.max(hash_difficulty(&job.share_hash(&miner.extranonce1, &en2, job.ntime, nonce, job.version)));
        let id = miner.submit("farm.rig1", &share).await;
        assert_eq!(miner.wait_reply(&id).await.unwrap()["result"], true);
    }
    let (_, body) = proxy.http_get("/api/v1/connections").await;
    let workers: Vec<Value> = serde_json::from_str(&body).unwrap();
    let w = &workers[0];
    let reported = w["best_share_difficulty"].as_f64().unwrap();
    assert!((reported / best - 1.0).abs() < 1e-6, "{reported} vs {best}");
    assert!(w["hashrate_5m"].as_f64().unwrap() > 0.0, "{w}");
    proxy.shutdown().await;
}
