//! The submission manager: accounts for every share's outcome, in the metrics and in the
//! per-worker statistics the API shows.

use std::time::{Duration, SystemTime};

use metrics::{counter, gauge, histogram};
use serde::Serialize;

use crate::metrics as m;
use crate::protocol::code;
use crate::registry::SessionHandle;

/// Why a share was rejected; the `reason` label of the rejected-shares metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    Stale,
    Duplicate,
    LowDifficulty,
    Unauthorized,
    NotSubscribed,
    Other,
    UpstreamUnavailable,
    Shutdown,
    /// The miner's connection closed before the pool answered.
    Closed,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Stale => "stale",
            RejectReason::Duplicate => "duplicate",
            RejectReason::LowDifficulty => "low_difficulty",
            RejectReason::Unauthorized => "unauthorized",
            RejectReason::NotSubscribed => "not_subscribed",
            RejectReason::Other => "other",
            RejectReason::UpstreamUnavailable => "upstream_unavailable",
            RejectReason::Shutdown => "shutdown",
            RejectReason::Closed => "closed",
        }
    }

    /// The reason for a pool's Stratum error code.
    pub fn from_code(code: i64) -> Self {
        match code {
            code::JOB_NOT_FOUND => RejectReason::Stale,
            code::DUPLICATE => RejectReason::Duplicate,
            code::LOW_DIFFICULTY => RejectReason::LowDifficulty,
            code::UNAUTHORIZED => RejectReason::Unauthorized,
            code::NOT_SUBSCRIBED => RejectReason::NotSubscribed,
            _ => RejectReason::Other,
        }
    }
}

/// What became of one forwarded share.
#[derive(Debug, Clone, PartialEq)]
pub struct ShareOutcome {
    /// The difficulty the share was worked at.
    pub difficulty: f64,
    pub result: Result<(), RejectReason>,
    /// Time from forwarding to the pool's reply; `None` when the pool never replied.
    pub rtt: Option<Duration>,
}

/// The window the API's hashrate is averaged over.
pub const HASHRATE_WINDOW: Duration = Duration::from_secs(300);
const BUCKET_SECS: u64 = 10;
const BUCKETS: usize = (HASHRATE_WINDOW.as_secs() / BUCKET_SECS) as usize;

/// Share counts and accepted work of one session, in fixed memory.
#[derive(Debug, Clone, Default)]
pub struct WorkerStats {
    pub accepted: u64,
    pub rejected: u64,
    pub accepted_difficulty: f64,
    pub last_share: Option<SystemTime>,
    /// Accepted difficulty per 10-second bucket: (bucket number since the session began, sum).
    window: [(u64, f64); BUCKETS],
}

impl WorkerStats {
    /// `elapsed` is the time since the session began.
    pub fn record(&mut self, elapsed: Duration, outcome: &ShareOutcome) {
        self.last_share = Some(SystemTime::now());
        if outcome.result.is_err() {
            self.rejected += 1;
            return;
        }
        self.accepted += 1;
        self.accepted_difficulty += outcome.difficulty;
        let bucket = elapsed.as_secs() / BUCKET_SECS;
        let slot = &mut self.window[(bucket % BUCKETS as u64) as usize];
        if slot.0 != bucket {
            *slot = (bucket, 0.0);
        }
        slot.1 += outcome.difficulty;
    }

    /// Hashes per second over the last five minutes (or the session's life, if shorter), from the
    /// accepted difficulty: difficulty × 2³² / seconds.
    pub fn hashrate(&self, elapsed: Duration) -> f64 {
        let current = elapsed.as_secs() / BUCKET_SECS;
        let oldest = (current + 1).saturating_sub(BUCKETS as u64);
        let work: f64 =
            self.window.iter().filter(|(b, d)| *d > 0.0 && *b >= oldest && *b <= current).map(|(_, d)| d).sum();
        let secs = elapsed.min(HASHRATE_WINDOW).as_secs_f64().max(1.0);
        work * 4_294_967_296.0 / secs
    }
}

