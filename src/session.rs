//! The sans-IO state machine of one passthrough session: a miner line or a pool line goes in;
//! bytes for the miner, bytes for the pool and events come out. Sockets, timers and metrics of
//! share outcomes live around it, in [`connection`](crate::connection).
//!
//! Every miner request is relayed upstream under the proxy's own id, so that replies always
//! correlate, and every request that expects a reply gets exactly one: the pool's, or an error
//! when the pool goes away or the proxy shuts down.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use metrics::counter;
use tokio::time::Instant;

use crate::auth::AuthManager;
use crate::config::PoolConfig;
use crate::jobs::JobBook;
use crate::metrics as m;
use crate::protocol::miner::{self, Call, MinerMessage};
use crate::protocol::pool::{self, PoolMessage};
use crate::protocol::{code, verdict, write, Id, ParseError};
use crate::registry::{CloseReason, Phase};
use crate::submissions::{RejectReason, ShareOutcome};

/// Requests in flight to the pool per session. A miner past it gets an error at once, so a
/// silent pool cannot make the pending map grow.
pub const MAX_PENDING: usize = 256;

/// Consecutive malformed lines that close the connection.
const MALFORMED_STREAK_CLOSE: u8 = 2;

pub const VERSION: &str = concat!("loka-stratum/", env!("CARGO_PKG_VERSION"));

/// Something the session's driver has to act on besides moving bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A share was sent to the pool.
    ShareForwarded,
    /// A forwarded share got its answer (or never will).
    Share(ShareOutcome),
    /// The pool accepted an authorize for this worker (the name the miner uses).
    Authorized(String),
    Difficulty(f64),
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
    Submit { difficulty: f64 },
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
    pool: Arc<PoolConfig>,
    phase: Phase,
    next_id: u64,
    pending: HashMap<u64, InFlight>,
    jobs: JobBook,
    /// Workers the pool accepted on this connection.
    workers: Vec<String>,
    extranonce1: Vec<u8>,
    extranonce2_size: usize,
    version_mask: Option<u32>,
    malformed_streak: u8,
}

