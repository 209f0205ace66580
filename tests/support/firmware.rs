//! The firmware zoo: simulated miners that act on what the proxy sends them as real firmware does,
//! and hash real sha256d shares.
//! - [`S19`]: fast ASIC, hundreds of shares a second;
//! - [`Bitaxe`]: slow miner, a share every few hours;
//! - [`CpuMiner`]: stubborn miner, keeps its job until `clean_jobs`;
//! - [`VersionRollingAsic`]: `mining.configure` and `suggest_difficulty` before authorize;
//! - [`XnsubMiner`]: `mining.extranonce.subscribe`, then follows `mining.set_extranonce`;
//! - [`NatFarm`]: many miners behind one address, some with a bad password.
//!
//! [`CpuMiner`] hashes at a simulated rate: run it under `tokio::time::pause()`, so that minutes of
//! mining take the time of the hashing alone, or on the real clock at a rate of a few hundred
//! hashes a second.

use std::net::SocketAddr;
use std::time::Duration;

use futures::future::join_all;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::{hash_difficulty, header, is_reply, sha256d, swap_words, Job, Share, SimMiner};

/// What came back for a stream of submits.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub sent: u64,
    pub answered: u64,
    pub accepted: u64,
    /// Refused as stale (error 21): the share's job was retired by a clean job.
    pub stale: u64,
}

impl Tally {
    fn count(&mut self, reply: &Value) {
        self.answered += 1;
        self.accepted += u64::from(reply["result"] == true);
        self.stale += u64::from(reply["error"][0] == 21);
    }
}

/// Subscribes, authorizes `worker` with password "x" and waits for the first job.
async fn handshake(proxy: SocketAddr, worker: &str) -> SimMiner {
    let mut miner = SimMiner::connect(proxy).await;
    miner.handshake(worker).await;
    miner
}

/// Fast ASIC: an Antminer S19 (100 TH/s) at ckpool's start difficulty of 42, about 550 shares a
/// second until the pool's vardiff catches up. Its shares are real, at the difficulty it was
/// sent, and pipelined: it never waits for an answer before the next.
pub struct S19 {
    pub miner: SimMiner,
    pub worker: String,
}

impl S19 {
    pub async fn connect(proxy: SocketAddr, worker: &str) -> S19 {
        S19 { miner: handshake(proxy, worker).await, worker: worker.to_owned() }
    }

    /// Submits `per_10ms` shares on the newest job every 10 ms for `duration`, reading what
    /// comes meanwhile, then waits (bounded) for the answers still due.
    pub async fn mine_for(&mut self, duration: Duration, per_10ms: u64) -> Tally {
        let mut tally = Tally::default();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let end = Instant::now() + duration;
        while Instant::now() < end {
            tick.tick().await;
            let mut batch = String::new();
            for _ in 0..per_10ms {
                tally.sent += 1;
                let s = self.miner.grind(None);
                let params = json!([self.worker, s.job_id, s.extranonce2, s.ntime, s.nonce]);
                batch += &json!({"id": tally.sent, "method": "mining.submit", "params": params}).to_string();
                batch.push('\n');
            }
            self.miner.send(batch.trim_end()).await;
            while let Some(reply) = self.miner.recv_json(Duration::ZERO).await {
                if reply["id"].is_u64() {
                    tally.count(&reply);
                }
            }
        }
        while tally.answered < tally.sent {
            let Some(reply) = self.miner.recv_json(Duration::from_secs(30)).await else { break };
            if reply["id"].is_u64() {
                tally.count(&reply);
            }
        }
        tally
    }
}

/// Slow miner: a Bitaxe (~500 GH/s) at a pool difficulty of 1M finds a share about every 2.4 h,
/// and sends nothing in between. Here `interval` stands for those hours.
pub struct Bitaxe {
    pub miner: SimMiner,
    pub worker: String,
    pub interval: Duration,
    /// Jobs received while it was silent.
    pub jobs: usize,
}

impl Bitaxe {
    pub async fn connect(proxy: SocketAddr, worker: &str, interval: Duration) -> Bitaxe {
        Bitaxe { miner: handshake(proxy, worker).await, worker: worker.to_owned(), interval, jobs: 0 }
    }

