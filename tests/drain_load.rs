//! A drain under load: 200 miners keep submitting while the proxy shuts down. Every submit the
//! proxy read and forwarded is answered exactly once; a submit it never forwarded is answered at
//! most once, and only with an error; and `Server::run` returns.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const MINERS: usize = 200;
/// Submits each miner sends at once, before the trickle.
const BURST: usize = 5;
/// The gap between a miner's later submits.
const TRICKLE: Duration = Duration::from_millis(25);
const POOL_DELAY: Duration = Duration::from_millis(200);

/// What identifies a share on both sides of the proxy: job id, extranonce2 and nonce. Job ids
/// are unique per pool connection, so the key is unique across miners.
type ShareKey = (String, String, String);

/// What one miner sent and read.
struct MinerRun {
    /// Each submit's id and share, in send order.
    sent: Vec<(Value, ShareKey)>,
    messages: Vec<Value>,
    closed: bool,
}

/// Submits a burst, then one share every `TRICKLE` (the first after `offset`) until `stop`; then
/// reads until the proxy closes the connection.
async fn submit_until_stopped(
    mut miner: SimMiner,
    worker: String,
    offset: Duration,
    stop: Arc<AtomicBool>,
) -> MinerRun {
    let mut sent = Vec::new();
    let mut submit = async |miner: &mut SimMiner| {
        let share = miner.any_share();
        let id = miner.submit(&worker, &share).await;
        sent.push((id, (share.job_id, share.extranonce2, share.nonce)));
    };
    for _ in 0..BURST {
        submit(&mut miner).await;
    }
    tokio::time::sleep(offset).await;
    while !stop.load(Ordering::Acquire) {
        submit(&mut miner).await;
        tokio::time::sleep(TRICKLE).await;
    }
    let (messages, closed) = miner.drain_until_closed(WAIT).await;
    MinerRun { sent, messages, closed }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_with_200_miners_submitting_answers_each_forwarded_submit_once() {
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut proxy = spawn_proxy(proxy_config(pool.addr)).await;
    let handshakes = (0..MINERS).map(|i| {
        let proxy = &proxy;
        async move {
            let mut miner = proxy.miner().await;
            miner.handshake(&format!("w{i}")).await;
            miner
        }
    });
    let miners = futures::future::join_all(handshakes).await;
    pool.set_submit_replies(SubmitReplies::Delay(POOL_DELAY));

    let stop = Arc::new(AtomicBool::new(false));
    let runs: Vec<_> = miners
        .into_iter()
        .enumerate()
        .map(|(i, miner)| {
            // Staggered, so that submits reach the proxy evenly and the shutdown lands among them.
            let offset = TRICKLE * i as u32 / MINERS as u32;
            tokio::spawn(submit_until_stopped(miner, format!("w{i}"), offset, stop.clone()))
        })
        .collect();

    // Shut down while the trickle is under way and the bursts wait at the pool on its delayed
    // replies.
    let before_trigger = MINERS * (BURST + 2);
    assert!(
        eventually(WAIT, || async { pool.submits().len() >= before_trigger }).await,
        "the pool got {} of {before_trigger} submits",
        pool.submits().len()
    );
    let at_trigger = pool.submits().len();
    let drain_started = Instant::now();
    proxy.trigger_shutdown();
    // The miners go on submitting into a proxy that no longer reads them.
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Release);

    let mut results = Vec::new();
    for run in runs {
        results.push(run.await.expect("a miner task panicked"));
    }
    assert!(proxy.stopped_within(WAIT).await, "Server::run returns after the drain");
    let drain_took = drain_started.elapsed();

    let forwarded: HashSet<ShareKey> = pool
        .submits()
        .iter()
        .map(|s| {
            let p = &s["params"];
            let field = |i: usize| p[i].as_str().expect("submit params are strings").to_owned();
            (field(1), field(2), field(4))
        })
        .collect();
    let (mut sent_total, mut forwarded_total, mut answered_ok, mut answered_err, mut unanswered) = (0, 0, 0, 0, 0);
    for (i, run) in results.iter().enumerate() {
        assert!(run.closed, "miner {i} is closed after the drain");
        let mut replies: HashMap<String, Vec<&Value>> = HashMap::new();
        for reply in run.messages.iter().filter(|m| is_reply(m)) {
            replies.entry(reply["id"].to_string()).or_default().push(reply);
        }
        let sent_ids: HashSet<String> = run.sent.iter().map(|(id, _)| id.to_string()).collect();
        for (id, got) in &replies {
            assert!(sent_ids.contains(id), "miner {i}: a reply to id {id} it never sent: {got:?}");
            assert_eq!(got.len(), 1, "miner {i}: id {id} answered {} times: {got:?}", got.len());
        }
        for (id, key) in &run.sent {
            sent_total += 1;
            let got = replies.get(&id.to_string());
            if forwarded.contains(key) {
                forwarded_total += 1;
                let got = got.unwrap_or_else(|| panic!("miner {i}: forwarded submit {id} got no reply"));
                assert_eq!(got[0]["result"], Value::Bool(true), "miner {i}: forwarded submit {id}: {:?}", got[0]);
                answered_ok += 1;
            } else {
                match got {
                    None => unanswered += 1,
                    Some(got) => {
                        assert!(!got[0]["error"].is_null(), "miner {i}: submit {id} never forwarded yet {:?}", got[0]);
                        answered_err += 1;
                    }
                }
            }
        }
    }
    eprintln!(
        "drain_load: {MINERS} miners sent {sent_total} submits; pool had {at_trigger} at the trigger and \
         received {} in all ({forwarded_total} matched); answered true {answered_ok}, answered with an \
         error without forwarding {answered_err}, never read {unanswered}; drain took {drain_took:?}",
        pool.submits().len()
    );
    assert_eq!(forwarded.len(), pool.submits().len(), "every share the pool received is distinct");
    assert_eq!(forwarded_total, forwarded.len(), "every share the pool received came from a miner's submit");
    assert_eq!(pool.accepted() as usize, forwarded_total);
    assert!(forwarded_total >= before_trigger);
}
