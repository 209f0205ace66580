//! One miner in aggregate mode: a sans-IO session that answers the miner itself (subscribe,
//! authorize, configure, difficulty, every share), and the task that runs it.
//!
//! Job ids the miner sees are the proxy's: `seq << 8 | tag` in hex, where `seq` numbers the
//! group's jobs and `tag` counts re-sends of one job to this miner after its difficulty changed.
//! A share is judged at the difficulty its job id was sent with.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use futures::StreamExt;
use metrics::{counter, SharedString};
use serde_json::json;
use tokio::io::WriteHalf;
use tokio::sync::oneshot;
use tokio::time::{sleep_until, timeout, Instant};
use tracing::field;

use super::{AggJob, Aggregator, Forward, Refused, Upward, Work};
use crate::codec::FrameError;
use crate::config::Config;
use crate::connection::{first_line, refusal, MinerReader, MinerStream, Outbox, RateLimiter, Shared};
use crate::jobs::ShareKey;
use crate::metrics as m;
use crate::protocol::miner::{Call, Submit};
use crate::protocol::{code, parse_hex_u32, write, Id};
use crate::registry::{CloseReason, Phase, SessionHandle};
use crate::session::{Event, MinerInput};
use crate::share::{meets, target_from_difficulty};
use crate::submissions::{self, JobTarget, LocalReject, RejectReason, ShareContext};
use crate::upstream::Pool;
use crate::vardiff::{Vardiff, VardiffConfig};

/// Job ids remembered per miner, newest last; shares on older ones are stale.
const MAX_SENT: usize = 8;
/// Workers one connection may authorize.
const MAX_CONNECTION_WORKERS: usize = 16;

/// What one step produced: bytes for the miner, events for the registry and the managers, shares
/// for the pool and, with `worker_passthrough`, an authorize for the group to ask the pool.
#[derive(Debug, Default)]
pub struct Output {
    pub to_miner: Vec<u8>,
    pub events: Vec<Event>,
    pub forward: Vec<Forward>,
    pub authorize: Option<AuthorizeRequest>,
}

/// A `mining.authorize` waiting for the pool's word.
#[derive(Debug)]
pub struct AuthorizeRequest {
    pub id: Id,
    pub user: String,
    pub password: String,
}

#[derive(Debug, Clone, Copy)]
struct Sent {
    seq: u64,
    tag: u8,
    difficulty: f64,
}

#[derive(Debug)]
struct Worker {
    name: Box<str>,
    /// Submitted under its own name upstream (`worker_passthrough`).
    passthrough: Option<Arc<str>>,
}

/// One aggregated miner's session.
#[derive(Debug)]
pub struct MinerSession {
    /// The miner's prefix: its extranonce1.
    extranonce1: Box<[u8]>,
    en2_size: usize,
    subscribed: bool,
    extranonce_subscribed: bool,
    workers: Vec<Worker>,
    /// The mask the miner asked for in `mining.configure`, and what it was granted.
    requested_mask: Option<u32>,
    mask: u32,
    vardiff: Vardiff,
    sent_difficulty: Option<f64>,
    sent: VecDeque<Sent>,
    /// Shares taken, by job; pruned as jobs retire.
    seen: HashSet<(u64, ShareKey)>,
    work: Arc<Work>,
    worker_passthrough: bool,
    input: MinerInput,
}

/// The job id a miner sees.
fn job_id(seq: u64, tag: u8) -> String {
    format!("{:x}", seq << 8 | u64::from(tag))
}

fn parse_job_id(id: &str) -> Option<(u64, u8)> {
    if id.is_empty() || id.len() > 16 {
        return None;
    }
    let n = u64::from_str_radix(id, 16).ok()?;
    Some((n >> 8, n as u8))
}

impl MinerSession {
    pub fn new(
        extranonce1: Vec<u8>,
        work: Arc<Work>,
        vardiff: VardiffConfig,
        worker_passthrough: bool,
        now: Instant,
    ) -> Self {
        Self {
            extranonce1: extranonce1.into_boxed_slice(),
            en2_size: work.en2_size,
            subscribed: false,
            extranonce_subscribed: false,
            workers: Vec::new(),
            requested_mask: None,
            mask: 0,
            vardiff: Vardiff::new(vardiff, now),
            sent_difficulty: None,
            sent: VecDeque::new(),
            seen: HashSet::new(),
            work,
            worker_passthrough,
            input: MinerInput::default(),
        }
    }

    pub fn phase(&self) -> Phase {
        Phase::of(self.subscribed, !self.workers.is_empty())
    }

