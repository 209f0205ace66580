//! What a pool grants, over real sockets: worker authorizes (a pool that answers one per
//! connection, as ckpool does; the workers a failover authorizes again) and version rolling
//! (ignored, narrower, changed by a failover; refused: tests/zoo.rs).

mod support;

use futures::future::join_all;
use loka_stratum::config::{Config, Mode, PoolConfig};
use serde_json::{json, Value};
use support::*;

/// An aggregate proxy in front of `pools`, with `worker_passthrough` as given.
fn aggregate(pools: &[&MockPool], worker_passthrough: bool) -> Config {
    let mut c = mode_config(Mode::Aggregate, pools[0].addr);
    c.pools = pools
        .iter()
        .map(|p| PoolConfig { url: p.url(), user: "acct".into(), password: "pw".into(), ..PoolConfig::default() })
        .collect();
    c.aggregate.worker_passthrough = worker_passthrough;
    c
}

fn pool(opts: PoolOptions) -> PoolOptions {
    PoolOptions { extranonce2_size: 8, validate: true, reject_duplicates: true, ..opts }
}

async fn reply_to_submit(miner: &mut SimMiner, worker: &str, share: &Share) -> Value {
    let id = miner.submit(worker, share).await;
    miner.wait_reply(&id).await.expect("submit reply")
}

async fn accepted(miner: &mut SimMiner, worker: &str, share: &Share) {
    let reply = reply_to_submit(miner, worker, share).await;
    assert_eq!(reply["result"], json!(true), "{reply}");
}

