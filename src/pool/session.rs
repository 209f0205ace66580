//! The pool side, in both modes: the sans-IO session of one connection to a pool. A pool line
//! goes in; bytes for the pool, replies relayed to the miner and at most one [`Step`] for the
//! owner come out.
//!
//! The owner is a group of miners: in aggregate mode many, behind the group task; in passthrough
//! one, whose subscribe, authorize and configure are this session's own (`relay`), and who gets
//! the pool's replies and notifications as they came. Every request expects exactly one answer:
//! the pool's, or one settled by [`fail_pending`](PoolSession::fail_pending) when the pool session
//! ends, or by [`expire`](PoolSession::expire) when the pool is slow to give it.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use metrics::counter;
use serde_json::json;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::auth::{Answer, Rewrite};
use crate::metrics as m;
use crate::protocol::pool::{self, Notify, PoolMessage};
use crate::protocol::{code, verdict, write, Id};
use crate::registry::SessionHandle;
use crate::session::{BlockCandidate, Forward, Relayed, VERSION};
use crate::submissions::{PoolVerdict, RejectReason, SubmissionManager};
use crate::upstream::Pool;

/// Forwarded shares whose verdicts make up the pool's reject rate, and how many must be in.
const REJECT_WINDOW: usize = 100;
const REJECT_WINDOW_MIN: usize = 20;
/// The health probe's user agent: a pool's logs tell its connections from miners' sessions.
pub const PROBE_AGENT: &str = concat!("loka-stratum/", env!("CARGO_PKG_VERSION"), " probe");

/// A request to the pool that waits for its answer. `reply_to` is the miner's id when the
/// pool's reply answers a miner's request (passthrough).
#[derive(Debug)]
enum Request {
    Configure {
        reply_to: Option<Id>,
    },
    Subscribe {
        reply_to: Option<Id>,
    },
    /// The pool's own user (aggregate mode), which the session needs.
    Login,
    Authorize {
        worker: Arc<str>,
        upstream: Arc<str>,
        waiters: Vec<oneshot::Sender<Answer>>,
        reply_to: Option<Id>,
    },
    Submit {
        sent_at: Instant,
        miner: Option<Arc<SessionHandle>>,
        reply_to: Option<Id>,
        block: Option<BlockCandidate>,
        /// The pool's difficulty for the share's job, which the share met.
        difficulty: f64,
    },
    Other {
        reply_to: Option<Id>,
    },
}

impl Request {
    fn reply_to(&self) -> Option<&Id> {
        match self {
            Request::Configure { reply_to }
            | Request::Subscribe { reply_to }
            | Request::Authorize { reply_to, .. }
            | Request::Submit { reply_to, .. }
            | Request::Other { reply_to } => reply_to.as_ref(),
            Request::Login => None,
        }
    }
}

/// What a step produced besides bytes.
#[derive(Debug)]
pub enum Step {
    Job(Notify),
    /// `mining.set_difficulty`: it applies to jobs from the next one on.
    Difficulty(f64),
    /// The mask or the extranonce changed.
    Changed {
        extranonce: bool,
    },
    /// `client.reconnect`: this session ends; the next one may use the port the pool gave.
    Reconnect {
        host: Option<String>,
        port: Option<u16>,
    },
    /// A relayed subscribe was accepted: the extranonce is the session's.
    Subscribed,
    /// A relayed configure was answered: the mask (if any) is the session's.
    Configured,
    /// A relayed authorize was answered.
    Authorized {
        worker: Arc<str>,
        answer: Answer,
    },
    /// The pool's verdict on a forwarded share, with its round trip if it answered; `miner` is
    /// the session to credit (aggregate mode).
    Verdict {
        miner: Option<Arc<SessionHandle>>,
        verdict: PoolVerdict,
        rtt: Option<Duration>,
    },
}