impl Session {
    pub fn new(auth: Arc<AuthManager>, pool: Arc<PoolConfig>) -> Self {
        Self {
            auth,
            pool,
            phase: Phase::Connected,
            next_id: 1,
            pending: HashMap::new(),
            jobs: JobBook::default(),
            workers: Vec::new(),
            extranonce1: Vec::new(),
            extranonce2_size: 0,
            version_mask: None,
            malformed_streak: 0,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn workers(&self) -> &[String] {
        &self.workers
    }

    pub fn extranonce(&self) -> (&[u8], usize) {
        (&self.extranonce1, self.extranonce2_size)
    }

    pub fn version_mask(&self) -> Option<u32> {
        self.version_mask
    }

    pub fn difficulty(&self) -> Option<f64> {
        self.jobs.difficulty()
    }

    /// Requests relayed upstream that still wait for the pool's reply.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// One line from the miner.
    pub fn on_miner_line(&mut self, line: &[u8], now: Instant, out: &mut Output) {
        let request = match miner::parse(line) {
            Ok(MinerMessage::Request(r)) => r,
            Ok(MinerMessage::Response { .. }) => return,
            Err(e) => return self.malformed(e, out),
        };
        self.malformed_streak = 0;
        counter!(m::MESSAGES, "method" => m::method_label(&request.method), "direction" => "from_miner").increment(1);

        if self.pending.len() >= MAX_PENDING {
            if let Some(id) = (!request.id.is_null()).then_some(&request.id) {
                write::error(&mut out.to_miner, id, code::OTHER, "too many requests in flight");
            }
            return;
        }
        let miner_id = (!request.id.is_null()).then(|| request.id.clone());
        let upstream_id = self.next_id;
        self.next_id += 1;
        let kind = match request.call {
            Call::Subscribe { .. } => Pending::Subscribe,
            Call::Authorize { user, password } => {
                let creds = self.auth.credentials(&user, &password, &self.pool);
                write::request(&mut out.to_pool, upstream_id, miner::AUTHORIZE, &[&creds.user, &creds.password]);
                self.track(upstream_id, miner_id, Pending::Authorize { miner_user: user }, now);
                return;
            }
            Call::Configure(_) => Pending::Configure,
            Call::Submit(s) => {
                let difficulty = self.jobs.difficulty_for(&s.job_id).unwrap_or(0.0);
                if self.auth.rewrites() {
                    let worker = self.auth.upstream_user(&s.worker, &self.pool);
                    let mut params = vec![&worker, &s.job_id, &s.extranonce2, &s.ntime, &s.nonce];
                    params.extend(s.version_bits.as_ref());
                    write::request(&mut out.to_pool, upstream_id, miner::SUBMIT, &params);
                    self.track(upstream_id, miner_id, Pending::Submit { difficulty }, now);
                    out.events.push(Event::ShareForwarded);
                    return;
                }
                out.events.push(Event::ShareForwarded);
                Pending::Submit { difficulty }
            }
            Call::ExtranonceSubscribe | Call::SuggestDifficulty(_) | Call::Unknown => Pending::Other,
        };
        write::request_raw(&mut out.to_pool, upstream_id, &request.method, request.params);
        self.track(upstream_id, miner_id, kind, now);
    }

    fn track(&mut self, upstream_id: u64, miner_id: Option<Id>, kind: Pending, now: Instant) {
        self.pending.insert(upstream_id, InFlight { miner_id, kind, sent_at: now });
    }

    fn malformed(&mut self, e: ParseError, out: &mut Output) {
        counter!(m::MALFORMED, "source" => "miner").increment(1);
        let id = e.id.unwrap_or_else(Id::null);
        write::error(&mut out.to_miner, &id, code::OTHER, &e.kind.to_string());
        self.malformed_streak += 1;
        if self.malformed_streak >= MALFORMED_STREAK_CLOSE {
            out.events.push(Event::Close(CloseReason::Malformed));
        }
    }

    /// One line from the pool.
    pub fn on_pool_line(&mut self, line: &[u8], now: Instant, out: &mut Output) {
        let message = match pool::parse(line) {
            Ok(msg) => msg,
            Err(e) => {
                counter!(m::MALFORMED, "source" => "pool").increment(1);
                tracing::warn!(error = %e, "unparseable line from the pool dropped");
                return;
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
                if let Some(miner_id) = &flight.miner_id {
                    write::relayed_reply(&mut out.to_miner, miner_id, result, error);
                }
                let ok = verdict(result, error);
                match flight.kind {
                    Pending::Subscribe => {
                        if let Some(sub) = result.filter(|_| error.is_none()).and_then(pool::parse_subscribe_result) {
                            self.extranonce1 = sub.extranonce1;
                            self.extranonce2_size = sub.extranonce2_size;
                            self.phase = self.phase.max(Phase::Subscribed);
                        }
                    }
                    Pending::Authorize { miner_user } => {
                        if ok.is_ok() {
                            if !self.workers.contains(&miner_user) {
                                self.workers.push(miner_user.clone());
                            }
                            self.phase = Phase::Authorized;
                            out.events.push(Event::Authorized(miner_user));
                        }
                    }
                    Pending::Configure => {
                        if let Some(mask) = result.filter(|_| error.is_none()).and_then(pool::parse_configure_result) {
                            self.version_mask = Some(mask);
                        }
                    }
                    Pending::Submit { difficulty } => {
                        let result = ok.map_err(|(code, _)| RejectReason::from_code(code));
                        let rtt = Some(now.saturating_duration_since(flight.sent_at));
                        out.events.push(Event::Share(ShareOutcome { difficulty, result, rtt }));
                    }
                    Pending::Other => {}
                }
            }
            PoolMessage::Notify(n) => {
                self.jobs.on_notify(&n.job_id, n.clean_jobs);
                relay(out);
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
            PoolMessage::Reconnect { .. } => {
                // The miner reconnects to the proxy, which picks the pool; the pool's target is not relayed.
                self.fail_pending("upstream reconnecting", RejectReason::UpstreamUnavailable, out);
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

    /// The pool connection is gone: every request in flight gets an error, then the session ends.
    pub fn on_pool_lost(&mut self, out: &mut Output) {
        self.fail_pending("upstream unavailable", RejectReason::UpstreamUnavailable, out);
        out.events.push(Event::Close(CloseReason::UpstreamLost));
    }

    /// The miner is leaving or being closed (evicted, over a limit): requests in flight get an
    /// error if it can still read one, and their shares are counted as closed.
    pub fn on_miner_closing(&mut self, out: &mut Output) {
        self.fail_pending("connection closing", RejectReason::Closed, out);
    }

    /// The shutdown grace period is over: requests still in flight get an error.
    pub fn on_shutdown_deadline(&mut self, out: &mut Output) {
        self.fail_pending("proxy shutting down", RejectReason::Shutdown, out);
        out.events.push(Event::Close(CloseReason::Shutdown));
    }

    fn fail_pending(&mut self, message: &str, reason: RejectReason, out: &mut Output) {
        let mut flights: Vec<_> = self.pending.drain().collect();
        flights.sort_by_key(|(id, _)| *id);
        for (_, flight) in flights {
            if let Some(miner_id) = &flight.miner_id {
                write::error(&mut out.to_miner, miner_id, code::OTHER, message);
            }
            if let Pending::Submit { difficulty } = flight.kind {
                out.events.push(Event::Share(ShareOutcome { difficulty, result: Err(reason), rtt: None }));
            }
        }
    }

    /// How long the oldest request has been waiting, for diagnostics.
    pub fn oldest_pending(&self, now: Instant) -> Option<Duration> {
        self.pending.values().map(|f| now.saturating_duration_since(f.sent_at)).max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(template: &str) -> Session {
        let pool = PoolConfig { url: "stratum+tcp://127.0.0.1:1".into(), user: "acct".into(), password: "pw".into() };
        Session::new(Arc::new(AuthManager::new(template)), Arc::new(pool))
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
        assert_eq!(s.extranonce(), (&[8u8, 0, 0, 2][..], 4));

        let out = miner(&mut s, r#"{"id":2,"method":"mining.authorize","params":["farm.rig1","x"]}"#);
        assert_eq!(lines(&out.to_pool)[0]["params"], serde_json::json!(["farm.rig1", "x"]));
        let out = pool(&mut s, r#"{"id":2,"result":true,"error":null}"#);
        assert_eq!(out.events, vec![Event::Authorized("farm.rig1".into())]);
        assert_eq!(s.phase(), Phase::Authorized);

        pool(&mut s, r#"{"id":null,"method":"mining.set_difficulty","params":[0.5]}"#);
        let out = miner(
            &mut s,
            r#"{"id":2,"method":"mining.submit","params":["farm.rig1","j1","00000000","5c8f0a1e","b2957c02"]}"#,
        );
        let up = lines(&out.to_pool);
        assert_eq!(up[0]["id"], 3);
        let out = pool(&mut s, r#"{"id":3,"result":null,"error":[23,"Low difficulty share",null]}"#);
        assert_eq!(
            lines(&out.to_miner)[0],
            serde_json::json!({"id":2,"result":null,"error":[23,"Low difficulty share",null]})
        );
        assert!(
            matches!(&out.events[0], Event::Share(o) if o.result == Err(RejectReason::LowDifficulty) && o.difficulty == 0.5)
        );
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn template_rewrites_authorize_and_submit() {
        let mut s = session("{pool_user}.{worker}");
        let out = miner(&mut s, r#"{"id":1,"method":"mining.authorize","params":["farm.rig1","secret"]}"#);
        assert_eq!(lines(&out.to_pool)[0]["params"], serde_json::json!(["acct.rig1", "pw"]));
        let out = miner(
            &mut s,
            r#"{"id":2,"method":"mining.submit","params":["farm.rig1","j","00","00000000","00000000","00002000"]}"#,
        );
        assert_eq!(
            lines(&out.to_pool)[0]["params"],
            serde_json::json!(["acct.rig1", "j", "00", "00000000", "00000000", "00002000"])
        );
    }

    #[test]
    fn pending_requests_fail_exactly_once_when_the_pool_goes() {
        let mut s = session("");
        for id in 10..13 {
            miner(
                &mut s,
                &format!(r#"{{"id":{id},"method":"mining.submit","params":["w","j","00","00000000","00000000"]}}"#),
            );
        }
        miner(&mut s, r#"{"id":null,"method":"mining.suggest_difficulty","params":[8]}"#);
        let mut out = Output::default();
        s.on_pool_lost(&mut out);
        let replies = lines(&out.to_miner);
        assert_eq!(replies.iter().map(|r| r["id"].as_u64().unwrap()).collect::<Vec<_>>(), vec![10, 11, 12]);
        assert!(replies.iter().all(|r| r["error"][0] == 20 && r["error"][1] == "upstream unavailable"));
        assert_eq!(out.events.iter().filter(|e| matches!(e, Event::Share(_))).count(), 3);
        assert_eq!(out.close_reason(), Some(CloseReason::UpstreamLost));
        // A late reply from the dead pool finds nothing to answer.
        assert!(pool(&mut s, r#"{"id":1,"result":true,"error":null}"#).to_miner.is_empty());
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
        let notify = r#"{"id":null,"method":"mining.notify","params":["j1","00000000000000000000000000000000000000000000000000000000000000ff","01","02",[],"20000000","1d00ffff","5c8f0a1e",true]}"#;
        assert_eq!(pool(&mut s, notify).to_miner, format!("{notify}\n").into_bytes());
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
        let mut s = session("");
        for i in 0..MAX_PENDING + 5 {
            let out = miner(
                &mut s,
                &format!(r#"{{"id":{i},"method":"mining.submit","params":["w","j","00","00000000","00000000"]}}"#),
            );
            if i >= MAX_PENDING {
                assert!(out.to_pool.is_empty());
                assert_eq!(lines(&out.to_miner)[0]["error"][0], 20);
            }
        }
        assert_eq!(s.pending(), MAX_PENDING);
    }
}
