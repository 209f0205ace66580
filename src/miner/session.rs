//! The miner side, in both modes: the sans-IO session of one miner connection. A miner line (or
//! news from its pool side) goes in; bytes for the miner, requests for the pool side and events
//! come out. Sockets, timers and accounting live around it.
//!
//! What the mode decides is the session's [`Policy`]:
//! - **Relay** (passthrough): the miner's subscribe, authorize, configure and other requests are
//!   its own pool session's, and the pool's replies answer them; the pool's difficulty, job ids
//!   and extranonce1 are the miner's; every share that passes the local checks goes to the pool,
//!   whose verdict answers it.
//! - **Local** (aggregate mode): the session answers the miner itself; the difficulty is its
//!   vardiff's; the extranonce1 is the miner's prefix; the job ids are the proxy's; a share is
//!   answered at once, and goes to the pool when it meets the pool's difficulty.
//!
//! Both judge shares the same way, against the same [`JobBook`].

use std::sync::Arc;

use metrics::counter;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::aggregate::Work;
use crate::jobs::{share_id, Job, JobBook, JobIds, Lookup};
use crate::metrics as m;
use crate::protocol::miner::{self, Call, MinerMessage, Submit};
use crate::protocol::pool::MAX_EXTRANONCE2_SIZE;
use crate::protocol::{code, write, Id};
use crate::registry::{CloseReason, Phase};
use crate::share::{meets, target_from_difficulty};
use crate::submissions::{self, JobTarget, LocalReject, PoolVerdict, RejectReason, ShareContext, ValidShare};
use crate::vardiff::{Vardiff, VardiffConfig};

/// Requests in flight to the pool per passthrough session. A miner past it gets an error at
/// once, so a silent pool cannot make the pending map grow.
pub const MAX_IN_FLIGHT: usize = 256;
/// Workers one connection may authorize. ASIC firmware authorizes one; a downstream proxy in
/// front of a farm (another Loka, a Braiins Farm Proxy) puts many workers on one connection.
const MAX_CONNECTION_WORKERS: usize = 1024;
/// Consecutive malformed lines that close the connection.
const MALFORMED_STREAK_CLOSE: u8 = 2;

pub const VERSION: &str = concat!("loka-stratum/", env!("CARGO_PKG_VERSION"));

/// Something the session's driver has to act on besides moving bytes.
#[derive(Debug, Clone)]
pub enum Event {
    /// A share passed the proxy's checks.
    ShareValid(ValidShare),
    /// The proxy's checks refused a share; the miner got an error.
    ShareRefused(RejectReason),
    /// The pool's verdict on a forwarded share, with the time to its reply if it came.
    PoolVerdict(PoolVerdict, Option<std::time::Duration>),
    /// A worker was authorized (the name the miner uses).
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

/// What the session asks of its pool side.
#[derive(Debug)]
pub enum Up {
    /// A share for the pool.
    Share(Forward),
    /// Authorize this worker upstream: always in passthrough, with `worker_passthrough` in
    /// aggregate mode. The answer comes back through [`MinerSession::authorized`] (and, relayed,
    /// as the pool's own reply).
    Authorize { id: Id, user: String, password: String },
    /// Passthrough: a request relayed as the miner sent it, answered by the pool's reply.
    Relay { id: Id, kind: Relayed, method: Box<str>, params: Option<Box<RawValue>> },
}

/// What a relayed request is, for the pool side to learn from its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relayed {
    Subscribe,
    Configure,
    Other,
}

/// A share that passed the local checks, ready to submit.
#[derive(Debug)]
pub struct Forward {
    pub job: Arc<Job>,
    /// The worker it was submitted under; `None` submits as the pool's user (aggregate mode
    /// without `worker_passthrough`).
    pub worker: Option<Arc<str>>,
    /// The pool's extranonce2: the miner's prefix (if any) ‖ its extranonce2 ‖ padding.
    extranonce2: [u8; MAX_EXTRANONCE2_SIZE],
    extranonce2_len: u8,
    pub ntime: u32,
    pub nonce: u32,
    pub version_bits: Option<u32>,
    /// The miner's request, when the pool's verdict answers it (passthrough).
    pub reply_to: Option<Id>,
    /// The share meets the network target: a block candidate, sent whatever the pool's difficulty.
    pub block: Option<BlockCandidate>,
}

