//! An aggregated miner's pool side: its seat in a group. The group's work comes in through a
//! `watch`; shares and authorizes go out through the group's queue. The miner's task
//! (`server::connection`) drives it as it drives passthrough's own pool session.

use std::sync::Arc;

use metrics::counter;
use tokio::sync::{oneshot, watch};
use tokio::time::{timeout, Instant};

use super::{Seat, Upward, Work};
use crate::auth::Answer;
use crate::config::Config;
use crate::connection::{Shared, NO_POOL};
use crate::metrics as m;
use crate::protocol::code;
use crate::registry::{CloseReason, SessionHandle};
use crate::session::{reply_error, Event, MinerSession, Output, Up};
use crate::upstream::Pool;

/// One miner's seat in a group, and its session under the local policy.
#[derive(Debug)]
pub struct Member {
    pub session: MinerSession,
    seat: Seat,
    work: watch::Receiver<Arc<Work>>,
}

impl Member {
    pub fn new(seat: Seat, config: &Config, now: Instant) -> Self {
        let mut work = seat.group.subscribe();
        let prefix = seat.prefix.to_bytes(config.aggregate.prefix_bytes);
        let initial = work.borrow_and_update().clone();
        let session =
            MinerSession::local(prefix, initial, config.vardiff.vardiff(), config.aggregate.worker_passthrough, now);
        Member { session, seat, work }
    }

    /// The pool the group works for now, if it has one.
    pub fn pool(&self) -> Option<&Arc<Pool>> {
        self.session.work().and_then(|work| work.pool.as_ref())
    }

    /// The group's work changed (`Ok`), or the group is gone.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        self.work.changed().await
    }

    /// Takes the group's newest work, if it changed: a share for a pool that is gone is stale.
    pub fn on_changed(&mut self, changed: Result<(), watch::error::RecvError>, out: &mut Output) {
        match changed {
            Ok(()) => {
                let new = self.work.borrow_and_update().clone();
                self.session.on_work(new, out);
            }
            Err(_) => out.events.push(Event::Close(CloseReason::UpstreamLost)),
        }
    }

    /// Puts the group's newest work in force, if it changed since the session last saw it.
    fn catch_up(&mut self, out: &mut Output) {
        if self.work.has_changed().unwrap_or(false) {
            self.on_changed(Ok(()), out);
        }
    }

    /// The vardiff's look. A retarget re-sends the newest job: never one of a pool the group has
    /// left.
    pub fn on_tick(&mut self, now: Instant, out: &mut Output) {
        self.catch_up(out);
        self.session.on_tick(now, out);
    }

    /// The miner was given a new difficulty: the group's sum of its miners' work follows.
    pub fn set_difficulty(&mut self, difficulty: f64) {
        self.seat.set_difficulty(difficulty);
    }

    /// One line from the miner, judged against the group's newest work. Its shares go to the
    /// group; an authorize stays in `out.up`, for [`authorize`](Self::authorize).
    pub fn on_miner_line(&mut self, handle: &Arc<SessionHandle>, line: &[u8], now: Instant, out: &mut Output) {
        self.catch_up(out);
        self.session.on_miner_line(line, now, out);
        let mut dropped = 0;
        for up in std::mem::take(&mut out.up) {
            match up {
                // Each forwarded share carries its miner's handle, so that the group credits the
                // pool's verdict to the miner.
                Up::Share(f) => dropped += u64::from(self.seat.group.send(Upward::Share(f, handle.clone())).is_err()),
                up @ Up::Authorize { .. } => out.up.push(up),
                Up::Relay { .. } => unreachable!("a local session relays nothing"),
            }
        }
        if dropped > 0 {
            tracing::warn!(dropped, "upstream queue full; shares not forwarded");
            let label = self.pool().map_or(&NO_POOL, |pool| &pool.metric_label);
            counter!(m::UPSTREAM_SHARES, "pool" => label.clone(), "result" => "dropped").increment(dropped);
        }
    }

    /// Asks the group's pool about the workers the last line authorizes, and answers the miner.
    pub async fn authorize(&mut self, shared: &Shared, handle: &Arc<SessionHandle>, config: &Config, out: &mut Output) {
        let peer = handle.peer.ip();
        for up in std::mem::take(&mut out.up) {
            let Up::Authorize { id, user, password } = up else { continue };
            let now = Instant::now();
            if let Some(message) = shared.auth.refusal(peer, &user, now) {
                reply_error(out, &id, code::UNAUTHORIZED, &message);
                continue;
            }
            let (tx, rx) = oneshot::channel();
            let upward = Upward::Authorize { worker: user.as_str().into(), password, reply: tx, miner: handle.clone() };
            let answer = match self.seat.group.send(upward) {
                Ok(()) => timeout(config.upstream.connect_timeout(), rx).await.ok().and_then(Result::ok),
                Err(_) => None,
            };
            // Only the pool's refusal is the miner's failure; its silence or its error is not.
            if let Some(answer) = answer {
                shared.auth.answered(peer, &user, answer, now);
            }
            self.session.on_authorize_answer(&id, user, answer == Some(Answer::Accepted), out);
        }
    }
}
