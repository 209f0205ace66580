//! Test support: a recording mock pool, simulated miners, and a proxy running on `127.0.0.1:0`.
//!
//! Every wait here is bounded, so a broken proxy fails a test instead of hanging it.
#![allow(dead_code)]

pub mod browser;
pub mod firmware;
pub mod promtool;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use loka_stratum::config::{Config, Mode, PoolConfig};
use loka_stratum::inventory::Inventory;
use loka_stratum::registry::ConnectionManager;
use loka_stratum::server::{Reloader, Server};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::codec::{FramedRead, LinesCodec};

/// The bound on any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// Longest line the test peers read; far above anything the proxy should send.
const TEST_LINE_MAX: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Share hashing, shared by the validating pool and the grinding miner.
// ---------------------------------------------------------------------------------------------

pub fn sha256d(data: &[u8]) -> [u8; 32] {
    Sha256::digest(Sha256::digest(data)).into()
}

/// The difficulty-1 target, 0x00000000FFFF0000…0, as a float: 0xFFFF × 2^208.
fn diff1_target() -> f64 {
    65535.0 * 2f64.powi(208)
}

/// The network's difficulty from nbits: diff1_target / the compact target.
pub fn nbits_difficulty(nbits: u32) -> f64 {
    let target = f64::from(nbits & 0x007f_ffff) * 2f64.powi(8 * ((nbits >> 24) as i32 - 3));
    diff1_target() / target
}

/// The difficulty a hash meets: diff1_target / hash, the hash read as a little-endian number.
pub fn hash_difficulty(hash: &[u8; 32]) -> f64 {
    let value = hash.iter().rev().fold(0.0f64, |acc, b| acc * 256.0 + f64::from(*b));
    if value == 0.0 {
        f64::INFINITY
    } else {
        diff1_target() / value
    }
}

/// The 80-byte header. `prevhash` is in header order (internal byte order), `merkle_root` raw.
pub fn header(
    version: u32,
    prevhash: &[u8; 32],
    merkle_root: &[u8; 32],
    ntime: u32,
    nbits: u32,
    nonce: u32,
) -> [u8; 80] {
    let mut h = [0u8; 80];
    h[0..4].copy_from_slice(&version.to_le_bytes());
    h[4..36].copy_from_slice(prevhash);
    h[36..68].copy_from_slice(merkle_root);
    h[68..72].copy_from_slice(&ntime.to_le_bytes());
    h[72..76].copy_from_slice(&nbits.to_le_bytes());
    h[76..80].copy_from_slice(&nonce.to_le_bytes());
    h
}

/// `mining.notify`'s prevhash is the header's with each 4-byte word byte-reversed; the swap is
/// its own inverse.
pub fn swap_words(bytes: &[u8; 32]) -> [u8; 32] {
    let mut out = *bytes;
    for word in out.chunks_mut(4) {
        word.reverse();
    }
    out
}

/// One job, as a `mining.notify` carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: String,
    /// As the notify hex spells it (word-swapped).
    pub prevhash: [u8; 32],
    pub coinb1: Vec<u8>,
    pub coinb2: Vec<u8>,
    pub branch: Vec<[u8; 32]>,
    pub version: u32,
    pub nbits: u32,
    pub ntime: u32,
    pub clean: bool,
}

impl Job {
    pub fn notify_params(&self) -> Value {
        json!([
            self.id,
            hex::encode(self.prevhash),
            hex::encode(&self.coinb1),
            hex::encode(&self.coinb2),
            self.branch.iter().map(hex::encode).collect::<Vec<_>>(),
            format!("{:08x}", self.version),
            format!("{:08x}", self.nbits),
            format!("{:08x}", self.ntime),
            self.clean,
        ])
    }

    pub fn from_notify(params: &Value) -> Option<Job> {
        let p = params.as_array()?;
        let hex32 = |v: &Value| -> Option<[u8; 32]> { hex::decode(v.as_str()?).ok()?.try_into().ok() };
        let hexu32 = |v: &Value| u32::from_str_radix(v.as_str()?, 16).ok();
        Some(Job {
            id: p.first()?.as_str()?.to_owned(),
            prevhash: hex32(p.get(1)?)?,
            coinb1: hex::decode(p.get(2)?.as_str()?).ok()?,
            coinb2: hex::decode(p.get(3)?.as_str()?).ok()?,
            branch: p.get(4)?.as_array()?.iter().map(hex32).collect::<Option<Vec<_>>>()?,
            version: hexu32(p.get(5)?)?,
            nbits: hexu32(p.get(6)?)?,
            ntime: hexu32(p.get(7)?)?,
            clean: p.get(8)?.as_bool()?,
        })
    }

    pub fn merkle_root(&self, extranonce1: &[u8], extranonce2: &[u8]) -> [u8; 32] {
        let coinbase = [&self.coinb1[..], extranonce1, extranonce2, &self.coinb2[..]].concat();
        self.branch.iter().fold(sha256d(&coinbase), |root, b| sha256d(&[&root[..], &b[..]].concat()))
    }

    /// The share's header hash. `version` is the rolled version, already masked.
    pub fn share_hash(&self, extranonce1: &[u8], extranonce2: &[u8], ntime: u32, nonce: u32, version: u32) -> [u8; 32] {
        let root = self.merkle_root(extranonce1, extranonce2);
        sha256d(&header(version, &swap_words(&self.prevhash), &root, ntime, self.nbits, nonce))
    }
}

/// `(job_version & !mask) | (bits & mask)`.
pub fn rolled_version(job_version: u32, mask: u32, bits: u32) -> u32 {
    (job_version & !mask) | (bits & mask)
}

/// Deterministic filler bytes, so jobs differ without a random number generator.
fn filler(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The mock pool.
// ---------------------------------------------------------------------------------------------

/// How the mock pool answers `mining.submit`; changeable while it runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SubmitReplies {
    Immediate,
    Delay(Duration),
    Never,
    /// Every submit is answered `[23, "Low difficulty share", null]` and counted as rejected.
    Reject,
    /// Every submit is answered with this error code and counted as rejected.
    RejectWith(i64),
}

