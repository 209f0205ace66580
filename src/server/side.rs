//! A miner's pool side, the policy of its connection task: in passthrough a pool session of its
//! own, in aggregate mode a seat in a group that shares one.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use metrics::counter;
use tokio::sync::watch;
use tokio::time::Instant;

use super::connection::Shared;
use crate::aggregate::miner::Member;
use crate::aggregate::Refused;
use crate::codec::FrameError;
use crate::config::Config;
use crate::metrics as m;
use crate::passthrough::Passthrough;
use crate::registry::{CloseReason, Phase, SessionHandle};
use crate::session::Output;
use crate::upstream::{NoUpstream, Pool, PoolLink};

/// Bytes queued for a miner's pool past which the miner is not read until the pool takes them.
const MAX_UNWRITTEN: usize = 64 * 1024;

/// A miner's pool side: the policy of its task. A member is held inline: the driver that holds
/// it is one allocation already, and aggregated miners are the many.
#[allow(clippy::large_enum_variant)]
pub(super) enum Side {
    /// Passthrough: a pool session of its own. Boxed: an aggregated miner does not pay its size.
    Own(Box<Own>),
    /// Aggregate mode: a seat in a group that shares one.
    Member(Member),
}

/// Passthrough's pool side: the miner's session with its pool session, and the connection.
pub(super) struct Own {
    pub(super) session: Passthrough,
    pub(super) link: PoolLink,
    pub(super) started: Instant,
    pub(super) job_timeout: Duration,
    pub(super) submit_timeout: Duration,
    pub(super) connect_timeout: Duration,
    /// The miner's lines until the pool's first line or the miner's first byte (then `None`):
    /// replayed on the next pool if this one stays silent for `connect_timeout`.
    pub(super) unheard: Option<Vec<BytesMut>>,
    /// Set once the proxy starts shutting down: no more miner lines, only replies.
    pub(super) drain_deadline: Option<Instant>,
}

impl Own {
    /// When the pool has gone `job_timeout` without a job.
    pub(super) fn job_deadline(&self) -> Instant {
        self.session.last_notify().unwrap_or(self.started) + self.job_timeout
    }

    /// When the oldest request the pool has not answered runs out of `submit_timeout`.
    pub(super) fn answer_deadline(&mut self) -> Option<Instant> {
        self.session.oldest_waiting().map(|sent| sent + self.submit_timeout)
    }

    /// When a pool that has said nothing to the miner's first lines is judged silent.
    pub(super) fn silence_deadline(&self) -> Option<Instant> {
        self.unheard.as_ref().filter(|lines| !lines.is_empty()).map(|_| self.started + self.connect_timeout)
    }

    /// Starts over on `link`: the miner's lines so far go to the new pool as they came.
    pub(super) fn reopen(&mut self, shared: &Shared, handle: &SessionHandle, link: PoolLink, out: &mut Output) {
        self.session = Passthrough::new(shared.auth.clone(), link.pool().clone(), handle.peer.ip());
        self.link = link;
        self.started = Instant::now();
        let lines = self.unheard.take().unwrap_or_default();
        for line in &lines {
            self.session.on_miner_line(line, self.started, out);
        }
        self.unheard = Some(lines);
    }
}

/// Lines kept for a replay: subscribe, configure, authorize, suggest_difficulty, xnsub and more.
const MAX_UNHEARD: usize = 8;

/// What woke a pool side.
pub(super) enum Wake {
    Pool(Option<Result<BytesMut, FrameError>>),
    Work(Result<(), watch::error::RecvError>),
}

impl Side {
    /// A pool session of the miner's own, or a seat in a group.
    pub(super) async fn open(shared: &Shared, config: &Config, handle: &SessionHandle) -> Result<Side, Refused> {
        let Some(aggregator) = &shared.aggregator else {
            let link = shared.pools.connect(None).await.map_err(|NoUpstream| Refused::NoUpstream)?;
            handle.set_phase(Phase::Connected, shared.registry.now_ms());
            let session = Passthrough::new(shared.auth.clone(), link.pool().clone(), handle.peer.ip());
            let own = Own {
                session,
                link,
                started: Instant::now(),
                job_timeout: config.upstream.job_timeout(),
                submit_timeout: config.upstream.submit_timeout(),
                connect_timeout: config.upstream.connect_timeout(),
                unheard: Some(Vec::new()),
                drain_deadline: None,
            };
            return Ok(Side::Own(Box::new(own)));
        };
        let seat = aggregator.admit().await?;
        Ok(Side::Member(Member::new(seat, config, Instant::now())))
    }

    pub(super) fn pool(&self) -> Option<&Arc<Pool>> {
        match self {
            Side::Own(own) => Some(own.link.pool()),
            Side::Member(member) => member.pool(),
        }
    }

    pub(super) fn phase(&self) -> Phase {
        match self {
            Side::Own(own) => own.session.phase(),
            Side::Member(member) => member.session.phase(),
        }
    }

