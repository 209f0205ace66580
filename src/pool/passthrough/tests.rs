//! The passthrough session's unit tests, on real block bytes.

use std::time::Duration;

use super::*;
use crate::config::PoolConfig;
use crate::share;
use crate::submissions::{PoolVerdict, RejectReason};

const EN1: [u8; 4] = [8, 0, 0, 2];
const NTIME: u32 = 0x5c8f_0a1e;
/// Wide enough that one nonce in ~40 meets it, so tests grind in microseconds.
const EASY: f64 = 1e-8;
const PREVHASH: &str = "4d16b6f85af6e2198f44ae2a6de67f78487ae5611b77c6c0440b921e00000000";
const COINB1: &str = "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff20020862062f503253482f04b8864e5008";
const COINB2: &str =
    "072f736c7573682f000000000100f2052a010000001976a914d23fcdf86f7e756a64a7a9688ef9903327048ed988ac00000000";
const BRANCH: [&str; 2] = [
    "3ba3edfd7a7b12b27ac72c3e67768f617fc81bc3888a51323a9fb8aa4b1e5e4a",
    "b1fea52486ce0c62bb442b530a3f0132b826c74e473d1f2c220bfa78111c5082",
];

fn session(template: &str) -> Passthrough {
    let pool = PoolConfig {
        url: "stratum+tcp://127.0.0.1:1".into(),
        user: "acct".into(),
        password: "pw".into(),
        ..PoolConfig::default()
    };
    let pool = crate::upstream::Pool::new(&pool);
    let auth = AuthManager::new(template, Duration::from_secs(3), Duration::from_secs(600));
    Passthrough::new(Arc::new(auth), pool, "10.0.0.1".parse().unwrap())
}

fn lines(buf: &[u8]) -> Vec<serde_json::Value> {
    buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect()
}

fn miner(s: &mut Passthrough, line: &str) -> Output {
    let mut out = Output::default();
    s.on_miner_line(line.as_bytes(), Instant::now(), &mut out);
    out
}

fn pool(s: &mut Passthrough, line: &str) -> Output {
    let mut out = Output::default();
    s.on_pool_line(line.as_bytes(), Instant::now(), &mut out);
    out
}

fn notify(job: &str, clean: bool) -> String {
    format!(
        r#"{{"id":null,"method":"mining.notify","params":["{job}","{PREVHASH}","{COINB1}","{COINB2}",["{}","{}"],"20000000","1d00ffff","{NTIME:08x}",{clean}]}}"#,
        BRANCH[0], BRANCH[1]
    )
}