    /// Hashes in silence for one interval, taking the jobs that come, then submits a share on the
    /// newest; the reply, or `None` if the proxy closed it or never answered.
    pub async fn next_share(&mut self) -> Option<Value> {
        let end = Instant::now() + self.interval;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.miner.recv_json(left).await {
                Some(msg) if msg["method"] == "mining.notify" => self.jobs += 1,
                Some(_) => {}
                None if self.miner.closed => return None,
                None => {}
            }
        }
        let share = self.miner.grind(None);
        let worker = self.worker.clone();
        let id = self.miner.submit(&worker, &share).await;
        self.miner.wait_reply(&id).await
    }
}

/// Version-rolling ASIC: a Whatsminer, or an Antminer on Braiins OS. It sends `mining.configure`
/// (version-rolling, mask 1fffe000, min-bit-count 2) first and `mining.suggest_difficulty` before
/// it authorizes, then rolls the version bits the pool granted: the 6th submit param.
pub struct VersionRollingAsic {
    pub miner: SimMiner,
    pub worker: String,
    pub configured: Value,
    rolls: u32,
}

impl VersionRollingAsic {
    pub async fn connect(proxy: SocketAddr, worker: &str, suggest: f64) -> VersionRollingAsic {
        let mut miner = SimMiner::connect(proxy).await;
        let configured = miner.configure("1fffe000").await;
        miner.subscribe().await;
        let id = miner.request("mining.suggest_difficulty", json!([suggest])).await;
        miner.wait_reply(&id).await.expect("a reply to suggest_difficulty");
        let reply = miner.authorize(worker, "x").await;
        assert_eq!(reply["result"], true, "authorize failed: {reply}");
        assert!(miner.wait_job().await, "no job after the handshake");
        VersionRollingAsic { miner, worker: worker.to_owned(), configured, rolls: 0 }
    }

    /// A share on the newest job, its version rolled to the next value inside the granted mask
    /// (not rolled without one); the reply, if any.
    pub async fn share(&mut self) -> Option<Value> {
        let bits = self.miner.version_mask.filter(|m| *m != 0).map(|mask| {
            self.rolls += 1;
            (self.rolls << mask.trailing_zeros()) & mask
        });
        let share = self.miner.grind(bits);
        let worker = self.worker.clone();
        let id = self.miner.submit(&worker, &share).await;
        self.miner.wait_reply(&id).await
    }
}

/// Xnsub miner: NiceHash-style firmware. It sends `mining.extranonce.subscribe` after it
/// authorizes, and takes the extranonce of every `mining.set_extranonce` for its next work.
pub struct XnsubMiner {
    pub miner: SimMiner,
    pub worker: String,
}

impl XnsubMiner {
    pub async fn connect(proxy: SocketAddr, worker: &str) -> XnsubMiner {
        let mut miner = handshake(proxy, worker).await;
        let id = miner.request("mining.extranonce.subscribe", json!([])).await;
        let reply = miner.wait_reply(&id).await.expect("a reply to mining.extranonce.subscribe");
        assert_eq!(reply["result"], true, "{reply}");
        XnsubMiner { miner, worker: worker.to_owned() }
    }

    /// A share on the newest job, with the extranonce in force; the reply, if any.
    pub async fn share(&mut self) -> Option<Value> {
        let share = self.miner.grind(None);
        let worker = self.worker.clone();
        let id = self.miner.submit(&worker, &share).await;
        self.miner.wait_reply(&id).await
    }
}

/// NAT farm: `good + bad` miners behind one address (127.0.0.1 here), workers `farm.rig{i}` and
/// `farm.bad{i}`; the bad ones log in with the password `"bad"`.
pub struct NatFarm {
    pub proxy: SocketAddr,
    pub good: usize,
    pub bad: usize,
}

impl NatFarm {
    /// Connects the bad miners one after another; each authorize is refused.
    pub async fn connect_bad(&self) -> Vec<SimMiner> {
        let mut bad = Vec::new();
        for i in 0..self.bad {
            let mut m = SimMiner::connect(self.proxy).await;
            m.subscribe().await;
            let reply = m.authorize(&format!("farm.bad{i}"), "bad").await;
            assert!(reply["error"][0] == 24 && reply["result"] != true, "the pool's refusal: {reply}");
            bad.push(m);
        }
        bad
    }