/// One connection to a pool, from its first request on.
#[derive(Debug)]
pub struct PoolSession {
    pub pool: Arc<Pool>,
    /// One miner's own session (passthrough): its requests are relayed and the pool's
    /// notifications go to it as they came.
    relay: bool,
    pub extranonce1: Vec<u8>,
    pub extranonce2_size: usize,
    pub version_mask: Option<u32>,
    /// The pool's difficulty for jobs from now on (Stratum's default until it sends one).
    pub difficulty: f64,
    next_id: u64,
    pending: HashMap<u64, Request>,
    /// The requests someone waits on (forwarded shares, and a passthrough miner's requests) by
    /// id, with when they were sent, oldest first. Answered ones leave from the front only.
    waiting: VecDeque<(u64, Instant)>,
    /// Submits in `pending`: a drain waits for them.
    submits_pending: usize,
    /// When the pool last sent a job.
    pub last_notify: Option<Instant>,
    /// Workers the pool accepted on this session, with the names they were accepted under.
    authorized: HashMap<Arc<str>, Arc<str>>,
    /// Authorizes in flight, by worker, to their pending id (aggregate mode).
    authorizing: HashMap<Arc<str>, u64>,
    /// Since when an authorize has been waiting with no authorize answered (aggregate mode).
    authorize_silence: Option<Instant>,
    /// The pool answers one `mining.authorize` per connection, the proxy's own (ckpool ignores
    /// the rest): no worker is authorized on this session, and every share goes under the
    /// pool's user (aggregate mode).
    pub one_authorize: bool,
    /// The pool's latest verdicts on forwarded shares, `true` for a reject (aggregate mode).
    verdicts: VecDeque<bool>,
    pub subscribed: bool,
    pub logged_in: bool,
    /// The pool answered the proxy's user with a refusal.
    pub login_refused: bool,
}

impl PoolSession {
    pub fn new(pool: Arc<Pool>, relay: bool) -> Self {
        PoolSession {
            pool,
            relay,
            extranonce1: Vec::new(),
            extranonce2_size: 0,
            version_mask: None,
            difficulty: 1.0,
            next_id: 1,
            pending: HashMap::new(),
            waiting: VecDeque::new(),
            submits_pending: 0,
            last_notify: None,
            authorized: HashMap::new(),
            authorizing: HashMap::new(),
            authorize_silence: None,
            one_authorize: false,
            verdicts: VecDeque::new(),
            subscribed: false,
            logged_in: false,
            login_refused: false,
        }
    }

    /// Aggregate mode's handshake: version rolling, subscribe and the pool's own user.
    pub fn handshake(&mut self, buf: &mut Vec<u8>) {
        let rolling = json!({"version-rolling.mask": "ffffffff", "version-rolling.min-bit-count": 2});
        let configure = json!([["version-rolling"], rolling]);
        self.request(buf, "mining.configure", &configure, Request::Configure { reply_to: None });
        self.request(buf, "mining.subscribe", &[VERSION], Request::Subscribe { reply_to: None });
        let config = self.pool.config.clone();
        self.request(buf, "mining.authorize", &[&config.user, &config.password], Request::Login);
    }

    /// The health probe's handshake: a subscribe, under an agent that says it is a probe, and the
    /// pool's own user.
    pub fn probe(&mut self, buf: &mut Vec<u8>) {
        self.request(buf, "mining.subscribe", &[PROBE_AGENT], Request::Subscribe { reply_to: None });
        let config = self.pool.config.clone();
        self.request(buf, "mining.authorize", &[&config.user, &config.password], Request::Login);
    }

    /// Asks the pool for `difficulty` on the jobs to come (aggregate mode: the group's work). Its
    /// answer is not awaited, and is dropped when it comes: ckpool sends none.
    pub fn suggest_difficulty(&mut self, buf: &mut Vec<u8>, difficulty: f64) {
        let id = self.take_id();
        write::request(buf, id, "mining.suggest_difficulty", &[difficulty]);
    }

    /// Requests waiting for the pool's answer.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Forwarded shares waiting for the pool's verdict.
    pub fn submits_pending(&self) -> usize {
        self.submits_pending
    }