/// How the mock pool answers `mining.configure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Configure {
    /// `version_mask` ∩ the mask asked for.
    Grant,
    /// `[20, "Unknown method", null]`, as pools without version rolling answer.
    Refuse,
    /// No answer at all.
    Ignore,
}

#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub extranonce2_size: usize,
    pub difficulty: f64,
    /// The mask the pool allows for version rolling; `mining.configure` gets `pool & requested`.
    pub version_mask: u32,
    pub configure: Configure,
    /// As ckpool: once a user is authorized on a connection, later `mining.authorize`s on it
    /// get no answer at all.
    pub authorize_once: bool,
    /// Check every share's sha256d against the difficulty, the job, the extranonce2 size and the mask.
    pub validate: bool,
    /// Answer a repeated (job, extranonce2, ntime, nonce, version) with `[22, "Duplicate share", null]`.
    pub reject_duplicates: bool,
    /// `mining.authorize` of this user gets `false` and error 24.
    pub reject_user: Option<String>,
    /// `mining.authorize` with this password gets `false` and error 24, whatever the user.
    pub reject_password: Option<String>,
    /// The jobs' nbits: the network target, which [`MockPool::blocks`] counts shares against.
    pub nbits: u32,
    /// Judge every share by the difficulty in force now, not by the one its job was sent under:
    /// a [`MockPool::set_difficulty`] applies at once, to the jobs already out.
    pub difficulty_at_once: bool,
    /// A new job with clean_jobs = true on every subscribed connection this often.
    pub clean_jobs_every: Option<Duration>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            extranonce2_size: 4,
            // The proxy validates every share: at this difficulty every hash meets the target, so
            // `any_share` passes, while tests of the difficulty check set their own.
            difficulty: 1e-12,
            version_mask: 0x1fff_e000,
            configure: Configure::Grant,
            authorize_once: false,
            validate: false,
            reject_duplicates: false,
            reject_user: None,
            reject_password: None,
            nbits: 0x1d00_ffff,
            difficulty_at_once: false,
            clean_jobs_every: None,
        }
    }
}

/// The pool zoo: pools as real ones behave. Each validates every share's sha256d, its job and its
/// extranonce2 (8 bytes, room for an aggregate proxy's prefix), and refuses duplicates. A pool
/// that hangs with its socket open is any of them after [`MockPool::freeze`] (a SIGSTOPped pool).
impl PoolOptions {
    /// A pool that checks every share as a real one does.
    pub fn validating() -> PoolOptions {
        PoolOptions { extranonce2_size: 8, validate: true, reject_duplicates: true, ..PoolOptions::default() }
    }

    /// ckpool: a second `mining.authorize` on a connection is ignored, never answered.
    pub fn ckpool() -> PoolOptions {
        PoolOptions { authorize_once: true, ..Self::validating() }
    }

    /// A pool without version rolling: `mining.configure` is an unknown method.
    pub fn no_version_rolling() -> PoolOptions {
        PoolOptions { configure: Configure::Refuse, ..Self::validating() }
    }

    /// A pool that applies `mining.set_difficulty` at once, to the jobs already out, instead of
    /// from the next job (see [`MockPool::set_difficulty`]).
    pub fn difficulty_at_once() -> PoolOptions {
        PoolOptions { difficulty_at_once: true, ..Self::validating() }
    }

    /// A pool that sends a new job with `clean_jobs = true` every `every`, as pools do on every
    /// new block and some on every job.
    pub fn clean_jobs_every(every: Duration) -> PoolOptions {
        PoolOptions { clean_jobs_every: Some(every), ..Self::validating() }
    }
}

/// extranonce1 values, unique per pool connection across the test process.
static NEXT_EXTRANONCE1: AtomicU32 = AtomicU32::new(0x0a00_0001);
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

struct PoolState {
    opts: PoolOptions,
    submit_replies: Mutex<SubmitReplies>,
    recorded: Mutex<Vec<String>>,
    /// Beside each recorded line: how many connections that had sent a line were open then.
    sessions_at: Mutex<Vec<usize>>,
    /// Connections that have sent a line and are still open (probes that only connect are not).
    speaking: Mutex<HashSet<u64>>,
    accepted: AtomicU64,
    rejected: AtomicU64,
    /// Submits whose hash met their job's nbits, whatever the verdict (ckpool submits the block
    /// before it judges the share). Counted for validating pools only.
    blocks: AtomicU64,
    /// Outgoing lines of each live connection, for `broadcast`.
    conns: Mutex<HashMap<u64, mpsc::UnboundedSender<String>>>,
    live: AtomicUsize,
    accepted_conns: AtomicUsize,
    tasks: Mutex<Vec<AbortHandle>>,
    /// Set while the pool neither reads nor writes (a process stopped with SIGSTOP).
    frozen: watch::Sender<bool>,
    /// Connections that opened with the proxy's health probe; their lines are not recorded.
    probes: AtomicUsize,
}

/// A Stratum pool on 127.0.0.1 that records every line it receives.
pub struct MockPool {
    pub addr: SocketAddr,
    state: Arc<PoolState>,
    accept: Option<JoinHandle<()>>,
}

impl MockPool {
    pub async fn start(opts: PoolOptions) -> MockPool {
        Self::start_at("127.0.0.1:0".parse().unwrap(), opts).await
    }

