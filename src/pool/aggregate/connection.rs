//! A pool session with its connection, as an aggregate group holds it: opened with the Stratum
//! handshake, refused when the pool leaves miners too little extranonce2, and closed with every
//! forwarded share it leaves unanswered accounted for.

use std::io;
use std::sync::Arc;

use tokio::time::Instant;

use super::group::{credit, MIN_MINER_EXTRANONCE2};
use super::Context;
use crate::handshake::handshake;
use crate::pool_session::PoolSession;
use crate::protocol::pool::Notify;
use crate::submissions::PoolVerdict;
use crate::upstream::{Pool, PoolLink};

/// A pool session with its connection: what the group's task holds while on a pool.
pub(super) struct Connection {
    pub(super) link: PoolLink,
    pub(super) session: PoolSession,
    /// Jobs that arrived before the group adopted the session, with their difficulty.
    pub(super) early_jobs: Vec<(Notify, f64)>,
    pub(super) opened_at: Instant,
}

impl std::ops::Deref for Connection {
    type Target = PoolSession;
    fn deref(&self) -> &PoolSession {
        &self.session
    }
}

impl std::ops::DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut PoolSession {
        &mut self.session
    }
}

/// Why a pool session could not be opened.
#[derive(Debug, thiserror::Error)]
pub(super) enum OpenError {
    /// The TCP or TLS connect failed: counted as the pool's fault already, for its probe to judge.
    #[error("connect failed: {0}")]
    Connect(io::Error),
    /// The pool did not complete the handshake in time, or broke the protocol in it.
    #[error("{0}")]
    Handshake(String),
    /// The pool leaves miners too little extranonce2 to share its session.
    #[error("{0}")]
    Refused(String),
}

impl OpenError {
    /// Logs why the pool could not be used for a `failover` or a `failback`; a pool that answered
    /// and would not do is faulty.
    pub(super) fn report(&self, pool: &Pool, attempt: &'static str) {
        match self {
            OpenError::Connect(e) => tracing::info!(pool = %pool.label, attempt, error = %e, "pool connect failed"),
            OpenError::Handshake(reason) => {
                tracing::warn!(pool = %pool.label, attempt, %reason, "pool handshake failed");
                pool.report_fault();
            }
            OpenError::Refused(reason) => {
                tracing::warn!(pool = %pool.label, attempt, %reason, "pool session refused for aggregation");
                pool.report_fault();
            }
        }
    }
}

impl Connection {
    /// Connects, asks for version rolling, subscribes and logs in, and waits for the first job.
    pub(super) async fn open(context: Arc<Context>, pool: Arc<Pool>) -> Result<Connection, OpenError> {
        let opened_at = Instant::now();
        let mut link = context.pools.open(&pool).await.map_err(OpenError::Connect)?;
        let mut session = PoolSession::new(pool, false);
        let mut requests = Vec::new();
        session.handshake(&mut requests);
        let deadline = opened_at + context.settings().connect_timeout;
        let early_jobs = handshake(&mut link, &mut session, requests, deadline).await.map_err(OpenError::Handshake)?;
        let prefix = context.settings().prefix_bytes;
        if session.extranonce2_size < prefix + MIN_MINER_EXTRANONCE2 {
            return Err(OpenError::Refused(format!(
                "extranonce2_size {} leaves miners {} bytes beside aggregate.prefix_bytes = {prefix}; \
                 aggregation needs {MIN_MINER_EXTRANONCE2}",
                session.extranonce2_size,
                session.extranonce2_size.saturating_sub(prefix)
            )));
        }
        Ok(Connection { link, session, early_jobs, opened_at })
    }

    /// Settles what the pool will never answer now: each forwarded share, unanswered.
    pub(super) fn close(mut self) {
        let unanswered = self.session.fail_pending("pool session closed", &mut Vec::new());
        if !unanswered.is_empty() {
            let pool = &self.session.pool.label;
            tracing::warn!(pool = %pool, unanswered = unanswered.len(), "forwarded shares the pool never answered");
        }
        for miner in unanswered {
            credit(&self.session.pool, miner, PoolVerdict::Unanswered, None);
        }
    }
}
