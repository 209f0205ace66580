//! One connection to a pool on behalf of a group: the handshake (version rolling, subscribe,
//! the pool's own user, the first job), the pool's messages, and the shares and authorizes the
//! group sends, each answered once.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use metrics::counter;
use serde_json::json;
use tokio::sync::oneshot;
use tokio::time::{timeout_at, Instant};

use super::group::{Forward, MIN_MINER_EXTRANONCE2};
use super::Context;
use crate::codec::FrameError;
use crate::metrics as m;
use crate::protocol::pool::{self, Notify, PoolMessage};
use crate::protocol::{verdict, write};
use crate::registry::SessionHandle;
use crate::session::VERSION;
use crate::submissions::{PoolVerdict, RejectReason, SubmissionManager};
use crate::upstream::{Pool, PoolLink};

/// Forwarded shares whose verdicts make up the pool's reject rate, and how many must be in.
const REJECT_WINDOW: usize = 100;
const REJECT_WINDOW_MIN: usize = 20;

/// A request to the pool that waits for its answer.
#[derive(Debug)]
pub(super) enum Request {
    Configure,
    Subscribe,
    /// The pool's own user, which the session needs.
    Login,
    Authorize {
        worker: Arc<str>,
        upstream: Arc<str>,
        waiters: Vec<oneshot::Sender<bool>>,
    },
    Submit {
        sent_at: Instant,
        miner: Arc<SessionHandle>,
    },
}

/// One connection to a pool, from the handshake on.
pub(super) struct PoolSession {
    pub(super) pool: Arc<Pool>,
    pub(super) link: PoolLink,
    pub(super) extranonce1: Vec<u8>,
    pub(super) extranonce2_size: usize,
    pub(super) version_mask: Option<u32>,
    pub(super) difficulty: f64,
    pub(super) next_id: u64,
    pub(super) pending: HashMap<u64, Request>,
    /// Submits in `pending`: a drain waits for them.
    pub(super) submits_pending: usize,
    pub(super) last_notify: Instant,
    /// Jobs that arrived before the group adopted the session, with their difficulty.
    pub(super) early_jobs: Vec<(Notify, f64)>,
    /// Workers the pool accepted on this session, with the names they were accepted under.
    pub(super) authorized: HashMap<Arc<str>, Arc<str>>,
    /// The pool's latest verdicts on forwarded shares; `true` for a reject.
    pub(super) verdicts: VecDeque<bool>,
    /// Authorizes in flight, by worker, to their pending id.
    pub(super) authorizing: HashMap<Arc<str>, u64>,
    pub(super) subscribed: bool,
    pub(super) logged_in: bool,
}

/// What a pool line asks of the group.
pub(super) enum Step {
    Nothing,
    Job(Notify),
    /// The mask or the extranonce changed: miners need new `Work`.
    Changed {
        extranonce: bool,
    },
    /// `client.reconnect`: this session ends; the next one may use the port the pool gave.
    Reconnect {
        host: Option<String>,
        port: Option<u16>,
    },
}