    /// Binds `addr`, e.g. a port taken with [`reserve_port`] earlier.
    pub async fn start_at(addr: SocketAddr, opts: PoolOptions) -> MockPool {
        let listener = TcpListener::bind(addr).await.expect("mock pool binds");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(PoolState {
            opts,
            submit_replies: Mutex::new(SubmitReplies::Immediate),
            recorded: Mutex::new(Vec::new()),
            sessions_at: Mutex::new(Vec::new()),
            speaking: Mutex::new(HashSet::new()),
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            blocks: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            live: AtomicUsize::new(0),
            accepted_conns: AtomicUsize::new(0),
            tasks: Mutex::new(Vec::new()),
            frozen: watch::Sender::new(false),
            probes: AtomicUsize::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        MockPool { addr, state, accept: Some(accept) }
    }

    /// `host:port`, the proxy's `pool` metric label for this pool.
    pub fn label(&self) -> String {
        self.addr.to_string()
    }

    pub fn url(&self) -> String {
        format!("stratum+tcp://{}", self.addr)
    }

    pub fn set_submit_replies(&self, mode: SubmitReplies) {
        *self.state.submit_replies.lock().unwrap() = mode;
    }

    /// Every line received, from every connection, in arrival order.
    pub fn recorded(&self) -> Vec<String> {
        self.state.recorded.lock().unwrap().clone()
    }

    /// Every line received, with the number of pool sessions (connections that sent a line) open
    /// when it arrived.
    pub fn recorded_with_sessions(&self) -> Vec<(String, usize)> {
        let recorded = self.state.recorded.lock().unwrap();
        recorded.iter().cloned().zip(self.state.sessions_at.lock().unwrap().iter().copied()).collect()
    }

    pub fn recorded_json(&self) -> Vec<Value> {
        self.recorded().iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    pub fn recorded_methods(&self) -> Vec<String> {
        self.recorded_json().iter().filter_map(|v| v["method"].as_str().map(str::to_owned)).collect()
    }

    /// Every `mining.submit` request received.
    pub fn submits(&self) -> Vec<Value> {
        self.recorded_json().into_iter().filter(|v| v["method"] == "mining.submit").collect()
    }

    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    pub fn rejected(&self) -> u64 {
        self.state.rejected.load(Ordering::SeqCst)
    }

    /// Block candidates received (validating pools only).
    pub fn blocks(&self) -> u64 {
        self.state.blocks.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.state.live.load(Ordering::SeqCst)
    }

    /// `mining.subscribe` requests received: one per pool session.
    pub fn subscribes(&self) -> usize {
        self.recorded_methods().iter().filter(|m| *m == "mining.subscribe").count()
    }

    /// Connections accepted since the start, probes included.
    pub fn connections_accepted(&self) -> usize {
        self.state.accepted_conns.load(Ordering::SeqCst)
    }

    /// The proxy's health probes received (each a subscribe and an authorize, never recorded).
    pub fn probes(&self) -> usize {
        self.state.probes.load(Ordering::SeqCst)
    }

    /// Stops reading and writing on every connection, open or to come, and keeps the sockets
    /// open: a pool process stopped with SIGSTOP.
    pub fn freeze(&self) {
        self.state.frozen.send_replace(true);
    }

    /// Resumes a frozen pool, as SIGCONT does: what was sent meanwhile is read now.
    pub fn thaw(&self) {
        self.state.frozen.send_replace(false);
    }

    /// Sends a fresh job (clean_jobs = true) on every connection, valid for shares from then on.
    pub fn new_job(&self) -> usize {
        self.broadcast(NEW_JOB)
    }

    /// Sends a fresh job with clean_jobs = false on every connection: the earlier jobs stay valid.
    pub fn new_job_kept(&self) -> usize {
        self.broadcast(NEW_JOB_KEPT)
    }

    /// Sends `mining.set_difficulty` on every connection. It applies to the jobs sent after it,
    /// or, with [`PoolOptions::difficulty_at_once`], to every share from now on.
    pub fn set_difficulty(&self, difficulty: f64) -> usize {
        self.broadcast(&format!("{SET_DIFFICULTY}{difficulty}"))
    }

    /// Sends `mining.set_extranonce` with a fresh extranonce1 and `extranonce2_size`, then a
    /// clean job, on every connection; shares of the earlier jobs are refused from then on.
    pub fn set_extranonce(&self, extranonce2_size: usize) -> usize {
        self.broadcast(&format!("{SET_EXTRANONCE}{extranonce2_size}"))
    }

    /// Sends `line` to every connected proxy session.
    pub fn broadcast(&self, line: &str) -> usize {
        let conns = self.state.conns.lock().unwrap();
        conns.values().filter(|tx| tx.send(line.to_owned()).is_ok()).count()
    }

    /// The id of the connection accepted last, for [`MockPool::send_to`].
    pub fn newest_connection(&self) -> Option<u64> {
        self.state.conns.lock().unwrap().keys().copied().max()
    }

    /// Sends `line` on one connection; false once it has closed.
    pub fn send_to(&self, conn: u64, line: &str) -> bool {
        self.state.conns.lock().unwrap().get(&conn).is_some_and(|tx| tx.send(line.to_owned()).is_ok())
    }

    /// Waits until `count` submits have been received.
    pub async fn wait_submits(&self, count: usize) -> bool {
        eventually(WAIT, || async { self.submits().len() >= count }).await
    }

    /// Waits until some received line satisfies `pred`.
    pub async fn wait_recorded(&self, pred: impl Fn(&Value) -> bool) -> bool {
        eventually(WAIT, || async { self.recorded_json().iter().any(&pred) }).await
    }

    /// Drops the listener and every connection: the proxy sees its pool sessions end.
    pub async fn kill(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
        for task in self.state.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
        self.state.conns.lock().unwrap().clear();
        let gone = eventually(WAIT, || async { self.connections() == 0 }).await;
        assert!(gone, "mock pool connections did not close");
    }
}

impl Drop for MockPool {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        for task in self.state.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<PoolState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        state.accepted_conns.fetch_add(1, Ordering::SeqCst);
        state.live.fetch_add(1, Ordering::SeqCst);
        let task = tokio::spawn(pool_conn(state.clone(), stream));
        state.tasks.lock().unwrap().push(task.abort_handle());
    }
}

/// Sent through a connection's outgoing queue, it makes the connection issue a new job.
const NEW_JOB: &str = "\u{0}new-job";
/// The same, with clean_jobs = false.
const NEW_JOB_KEPT: &str = "\u{0}new-job-kept";
/// A prefix: the connection takes the difficulty that follows and sends it.
const SET_DIFFICULTY: &str = "\u{0}set-difficulty ";
/// A prefix: the connection takes a new extranonce1 and the extranonce2 size that follows.
const SET_EXTRANONCE: &str = "\u{0}set-extranonce ";

/// One proxy session's state on the pool side.
struct PoolConn {
    id: u64,
    extranonce1: [u8; 4],
    extranonce2_size: usize,
    /// The difficulty sent last.
    difficulty: f64,
    subscribed: bool,
    mask: Option<u32>,
    authorized: HashSet<String>,
    seen: HashSet<(String, Vec<u8>, u32, u32, u32)>,
    /// Each job with the difficulty it was sent under.
    jobs: HashMap<String, (Job, f64)>,
    out: mpsc::UnboundedSender<String>,
}

/// Decrements the live count and forgets the connection, also when the task is aborted.
struct LiveGuard(Arc<PoolState>, u64);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.conns.lock().unwrap().remove(&self.1);
        self.0.speaking.lock().unwrap().remove(&self.1);
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn pool_conn(state: Arc<PoolState>, stream: TcpStream) {
    let id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let _guard = LiveGuard(state.clone(), id);
    let (reader, mut writer) = stream.into_split();
    let mut lines = FramedRead::new(reader, LinesCodec::new_with_max_length(TEST_LINE_MAX));
    // Unbounded: test traffic is small, and delayed replies must never block the reader.
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    state.conns.lock().unwrap().insert(id, tx.clone());
    let mut conn = PoolConn {
        id,
        extranonce1: NEXT_EXTRANONCE1.fetch_add(1, Ordering::Relaxed).to_be_bytes(),
        extranonce2_size: state.opts.extranonce2_size,
        difficulty: state.opts.difficulty,
        subscribed: false,
        mask: None,
        authorized: HashSet::new(),
        seen: HashSet::new(),
        jobs: HashMap::new(),
        out: tx,
    };
    let mut frozen = state.frozen.subscribe();
    // Decided by the first line: the proxy's health probe subscribes as "… probe".
    let mut probe = None;
    let mut clean_jobs =
        state.opts.clean_jobs_every.map(|every| tokio::time::interval_at(tokio::time::Instant::now() + every, every));
    loop {
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        tokio::select! {
            _ = frozen.changed() => {}
            _ = async { clean_jobs.as_mut().unwrap().tick().await }, if clean_jobs.is_some() => {
                if conn.subscribed {
                    let _ = conn.out.send(NEW_JOB.to_owned());
                }
            }
            line = lines.next() => match line {
                Some(Ok(line)) => {
                    let probe = *probe.get_or_insert_with(|| {
                        let first: Value = serde_json::from_str(&line).unwrap_or_default();
                        let agent = first["params"][0].as_str().unwrap_or_default();
                        let probe = first["method"] == "mining.subscribe" && agent.ends_with(" probe");
                        if probe {
                            state.probes.fetch_add(1, Ordering::SeqCst);
                            state.conns.lock().unwrap().remove(&id);
                        }
                        probe
                    });
                    if !probe {
                        let mut recorded = state.recorded.lock().unwrap();
                        let mut speaking = state.speaking.lock().unwrap();
                        speaking.insert(id);
                        recorded.push(line.clone());
                        state.sessions_at.lock().unwrap().push(speaking.len());
                    }
                    handle_pool_line(&state, &mut conn, &line);
                }
                _ => return,
            },
            Some(out) = rx.recv() => {
                let out = pool_command(&state, &mut conn, out);
                if writer.write_all(format!("{out}\n").as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Carries out a command sent through a connection's queue ([`NEW_JOB`] and the like) and returns
/// the lines to send; any other line is sent as it is.
fn pool_command(state: &PoolState, conn: &mut PoolConn, out: String) -> String {
    let notify = |conn: &mut PoolConn, clean: bool| {
        let mut job = new_job(conn.id, conn.jobs.len() as u64, state.opts.nbits);
        job.clean = clean;
        let line = json!({"id": null, "method": "mining.notify", "params": job.notify_params()}).to_string();
        conn.jobs.insert(job.id.clone(), (job, conn.difficulty));
        line
    };
    if out == NEW_JOB || out == NEW_JOB_KEPT {
        notify(conn, out == NEW_JOB)
    } else if let Some(d) = out.strip_prefix(SET_DIFFICULTY) {
        conn.difficulty = d.parse().expect("a difficulty");
        json!({"id": null, "method": "mining.set_difficulty", "params": [conn.difficulty]}).to_string()
    } else if let Some(size) = out.strip_prefix(SET_EXTRANONCE) {
        conn.extranonce1 = NEXT_EXTRANONCE1.fetch_add(1, Ordering::Relaxed).to_be_bytes();
        conn.extranonce2_size = size.parse().expect("a size");
        conn.jobs.clear();
        let params = json!([hex::encode(conn.extranonce1), conn.extranonce2_size]);
        let set = json!({"id": null, "method": "mining.set_extranonce", "params": params}).to_string();
        format!("{set}\n{}", notify(conn, true))
    } else {
        out
    }
}

fn reply(id: &Value, result: Value) -> String {
    json!({"id": id, "result": result, "error": null}).to_string()
}

fn error_reply(id: &Value, code: i64, message: &str) -> String {
    json!({"id": id, "result": null, "error": [code, message, null]}).to_string()
}

fn handle_pool_line(state: &PoolState, conn: &mut PoolConn, line: &str) {
    let opts = &state.opts;
    let out = conn.out.clone();
    let send = |s: String| {
        let _ = out.send(s);
    };
    let Ok(msg) = serde_json::from_str::<Value>(line) else {
        send(error_reply(&Value::Null, 20, "Parse error"));
        return;
    };
    let id = msg["id"].clone();
    let Some(method) = msg["method"].as_str() else {
        // A reply, e.g. to client.get_version: recorded, nothing to answer.
        return;
    };
    let params = msg["params"].as_array().cloned().unwrap_or_default();
    match method {
        "mining.subscribe" => {
            send(reply(
                &id,
                json!([
                    [["mining.set_difficulty", "1"], ["mining.notify", "1"]],
                    hex::encode(conn.extranonce1),
                    conn.extranonce2_size
                ]),
            ));
            conn.subscribed = true;
            let job = new_job(conn.id, conn.jobs.len() as u64, opts.nbits);
            send(json!({"id": null, "method": "mining.set_difficulty", "params": [conn.difficulty]}).to_string());
            send(json!({"id": null, "method": "mining.notify", "params": job.notify_params()}).to_string());
            conn.jobs.insert(job.id.clone(), (job, conn.difficulty));
        }
        "mining.authorize" => {
            let user = params.first().and_then(Value::as_str).unwrap_or_default().to_owned();
            if opts.authorize_once && !conn.authorized.is_empty() {
                // ckpool: "trying to authorise twice", and nothing is sent back.
            } else if opts.reject_user.as_deref() == Some(user.as_str())
                || opts.reject_password.is_some()
                    && opts.reject_password.as_deref() == params.get(1).and_then(Value::as_str)
            {
                send(json!({"id": id, "result": false, "error": [24, "Unauthorized worker", null]}).to_string());
            } else {
                conn.authorized.insert(user);
                send(reply(&id, json!(true)));
            }
        }
        "mining.configure" if opts.configure == Configure::Ignore => {}
        "mining.configure" if opts.configure == Configure::Refuse => send(error_reply(&id, 20, "Unknown method")),
        "mining.configure" => {
            let requested = params
                .get(1)
                .and_then(|o| o["version-rolling.mask"].as_str())
                .and_then(|m| u32::from_str_radix(m, 16).ok())
                .unwrap_or(u32::MAX);
            let mask = opts.version_mask & requested;
            conn.mask = Some(mask);
            send(reply(&id, json!({"version-rolling": true, "version-rolling.mask": format!("{mask:08x}")})));
        }
        "mining.extranonce.subscribe" | "mining.suggest_difficulty" => {
            if !id.is_null() {
                send(reply(&id, json!(true)));
            }
        }
        "mining.submit" => {
            let mode = *state.submit_replies.lock().unwrap();
            let verdict = match mode {
                SubmitReplies::Reject => Err((23, "Low difficulty share")),
                SubmitReplies::RejectWith(code) => Err((code, "Rejected")),
                _ => check_submit(state, conn, &params),
            };
            let line = match verdict {
                Ok(()) => {
                    state.accepted.fetch_add(1, Ordering::SeqCst);
                    reply(&id, json!(true))
                }
                Err((code, message)) => {
                    state.rejected.fetch_add(1, Ordering::SeqCst);
                    error_reply(&id, code, message)
                }
            };
            match mode {
                SubmitReplies::Immediate | SubmitReplies::Reject | SubmitReplies::RejectWith(_) => send(line),
                SubmitReplies::Delay(d) => {
                    let out = out.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(d).await;
                        let _ = out.send(line);
                    });
                }
                SubmitReplies::Never => {}
            }
        }
        _ => send(error_reply(&id, 20, "Unknown method")),
    }
}

fn new_job(conn: u64, n: u64, nbits: u32) -> Job {
    let seed = conn * 1000 + n;
    let ntime = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as u32;
    Job {
        id: format!("{conn:x}-{n}"),
        prevhash: filler(seed, 32).try_into().unwrap(),
        coinb1: [
            &hex::decode("01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff20")
                .unwrap()[..],
            &filler(seed + 1, 8),
        ]
        .concat(),
        coinb2: [&filler(seed + 2, 12)[..], &hex::decode("ffffffff0100f2052a010000001976a914").unwrap()[..]].concat(),
        branch: (0..2).map(|i| filler(seed * 7 + i, 32).try_into().unwrap()).collect(),
        version: 0x2000_0000,
        nbits,
        ntime,
        clean: true,
    }
}

fn hex_u32(s: &str) -> Option<u32> {
    (s.len() == 8).then(|| u32::from_str_radix(s, 16).ok()).flatten()
}

fn check_submit(state: &PoolState, conn: &mut PoolConn, params: &[Value]) -> Result<(), (i64, &'static str)> {
    let opts = &state.opts;
    let strings: Option<Vec<&str>> = params.iter().map(Value::as_str).collect();
    let p = match strings {
        Some(p) if p.len() == 5 || p.len() == 6 => p,
        _ => return Err((20, "Invalid params")),
    };
    if !conn.authorized.contains(p[0]) {
        return Err((24, "Unauthorized worker"));
    }
    let en2 = hex::decode(p[2]).unwrap_or_else(|_| p[2].as_bytes().to_vec());
    let ntime = hex_u32(p[3]);
    let nonce = hex_u32(p[4]);
    let bits = p.get(5).map(|b| hex_u32(b));
    if opts.validate {
        let Some((job, difficulty)) = conn.jobs.get(p[1]) else {
            return Err((21, "Job not found"));
        };
        if p[2].len() != conn.extranonce2_size * 2 || hex::decode(p[2]).is_err() {
            return Err((20, "Invalid extranonce2 size"));
        }
        let (Some(ntime), Some(nonce)) = (ntime, nonce) else {
            return Err((20, "Invalid ntime or nonce"));
        };
        if ntime < job.ntime || ntime > job.ntime + 7000 {
            return Err((20, "Ntime out of range"));
        }
        let version = match bits {
            None => job.version,
            Some(Some(bits)) if conn.mask.is_some_and(|m| bits & !m == 0) => {
                rolled_version(job.version, conn.mask.unwrap(), bits)
            }
            Some(_) => return Err((20, "Invalid version bits")),
        };
        let hash = job.share_hash(&conn.extranonce1, &en2, ntime, nonce, version);
        if hash_difficulty(&hash) >= nbits_difficulty(job.nbits) {
            state.blocks.fetch_add(1, Ordering::SeqCst);
        }
        let difficulty = if opts.difficulty_at_once { conn.difficulty } else { *difficulty };
        if hash_difficulty(&hash) < difficulty {
            return Err((23, "Low difficulty share"));
        }
    }
    if opts.reject_duplicates {
        let key = (p[1].to_owned(), en2, ntime.unwrap_or(0), nonce.unwrap_or(0), bits.flatten().unwrap_or(0));
        if !conn.seen.insert(key) {
            return Err((22, "Duplicate share"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The simulated miner.
// ---------------------------------------------------------------------------------------------

/// A message without a method is a reply.
pub fn is_reply(msg: &Value) -> bool {
    msg.get("method").is_none_or(Value::is_null)
}

/// A share found by [`SimMiner::grind`].
#[derive(Debug, Clone)]
pub struct Share {
    pub job_id: String,
    pub extranonce2: String,
    pub ntime: String,
    pub nonce: String,
    pub version_bits: Option<String>,
}

/// A miner connected to the proxy.
pub struct SimMiner {
    lines: FramedRead<tokio::net::tcp::OwnedReadHalf, LinesCodec>,
    writer: OwnedWriteHalf,
    next_id: u64,
    pub extranonce1: Vec<u8>,
    pub extranonce2_size: usize,
    pub difficulty: f64,
    pub job: Option<Job>,
    pub version_mask: Option<u32>,
    /// Every notification received, in order, as parsed.
    pub notifications: Vec<Value>,
    /// Every line received, raw, in order.
    pub raw: Vec<String>,
    /// Replies read while waiting for another id.
    stash: VecDeque<Value>,
    en2_counter: u64,
    pub closed: bool,
}

impl SimMiner {
    pub async fn connect(addr: SocketAddr) -> SimMiner {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect to the proxy timed out")
            .expect("connect to the proxy");
        let _ = stream.set_nodelay(true);
        let (reader, writer) = stream.into_split();
        SimMiner {
            lines: FramedRead::new(reader, LinesCodec::new_with_max_length(TEST_LINE_MAX)),
            writer,
            next_id: 1,
            extranonce1: Vec::new(),
            extranonce2_size: 0,
            difficulty: 1.0,
            job: None,
            version_mask: None,
            notifications: Vec::new(),
            raw: Vec::new(),
            stash: VecDeque::new(),
            en2_counter: 0,
            closed: false,
        }
    }

    /// Writes `line` and a `\n`. Errors are ignored: a closed proxy shows up on the read side.
    pub async fn send(&mut self, line: &str) {
        let _ = self.writer.write_all(format!("{line}\n").as_bytes()).await;
    }

    /// Writes raw bytes as they are, no newline added, within [`WAIT`]. Errors are ignored: the
    /// proxy may close mid-write (a line over the cap), which shows up on the read side.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        let _ = tokio::time::timeout(WAIT, self.writer.write_all(bytes)).await;
    }

    /// Half-closes the connection: the proxy sees end of input.
    pub async fn shutdown_write(&mut self) {
        let _ = self.writer.shutdown().await;
    }

    /// Closes the connection with a reset (`SO_LINGER` 0), as a miner that crashed or lost power
    /// does: the proxy's next read or write fails.
    pub fn reset(self) {
        let _ = socket2::SockRef::from(self.writer.as_ref()).set_linger(Some(Duration::ZERO));
    }

    /// Sends a request with the next numeric id and returns the id.
    pub async fn request(&mut self, method: &str, params: Value) -> Value {
        let id = json!(self.next_id);
        self.next_id += 1;
        self.request_with_id(id.clone(), method, params).await;
        id
    }

    pub async fn request_with_id(&mut self, id: Value, method: &str, params: Value) {
        self.send(&json!({"id": id, "method": method, "params": params}).to_string()).await;
    }

    /// The next raw line from the proxy, or `None` on timeout or close.
    pub async fn recv_line(&mut self, timeout: Duration) -> Option<String> {
        if self.closed {
            return None;
        }
        match tokio::time::timeout(timeout, self.lines.next()).await {
            Ok(Some(Ok(line))) => {
                self.raw.push(line.clone());
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    self.observe(&v);
                }
                Some(line)
            }
            Ok(_) => {
                self.closed = true;
                None
            }
            Err(_) => None,
        }
    }

    /// The next message from the proxy, or `None` on timeout or close.
    pub async fn recv_json(&mut self, timeout: Duration) -> Option<Value> {
        let line = self.recv_line(timeout).await?;
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("proxy sent invalid JSON {line:?}: {e}")))
    }

    fn observe(&mut self, v: &Value) {
        let Some(method) = v["method"].as_str() else { return };
        match method {
            "mining.notify" => {
                if let Some(job) = Job::from_notify(&v["params"]) {
                    self.job = Some(job);
                }
            }
            "mining.set_difficulty" => {
                if let Some(d) = v["params"][0].as_f64() {
                    self.difficulty = d;
                }
            }
            "mining.set_extranonce" => {
                if let (Some(en1), Some(size)) = (v["params"][0].as_str(), v["params"][1].as_u64()) {
                    self.extranonce1 = hex::decode(en1).unwrap_or_default();
                    self.extranonce2_size = size as usize;
                }
            }
            "mining.set_version_mask" => {
                self.version_mask = v["params"][0].as_str().and_then(|m| u32::from_str_radix(m, 16).ok());
            }
            _ => {}
        }
        self.notifications.push(v.clone());
    }

    /// The reply to `id`, skipping notifications and stashing other replies; `None` on timeout
    /// or close.
    pub async fn wait_reply_within(&mut self, id: &Value, timeout: Duration) -> Option<Value> {
        if let Some(pos) = self.stash.iter().position(|r| &r["id"] == id) {
            return self.stash.remove(pos);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let msg = self.recv_json(left).await?;
            if !is_reply(&msg) {
                continue;
            }
            if &msg["id"] == id {
                return Some(msg);
            }
            self.stash.push_back(msg);
        }
    }

    pub async fn wait_reply(&mut self, id: &Value) -> Option<Value> {
        self.wait_reply_within(id, WAIT).await
    }

    /// Replies read earlier while waiting for other ids.
    pub fn stashed(&self) -> Vec<Value> {
        self.stash.iter().cloned().collect()
    }

    /// The next `mining.notify` with clean_jobs set within `timeout` (a new pool session's first
    /// job, or a switch), skipping everything before it.
    pub async fn clean_job(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let msg = self.recv_json(left).await?;
            if msg["method"] == "mining.notify" && msg["params"][8] == true {
                return Some(msg);
            }
        }
    }

    /// Waits (bounded) until a job has arrived.
    pub async fn wait_job(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.job.is_none() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_json(left).await {
                Some(msg) if is_reply(&msg) => self.stash.push_back(msg),
                Some(_) => {}
                None => return false,
            }
        }
        true
    }

    /// `mining.subscribe`; records the extranonce. Returns the reply.
    pub async fn subscribe(&mut self) -> Value {
        let id = self.request("mining.subscribe", json!(["simminer/1.0"])).await;
        let reply = self.wait_reply(&id).await.expect("subscribe reply");
        assert!(reply["error"].is_null(), "subscribe failed: {reply}");
        self.extranonce1 = hex::decode(reply["result"][1].as_str().expect("extranonce1")).expect("extranonce1 hex");
        self.extranonce2_size = reply["result"][2].as_u64().expect("extranonce2_size") as usize;
        reply
    }

    pub async fn authorize(&mut self, worker: &str, password: &str) -> Value {
        let id = self.request("mining.authorize", json!([worker, password])).await;
        self.wait_reply(&id).await.expect("authorize reply")
    }

    /// Subscribe, authorize `worker`, and wait for the first job.
    pub async fn handshake(&mut self, worker: &str) {
        self.subscribe().await;
        let reply = self.authorize(worker, "x").await;
        assert_eq!(reply["result"], json!(true), "authorize failed: {reply}");
        assert!(self.wait_job().await, "no job after the handshake");
    }

    /// `mining.configure` for version rolling; records the negotiated mask. Returns the reply.
    pub async fn configure(&mut self, mask: &str) -> Value {
        let id = self
            .request(
                "mining.configure",
                json!([["version-rolling"], {"version-rolling.mask": mask, "version-rolling.min-bit-count": 2}]),
            )
            .await;
        let reply = self.wait_reply(&id).await.expect("configure reply");
        self.version_mask =
            reply["result"]["version-rolling.mask"].as_str().and_then(|m| u32::from_str_radix(m, 16).ok());
        reply
    }

    pub async fn submit(&mut self, worker: &str, share: &Share) -> Value {
        let mut params = json!([worker, share.job_id, share.extranonce2, share.ntime, share.nonce]);
        if let Some(bits) = &share.version_bits {
            params.as_array_mut().unwrap().push(json!(bits));
        }
        self.request("mining.submit", params).await
    }

    /// A share for the current job that is not checked against any difficulty: a fresh
    /// extranonce2 each time, so shares never repeat.
    pub fn any_share(&mut self) -> Share {
        let job = self.job.clone().expect("a job to submit on");
        self.en2_counter += 1;
        Share {
            job_id: job.id,
            extranonce2: self.next_extranonce2(),
            ntime: format!("{:08x}", job.ntime),
            nonce: format!("{:08x}", self.en2_counter as u32),
            version_bits: None,
        }
    }

    fn next_extranonce2(&mut self) -> String {
        self.en2_counter += 1;
        let bytes = self.en2_counter.to_be_bytes();
        let size = self.extranonce2_size.max(1);
        let mut en2 = vec![0u8; size];
        let n = size.min(8);
        en2[size - n..].copy_from_slice(&bytes[8 - n..]);
        hex::encode(en2)
    }

    /// Finds a nonce whose hash meets the current difficulty. With `version_bits`, rolls the
    /// version inside the negotiated mask. Bounded: panics after two million hashes.
    pub fn grind(&mut self, version_bits: Option<u32>) -> Share {
        let job = self.job.clone().expect("a job to grind on");
        let en2_hex = self.next_extranonce2();
        let en2 = hex::decode(&en2_hex).unwrap();
        let version = match version_bits {
            Some(bits) => rolled_version(job.version, self.version_mask.expect("a negotiated mask"), bits),
            None => job.version,
        };
        let root = job.merkle_root(&self.extranonce1, &en2);
        let mut h = header(version, &swap_words(&job.prevhash), &root, job.ntime, job.nbits, 0);
        for nonce in 0u32..2_000_000 {
            h[76..80].copy_from_slice(&nonce.to_le_bytes());
            if hash_difficulty(&sha256d(&h)) >= self.difficulty {
                return Share {
                    job_id: job.id,
                    extranonce2: en2_hex,
                    ntime: format!("{:08x}", job.ntime),
                    nonce: format!("{nonce:08x}"),
                    version_bits: version_bits.map(|b| format!("{b:08x}")),
                };
            }
        }
        panic!("no share found at difficulty {}", self.difficulty);
    }

    /// Reads until the proxy closes the connection; true if it did within `timeout`. What is
    /// read meanwhile is observed and, for replies, stashed.
    pub async fn expect_closed(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.closed {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            if let Some(line) = self.recv_line(left).await {
                if let Ok(msg) = serde_json::from_str::<Value>(&line) {
                    if is_reply(&msg) {
                        self.stash.push_back(msg);
                    }
                }
            }
        }
        true
    }

    /// Every message until the proxy closes the connection (stashed replies first), and
    /// whether it closed within `timeout`.
    pub async fn drain_until_closed(&mut self, timeout: Duration) -> (Vec<Value>, bool) {
        let mut messages: Vec<Value> = self.stash.drain(..).collect();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return (messages, false);
            }
            match self.recv_json(left).await {
                Some(msg) => messages.push(msg),
                None => return (messages, self.closed),
            }
        }
    }

    /// The miner's own end of the connection, as the proxy sees it without a PROXY header.
    pub fn local_addr(&self) -> SocketAddr {
        self.writer.local_addr().expect("a connected socket has a local address")
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy under test.
// ---------------------------------------------------------------------------------------------

/// A config for a proxy on 127.0.0.1:0 in front of the pool at `pool`, with fast retries.
pub fn proxy_config(pool: SocketAddr) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.http.listen = "127.0.0.1:0".parse().unwrap();
    c.pools = vec![PoolConfig {
        url: format!("stratum+tcp://{pool}"),
        user: "acct".into(),
        password: "pw".into(),
        ..PoolConfig::default()
    }];
    c.upstream.connect_timeout = 2;
    c.upstream.retry_initial_ms = 20;
    c.upstream.retry_max_ms = 200;
    c
}

/// Both upstream modes: a safeguard or a check that holds in one must hold in the other.
pub const MODES: [Mode; 2] = [Mode::Passthrough, Mode::Aggregate];

/// [`proxy_config`] in `mode`. Aggregated miners work at the pool's difficulty, 1e-12 by default,
/// so that `any_share` passes the proxy's check and is forwarded in either mode.
pub fn mode_config(mode: Mode, pool: SocketAddr) -> Config {
    let mut c = proxy_config(pool);
    c.upstream.mode = mode;
    c.vardiff.start_difficulty = 1e-12;
    c.vardiff.min_difficulty = 1e-12;
    c
}

/// [`mode_config`] in front of `pools`, in priority order.
pub fn pools_config(mode: Mode, pools: &[&MockPool]) -> Config {
    let mut c = mode_config(mode, pools[0].addr);
    c.pools = pools
        .iter()
        .map(|p| PoolConfig { url: p.url(), user: "acct".into(), password: "pw".into(), ..PoolConfig::default() })
        .collect();
    c
}

/// Pool sessions a proxy in `mode` holds with no miner: an aggregate proxy opens its first pool
/// session at start, a passthrough proxy opens one per miner.
pub fn idle_pool_sessions(mode: Mode) -> usize {
    match mode {
        Mode::Passthrough => 0,
        Mode::Aggregate => 1,
    }
}

/// Runs `async fn $name(mode: Mode)` as two tests, `$name::passthrough` and `$name::aggregate`,
/// under the test attribute given (e.g. `tokio::test`).
#[macro_export]
macro_rules! in_both_modes {
    ($test:meta, $name:ident) => {
        mod $name {
            use loka_stratum::config::Mode;
            /// The two modes of one case take turns: the metrics recorder is the process's, and a
            /// case's counters must not move under it from its twin.
            static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
            #[$test]
            async fn passthrough() {
                let _turn = TURN.lock().await;
                super::$name(Mode::Passthrough).await
            }
            #[$test]
            async fn aggregate() {
                let _turn = TURN.lock().await;
                super::$name(Mode::Aggregate).await
            }
        }
    };
}

/// A port nothing listens on (until a test binds it).
pub fn reserve_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

pub struct Proxy {
    pub addr: SocketAddr,
    pub http: SocketAddr,
    /// The TLS miner listener, when `server.tls_listen` is set.
    pub tls: Option<SocketAddr>,
    pub registry: Arc<ConnectionManager>,
    pub inventory: Arc<Inventory>,
    pub stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<()>,
    /// Applies a new configuration as SIGHUP would.
    pub reloader: Reloader,
    /// The proxy's own data directory, when the test gave none; removed with the proxy.
    pub data_dir: Option<tempfile::TempDir>,
}

/// Logs go to the test output when `RUST_LOG` is set.
fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

pub async fn spawn_proxy(mut config: Config) -> Proxy {
    init_logs();
    // Each proxy its own worker store, unless the test shares one on purpose (a restart).
    let data_dir = config.inventory.data_dir.is_empty().then(|| tempfile::tempdir().expect("a temporary directory"));
    if let Some(dir) = &data_dir {
        config.inventory.data_dir = dir.path().display().to_string();
    }
    config.validate().expect("test config is valid");
    let server = Server::bind(config).await.expect("proxy binds");
    let (stop, rx) = oneshot::channel::<()>();
    let addr = server.local_addr();
    let http = server.http_addr();
    let tls = server.tls_addr();
    let registry = server.registry();
    let inventory = server.inventory();
    let reloader = server.reloader();
    let task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    Proxy { addr, http, tls, registry, inventory, stop: Some(stop), task, reloader, data_dir }
}

impl Proxy {
    pub async fn miner(&self) -> SimMiner {
        SimMiner::connect(self.addr).await
    }

    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.http, path).await
    }

    /// Starts the drain without waiting for it.
    pub fn trigger_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits (bounded) for `run` to return; true if it did.
    pub async fn stopped_within(&mut self, timeout: Duration) -> bool {
        match tokio::time::timeout(timeout, &mut self.task).await {
            Ok(result) => {
                result.expect("the proxy task panicked");
                true
            }
            Err(_) => false,
        }
    }

    /// Triggers the drain and asserts that `run` returns within 20 s.
    pub async fn shutdown(mut self) {
        self.trigger_shutdown();
        assert!(self.stopped_within(Duration::from_secs(20)).await, "Server::run did not return after shutdown");
    }
}

/// A minimal HTTP/1.1 GET: `(status, body)`.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (head, body) = http_get_with_head(addr, path).await;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    (status, body)
}

