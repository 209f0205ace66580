//! The sans-IO state machine of one passthrough session: a miner line or a pool line goes in;
//! bytes for the miner, bytes for the pool and events come out. Sockets, timers and metrics of
//! share outcomes live around it, in [`connection`](crate::connection).
//!
//! Every miner request is relayed upstream under the proxy's own id, so that replies always
//! correlate, and every request that expects a reply gets exactly one: the pool's, or an error
//! when the pool goes away or the proxy shuts down.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::counter;
use tokio::time::Instant;

use crate::auth::{AuthManager, Rewrite};
use crate::config::PoolConfig;
use crate::jobs::{JobBook, Lookup};
use crate::metrics as m;
use crate::protocol::miner::{self, Call, MinerMessage, Submit};
use crate::protocol::pool::{self, PoolMessage};
use crate::protocol::{code, verdict, write, Id};
use crate::registry::{CloseReason, Phase};
use crate::submissions::{self, LocalReject, PoolVerdict, RejectReason, ShareContext, ValidShare};

/// Requests in flight to the pool per session. A miner past it gets an error at once, so a
/// silent pool cannot make the pending map grow.
pub const MAX_PENDING: usize = 256;

/// Consecutive malformed lines that close the connection.
const MALFORMED_STREAK_CLOSE: u8 = 2;

/// The first step of every miner line, in either mode: parse it, count it, and answer a
/// malformed one, closing on the second in a row.
#[derive(Debug, Default)]
pub struct MinerInput {
    malformed_streak: u8,
}

impl MinerInput {
    /// The request in `line`, if it is one. A reply (a line without a method) is ignored; a
    /// malformed line gets error 20, with its id when that could be read.
    pub fn parse<'a>(
        &mut self,
        line: &'a [u8],
        to_miner: &mut Vec<u8>,
        events: &mut Vec<Event>,
    ) -> Option<miner::Request<'a>> {
        match miner::parse(line) {
            Ok(MinerMessage::Request(request)) => {
                self.malformed_streak = 0;
                let method = m::method_label(&request.method);
                counter!(m::MESSAGES, "method" => method, "direction" => "from_miner").increment(1);
                Some(request)
            }
            Ok(MinerMessage::Response { .. }) => None,
            Err(e) => {
                counter!(m::MALFORMED, "source" => "miner").increment(1);
                write::error(to_miner, &e.id.unwrap_or_else(Id::null), code::OTHER, &e.kind.to_string());
                self.malformed_streak += 1;
                if self.malformed_streak >= MALFORMED_STREAK_CLOSE {
                    events.push(Event::Close(CloseReason::Malformed));
                }
                None
            }
        }
    }
}

pub const VERSION: &str = concat!("loka-stratum/", env!("CARGO_PKG_VERSION"));