    fn request(&mut self, buf: &mut Vec<u8>, method: &str, params: &impl serde::Serialize, pending: Request) {
        let id = self.take_id();
        write::request(buf, id, method, params);
        self.pending.insert(id, pending);
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Passthrough: a miner's request, relayed under the session's own id.
    pub fn relay(
        &mut self,
        buf: &mut Vec<u8>,
        id: Id,
        kind: Relayed,
        method: &str,
        params: Option<&serde_json::value::RawValue>,
        now: Instant,
    ) {
        let upstream_id = self.take_id();
        write::request_raw(buf, upstream_id, method, params);
        let reply_to = (!id.is_null()).then_some(id);
        let request = match kind {
            Relayed::Subscribe => Request::Subscribe { reply_to },
            Relayed::Configure => Request::Configure { reply_to },
            Relayed::Other => Request::Other { reply_to },
        };
        if request.reply_to().is_some() {
            self.waiting.push_back((upstream_id, now));
        }
        self.pending.insert(upstream_id, request);
    }

    /// A share for the pool, under its worker's upstream name if the pool accepted that worker
    /// on this session, else under the pool's user: a pool takes shares only from names
    /// authorized on the connection (a worker re-authorized after a failover, or one the pool
    /// never answered).
    pub fn submit(&mut self, buf: &mut Vec<u8>, f: Forward, miner: Option<Arc<SessionHandle>>, now: Instant) {
        let user: &str = match f.worker.as_ref().and_then(|w| self.authorized.get(w)) {
            Some(upstream) => upstream,
            None => &self.pool.config.user,
        };
        let id = self.next_id;
        self.next_id += 1;
        let _ = write!(buf, "{{\"id\":{id},\"method\":\"mining.submit\",\"params\":[");
        serde_json::to_writer(&mut *buf, user).expect("serialise to Vec");
        buf.push(b',');
        serde_json::to_writer(&mut *buf, &*f.job.upstream_id).expect("serialise to Vec");
        buf.extend_from_slice(b",\"");
        let mut hex = [0u8; 2 * crate::protocol::pool::MAX_EXTRANONCE2_SIZE];
        let hex = &mut hex[..2 * f.extranonce2().len()];
        hex::encode_to_slice(f.extranonce2(), hex).expect("twice the length");
        buf.extend_from_slice(hex);
        let _ = write!(buf, "\",\"{:08x}\",\"{:08x}\"", f.ntime, f.nonce);
        if let Some(bits) = f.version_bits {
            let _ = write!(buf, ",\"{bits:08x}\"");
        }
        buf.extend_from_slice(b"]}\n");
        let difficulty = f.job.upstream_difficulty;
        self.pending
            .insert(id, Request::Submit { sent_at: now, miner, reply_to: f.reply_to, block: f.block, difficulty });
        self.waiting.push_back((id, now));
        self.submits_pending += 1;
        SubmissionManager.forwarded(self.pool.share_metrics(), f.block.as_ref().map(|b| &b.hash));
    }

    /// Asks the pool to accept a miner's worker, with its credentials rewritten. In aggregate
    /// mode `reply` (if any) gets the answer, and one request serves every miner that asks while
    /// it is in flight; a worker already accepted, or any worker on a pool of
    /// [`one_authorize`](Self::one_authorize), is answered at once. In passthrough the pool's
    /// reply answers `reply_to`.
    #[allow(clippy::too_many_arguments)]
    pub fn authorize(
        &mut self,
        buf: &mut Vec<u8>,
        rewrite: &Rewrite,
        worker: Arc<str>,
        password: &str,
        reply: Option<oneshot::Sender<Answer>>,
        reply_to: Option<Id>,
        now: Instant,
    ) {
        if !self.relay {
            if self.one_authorize || self.authorized.contains_key(&worker) {
                if let Some(reply) = reply {
                    let _ = reply.send(Answer::Accepted);
                }
                return;
            }
            if let Some(Request::Authorize { waiters, .. }) =
                self.authorizing.get(&worker).and_then(|id| self.pending.get_mut(id))
            {
                waiters.extend(reply);
                return;
            }
            self.authorizing.insert(worker.clone(), self.next_id);
            self.authorize_silence.get_or_insert(now);
        }
        let creds = rewrite.credentials(&worker, password, &self.pool.config);
        let upstream: Arc<str> = creds.user.as_str().into();
        let waiters = reply.into_iter().collect();
        let params = [creds.user.as_str(), creds.password.as_str()];
        let request = Request::Authorize { worker, upstream, waiters, reply_to: reply_to.filter(|id| !id.is_null()) };
        if request.reply_to().is_some() {
            self.waiting.push_back((self.next_id, now));
        }
        self.request(buf, "mining.authorize", &params, request);
    }

    /// When the pool's silence makes it a pool of one authorize per connection: `silence`
    /// after an authorize began to wait with none answered since (aggregate mode).
    pub fn authorize_deadline(&self, silence: Duration) -> Option<Instant> {
        self.authorize_silence.map(|since| since + silence)
    }

    /// The pool left every authorize unanswered past the deadline, as ckpool does with a second
    /// one on a connection: from now on this session authorizes no worker. Each miner waiting
    /// is answered true, and its shares go under the pool's user. Returns the workers that
    /// were waiting.
    pub fn authorize_once(&mut self) -> usize {
        self.one_authorize = true;
        self.authorize_silence = None;
        let waiting = self.authorizing.len();
        for (_, id) in self.authorizing.drain() {
            if let Some(Request::Authorize { waiters, .. }) = self.pending.remove(&id) {
                for waiter in waiters {
                    let _ = waiter.send(Answer::Accepted);
                }
            }
        }
        waiting
    }

    /// A worker no miner uses any more: a new miner with its name is authorized again.
    pub fn forget(&mut self, worker: &str) {
        self.authorized.remove(worker);
    }

    /// One line from the pool: what the pool expects back goes to `to_pool`; in passthrough, the
    /// pool's replies and notifications go to `to_miner` as they came. An error is a fault: the
    /// pool sent what it cannot have meant.
    pub fn on_line(
        &mut self,
        line: &[u8],
        now: Instant,
        to_pool: &mut Vec<u8>,
        to_miner: &mut Vec<u8>,
    ) -> Result<Option<Step>, &'static str> {
        let message = pool::parse(line).map_err(|e| {
            counter!(m::MALFORMED, "source" => "pool").increment(1);
            tracing::warn!(pool = %self.pool.label, error = %e, "unparseable line from the pool");
            "unparseable message"
        })?;
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
        // In passthrough the miner gets the pool's notifications as they came.
        let relay = |to_miner: &mut Vec<u8>| {
            if self.relay {
                to_miner.extend_from_slice(line);
                to_miner.push(b'\n');
            }
        };
        Ok(match message {
            PoolMessage::Response { id, result, error } => {
                let Some(request) =
                    id.as_u64().and_then(|upstream_id| Some((upstream_id, self.pending.remove(&upstream_id)?)))
                else {
                    tracing::debug!(?id, "reply to no request in flight dropped");
                    return Ok(None);
                };
                let (upstream_id, request) = request;
                let ok = verdict(result, error);
                let subscribe = match &request {
                    Request::Subscribe { .. } => {
                        let sub = result.filter(|_| error.is_none()).and_then(pool::parse_subscribe_result);
                        if sub.is_none() && (!self.relay || error.is_none()) {
                            // Relaying an extranonce the miner cannot use would only waste its work.
                            self.pending.insert(upstream_id, request);
                            return Err("invalid subscribe reply");
                        }
                        sub
                    }
                    _ => None,
                };
                if let Some(miner_id) = request.reply_to() {
                    write::relayed_reply(to_miner, miner_id, result, error);
                }
                match request {
                    Request::Configure { .. } => {
                        let mask = result.filter(|_| error.is_none()).and_then(pool::parse_configure_result);
                        let changed = mask != self.version_mask;
                        self.version_mask = mask;
                        if self.relay {
                            Some(Step::Configured)
                        } else {
                            changed.then_some(Step::Changed { extranonce: false })
                        }
                    }
                    Request::Subscribe { .. } => subscribe.and_then(|sub| {
                        self.extranonce1 = sub.extranonce1;
                        self.extranonce2_size = sub.extranonce2_size;
                        self.subscribed = true;
                        self.relay.then_some(Step::Subscribed)
                    }),
                    Request::Login => {
                        if ok.is_err() {
                            tracing::warn!(pool = %self.pool.label, user = %self.pool.config.user, "the pool refused the proxy's user");
                            self.login_refused = true;
                            return Err("the pool refused the configured user");
                        }
                        self.logged_in = true;
                        None
                    }
                    Request::Authorize { worker, upstream, waiters, .. } => {
                        if self.authorizing.get(&worker) == Some(&upstream_id) {
                            self.authorizing.remove(&worker);
                        }
                        // An answer restarts the clock: the pool answers authorizes.
                        if !self.relay {
                            self.authorize_silence = (!self.authorizing.is_empty()).then_some(now);
                        }
                        if ok.is_ok() {
                            self.authorized.insert(worker.clone(), upstream);
                        }
                        let answer = authorize_answer(result, error.is_some(), &ok);
                        for waiter in waiters {
                            let _ = waiter.send(answer);
                        }
                        self.relay.then_some(Step::Authorized { worker, answer })
                    }
                    Request::Submit { sent_at, miner, block, difficulty, .. } => {
                        self.submits_pending -= 1;
                        let rtt = now.saturating_duration_since(sent_at);
                        let verdict = match &ok {
                            Ok(()) => PoolVerdict::Accepted,
                            Err((code, message)) => {
                                tracing::debug!(pool = %self.pool.label, code, message, "the pool rejected a forwarded share");
                                PoolVerdict::Rejected(RejectReason::from_code(*code))
                            }
                        };
                        if let Some(block) = &block {
                            block_verdict(&self.pool.label, block, &ok);
                        }
                        self.pool.verdicts.answered(ok.is_ok(), rtt);
                        // The reject rate moves a group to another pool; passthrough's one miner
                        // stays with the pool it has. Only what can say the pool is unhealthy
                        // counts: healthy pools answer stale to shares that cross a new block and
                        // duplicate to one sent again, and refuse as shares the block candidates
                        // sent below their share target. Nor does low difficulty on a share that
                        // met its job's difficulty when the pool has raised it since: some pools
                        // apply `set_difficulty` at once, not from their next job.
                        let raised = verdict == PoolVerdict::Rejected(RejectReason::LowDifficulty)
                            && self.difficulty > difficulty;
                        let counts =
                            !matches!(verdict, PoolVerdict::Rejected(RejectReason::Stale | RejectReason::Duplicate))
                                && !block.is_some_and(|b| b.below_share_target)
                                && !raised;
                        if !self.relay && counts {
                            if self.verdicts.len() == REJECT_WINDOW {
                                self.verdicts.pop_front();
                            }
                            self.verdicts.push_back(ok.is_err());
                        }
                        Some(Step::Verdict { miner, verdict, rtt: Some(rtt) })
                    }
                    Request::Other { .. } => None,
                }
            }
            PoolMessage::Notify(n) => {
                self.last_notify = Some(now);
                self.pool.verdicts.notified();
                self.pool.behaved();
                relay(to_miner);
                Some(Step::Job(n))
            }
            PoolMessage::SetDifficulty(d) => {
                self.difficulty = d;
                relay(to_miner);
                Some(Step::Difficulty(d))
            }
            PoolMessage::SetVersionMask(mask) => {
                self.version_mask = Some(mask);
                relay(to_miner);
                Some(Step::Changed { extranonce: false })
            }
            PoolMessage::SetExtranonce { extranonce1, extranonce2_size } => {
                self.extranonce1 = extranonce1;
                self.extranonce2_size = extranonce2_size;
                relay(to_miner);
                Some(Step::Changed { extranonce: true })
            }
            PoolMessage::Reconnect { host, port, .. } => Some(Step::Reconnect { host, port }),
            PoolMessage::GetVersion { id } => {
                write::result(to_pool, &id, &VERSION);
                None
            }
            PoolMessage::ShowMessage(text) => {
                tracing::info!(pool = %self.pool.label, message = %text, "message from the pool");
                relay(to_miner);
                None
            }
            PoolMessage::Unknown { method } => {
                tracing::debug!(pool = %self.pool.label, %method, "unknown pool notification");
                relay(to_miner);
                None
            }
        })
    }

