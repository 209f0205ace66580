//! Block candidates: a share that meets the network target (from nbits) but not the pool's share
//! target still goes to the pool, in both modes, as ckpool submits every possible block.

mod support;

use std::time::Duration;

use loka_stratum::config::Mode;
use serde_json::json;
use support::*;

/// Regtest's nbits: a network target far easier than the pool's share target.
const REGTEST_NBITS: u32 = 0x207f_ffff;
const POOL_DIFFICULTY: f64 = 1e6;
/// Enough rejects to fill the aggregate reject window's minimum of 20, and more.
const CANDIDATES: u64 = 25;

/// A share on the miner's newest job that meets the network target with room to spare and
/// misses the pool's difficulty; `next` is the nonce to try from, moved past the one found.
fn block_candidate(miner: &SimMiner, next: &mut u32) -> Share {
    let job = miner.job.clone().expect("a job");
    let en2 = vec![0; miner.extranonce2_size];
    let root = job.merkle_root(&miner.extranonce1, &en2);
    let mut h = header(job.version, &swap_words(&job.prevhash), &root, job.ntime, job.nbits, 0);
    let network = nbits_difficulty(job.nbits);
    for nonce in *next..next.saturating_add(1000) {
        h[76..80].copy_from_slice(&nonce.to_le_bytes());
        let d = hash_difficulty(&sha256d(&h));
        if d >= 2.0 * network && d < POOL_DIFFICULTY {
            *next = nonce + 1;
            return Share {
                job_id: job.id,
                extranonce2: hex::encode(en2),
                ntime: format!("{:08x}", job.ntime),
                nonce: format!("{nonce:08x}"),
                version_bits: None,
            };
        }
    }
    panic!("no block candidate in 1000 nonces at nbits {:08x}", job.nbits);
}

async fn every_block_candidate_reaches_the_pool(mode: Mode) {
    let opts = PoolOptions { difficulty: POOL_DIFFICULTY, nbits: REGTEST_NBITS, validate: true, ..Default::default() };
    let pool = MockPool::start(opts).await;
    let proxy = spawn_proxy(mode_config(mode, pool.addr)).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig1").await;
    let mut next = 0;
    for _ in 0..CANDIDATES {
        let share = block_candidate(&miner, &mut next);
        let id = miner.submit("farm.rig1", &share).await;
        let reply = miner.wait_reply(&id).await.expect("submit reply");
        match mode {
            // The pool's verdict, relayed: it submits the block and refuses the share below its target.
            Mode::Passthrough => assert_eq!(reply["error"][0], json!(23), "{reply}"),
            // Answered by the proxy, at the miner's own difficulty.
            Mode::Aggregate => assert_eq!(reply["result"], json!(true), "{reply}"),
        }
    }
    assert!(
        eventually(WAIT, || async { pool.blocks() == CANDIDATES }).await,
        "{} of {CANDIDATES} block candidates reached the pool",
        pool.blocks()
    );
    assert_eq!(pool.submits().len() as u64, CANDIDATES, "each once");
    let label = pool.label();
    let sent = CANDIDATES as f64;
    let rejected = |text: &str| metric(text, "loka_upstream_shares_total", &[("pool", &label), ("result", "rejected")]);
    let verdicts = eventually(WAIT, || async { rejected(&proxy.http_get("/metrics").await.1) == Some(sent) }).await;
    let (_, text) = proxy.http_get("/metrics").await;
    assert!(verdicts, "the pool's verdicts: {:?}", rejected(&text));
    assert_eq!(metric(&text, "loka_blocks_found_total", &[("pool", &label)]), Some(sent), "counted as sent");
    assert_eq!(metric(&text, "loka_shares_submitted_total", &[("pool", &label)]), Some(sent));
    // The pool refused them as shares, which says nothing of its health: no aggregate session
    // was dropped for its reject rate, so the miner got no clean job past its first.
    while miner.recv_json(Duration::from_millis(500)).await.is_some() {}
    let clean = miner.notifications.iter().filter(|n| n["method"] == "mining.notify" && n["params"][8] == true);
    assert_eq!(clean.count(), 1, "{:?}", miner.notifications);
    assert_eq!(metric(&text, "loka_upstream_faults_total", &[("pool", &label)]).unwrap_or(0.0), 0.0, "{text}");
    assert!(!miner.closed);
    proxy.shutdown().await;
}
in_both_modes!(tokio::test(flavor = "multi_thread", worker_threads = 2), every_block_candidate_reaches_the_pool);
