//! One pool session shared by many miners: it keeps the session on the best healthy pool,
//! translates the pool's jobs for the miners, and forwards the shares that meet the pool's
//! difficulty.
//!
//! Miners see the group through a `watch` of its [`Work`]: the live jobs, the extranonce2 size
//! they work with and the pool's version mask. A switch to another pool is one new `Work` with a
//! new epoch; each miner's task turns it into a difficulty and a clean job (or, when the new pool
//! leaves too little extranonce2, a `mining.set_extranonce` or a `client.reconnect`).
//!
//! The pool is asked, with `mining.suggest_difficulty`, for the group's work as its difficulty:
//! the sum of its miners' difficulties, at which the group's shares reach the pool at one
//! miner's target rate.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::counter;
use tokio::sync::{mpsc, oneshot, watch, Notify as Wake};
use tokio::time::{sleep_until, Instant};

use super::connection::{Connection, OpenError};
use super::workers::Workers;
use super::{Context, SessionView};
use crate::auth::Answer;
use crate::codec::FrameError;
use crate::jobs::{next_seq, Job, MAX_JOBS};
use crate::metrics as m;
use crate::pool_session::{PoolSession, Step};
use crate::protocol::pool::Notify;
use crate::registry::SessionHandle;
use crate::session::Forward;
use crate::submissions::{PoolVerdict, SubmissionManager};
use crate::upstream::Pool;

/// Miners never get more extranonce2 than this: Whatsminer and cgminer break above 8 bytes.
pub const MAX_MINER_EXTRANONCE2: usize = 8;
/// Miners need at least this much extranonce2 to have work to roll.
pub const MIN_MINER_EXTRANONCE2: usize = 2;
/// Shares and authorizes waiting for the group task; a miner past it gets an error.
const UPWARD_QUEUE: usize = 65_536;
/// Submits unanswered by the pool before the pool is judged broken.
const MAX_UNANSWERED_SUBMITS: usize = 65_536;
/// Bytes waiting for the pool to read them before the group stops taking shares from miners.
const MAX_UNWRITTEN: usize = 1 << 20;
/// How often a group looks for a better pool to fail back to, and waits while no pool is usable.
const CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// The group's work must move by this factor, either way, before the pool is asked again ...
const SUGGEST_STEP: f64 = 1.25;
/// ... and no sooner than this after the last suggestion: miners come and go in bursts.
const SUGGEST_INTERVAL: Duration = Duration::from_secs(5);

/// What the miners of a group work on, as of now.
#[derive(Debug, Default, Clone)]
pub struct Work {
    /// Changes with every pool session: jobs of an earlier epoch are stale.
    pub epoch: u64,
    /// The pool the group is on; `None` between pool sessions.
    pub pool: Option<Arc<Pool>>,
    /// The extranonce2 size miners of this group work with.
    pub en2_size: usize,
    /// The pool's version-rolling mask, if it granted one: miners roll only inside it.
    pub version_mask: Option<u32>,
    /// Live jobs, oldest first.
    pub jobs: Vec<Arc<Job>>,
    /// The group is leaving the pool: its jobs stay live until the next pool's first job
    /// replaces them (make before break), and none of them is sent to a miner again.
    pub leaving: bool,
}

impl Work {
    /// Miners can be given work.
    pub fn is_ready(&self) -> bool {
        !self.jobs.is_empty() && !self.leaving
    }

    /// The mask miners' requests are cut down to: none when the pool granted none.
    pub fn pool_mask(&self) -> u32 {
        self.version_mask.unwrap_or(0)
    }

    pub fn newest(&self) -> Option<&Arc<Job>> {
        self.jobs.last()
    }
}

/// What a miner's task hands its group.
#[derive(Debug)]
pub enum Upward {
    /// A share, and the miner to credit with the pool's verdict.
    Share(Forward, Arc<SessionHandle>),
    /// Authorize this worker upstream (`worker_passthrough`) for `miner`; the answer goes to
    /// `reply`.
    Authorize { worker: Arc<str>, password: String, reply: oneshot::Sender<Answer>, miner: Arc<SessionHandle> },
}