    /// The pool rejects more than `max` of the last forwarded shares.
    pub fn rejecting(&self, max: f64) -> bool {
        let n = self.verdicts.len();
        n >= REJECT_WINDOW_MIN && self.verdicts.iter().filter(|r| **r).count() as f64 > max * n as f64
    }

    /// When the oldest request that someone waits on was sent, if one is unanswered.
    pub fn oldest_waiting(&mut self) -> Option<Instant> {
        while let Some((id, sent)) = self.waiting.front() {
            if self.pending.contains_key(id) {
                return Some(*sent);
            }
            self.waiting.pop_front();
        }
        None
    }

    /// Settles the requests that waited `timeout` by `now` for an answer. A pool that leaves a
    /// share or a subscribe unanswered is hung (a process stopped with its socket open): that
    /// is an error, a fault. A passthrough miner's other requests get an error instead, and the
    /// session goes on: ckpool never answers a second authorize on one connection, and some
    /// pools ignore `mining.configure`.
    pub fn expire(&mut self, now: Instant, timeout: Duration, to_miner: &mut Vec<u8>) -> Result<(), &'static str> {
        while let Some(&(id, sent)) = self.waiting.front() {
            if now.saturating_duration_since(sent) < timeout {
                break;
            }
            match self.pending.get(&id) {
                Some(Request::Submit { .. } | Request::Subscribe { .. }) => {
                    return Err("no answer within upstream.submit_timeout")
                }
                Some(_) => {
                    let request = self.pending.remove(&id).expect("looked up above");
                    if let Request::Authorize { worker, .. } = &request {
                        tracing::info!(pool = %self.pool.label, %worker, "the pool did not answer an authorize");
                    }
                    if let Some(miner_id) = request.reply_to() {
                        write::error(to_miner, miner_id, code::OTHER, "no answer from the pool");
                    }
                }
                None => {}
            }
            self.waiting.pop_front();
        }
        Ok(())
    }

    /// The session is over: every request still waiting gets `message` as its error (in
    /// `to_miner`) if a miner asked it. Returns the sessions of the forwarded shares left
    /// unanswered, one per share (`None` for passthrough's own). Authorizes are dropped
    /// unanswered: the pool's silence is not the miner's failure.
    pub fn fail_pending(&mut self, message: &str, to_miner: &mut Vec<u8>) -> Vec<Option<Arc<SessionHandle>>> {
        let mut requests: Vec<_> = self.pending.drain().collect();
        requests.sort_by_key(|(id, _)| *id);
        self.submits_pending = 0;
        self.authorizing.clear();
        self.authorize_silence = None;
        self.waiting.clear();
        let mut unanswered = Vec::new();
        for (_, request) in requests {
            if let Some(miner_id) = request.reply_to() {
                write::error(to_miner, miner_id, code::OTHER, message);
            }
            if let Request::Submit { miner, block, .. } = request {
                if let Some(block) = block {
                    let hash = crate::share::display_hash(&block.hash);
                    tracing::warn!(pool = %self.pool.label, block_hash = %hash, "the pool never answered a block candidate");
                }
                unanswered.push(miner);
            }
        }
        unanswered
    }
}