    pub fn work(&self) -> &Arc<Work> {
        &self.work
    }

    /// When the vardiff wants its next look.
    pub fn next_check(&self) -> Instant {
        self.vardiff.next_check()
    }

    /// One line from the miner.
    pub fn on_miner_line(&mut self, line: &[u8], now: Instant, out: &mut Output) {
        let Some(request) = self.input.parse(line, &mut out.to_miner, &mut out.events) else { return };
        let id = request.id;
        match request.call {
            Call::Subscribe { .. } => {
                self.subscribed = true;
                self.en2_size = self.work.en2_size;
                let sid = hex::encode(&self.extranonce1);
                let subscriptions = json!([["mining.set_difficulty", sid], ["mining.notify", sid]]);
                reply(out, &id, &json!([subscriptions, sid, self.en2_size]));
                self.send_job(true, now, out);
            }
            Call::Authorize { user, password } => {
                if self.workers.iter().any(|w| *w.name == user) {
                    reply(out, &id, &true);
                } else if self.workers.len() >= MAX_CONNECTION_WORKERS {
                    reply_error(out, &id, code::OTHER, "too many workers on this connection");
                } else if self.worker_passthrough {
                    out.authorize = Some(AuthorizeRequest { id, user, password });
                } else {
                    self.on_authorized(AuthorizeRequest { id, user, password }, true, out);
                }
            }
            Call::Configure(c) => {
                let mut result = serde_json::Map::new();
                for extension in &c.extensions {
                    if extension == "version-rolling" {
                        let requested = c.version_rolling_mask.unwrap_or(u32::MAX);
                        self.requested_mask = Some(requested);
                        self.mask = requested & self.work.pool_mask();
                        result.insert("version-rolling".into(), true.into());
                        result.insert("version-rolling.mask".into(), format!("{:08x}", self.mask).into());
                    } else {
                        result.insert(extension.clone(), false.into());
                    }
                }
                reply(out, &id, &result);
            }
            Call::ExtranonceSubscribe => {
                self.extranonce_subscribed = true;
                reply(out, &id, &true);
            }
            Call::SuggestDifficulty(d) => {
                self.vardiff.suggest(d, now);
                reply(out, &id, &true);
                self.retarget(now, out);
            }
            Call::Submit(submit) => self.submit(&id, &submit, now, out),
            Call::Unknown => reply_error(out, &id, code::OTHER, "unsupported method"),
        }
    }

    /// The group's answer to a `worker_passthrough` authorize (or, without it, the proxy's own).
    pub fn on_authorized(&mut self, request: AuthorizeRequest, ok: bool, out: &mut Output) {
        if !ok {
            return reply_error(out, &request.id, code::UNAUTHORIZED, "Unauthorized worker");
        }
        let passthrough = self.worker_passthrough.then(|| Arc::from(request.user.as_str()));
        self.workers.reserve_exact(1);
        self.workers.push(Worker { name: request.user.clone().into_boxed_str(), passthrough });
        reply(out, &request.id, &true);
        out.events.push(Event::Authorized(request.user));
    }

    /// The group's work changed: a job, a pool switch, a mask or an extranonce change.
    pub fn on_work(&mut self, work: Arc<Work>, now: Instant, out: &mut Output) {
        let epoch_changed = work.epoch != self.work.epoch;
        let last_sent = self.sent.back().map(|s| s.seq);
        self.work = work;
        if !self.subscribed {
            self.en2_size = self.work.en2_size;
            return;
        }
        if self.work.en2_size != self.en2_size {
            if !self.extranonce_subscribed {
                // The miner cannot be told its new extranonce2 size: it must subscribe again.
                write::notification(&mut out.to_miner, "client.reconnect", &json!([]));
                out.events.push(Event::Close(CloseReason::PoolReconnect));
                return;
            }
            self.en2_size = self.work.en2_size;
            let params = json!([hex::encode(&self.extranonce1), self.en2_size]);
            write::notification(&mut out.to_miner, "mining.set_extranonce", &params);
        }
        if let Some(requested) = self.requested_mask {
            let mask = requested & self.work.pool_mask();
            if mask != self.mask {
                self.mask = mask;
                write::notification(&mut out.to_miner, "mining.set_version_mask", &[format!("{mask:08x}")]);
            }
        }
        if let Some(newest) = self.work.newest() {
            if last_sent.is_none_or(|s| newest.seq > s) || epoch_changed {
                let after = last_sent.unwrap_or(0);
                let clean = epoch_changed || self.work.jobs.iter().any(|j| j.seq > after && j.notify.clean_jobs);
                self.send_job(clean, now, out);
            }
        }
        let oldest = self.work.jobs.first().map_or(u64::MAX, |j| j.seq);
        self.seen.retain(|(seq, _)| *seq >= oldest);
    }