/// Something the session's driver has to act on besides moving bytes.
#[derive(Debug, Clone)]
pub enum Event {
    /// A share passed the proxy's checks (in passthrough mode it is forwarded next).
    ShareValid(ValidShare),
    /// The proxy's checks refused a share; the miner got an error.
    ShareRefused(RejectReason),
    /// A share was sent to the pool.
    ShareForwarded,
    /// The pool's verdict on a forwarded share, with the time to its reply if it came.
    PoolVerdict(PoolVerdict, Option<Duration>),
    /// The pool accepted an authorize for this worker (the name the miner uses).
    Authorized(String),
    Difficulty(f64),
    /// The pool broke the protocol (a job, difficulty or reply it could not have meant): it is
    /// judged unhealthy. A `Close` follows.
    PoolFault(&'static str),
    /// The pool asked for a reconnect, to this host and port if given. A `Close` follows.
    PoolReconnect {
        host: Option<String>,
        port: Option<u16>,
    },
    /// The session is over; the driver flushes what is buffered and closes.
    Close(CloseReason),
}

/// What one step produced. The driver writes the buffers out and handles the events, then clears it.
#[derive(Debug, Default)]
pub struct Output {
    pub to_miner: Vec<u8>,
    pub to_pool: Vec<u8>,
    pub events: Vec<Event>,
}

impl Output {
    pub fn clear(&mut self) {
        self.to_miner.clear();
        self.to_pool.clear();
        self.events.clear();
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        self.events.iter().find_map(|e| match e {
            Event::Close(r) => Some(*r),
            _ => None,
        })
    }
}

#[derive(Debug)]
enum Pending {
    Subscribe,
    Authorize { miner_user: String },
    Configure,
    Submit,
    Other,
}

#[derive(Debug)]
struct InFlight {
    /// The miner's id; `None` for a notification, whose reply is not passed on.
    miner_id: Option<Id>,
    kind: Pending,
    sent_at: Instant,
}

/// One miner's session with its own upstream pool session.
#[derive(Debug)]
pub struct Session {
    auth: Arc<AuthManager>,
    /// The credential rewrite in force when the session began.
    rewrite: Arc<Rewrite>,
    pool: Arc<PoolConfig>,
    /// The miner's address, for the auth backoff.
    peer: IpAddr,
    /// When the pool last sent a job.
    last_notify: Option<Instant>,
    subscribed: bool,
    next_id: u64,
    pending: HashMap<u64, InFlight>,
    jobs: JobBook,
    /// Workers the pool accepted on this connection.
    workers: Vec<String>,
    extranonce1: Vec<u8>,
    extranonce2_size: usize,
    version_mask: Option<u32>,
    input: MinerInput,
}

impl Session {
    pub fn new(auth: Arc<AuthManager>, pool: Arc<PoolConfig>, peer: IpAddr) -> Self {
        Self {
            rewrite: auth.rewrite(),
            auth,
            pool,
            peer,
            last_notify: None,
            subscribed: false,
            next_id: 1,
            pending: HashMap::new(),
            jobs: JobBook::default(),
            workers: Vec::new(),
            extranonce1: Vec::new(),
            extranonce2_size: 0,
            version_mask: None,
            input: MinerInput::default(),
        }
    }

    /// Subscribed once the pool accepted a subscribe; authorized once it also accepted a worker.
    pub fn phase(&self) -> Phase {
        Phase::of(self.subscribed, !self.workers.is_empty())
    }

    pub fn extranonce(&self) -> (&[u8], usize) {
        (&self.extranonce1, self.extranonce2_size)
    }

    pub fn version_mask(&self) -> Option<u32> {
        self.version_mask
    }

    pub fn difficulty(&self) -> f64 {
        self.jobs.difficulty()
    }

    /// When the pool last sent a job, if it has.
    pub fn last_notify(&self) -> Option<Instant> {
        self.last_notify
    }

    /// Requests relayed upstream that still wait for the pool's reply.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// One line from the miner.
    pub fn on_miner_line(&mut self, line: &[u8], now: Instant, out: &mut Output) {
        let Some(request) = self.input.parse(line, &mut out.to_miner, &mut out.events) else { return };

        if self.pending.len() >= MAX_PENDING {
            if let Some(id) = (!request.id.is_null()).then_some(&request.id) {
                write::error(&mut out.to_miner, id, code::OTHER, "too many requests in flight");
            }
            return;
        }
        let miner_id = (!request.id.is_null()).then(|| request.id.clone());
        if let Call::Submit(submit) = &request.call {
            match self.judge(submit) {
                Ok(valid) => out.events.push(Event::ShareValid(valid)),
                Err(reject) => {
                    // Refused here, answered at once, and never sent to the pool.
                    if let Some(id) = &miner_id {
                        write::error(&mut out.to_miner, id, reject.code, &reject.message);
                    }
                    out.events.push(Event::ShareRefused(reject.reason));
                    return;
                }
            }
        }
        let upstream_id = self.next_id;
        self.next_id += 1;
        let kind = match request.call {
            Call::Subscribe { .. } => Pending::Subscribe,
            Call::Authorize { user, password } => {
                if let Some(message) = self.auth.refusal(self.peer, now) {
                    if let Some(id) = &miner_id {
                        write::error(&mut out.to_miner, id, code::UNAUTHORIZED, &message);
                    }
                    return;
                }
                let creds = self.rewrite.credentials(&user, &password, &self.pool);
                write::request(&mut out.to_pool, upstream_id, miner::AUTHORIZE, &[&creds.user, &creds.password]);
                self.track(upstream_id, miner_id, Pending::Authorize { miner_user: user }, now);
                return;
            }
            Call::Configure(_) => Pending::Configure,
            Call::Submit(s) => {
                if self.rewrite.rewrites() {
                    let worker = self.rewrite.upstream_user(&s.worker, &self.pool);
                    let mut params = vec![&worker, &s.job_id, &s.extranonce2, &s.ntime, &s.nonce];
                    params.extend(s.version_bits.as_ref());
                    write::request(&mut out.to_pool, upstream_id, miner::SUBMIT, &params);
                    self.track(upstream_id, miner_id, Pending::Submit, now);
                    out.events.push(Event::ShareForwarded);
                    return;
                }
                out.events.push(Event::ShareForwarded);
                Pending::Submit
            }
            Call::ExtranonceSubscribe | Call::SuggestDifficulty(_) | Call::Unknown => Pending::Other,
        };
        write::request_raw(&mut out.to_pool, upstream_id, &request.method, request.params);
        self.track(upstream_id, miner_id, kind, now);
    }