/// A minimal HTTP/1.1 GET: the response head (status line and headers, lower-cased) and the body.
pub async fn http_get_with_head(addr: SocketAddr, path: &str) -> (String, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path} timed out"))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let text = String::from_utf8(buf).expect("HTTP response is UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP header end in {text:?}"));
    let head = head.to_ascii_lowercase();
    let chunked = head.lines().any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    (head, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    for _ in 0..100_000 {
        let Some((size, rest)) = body.split_once("\r\n") else { break };
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Small helpers.
// ---------------------------------------------------------------------------------------------

/// Polls `check` every 20 ms until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sum of the samples of `name` whose labels include every pair in `labels`; `None` if
/// there is none.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let (label_text, value) = if let Some(inner) = rest.strip_prefix('{') {
            let Some((l, v)) = inner.rsplit_once('}') else { continue };
            (l, v)
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue;
        };
        let found = parse_labels(label_text);
        if labels.iter().all(|(k, v)| found.get(*k).map(String::as_str) == Some(*v)) {
            let Ok(value) = value.trim().parse::<f64>() else { continue };
            *sum.get_or_insert(0.0) += value;
        }
    }
    sum
}

fn parse_labels(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = text.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return out;
        }
        if chars.next() != Some('"') {
            return out;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.extend(chars.next()),
                '"' => break,
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').trim().to_owned(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
}
