//! Fuzz logic shared by the cargo-fuzz targets in `fuzz_targets/` and the stable replay test
//! `tests/fuzz_replay.rs`, which includes this file as a module. Each entry point takes the raw
//! fuzz input and panics when an invariant breaks; it depends only on `loka_stratum` and the
//! crates the proxy itself depends on, so both builds can compile it.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use loka_stratum::auth::AuthManager;
use loka_stratum::codec::LineCodec;
use loka_stratum::config::PoolConfig;
use loka_stratum::passthrough::Passthrough as Session;
use loka_stratum::protocol::miner::{self, Call, MinerMessage};
use loka_stratum::protocol::pool::{self, PoolMessage};
use loka_stratum::protocol::{verdict, write, Id};
use loka_stratum::session::{Event, Output};
use loka_stratum::upstream::Pool;
use serde_json::value::RawValue;
use tokio::time::Instant;
use tokio_util::codec::Decoder;

// ---------------------------------------------------------------------------------------------
// Line codec
// ---------------------------------------------------------------------------------------------

/// Input: one byte for the line cap, one byte seeding the chunk sizes, then the byte stream.
///
/// The stream is fed to [`LineCodec`] in chunks and the lines it yields are compared with a
/// one-pass reference splitter: chunking must never change which lines come out or whether the
/// cap is hit, every line is at most the cap, has no `\n`, and is not blank.
pub fn line_codec(data: &[u8]) {
    let [cap, seed, stream @ ..] = data else { return };
    let cap = usize::from(*cap);
    let expected = reference_lines(stream, cap);

    let mut codec = LineCodec::new(cap);
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut failed = false;
    let mut rest = stream;
    let mut x = u64::from(*seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    'feed: while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = match x % 4 {
            0 => 1,
            1 => 1 + (x >> 8) as usize % 8,
            2 => 1 + (x >> 8) as usize % 64,
            _ => 1 + (x >> 8) as usize % 1024,
        };
        let (chunk, tail) = rest.split_at(len.min(rest.len()));
        rest = tail;
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(line)) => got.push(checked_line(line, cap)),
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break 'feed;
                }
            }
        }
    }
    while !failed {
        match codec.decode_eof(&mut buf) {
            Ok(Some(line)) => got.push(checked_line(line, cap)),
            Ok(None) => break,
            Err(_) => failed = true,
        }
    }
    assert_eq!((got, failed), expected, "cap {cap}, stream {:?}", String::from_utf8_lossy(stream));
}

fn checked_line(line: BytesMut, cap: usize) -> Vec<u8> {
    assert!(line.len() <= cap, "a line of {} bytes passed a cap of {cap}", line.len());
    assert!(!line.contains(&b'\n'), "a line holds a newline: {line:?}");
    assert!(!line.iter().all(u8::is_ascii_whitespace), "a blank line was returned: {line:?}");
    line.to_vec()
}

/// What the codec must yield for the whole stream: the lines before the first one over the cap
/// (or an unterminated tail longer than cap + 1, which may still end in the `\r` of a `\r\n`),
/// and whether the cap was hit.
fn reference_lines(stream: &[u8], cap: usize) -> (Vec<Vec<u8>>, bool) {
    let mut lines = Vec::new();
    let mut rest = stream;
    while let Some(pos) = rest.iter().position(|b| *b == b'\n') {
        let mut line = &rest[..pos];
        rest = &rest[pos + 1..];
        if let Some(stripped) = line.strip_suffix(b"\r") {
            line = stripped;
        }
        if line.len() > cap {
            return (lines, true);
        }
        if !line.iter().all(u8::is_ascii_whitespace) {
            lines.push(line.to_vec());
        }
    }
    (lines, rest.len() > cap + 1)
}

// ---------------------------------------------------------------------------------------------
// Message parsers
// ---------------------------------------------------------------------------------------------

/// Is `bytes` one JSON value? Numbers are not range-checked: `1e400` is valid JSON text.
fn is_json(bytes: &[u8]) -> bool {
    serde_json::from_slice::<&RawValue>(bytes).is_ok()
}

/// Every line in `buf` ends with `\n` and is one JSON value.
fn assert_json_lines(buf: &[u8], what: &str) {
    if buf.is_empty() {
        return;
    }
    assert_eq!(buf.last(), Some(&b'\n'), "{what} does not end with a newline");
    for line in buf[..buf.len() - 1].split(|b| *b == b'\n') {
        assert!(is_json(line), "{what} is not JSON: {:?}", String::from_utf8_lossy(line));
    }
}

/// An id is echoed byte for byte, and the reply that carries it is valid JSON.
fn check_id(id: &Id) {
    let mut buf = Vec::new();
    write::error(&mut buf, id, 20, "fuzz \"reply\"\n");
    assert!(buf.starts_with(format!("{{\"id\":{},", id.as_json()).as_bytes()));
    assert_json_lines(&buf, "an error reply");
    let first = id.as_json().as_bytes().first().copied();
    assert!(matches!(first, Some(b'"' | b'-' | b'0'..=b'9' | b'n')), "bad id {id:?}");
}