/// One pool session and the miners in it.
#[derive(Debug)]
pub struct Group {
    pub index: usize,
    context: Arc<Context>,
    members: AtomicUsize,
    /// Wakes the group's task when its last miner leaves: a draining group waits for that.
    emptied: Wake,
    work: watch::Sender<Arc<Work>>,
    upward: mpsc::Sender<Upward>,
    /// Sequence numbers of the oldest and newest live jobs; 0 for none.
    oldest: AtomicU64,
    newest: AtomicU64,
    /// Its miners' difficulties summed, as `f64` bits: the work the pool is asked to match.
    difficulty: AtomicU64,
}

impl Group {
    /// A group and the task that runs its pool sessions.
    pub fn new(index: usize, context: Arc<Context>) -> (Arc<Self>, impl Future<Output = ()> + Send + 'static) {
        let (upward, rx) = mpsc::channel(UPWARD_QUEUE);
        let group = Arc::new(Self {
            index,
            context,
            members: AtomicUsize::new(0),
            emptied: Wake::new(),
            work: watch::Sender::new(Arc::new(Work::default())),
            upward,
            oldest: AtomicU64::new(0),
            newest: AtomicU64::new(0),
            difficulty: AtomicU64::new(0),
        });
        let task = run(group.clone(), rx);
        (group, task)
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Work>> {
        self.work.subscribe()
    }

    pub fn is_ready(&self) -> bool {
        self.work.borrow().is_ready()
    }

    pub fn pool(&self) -> Option<Arc<Pool>> {
        self.work.borrow().pool.clone()
    }

    pub fn members(&self) -> usize {
        self.members.load(Ordering::Acquire)
    }

    /// Takes a place if fewer than `cap` miners hold one.
    pub fn try_join(&self, cap: usize) -> bool {
        self.members.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < cap).then_some(n + 1)).is_ok()
    }

    pub fn leave(&self) {
        if self.members.fetch_sub(1, Ordering::AcqRel) == 1 {
            // A permit is kept if the task is not waiting: it looks at `members` again anyway.
            self.emptied.notify_one();
        }
    }

    /// A miner's difficulty moved by `delta` (or the miner joined or left).
    pub fn add_difficulty(&self, delta: f64) {
        let add = |bits| Some((f64::from_bits(bits) + delta).max(0.0).to_bits());
        let _ = self.difficulty.fetch_update(Ordering::AcqRel, Ordering::Acquire, add);
    }

    /// Its miners' difficulties summed.
    pub fn difficulty(&self) -> f64 {
        f64::from_bits(self.difficulty.load(Ordering::Acquire))
    }

    pub fn oldest_job(&self) -> Option<u64> {
        Some(self.oldest.load(Ordering::Acquire)).filter(|s| *s > 0)
    }

    pub fn newest_job(&self) -> Option<u64> {
        Some(self.newest.load(Ordering::Acquire)).filter(|s| *s > 0)
    }

    /// Queues a share or an authorize for the pool; a full queue hands it back.
    pub fn send(&self, upward: Upward) -> Result<(), Upward> {
        self.upward.try_send(upward).map_err(|e| e.into_inner())
    }

    pub fn view(&self) -> SessionView {
        let work = self.work.borrow();
        SessionView {
            session: self.index,
            pool: work.pool.as_ref().map(|p| p.label.clone()),
            miners: self.members(),
            miner_extranonce2_size: work.en2_size,
            pool_difficulty: work.newest().map_or(0.0, |j| j.upstream_difficulty),
            jobs: work.jobs.len(),
        }
    }

    fn publish(&self, work: Work) {
        self.oldest.store(work.jobs.first().map_or(0, |j| j.seq), Ordering::Release);
        self.newest.store(work.jobs.last().map_or(0, |j| j.seq), Ordering::Release);
        self.work.send_replace(Arc::new(work));
    }
}

/// What a group remembers across pool sessions.
#[derive(Debug, Default)]
struct State {
    epoch: u64,
    /// The extranonce2 size miners were given; 0 before the first session.
    en2_size: usize,
    jobs: Vec<Arc<Job>>,
    /// Workers of live miners, authorized on every pool session (`worker_passthrough`).
    workers: Workers,
    /// The pool of the last session, to tell a failover from a reconnect.
    last_pool: Option<Arc<Pool>>,
}

