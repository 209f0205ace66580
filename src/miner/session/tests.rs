//! The miner session's unit tests in aggregate mode (local policy), on the genesis block's
//! bytes; passthrough's (relay policy) are in `passthrough/tests.rs`.

use super::*;
use crate::protocol::pool::Notify;
use crate::share;
use crate::upstream::Pool;

/// The genesis block's coinbase, split as a pool with a 4-byte extranonce1 and a 4-byte
/// extranonce2 would send it: the proxy keeps the extranonce2's first 2 bytes as the prefix.
const GENESIS_COINBASE: &str = concat!(
    "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff4d04ffff001d",
    "0104455468652054696d65732030332f4a616e2f32303039204368616e63656c6c6f72206f6e206272696e6b206f",
    "66207365636f6e64206261696c6f757420666f722062616e6b73ffffffff0100f2052a01000000434104678afdb0",
    "fe5548271967f1a67130b7105cd6a828e03909a67962e0ea1f61deb649f6bc3f4cef38c4f35504e51ec112de5c38",
    "4df7ba0b8d578a4c702b6bf11d5fac00000000"
);
const GENESIS_NONCE: u32 = 2083236893;
const GENESIS_NTIME: u32 = 0x495fab29;

struct Genesis {
    /// The pool's extranonce1 and the whole extranonce2 the genesis coinbase holds.
    extranonce1: Vec<u8>,
    extranonce2: Vec<u8>,
    coinb1: Vec<u8>,
    coinb2: Vec<u8>,
}

fn genesis() -> Genesis {
    let bytes = hex::decode(GENESIS_COINBASE).unwrap();
    Genesis {
        coinb1: bytes[..60].to_vec(),
        extranonce1: bytes[60..64].to_vec(),
        extranonce2: bytes[64..68].to_vec(),
        coinb2: bytes[68..].to_vec(),
    }
}

/// A job as a group builds it from the pool's: coinb1 ‖ E1_up, then padding ‖ coinb2.
fn job(seq: u64, epoch: u64, en2_size: usize, pad: usize, upstream_difficulty: f64) -> Arc<Job> {
    let g = genesis();
    let notify = Notify {
        job_id: String::new(),
        prevhash: [0; 32],
        coinb1: [g.coinb1, g.extranonce1].concat(),
        coinb2: [vec![0; pad], g.coinb2].concat(),
        merkle_branch: vec![],
        version: 1,
        nbits: 0x1d00ffff,
        ntime: GENESIS_NTIME,
        clean_jobs: true,
    };
    Arc::new(Job {
        seq,
        epoch,
        upstream_id: format!("up{seq}").into(),
        notify,
        en2_size,
        pad,
        upstream_difficulty,
        upstream_target: target_from_difficulty(upstream_difficulty),
    })
}

fn pool() -> Arc<Pool> {
    Pool::new(&crate::config::PoolConfig { url: "stratum+tcp://127.0.0.1:1".into(), ..Default::default() })
}

fn work(epoch: u64, en2_size: usize, jobs: Vec<Arc<Job>>, mask: Option<u32>) -> Arc<Work> {
    Arc::new(Work { epoch, pool: Some(pool()), en2_size, version_mask: mask, jobs, leaving: false })
}

fn vardiff(start: f64) -> VardiffConfig {
    VardiffConfig {
        start_difficulty: start,
        min_difficulty: 1e-12,
        max_difficulty: 1e12,
        target_shares_per_minute: 20.0,
        retarget_secs: 30.0,
    }
}

/// The shares a step sent to the pool side.
fn forwards(out: &Output) -> Vec<&Forward> {
    out.up.iter().filter_map(|u| if let Up::Share(f) = u { Some(f) } else { None }).collect()
}

fn lines(buf: &[u8]) -> Vec<serde_json::Value> {
    buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect()
}

fn line(s: &mut MinerSession, text: &str) -> Output {
    let mut out = Output::default();
    s.on_miner_line(text.as_bytes(), Instant::now(), &mut out);
    out
}