    /// The vardiff's timer.
    pub fn on_tick(&mut self, now: Instant, out: &mut Output) {
        if self.vardiff.tick(now).is_some() {
            self.retarget(now, out);
        }
    }

    /// The miner's difficulty moved: tell it, and send the newest job again under a new id, so
    /// that the new difficulty applies from that job on.
    fn retarget(&mut self, now: Instant, out: &mut Output) {
        let Some(job) = self.work.newest() else { return };
        let difficulty = self.vardiff.set_ceiling(job.upstream_difficulty, now);
        if self.subscribed && self.sent_difficulty.is_some_and(|d| d != difficulty) {
            self.send_job(false, now, out);
        }
    }

    /// Sends the newest job, with `mining.set_difficulty` first when the difficulty changed. The
    /// miner's difficulty never exceeds the pool's, so every share the pool would take is found.
    fn send_job(&mut self, clean: bool, now: Instant, out: &mut Output) {
        let Some(job) = self.work.newest().cloned() else { return };
        let difficulty = self.vardiff.set_ceiling(job.upstream_difficulty, now);
        if self.sent_difficulty != Some(difficulty) {
            write::notification(&mut out.to_miner, "mining.set_difficulty", &[difficulty]);
            self.sent_difficulty = Some(difficulty);
            out.events.push(Event::Difficulty(difficulty));
        }
        let tag = match self.sent.back() {
            Some(s) if s.seq == job.seq => s.tag.wrapping_add(1),
            _ => 0,
        };
        self.sent.retain(|s| !(s.seq == job.seq && s.tag == tag));
        if self.sent.len() == MAX_SENT {
            self.sent.pop_front();
        }
        self.sent.push_back(Sent { seq: job.seq, tag, difficulty });
        job.notify.write_as(&mut out.to_miner, &job_id(job.seq, tag), clean);
    }

    fn submit(&mut self, id: &Id, submit: &Submit, now: Instant, out: &mut Output) {
        let valid = match self.judge(submit) {
            Ok(valid) => valid,
            Err(reject) => {
                reply_error(out, id, reject.code, &reject.message);
                out.events.push(Event::ShareRefused(reject.reason));
                return;
            }
        };
        let (job, sent, worker, share) = valid;
        self.seen.insert((job.seq, share.key));
        reply(out, id, &true);
        if meets(&share.hash, &job.upstream_target) {
            let mut extranonce2 = Vec::with_capacity(self.extranonce1.len() + self.en2_size + job.pad);
            extranonce2.extend_from_slice(&self.extranonce1);
            extranonce2.extend_from_slice(share.key.extranonce2());
            extranonce2.resize(extranonce2.len() + job.pad, 0);
            out.forward.push(Forward {
                job: job.clone(),
                worker,
                extranonce2,
                ntime: parse_hex_u32(&submit.ntime).unwrap_or_default(),
                nonce: parse_hex_u32(&submit.nonce).unwrap_or_default(),
                version_bits: submit.version_bits.as_deref().and_then(parse_hex_u32),
            });
        } else if let Some(pool) = &self.work.pool {
            counter!(m::SHARES_LOCAL_ONLY, "pool" => pool.metric_label.clone()).increment(1);
        }
        out.events.push(Event::ShareValid(share));
        if sent.difficulty == self.vardiff.difficulty() && self.vardiff.on_share(now).is_some() {
            self.retarget(now, out);
        }
    }