/// Why a pool session ended.
enum End {
    /// The connection closed or failed.
    Lost(&'static str),
    /// The pool broke the protocol or went unhealthy.
    Fault(&'static str),
    /// A better pool is ready: this session is replaced by it.
    Switch(Box<Connection>),
    /// The pool asked for a reconnect: a move, not a sign of ill health.
    Reconnect,
    Shutdown,
}

/// The group's task: a pool session after another, on the best pool there is, until shutdown.
async fn run(group: Arc<Group>, mut rx: mpsc::Receiver<Upward>) {
    let context = group.context.clone();
    let mut state = State::default();
    let mut next: Option<Connection> = None;
    'sessions: loop {
        if context.shutdown.is_cancelled() {
            break;
        }
        let session = match next.take() {
            Some(session) => Some(session),
            None => tokio::select! {
                _ = context.shutdown.cancelled() => break,
                session = connect(&context) => session,
            },
        };
        let Some(mut session) = session else {
            // No pool is usable: the jobs of the pool left are gone. Keep the miners, answer what
            // comes, and look again shortly.
            if !state.jobs.is_empty() {
                retire(&group, &mut state);
            }
            let wait = Instant::now() + CHECK_INTERVAL;
            loop {
                tokio::select! {
                    _ = context.shutdown.cancelled() => break 'sessions,
                    _ = sleep_until(wait) => break,
                    Some(up) = rx.recv() => refuse(up),
                }
            }
            continue;
        };
        adopt(&group, &mut state, &mut session);
        let end = serve(&group, &mut state, &mut session, &mut rx).await;
        let pool = session.pool.clone();
        session.close();
        match end {
            End::Shutdown => break,
            End::Switch(new) => {
                tracing::info!(session = group.index, from = %pool.label, to = %new.pool.label, "moving to a better pool");
                next = Some(*new);
            }
            End::Reconnect => {
                tracing::info!(session = group.index, pool = %pool.label, "the pool asked for a reconnect");
                retire(&group, &mut state);
            }
            End::Lost(reason) => {
                tracing::warn!(session = group.index, pool = %pool.label, reason, "pool session lost; failing over");
                pool.connection_lost();
                leave(&group);
            }
            End::Fault(reason) => {
                counter!(m::UPSTREAM_FAULTS, "pool" => pool.label.clone(), "reason" => reason).increment(1);
                tracing::warn!(session = group.index, pool = %pool.label, reason, "pool fault; failing over");
                pool.report_fault();
                leave(&group);
            }
        }
    }
    settle_queue(&group, &mut rx);
}

/// Shares still queued when the group stops could not be sent: each is counted, none is lost
/// silently. Miners that try to queue more from now on count theirs as dropped.
fn settle_queue(group: &Group, rx: &mut mpsc::Receiver<Upward>) {
    rx.close();
    let mut dropped = 0;
    while let Ok(up) = rx.try_recv() {
        dropped += usize::from(matches!(up, Upward::Share(..)));
        refuse(up);
    }
    if dropped > 0 {
        tracing::warn!(session = group.index, dropped, "shutting down: shares never sent to the pool");
    }
}

/// The first pool, in priority order and those in doubt last, that completes a handshake.
async fn connect(context: &Arc<Context>) -> Option<Connection> {
    for pool in context.pools.candidates() {
        match Connection::open(context.clone(), pool.clone()).await {
            Ok(session) => return Some(session),
            Err(error) => error.report(&pool, "failover"),
        }
    }
    None
}

/// Make before break: the pool is being left, and miners keep its jobs until the next pool's
/// first job replaces them, or [`retire`] takes them when there is none.
fn leave(group: &Group) {
    let current = group.work.borrow().clone();
    group.publish(Work { leaving: true, ..Work::clone(&current) });
}

/// Between pool sessions: every job is gone, so late shares are stale, and nothing is forwarded.
fn retire(group: &Group, state: &mut State) {
    state.epoch += 1;
    state.jobs.clear();
    group.publish(Work {
        epoch: state.epoch,
        pool: None,
        en2_size: state.en2_size,
        version_mask: None,
        jobs: Vec::new(),
        leaving: false,
    });
}

fn refuse(up: Upward) {
    match up {
        Upward::Share(..) => counter!(m::UPSTREAM_SHARES, "pool" => "none", "result" => "dropped").increment(1),
        // Dropped unanswered: no pool said no.
        Upward::Authorize { .. } => {}
    }
}

/// Puts a new pool session in force: a new epoch, the miners' extranonce2 size, its first jobs.
fn adopt(group: &Group, state: &mut State, session: &mut Connection) {
    let settings = group.context.settings();
    let room = session.extranonce2_size - settings.prefix_bytes;
    if state.en2_size == 0 || group.members() == 0 || room < state.en2_size {
        if state.en2_size != 0 && room < state.en2_size {
            tracing::warn!(
                session = group.index,
                pool = %session.pool.label,
                from = state.en2_size,
                to = room.min(MAX_MINER_EXTRANONCE2),
                "the pool leaves miners less extranonce2; they get mining.set_extranonce or client.reconnect"
            );
        }
        state.en2_size = room.min(MAX_MINER_EXTRANONCE2);
    }
    if let Some(last) = state.last_pool.replace(session.pool.clone()) {
        if !Arc::ptr_eq(&last, &session.pool) {
            // Back to a pool of higher priority is a failback. Leaving a pool that a reload took
            // out of the configuration (or gave new credentials) is neither: nothing failed.
            let pools = group.context.pools.pools();
            let rank = |pool: &Arc<Pool>| pools.iter().position(|p| Arc::ptr_eq(p, pool));
            let kind = match (rank(&last), rank(&session.pool)) {
                (None, _) => "reload",
                (Some(old), Some(new)) if new < old => "failback",
                _ => "failover",
            };
            counter!(m::FAILOVERS, "kind" => kind).increment(1);
            if kind == "reload" {
                tracing::info!(session = group.index, from = %last.label, to = %session.pool.label, "moved by a reload");
            } else {
                tracing::warn!(session = group.index, from = %last.label, to = %session.pool.label, kind, "switched pools");
            }
        }
    }
    state.epoch += 1;
    state.jobs.clear();
    // The workers of live miners, authorized again: written first, before any of their shares.
    let mut buf = Vec::new();
    state.workers.adopt(&mut session.session, &group.context.auth.rewrite(), &mut buf, Instant::now());
    session.link.queue(&buf);
    for (notify, difficulty) in std::mem::take(&mut session.early_jobs) {
        add_job(group, state, session, notify, difficulty);
    }
    publish(group, state, session);
}

fn add_job(group: &Group, state: &mut State, session: &PoolSession, n: Notify, difficulty: f64) {
    let settings = group.context.settings();
    let pad = session.extranonce2_size - settings.prefix_bytes - state.en2_size;
    if n.clean_jobs {
        state.jobs.clear();
    }
    // The pool's extranonce1 is hidden from miners: it joins coinb1.
    let job = Job::new(next_seq(), state.epoch, n, &session.extranonce1, state.en2_size, pad, difficulty);
    state.jobs.push(Arc::new(job));
    if state.jobs.len() > MAX_JOBS {
        state.jobs.remove(0);
    }
}

fn publish(group: &Group, state: &State, session: &PoolSession) {
    group.publish(Work {
        epoch: state.epoch,
        pool: Some(session.pool.clone()),
        en2_size: state.en2_size,
        version_mask: session.version_mask,
        jobs: state.jobs.clone(),
        leaving: false,
    });
}

type Opening = Pin<Box<dyn Future<Output = (Arc<Pool>, Result<Connection, OpenError>)> + Send>>;

/// Runs one adopted pool session until it ends.
async fn serve(group: &Group, state: &mut State, session: &mut Connection, rx: &mut mpsc::Receiver<Upward>) -> End {
    let context = group.context.clone();
    // What a step writes for the pool; queued on the link, which writes it while the pool is
    // read: a pool that blocks on writing its replies must still have them read.
    let mut buf = Vec::new();
    // A group relays nothing to miners: this stays empty.
    let mut relayed = Vec::new();
    let mut check = tokio::time::interval(CHECK_INTERVAL);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut better: Option<Opening> = None;
    // The group's work as last suggested to the pool, and when.
    let mut suggested = None;
    suggest(group, session, &mut buf, &mut suggested, Instant::now());
    // Set when the proxy starts shutting down. The session goes on forwarding what miners queue
    // until the last of them has left (they stop reading at once), then writes out the rest and
    // waits for the pool's answers, all within `server.shutdown_grace`.
    let mut drain: Option<Instant> = None;
    // The queue is closed and empty: nothing more will come from miners.
    let mut queue_done = false;
    loop {
        session.link.queue(&buf);
        buf.clear();
        let settings = context.settings();
        let job_deadline = session.last_notify.unwrap_or(session.opened_at) + settings.job_timeout;
        // Miners wait `connect_timeout` for an authorize's answer: the pool's silence is judged
        // in half of it, so that each is answered.
        let authorize_deadline = session.authorize_deadline(settings.connect_timeout / 2);
        let answer_deadline = session.oldest_waiting().map(|sent| sent + settings.submit_timeout);
        if let Some(deadline) = drain {
            if !queue_done && group.members() == 0 {
                // No miner holds a seat: nothing can be queued after what is queued now.
                rx.close();
            }
            if queue_done && session.link.unwritten() == 0 && session.submits_pending() == 0 {
                tracing::debug!(session = group.index, "drained: every forwarded share answered");
                return End::Shutdown;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    session = group.index,
                    pool = %session.pool.label,
                    unanswered = session.submits_pending(),
                    queued = rx.len(),
                    "shutdown_grace ran out before the pool answered every forwarded share"
                );
                return End::Shutdown;
            }
        }
        tokio::select! {
            biased;
            _ = context.shutdown.cancelled(), if drain.is_none() => {
                drain = Some(Instant::now() + settings.shutdown_grace);
                // No move to another pool now: the shares in flight are this pool's.
                better = None;
            }
            _ = sleep_until(drain.unwrap_or_else(Instant::now)), if drain.is_some() => {}
            _ = group.emptied.notified(), if drain.is_some() && !queue_done => {}
            // Also writes what is queued; a write stalled past write_timeout is an error.
            line = session.link.next_line() => {
                let line = match line {
                    Some(Ok(line)) => line,
                    Some(Err(FrameError::TooLong(_))) => {
                        counter!(m::LINES_TOO_LONG, "source" => "pool").increment(1);
                        return End::Fault("line over max_line_bytes");
                    }
                    Some(Err(FrameError::Io(e))) => {
                        tracing::info!(pool = %session.pool.label, error = %e, "pool connection failed");
                        return End::Lost("connection failed");
                    }
                    None => return End::Lost("connection closed"),
                };
                let step = match session.on_line(&line, Instant::now(), &mut buf, &mut relayed) {
                    Ok(step) => step,
                    Err(fault) => return End::Fault(fault),
                };
                match step {
                    None => {}
                    Some(Step::Job(n)) => {
                        let difficulty = session.difficulty;
                        add_job(group, state, session, n, difficulty);
                        publish(group, state, session);
                    }
                    Some(Step::Changed { extranonce }) => {
                        if extranonce {
                            if session.extranonce2_size < settings.prefix_bytes + MIN_MINER_EXTRANONCE2 {
                                return End::Fault("set_extranonce leaves miners too little extranonce2");
                            }
                            // Jobs of the old extranonce are gone; a smaller size reaches the miners.
                            let room = session.extranonce2_size - settings.prefix_bytes;
                            if room < state.en2_size {
                                state.en2_size = room.min(MAX_MINER_EXTRANONCE2);
                            }
                            state.epoch += 1;
                            state.jobs.clear();
                        }
                        publish(group, state, session);
                    }
                    Some(Step::Reconnect { host, port }) => {
                        session.pool.reconnect_requested(host.as_deref(), port, settings.allow_pool_redirect);
                        return End::Reconnect;
                    }
                    Some(Step::Verdict { miner, verdict, rtt }) => credit(&session.pool, miner, verdict, rtt),
                    // Passthrough's steps: a group never relays.
                    Some(Step::Difficulty(_) | Step::Subscribed | Step::Configured | Step::Authorized { .. }) => {}
                }
                if session.rejecting(settings.max_reject_rate) {
                    return End::Fault("reject rate over upstream.max_reject_rate");
                }
                if session.pending() > MAX_UNANSWERED_SUBMITS {
                    return End::Fault("too many submits unanswered");
                }
            }
            // While the pool is slow to read, shares wait in the queue (and past it are refused).
            up = rx.recv(), if !queue_done && session.link.unwritten() < MAX_UNWRITTEN => {
                let Some(up) = up else {
                    queue_done = true;
                    continue;
                };
                let now = Instant::now();
                handle(group, state, session, &mut buf, up, now);
                // Take what else is queued, so that one write carries many shares.
                for _ in 0..256 {
                    match rx.try_recv() {
                        Ok(up) => handle(group, state, session, &mut buf, up, now),
                        Err(_) => break,
                    }
                }
            }
            _ = sleep_until(job_deadline), if drain.is_none() => return End::Fault("no job within job_timeout"),
            // A forwarded share the pool leaves unanswered: it is hung, with its socket open.
            _ = sleep_until(answer_deadline.unwrap_or(job_deadline)), if answer_deadline.is_some() && drain.is_none() => {
                if let Err(fault) = session.expire(Instant::now(), settings.submit_timeout, &mut relayed) {
                    return End::Fault(fault);
                }
            }
            (pool, opened) = async { better.as_mut().expect("polled only when set").await }, if better.is_some() => {
                better = None;
                match opened {
                    Ok(new) => return End::Switch(Box::new(new)),
                    Err(error) => error.report(&pool, "failback"),
                }
            }
            _ = sleep_until(authorize_deadline.unwrap_or_else(Instant::now)), if authorize_deadline.is_some() => {
                state.workers.silent(&mut session.session, group.index);
            }
            _ = check.tick(), if drain.is_none() => {
                let now = Instant::now();
                state.workers.tick(&mut session.session, now);
                suggest(group, session, &mut buf, &mut suggested, now);
                if better.is_some() {
                    continue;
                }
                if let Some(pool) = better_pool(&context, &session.pool) {
                    tracing::info!(session = group.index, pool = %pool.label, "trying a better pool");
                    let context = context.clone();
                    better = Some(Box::pin(async move {
                        let opened = Connection::open(context, pool.clone()).await;
                        (pool, opened)
                    }));
                }
            }
        }
    }
}