    /// The local checks, in order: subscribed, an authorized worker, a known job, then the share
    /// itself.
    fn judge(&mut self, submit: &Submit) -> Result<ValidShare, LocalReject> {
        if !self.subscribed {
            return Err(LocalReject::new(code::NOT_SUBSCRIBED, "Not subscribed", RejectReason::NotSubscribed));
        }
        if !self.workers.contains(&submit.worker) {
            return Err(LocalReject::new(code::UNAUTHORIZED, "Unauthorized worker", RejectReason::Unauthorized));
        }
        let miner = ShareContext {
            extranonce1: &self.extranonce1,
            extranonce2_size: self.extranonce2_size,
            version_mask: self.version_mask.unwrap_or(0),
        };
        match self.jobs.lookup(&submit.job_id) {
            Lookup::Live(job) => {
                let valid = submissions::check(job.as_target(), miner, submit, |k| job.is_duplicate(k))?;
                job.remember(valid.key);
                Ok(valid)
            }
            Lookup::Stale => Err(LocalReject::new(code::JOB_NOT_FOUND, "Job not found (stale)", RejectReason::Stale)),
            Lookup::Unknown => Err(LocalReject::new(code::JOB_NOT_FOUND, "Job not found", RejectReason::BadJob)),
        }
    }

    fn track(&mut self, upstream_id: u64, miner_id: Option<Id>, kind: Pending, now: Instant) {
        self.pending.insert(upstream_id, InFlight { miner_id, kind, sent_at: now });
    }