impl PoolSession {
    /// Connects, asks for version rolling, subscribes and logs in, and waits for the first job.
    pub(super) async fn open(context: Arc<Context>, pool: Arc<Pool>) -> Result<PoolSession, String> {
        let link = context.pools.open(&pool).await.map_err(|e| format!("connect failed: {e}"))?;
        let mut s = PoolSession {
            pool: pool.clone(),
            link,
            extranonce1: Vec::new(),
            extranonce2_size: 0,
            version_mask: None,
            difficulty: 1.0,
            next_id: 1,
            pending: HashMap::new(),
            submits_pending: 0,
            last_notify: Instant::now(),
            early_jobs: Vec::new(),
            authorized: HashMap::new(),
            verdicts: VecDeque::new(),
            authorizing: HashMap::new(),
            subscribed: false,
            logged_in: false,
        };
        let mut buf = Vec::new();
        let rolling = json!({"version-rolling.mask": "ffffffff", "version-rolling.min-bit-count": 2});
        s.request(&mut buf, "mining.configure", &json!([["version-rolling"], rolling]), Request::Configure);
        s.request(&mut buf, "mining.subscribe", &[VERSION], Request::Subscribe);
        let login = [pool.config.user.as_str(), pool.config.password.as_str()];
        s.request(&mut buf, "mining.authorize", &login, Request::Login);
        s.link.queue(&buf);
        buf.clear();
        let deadline = Instant::now() + context.settings().connect_timeout;
        while !(s.subscribed && s.logged_in && !s.early_jobs.is_empty()) {
            let line = match timeout_at(deadline, s.link.next_line()).await {
                Err(_) => return Err("no subscribe, authorize and job within upstream.connect_timeout".into()),
                Ok(Some(Ok(line))) => line,
                Ok(Some(Err(FrameError::TooLong(_)))) => return Err("line over upstream.max_line_bytes".into()),
                Ok(Some(Err(FrameError::Io(e)))) => return Err(format!("connection failed: {e}")),
                Ok(None) => return Err("the pool closed the connection".into()),
            };
            let step = s.on_line(&line, &mut buf, Instant::now());
            s.link.queue(&buf);
            buf.clear();
            match step {
                Ok(Step::Reconnect { .. }) => return Err("the pool asked for a reconnect during the handshake".into()),
                Ok(Step::Job(n)) => {
                    if n.clean_jobs {
                        s.early_jobs.clear();
                    }
                    s.early_jobs.push((n, s.difficulty));
                }
                Ok(_) => {}
                Err(fault) => return Err(fault.to_owned()),
            }
        }
        let prefix = context.settings().prefix_bytes;
        if s.extranonce2_size < prefix + MIN_MINER_EXTRANONCE2 {
            return Err(format!(
                "extranonce2_size {} leaves miners {} bytes beside aggregate.prefix_bytes = {prefix}; \
                 aggregation needs {MIN_MINER_EXTRANONCE2}",
                s.extranonce2_size,
                s.extranonce2_size.saturating_sub(prefix)
            ));
        }
        Ok(s)
    }

    pub(super) fn request(
        &mut self,
        buf: &mut Vec<u8>,
        method: &str,
        params: &impl serde::Serialize,
        pending: Request,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        write::request(buf, id, method, params);
        self.pending.insert(id, pending);
    }