/// A pool to move to: the current one left the configuration (a reload), or a pool of higher
/// priority has been reachable for `failback_after`.
fn better_pool(context: &Context, current: &Arc<Pool>) -> Option<Arc<Pool>> {
    let pools = context.pools.pools();
    match pools.iter().position(|p| Arc::ptr_eq(p, current)) {
        None => context.pools.candidates().into_iter().next(),
        Some(index) => pools
            .into_iter()
            .take(index)
            .find(|p| p.is_up() && !p.in_doubt() && p.up_for().is_some_and(|t| t >= context.settings().failback_after)),
    }
}

fn handle(group: &Group, state: &mut State, session: &mut Connection, buf: &mut Vec<u8>, up: Upward, now: Instant) {
    match up {
        Upward::Share(f, miner) => {
            if f.job.epoch != state.epoch {
                // Worked for an earlier session: never sent to another pool.
                counter!(m::UPSTREAM_SHARES, "pool" => session.pool.metric_label.clone(), "result" => "dropped")
                    .increment(1);
                return;
            }
            session.session.submit(buf, f, Some(miner), now);
        }
        Upward::Authorize { worker, password, reply, miner } => {
            if !state.workers.add(&mut session.session, &worker, &password, &miner) {
                // Never a miner left unauthorized: its shares go under the pool's user.
                let _ = reply.send(Answer::Accepted);
                return;
            }
            let rewrite = group.context.auth.rewrite();
            session.session.authorize(buf, &rewrite, worker, &password, Some(reply), None, now);
        }
    }
}

/// Asks the pool for the group's work as its difficulty: at once on a new session, then when the
/// work moved by more than `SUGGEST_STEP`, at most once per `SUGGEST_INTERVAL`.
fn suggest(
    group: &Group,
    session: &mut PoolSession,
    buf: &mut Vec<u8>,
    last: &mut Option<(f64, Instant)>,
    now: Instant,
) {
    let work = group.difficulty();
    if group.members() == 0 || work.is_nan() || work <= 0.0 {
        return;
    }
    if let Some((sent, at)) = *last {
        if now < at + SUGGEST_INTERVAL || (work / sent).max(sent / work) <= SUGGEST_STEP {
            return;
        }
    }
    tracing::debug!(session = group.index, pool = %session.pool.label, difficulty = work, "suggesting a difficulty");
    session.suggest_difficulty(buf, work);
    *last = Some((work, now));
}

/// The pool's verdict on a miner's share, credited to the miner.
pub(super) fn credit(pool: &Pool, miner: Option<Arc<SessionHandle>>, verdict: PoolVerdict, rtt: Option<Duration>) {
    if let Some(miner) = miner {
        SubmissionManager.pool_verdict(&miner, pool.share_metrics(), verdict, rtt);
    }
}
