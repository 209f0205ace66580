//! The aggregate failover reject window counts only the rejects that say the pool is unhealthy:
//! stale (21) and duplicate (22) rejects happen to healthy pools and never fail a session over.

mod support;

use std::time::Duration;

use loka_stratum::config::{Mode, PoolConfig};
use serde_json::json;
use support::*;

/// Forwarded shares: past the window's minimum of 20, all rejected.
const SHARES: u64 = 30;

/// An aggregate proxy on `primary`, with `backup` second, every share forwarded.
async fn proxy(primary: &MockPool, backup: &MockPool) -> Proxy {
    let mut c = mode_config(Mode::Aggregate, primary.addr);
    c.pools.push(PoolConfig { url: backup.url(), user: "acct".into(), password: "pw".into(), ..PoolConfig::default() });
    spawn_proxy(c).await
}

async fn pools(code: i64) -> (MockPool, MockPool) {
    let primary = MockPool::start(PoolOptions { extranonce2_size: 8, ..Default::default() }).await;
    let backup = MockPool::start(PoolOptions { extranonce2_size: 8, ..Default::default() }).await;
    primary.set_submit_replies(SubmitReplies::RejectWith(code));
    (primary, backup)
}

async fn accepted(miner: &mut SimMiner) {
    let share = miner.any_share();
    let id = miner.submit("farm.rig1", &share).await;
    let reply = miner.wait_reply(&id).await.expect("submit reply");
    assert_eq!(reply["result"], json!(true), "the proxy refused a share (stale after a failover?): {reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_and_duplicate_rejects_never_fail_over() {
    for code in [21, 22] {
        let (primary, backup) = pools(code).await;
        let proxy = proxy(&primary, &backup).await;
        let mut miner = proxy.miner().await;
        miner.handshake("farm.rig1").await;
        for _ in 0..=SHARES {
            accepted(&mut miner).await;
        }
        assert!(
            eventually(WAIT, || async { primary.rejected() == SHARES + 1 }).await,
            "code {code}: the primary answered {} of {} shares; the rest went elsewhere",
            primary.rejected(),
            SHARES + 1
        );
        assert!(miner.clean_job(Duration::from_secs(1)).await.is_none(), "code {code}: the session moved");
        assert!(backup.submits().is_empty(), "code {code}");
        assert!(!miner.closed);
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_rejects_fail_over() {
    for code in [20, 23] {
        let (primary, backup) = pools(code).await;
        let proxy = proxy(&primary, &backup).await;
        let mut miner = proxy.miner().await;
        miner.handshake("farm.rig1").await;
        for _ in 0..20 {
            accepted(&mut miner).await;
        }
        assert!(miner.clean_job(WAIT).await.is_some(), "code {code}: no move to the backup");
        accepted(&mut miner).await;
        assert!(eventually(WAIT, || async { backup.accepted() == 1 }).await, "code {code}");
        assert!(!miner.closed);
        proxy.shutdown().await;
    }
}