    /// One line from the pool. Replies the pool expects go into `buf`.
    pub(super) fn on_line(&mut self, line: &[u8], buf: &mut Vec<u8>, now: Instant) -> Result<Step, &'static str> {
        let message = pool::parse(line).map_err(|e| {
            counter!(m::MALFORMED, "source" => "pool").increment(1);
            tracing::warn!(pool = %self.pool.label, error = %e, "unparseable line from the pool");
            "unparseable message"
        })?;
        Ok(match message {
            PoolMessage::Response { id, result, error } => {
                let Some(pending) = id.as_u64().and_then(|id| self.pending.remove(&id)) else {
                    return Ok(Step::Nothing);
                };
                let ok = verdict(result, error);
                match pending {
                    Request::Configure => {
                        let mask = result.filter(|_| error.is_none()).and_then(pool::parse_configure_result);
                        let changed = mask != self.version_mask;
                        self.version_mask = mask;
                        if changed {
                            return Ok(Step::Changed { extranonce: false });
                        }
                    }
                    Request::Subscribe => {
                        let sub = result.filter(|_| error.is_none()).and_then(pool::parse_subscribe_result);
                        let sub = sub.ok_or("invalid subscribe reply")?;
                        self.extranonce1 = sub.extranonce1;
                        self.extranonce2_size = sub.extranonce2_size;
                        self.subscribed = true;
                    }
                    Request::Login => {
                        if ok.is_err() {
                            tracing::warn!(pool = %self.pool.label, user = %self.pool.config.user, "the pool refused the proxy's user");
                            return Err("the pool refused the configured user");
                        }
                        self.logged_in = true;
                    }
                    Request::Authorize { worker, upstream, waiters } => {
                        self.authorizing.remove(&worker);
                        if ok.is_ok() {
                            self.authorized.insert(worker, upstream);
                        }
                        for waiter in waiters {
                            let _ = waiter.send(ok.is_ok());
                        }
                    }
                    Request::Submit { sent_at, miner } => {
                        self.submits_pending -= 1;
                        let rtt = now.saturating_duration_since(sent_at);
                        let verdict = match &ok {
                            Ok(()) => PoolVerdict::Accepted,
                            Err((code, message)) => {
                                tracing::debug!(pool = %self.pool.label, code, message, "the pool rejected a forwarded share");
                                PoolVerdict::Rejected(RejectReason::from_code(*code))
                            }
                        };
                        SubmissionManager.pool_verdict(&miner, &self.pool.metric_label, verdict, Some(rtt));
                        self.pool.verdicts.answered(ok.is_ok(), rtt);
                        if self.verdicts.len() == REJECT_WINDOW {
                            self.verdicts.pop_front();
                        }
                        self.verdicts.push_back(ok.is_err());
                    }
                }
                Step::Nothing
            }
            PoolMessage::Notify(n) => {
                self.last_notify = now;
                self.pool.verdicts.notified();
                self.pool.behaved();
                Step::Job(n)
            }
            PoolMessage::SetDifficulty(d) => {
                self.difficulty = d;
                Step::Nothing
            }
            PoolMessage::SetVersionMask(mask) => {
                self.version_mask = Some(mask);
                Step::Changed { extranonce: false }
            }
            PoolMessage::SetExtranonce { extranonce1, extranonce2_size } => {
                self.extranonce1 = extranonce1;
                self.extranonce2_size = extranonce2_size;
                Step::Changed { extranonce: true }
            }
            PoolMessage::Reconnect { host, port, .. } => Step::Reconnect { host, port },
            PoolMessage::GetVersion { id } => {
                write::result(buf, &id, &VERSION);
                Step::Nothing
            }
            PoolMessage::ShowMessage(text) => {
                tracing::info!(pool = %self.pool.label, message = %text, "message from the pool");
                Step::Nothing
            }
            PoolMessage::Unknown { method } => {
                tracing::debug!(pool = %self.pool.label, %method, "unknown pool notification ignored");
                Step::Nothing
            }
        })
    }

    /// The pool rejects more than `max` of the last forwarded shares.
    pub(super) fn rejecting(&self, max: f64) -> bool {
        let n = self.verdicts.len();
        n >= REJECT_WINDOW_MIN && self.verdicts.iter().filter(|r| **r).count() as f64 > max * n as f64
    }

    pub(super) fn submit(&mut self, buf: &mut Vec<u8>, f: &Forward, miner: Arc<SessionHandle>, now: Instant) {
        let user = match &f.worker {
            Some(worker) => self.authorized.get(worker).map_or_else(|| worker.to_string(), |u| u.to_string()),
            None => self.pool.config.user.clone(),
        };
        let en2 = hex::encode(&f.extranonce2);
        let (ntime, nonce) = (format!("{:08x}", f.ntime), format!("{:08x}", f.nonce));
        let id = self.next_id;
        self.next_id += 1;
        match f.version_bits {
            Some(bits) => write::request(
                buf,
                id,
                "mining.submit",
                &[user.as_str(), &f.job.upstream_id, &en2, &ntime, &nonce, &format!("{bits:08x}")],
            ),
            None => {
                write::request(buf, id, "mining.submit", &[user.as_str(), &f.job.upstream_id, &en2, &ntime, &nonce])
            }
        }
        self.pending.insert(id, Request::Submit { sent_at: now, miner });
        self.submits_pending += 1;
        SubmissionManager.forwarded(&self.pool.metric_label);
    }

    /// Asks the pool to accept a miner's worker; `reply`, if any, gets the answer.
    pub(super) fn authorize(
        &mut self,
        context: &Context,
        buf: &mut Vec<u8>,
        worker: Arc<str>,
        password: &str,
        reply: Option<oneshot::Sender<bool>>,
    ) {
        if let Some(Request::Authorize { waiters, .. }) =
            self.authorizing.get(&worker).and_then(|id| self.pending.get_mut(id))
        {
            waiters.extend(reply);
            return;
        }
        let creds = context.auth.rewrite().credentials(&worker, password, &self.pool.config);
        let upstream: Arc<str> = creds.user.as_str().into();
        self.authorizing.insert(worker.clone(), self.next_id);
        let waiters = reply.into_iter().collect();
        let params = [creds.user.as_str(), creds.password.as_str()];
        self.request(buf, "mining.authorize", &params, Request::Authorize { worker, upstream, waiters });
    }

    /// Settles what the pool will never answer now.
    pub(super) fn close(self) {
        let label = &self.pool.metric_label;
        // Authorizes are dropped unanswered: the pool's silence is not the miner's failure.
        for pending in self.pending.into_values() {
            if let Request::Submit { miner, .. } = pending {
                SubmissionManager.pool_verdict(&miner, label, PoolVerdict::Unanswered, None)
            }
        }
    }
}
