//! Simulated firmware: miners that act on what the proxy sends them as real firmware does,
//! hashing real sha256d at a simulated rate. Run them under `tokio::time::pause()`, so that minutes
//! of mining take the time of the hashing alone.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::{hash_difficulty, header, is_reply, sha256d, swap_words, Job, Share, SimMiner};

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

/// A miner that behaves as cpuminer 2.5.1 does (`stratum_thread` and `miner_thread` of
/// cpu-miner.c), with one thread:
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
            }
        }
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