    /// The local checks: subscribed, an authorized worker, a job this miner was sent and that is
    /// still live, then the share itself at the difficulty the job was sent with.
    #[allow(clippy::type_complexity)]
    fn judge(
        &self,
        submit: &Submit,
    ) -> Result<(Arc<AggJob>, Sent, Option<Arc<str>>, submissions::ValidShare), LocalReject> {
        if !self.subscribed {
            return Err(LocalReject::new(code::NOT_SUBSCRIBED, "Not subscribed", RejectReason::NotSubscribed));
        }
        let Some(worker) = self.workers.iter().find(|w| *w.name == submit.worker) else {
            return Err(LocalReject::new(code::UNAUTHORIZED, "Unauthorized worker", RejectReason::Unauthorized));
        };
        let stale = || LocalReject::new(code::JOB_NOT_FOUND, "Job not found (stale)", RejectReason::Stale);
        let unknown = || LocalReject::new(code::JOB_NOT_FOUND, "Job not found", RejectReason::BadJob);
        let (seq, tag) = parse_job_id(&submit.job_id).ok_or_else(unknown)?;
        let Some(sent) = self.sent.iter().find(|s| s.seq == seq && s.tag == tag).copied() else {
            return Err(if self.sent.front().is_some_and(|f| seq <= f.seq) { stale() } else { unknown() });
        };
        let job = self.work.job(seq).filter(|j| j.en2_size == self.en2_size).ok_or_else(stale)?;
        let target = target_from_difficulty(sent.difficulty);
        let job_target = JobTarget { notify: &job.notify, difficulty: sent.difficulty, target: &target };
        let miner =
            ShareContext { extranonce1: &self.extranonce1, extranonce2_size: self.en2_size, version_mask: self.mask };
        let share = submissions::check(job_target, miner, submit, |k| self.seen.contains(&(seq, *k)))?;
        Ok((job.clone(), sent, worker.passthrough.clone(), share))
    }
}

/// A reply, unless the request was a notification (a null id).
fn reply(out: &mut Output, id: &Id, result: &impl serde::Serialize) {
    if !id.is_null() {
        write::result(&mut out.to_miner, id, result);
    }
}

fn reply_error(out: &mut Output, id: &Id, code: i64, message: &str) {
    if !id.is_null() {
        write::error(&mut out.to_miner, id, code, message);
    }
}

static NO_POOL: SharedString = SharedString::const_str("none");