    /// The next timer: a pool session's job, answer and drain deadlines, or a member's vardiff.
    pub(super) fn deadline(&mut self) -> Instant {
        match self {
            Side::Own(own) => {
                let job = own.job_deadline();
                let answer = own.answer_deadline().unwrap_or(job);
                let silence = own.silence_deadline().unwrap_or(job);
                own.drain_deadline.unwrap_or(job).min(job).min(answer).min(silence)
            }
            Side::Member(member) => member.session.next_check().expect("a local session has a vardiff"),
        }
    }

    /// The pool's next line, or the group's next work.
    pub(super) async fn wake(&mut self) -> Wake {
        match self {
            Side::Own(own) => Wake::Pool(own.link.next_line().await),
            Side::Member(member) => Wake::Work(member.changed().await),
        }
    }

    /// Whether to read the miner: not while draining, nor while the pool does not take what is
    /// queued for it (TCP pushes back).
    pub(super) fn reading(&self) -> bool {
        match self {
            Side::Own(own) => own.drain_deadline.is_none() && own.link.unwritten() < MAX_UNWRITTEN,
            Side::Member(_) => true,
        }
    }

    /// Shutting down, and nothing is left to answer.
    pub(super) fn drained(&self) -> bool {
        matches!(self, Side::Own(own) if own.drain_deadline.is_some() && own.session.pending() == 0)
    }

    /// The proxy is shutting down. A pool session waits up to `shutdown_grace` for the replies
    /// in flight; a member closes at once, as its group drains the shares.
    pub(super) fn on_shutdown(&mut self, grace: Duration) -> Option<CloseReason> {
        match self {
            Side::Own(own) => {
                own.drain_deadline.get_or_insert_with(|| Instant::now() + grace);
                None
            }
            Side::Member(_) => Some(CloseReason::Shutdown),
        }
    }

    /// The miner is leaving or being closed: requests in flight get an error if it can still
    /// read one, and their shares are counted as unanswered.
    pub(super) fn on_closing(&mut self, out: &mut Output) {
        if let Side::Own(own) = self {
            own.session.on_miner_closing(out);
        }
    }

    pub(super) fn on_deadline(&mut self, now: Instant, out: &mut Output) {
        let own = match self {
            Side::Member(member) => return member.on_tick(now, out),
            Side::Own(own) => own,
        };
        if own.drain_deadline.is_some_and(|drain| drain <= now) {
            own.session.on_shutdown_deadline(out);
        } else if own.silence_deadline().is_some_and(|silence| silence <= now) {
            // `Driver::leave_silent_pool` moves the session.
        } else if own.answer_deadline().is_some_and(|answer| answer <= now) {
            own.session.on_answer_timeout(now, own.submit_timeout, out);
        } else if own.job_deadline() <= now {
            let (pool, job_timeout) = (&own.link.pool().label, own.job_timeout);
            tracing::warn!(%pool, ?job_timeout, "no job from the pool; dropping the pool session");
            own.session.on_job_timeout(out);
        }
    }

    pub(super) fn on_wake(&mut self, wake: Wake, now: Instant, out: &mut Output) {
        let own = match (self, wake) {
            (Side::Member(member), Wake::Work(changed)) => return member.on_changed(changed, out),
            (Side::Own(own), Wake::Pool(line)) => match line {
                Some(Ok(line)) => {
                    own.unheard = None;
                    return own.session.on_pool_line(&line, now, out);
                }
                Some(Err(FrameError::TooLong(max))) => {
                    counter!(m::LINES_TOO_LONG, "source" => "pool").increment(1);
                    tracing::warn!(max, pool = %own.link.pool().label, "pool line over the cap");
                    return own.session.on_pool_line_too_long(out);
                }
                Some(Err(FrameError::Io(e))) => {
                    tracing::info!(error = %e, "pool connection failed");
                    own
                }
                None => {
                    tracing::info!("pool closed the connection");
                    own
                }
            },
            _ => unreachable!("each side wakes with its own kind"),
        };
        own.link.pool().connection_lost();
        own.session.on_pool_lost(out);
    }

    pub(super) fn on_miner_line(&mut self, handle: &Arc<SessionHandle>, line: &[u8], now: Instant, out: &mut Output) {
        match self {
            Side::Own(own) => {
                let heard = out.to_miner.len();
                own.session.on_miner_line(line, now, out);
                match &mut own.unheard {
                    Some(lines) if out.to_miner.len() == heard && lines.len() < MAX_UNHEARD => lines.push(line.into()),
                    _ => own.unheard = None,
                }
            }
            Side::Member(member) => member.on_miner_line(handle, line, now, out),
        }
    }

    /// Sends what the step wrote for the pool: at once, or while the pool's next line is awaited.
    pub(super) fn flush(&mut self, out: &mut Output) {
        if let Side::Own(own) = self {
            own.link.queue(&out.to_pool);
        }
        out.to_pool.clear();
    }
}