/// A share whose hash meets the network target from its job's nbits.
#[derive(Debug, Clone, Copy)]
pub struct BlockCandidate {
    pub hash: [u8; 32],
    /// Below the pool's share target (a network easier than the pool, as on testnets): sent for the
    /// block alone, so that the pool's reject of it as a share says nothing of the pool's health.
    pub below_share_target: bool,
}

impl Forward {
    pub fn extranonce2(&self) -> &[u8] {
        &self.extranonce2[..usize::from(self.extranonce2_len)]
    }
}

/// What one step produced. The driver writes the buffers out and handles the rest, then clears it.
#[derive(Debug, Default)]
pub struct Output {
    pub to_miner: Vec<u8>,
    /// Lines of this step that no honest miner sends in volume: malformed lines, unknown
    /// methods, a worker authorized again, a repeated subscribe, and submits for unknown jobs or
    /// workers. The miner's task closes a connection that keeps sending them.
    pub junk: u32,
    /// Bytes for the pool (passthrough's pool session writes here).
    pub to_pool: Vec<u8>,
    pub up: Vec<Up>,
    pub events: Vec<Event>,
}

impl Output {
    pub fn clear(&mut self) {
        self.to_miner.clear();
        self.to_pool.clear();
        self.up.clear();
        self.events.clear();
        self.junk = 0;
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        self.events.iter().find_map(|e| match e {
            Event::Close(r) => Some(*r),
            _ => None,
        })
    }
}

/// Where a session's difficulty, answers and extranonce1 come from.
#[derive(Debug)]
pub enum Policy {
    /// Passthrough: the pool's.
    Relay,
    /// Aggregate mode: the proxy's.
    Local(Local),
}

/// Aggregate mode's part of a session.
#[derive(Debug)]
pub struct Local {
    vardiff: Vardiff,
    /// The group's work as of the last step.
    work: Arc<Work>,
    /// Workers are authorized upstream under their own names.
    worker_passthrough: bool,
    /// The mask the miner asked for in `mining.configure`.
    requested_mask: Option<u32>,
    extranonce_subscribed: bool,
    /// The difficulty the miner was last told.
    sent_difficulty: Option<f64>,
}

#[derive(Debug)]
struct Worker {
    name: Box<str>,
    /// Submitted under its own name upstream (passthrough, `worker_passthrough`).
    upstream: Option<Arc<str>>,
}

/// One miner connection's session.
#[derive(Debug)]
pub struct MinerSession {
    policy: Policy,
    malformed_streak: u8,
    subscribed: bool,
    workers: Vec<Worker>,
    /// The extranonce1 the miner works with: the pool's, or its prefix.
    extranonce1: Box<[u8]>,
    en2_size: usize,
    /// The version-rolling mask the miner was granted.
    mask: Option<u32>,
    book: JobBook,
}

impl MinerSession {
    /// A passthrough session: everything it is told comes from its pool session.
    pub fn relay() -> Self {
        Self::new(Policy::Relay, Box::default(), 0, JobIds::Pool)
    }

    /// An aggregated miner's session, with its prefix as extranonce1 and the group's work.
    pub fn local(
        prefix: Vec<u8>,
        work: Arc<Work>,
        vardiff: VardiffConfig,
        worker_passthrough: bool,
        now: Instant,
    ) -> Self {
        let en2_size = work.en2_size;
        let local = Local {
            vardiff: Vardiff::new(vardiff, now),
            work,
            worker_passthrough,
            requested_mask: None,
            extranonce_subscribed: false,
            sent_difficulty: None,
        };
        Self::new(Policy::Local(local), prefix.into_boxed_slice(), en2_size, JobIds::Proxy)
    }

    fn new(policy: Policy, extranonce1: Box<[u8]>, en2_size: usize, ids: JobIds) -> Self {
        Self {
            policy,
            malformed_streak: 0,
            subscribed: false,
            workers: Vec::new(),
            extranonce1,
            en2_size,
            mask: None,
            book: JobBook::new(ids),
        }
    }

    /// Subscribed once the subscribe was answered; authorized once a worker also was.
    pub fn phase(&self) -> Phase {
        Phase::of(self.subscribed, !self.workers.is_empty())
    }

    pub fn extranonce(&self) -> (&[u8], usize) {
        (&self.extranonce1, self.en2_size)
    }

    pub fn version_mask(&self) -> Option<u32> {
        self.mask
    }

