//! A drain under load, in both modes: 200 miners keep submitting while the proxy shuts down.
//! Every submit the proxy read and forwarded is answered exactly once; a submit it never forwarded
//! is answered at most once, and only with an error; and `Server::run` returns. Every share a
//! miner was told is accepted reaches the pool and is answered before the proxy stops: in
//! passthrough that is the pool's verdict relayed, in aggregate mode the proxy's own, given at once.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use loka_stratum::config::Mode;
use serde_json::Value;
use support::*;

const MINERS: usize = 200;
/// Submits each miner sends at once, before the trickle.
const BURST: usize = 5;
/// The gap between a miner's later submits.
const TRICKLE: Duration = Duration::from_millis(25);
const POOL_DELAY: Duration = Duration::from_millis(200);

/// What identifies a share on both sides of the proxy, unique across miners: in passthrough the
/// job id (unique per pool connection), extranonce2 and nonce; in aggregate mode the pool sees the
/// proxy's job ids and the miner's extranonce1 (its prefix, unique per miner) before its
/// extranonce2, so the key is that extranonce2 and the nonce.
type ShareKey = (String, String, String);

fn miner_key(mode: Mode, miner: &SimMiner, share: &Share) -> ShareKey {
    match mode {
        Mode::Passthrough => (share.job_id.clone(), share.extranonce2.clone(), share.nonce.clone()),
        Mode::Aggregate => {
            (String::new(), format!("{}{}", hex::encode(&miner.extranonce1), share.extranonce2), share.nonce.clone())
        }
    }
}

/// The key of a `mining.submit` the pool received.
fn pool_key(mode: Mode, submit: &Value) -> ShareKey {
    let field = |i: usize| submit["params"][i].as_str().expect("submit params are strings").to_owned();
    match mode {
        Mode::Passthrough => (field(1), field(2), field(4)),
        Mode::Aggregate => (String::new(), field(2), field(4)),
    }
}

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
    mode: Mode,
    mut miner: SimMiner,
    worker: String,
    offset: Duration,
    stop: Arc<AtomicBool>,
) -> MinerRun {
    let mut sent = Vec::new();
    let mut submit = async |miner: &mut SimMiner| {
        let share = miner.any_share();
        let id = miner.submit(&worker, &share).await;
        sent.push((id, miner_key(mode, miner, &share)));
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

in_both_modes!(
    tokio::test(flavor = "multi_thread", worker_threads = 2),
    drain_with_200_miners_submitting_answers_each_submit_once_and_forwards_every_accepted_share
);
async fn drain_with_200_miners_submitting_answers_each_submit_once_and_forwards_every_accepted_share(mode: Mode) {
    // At difficulty 1e-12 for both the pool and aggregated miners, every share the proxy accepts
    // is one the pool wants: each must reach it.
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut proxy = spawn_proxy(mode_config(mode, pool.addr)).await;
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
            tokio::spawn(submit_until_stopped(mode, miner, format!("w{i}"), offset, stop.clone()))
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
    // The admin port is gone once the proxy has stopped: counts come from the process's recorder.
    let label = pool.label();
    let count = |text: &str, name: &str, labels: &[(&str, &str)]| metric(text, name, labels).unwrap_or(0.0) as u64;
    let answered = |text: &str| count(text, "loka_upstream_shares_total", &[("pool", &label), ("result", "accepted")]);
    let at_trigger = (pool.submits().len(), answered(&loka_stratum::metrics::install().render()));
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

    let forwarded: HashSet<ShareKey> = pool.submits().iter().map(|s| pool_key(mode, s)).collect();
    let (mut sent_total, mut forwarded_total, mut answered_ok, mut answered_err, mut unanswered) = (0, 0, 0, 0, 0);
    let mut told_accepted = 0;
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
            told_accepted += usize::from(got[0]["result"] == Value::Bool(true));
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
                // In aggregate mode too: a share told `true` that never reached the pool fails here.
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

    let text = loka_stratum::metrics::install().render();
    let accepted_here = count(&text, "loka_shares_accepted_total", &[("pool", &label)]);
    let submitted = count(&text, "loka_shares_submitted_total", &[("pool", &label)]);
    let upstream = |result: &str| count(&text, "loka_upstream_shares_total", &[("pool", &label), ("result", result)]);
    let dropped =
        upstream("dropped") + count(&text, "loka_upstream_shares_total", &[("pool", "none"), ("result", "dropped")]);
    eprintln!(
        "drain_load ({mode:?}): {MINERS} miners sent {sent_total} submits; pool had {at_trigger:?} (received, \
         answered) at the trigger, {} / {} at the end ({forwarded_total} matched); answered true {answered_ok}, \
         answered with an error without forwarding {answered_err}, never read {unanswered}; forwarded \
         {submitted}, accepted here {accepted_here}, unanswered {}, dropped {dropped}; drain took {drain_took:?}",
        pool.submits().len(),
        pool.accepted(),
        upstream("unanswered"),
    );
    assert_eq!(forwarded.len(), pool.submits().len(), "every share the pool received is distinct");
    assert_eq!(forwarded_total, forwarded.len(), "every share the pool received came from a miner's submit");
    assert_eq!(pool.accepted() as usize, forwarded_total, "the pool answered each forwarded share");
    assert!(forwarded_total >= before_trigger);
    assert!(answered(&text) > at_trigger.1 as u64, "answers came in during the drain");
    assert_eq!(pool.submits().len() as u64, submitted, "the pool received each forwarded share");
    assert_eq!(upstream("accepted"), submitted, "and the proxy heard each answer");
    assert_eq!((upstream("unanswered"), dropped), (0, 0), "nothing was left unsent or unanswered");
    assert_eq!(accepted_here, submitted, "every share accepted here was forwarded");
    assert_eq!(told_accepted as u64, accepted_here, "every share a miner was told is accepted is counted");
}