/// Serves one aggregated miner until it leaves, is closed, or the proxy shuts down.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    shared: &Shared,
    aggregator: &Arc<Aggregator>,
    config: &Config,
    handle: &Arc<SessionHandle>,
    mut reader: MinerReader,
    writer: WriteHalf<MinerStream>,
) -> CloseReason {
    let server = &config.server;
    // A socket that never speaks costs no seat and no prefix.
    let first = match first_line(shared, handle, &mut reader).await {
        Ok(first) => first,
        Err(reason) => return reason,
    };
    // A select of its own rather than `unless_closed`: wrapped in that future, the admission's
    // state grows every idle miner's task by 384 bytes.
    let admitted = tokio::select! {
        biased;
        reason = handle.closed() => return reason,
        _ = shared.shutdown.cancelled() => return CloseReason::Shutdown,
        seat = aggregator.admit() => seat,
    };
    let seat = match admitted {
        Ok(seat) => seat,
        Err(refused) => {
            let reason = match refused {
                Refused::NoUpstream => "no_upstream",
                Refused::Full => "full",
            };
            let mut outbox = Outbox::new(writer, handle);
            let _ = outbox.push(refusal(&first, reason, &refused.to_string()), server);
            outbox.close(CloseReason::NoUpstream, server).await;
            return CloseReason::NoUpstream;
        }
    };
    // The steps run inline here, not in an async fn of their own: a nested future's state grew
    // every idle miner's task by about 250 bytes.
    let mut outbox = Outbox::new(writer, handle);
    let mut work = seat.group.subscribe();
    let now = Instant::now();
    let prefix = seat.prefix.to_bytes(config.aggregate.prefix_bytes);
    let initial = work.borrow_and_update().clone();
    let mut session =
        MinerSession::new(prefix, initial, config.vardiff.vardiff(), config.aggregate.worker_passthrough, now);
    let mut limiter = RateLimiter::new(server.rate_limit, server.rate_limit_burst);
    let mut out = Output::default();
    let mut first = Some(first);
    let mut last_pool: Option<Arc<Pool>> = None;
    let reason = loop {
        let mut close = None;
        if let Some(line) = first.take() {
            miner_line(shared, handle, &mut session, &mut limiter, &line, &mut out, &mut close);
        } else {
            tokio::select! {
                biased;
                reason = handle.closed() => close = Some(reason),
                // No more lines: what was written for the miner goes out, then it is closed.
                _ = shared.shutdown.cancelled() => close = Some(CloseReason::Shutdown),
                changed = work.changed() => match changed {
                    Ok(()) => {
                        let new = work.borrow_and_update().clone();
                        session.on_work(new, Instant::now(), &mut out);
                    }
                    Err(_) => close = Some(CloseReason::UpstreamLost),
                },
                _ = sleep_until(session.next_check()) => session.on_tick(Instant::now(), &mut out),
                line = reader.next() => match line {
                    Some(Ok(line)) => {
                        // Judge against the newest work: a share for a pool that is gone is stale.
                        if work.has_changed().unwrap_or(false) {
                            let new = work.borrow_and_update().clone();
                            session.on_work(new, Instant::now(), &mut out);
                        }
                        miner_line(shared, handle, &mut session, &mut limiter, &line, &mut out, &mut close);
                    }
                    Some(Err(FrameError::TooLong(max))) => {
                        counter!(m::LINES_TOO_LONG, "source" => "miner").increment(1);
                        tracing::info!(max, "miner line over the cap");
                        close = Some(CloseReason::LineTooLong);
                    }
                    Some(Err(FrameError::Io(_))) | None => close = Some(CloseReason::MinerClosed),
                },
            }
        }
        if let Some(request) = out.authorize.take() {
            let (peer, now) = (handle.peer.ip(), Instant::now());
            if let Some(message) = shared.auth.refusal(peer, now) {
                reply_error(&mut out, &request.id, code::UNAUTHORIZED, &message);
            } else {
                let (tx, rx) = oneshot::channel();
                let upward = Upward::Authorize {
                    worker: request.user.as_str().into(),
                    password: request.password.clone(),
                    reply: tx,
                };
                let answer = match seat.group.send(upward) {
                    Ok(()) => timeout(config.upstream.connect_timeout(), rx).await.ok().and_then(Result::ok),
                    Err(_) => None,
                };
                // Only the pool's refusal is the miner's failure; its silence is not.
                match answer {
                    Some(true) => shared.auth.succeeded(peer),
                    Some(false) => shared.auth.failed(peer, now),
                    None => {}
                }
                session.on_authorized(request, answer == Some(true), &mut out);
            }
        }
        // The pool changes only with a switch: compared by pointer, not by name, on each step.
        let pool = &session.work().pool;
        if !same_pool(pool, &last_pool) {
            last_pool = pool.clone();
            handle.info().upstream = pool.as_ref().map(|p| Arc::from(p.label.as_str()));
        }
        let label = last_pool.as_ref().map_or(&NO_POOL, |p| &p.metric_label);
        let forwards = std::mem::take(&mut out.forward);
        // Each forwarded share carries its miner's handle, so that the group credits the pool's
        // verdict to the miner.
        let dropped =
            forwards.into_iter().filter_map(|f| seat.group.send(Upward::Share(f, handle.clone())).err()).count();
        if dropped > 0 {
            tracing::warn!(dropped, "upstream queue full; shares not forwarded");
            counter!(m::UPSTREAM_SHARES, "pool" => label.clone(), "result" => "dropped").increment(dropped as u64);
        }
        for event in std::mem::take(&mut out.events) {
            match event {
                Event::ShareValid(share) => shared.submissions.validated(handle, label, &share),
                Event::ShareRefused(reason) => shared.submissions.refused(handle, label, reason),
                Event::Authorized(worker) => {
                    tracing::Span::current().record("worker", field::display(&worker));
                    tracing::debug!(%worker, "authorized");
                    handle.info().worker = Some(worker);
                }
                Event::Difficulty(d) => handle.info().difficulty = Some(d),
                Event::Close(reason) => close = close.or(Some(reason)),
                // The group task sends the shares and hears the pool's verdicts.
                Event::ShareForwarded | Event::PoolVerdict(..) | Event::PoolFault(_) | Event::PoolReconnect { .. } => {}
            }
        }
        handle.set_phase(session.phase(), shared.registry.now_ms());
        // The buffer goes with it, not kept: most miners are idle between jobs.
        if let Err(reason) = outbox.push(std::mem::take(&mut out.to_miner), server) {
            close = close.or(Some(reason));
        }
        if let Some(reason) = close {
            break reason;
        }
    };
    // Nothing more goes to the group: the seat is free before the last output is written.
    drop(seat);
    outbox.close(reason, server).await;
    reason
}

fn same_pool(a: &Option<Arc<Pool>>, b: &Option<Arc<Pool>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

fn miner_line(
    shared: &Shared,
    handle: &SessionHandle,
    session: &mut MinerSession,
    limiter: &mut RateLimiter,
    line: &[u8],
    out: &mut Output,
    close: &mut Option<CloseReason>,
) {
    let now = Instant::now();
    shared.registry.touch(handle);
    if limiter.allow(now) {
        session.on_miner_line(line, now, out);
    } else {
        tracing::info!("miner past its message rate limit");
        *close = Some(CloseReason::RateLimited);
    }
}

#[cfg(test)]
mod tests;
