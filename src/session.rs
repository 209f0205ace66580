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
pub const MAX_IN_FLIGHT: usize = 256;

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

        if self.pending.len() >= MAX_IN_FLIGHT {
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
mod tests;