/// Any bytes through [`miner::parse`]: no panic; the id, when there is one, makes a valid reply;
/// a relayed request is valid JSON.
pub fn miner_message(data: &[u8]) {
    match miner::parse(data) {
        Ok(MinerMessage::Request(r)) => {
            check_id(&r.id);
            let mut up = Vec::new();
            write::request_raw(&mut up, 1, &r.method, r.params);
            assert_json_lines(&up, "a relayed request");
            if let Some(params) = r.params {
                if matches!(r.call, Call::Unknown) {
                    let p = params.get();
                    assert!(p.starts_with('[') || p == "null", "unknown method relayed with params {p}");
                }
            }
            if let Call::Submit(s) = &r.call {
                assert!(s.version_bits.is_some() || !r.params.map_or("", RawValue::get).is_empty());
            }
        }
        Ok(MinerMessage::Response { id }) => check_id(&id),
        Err(e) => {
            if let Some(id) = &e.id {
                check_id(id);
            }
            let _ = e.to_string();
        }
    }
}

/// Any bytes through [`pool::parse`]: no panic; every decoded value is inside the bounds the
/// parser promises, and a notify survives a write/parse round trip unchanged.
pub fn pool_message(data: &[u8]) {
    let Ok(message) = pool::parse(data) else { return };
    match message {
        PoolMessage::Notify(n) => {
            assert!(!n.job_id.is_empty() && n.job_id.len() <= 128);
            assert!(n.merkle_branch.len() <= pool::MAX_MERKLE_BRANCH);
            assert!(n.coinb1.len() <= pool::MAX_COINBASE_PART && n.coinb2.len() <= pool::MAX_COINBASE_PART);
            let mut buf = Vec::new();
            n.write(&mut buf);
            assert_json_lines(&buf, "a written notify");
            let Ok(PoolMessage::Notify(again)) = pool::parse(&buf[..buf.len() - 1]) else {
                panic!("a written notify does not parse: {}", String::from_utf8_lossy(&buf));
            };
            assert_eq!(again, n);
        }
        PoolMessage::SetDifficulty(d) => assert!(d.is_finite() && d > 0.0, "difficulty {d}"),
        PoolMessage::SetExtranonce { extranonce1, extranonce2_size } => {
            assert!(extranonce1.len() <= pool::MAX_EXTRANONCE1_SIZE);
            assert!((1..=pool::MAX_EXTRANONCE2_SIZE).contains(&extranonce2_size));
        }
        PoolMessage::Reconnect { port, wait, .. } => {
            assert_ne!(port, Some(0));
            assert!(wait <= 3600);
        }
        PoolMessage::Response { id, result, error } => {
            check_id(&id);
            let _ = verdict(result, error);
            if let Some(result) = result {
                if let Some(sub) = pool::parse_subscribe_result(result) {
                    assert!(sub.extranonce1.len() <= pool::MAX_EXTRANONCE1_SIZE);
                    assert!((1..=pool::MAX_EXTRANONCE2_SIZE).contains(&sub.extranonce2_size));
                }
                let _ = pool::parse_configure_result(result);
            }
        }
        PoolMessage::GetVersion { id } => check_id(&id),
        PoolMessage::SetVersionMask(_) | PoolMessage::ShowMessage(_) | PoolMessage::Unknown { .. } => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Session
// ---------------------------------------------------------------------------------------------

const WORKERS: [&str; 4] = ["farm.rig1", "farm.rig2", "rig3", "farm.rig1.b"];
/// The first four are the jobs the pool may announce; the last never is.
const JOBS: [&str; 5] = ["j0", "j1", "4f3a", "ffffffff", "never"];
const MASKS: [u32; 5] = [0x1fff_e000, 0x1fff_ffe0, 0xffff_ffff, 0, 0x0000_e000];
const VERSIONS: [u32; 3] = [0x2000_0000, 0x2000_0004, 0x3fff_ffff];
const BASE_NTIME: u32 = 0x5c8f_0a1e;
const PREVHASH: &str = "4d16b6f85af6e2198f44ae2a6de67f78487ae5611b77c6c0440b921e00000000";
const COINB1: &str =
    "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff20020862062f503253482f04b8864e5008";
const COINB2: &str =
    "072f736c7573682f000000000100f2052a010000001976a914d23fcdf86f7e756a64a7a9688ef9903327048ed988ac00000000";
const BRANCH: &str = "3ba3edfd7a7b12b27ac72c3e67768f617fc81bc3888a51323a9fb8aa4b1e5e4a";
const MAX_STEPS: usize = 512;

/// What a run exercised, so a test can check the generator reaches deep states.
#[derive(Debug, Default, Clone, Copy)]
pub struct SessionStats {
    pub steps: usize,
    pub forwarded_submits: usize,
    pub local_rejects: usize,
}

/// The fuzz input, read as small numbers; zeros once it runs out.
struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Input<'_> {
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn pick<'t, T>(&mut self, items: &'t [T]) -> &'t T {
        &items[usize::from(self.u8()) % items.len()]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }

    /// A line of up to 255 bytes, as the codec would hand it over: no `\n`, not blank.
    fn line(&mut self) -> Option<Vec<u8>> {
        let n = usize::from(self.u8());
        let end = (self.pos + n).min(self.data.len());
        let line: Vec<u8> = self.data[self.pos.min(end)..end].iter().copied().filter(|b| *b != b'\n').collect();
        self.pos += n;
        (!line.iter().all(u8::is_ascii_whitespace)).then_some(line)
    }
}

