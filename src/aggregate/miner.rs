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
const MAX_WORKERS: usize = 16;

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
                } else if self.workers.len() >= MAX_WORKERS {
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
mod tests {
    use super::*;
    use crate::protocol::pool::Notify;
    use crate::share;
    use crate::upstream::Pool;

    /// The genesis block's coinbase, split as a pool with a 4-byte extranonce1 and a 4-byte
    /// extranonce2 would send it: the proxy keeps the extranonce2's first 2 bytes as the prefix.
    const GENESIS_COINBASE: &str = concat!(
        "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff4d04ffff001d",
        "0104455468652054696d65732030332f4a616e2f32303039204368616e63656c6c6f72206f6e206272696e6b206f",
        "66207365636f6e64206261696c6f757420666f722062616e6b73ffffffff0100f2052a01000000434104678afdb0",
        "fe5548271967f1a67130b7105cd6a828e03909a67962e0ea1f61deb649f6bc3f4cef38c4f35504e51ec112de5c38",
        "4df7ba0b8d578a4c702b6bf11d5fac00000000"
    );
    const GENESIS_NONCE: u32 = 2083236893;
    const GENESIS_NTIME: u32 = 0x495fab29;

    struct Genesis {
        /// The pool's extranonce1 and the whole extranonce2 the genesis coinbase holds.
        extranonce1: Vec<u8>,
        extranonce2: Vec<u8>,
        coinb1: Vec<u8>,
        coinb2: Vec<u8>,
    }

    fn genesis() -> Genesis {
        let bytes = hex::decode(GENESIS_COINBASE).unwrap();
        Genesis {
            coinb1: bytes[..60].to_vec(),
            extranonce1: bytes[60..64].to_vec(),
            extranonce2: bytes[64..68].to_vec(),
            coinb2: bytes[68..].to_vec(),
        }
    }

    /// A job as a group builds it from the pool's: coinb1 ‖ E1_up, then padding ‖ coinb2.
    fn job(seq: u64, epoch: u64, en2_size: usize, pad: usize, upstream_difficulty: f64) -> Arc<AggJob> {
        let g = genesis();
        let notify = Notify {
            job_id: String::new(),
            prevhash: [0; 32],
            coinb1: [g.coinb1, g.extranonce1].concat(),
            coinb2: [vec![0; pad], g.coinb2].concat(),
            merkle_branch: vec![],
            version: 1,
            nbits: 0x1d00ffff,
            ntime: GENESIS_NTIME,
            clean_jobs: true,
        };
        Arc::new(AggJob {
            seq,
            epoch,
            upstream_id: format!("up{seq}").into(),
            notify,
            en2_size,
            pad,
            upstream_difficulty,
            upstream_target: target_from_difficulty(upstream_difficulty),
        })
    }

    fn pool() -> Arc<Pool> {
        let config = Config {
            pools: vec![crate::config::PoolConfig { url: "stratum+tcp://127.0.0.1:1".into(), ..Default::default() }],
            ..Config::default()
        };
        crate::upstream::PoolSet::new(&config, tokio_util::sync::CancellationToken::new()).pools()[0].clone()
    }

    fn work(epoch: u64, en2_size: usize, jobs: Vec<Arc<AggJob>>, mask: Option<u32>) -> Arc<Work> {
        Arc::new(Work { epoch, pool: Some(pool()), en2_size, version_mask: mask, jobs })
    }

    fn vardiff(start: f64) -> VardiffConfig {
        VardiffConfig {
            start_difficulty: start,
            min_difficulty: 1e-12,
            max_difficulty: 1e12,
            target_shares_per_minute: 20.0,
            retarget_secs: 30.0,
        }
    }

    fn lines(buf: &[u8]) -> Vec<serde_json::Value> {
        buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect()
    }

    fn line(s: &mut MinerSession, text: &str) -> Output {
        let mut out = Output::default();
        s.on_miner_line(text.as_bytes(), Instant::now(), &mut out);
        out
    }

    /// A session with the genesis prefix, subscribed and authorized as "farm.rig1", whose first
    /// job (seq 1) went out at difficulty 1.
    fn ready(upstream_difficulty: f64) -> (MinerSession, Vec<serde_json::Value>) {
        let prefix = genesis().extranonce2[..2].to_vec();
        let w = work(1, 2, vec![job(1, 1, 2, 0, upstream_difficulty)], None);
        let mut s = MinerSession::new(prefix, w, vardiff(1.0), false, Instant::now());
        let out = line(&mut s, r#"{"id":1,"method":"mining.subscribe","params":["bitaxe/2.4"]}"#);
        let sent = lines(&out.to_miner);
        line(&mut s, r#"{"id":2,"method":"mining.authorize","params":["farm.rig1","x"]}"#);
        (s, sent)
    }

    fn submit(id: u64, job: &str, en2: &str, nonce: u32) -> String {
        format!(
            r#"{{"id":{id},"method":"mining.submit","params":["farm.rig1","{job}","{en2}","{GENESIS_NTIME:08x}","{nonce:08x}"]}}"#
        )
    }

    #[test]
    fn the_genesis_block_through_a_prefix_reaches_the_pool_as_its_own_extranonce2() {
        let (mut s, sent) = ready(1.0);
        let g = genesis();
        assert_eq!(sent[0]["result"][1], hex::encode(&g.extranonce2[..2]), "the prefix is the extranonce1");
        assert_eq!(sent[0]["result"][2], 2);
        assert_eq!(sent[1]["method"], "mining.set_difficulty");
        assert_eq!(sent[2]["params"][0], "100", "proxy job id: seq 1, tag 0");
        let en2 = hex::encode(&g.extranonce2[2..]);
        let out = line(&mut s, &submit(3, "100", &en2, GENESIS_NONCE));
        assert_eq!(lines(&out.to_miner)[0]["result"], true);
        let Some(Event::ShareValid(v)) = out.events.first() else { panic!("{:?}", out.events) };
        assert!(v.block);
        assert_eq!(share::display_hash(&v.hash), "000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f");
        assert_eq!(out.forward.len(), 1);
        let f = &out.forward[0];
        assert_eq!(f.extranonce2, g.extranonce2, "P ‖ en2 is the pool's extranonce2");
        assert_eq!(&*f.job.upstream_id, "up1");
        assert_eq!((f.ntime, f.nonce, f.version_bits), (GENESIS_NTIME, GENESIS_NONCE, None));
        // The same share again is a duplicate, and a miss is low difficulty; neither is forwarded.
        let out = line(&mut s, &submit(4, "100", &en2, GENESIS_NONCE));
        assert_eq!(lines(&out.to_miner)[0]["error"][0], 22);
        let out = line(&mut s, &submit(5, "100", &en2, GENESIS_NONCE + 1));
        assert_eq!(lines(&out.to_miner)[0]["error"][0], 23);
        assert!(out.forward.is_empty());
    }

    #[test]
    fn shares_below_the_pool_difficulty_are_accepted_but_not_forwarded() {
        // The genesis hash reaches difficulty ~2536; the pool wants more.
        let (mut s, _) = ready(1e6);
        let en2 = hex::encode(&genesis().extranonce2[2..]);
        let out = line(&mut s, &submit(3, "100", &en2, GENESIS_NONCE));
        assert_eq!(lines(&out.to_miner)[0]["result"], true);
        assert!(out.forward.is_empty());
        assert!(out.events.iter().any(|e| matches!(e, Event::ShareValid(_))));
    }

    #[test]
    fn a_new_difficulty_comes_with_the_job_it_applies_to() {
        let (mut s, _) = ready(1e6);
        let out = line(&mut s, r#"{"id":3,"method":"mining.suggest_difficulty","params":[4096]}"#);
        let sent = lines(&out.to_miner);
        assert_eq!(sent[0]["result"], true);
        assert_eq!(sent[1]["params"], serde_json::json!([4096.0]));
        assert_eq!((sent[2]["method"].as_str(), sent[2]["params"][0].as_str()), (Some("mining.notify"), Some("101")));
        let en2 = hex::encode(&genesis().extranonce2[2..]);
        // The genesis hash (difficulty ~2536) passes at the old job id's difficulty 1, not at 4096.
        let out = line(&mut s, &submit(4, "101", &en2, GENESIS_NONCE));
        assert_eq!(lines(&out.to_miner)[0]["error"][0], 23);
        let out = line(&mut s, &submit(5, "100", &en2, GENESIS_NONCE));
        assert_eq!(lines(&out.to_miner)[0]["result"], true);
        // Never above the pool's difficulty.
        let (mut s, _) = ready(2.0);
        let out = line(&mut s, r#"{"id":3,"method":"mining.suggest_difficulty","params":[4096]}"#);
        assert_eq!(lines(&out.to_miner)[1]["params"], serde_json::json!([2.0]));
    }

    #[test]
    fn a_pool_switch_makes_old_jobs_stale_and_sends_a_clean_job() {
        let (mut s, _) = ready(1.0);
        let mut out = Output::default();
        s.on_work(work(2, 2, vec![job(7, 2, 2, 0, 1.0)], None), Instant::now(), &mut out);
        let sent = lines(&out.to_miner);
        assert_eq!(sent.len(), 1, "the difficulty is unchanged: only the job");
        assert_eq!(sent[0]["params"][0], "700");
        assert_eq!(sent[0]["params"][8], true);
        let en2 = hex::encode(&genesis().extranonce2[2..]);
        let out = line(&mut s, &submit(3, "100", &en2, GENESIS_NONCE));
        assert_eq!(lines(&out.to_miner)[0]["error"], serde_json::json!([21, "Job not found (stale)", null]));
        assert!(out.forward.is_empty(), "never sent to the new pool");
        let out = line(&mut s, &submit(4, "ffff00", &en2, GENESIS_NONCE));
        assert_eq!(lines(&out.to_miner)[0]["error"], serde_json::json!([21, "Job not found", null]));
    }

    #[test]
    fn less_extranonce2_means_set_extranonce_or_reconnect() {
        for subscribed in [true, false] {
            let (mut s, _) = ready(1.0);
            if subscribed {
                line(&mut s, r#"{"id":9,"method":"mining.extranonce.subscribe","params":[]}"#);
            }
            let mut out = Output::default();
            s.on_work(work(2, 1, vec![job(8, 2, 1, 0, 1.0)], None), Instant::now(), &mut out);
            let sent = lines(&out.to_miner);
            if subscribed {
                assert_eq!(sent[0]["method"], "mining.set_extranonce");
                assert_eq!(sent[0]["params"], serde_json::json!([hex::encode(&genesis().extranonce2[..2]), 1]));
                assert_eq!(sent[1]["method"], "mining.notify");
                assert_eq!(out.events.len(), 0);
            } else {
                assert_eq!(sent, [serde_json::json!({"id":null,"method":"client.reconnect","params":[]})]);
                assert!(matches!(out.events[..], [Event::Close(CloseReason::PoolReconnect)]));
            }
        }
    }

    #[test]
    fn version_mask_is_the_request_cut_to_the_pool_and_follows_it() {
        let (mut s, _) = ready(1.0);
        let out = line(
            &mut s,
            r#"{"id":3,"method":"mining.configure","params":[["version-rolling","minimum-difficulty"],{"version-rolling.mask":"ffffffff"}]}"#,
        );
        let result = &lines(&out.to_miner)[0]["result"];
        assert_eq!(result["version-rolling.mask"], "1fffffe0", "the default mask when the pool grants none");
        assert_eq!(result["minimum-difficulty"], false);
        let mut out = Output::default();
        s.on_work(work(1, 2, vec![job(1, 1, 2, 0, 1.0)], Some(0x1fffe000)), Instant::now(), &mut out);
        assert_eq!(
            lines(&out.to_miner),
            [serde_json::json!({"id":null,"method":"mining.set_version_mask","params":["1fffe000"]})]
        );
    }

    #[test]
    fn malformed_twice_in_a_row_closes() {
        let (mut s, _) = ready(1.0);
        let out = line(&mut s, r#"{"id":7,"method":"mining.submit","params":[1]}"#);
        assert_eq!(lines(&out.to_miner)[0]["error"][0], 20);
        assert!(out.events.is_empty());
        let out = line(&mut s, "not json");
        assert!(matches!(out.events[..], [Event::Close(CloseReason::Malformed)]));
    }

    #[test]
    fn job_ids_round_trip() {
        for (seq, tag) in [(1, 0), (0x00ab_cdef, 7), (u64::MAX >> 8, 255)] {
            assert_eq!(parse_job_id(&job_id(seq, tag)), Some((seq, tag)));
        }
        assert_eq!(parse_job_id(""), None);
        assert_eq!(parse_job_id("xyz"), None);
        assert_eq!(parse_job_id("11112222333344445"), None);
    }
}
