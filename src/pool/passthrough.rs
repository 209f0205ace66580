//! Passthrough: a group of one. One miner's [`MinerSession`] (relay policy) and its own
//! [`PoolSession`], run together in the miner's task, sans-IO: a miner line or a pool line goes
//! in; bytes for the miner, bytes for the pool and events come out.
//!
//! Every miner request is relayed upstream under the proxy's own id, so that replies always
//! correlate, and every request that expects a reply gets exactly one: the pool's, or an error
//! when the pool goes away or the proxy shuts down.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::auth::{Answer, AuthManager, Rewrite};
use crate::jobs::{next_seq, Job};
use crate::pool_session::{PoolSession, Step};
use crate::protocol::code;
use crate::registry::{CloseReason, Phase};
use crate::session::{reply_error, Event, MinerSession, Output, Up, MAX_IN_FLIGHT};
use crate::submissions::PoolVerdict;
use crate::upstream::Pool;

/// One miner with its own pool session.
#[derive(Debug)]
pub struct Passthrough {
    miner: MinerSession,
    pool: PoolSession,
    auth: Arc<AuthManager>,
    /// The credential rewrite in force when the session began.
    rewrite: Arc<Rewrite>,
    /// The miner's address, for the auth backoff.
    peer: IpAddr,
}

impl Passthrough {
    pub fn new(auth: Arc<AuthManager>, pool: Arc<Pool>, peer: IpAddr) -> Self {
        Self { miner: MinerSession::relay(), pool: PoolSession::new(pool, true), rewrite: auth.rewrite(), auth, peer }
    }

    /// Subscribed once the pool accepted a subscribe; authorized once it also accepted a worker.
    pub fn phase(&self) -> Phase {
        self.miner.phase()
    }

    pub fn extranonce(&self) -> (&[u8], usize) {
        self.miner.extranonce()
    }

    pub fn version_mask(&self) -> Option<u32> {
        self.miner.version_mask()
    }

    /// The pool's difficulty for its next job.
    pub fn difficulty(&self) -> f64 {
        self.pool.difficulty
    }

    /// When the pool last sent a job, if it has.
    pub fn last_notify(&self) -> Option<Instant> {
        self.pool.last_notify
    }

    /// Requests relayed upstream that still wait for the pool's reply.
    pub fn pending(&self) -> usize {
        self.pool.pending()
    }

    /// One line from the miner.
    pub fn on_miner_line(&mut self, line: &[u8], now: Instant, out: &mut Output) {
        if self.pool.pending() >= MAX_IN_FLIGHT {
            return self.miner.refuse_line(line, "too many requests in flight", out);
        }
        self.miner.on_miner_line(line, now, out);
        for up in std::mem::take(&mut out.up) {
            match up {
                Up::Share(f) => self.pool.submit(&mut out.to_pool, f, None, now),
                Up::Authorize { id, user, password } => {
                    if let Some(message) = self.auth.refusal(self.peer, &user, now) {
                        reply_error(out, &id, code::UNAUTHORIZED, &message);
                        continue;
                    }
                    let (rewrite, user) = (&self.rewrite, user.into());
                    self.pool.authorize(&mut out.to_pool, rewrite, user, &password, None, Some(id), now);
                }
                Up::Relay { id, kind, method, params } => {
                    self.pool.relay(&mut out.to_pool, id, kind, &method, params.as_deref(), now)
                }
            }
        }
    }

    /// One line from the pool.
    pub fn on_pool_line(&mut self, line: &[u8], now: Instant, out: &mut Output) {
        // The pool session writes straight into the step's buffers, which the driver takes: an
        // idle miner keeps no buffer.
        match self.pool.on_line(line, now, &mut out.to_pool, &mut out.to_miner) {
            Ok(Some(step)) => self.apply(step, now, out),
            Ok(None) => {}
            Err(fault) => self.pool_fault(fault, out),
        }
    }

    fn apply(&mut self, step: Step, now: Instant, out: &mut Output) {
        let pool = &self.pool;
        match step {
            Step::Job(n) => {
                let clean = n.clean_jobs;
                // One pool session, one epoch: a new extranonce2 size makes earlier jobs stale.
                let job = Job::new(next_seq(), 0, n, &[], pool.extranonce2_size, 0, pool.difficulty);
                self.miner.on_job(Arc::new(job), clean);
            }
            Step::Difficulty(d) => self.miner.set_difficulty(d, out),
            Step::Changed { extranonce: true } => self.miner.set_extranonce(&pool.extranonce1, pool.extranonce2_size),
            Step::Changed { extranonce: false } | Step::Configured => self.miner.set_version_mask(pool.version_mask),
            Step::Subscribed => self.miner.subscribed(&pool.extranonce1, pool.extranonce2_size),
            Step::Authorized { worker, answer } => {
                // The pool's reply went to the miner as it came; only an explicit refusal backs
                // this worker off (see `authorize_answer`).
                self.auth.answered(self.peer, &worker, answer, now);
                if answer == Answer::Accepted {
                    self.miner.authorized(worker.to_string(), out);
                }
            }
            Step::Verdict { verdict, rtt, .. } => out.events.push(Event::PoolVerdict(verdict, rtt)),
            Step::Reconnect { host, port } => {
                // The miner reconnects to the proxy, which picks the pool; the pool's target is
                // never relayed to miners.
                self.fail_pending("upstream reconnecting", out);
                out.events.push(Event::PoolReconnect { host, port });
                out.events.push(Event::Close(CloseReason::PoolReconnect));
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

    /// When the oldest request the miner waits on was sent, while the pool has not answered it.
    pub fn oldest_waiting(&mut self) -> Option<Instant> {
        self.pool.oldest_waiting()
    }

    /// Requests waited `timeout` for the pool by `now`. A share or a subscribe left unanswered
    /// means the pool is hung: every request in flight gets an error and the session ends, so
    /// that the miner reconnects to a healthy pool. Other requests get an error on their own.
    pub fn on_answer_timeout(&mut self, now: Instant, timeout: Duration, out: &mut Output) {
        if let Err(fault) = self.pool.expire(now, timeout, &mut out.to_miner) {
            self.pool_fault(fault, out);
        }
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
    /// error if it can still read one, and their shares are counted as unanswered.
    pub fn on_miner_closing(&mut self, out: &mut Output) {
        self.fail_pending("connection closing", out);
    }

    /// The shutdown grace period is over: requests still in flight get an error.
    pub fn on_shutdown_deadline(&mut self, out: &mut Output) {
        self.fail_pending("proxy shutting down", out);
        out.events.push(Event::Close(CloseReason::Shutdown));
    }

    fn fail_pending(&mut self, message: &str, out: &mut Output) {
        for _ in self.pool.fail_pending(message, &mut out.to_miner) {
            out.events.push(Event::PoolVerdict(PoolVerdict::Unanswered, None));
        }
    }
}

#[cfg(test)]
mod tests;