#[derive(Debug, Clone)]
enum Req {
    Subscribe,
    Authorize(String),
    Configure,
    Other,
}

/// A forwarded share, decoded: job generation, extranonce1, extranonce2, ntime, nonce, version.
type ShareKey = (u64, Vec<u8>, Vec<u8>, u32, u32, u32);

#[derive(Debug, Clone, Copy)]
struct LiveJob {
    generation: u64,
    ntime: u32,
    version: u32,
}

/// The oracle: what the session may know, from the lines fed to it. It stays on the permissive
/// side (it never evicts jobs for age), so every forwarded submit must pass it.
#[derive(Debug, Default)]
struct Oracle {
    /// Requests the session sent upstream and the fuzzer has not answered yet, oldest first.
    pending: Vec<(u64, Req)>,
    extranonce1: Vec<u8>,
    extranonce2_size: usize,
    mask: u32,
    authorized: HashSet<String>,
    jobs: HashMap<String, LiveJob>,
    generations: u64,
    forwarded: HashSet<ShareKey>,
    next_miner_id: u64,
    /// The fields of the last submit generated: worker, job, extranonce2, ntime, nonce, version bits.
    last_submit: Option<[String; 6]>,
}

/// A request line the session wrote upstream: `(id, method, params)`; `None` for replies.
fn upstream_request(line: &[u8]) -> Option<(u64, String, &RawValue)> {
    let map: HashMap<String, &RawValue> =
        serde_json::from_slice(line).unwrap_or_else(|e| panic!("upstream line {line:?} is not an object: {e}"));
    let method: String = serde_json::from_str(map.get("method")?.get()).expect("method is a string");
    let id = map.get("id").and_then(|id| id.get().parse::<u64>().ok());
    let id = id.unwrap_or_else(|| panic!("upstream request without a numeric id: {}", String::from_utf8_lossy(line)));
    let params = map.get("params").copied().unwrap_or_else(|| panic!("request without params"));
    Some((id, method, params))
}

/// The string params of a miner line the session accepted.
fn miner_params(line: &[u8]) -> Vec<String> {
    let map: HashMap<String, &RawValue> = serde_json::from_slice(line).expect("a forwarded miner line is an object");
    let params: Vec<&RawValue> = serde_json::from_str(map["params"].get()).expect("params are an array");
    params.iter().map(|p| serde_json::from_str::<String>(p.get()).unwrap_or_default()).collect()
}

fn hex_u32(s: &str) -> u32 {
    assert_eq!(s.len(), 8, "a forwarded 4-byte field is not 8 hex characters: {s:?}");
    u32::from_str_radix(s, 16).unwrap_or_else(|_| panic!("a forwarded field is not hex: {s:?}"))
}

impl Oracle {
    fn miner_id(&mut self) -> u64 {
        self.next_miner_id += 1;
        self.next_miner_id
    }

    /// Checks what one miner line made the session send upstream and records its requests.
    fn after_miner_line(&mut self, miner_line: &[u8], out: &Output, stats: &mut SessionStats) {
        for line in out.to_pool.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Some((id, method, params)) = upstream_request(line) else { continue };
            assert!(self.pending.iter().all(|(p, _)| *p != id), "upstream id {id} reused while in flight");
            let req = match method.as_str() {
                miner::SUBSCRIBE => Req::Subscribe,
                miner::AUTHORIZE => Req::Authorize(miner_params(miner_line).swap_remove(0)),
                miner::CONFIGURE => Req::Configure,
                miner::SUBMIT => {
                    stats.forwarded_submits += 1;
                    let params: Vec<String> = serde_json::from_str(params.get()).expect("submit params are strings");
                    self.check_submit(&miner_params(miner_line)[0], &params);
                    Req::Other
                }
                _ => Req::Other,
            };
            self.pending.push((id, req));
        }
        if out.to_pool.is_empty() && out.events.iter().any(|e| matches!(e, Event::ShareRefused(_))) {
            stats.local_rejects += 1;
        }
    }

    fn check_submit(&mut self, worker: &str, params: &[String]) {
        assert!((5..=6).contains(&params.len()), "submit forwarded with {} params", params.len());
        assert!(self.authorized.contains(worker), "submit forwarded for worker {worker:?}, never authorized");
        let job = *self.jobs.get(&params[1]).unwrap_or_else(|| panic!("submit forwarded on job {:?}", params[1]));
        let extranonce2 = hex::decode(&params[2]).expect("forwarded extranonce2 is hex");
        assert_eq!(extranonce2.len(), self.extranonce2_size, "forwarded extranonce2 of the wrong width");
        let ntime = hex_u32(&params[3]);
        assert!(
            ntime >= job.ntime && ntime - job.ntime <= 7000,
            "forwarded ntime {ntime:#x} outside [{:#x}, +7000]",
            job.ntime
        );
        let nonce = hex_u32(&params[4]);
        let version = match params.get(5) {
            None => job.version,
            Some(bits) => {
                let bits = hex_u32(bits);
                assert_eq!(bits & !self.mask, 0, "forwarded version bits {bits:#x} outside the mask {:#x}", self.mask);
                (job.version & !self.mask) | (bits & self.mask)
            }
        };
        let key = (job.generation, self.extranonce1.clone(), extranonce2, ntime, nonce, version);
        assert!(self.forwarded.insert(key), "a duplicate share was forwarded: {params:?}");
    }
}