/// How the pool answered an authorize. Only an explicit refusal is the miner's failure: `false`
/// with no error, or error 24 (unauthorized worker) whatever the result. Any other error (an
/// internal error, "not subscribed", a malformed reply) is the pool's trouble and backs no one
/// off; it still reaches the miner as the pool sent it in passthrough. A timeout or a disconnect
/// never gets here: the pending authorize is failed without an answer.
fn authorize_answer(
    result: Option<&serde_json::value::RawValue>,
    error: bool,
    ok: &Result<(), (i64, String)>,
) -> Answer {
    match ok {
        Ok(()) => Answer::Accepted,
        Err((code::UNAUTHORIZED, _)) => Answer::Refused,
        Err(_) if !error && result.map(|r| r.get()) == Some("false") => Answer::Refused,
        Err(_) => Answer::Failed,
    }
}

/// The pool's verdict on a block candidate, logged: a reject may be the pool refusing it as a
/// share below its target while it still submits the block, as ckpool does.
fn block_verdict(pool: &str, block: &BlockCandidate, verdict: &Result<(), (i64, String)>) {
    let hash = crate::share::display_hash(&block.hash);
    match verdict {
        Ok(()) => tracing::info!(pool, block_hash = %hash, "the pool accepted a block candidate"),
        Err((code, message)) => tracing::warn!(
            pool,
            block_hash = %hash,
            code,
            message = %message,
            below_share_target = block.below_share_target,
            "the pool rejected a block candidate"
        ),
    }
}