    /// One line from the pool.
    pub fn on_pool_line(&mut self, line: &[u8], now: Instant, out: &mut Output) {
        let message = match pool::parse(line) {
            Ok(msg) => msg,
            Err(e) => {
                // A pool that sends what it cannot have meant is not trusted with miners' work.
                counter!(m::MALFORMED, "source" => "pool").increment(1);
                tracing::warn!(error = %e, "unparseable line from the pool");
                return self.pool_fault("unparseable message", out);
            }
        };
        let method = match &message {
            PoolMessage::Response { .. } => None,
            PoolMessage::Notify(_) => Some(pool::NOTIFY),
            PoolMessage::SetDifficulty(_) => Some(pool::SET_DIFFICULTY),
            PoolMessage::SetExtranonce { .. } => Some(pool::SET_EXTRANONCE),
            PoolMessage::SetVersionMask(_) => Some(pool::SET_VERSION_MASK),
            PoolMessage::Reconnect { .. } => Some(pool::RECONNECT),
            PoolMessage::ShowMessage(_) => Some(pool::SHOW_MESSAGE),
            PoolMessage::GetVersion { .. } => Some(pool::GET_VERSION),
            PoolMessage::Unknown { .. } => Some("other"),
        };
        if let Some(method) = method {
            counter!(m::MESSAGES, "method" => method, "direction" => "from_pool").increment(1);
        }
        let relay = |out: &mut Output| {
            out.to_miner.extend_from_slice(line);
            out.to_miner.push(b'\n');
        };
        match message {
            PoolMessage::Response { id, result, error } => {
                let Some(flight) = id.as_u64().and_then(|id| self.pending.remove(&id)) else {
                    tracing::debug!(?id, "reply to no request in flight dropped");
                    return;
                };
                let subscribed = match flight.kind {
                    Pending::Subscribe if error.is_none() => {
                        let sub = result.and_then(pool::parse_subscribe_result);
                        if sub.is_none() {
                            // Relaying an extranonce the miner cannot use would only waste its work.
                            self.pending.insert(id.as_u64().unwrap_or_default(), flight);
                            return self.pool_fault("invalid subscribe reply", out);
                        }
                        sub
                    }
                    _ => None,
                };
                if let Some(miner_id) = &flight.miner_id {
                    write::relayed_reply(&mut out.to_miner, miner_id, result, error);
                }
                let ok = verdict(result, error);
                match flight.kind {
                    Pending::Subscribe => {
                        if let Some(sub) = subscribed {
                            self.extranonce1 = sub.extranonce1;
                            self.extranonce2_size = sub.extranonce2_size;
                            self.subscribed = true;
                        }
                    }
                    Pending::Authorize { miner_user } => {
                        if ok.is_ok() {
                            self.auth.succeeded(self.peer);
                            if !self.workers.contains(&miner_user) {
                                self.workers.push(miner_user.clone());
                            }
                            out.events.push(Event::Authorized(miner_user));
                        } else {
                            self.auth.failed(self.peer, now);
                        }
                    }
                    Pending::Configure => {
                        if let Some(mask) = result.filter(|_| error.is_none()).and_then(pool::parse_configure_result) {
                            self.version_mask = Some(mask);
                        }
                    }
                    Pending::Submit => {
                        let verdict = match ok {
                            Ok(()) => PoolVerdict::Accepted,
                            Err((code, _)) => PoolVerdict::Rejected(RejectReason::from_code(code)),
                        };
                        let rtt = Some(now.saturating_duration_since(flight.sent_at));
                        out.events.push(Event::PoolVerdict(verdict, rtt));
                    }
                    Pending::Other => {}
                }
            }
            PoolMessage::Notify(n) => {
                self.last_notify = Some(now);
                relay(out);
                self.jobs.on_notify(n);
            }
            PoolMessage::SetDifficulty(d) => {
                self.jobs.set_difficulty(d);
                out.events.push(Event::Difficulty(d));
                relay(out);
            }
            PoolMessage::SetExtranonce { extranonce1, extranonce2_size } => {
                self.extranonce1 = extranonce1;
                self.extranonce2_size = extranonce2_size;
                relay(out);
            }
            PoolMessage::SetVersionMask(mask) => {
                self.version_mask = Some(mask);
                relay(out);
            }
            PoolMessage::Reconnect { host, port, .. } => {
                // The miner reconnects to the proxy, which picks the pool; the pool's target is
                // never relayed to miners.
                self.fail_pending("upstream reconnecting", out);
                out.events.push(Event::PoolReconnect { host, port });
                out.events.push(Event::Close(CloseReason::PoolReconnect));
            }
            PoolMessage::ShowMessage(_) => relay(out),
            PoolMessage::GetVersion { id } => write::result(&mut out.to_pool, &id, &VERSION),
            PoolMessage::Unknown { method } => {
                tracing::debug!(%method, "unknown pool notification relayed");
                relay(out);
            }
        }
    }

    fn pool_fault(&mut self, reason: &'static str, out: &mut Output) {
        self.fail_pending("upstream unavailable", out);
        out.events.push(Event::PoolFault(reason));
        out.events.push(Event::Close(CloseReason::PoolFault));
    }

    /// The pool sent a line over the cap: no pool means that.
    pub fn on_pool_line_too_long(&mut self, out: &mut Output) {
        self.pool_fault("line over max_line_bytes", out);
    }

    /// The pool sent no job within the job timeout: it is judged dead.
    pub fn on_job_timeout(&mut self, out: &mut Output) {
        self.pool_fault("no job within job_timeout", out);
    }

    /// The pool connection is gone: every request in flight gets an error, then the session ends.
    pub fn on_pool_lost(&mut self, out: &mut Output) {
        self.fail_pending("upstream unavailable", out);
        out.events.push(Event::Close(CloseReason::UpstreamLost));
    }

    /// The miner is leaving or being closed (evicted, over a limit): requests in flight get an
    /// error if it can still read one, and their shares are counted as closed.
    pub fn on_miner_closing(&mut self, out: &mut Output) {
        self.fail_pending("connection closing", out);
    }

    /// The shutdown grace period is over: requests still in flight get an error.
    pub fn on_shutdown_deadline(&mut self, out: &mut Output) {
        self.fail_pending("proxy shutting down", out);
        out.events.push(Event::Close(CloseReason::Shutdown));
    }