impl Oracle {
    /// A notify line for the pool to send, recorded as the live job of that id.
    fn notify(&mut self, job: &str, ntime: u32, version: u32, clean: bool) -> String {
        if clean {
            // The newest job before a clean one stays live, for the shares in flight.
            let newest = self.jobs.iter().max_by_key(|(_, j)| j.generation).map(|(id, j)| (id.clone(), *j));
            self.jobs.clear();
            self.jobs.extend(newest);
        }
        self.generations += 1;
        self.jobs.insert(job.into(), LiveJob { generation: self.generations, ntime, version });
        notify_line(job, ntime, version, clean)
    }
}

fn notify_line(job: &str, ntime: u32, version: u32, clean: bool) -> String {
    format!(
        r#"{{"id":null,"method":"mining.notify","params":["{job}","{PREVHASH}","{COINB1}","{COINB2}",["{BRANCH}"],"{version:08x}","1d00ffff","{ntime:08x}",{clean}]}}"#
    )
}

/// A notify that must not parse: each variant breaks one field.
fn hostile_notify(variant: u8) -> String {
    let good = notify_line("j0", BASE_NTIME, VERSIONS[0], true);
    match variant % 8 {
        0 => good.replace(PREVHASH, &PREVHASH[2..]),
        1 => good.replace("\"1d00ffff\"", "\"1d00fff\""),
        2 => good.replace(&format!("\"{BRANCH}\""), &vec![format!("\"{BRANCH}\""); 33].join(",")),
        3 => good.replace("\"j0\"", &format!("\"{}\"", "j".repeat(129))),
        4 => good.replace(",true]", ",\"true\"]"),
        5 => good.replace(&format!("{BASE_NTIME:08x}"), "0x5c8f0a"),
        6 => good.replace(COINB1, &format!("{COINB1}0")),
        _ => good.replace("\"j0\",", ""),
    }
}

/// A sequence of miner and pool lines decoded from `data` and fed to one [`Session`]. Invariants:
/// no panic; every line out is JSON; every `mining.submit` that reaches the pool is for a worker
/// the pool authorized, on a live job, with an extranonce2 of the announced width, an ntime in
/// [job ntime, +7000], version bits inside the negotiated mask, and not a duplicate (on decoded
/// bytes) of an earlier forwarded one; upstream ids are never reused while in flight.
///
/// The same input then drives the miner session under aggregate mode's local policy
/// ([`session_local`]): both policies are one session.
pub fn session(data: &[u8]) {
    session_stats(data);
    session_local(data);
}

