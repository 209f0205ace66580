//! One aggregated miner's task: it runs the miner's [`MinerSession`] (local policy) against its
//! group: the group's work comes in through a `watch`, shares and authorizes go out through the
//! group's queue.

use std::sync::Arc;

use futures::StreamExt;
use metrics::{counter, SharedString};
use tokio::io::WriteHalf;
use tokio::sync::{oneshot, watch};
use tokio::time::{sleep_until, timeout, Instant};
use tracing::field;

use super::{Aggregator, Refused, Upward, Work};
use crate::codec::FrameError;
use crate::config::Config;
use crate::connection::{first_line, refusal, MinerReader, MinerStream, Outbox, RateLimiter, Shared};
use crate::metrics as m;
use crate::protocol::code;
use crate::registry::{CloseReason, SessionHandle};
use crate::session::{reply_error, Event, MinerSession, Output, Up};
use crate::upstream::Pool;

static NO_POOL: SharedString = SharedString::const_str("none");

/// Serves one aggregated miner until it leaves, is closed, or the proxy shuts down.
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
    let mut seat = match admitted {
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
        MinerSession::local(prefix, initial, config.vardiff.vardiff(), config.aggregate.worker_passthrough, now);
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
                        session.on_work(new, &mut out);
                    }
                    Err(_) => close = Some(CloseReason::UpstreamLost),
                },
                _ = sleep_until(session.next_check().expect("a local session has a vardiff")) => {
                    // A retarget re-sends the newest job: never one of a pool the group has left.
                    catch_up(&mut work, &mut session, &mut out);
                    session.on_tick(Instant::now(), &mut out);
                }
                line = reader.next() => match line {
                    Some(Ok(line)) => {
                        // Judge against the newest work: a share for a pool that is gone is stale.
                        catch_up(&mut work, &mut session, &mut out);
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
        // The pool changes only with a switch: compared by pointer, not by name, on each step.
        let pool = &session.work().expect("a local session has work").pool;
        if !same_pool(pool, &last_pool) {
            last_pool = pool.clone();
            handle.info().upstream = pool.as_ref().map(|p| Arc::from(p.label.as_str()));
        }
        let label = last_pool.as_ref().map_or(&NO_POOL, |p| &p.metric_label);
        let mut dropped = 0;
        for up in std::mem::take(&mut out.up) {
            match up {
                // Each forwarded share carries its miner's handle, so that the group credits the
                // pool's verdict to the miner.
                Up::Share(f) => dropped += usize::from(seat.group.send(Upward::Share(f, handle.clone())).is_err()),
                Up::Authorize { id, user, password } => {
                    let (peer, now) = (handle.peer.ip(), Instant::now());
                    if let Some(message) = shared.auth.refusal(peer, now) {
                        reply_error(&mut out, &id, code::UNAUTHORIZED, &message);
                        continue;
                    }
                    let (tx, rx) = oneshot::channel();
                    let upward = Upward::Authorize { worker: user.as_str().into(), password, reply: tx };
                    let answer = match seat.group.send(upward) {
                        Ok(()) => {
                            // The miner is watched meanwhile: one that leaves is closed as it left,
                            // not when the late answer cannot be written. A line it sends waits.
                            let wait = timeout(config.upstream.connect_timeout(), rx);
                            tokio::pin!(wait);
                            loop {
                                tokio::select! {
                                    biased;
                                    answer = &mut wait => break answer.ok().and_then(Result::ok),
                                    reason = handle.closed() => {
                                        close = close.or(Some(reason));
                                        break None;
                                    }
                                    line = reader.next(), if first.is_none() => match line {
                                        Some(Ok(line)) => first = Some(line),
                                        Some(Err(FrameError::TooLong(_))) => {
                                            counter!(m::LINES_TOO_LONG, "source" => "miner").increment(1);
                                            close = close.or(Some(CloseReason::LineTooLong));
                                            break None;
                                        }
                                        Some(Err(FrameError::Io(_))) | None => {
                                            close = close.or(Some(CloseReason::MinerClosed));
                                            break None;
                                        }
                                    },
                                }
                            }
                        }
                        Err(_) => None,
                    };
                    // Only the pool's refusal is the miner's failure; its silence is not.
                    match answer {
                        Some(true) => shared.auth.succeeded(peer),
                        Some(false) => shared.auth.failed(peer, now),
                        None => {}
                    }
                    session.on_authorize_answer(&id, user, answer == Some(true), &mut out);
                }
                Up::Relay { .. } => unreachable!("a local session relays nothing"),
            }
        }
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
                Event::Difficulty(d) => {
                    handle.info().difficulty = Some(d);
                    seat.set_difficulty(d);
                }
                Event::Close(reason) => close = close.or(Some(reason)),
                // The group task sends the shares and hears the pool's verdicts.
                Event::PoolVerdict(..) | Event::PoolFault(_) | Event::PoolReconnect { .. } => {}
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

/// Puts the group's newest work in force, if it changed since the session last saw it.
fn catch_up(work: &mut watch::Receiver<Arc<Work>>, session: &mut MinerSession, out: &mut Output) {
    if work.has_changed().unwrap_or(false) {
        let new = work.borrow_and_update().clone();
        session.on_work(new, out);
    }
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