    /// Each bad miner tries again; each is answered by the proxy while its worker backs off.
    pub async fn retry_bad(bad: &mut [SimMiner]) {
        join_all(bad.iter_mut().enumerate().map(|(i, m)| async move {
            let reply = m.authorize(&format!("farm.bad{i}"), "bad").await;
            assert_eq!(reply["error"][0], 24, "{reply}");
            assert!(reply["error"][1].as_str().unwrap().starts_with("too many failed authorizations"), "{reply}");
        }))
        .await;
    }

    /// The good miners at once, each on a new connection: authorize, take a job, and have two
    /// real shares accepted. Returns them connected.
    pub async fn mine(&self, round: usize) -> Vec<SimMiner> {
        join_all((0..self.good).map(|i| async move {
            let worker = format!("farm.rig{i}");
            let mut m = SimMiner::connect(self.proxy).await;
            m.subscribe().await;
            let reply = m.authorize(&worker, "x").await;
            assert_eq!(reply["result"], true, "round {round}, {worker}: {reply}");
            assert!(m.wait_job().await, "round {round}, {worker}: no job");
            for _ in 0..2 {
                let share = m.grind(None);
                let id = m.submit(&worker, &share).await;
                let reply = m.wait_reply(&id).await.expect("a share reply");
                assert_eq!(reply["result"], true, "round {round}, {worker}: {reply}");
            }
            m
        }))
        .await
    }
}

/// How long cpuminer scans one piece of work before it looks for new work (`LP_SCANTIME`).
const SCAN_SECS: f64 = 60.0;

/// A job as cpuminer builds its work from a `mining.notify`.
#[derive(Debug, Clone)]
struct Work {
    job: Job,
    /// The difficulty in force when the job came (`next_diff`, copied at the notify).
    difficulty: f64,
    /// cpuminer starts every new job id at extranonce2 = 0.
    extranonce2: Vec<u8>,
    /// The header but its nonce: what cpuminer compares to tell new work from the work it has.
    header: [u8; 80],
}

impl Work {
    fn new(job: Job, difficulty: f64, extranonce1: &[u8], extranonce2_size: usize) -> Work {
        let extranonce2 = vec![0; extranonce2_size];
        let root = job.merkle_root(extranonce1, &extranonce2);
        let header = header(job.version, &swap_words(&job.prevhash), &root, job.ntime, job.nbits, 0);
        Work { job, difficulty, extranonce2, header }
    }

    fn same_header(&self, other: &Work) -> bool {
        self.header[..76] == other.header[..76]
    }

    /// The first nonce in `from..to` whose hash meets the work's difficulty.
    fn find(&self, from: u32, to: u32) -> Option<u32> {
        let mut h = self.header;
        (from..to).find(|nonce| {
            h[76..80].copy_from_slice(&nonce.to_le_bytes());
            hash_difficulty(&sha256d(&h)) >= self.difficulty
        })
    }
}

/// Stubborn miner: cpuminer 2.5.1 keeps hashing its job until `clean_jobs`. As its
/// `stratum_thread` and `miner_thread` (cpu-miner.c) do, with one thread:
/// - `mining.set_difficulty` applies to the jobs notified after it;
/// - a notify builds new work, at extranonce2 0; one with `clean_jobs` interrupts the scan;
/// - a scan starts after a share, after `SCAN_SECS` of hashing, or after an interrupt, and takes
///   the newest work only if its first 76 header bytes differ from the work it has. Otherwise it
///   keeps hashing its work, under the work's job id and at the work's difficulty.
pub struct CpuMiner {
    pub miner: SimMiner,
    worker: String,
    /// Hashes per second of simulated time.
    hashrate: f64,
    next_difficulty: f64,
    newest: Option<Work>,
    work: Option<Work>,
    nonce: u32,
    /// Where simulated time starts; the times below are since then.
    pub t0: Instant,
    /// Each share sent: when, and the difficulty it was found at.
    pub shares: Vec<(Duration, f64)>,
    /// Each difficulty the proxy sent, when it came.
    pub told: Vec<(Duration, f64)>,
    /// The difficulty the miner hashes at, each time it changes.
    pub hashing: Vec<(Duration, f64)>,
    pub accepted: u64,
    /// Shares sent on a job that a newer (not clean) job had followed.
    pub behind: usize,
    /// Every reply to a share that was not `true`.
    pub refused: Vec<Value>,
}