fn authorizes(pool: &MockPool) -> Vec<String> {
    let users = pool.recorded_json().into_iter().filter(|m| m["method"] == "mining.authorize");
    users.map(|m| m["params"][0].as_str().unwrap_or_default().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_passthrough_on_a_pool_that_answers_one_authorize_per_connection() {
    let ckpool = MockPool::start(pool(PoolOptions { authorize_once: true, ..PoolOptions::default() })).await;
    let mut c = aggregate(&[&ckpool], true);
    c.upstream.user_template = "{pool_user}.{worker}".into();
    let proxy = spawn_proxy(c).await;
    // Three workers at once: their authorizes are the pool session's second, third and fourth.
    let addr = proxy.addr;
    let mut miners = join_all((1..=3).map(|i| async move {
        let mut miner = SimMiner::connect(addr).await;
        miner.handshake(&format!("farm.rig{i}")).await;
        miner
    }))
    .await;
    // A retry, and a worker that comes after the pool's silence was found, are answered too.
    let reply = miners[0].authorize("farm.rig1", "x").await;
    assert_eq!(reply["result"], json!(true), "{reply}");
    let mut late = proxy.miner().await;
    late.handshake("farm.rig4").await;
    miners.push(late);
    for (i, miner) in miners.iter_mut().enumerate() {
        let share = miner.grind(None);
        accepted(miner, &format!("farm.rig{}", i + 1), &share).await;
    }
    assert!(eventually(WAIT, || async { ckpool.accepted() == 4 }).await, "{}", ckpool.accepted());
    assert_eq!(ckpool.rejected(), 0);
    assert!(ckpool.submits().iter().all(|s| s["params"][0] == "acct"), "credited to the proxy's user");
    // The next session to this pool asks for no worker: only the proxy's own authorize.
    let before = authorizes(&ckpool).len();
    assert_eq!(ckpool.broadcast(r#"{"id":null,"method":"client.reconnect","params":[]}"#), 1);
    assert!(miners[0].clean_job(WAIT).await.is_some(), "a job of the new session");
    let share = miners[0].grind(None);
    accepted(&mut miners[0], "farm.rig1", &share).await;
    assert!(eventually(WAIT, || async { ckpool.accepted() == 5 }).await);
    assert_eq!(authorizes(&ckpool)[before..], ["acct"]);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_authorizes_only_the_workers_of_live_miners() {
    let mut primary = MockPool::start(pool(PoolOptions::default())).await;
    let backup = MockPool::start(pool(PoolOptions::default())).await;
    let proxy = spawn_proxy(aggregate(&[&primary, &backup], true)).await;
    let mut stays = proxy.miner().await;
    stays.handshake("farm.a").await;
    // Another miner with the same worker, and one with its own: both leave.
    for worker in ["farm.a", "farm.b"] {
        let mut leaves = proxy.miner().await;
        leaves.handshake(worker).await;
        let share = leaves.grind(None);
        accepted(&mut leaves, worker, &share).await;
    }
    assert!(eventually(WAIT, || async { primary.accepted() == 2 }).await);
    assert!(eventually(WAIT, || async { proxy.registry.len() == 1 }).await, "the two miners are gone");
    primary.kill().await;
    assert!(stays.clean_job(WAIT).await.is_some(), "the backup's job");
    let share = stays.grind(None);
    accepted(&mut stays, "farm.a", &share).await;
    assert!(eventually(WAIT, || async { backup.accepted() == 1 }).await);
    assert_eq!(backup.submits()[0]["params"][0], "farm.a", "the live worker, authorized again");
    assert_eq!(authorizes(&backup), ["acct", "farm.a"], "farm.b has no live miner");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn miners_roll_only_inside_the_mask_their_pool_granted() {
    // A pool that ignores mining.configure grants nothing either.
    let ignoring = MockPool::start(pool(PoolOptions { configure: Configure::Ignore, ..PoolOptions::default() })).await;
    let proxy = spawn_proxy(aggregate(&[&ignoring], false)).await;
    let mut miner = proxy.miner().await;
    let reply = miner.configure("ffffffff").await;
    assert_eq!(reply["result"], json!({"version-rolling": false}));
    miner.handshake("farm.rig1").await;
    let rolled = Share { version_bits: Some("00002000".into()), ..miner.grind(None) };
    assert_eq!(reply_to_submit(&mut miner, "farm.rig1", &rolled).await["error"][0], 20);
    assert_eq!(ignoring.submits().len(), 0);
    proxy.shutdown().await;

    // A primary with a narrower mask than the miner asks for, and a backup that refuses.
    let narrow = PoolOptions { version_mask: 0x00ff_e000, ..PoolOptions::default() };
    let mut primary = MockPool::start(pool(narrow)).await;
    let backup = MockPool::start(pool(PoolOptions { configure: Configure::Refuse, ..PoolOptions::default() })).await;
    let proxy = spawn_proxy(aggregate(&[&primary, &backup], false)).await;
    let mut miner = proxy.miner().await;
    let reply = miner.configure("1fffe000").await;
    assert_eq!(reply["result"], json!({"version-rolling": true, "version-rolling.mask": "00ffe000"}));
    miner.handshake("farm.rig1").await;
    let share = miner.grind(Some(0x00ff_e000));
    accepted(&mut miner, "farm.rig1", &share).await;
    let outside = Share { version_bits: Some("10000000".into()), ..miner.grind(None) };
    assert_eq!(reply_to_submit(&mut miner, "farm.rig1", &outside).await["error"][0], 20, "asked for, not granted");
    assert!(eventually(WAIT, || async { primary.accepted() == 1 }).await);
    assert_eq!(primary.rejected(), 0);
    // The backup grants nothing: the miner is told so before its first job there.
    primary.kill().await;
    assert!(miner.clean_job(WAIT).await.is_some());
    let set_mask = miner.notifications.iter().rfind(|n| n["method"] == "mining.set_version_mask");
    assert_eq!(set_mask.map(|n| n["params"].clone()), Some(json!(["00000000"])));
    let rolled = Share { version_bits: Some("00002000".into()), ..miner.grind(None) };
    assert_eq!(reply_to_submit(&mut miner, "farm.rig1", &rolled).await["error"][0], 20);
    let share = miner.grind(None);
    accepted(&mut miner, "farm.rig1", &share).await;
    assert!(eventually(WAIT, || async { backup.accepted() == 1 }).await);
    assert_eq!(backup.rejected(), 0);
    proxy.shutdown().await;
}