    fn fail_pending(&mut self, message: &str, out: &mut Output) {
        let mut flights: Vec<_> = self.pending.drain().collect();
        flights.sort_by_key(|(id, _)| *id);
        for (_, flight) in flights {
            if let Some(miner_id) = &flight.miner_id {
                write::error(&mut out.to_miner, miner_id, code::OTHER, message);
            }
            if let Pending::Submit = flight.kind {
                out.events.push(Event::PoolVerdict(PoolVerdict::Unanswered, None));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::share;

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

    fn session(template: &str) -> Session {
        let pool = PoolConfig {
            url: "stratum+tcp://127.0.0.1:1".into(),
            user: "acct".into(),
            password: "pw".into(),
            ..PoolConfig::default()
        };
        let auth = AuthManager::new(template, Duration::from_secs(3), Duration::from_secs(600));
        Session::new(Arc::new(auth), Arc::new(pool), "10.0.0.1".parse().unwrap())
    }

    fn lines(buf: &[u8]) -> Vec<serde_json::Value> {
        buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect()
    }

    fn miner(s: &mut Session, line: &str) -> Output {
        let mut out = Output::default();
        s.on_miner_line(line.as_bytes(), Instant::now(), &mut out);
        out
    }

    fn pool(s: &mut Session, line: &str) -> Output {
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

    fn set_difficulty(s: &mut Session, d: f64) {
        pool(s, &format!(r#"{{"id":null,"method":"mining.set_difficulty","params":[{d:e}]}}"#));
    }

    /// A session past subscribe and authorize (worker "farm.rig1"), with job "j1" at EASY.
    fn ready(template: &str) -> Session {
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
        let cb = share::coinbase_hash(
            &hex::decode(COINB1).unwrap(),
            &EN1,
            &en2.to_be_bytes(),
            &hex::decode(COINB2).unwrap(),
        );
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
    fn local_error(s: &mut Session, line: &str) -> (i64, String, RejectReason) {
        let out = miner(s, line);
        assert!(out.to_pool.is_empty(), "a local reject must not reach the pool: {line}");
        let reply = &lines(&out.to_miner)[0];
        let Some(Event::ShareRefused(reason)) = out.events.first() else { panic!("{:?}", out.events) };
        (reply["error"][0].as_i64().unwrap(), reply["error"][1].as_str().unwrap().to_owned(), *reason)
    }

    fn forwarded(s: &mut Session, line: &str) -> serde_json::Value {
        let out = miner(s, line);
        assert!(out.to_miner.is_empty(), "{:?}", String::from_utf8_lossy(&out.to_miner));
        assert!(out.events.iter().any(|e| matches!(e, Event::ShareForwarded)));
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
        assert!(matches!(
            &out.events[0],
            Event::PoolVerdict(PoolVerdict::Rejected(RejectReason::LowDifficulty), Some(_))
        ));
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

    #[test]
    fn configure_reply_records_the_mask() {
        let mut s = session("");
        miner(
            &mut s,
            r#"{"id":1,"method":"mining.configure","params":[["version-rolling"],{"version-rolling.mask":"1fffe000","version-rolling.min-bit-count":2}]}"#,
        );
        let out = pool(
            &mut s,
            r#"{"id":1,"result":{"version-rolling":true,"version-rolling.mask":"1fffe000"},"error":null}"#,
        );
        assert_eq!(lines(&out.to_miner)[0]["result"]["version-rolling.mask"], "1fffe000");
        assert_eq!(s.version_mask(), Some(0x1fffe000));
    }

    #[test]
    fn in_flight_is_bounded() {
        let mut s = ready("");
        for i in 0..MAX_PENDING as u64 + 5 {
            let out = miner(&mut s, &valid_submit(i, i as u32));
            if i >= MAX_PENDING as u64 {
                assert!(out.to_pool.is_empty());
                assert_eq!(lines(&out.to_miner)[0]["error"][0], 20);
            }
        }
        assert_eq!(s.pending(), MAX_PENDING);
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
        pool(&mut s, &notify("j2", true));
        let (code, _, reason) = local_error(&mut s, &valid_submit(6, 1));
        assert_eq!((code, reason), (21, RejectReason::Stale));
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
}