/// The miner session under the local policy (aggregate mode), fed miner lines and group work
/// decoded from `data`. Invariants: no panic; every line out is JSON; every request with an id
/// is answered exactly once; every share handed to the pool side rebuilds, from the pool's own
/// job bytes and the extranonce2 it will be submitted with, into a header that meets the pool's
/// target, and none is handed over twice. Returns how many shares it handed over.
pub fn session_local(data: &[u8]) -> usize {
    use loka_stratum::aggregate::Work;
    use loka_stratum::jobs::Job;
    use loka_stratum::protocol::pool::Notify;
    use loka_stratum::session::{MinerSession, Up};
    use loka_stratum::share;
    use loka_stratum::vardiff::VardiffConfig;

    let mut input = Input { data, pos: 0 };
    let prefix = input.bytes(2);
    let e1_up = input.bytes(4);
    let vardiff = VardiffConfig {
        start_difficulty: 1e-12,
        min_difficulty: 1e-12,
        max_difficulty: 1e-6,
        target_shares_per_minute: 20.0,
        retarget_secs: 30.0,
    };
    let now = Instant::now();
    // The pool's jobs as it sent them, by upstream id, to rebuild what a forwarded share hashes to.
    let mut pool_jobs: HashMap<String, Notify> = HashMap::new();
    // A group on a pool: only a pool's work carries a version mask miners follow.
    let pool = Some(Pool::new(&PoolConfig { url: "stratum+tcp://127.0.0.1:1".into(), ..PoolConfig::default() }));
    let mut work =
        Arc::new(Work { epoch: 1, pool: pool.clone(), en2_size: 4, version_mask: None, jobs: vec![], leaving: false });
    let mut s = MinerSession::local(prefix.clone(), work.clone(), vardiff, input.u8() % 2 == 1, now);
    let mut forwarded = HashSet::new();
    let mut out = Output::default();
    let mut next_id = 0u64;
    let mut seq = 0u64;
    let mut steps = 0;
    // The id of the last job the miner was sent.
    let mut last_job = String::new();
    let mut forced: Vec<u8> = Vec::new();
    while !input.done() && steps < MAX_STEPS {
        steps += 1;
        let mut asked: Vec<u64> = Vec::new();
        let mut line = |text: String, asked: &mut Vec<u64>| {
            next_id += 1;
            asked.push(next_id);
            text.replace("ID", &next_id.to_string()).into_bytes()
        };
        let op = match forced.pop() {
            Some(op) => op,
            None => match input.u8() % 9 {
                // Subscribe, authorize, a job and a share in four steps, so that deep states are common.
                8 => {
                    forced = vec![5, 3, 1, 0];
                    continue;
                }
                op => op,
            },
        };
        match op {
            0 => {
                let l = line(r#"{"id":ID,"method":"mining.subscribe","params":[]}"#.into(), &mut asked);
                s.on_miner_line(&l, now, &mut out);
            }
            1 => {
                let worker = *input.pick(&WORKERS[..2]);
                let text = format!(r#"{{"id":ID,"method":"mining.authorize","params":["{worker}","x"]}}"#);
                let l = line(text, &mut asked);
                s.on_miner_line(&l, now, &mut out);
            }
            2 => {
                let mask = *input.pick(&MASKS);
                let text = format!(
                    r#"{{"id":ID,"method":"mining.configure","params":[["version-rolling"],{{"version-rolling.mask":"{mask:08x}"}}]}}"#
                );
                let l = line(text, &mut asked);
                s.on_miner_line(&l, now, &mut out);
            }
            // A job from the group: sometimes clean, sometimes a new pool session (epoch).
            3 | 4 => {
                seq += 1;
                let upstream = format!("up{seq}");
                let (coinb1_len, coinb2_len) = (usize::from(input.u8() % 8), usize::from(input.u8() % 8));
                let n = Notify {
                    job_id: upstream.clone(),
                    prevhash: [input.u8(); 32],
                    coinb1: input.bytes(coinb1_len),
                    coinb2: input.bytes(coinb2_len),
                    merkle_branch: vec![[input.u8(); 32]; usize::from(input.u8() % 3)],
                    version: 0x2000_0000,
                    nbits: 0x1d00_ffff,
                    ntime: BASE_NTIME,
                    clean_jobs: input.u8() % 2 == 0,
                };
                pool_jobs.insert(upstream, n.clone());
                let epoch = work.epoch + u64::from(input.u8() % 5 == 0);
                // A pool with less room (more padding) now and then: the miner must be told.
                let pad = usize::from(input.u8() % 16 == 0);
                let en2_size = 4 - pad;
                // One hash in about 2^(4 + n) meets the pool's difficulty.
                let pool_difficulty = 1e-12 * f64::from(1u32 << (input.u8() % 12));
                let job = Arc::new(Job::new(seq, epoch, n, &e1_up, en2_size, pad, pool_difficulty));
                let mut jobs = if epoch == work.epoch && !job.notify.clean_jobs { work.jobs.clone() } else { vec![] };
                jobs.push(job);
                let mask = if input.u8() % 4 == 0 { Some(0x1fff_e000) } else { work.version_mask };
                work = Arc::new(Work { epoch, pool: pool.clone(), en2_size, version_mask: mask, jobs, leaving: false });
                s.on_work(work.clone(), &mut out);
            }
            // A share on a job the miner was sent: ids from what it was told.
            5 | 6 => {
                let job = if input.u8() % 8 == 0 { "100".to_owned() } else { last_job.clone() };
                let worker = if input.u8() % 4 == 0 { *input.pick(&WORKERS) } else { WORKERS[0] };
                let (en2_size, bits) = (s.extranonce().1.max(1), input.u8() % 3);
                let en2 = hex::encode(input.bytes(en2_size));
                let (ntime, nonce) = (BASE_NTIME + u32::from(input.u8()), input.u32());
                let version = match bits {
                    0 => String::new(),
                    1 => r#","00002000""#.into(),
                    _ => format!(r#","{:08x}""#, input.u32()),
                };
                let text = format!(
                    r#"{{"id":ID,"method":"mining.submit","params":["{worker}","{job}","{en2}","{ntime:08x}","{nonce:08x}"{version}]}}"#
                );
                let l = line(text, &mut asked);
                s.on_miner_line(&l, now, &mut out);
            }
            _ => {
                if let Some(text) = input.line() {
                    s.on_miner_line(&text, now, &mut out);
                }
            }
        }
        // The pool side's answers: an authorize is granted or refused.
        for up in std::mem::take(&mut out.up) {
            match up {
                Up::Share(f) => {
                    let n = &pool_jobs[&*f.job.upstream_id];
                    let version = f.version_bits.map_or(n.version, |b| (n.version & !0x1fff_ffff) | b);
                    let coinbase = share::coinbase_hash(&n.coinb1, &e1_up, f.extranonce2(), &n.coinb2);
                    let root = share::merkle_root(coinbase, &n.merkle_branch);
                    let header = share::header(version, &n.prevhash, &root, f.ntime, n.nbits, f.nonce);
                    let hash = share::sha256d(&header);
                    assert!(share::meets(&hash, &f.job.upstream_target), "a forwarded share misses the pool's target");
                    assert!(f.extranonce2().starts_with(&prefix), "the pool's extranonce2 starts with the prefix");
                    let key = (f.job.upstream_id.clone(), f.extranonce2().to_vec(), f.ntime, f.nonce, version);
                    assert!(forwarded.insert(key), "a share forwarded twice");
                }
                Up::Authorize { id, user, .. } => s.on_authorize_answer(&id, user, input.u8() % 2 == 0, &mut out),
                Up::Relay { .. } => panic!("a local session relays nothing"),
            }
        }
        // Every request this step sent is answered exactly once; every line is JSON.
        let mut answered: HashMap<u64, usize> = HashMap::new();
        for l in out.to_miner.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let v: serde_json::Value = serde_json::from_slice(l).expect("every line to the miner is JSON");
            if let Some(id) = v.get("id").and_then(serde_json::Value::as_u64) {
                *answered.entry(id).or_default() += 1;
            }
            if v["method"] == "mining.notify" {
                last_job = v["params"][0].as_str().expect("a job id").to_owned();
            }
        }
        for id in asked {
            assert_eq!(answered.get(&id), Some(&1), "request {id} answered once");
        }
        if out.close_reason().is_some() {
            break;
        }
        out.to_miner.clear();
        out.events.clear();
    }
    forwarded.len()
}

pub fn session_stats(data: &[u8]) -> SessionStats {
    let mut input = Input { data, pos: 0 };
    let template = if input.u8() % 4 == 3 { "{pool_user}.{worker}" } else { "" };
    let pool_config = PoolConfig {
        url: "stratum+tcp://127.0.0.1:1".into(),
        user: "acct".into(),
        password: "pw".into(),
        ..PoolConfig::default()
    };
    // A failed authorize makes the next ones wait, or (backoff zero) not.
    let backoff = Duration::from_secs(u64::from(input.u8() % 2));
    let auth = AuthManager::new(template, backoff, backoff * 4);
    let mut s = Session::new(Arc::new(auth), Pool::new(&pool_config), IpAddr::from([127, 0, 0, 1]));
    let mut o = Oracle::default();
    let mut stats = SessionStats::default();
    let mut out = Output::default();

    while !input.done() && stats.steps < MAX_STEPS {
        stats.steps += 1;
        let op = input.u8() % 18;
        let mut miner_lines: Vec<Vec<u8>> = Vec::new();
        let mut pool_lines: Vec<Vec<u8>> = Vec::new();
        match op {
            // The whole handshake in one step, so that deep states are common.
            0 => {
                let worker = *input.pick(&WORKERS[..2]);
                let size = 1 + usize::from(input.u8() % 8);
                let en1 = input.bytes(4);
                let id = o.miner_id();
                let line = format!(r#"{{"id":{id},"method":"mining.subscribe","params":["bitaxe/BM1366/v2.4.2"]}}"#);
                if run_miner(&mut s, &mut o, &mut out, &mut stats, line.as_bytes()) {
                    break;
                }
                if let Some(up) = take_pending(&mut o, |r| matches!(r, Req::Subscribe)) {
                    o.extranonce1 = en1.clone();
                    o.extranonce2_size = size;
                    let en1 = hex::encode(&en1);
                    let reply =
                        format!(r#"{{"id":{up},"result":[[["mining.notify","ae68"]],"{en1}",{size}],"error":null}}"#);
                    if feed_pool(&mut s, &mut out, std::iter::once(reply.into_bytes())) {
                        break;
                    }
                }
                let id = o.miner_id();
                let line = format!(r#"{{"id":{id},"method":"mining.authorize","params":["{worker}","x"]}}"#);
                if run_miner(&mut s, &mut o, &mut out, &mut stats, line.as_bytes()) {
                    break;
                }
                if let Some(up) = take_pending(&mut o, |r| matches!(r, Req::Authorize(_))) {
                    o.authorized.insert(worker.into());
                    pool_lines.push(format!(r#"{{"id":{up},"result":true,"error":null}}"#).into_bytes());
                }
                pool_lines.push(br#"{"id":null,"method":"mining.set_difficulty","params":[1e-12]}"#.to_vec());
                pool_lines.push(o.notify(JOBS[0], BASE_NTIME, VERSIONS[0], true).into_bytes());
            }
            1 => {
                let id = o.miner_id();
                let agent = *input.pick(&["[]", r#"["cgminer/4.12.0"]"#, r#"["NiceHash/1.0","d2a1c4f0"]"#, "null"]);
                miner_lines.push(format!(r#"{{"id":{id},"method":"mining.subscribe","params":{agent}}}"#).into_bytes());
            }
            2 => {
                let id = o.miner_id();
                let worker = *input.pick(&WORKERS);
                miner_lines.push(
                    format!(r#"{{"id":{id},"method":"mining.authorize","params":["{worker}","x"]}}"#).into_bytes(),
                );
            }
            3 => {
                let id = o.miner_id();
                let mask = *input.pick(&MASKS);
                miner_lines.push(format!(
                    r#"{{"id":{id},"method":"mining.configure","params":[["version-rolling"],{{"version-rolling.mask":"{mask:08x}","version-rolling.min-bit-count":2}}]}}"#
                ).into_bytes());
            }
            // The pool answers one request in flight.
            4 | 5 => {
                if o.pending.is_empty() {
                    continue;
                }
                let i = usize::from(input.u8()) % o.pending.len();
                let (id, req) = o.pending.remove(i);
                let kind = input.u8() % 8;
                let line = match (kind, &req) {
                    (0..=4, Req::Subscribe) => {
                        let size = match input.u8() % 16 {
                            15 => 0,
                            14 => 17,
                            n => 1 + usize::from(n % 8),
                        };
                        let en1 = input.bytes(4);
                        if size <= 16 && size > 0 {
                            o.extranonce1 = en1.clone();
                            o.extranonce2_size = size;
                        }
                        format!(
                            r#"{{"id":{id},"result":[[["mining.notify","1"]],"{}",{size}],"error":null}}"#,
                            hex::encode(en1)
                        )
                    }
                    (0..=4, Req::Authorize(user)) => {
                        o.authorized.insert(user.clone());
                        format!(r#"{{"id":{id},"result":true,"error":null}}"#)
                    }
                    (0..=4, Req::Configure) => {
                        let mask = *input.pick(&MASKS);
                        o.mask = mask;
                        format!(
                            r#"{{"id":{id},"result":{{"version-rolling":true,"version-rolling.mask":"{mask:08x}"}},"error":null}}"#
                        )
                    }
                    (0..=4, Req::Other) => format!(r#"{{"id":{id},"result":true,"error":null}}"#),
                    (5, _) => format!(r#"{{"id":{id},"result":false,"error":[24,"Unauthorized worker",null]}}"#),
                    (6, _) => format!(r#"{{"id":{id},"result":null,"error":[21,"Job not found",null]}}"#),
                    _ => format!(r#"{{"id":{id},"result":null,"error":null}}"#),
                };
                pool_lines.push(line.into_bytes());
            }
            6 => {
                let job = *input.pick(&JOBS[..4]);
                let clean = input.u8() % 2 == 0;
                let ntime = BASE_NTIME + u32::from(input.u8()) * 1000;
                let version = *input.pick(&VERSIONS);
                pool_lines.push(o.notify(job, ntime, version, clean).into_bytes());
            }
            7 => {
                let d = *input.pick(&["1e-12", "1e-12", "1e-12", "1", "1000000", "0.0001"]);
                pool_lines
                    .push(format!(r#"{{"id":null,"method":"mining.set_difficulty","params":[{d}]}}"#).into_bytes());
            }
            // A submit, mostly well formed, for a likely worker and job.
            8..=10 => {
                let id = o.miner_id();
                let worker = match input.u8() % 4 {
                    0 => input.pick(&WORKERS).to_string(),
                    _ => {
                        let mut names: Vec<&String> = o.authorized.iter().collect();
                        names.sort();
                        names
                            .get(usize::from(input.u8()) % names.len().max(1))
                            .map_or(WORKERS[0].into(), |w| w.to_string())
                    }
                };
                let job = match input.u8() % 4 {
                    0 => input.pick(&JOBS).to_string(),
                    _ => {
                        let mut live: Vec<&String> = o.jobs.keys().collect();
                        live.sort();
                        live.get(usize::from(input.u8()) % live.len().max(1)).map_or(JOBS[0].into(), |j| j.to_string())
                    }
                };
                let width = match input.u8() % 8 {
                    0 => usize::from(input.u8() % 10),
                    _ => o.extranonce2_size.max(1),
                };
                let mut en2 = hex::encode(input.bytes(width));
                let base = o.jobs.get(&job).map_or(BASE_NTIME, |j| j.ntime);
                let ntime = match input.u8() % 8 {
                    0 => base.wrapping_sub(1),
                    1 => base + 7001,
                    2 => base + 7000,
                    _ => base + u32::from(input.u16()) % 7001,
                };
                let mut nonce = format!("{:08x}", input.u32());
                let mut ntime = format!("{ntime:08x}");
                let mut bits = match input.u8() % 4 {
                    0 => String::new(),
                    1 => format!("{:08x}", input.u32() & o.mask),
                    2 => format!("{:08x}", input.u32()),
                    _ => format!("{:08x}", input.pick(&MASKS) & 0x0000_e000),
                };
                if input.u8() % 4 == 0 {
                    for field in [&mut en2, &mut nonce, &mut ntime, &mut bits] {
                        field.make_ascii_uppercase();
                    }
                }
                let submit = [worker, job, en2, ntime, nonce, bits];
                miner_lines.push(submit_line(id, &submit).into_bytes());
                o.last_submit = Some(submit);
            }
            // The last submit again, as sent or with its hex in the other case: a duplicate in any spelling.
            11 => {
                let Some(mut submit) = o.last_submit.clone() else { continue };
                if input.u8() % 2 == 0 {
                    for field in &mut submit[2..] {
                        *field = if field.bytes().any(|b| b.is_ascii_lowercase()) {
                            field.to_ascii_uppercase()
                        } else {
                            field.to_ascii_lowercase()
                        };
                    }
                }
                let id = o.miner_id();
                miner_lines.push(submit_line(id, &submit).into_bytes());
            }
            12 => {
                if let Some(line) = input.line() {
                    miner_lines.push(line);
                }
            }
            13 => {
                // Garbage from the pool, fed only when it does not parse, so the oracle stays exact.
                let line = match input.u8() % 2 {
                    0 => input.line(),
                    _ => Some(hostile_notify(input.u8()).into_bytes()),
                };
                if let Some(line) = line.filter(|l| pool::parse(l).is_err()) {
                    pool_lines.push(line);
                }
            }
            14 => {
                let mask = *input.pick(&MASKS);
                o.mask = mask;
                pool_lines.push(
                    format!(r#"{{"id":null,"method":"mining.set_version_mask","params":["{mask:08x}"]}}"#).into_bytes(),
                );
            }
            15 => {
                let len = 1 + usize::from(input.u8() % 8);
                let en1 = input.bytes(len);
                let size = match input.u8() % 16 {
                    15 => 0,
                    n => 1 + usize::from(n % 8),
                };
                if size > 0 {
                    o.extranonce1 = en1.clone();
                    o.extranonce2_size = size;
                }
                pool_lines.push(
                    format!(
                        r#"{{"id":null,"method":"mining.set_extranonce","params":["{}",{size}]}}"#,
                        hex::encode(en1)
                    )
                    .into_bytes(),
                );
            }
            16 => {
                let id = o.miner_id();
                let line = match input.u8() % 4 {
                    0 => format!(r#"{{"id":{id},"method":"mining.extranonce.subscribe","params":[]}}"#),
                    1 => format!(r#"{{"id":{id},"method":"mining.suggest_difficulty","params":[512]}}"#),
                    2 => format!(r#"{{"id":{id},"method":"mining.get_transactions","params":["j0"]}}"#),
                    _ => r#"{"id":null,"method":"mining.suggest_difficulty","params":["0.5"]}"#.to_string(),
                };
                miner_lines.push(line.into_bytes());
            }
            _ => {
                let line = match input.u8() % 8 {
                    0 => r#"{"id":7,"method":"client.get_version","params":[]}"#,
                    1 => r#"{"id":null,"method":"client.show_message","params":["maintenance at 12:00"]}"#,
                    2 => r#"{"id":null,"method":"mining.ping","params":[]}"#,
                    3 => r#"{"id":99999,"result":true,"error":null}"#,
                    4 => r#"{"id":null,"method":"client.reconnect","params":["evil.example",3333,0]}"#,
                    5 => {
                        s.on_pool_lost(&mut out);
                        check_output(&out);
                        assert!(out.close_reason().is_some(), "a lost pool must end the session");
                        break;
                    }
                    _ => r#"{"id":"x","result":true,"error":null}"#,
                };
                pool_lines.push(line.as_bytes().to_vec());
            }
        }
        let mut closed = false;
        for line in miner_lines {
            if run_miner(&mut s, &mut o, &mut out, &mut stats, &line) {
                closed = true;
                break;
            }
        }
        if closed || feed_pool(&mut s, &mut out, pool_lines.into_iter()) {
            break;
        }
    }
    stats
}

/// Every line either side gets is JSON.
fn check_output(out: &Output) {
    assert_json_lines(&out.to_miner, "a line to the miner");
    assert_json_lines(&out.to_pool, "a line to the pool");
}

/// Feeds one miner line and checks what came out; true when the session closed.
fn run_miner(s: &mut Session, o: &mut Oracle, out: &mut Output, stats: &mut SessionStats, line: &[u8]) -> bool {
    s.on_miner_line(line, Instant::now(), out);
    check_output(out);
    o.after_miner_line(line, out, stats);
    let closed = out.close_reason().is_some();
    out.clear();
    closed
}

/// Feeds pool lines; true when the session closed. The only thing a pool line may make the
/// session write upstream is a reply (to `client.get_version`), never a request.
fn feed_pool(s: &mut Session, out: &mut Output, lines: impl Iterator<Item = Vec<u8>>) -> bool {
    for line in lines {
        s.on_pool_line(&line, Instant::now(), out);
        check_output(out);
        for up in out.to_pool.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            assert!(upstream_request(up).is_none(), "a pool line made the session send a request upstream");
        }
        let closed = out.close_reason().is_some();
        out.clear();
        if closed {
            return true;
        }
    }
    false
}

/// Removes and returns the newest request in flight that matches `pred`.
fn take_pending(o: &mut Oracle, pred: impl Fn(&Req) -> bool) -> Option<u64> {
    let i = o.pending.iter().rposition(|(_, r)| pred(r))?;
    Some(o.pending.remove(i).0)
}

fn submit_line(id: u64, f: &[String; 6]) -> String {
    let bits = if f[5].is_empty() { String::new() } else { format!(r#","{}""#, f[5]) };
    format!(
        r#"{{"id":{id},"method":"mining.submit","params":["{}","{}","{}","{}","{}"{bits}]}}"#,
        f[0], f[1], f[2], f[3], f[4]
    )
}