impl CpuMiner {
    /// Connects, subscribes and authorizes `worker`, as cpuminer does, and takes the first job.
    pub async fn connect(proxy: SocketAddr, worker: &str, hashrate: f64) -> CpuMiner {
        let mut miner = SimMiner::connect(proxy).await;
        miner.subscribe().await;
        let reply = miner.authorize(worker, "x").await;
        assert_eq!(reply["result"], true, "authorize failed: {reply}");
        assert!(miner.wait_job().await, "no job after the handshake");
        let mut m = CpuMiner {
            miner,
            worker: worker.to_owned(),
            hashrate,
            next_difficulty: 1.0,
            newest: None,
            work: None,
            nonce: 0,
            t0: Instant::now(),
            shares: Vec::new(),
            told: Vec::new(),
            hashing: Vec::new(),
            accepted: 0,
            behind: 0,
            refused: Vec::new(),
        };
        for message in std::mem::take(&mut m.miner.notifications) {
            m.on_message(&message);
        }
        m
    }

    /// Restarts the clock of the records, e.g. once time is paused.
    pub fn start_clock(&mut self) {
        self.t0 = Instant::now();
    }

    fn since(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.t0)
    }

    /// Mines until `until`, reading what the proxy sends on the way.
    pub async fn run_until(&mut self, until: Instant) {
        let rate = self.hashrate;
        loop {
            let start = Instant::now();
            if start >= until {
                return;
            }
            let newest = self.newest.clone().expect("a job to mine");
            if self.work.as_ref().is_none_or(|w| !w.same_header(&newest)) {
                if self.work.as_ref().is_none_or(|w| w.difficulty != newest.difficulty) {
                    self.hashing.push((self.since(start), newest.difficulty));
                }
                self.work = Some(newest);
                self.nonce = 0;
            }
            let work = self.work.clone().expect("work");
            let from = self.nonce;
            let to = from.saturating_add((SCAN_SECS * rate) as u32);
            let found = work.find(from, to);
            let stop = found.map_or(to, |n| n + 1);
            let done = start + Duration::from_secs_f64(f64::from(stop - from) / rate);
            let deadline = done.min(until);
            let mut interrupted = false;
            while !interrupted {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match self.miner.recv_json(left).await {
                    Some(message) => interrupted = self.on_message(&message),
                    None => assert!(!self.miner.closed, "the proxy closed the miner"),
                }
            }
            let now = Instant::now();
            if interrupted || now < done {
                // The scan stopped early: the nonces hashed so far are done.
                let hashed = (now.saturating_duration_since(start).as_secs_f64() * rate) as u32;
                self.nonce = from.saturating_add(hashed).min(stop);
                continue;
            }
            self.nonce = stop;
            if let Some(nonce) = found {
                let share = Share {
                    job_id: work.job.id.clone(),
                    extranonce2: hex::encode(&work.extranonce2),
                    ntime: format!("{:08x}", work.job.ntime),
                    nonce: format!("{nonce:08x}"),
                    version_bits: None,
                };
                let worker = self.worker.clone();
                self.miner.submit(&worker, &share).await;
                self.shares.push((self.since(now), work.difficulty));
                self.behind += usize::from(self.newest.as_ref().is_some_and(|n| n.job.id != work.job.id));
            }
        }
    }

    /// Reads (bounded) until every share sent is answered; false if some never were.
    pub async fn settle(&mut self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while (self.accepted as usize + self.refused.len()) < self.shares.len() {
            let left = end.saturating_duration_since(Instant::now());
            match self.miner.recv_json(left).await {
                Some(message) => {
                    self.on_message(&message);
                }
                None => return false,
            }
        }
        true
    }

    /// Takes in one message from the proxy; true if it interrupts the scan (a clean job).
    fn on_message(&mut self, message: &Value) -> bool {
        if is_reply(message) {
            if message["result"] == true {
                self.accepted += 1;
            } else {
                self.refused.push(message.clone());
            }
            return false;
        }
        let now = self.since(Instant::now());
        match message["method"].as_str() {
            Some("mining.set_difficulty") => {
                if let Some(d) = message["params"][0].as_f64() {
                    self.next_difficulty = d;
                    self.told.push((now, d));
                }
                false
            }
            Some("mining.notify") => {
                let job = Job::from_notify(&message["params"]).expect("a job cpuminer can parse");
                let clean = job.clean;
                let (extranonce1, size) = (self.miner.extranonce1.clone(), self.miner.extranonce2_size);
                self.newest = Some(Work::new(job, self.next_difficulty, &extranonce1, size));
                clean
            }
            _ => false,
        }
    }
}