fn set_difficulty(s: &mut Passthrough, d: f64) {
    pool(s, &format!(r#"{{"id":null,"method":"mining.set_difficulty","params":[{d:e}]}}"#));
}

/// A session past subscribe and authorize (worker "farm.rig1"), with job "j1" at EASY.
fn ready(template: &str) -> Passthrough {
    let mut s = session(template);
    miner(&mut s, r#"{"id":1,"method":"mining.subscribe","params":["bitaxe/2.4"]}"#);
    pool(&mut s, r#"{"id":1,"result":[[["mining.notify","ae68"]],"08000002",4],"error":null}"#);
    miner(&mut s, r#"{"id":2,"method":"mining.authorize","params":["farm.rig1","x"]}"#);
    pool(&mut s, r#"{"id":2,"result":true,"error":null}"#);
    set_difficulty(&mut s, EASY);
    pool(&mut s, &notify("j1", true));
    s
}

fn hash(en2: u32, ntime: u32, nonce: u32, version: u32) -> [u8; 32] {
    let branch: Vec<[u8; 32]> = BRANCH.iter().map(|b| hex::decode(b).unwrap().try_into().unwrap()).collect();
    let cb =
        share::coinbase_hash(&hex::decode(COINB1).unwrap(), &EN1, &en2.to_be_bytes(), &hex::decode(COINB2).unwrap());
    let root = share::merkle_root(cb, &branch);
    let prev: [u8; 32] = hex::decode(PREVHASH).unwrap().try_into().unwrap();
    share::sha256d(&share::header(version, &prev, &root, ntime, 0x1d00ffff, nonce))
}

/// The first nonce from `from` whose share meets `difficulty`, or misses it when `meet` is false.
fn grind(en2: u32, ntime: u32, version: u32, difficulty: f64, meet: bool) -> u32 {
    let target = share::target_from_difficulty(difficulty);
    (0..1_000_000).find(|n| share::meets(&hash(en2, ntime, *n, version), &target) == meet).expect("bounded grind")
}

fn submit(id: u64, job: &str, en2: &str, ntime: u32, nonce: u32, bits: Option<u32>) -> String {
    let bits = bits.map_or(String::new(), |b| format!(r#","{b:08x}""#));
    format!(
        r#"{{"id":{id},"method":"mining.submit","params":["farm.rig1","{job}","{en2}","{ntime:08x}","{nonce:08x}"{bits}]}}"#
    )
}

fn valid_submit(id: u64, en2: u32) -> String {
    submit(id, "j1", &format!("{en2:08x}"), NTIME, grind(en2, NTIME, 0x2000_0000, EASY, true), None)
}

/// The local error a submit gets, asserting nothing went upstream.
fn local_error(s: &mut Passthrough, line: &str) -> (i64, String, RejectReason) {
    let out = miner(s, line);
    assert!(out.to_pool.is_empty(), "a local reject must not reach the pool: {line}");
    let reply = &lines(&out.to_miner)[0];
    let Some(Event::ShareRefused(reason)) = out.events.first() else { panic!("{:?}", out.events) };
    (reply["error"][0].as_i64().unwrap(), reply["error"][1].as_str().unwrap().to_owned(), *reason)
}

fn forwarded(s: &mut Passthrough, line: &str) -> serde_json::Value {
    let out = miner(s, line);
    assert!(out.to_miner.is_empty(), "{:?}", String::from_utf8_lossy(&out.to_miner));
    assert!(out.events.iter().any(|e| matches!(e, Event::ShareValid(_))));
    lines(&out.to_pool).remove(0)
}

#[test]
fn handshake_and_submit_with_remapped_ids() {
    let mut s = session("");
    let out = miner(&mut s, r#"{"id":"sub-1","method":"mining.subscribe","params":["bitaxe/2.4"]}"#);
    let up = lines(&out.to_pool);
    assert_eq!(up[0]["id"], 1);
    assert_eq!(up[0]["params"], serde_json::json!(["bitaxe/2.4"]));
    let out = pool(
        &mut s,
        r#"{"id":1,"result":[[["mining.notify","ae6812eb4cd7735a302a8a9dd95cf71f"]],"08000002",4],"error":null}"#,
    );
    assert_eq!(lines(&out.to_miner)[0]["id"], "sub-1");
    assert_eq!(s.phase(), Phase::Subscribed);
    assert_eq!(s.extranonce(), (&EN1[..], 4));

    let out = miner(&mut s, r#"{"id":2,"method":"mining.authorize","params":["farm.rig1","x"]}"#);
    assert_eq!(lines(&out.to_pool)[0]["params"], serde_json::json!(["farm.rig1", "x"]));
    let out = pool(&mut s, r#"{"id":2,"result":true,"error":null}"#);
    assert!(matches!(&out.events[..], [Event::Authorized(w)] if w == "farm.rig1"));
    assert_eq!(s.phase(), Phase::Authorized);

    set_difficulty(&mut s, EASY);
    pool(&mut s, &notify("j1", true));
    let up = forwarded(&mut s, &valid_submit(2, 7));
    assert_eq!(up["id"], 3);
    let out = pool(&mut s, r#"{"id":3,"result":null,"error":[23,"Low difficulty share",null]}"#);
    assert_eq!(
        lines(&out.to_miner)[0],
        serde_json::json!({"id":2,"result":null,"error":[23,"Low difficulty share",null]})
    );
    assert!(matches!(&out.events[0], Event::PoolVerdict(PoolVerdict::Rejected(RejectReason::LowDifficulty), Some(_))));
    assert_eq!(s.pending(), 0);
}

#[test]
fn template_rewrites_authorize_and_submit() {
    let mut s = session("{pool_user}.{worker}");
    let out = miner(&mut s, r#"{"id":1,"method":"mining.authorize","params":["farm.rig1","secret"]}"#);
    assert_eq!(lines(&out.to_pool)[0]["params"], serde_json::json!(["acct.rig1", "pw"]));
    let mut s = ready("{pool_user}.{worker}");
    let nonce = grind(1, NTIME, 0x2000_0000, EASY, true);
    let up = forwarded(&mut s, &submit(9, "j1", "00000001", NTIME, nonce, None));
    assert_eq!(
        up["params"],
        serde_json::json!(["acct.rig1", "j1", "00000001", format!("{NTIME:08x}"), format!("{nonce:08x}")])
    );
}

#[test]
fn pending_requests_fail_exactly_once_when_the_pool_goes() {
    let mut s = ready("");
    for id in 10..13 {
        forwarded(&mut s, &valid_submit(id, id as u32));
    }
    miner(&mut s, r#"{"id":null,"method":"mining.suggest_difficulty","params":[8]}"#);
    let mut out = Output::default();
    s.on_pool_lost(&mut out);
    let replies = lines(&out.to_miner);
    assert_eq!(replies.iter().map(|r| r["id"].as_u64().unwrap()).collect::<Vec<_>>(), vec![10, 11, 12]);
    assert!(replies.iter().all(|r| r["error"][0] == 20 && r["error"][1] == "upstream unavailable"));
    let unanswered = |e: &&Event| matches!(e, Event::PoolVerdict(PoolVerdict::Unanswered, None));
    assert_eq!(out.events.iter().filter(unanswered).count(), 3);
    assert_eq!(out.close_reason(), Some(CloseReason::UpstreamLost));
    // A late reply from the dead pool finds nothing to answer.
    assert!(pool(&mut s, r#"{"id":3,"result":true,"error":null}"#).to_miner.is_empty());
}

#[test]
fn a_connection_authorizes_at_most_1024_workers() {
    // A downstream proxy puts many workers on one connection: the list they take is bounded.
    let mut s = ready("");
    for i in 2..=1024 {
        let out = miner(&mut s, &format!(r#"{{"id":{i},"method":"mining.authorize","params":["farm.w{i}","x"]}}"#));
        let id = &lines(&out.to_pool)[0]["id"];
        assert!(pool(&mut s, &format!(r#"{{"id":{id},"result":true,"error":null}}"#)).events.len() == 1);
    }
    let out = miner(&mut s, r#"{"id":1025,"method":"mining.authorize","params":["farm.more","x"]}"#);
    assert!(out.to_pool.is_empty(), "never sent to the pool");
    assert_eq!(lines(&out.to_miner)[0]["error"][1], "too many workers on this connection");
}

#[test]
fn malformed_twice_in_a_row_closes() {
    let mut s = session("");
    let out = miner(&mut s, r#"{"id":5,"method":"mining.submit","params":[1]}"#);
    assert_eq!(lines(&out.to_miner)[0]["id"], 5);
    assert_eq!(lines(&out.to_miner)[0]["error"][0], 20);
    assert_eq!(out.close_reason(), None);
    miner(&mut s, r#"{"id":6,"method":"mining.extranonce.subscribe","params":[]}"#);
    assert_eq!(miner(&mut s, "not json").close_reason(), None);
    let out = miner(&mut s, "{\"id\":");
    assert_eq!(lines(&out.to_miner)[0]["id"], serde_json::Value::Null);
    assert_eq!(out.close_reason(), Some(CloseReason::Malformed));
}

#[test]
fn pool_notifications_are_relayed_and_tracked() {
    let mut s = session("");
    let line = notify("j1", true);
    assert_eq!(pool(&mut s, &line).to_miner, format!("{line}\n").into_bytes());
    pool(&mut s, r#"{"id":null,"method":"mining.set_version_mask","params":["1fffe000"]}"#);
    assert_eq!(s.version_mask(), Some(0x1fffe000));
    let out = pool(&mut s, r#"{"id":null,"method":"client.reconnect","params":["evil.example",3333,0]}"#);
    assert!(out.to_miner.is_empty());
    assert_eq!(out.close_reason(), Some(CloseReason::PoolReconnect));
    let out = pool(&mut s, r#"{"id":7,"method":"client.get_version","params":[]}"#);
    assert_eq!(lines(&out.to_pool)[0]["id"], 7);
    // A job that does not parse is not relayed.
    assert!(pool(&mut s, r#"{"id":null,"method":"mining.notify","params":["j2","zz"]}"#).to_miner.is_empty());
}

/// Each hostile pool message is a fault: pending requests get one error, nothing of it reaches
/// the miner, and the session closes.
#[test]
fn hostile_pools_are_faults() {
    let long = "ab".repeat(64 * 1024 + 1);
    let branch = format!("[{}]", vec![format!("\"{}\"", "00".repeat(32)); 33].join(","));
    let notify_with = |i: usize, v: &str| {
        let mut p: Vec<String> = vec![
            "\"j\"".into(),
            format!("\"{PREVHASH}\""),
            format!("\"{COINB1}\""),
            format!("\"{COINB2}\""),
            "[]".into(),
            "\"20000000\"".into(),
            "\"1d00ffff\"".into(),
            "\"5c8f0a1e\"".into(),
            "true".into(),
        ];
        p[i] = v.into();
        format!(r#"{{"id":null,"method":"mining.notify","params":[{}]}}"#, p.join(","))
    };
    let mut cases = vec![
        notify_with(0, "7"),
        notify_with(5, "536870912"),
        notify_with(8, "\"yes\""),
        notify_with(2, &format!("\"{long}\"")),
        notify_with(4, &branch),
        "not json".to_owned(),
    ];
    for d in ["0", "-1", "1e300", "\"NaN\""] {
        cases.push(format!(r#"{{"id":null,"method":"mining.set_difficulty","params":[{d}]}}"#));
    }
    for size in ["0", "-4", "17"] {
        cases.push(format!(r#"{{"id":null,"method":"mining.set_extranonce","params":["08000002",{size}]}}"#));
    }
    for line in cases {
        let mut s = ready("");
        forwarded(&mut s, &valid_submit(30, 1));
        let out = pool(&mut s, &line);
        assert!(matches!(out.events.first(), Some(Event::PoolVerdict(PoolVerdict::Unanswered, _))), "{line:.100}");
        assert!(out.events.iter().any(|e| matches!(e, Event::PoolFault(_))), "{line:.100}");
        assert_eq!(out.close_reason(), Some(CloseReason::PoolFault));
        let replies = lines(&out.to_miner);
        assert_eq!(replies.len(), 1, "only the pending submit's error: {line:.100}");
        assert_eq!(replies[0]["error"], serde_json::json!([20, "upstream unavailable", null]));
    }
    // A subscribe reply whose extranonce2_size miners cannot use.
    for size in ["0", "-1", "17", "\"4\""] {
        let mut s = session("");
        miner(&mut s, r#"{"id":"s","method":"mining.subscribe","params":[]}"#);
        let out = pool(&mut s, &format!(r#"{{"id":1,"result":[[],"08000002",{size}],"error":null}}"#));
        assert_eq!(out.close_reason(), Some(CloseReason::PoolFault), "{size}");
        assert_eq!(
            lines(&out.to_miner)[0],
            serde_json::json!({"id":"s","result":null,"error":[20,"upstream unavailable",null]})
        );
    }
}

#[tokio::test(start_paused = true)]
async fn failed_authorizes_back_off_without_reaching_the_pool() {
    let mut s = session("");
    miner(&mut s, r#"{"id":1,"method":"mining.authorize","params":["farm.rig1","bad"]}"#);
    pool(&mut s, r#"{"id":1,"result":false,"error":[24,"Unauthorized worker",null]}"#);
    let out = miner(&mut s, r#"{"id":2,"method":"mining.authorize","params":["farm.rig1","bad"]}"#);
    assert!(out.to_pool.is_empty());
    assert_eq!(
        lines(&out.to_miner)[0]["error"],
        serde_json::json!([24, "too many failed authorizations; retry in 3 s", null])
    );
    tokio::time::advance(Duration::from_secs(3)).await;
    let out = miner(&mut s, r#"{"id":3,"method":"mining.authorize","params":["farm.rig1","good"]}"#);
    assert_eq!(lines(&out.to_pool)[0]["method"], "mining.authorize");
}

/// Only `false` or error 24 is the miner's failure: another worker at the address, and the same
/// worker after the pool's own error, go to the pool at once.
#[test]
fn a_pool_error_on_authorize_backs_no_one_off() {
    let forwarded = |out: &Output| lines(&out.to_pool).first().is_some_and(|l| l["method"] == "mining.authorize");
    let mut s = session("");
    miner(&mut s, r#"{"id":1,"method":"mining.authorize","params":["farm.rig1","x"]}"#);
    let out = pool(&mut s, r#"{"id":1,"result":null,"error":[20,"Internal error",null]}"#);
    assert_eq!(lines(&out.to_miner)[0]["error"][0], 20, "relayed as the pool sent it");
    assert!(forwarded(&miner(&mut s, r#"{"id":2,"method":"mining.authorize","params":["farm.rig1","x"]}"#)));
    pool(&mut s, r#"{"id":2,"result":false,"error":null}"#);
    let out = miner(&mut s, r#"{"id":3,"method":"mining.authorize","params":["farm.rig1","x"]}"#);
    assert!(!forwarded(&out), "a bare false is a refusal");
    assert!(forwarded(&miner(&mut s, r#"{"id":4,"method":"mining.authorize","params":["farm.rig2","x"]}"#)));
}

#[test]
fn configure_reply_records_the_mask() {
    let mut s = session("");
    miner(
        &mut s,
        r#"{"id":1,"method":"mining.configure","params":[["version-rolling"],{"version-rolling.mask":"1fffe000","version-rolling.min-bit-count":2}]}"#,
    );
    let out =
        pool(&mut s, r#"{"id":1,"result":{"version-rolling":true,"version-rolling.mask":"1fffe000"},"error":null}"#);
    assert_eq!(lines(&out.to_miner)[0]["result"]["version-rolling.mask"], "1fffe000");
    assert_eq!(s.version_mask(), Some(0x1fffe000));
}

#[test]
fn in_flight_is_bounded() {
    let mut s = ready("");
    for i in 0..MAX_IN_FLIGHT as u64 + 5 {
        let out = miner(&mut s, &valid_submit(i, i as u32));
        if i >= MAX_IN_FLIGHT as u64 {
            assert!(out.to_pool.is_empty());
            assert_eq!(lines(&out.to_miner)[0]["error"][0], 20);
        }
    }
    assert_eq!(s.pending(), MAX_IN_FLIGHT);
}

#[test]
fn submit_before_subscribe_or_authorize() {
    let mut s = session("");
    assert_eq!(local_error(&mut s, &valid_submit(1, 1)).0, code::NOT_SUBSCRIBED);
    // A worker authorized without a subscribe does not make the session subscribed.
    miner(&mut s, r#"{"id":9,"method":"mining.authorize","params":["farm.rig1","x"]}"#);
    pool(&mut s, r#"{"id":1,"result":true,"error":null}"#);
    assert_eq!(s.phase(), Phase::Connected);
    assert_eq!(local_error(&mut s, &valid_submit(1, 1)).0, code::NOT_SUBSCRIBED);
    let mut s = session("");
    miner(&mut s, r#"{"id":1,"method":"mining.subscribe","params":[]}"#);
    pool(&mut s, r#"{"id":1,"result":[[],"08000002",4],"error":null}"#);
    assert_eq!(local_error(&mut s, &valid_submit(2, 1)).0, code::UNAUTHORIZED);
    // A worker the pool refused is not authorized either.
    miner(&mut s, r#"{"id":2,"method":"mining.authorize","params":["farm.rig1","x"]}"#);
    pool(&mut s, r#"{"id":2,"result":false,"error":[24,"Unauthorized worker",null]}"#);
    assert_eq!(local_error(&mut s, &valid_submit(3, 1)).2, RejectReason::Unauthorized);
}

#[test]
fn worker_must_be_authorized_on_this_connection() {
    let mut s = ready("");
    let line = valid_submit(4, 1).replace("farm.rig1", "farm.rig2");
    assert_eq!(local_error(&mut s, &line), (24, "Unauthorized worker".into(), RejectReason::Unauthorized));
}

#[test]
fn unknown_and_stale_jobs() {
    let mut s = ready("");
    let (code, _, reason) = local_error(&mut s, &submit(5, "nope", "00000001", NTIME, 0, None));
    assert_eq!((code, reason), (21, RejectReason::BadJob));
    // A share sent before the clean job reached the miner goes to the pool, which judges it.
    pool(&mut s, &notify("j2", true));
    assert_eq!(forwarded(&mut s, &valid_submit(6, 1))["params"][1], "j1");
    // Two clean jobs later it is stale here.
    pool(&mut s, &notify("j3", true));
    let (code, _, reason) = local_error(&mut s, &valid_submit(7, 2));
    assert_eq!((code, reason), (21, RejectReason::Stale));
}

#[test]
fn a_new_extranonce1_retires_the_jobs_before_it() {
    let mut s = ready("");
    pool(&mut s, r#"{"id":null,"method":"mining.set_extranonce","params":["08000003",4]}"#);
    let (code, _, reason) = local_error(&mut s, &valid_submit(6, 1));
    assert_eq!((code, reason), (21, RejectReason::Stale), "hashed with the old extranonce1");
}

#[test]
fn field_widths_and_hex() {
    let mut s = ready("");
    for (en2, ntime, nonce, bits, field) in [
        ("000001", "5c8f0a1e", "00000000", None, "extranonce2"),
        ("0000000001", "5c8f0a1e", "00000000", None, "extranonce2"),
        ("0000000g", "5c8f0a1e", "00000000", None, "extranonce2"),
        ("00000001", "5c8f0a1", "00000000", None, "ntime"),
        ("00000001", "0x8f0a1e", "00000000", None, "ntime"),
        ("00000001", "5c8f0a1e", "0000000", None, "nonce"),
        ("00000001", "5c8f0a1e", "0000000z", None, "nonce"),
        ("00000001", "5c8f0a1e", "00000000", Some("2000"), "version bits"),
    ] {
        let bits = bits.map_or(String::new(), |b| format!(r#","{b}""#));
        let line = format!(
            r#"{{"id":7,"method":"mining.submit","params":["farm.rig1","j1","{en2}","{ntime}","{nonce}"{bits}]}}"#
        );
        let (code, message, reason) = local_error(&mut s, &line);
        assert_eq!((code, reason), (20, RejectReason::Malformed), "{line}");
        assert!(message.starts_with(field), "{message} names {field}");
    }
}

#[test]
fn ntime_window_boundaries() {
    let mut s = ready("");
    for (ntime, ok) in [(NTIME - 1, false), (NTIME, true), (NTIME + 7000, true), (NTIME + 7001, false)] {
        let line = submit(8, "j1", "00000005", ntime, grind(5, ntime, 0x2000_0000, EASY, true), None);
        if ok {
            forwarded(&mut s, &line);
        } else {
            assert_eq!(local_error(&mut s, &line).1, "ntime out of range", "{ntime}");
        }
    }
}

#[test]
fn version_bits_inside_the_mask() {
    let mut s = ready("");
    // No mask negotiated: no bits may roll.
    assert_eq!(local_error(&mut s, &submit(9, "j1", "00000001", NTIME, 0, Some(0x2000))).0, 20);
    pool(&mut s, r#"{"id":null,"method":"mining.set_version_mask","params":["1fffe000"]}"#);
    let bits = 0x0000_e000;
    let nonce = grind(1, NTIME, 0x2000_e000, EASY, true);
    forwarded(&mut s, &submit(10, "j1", "00000001", NTIME, nonce, Some(bits)));
    let (_, message, _) = local_error(&mut s, &submit(11, "j1", "00000001", NTIME, nonce, Some(0x0000_1000)));
    assert_eq!(message, "version bits outside the negotiated mask");
}

#[test]
fn duplicates_are_judged_on_decoded_bytes() {
    let mut s = ready("");
    let nonce = grind(0xabcdef01, NTIME, 0x2000_0000, EASY, true);
    forwarded(&mut s, &submit(12, "j1", "abcdef01", NTIME, nonce, None));
    let upper =
        submit(13, "j1", "ABCDEF01", NTIME, nonce, None).replace(&format!("{nonce:08x}"), &format!("{nonce:08X}"));
    assert_eq!(local_error(&mut s, &upper), (22, "Duplicate share".into(), RejectReason::Duplicate));
    // The same share on a new job is not a duplicate of the old one.
    pool(&mut s, &notify("j1", true));
    forwarded(&mut s, &submit(14, "j1", "abcdef01", NTIME, nonce, None));
}

#[test]
fn low_difficulty_and_difficulty_bound_to_the_next_job() {
    let mut s = ready("");
    let miss = grind(3, NTIME, 0x2000_0000, EASY, false);
    assert_eq!(
        local_error(&mut s, &submit(15, "j1", "00000003", NTIME, miss, None)),
        (23, "Low difficulty share".into(), RejectReason::LowDifficulty)
    );
    // A harder difficulty applies from the next job only: j1 keeps EASY.
    set_difficulty(&mut s, 1.0);
    forwarded(&mut s, &valid_submit(16, 4));
    pool(&mut s, &notify("j2", false));
    let nonce = grind(4, NTIME, 0x2000_0000, EASY, true);
    let (code, _, reason) = local_error(&mut s, &submit(17, "j2", "00000004", NTIME, nonce, None));
    assert_eq!((code, reason), (23, RejectReason::LowDifficulty));
    assert_eq!(s.difficulty(), 1.0);
}

/// The genesis block replayed as a Stratum job: its share is a block candidate.
#[test]
fn block_candidates_are_flagged() {
    let coinbase = concat!(
        "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff4d04ffff001d",
        "0104455468652054696d65732030332f4a616e2f32303039204368616e63656c6c6f72206f6e206272696e6b206f",
        "66207365636f6e64206261696c6f757420666f722062616e6b73ffffffff0100f2052a01000000434104678afdb0",
        "fe5548271967f1a67130b7105cd6a828e03909a67962e0ea1f61deb649f6bc3f4cef38c4f35504e51ec112de5c38",
        "4df7ba0b8d578a4c702b6bf11d5fac00000000"
    );
    let (coinb1, rest) = coinbase.split_at(120);
    let (en1, rest) = rest.split_at(8);
    let (en2, coinb2) = rest.split_at(8);
    let mut s = session("");
    miner(&mut s, r#"{"id":1,"method":"mining.subscribe","params":[]}"#);
    pool(&mut s, &format!(r#"{{"id":1,"result":[[],"{en1}",4],"error":null}}"#));
    miner(&mut s, r#"{"id":2,"method":"mining.authorize","params":["farm.rig1","x"]}"#);
    pool(&mut s, r#"{"id":2,"result":true,"error":null}"#);
    let zero = "0".repeat(64);
    pool(
        &mut s,
        &format!(
            r#"{{"id":null,"method":"mining.notify","params":["g","{zero}","{coinb1}","{coinb2}",[],"00000001","1d00ffff","495fab29",true]}}"#
        ),
    );
    let out = miner(&mut s, &submit(3, "g", en2, 0x495fab29, 2083236893, None));
    let Some(Event::ShareValid(v)) = out.events.first() else { panic!("{:?}", out.events) };
    assert!(v.block);
    assert_eq!(share::display_hash(&v.hash), "000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f");
    assert_eq!(lines(&out.to_pool)[0]["params"][2], en2);
    // The next nonce is an ordinary share at difficulty 1, not a block.
    let out = miner(&mut s, &submit(4, "g", en2, 0x495fab29, 2083236894, None));
    assert!(out.to_pool.is_empty());
}

#[test]
fn a_pool_slow_to_answer_gets_errors_sent_for_it_and_a_share_left_unanswered_ends_the_session() {
    let timeout = Duration::from_secs(10);
    let mut s = ready("");
    let sent = Instant::now();
    // ckpool answers no second authorize on one connection: the miner gets an error, and mines on.
    miner(&mut s, r#"{"id":3,"method":"mining.authorize","params":["farm.rig2","x"]}"#);
    assert!(s.oldest_waiting().is_some_and(|t| t >= sent), "the authorize waits");
    let mut out = Output::default();
    s.on_answer_timeout(sent + timeout / 2, timeout, &mut out);
    assert!(out.to_miner.is_empty(), "not yet");
    s.on_answer_timeout(sent + timeout * 2, timeout, &mut out);
    assert_eq!(
        lines(&out.to_miner),
        [serde_json::json!({"id":3,"result":null,"error":[20,"no answer from the pool",null]})]
    );
    assert!(out.events.is_empty(), "the session goes on");
    assert_eq!((s.pending(), s.oldest_waiting()), (0, None));
    // A share the pool leaves unanswered: it is hung, and the session ends as after a fault.
    forwarded(&mut s, &valid_submit(4, 1));
    let mut out = Output::default();
    s.on_answer_timeout(Instant::now() + timeout, timeout, &mut out);
    assert_eq!(lines(&out.to_miner)[0]["id"], 4);
    assert_eq!(lines(&out.to_miner)[0]["error"][0], 20);
    assert!(
        matches!(
            out.events[..],
            [
                Event::PoolVerdict(PoolVerdict::Unanswered, None),
                Event::PoolFault("no answer within upstream.submit_timeout"),
                Event::Close(CloseReason::PoolFault)
            ]
        ),
        "{:?}",
        out.events
    );
}