    /// The group's work (aggregate mode).
    pub fn work(&self) -> Option<&Arc<Work>> {
        match &self.policy {
            Policy::Local(local) => Some(&local.work),
            Policy::Relay => None,
        }
    }

    /// When the vardiff wants its next look (aggregate mode).
    pub fn next_check(&self) -> Option<Instant> {
        match &self.policy {
            Policy::Local(local) => Some(local.vardiff.next_check()),
            Policy::Relay => None,
        }
    }

    /// The request in `line`, if it is one, counted. A reply (a line without a method) is
    /// ignored; a malformed line gets error 20, with its id when that could be read, and the
    /// second in a row closes the connection.
    fn parse<'a>(&mut self, line: &'a [u8], out: &mut Output) -> Option<miner::Request<'a>> {
        match miner::parse(line) {
            Ok(MinerMessage::Request(request)) => {
                self.malformed_streak = 0;
                m::message_from_miner(&request.method);
                Some(request)
            }
            Ok(MinerMessage::Response { .. }) => None,
            Err(e) => {
                out.junk += 1;
                counter!(m::MALFORMED, "source" => "miner").increment(1);
                write::error(&mut out.to_miner, &e.id.unwrap_or_else(Id::null), code::OTHER, &e.kind.to_string());
                self.malformed_streak += 1;
                if self.malformed_streak >= MALFORMED_STREAK_CLOSE {
                    out.events.push(Event::Close(CloseReason::Malformed));
                }
                None
            }
        }
    }

    /// Answers a request in `line` with `message` instead of handling it (the pool side is full).
    pub fn refuse_line(&mut self, line: &[u8], message: &str, out: &mut Output) {
        if let Some(request) = self.parse(line, out) {
            reply_error(out, &request.id, code::OTHER, message);
        }
    }

    /// One line from the miner.
    pub fn on_miner_line(&mut self, line: &[u8], now: Instant, out: &mut Output) {
        let Some(request) = self.parse(line, out) else { return };
        let id = request.id;
        let relay = |out: &mut Output, kind| {
            let params = request.params.map(|p| p.to_owned());
            out.up.push(Up::Relay { id: id.clone(), kind, method: request.method.as_ref().into(), params });
        };
        out.junk += u32::from(self.subscribed && matches!(request.call, Call::Subscribe { .. }));
        match (request.call, &mut self.policy) {
            (Call::Submit(submit), _) => self.submit(id, &submit, now, out),
            (Call::Authorize { user, password }, _) => {
                let again = self.workers.iter().any(|w| *w.name == user);
                out.junk += u32::from(again);
                if again && matches!(self.policy, Policy::Local(_)) {
                    reply(out, &id, &true);
                } else if self.workers.len() >= MAX_CONNECTION_WORKERS {
                    reply_error(out, &id, code::OTHER, "too many workers on this connection");
                } else if matches!(&self.policy, Policy::Local(l) if !l.worker_passthrough) {
                    reply(out, &id, &true);
                    self.authorized(user, out);
                } else {
                    out.up.push(Up::Authorize { id, user, password });
                }
            }
            (Call::Subscribe { .. }, Policy::Relay) => relay(out, Relayed::Subscribe),
            (Call::Configure(_), Policy::Relay) => relay(out, Relayed::Configure),
            (Call::ExtranonceSubscribe | Call::SuggestDifficulty(_), Policy::Relay) => relay(out, Relayed::Other),
            (Call::Unknown, Policy::Relay) => {
                out.junk += 1;
                relay(out, Relayed::Other)
            }
            (Call::Subscribe { .. }, Policy::Local(local)) => {
                self.subscribed = true;
                self.en2_size = local.work.en2_size;
                let sid = hex::encode(&self.extranonce1);
                let subscriptions = json!([["mining.set_difficulty", sid], ["mining.notify", sid]]);
                reply(out, &id, &json!([subscriptions, sid, self.en2_size]));
                self.send_job(true, out);
            }
            (Call::Configure(c), Policy::Local(local)) => {
                let mut result = serde_json::Map::new();
                for extension in &c.extensions {
                    if extension == "version-rolling" {
                        // Only inside what the pool granted: a share rolled outside it would be
                        // answered true here and rejected upstream.
                        let requested = c.version_rolling_mask.unwrap_or(u32::MAX);
                        let mask = requested & local.work.pool_mask();
                        self.mask = (mask != 0).then_some(mask);
                        local.requested_mask = self.mask.map(|_| requested);
                        result.insert("version-rolling".into(), self.mask.is_some().into());
                        if let Some(mask) = self.mask {
                            result.insert("version-rolling.mask".into(), format!("{mask:08x}").into());
                        }
                    } else {
                        result.insert(extension.clone(), false.into());
                    }
                }
                reply(out, &id, &result);
            }
            (Call::ExtranonceSubscribe, Policy::Local(local)) => {
                local.extranonce_subscribed = true;
                reply(out, &id, &true);
            }
            (Call::SuggestDifficulty(d), Policy::Local(local)) => {
                local.vardiff.suggest(d, now);
                reply(out, &id, &true);
                self.retarget(out);
            }
            (Call::Unknown, Policy::Local(_)) => {
                out.junk += 1;
                reply_error(out, &id, code::OTHER, "unsupported method");
            }
        }
    }

    /// A worker the pool side (or, in aggregate mode without `worker_passthrough`, the proxy)
    /// accepted. In aggregate mode the miner is answered here; in passthrough the pool's reply
    /// was relayed.
    pub fn authorized(&mut self, user: String, out: &mut Output) {
        if self.workers.iter().any(|w| *w.name == *user) {
            return;
        }
        let upstream = match &self.policy {
            Policy::Local(local) if !local.worker_passthrough => None,
            _ => Some(Arc::from(user.as_str())),
        };
        self.workers.reserve_exact(1);
        self.workers.push(Worker { name: user.clone().into_boxed_str(), upstream });
        out.events.push(Event::Authorized(user));
    }

    /// The pool side's answer to an [`Up::Authorize`] in aggregate mode.
    pub fn on_authorize_answer(&mut self, id: &Id, user: String, ok: bool, out: &mut Output) {
        if ok {
            reply(out, id, &true);
            self.authorized(user, out);
        } else {
            reply_error(out, id, code::UNAUTHORIZED, "Unauthorized worker");
        }
    }

    /// Passthrough: the pool accepted the miner's subscribe.
    pub fn subscribed(&mut self, extranonce1: &[u8], extranonce2_size: usize) {
        self.set_extranonce(extranonce1, extranonce2_size);
        self.subscribed = true;
    }

    /// Passthrough: the pool's extranonce, from its subscribe reply or `mining.set_extranonce`.
    /// The jobs sent before a new extranonce1 are stale: their shares were hashed with the old
    /// one. (A job made for another extranonce2 size is stale by its own `en2_size`.)
    pub fn set_extranonce(&mut self, extranonce1: &[u8], extranonce2_size: usize) {
        if *self.extranonce1 != *extranonce1 {
            self.book.retain(|_| false);
        }
        self.extranonce1 = extranonce1.into();
        self.en2_size = extranonce2_size;
    }

    /// Passthrough: the mask the pool granted (relayed to the miner as it came).
    pub fn set_version_mask(&mut self, mask: Option<u32>) {
        self.mask = mask;
    }

    /// Passthrough: the pool's difficulty, relayed as it came; it applies from the next job.
    pub fn set_difficulty(&mut self, difficulty: f64, out: &mut Output) {
        out.events.push(Event::Difficulty(difficulty));
    }

    /// Passthrough: a job from the pool, relayed as it came, at the pool's difficulty.
    pub fn on_job(&mut self, job: Arc<Job>, clean: bool) {
        let difficulty = job.upstream_difficulty;
        self.book.push(job, difficulty, clean);
    }

    /// Aggregate mode: the group's work changed (a job, a pool switch, a mask or an extranonce
    /// change).
    pub fn on_work(&mut self, work: Arc<Work>, out: &mut Output) {
        let Policy::Local(local) = &mut self.policy else { return };
        let epoch_changed = work.epoch != local.work.epoch;
        local.work = work;
        if epoch_changed {
            // Jobs of an ended pool session are stale from now on. The new pool's first job goes
            // with the difficulty, changed or not: a miner may have reset it with the old pool.
            let epoch = local.work.epoch;
            self.book.retain(|job| job.epoch == epoch);
            local.sent_difficulty = None;
        }
        if !self.subscribed {
            self.en2_size = local.work.en2_size;
            return;
        }
        if local.work.en2_size != self.en2_size {
            if !local.extranonce_subscribed {
                // The miner cannot be told its new extranonce2 size: it must subscribe again.
                write::notification(&mut out.to_miner, "client.reconnect", &json!([]));
                out.events.push(Event::Close(CloseReason::PoolReconnect));
                return;
            }
            self.en2_size = local.work.en2_size;
            let params = json!([hex::encode(&self.extranonce1), self.en2_size]);
            write::notification(&mut out.to_miner, "mining.set_extranonce", &params);
        }
        // Between pool sessions there is no mask to follow: the next pool's comes with its work.
        if let Some(requested) = local.requested_mask.filter(|_| local.work.pool.is_some()) {
            let mask = requested & local.work.pool_mask();
            if Some(mask) != self.mask {
                self.mask = Some(mask);
                write::notification(&mut out.to_miner, "mining.set_version_mask", &[format!("{mask:08x}")]);
            }
        }
        let last_sent = self.book.newest().map(|s| s.job.seq);
        if let Some(newest) = local.work.newest() {
            if last_sent.is_none_or(|s| newest.seq > s) || epoch_changed {
                let after = last_sent.unwrap_or(0);
                let clean = epoch_changed || local.work.jobs.iter().any(|j| j.seq > after && j.notify.clean_jobs);
                self.send_job(clean, out);
            }
        }
    }

    /// Aggregate mode: the vardiff's timer.
    pub fn on_tick(&mut self, now: Instant, out: &mut Output) {
        if let Policy::Local(local) = &mut self.policy {
            if local.vardiff.tick(now).is_some() {
                self.retarget(out);
            }
        }
    }

    /// The miner's difficulty moved: tell it, and send the newest job again under a new id, so
    /// that the new difficulty applies from that job on (see [`send_job`](Self::send_job)).
    fn retarget(&mut self, out: &mut Output) {
        let Policy::Local(local) = &mut self.policy else { return };
        let difficulty = local.vardiff.difficulty();
        if self.subscribed && local.sent_difficulty.is_some_and(|d| d != difficulty) {
            self.send_job(false, out);
        }
    }

    /// Aggregate mode: sends the newest job, with `mining.set_difficulty` first when the
    /// difficulty changed. The difficulty is the vardiff's even above the pool's: the group asks
    /// the pool for its work's difficulty, so that the pool's target is the easier one. Nothing
    /// is sent from a pool the group is leaving: the next pool's first job comes soon.
    ///
    /// A re-send of a job at a new difficulty must reach firmware that keeps its work while a
    /// job's header bytes are unchanged (cpuminer keeps the work's id and target then, clean or
    /// not): its ntime is the job's plus the re-send's count, so its header differs. A lower
    /// difficulty is urgent (a miner that is too slow may not find a share for a long while), so
    /// that re-send is also clean on the wire, to make firmware restart at once; a higher one is
    /// not, so that no work is thrown away: the miner takes it after its next share. Either way
    /// the book keeps the earlier ids live, as their work is as good for the pool as ever.
    fn send_job(&mut self, clean: bool, out: &mut Output) {
        let Policy::Local(local) = &mut self.policy else { return };
        let Some(job) = local.work.newest().filter(|_| !local.work.leaving).cloned() else { return };
        let difficulty = local.vardiff.difficulty();
        let lowered = local.sent_difficulty.is_some_and(|d| difficulty < d);
        if local.sent_difficulty != Some(difficulty) {
            write::notification(&mut out.to_miner, "mining.set_difficulty", &[difficulty]);
            local.sent_difficulty = Some(difficulty);
            out.events.push(Event::Difficulty(difficulty));
        }
        let id = self.book.push(job.clone(), difficulty, clean);
        let resend = id.resend();
        let ntime = job.notify.ntime.wrapping_add(u32::from(resend));
        job.notify.write_as(&mut out.to_miner, &id.to_string(), ntime, clean || (resend > 0 && lowered));
    }

    fn submit(&mut self, id: Id, submit: &Submit, now: Instant, out: &mut Output) {
        let (index, worker, share) = match self.judge(submit) {
            Ok(valid) => valid,
            Err(reject) => {
                // Refused here, answered at once, and never sent to the pool. Stale, duplicate
                // and low-difficulty shares come from honest miners too; the rest do not.
                let honest = matches!(
                    reject.reason,
                    RejectReason::Stale | RejectReason::Duplicate | RejectReason::LowDifficulty
                );
                out.junk += u32::from(!honest);
                reply_error(out, &id, reject.code, &reject.message);
                out.events.push(Event::ShareRefused(reject.reason));
                return;
            }
        };
        self.book.remember(index, share_id(&share.hash));
        let job = self.book.sent(index).job.clone();
        // Both modes send every block candidate, as ckpool does, whatever the pool's difficulty.
        let meets_pool = meets(&share.hash, &job.upstream_target);
        let block = share.block.then_some(BlockCandidate { hash: share.hash, below_share_target: !meets_pool });
        // In aggregate mode the miner's extranonce1 is its prefix, the start of the pool's extranonce2.
        let prefix: &[u8] = if matches!(self.policy, Policy::Local(_)) { &self.extranonce1 } else { &[] };
        let mask = self.mask.unwrap_or(0);
        let forward = |reply_to| {
            let mut extranonce2 = [0u8; MAX_EXTRANONCE2_SIZE];
            let len = prefix.len() + self.en2_size + job.pad;
            extranonce2[..prefix.len()].copy_from_slice(prefix);
            extranonce2[prefix.len()..prefix.len() + self.en2_size].copy_from_slice(share.extranonce2());
            Forward {
                job: job.clone(),
                worker,
                extranonce2,
                extranonce2_len: len as u8,
                ntime: share.ntime,
                nonce: share.nonce,
                // The bits as the miner sent them: the checks kept them inside the mask. None go
                // to a pool that granted no mask.
                version_bits: (submit.version_bits.is_some() && mask != 0).then_some(share.version & mask),
                reply_to,
                block,
            }
        };
        match &mut self.policy {
            Policy::Relay => {
                let reply_to = (!id.is_null()).then_some(id);
                out.up.push(Up::Share(forward(reply_to)));
                out.events.push(Event::ShareValid(share));
            }
            Policy::Local(local) => {
                reply(out, &id, &true);
                if meets_pool || block.is_some() {
                    out.up.push(Up::Share(forward(None)));
                } else if let Some(pool) = &local.work.pool {
                    pool.share_metrics().kept_local();
                }
                out.events.push(Event::ShareValid(share));
                // The work counts at the difficulty it was judged at, on whichever job it came.
                if local.vardiff.on_share(share.job_difficulty, now).is_some() {
                    self.retarget(out);
                }
            }
        }
    }

    /// The local checks, in order: subscribed, an authorized worker, a job this miner was sent
    /// and that is still live, then the share itself at the difficulty the job was sent with.
    #[allow(clippy::type_complexity)]
    fn judge(&self, submit: &Submit) -> Result<(usize, Option<Arc<str>>, ValidShare), LocalReject> {
        if !self.subscribed {
            return Err(LocalReject::new(code::NOT_SUBSCRIBED, "Not subscribed", RejectReason::NotSubscribed));
        }
        let Some(worker) = self.workers.iter().find(|w| *w.name == submit.worker) else {
            return Err(LocalReject::new(code::UNAUTHORIZED, "Unauthorized worker", RejectReason::Unauthorized));
        };
        let stale = || LocalReject::new(code::JOB_NOT_FOUND, "Job not found (stale)", RejectReason::Stale);
        let index = match self.book.lookup(&submit.job_id) {
            Lookup::Live(index) => index,
            Lookup::Stale => return Err(stale()),
            Lookup::Unknown => {
                return Err(LocalReject::new(code::JOB_NOT_FOUND, "Job not found", RejectReason::BadJob));
            }
        };
        let sent = self.book.sent(index);
        if sent.job.en2_size != self.en2_size {
            return Err(stale());
        }
        let target = target_from_difficulty(sent.difficulty);
        let job = JobTarget { notify: &sent.job.notify, difficulty: sent.difficulty, target: &target };
        let miner = ShareContext {
            extranonce1: &self.extranonce1,
            extranonce2_size: self.en2_size,
            version_mask: self.mask.unwrap_or(0),
        };
        let share = submissions::check(job, miner, submit, |id| self.book.is_duplicate(index, id))?;
        Ok((index, worker.upstream.clone(), share))
    }
}

/// A reply, unless the request was a notification (a null id).
fn reply(out: &mut Output, id: &Id, result: &impl serde::Serialize) {
    if !id.is_null() {
        write::result(&mut out.to_miner, id, result);
    }
}

pub(crate) fn reply_error(out: &mut Output, id: &Id, code: i64, message: &str) {
    if !id.is_null() {
        write::error(&mut out.to_miner, id, code, message);
    }
}

#[cfg(test)]
mod tests;