/// Records share outcomes in the metrics and in the session's statistics.
#[derive(Debug, Default)]
pub struct SubmissionManager;

impl SubmissionManager {
    pub fn forwarded(&self, pool: &str) {
        counter!(m::SHARES_SUBMITTED, "pool" => pool.to_owned()).increment(1);
    }

    pub fn record(&self, session: &SessionHandle, pool: &str, outcome: &ShareOutcome) {
        let pool = pool.to_owned();
        match outcome.result {
            Ok(()) => {
                counter!(m::SHARES_ACCEPTED, "pool" => pool.clone()).increment(1);
                gauge!(m::SHARES_ACCEPTED_DIFFICULTY, "pool" => pool.clone()).increment(outcome.difficulty);
            }
            Err(reason) => {
                counter!(m::SHARES_REJECTED, "pool" => pool.clone(), "reason" => reason.as_str()).increment(1);
            }
        }
        if let Some(rtt) = outcome.rtt {
            histogram!(m::SUBMIT_RTT, "pool" => pool).record(rtt.as_secs_f64());
        }
        let elapsed = tokio::time::Instant::now().duration_since(session.connected_at);
        session.info().stats.record(elapsed, outcome);
    }
}

/// A worker as `/api/v1/workers` shows it.
#[derive(Debug, Serialize)]
pub struct WorkerView {
    pub session_id: u64,
    pub worker: Option<String>,
    pub peer: String,
    pub state: &'static str,
    pub upstream: Option<String>,
    /// Unix seconds.
    pub connected_since: u64,
    pub difficulty: Option<f64>,
    pub accepted: u64,
    pub rejected: u64,
    pub accepted_difficulty: f64,
    pub hashrate_5m: f64,
    /// Unix seconds of the last share answered, if any.
    pub last_share: Option<u64>,
}

impl WorkerView {
    pub fn of(session: &SessionHandle) -> Self {
        let unix = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let elapsed = tokio::time::Instant::now().duration_since(session.connected_at);
        let info = session.info();
        WorkerView {
            session_id: session.id,
            worker: info.worker.clone(),
            peer: session.peer.to_string(),
            state: session.phase().as_str(),
            upstream: info.upstream.as_deref().map(str::to_owned),
            connected_since: unix(session.connected_since),
            difficulty: info.difficulty,
            accepted: info.stats.accepted,
            rejected: info.stats.rejected,
            accepted_difficulty: info.stats.accepted_difficulty,
            hashrate_5m: info.stats.hashrate(elapsed),
            last_share: info.stats.last_share.map(unix),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(d: f64) -> ShareOutcome {
        ShareOutcome { difficulty: d, result: Ok(()), rtt: None }
    }

    #[test]
    fn hashrate_over_the_window() {
        let mut s = WorkerStats::default();
        // 60 shares of difficulty 1 over the first minute: 2^32 hashes per second.
        for i in 0..60 {
            s.record(Duration::from_secs(i), &ok(1.0));
        }
        let h = s.hashrate(Duration::from_secs(60));
        assert!((h - 4_294_967_296.0).abs() < 1.0, "{h}");
        // After five minutes of nothing, the window is empty.
        assert_eq!(s.hashrate(Duration::from_secs(400)), 0.0);
        s.record(Duration::from_secs(401), &ShareOutcome { result: Err(RejectReason::Stale), ..ok(5.0) });
        assert_eq!((s.accepted, s.rejected), (60, 1));
        assert_eq!(s.accepted_difficulty, 60.0);
    }

    #[test]
    fn codes_map_to_reasons() {
        assert_eq!(RejectReason::from_code(21), RejectReason::Stale);
        assert_eq!(RejectReason::from_code(23), RejectReason::LowDifficulty);
        assert_eq!(RejectReason::from_code(99), RejectReason::Other);
    }
}