/// A session with the genesis prefix, subscribed and authorized as "farm.rig1", whose first
/// job (seq 1) went out at difficulty 1.
fn ready(upstream_difficulty: f64) -> (MinerSession, Vec<serde_json::Value>) {
    let prefix = genesis().extranonce2[..2].to_vec();
    let w = work(1, 2, vec![job(1, 1, 2, 0, upstream_difficulty)], None);
    let mut s = MinerSession::local(prefix, w, vardiff(1.0), false, Instant::now());
    let out = line(&mut s, r#"{"id":1,"method":"mining.subscribe","params":["bitaxe/2.4"]}"#);
    let sent = lines(&out.to_miner);
    line(&mut s, r#"{"id":2,"method":"mining.authorize","params":["farm.rig1","x"]}"#);
    (s, sent)
}

fn submit(id: u64, job: &str, en2: &str, nonce: u32) -> String {
    format!(
        r#"{{"id":{id},"method":"mining.submit","params":["farm.rig1","{job}","{en2}","{GENESIS_NTIME:08x}","{nonce:08x}"]}}"#
    )
}

#[test]
fn the_genesis_block_through_a_prefix_reaches_the_pool_as_its_own_extranonce2() {
    let (mut s, sent) = ready(1.0);
    let g = genesis();
    assert_eq!(sent[0]["result"][1], hex::encode(&g.extranonce2[..2]), "the prefix is the extranonce1");
    assert_eq!(sent[0]["result"][2], 2);
    assert_eq!(sent[1]["method"], "mining.set_difficulty");
    assert_eq!(sent[2]["params"][0], "100", "proxy job id: seq 1, tag 0");
    let en2 = hex::encode(&g.extranonce2[2..]);
    let out = line(&mut s, &submit(3, "100", &en2, GENESIS_NONCE));
    assert_eq!(lines(&out.to_miner)[0]["result"], true);
    let Some(Event::ShareValid(v)) = out.events.first() else { panic!("{:?}", out.events) };
    assert!(v.block);
    assert_eq!(share::display_hash(&v.hash), "000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f");
    assert_eq!(forwards(&out).len(), 1);
    let f = forwards(&out)[0];
    assert_eq!(f.extranonce2(), g.extranonce2, "P ‖ en2 is the pool's extranonce2");
    assert_eq!(&*f.job.upstream_id, "up1");
    assert_eq!((f.ntime, f.nonce, f.version_bits), (GENESIS_NTIME, GENESIS_NONCE, None));
    // The same share again is a duplicate, and a miss is low difficulty; neither is forwarded.
    let out = line(&mut s, &submit(4, "100", &en2, GENESIS_NONCE));
    assert_eq!(lines(&out.to_miner)[0]["error"][0], 22);
    let out = line(&mut s, &submit(5, "100", &en2, GENESIS_NONCE + 1));
    assert_eq!(lines(&out.to_miner)[0]["error"][0], 23);
    assert!(forwards(&out).is_empty());
}

#[test]
fn a_block_candidate_below_the_pool_difficulty_is_forwarded() {
    // The genesis hash reaches difficulty ~2536, and nbits 1d00ffff (difficulty 1): a block
    // candidate, though the pool wants more of a share.
    let (mut s, _) = ready(1e6);
    let en2 = hex::encode(&genesis().extranonce2[2..]);
    let out = line(&mut s, &submit(3, "100", &en2, GENESIS_NONCE));
    assert_eq!(lines(&out.to_miner)[0]["result"], true);
    let f = forwards(&out);
    assert_eq!(f.len(), 1, "sent for the block");
    assert!(f[0].block.is_some_and(|b| b.below_share_target));
    // A share that is no block stays local below the pool's difficulty.
    let (mut s, _) = ready(1e6);
    line(&mut s, r#"{"id":3,"method":"mining.suggest_difficulty","params":[1e-12]}"#);
    let out = line(&mut s, &submit(4, "101", &en2, GENESIS_NONCE + 1));
    assert_eq!(lines(&out.to_miner)[0]["result"], true);
    assert!(forwards(&out).is_empty());
}

/// The difficulty a step's valid share was judged at.
fn judged_at(out: &Output) -> f64 {
    match out.events.iter().find(|e| matches!(e, Event::ShareValid(_))) {
        Some(Event::ShareValid(v)) => v.job_difficulty,
        _ => panic!("no valid share in {:?}", out.events),
    }
}

#[test]
fn a_new_difficulty_comes_with_the_job_it_applies_to() {
    let en2 = hex::encode(&genesis().extranonce2[2..]);
    let raise = r#"{"id":3,"method":"mining.suggest_difficulty","params":[2000]}"#;
    let (mut s, _) = ready(1e6);
    let out = line(&mut s, raise);
    let sent = lines(&out.to_miner);
    assert_eq!(sent[0]["result"], true);
    assert_eq!(sent[1]["params"], serde_json::json!([2000.0]));
    assert_eq!((sent[2]["method"].as_str(), sent[2]["params"][0].as_str()), (Some("mining.notify"), Some("101")));
    // The re-send's header differs from the first send's, or firmware that compares headers
    // keeps its work: its ntime moved on by one. A higher difficulty is not clean.
    assert_eq!(sent[2]["params"][7], format!("{:08x}", GENESIS_NTIME + 1));
    assert_eq!(sent[2]["params"][8], false);
    // Each id judges the genesis hash (~2536) at the difficulty it was sent with.
    assert_eq!(judged_at(&line(&mut s, &submit(4, "101", &en2, GENESIS_NONCE))), 2000.0);
    let (mut s, _) = ready(1e6);
    line(&mut s, raise);
    assert_eq!(judged_at(&line(&mut s, &submit(4, "100", &en2, GENESIS_NONCE))), 1.0);
    // A lower difficulty is re-sent clean, and the earlier ids stay live.
    let out = line(&mut s, r#"{"id":5,"method":"mining.suggest_difficulty","params":[0.5]}"#);
    let sent = lines(&out.to_miner);
    assert_eq!(sent[2]["params"][0], "102");
    assert_eq!(sent[2]["params"][7], format!("{:08x}", GENESIS_NTIME + 2));
    assert_eq!(sent[2]["params"][8], true);
    let out = line(&mut s, &submit(6, "101", &en2, GENESIS_NONCE));
    assert_eq!(lines(&out.to_miner)[0]["error"][0], 22, "the same share on another id of its job");
    let other = hex::encode([genesis().extranonce2[2], genesis().extranonce2[3] ^ 1]);
    let out = line(&mut s, &submit(7, "101", &other, GENESIS_NONCE));
    assert_ne!(lines(&out.to_miner)[0]["error"][0], 21, "not stale after the clean re-send");
    // Above the pool's difficulty too: the group asks the pool for its miners' work.
    let (mut s, _) = ready(2.0);
    let out = line(&mut s, r#"{"id":3,"method":"mining.suggest_difficulty","params":[4096]}"#);
    assert_eq!(lines(&out.to_miner)[1]["params"], serde_json::json!([4096.0]));
}

#[test]
fn a_pool_switch_makes_old_jobs_stale_and_sends_a_clean_job() {
    let (mut s, _) = ready(1.0);
    let mut out = Output::default();
    s.on_work(work(2, 2, vec![job(7, 2, 2, 0, 1.0)], None), &mut out);
    let sent = lines(&out.to_miner);
    assert_eq!(sent.len(), 2, "the difficulty, unchanged, goes with the new pool's first job");
    assert_eq!((&sent[0]["method"], &sent[0]["params"]), (&"mining.set_difficulty".into(), &serde_json::json!([1.0])));
    assert_eq!(sent[1]["params"][0], "700");
    assert_eq!(sent[1]["params"][8], true);
    let en2 = hex::encode(&genesis().extranonce2[2..]);
    let out = line(&mut s, &submit(3, "100", &en2, GENESIS_NONCE));
    assert_eq!(lines(&out.to_miner)[0]["error"], serde_json::json!([21, "Job not found (stale)", null]));
    assert!(forwards(&out).is_empty(), "never sent to the new pool");
    let out = line(&mut s, &submit(4, "ffff00", &en2, GENESIS_NONCE));
    assert_eq!(lines(&out.to_miner)[0]["error"], serde_json::json!([21, "Job not found", null]));
}

#[test]
fn no_job_of_a_pool_being_left_goes_out_again() {
    let (mut s, _) = ready(1.0);
    let mut out = Output::default();
    let mut leaving = Work::clone(&work(1, 2, vec![job(1, 1, 2, 0, 1.0)], None));
    leaving.leaving = true;
    s.on_work(Arc::new(leaving), &mut out);
    assert!(out.to_miner.is_empty());
    // A new difficulty waits for the next pool's first job.
    let out = line(&mut s, r#"{"id":3,"method":"mining.suggest_difficulty","params":[8]}"#);
    assert_eq!(lines(&out.to_miner), [serde_json::json!({"id":3,"result":true,"error":null})]);
    let mut out = Output::default();
    s.on_work(work(2, 2, vec![job(7, 2, 2, 0, 1.0)], None), &mut out);
    let sent = lines(&out.to_miner);
    assert_eq!(sent[0]["params"], serde_json::json!([8.0]));
    assert_eq!((&sent[1]["params"][0], &sent[1]["params"][8]), (&"700".into(), &true.into()));
}

#[test]
fn less_extranonce2_means_set_extranonce_or_reconnect() {
    for subscribed in [true, false] {
        let (mut s, _) = ready(1.0);
        if subscribed {
            line(&mut s, r#"{"id":9,"method":"mining.extranonce.subscribe","params":[]}"#);
        }
        let mut out = Output::default();
        s.on_work(work(2, 1, vec![job(8, 2, 1, 0, 1.0)], None), &mut out);
        let sent = lines(&out.to_miner);
        if subscribed {
            assert_eq!(sent[0]["method"], "mining.set_extranonce");
            assert_eq!(sent[0]["params"], serde_json::json!([hex::encode(&genesis().extranonce2[..2]), 1]));
            assert_eq!(sent[1]["method"], "mining.set_difficulty");
            assert_eq!(sent[2]["method"], "mining.notify");
            assert!(matches!(out.events[..], [Event::Difficulty(d)] if d == 1.0), "{:?}", out.events);
        } else {
            assert_eq!(sent, [serde_json::json!({"id":null,"method":"client.reconnect","params":[]})]);
            assert!(matches!(out.events[..], [Event::Close(CloseReason::PoolReconnect)]));
        }
    }
}

#[test]
fn version_rolling_only_inside_what_the_pool_granted() {
    use serde_json::json;
    let configure = r#"{"id":3,"method":"mining.configure","params":[["version-rolling","minimum-difficulty"],{"version-rolling.mask":"ffffffff"}]}"#;
    let set_mask = |out: &Output| {
        lines(&out.to_miner).into_iter().filter(|l| l["method"] == "mining.set_version_mask").collect::<Vec<_>>()
    };
    let on_work = |s: &mut MinerSession, work: Arc<Work>| {
        let mut out = Output::default();
        s.on_work(work, &mut out);
        out
    };
    // The pool granted no mask: no version rolling, and none offered later.
    let (mut s, _) = ready(1.0);
    let out = line(&mut s, configure);
    assert_eq!(lines(&out.to_miner)[0]["result"], json!({"version-rolling": false, "minimum-difficulty": false}));
    assert_eq!(s.version_mask(), None);
    let out = on_work(&mut s, work(1, 2, vec![job(1, 1, 2, 0, 1.0)], Some(0x1fff_ffff)));
    assert!(out.to_miner.is_empty(), "version rolling was never negotiated");
    // The pool granted one: the request cut to it, and cut again to the next pool's.
    let out = line(&mut s, configure);
    assert_eq!(lines(&out.to_miner)[0]["result"]["version-rolling.mask"], "1fffffff");
    let out = on_work(&mut s, work(1, 2, vec![job(1, 1, 2, 0, 1.0)], Some(0x00ff_e000)));
    assert_eq!(set_mask(&out), [json!({"id":null,"method":"mining.set_version_mask","params":["00ffe000"]})]);
    // Between pools nothing changes; a next pool that grants none takes the mask away.
    let gap =
        Arc::new(Work { epoch: 2, pool: None, en2_size: 2, version_mask: None, jobs: Vec::new(), leaving: false });
    assert!(set_mask(&on_work(&mut s, gap)).is_empty());
    let out = on_work(&mut s, work(3, 2, vec![job(2, 3, 2, 0, 1.0)], None));
    assert_eq!(set_mask(&out), [json!({"id":null,"method":"mining.set_version_mask","params":["00000000"]})]);
}

#[test]
fn malformed_twice_in_a_row_closes() {
    let (mut s, _) = ready(1.0);
    let out = line(&mut s, r#"{"id":7,"method":"mining.submit","params":[1]}"#);
    assert_eq!(lines(&out.to_miner)[0]["error"][0], 20);
    assert!(out.events.is_empty());
    let out = line(&mut s, "not json");
    assert!(matches!(out.events[..], [Event::Close(CloseReason::Malformed)]));
}

#[test]
fn only_what_no_honest_miner_sends_counts_as_junk() {
    let en2 = hex::encode(&genesis().extranonce2[2..]);
    let (mut s, _) = ready(1e6);
    // Honest: a share, the same share again (a duplicate), a second worker.
    assert_eq!(line(&mut s, &submit(3, "100", &en2, GENESIS_NONCE)).junk, 0);
    assert_eq!(line(&mut s, &submit(4, "100", &en2, GENESIS_NONCE)).junk, 0);
    assert_eq!(line(&mut s, r#"{"id":5,"method":"mining.authorize","params":["farm.rig2","x"]}"#).junk, 0);
    // Junk: an unknown method, an unknown job, a worker authorized again, a second subscribe,
    // a malformed line, and a submit for a worker never authorized.
    assert_eq!(line(&mut s, r#"{"id":6,"method":"mining.junk","params":[]}"#).junk, 1);
    assert_eq!(line(&mut s, &submit(7, "zz", &en2, GENESIS_NONCE)).junk, 1);
    assert_eq!(line(&mut s, r#"{"id":8,"method":"mining.authorize","params":["farm.rig1","x"]}"#).junk, 1);
    assert_eq!(line(&mut s, r#"{"id":9,"method":"mining.subscribe","params":[]}"#).junk, 1);
    assert_eq!(line(&mut s, "{not json").junk, 1);
    let stranger = r#"{"id":10,"method":"mining.submit","params":["farm.x","100","00","00000000","00000000"]}"#;
    assert_eq!(line(&mut s, stranger).junk, 1);
}
