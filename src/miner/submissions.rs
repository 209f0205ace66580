//! The submission manager: judges every share locally before it may leave the proxy, and
//! accounts for every share's outcome in the metrics and in the per-worker statistics.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use metrics::{counter, histogram, Counter, Histogram, SharedString};
use serde::Serialize;

use crate::jobs::{share_id, ShareId};
use crate::metrics as m;
use crate::protocol::miner::Submit;
use crate::protocol::pool::{Notify, MAX_EXTRANONCE2_SIZE};
use crate::protocol::{code, parse_hex_u32};
use crate::registry::SessionHandle;
use crate::share;

/// Why a share was rejected, by the proxy's checks or by the pool; the `reason` label of
/// `loka_shares_rejected_total` and `loka_upstream_rejects_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    Stale,
    BadJob,
    Malformed,
    Duplicate,
    LowDifficulty,
    Unauthorized,
    NotSubscribed,
    /// A pool's error code the proxy does not know.
    Other,
}

impl RejectReason {
    /// The reasons the proxy's own checks give, so that each series exists from start-up.
    pub const LOCAL: [RejectReason; 7] = [
        RejectReason::Stale,
        RejectReason::BadJob,
        RejectReason::Malformed,
        RejectReason::Duplicate,
        RejectReason::LowDifficulty,
        RejectReason::Unauthorized,
        RejectReason::NotSubscribed,
    ];

    /// The index of a local reason in [`RejectReason::LOCAL`]; `Other`, which the proxy never
    /// gives, counts as malformed.
    pub fn local_index(self) -> usize {
        let reason = if self == RejectReason::Other { RejectReason::Malformed } else { self };
        Self::LOCAL.iter().position(|r| *r == reason).expect("every other reason is in LOCAL")
    }

    /// The reasons [`RejectReason::from_code`] gives a pool's reject.
    pub const POOL: [RejectReason; 6] = [
        RejectReason::Stale,
        RejectReason::Duplicate,
        RejectReason::LowDifficulty,
        RejectReason::Unauthorized,
        RejectReason::NotSubscribed,
        RejectReason::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Stale => "stale",
            RejectReason::BadJob => "bad_job",
            RejectReason::Malformed => "malformed",
            RejectReason::Duplicate => "duplicate",
            RejectReason::LowDifficulty => "low_difficulty",
            RejectReason::Unauthorized => "unauthorized",
            RejectReason::NotSubscribed => "not_subscribed",
            RejectReason::Other => "other",
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

/// The pool's verdict on a share the proxy sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolVerdict {
    Accepted,
    Rejected(RejectReason),
    /// The pool session ended (the pool went, the miner left in passthrough mode, the shutdown
    /// grace ran out) before the pool answered.
    Unanswered,
}

/// How far past its job's ntime a share's ntime may roll, as ckpool allows.
pub const NTIME_WINDOW: u32 = 7000;

/// What the proxy knows of the miner a share comes from.
#[derive(Debug, Clone, Copy)]
pub struct ShareContext<'a> {
    pub extranonce1: &'a [u8],
    pub extranonce2_size: usize,
    /// The negotiated version-rolling mask; 0 when none was negotiated.
    pub version_mask: u32,
}

/// A share that passed every local check.
#[derive(Debug, Clone, Copy)]
pub struct ValidShare {
    /// The decoded fields, never their hex spelling: what is forwarded to the pool.
    extranonce2: [u8; MAX_EXTRANONCE2_SIZE],
    extranonce2_len: u8,
    pub ntime: u32,
    pub nonce: u32,
    /// The header's version, the miner's rolled bits in.
    pub version: u32,
    pub hash: [u8; 32],
    /// The difficulty the share was judged at, and counts as work at: its job's, or the
    /// network's for a block candidate below its job's target.
    pub job_difficulty: f64,
    /// The difficulty the hash itself reaches.
    pub share_difficulty: f64,
    /// The hash also meets the network target: a block.
    pub block: bool,
}

/// A share refused locally, with the Stratum error the miner gets.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalReject {
    pub code: i64,
    pub message: Cow<'static, str>,
    pub reason: RejectReason,
}

impl LocalReject {
    pub fn new(code: i64, message: impl Into<Cow<'static, str>>, reason: RejectReason) -> Self {
        Self { code, message: message.into(), reason }
    }

    fn malformed(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(code::OTHER, message, RejectReason::Malformed)
    }
}

/// A live job as one miner was given it: the job and the difficulty it was sent at.
#[derive(Debug, Clone, Copy)]
pub struct JobTarget<'a> {
    pub notify: &'a Notify,
    pub difficulty: f64,
    pub target: &'a share::U256Le,
}

impl ValidShare {
    /// The share's extranonce2 bytes.
    pub fn extranonce2(&self) -> &[u8] {
        &self.extranonce2[..usize::from(self.extranonce2_len)]
    }
}

/// Judges a share on a known job: field widths, the ntime window, the version mask, duplicates
/// (`seen` answers whether a share with that hash was already taken) and the hash against the
/// job's target, in that order. A hash that misses the job's target but meets the network's (a
/// network easier than the pool, as on testnets) passes as a block candidate, judged at the
/// network's difficulty. Allocates nothing on success.
pub fn check(
    job: JobTarget<'_>,
    miner: ShareContext<'_>,
    submit: &Submit,
    seen: impl FnOnce(ShareId) -> bool,
) -> Result<ValidShare, LocalReject> {
    let size = miner.extranonce2_size;
    let mut extranonce2 = [0u8; MAX_EXTRANONCE2_SIZE];
    if size == 0 || size > MAX_EXTRANONCE2_SIZE || submit.extranonce2.len() != size * 2 {
        return Err(LocalReject::malformed(format!("extranonce2 must be {} hex characters", size * 2)));
    }
    hex::decode_to_slice(submit.extranonce2.as_bytes(), &mut extranonce2[..size])
        .map_err(|_| LocalReject::malformed("extranonce2 is not hex"))?;
    let ntime = parse_hex_u32(&submit.ntime).ok_or_else(|| LocalReject::malformed("ntime must be 8 hex characters"))?;
    let nonce = parse_hex_u32(&submit.nonce).ok_or_else(|| LocalReject::malformed("nonce must be 8 hex characters"))?;
    let version_bits = match &submit.version_bits {
        None => None,
        Some(v) => {
            Some(parse_hex_u32(v).ok_or_else(|| LocalReject::malformed("version bits must be 8 hex characters"))?)
        }
    };

    let n = job.notify;
    if ntime < n.ntime || ntime - n.ntime > NTIME_WINDOW {
        return Err(LocalReject::new(code::OTHER, "ntime out of range", RejectReason::Malformed));
    }
    let version = match version_bits {
        None => n.version,
        Some(bits) if bits & !miner.version_mask != 0 => {
            return Err(LocalReject::new(
                code::OTHER,
                "version bits outside the negotiated mask",
                RejectReason::Malformed,
            ));
        }
        Some(bits) => (n.version & !miner.version_mask) | (bits & miner.version_mask),
    };

    let coinbase = share::coinbase_hash(&n.coinb1, miner.extranonce1, &extranonce2[..size], &n.coinb2);
    let root = share::merkle_root(coinbase, &n.merkle_branch);
    let hash = share::header_hash(&share::header(version, &n.prevhash, &root, ntime, n.nbits, nonce));
    if seen(share_id(&hash)) {
        return Err(LocalReject::new(code::DUPLICATE, "Duplicate share", RejectReason::Duplicate));
    }
    let network = share::target_from_nbits(n.nbits);
    let block = share::meets(&hash, &network);
    let judged_at = if share::meets(&hash, job.target) {
        job.difficulty
    } else if block {
        share::difficulty_of(&network)
    } else {
        return Err(LocalReject::new(code::LOW_DIFFICULTY, "Low difficulty share", RejectReason::LowDifficulty));
    };
    Ok(ValidShare {
        extranonce2,
        extranonce2_len: size as u8,
        ntime,
        nonce,
        version,
        hash,
        job_difficulty: judged_at,
        share_difficulty: share::difficulty_of(&hash),
        block,
    })
}

/// The window the API's hashrate is averaged over.
pub const HASHRATE_WINDOW: Duration = Duration::from_secs(300);
const BUCKET_SECS: u64 = 10;
const BUCKETS: usize = (HASHRATE_WINDOW.as_secs() / BUCKET_SECS) as usize;

/// The proxy's verdicts on one session's shares and the work they carry, in fixed memory.
#[derive(Debug, Clone, Default)]
pub struct WorkerStats {
    /// Shares that passed the proxy's checks.
    pub accepted: u64,
    /// Shares the proxy's checks refused.
    pub rejected: u64,
    /// The difficulty of the accepted shares, summed.
    pub accepted_difficulty: f64,
    pub best_share_difficulty: f64,
    pub last_share: Option<SystemTime>,
    /// Allocated with the first share, so that connections that never mine stay small.
    detail: Option<Box<Detail>>,
}

/// What a session that has sent a share keeps besides its totals.
#[derive(Debug, Clone)]
struct Detail {
    /// Validated work per 10-second bucket: (bucket number since the session began, difficulty
    /// sum).
    window: [(u64, f64); BUCKETS],
    /// Refused shares by reason, in the order of [`RejectReason::LOCAL`].
    rejected_by: [u32; 7],
    /// What [`WorkerStats::take_delta`] last handed on.
    reported: Reported,
}

/// The counts a session had handed on to the worker inventory.
#[derive(Debug, Clone, Copy, Default)]
struct Reported {
    accepted: u64,
    rejected_by: [u32; 7],
    work: f64,
    pool_accepted: u64,
    pool_rejected: u64,
}

/// A session's shares since the inventory last read it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Delta {
    pub accepted: u64,
    /// By reason, in the order of [`RejectReason::LOCAL`].
    pub rejected_by: [u32; 7],
    /// The accepted difficulty.
    pub work: f64,
    pub pool_accepted: u64,
    pub pool_rejected: u64,
    pub last_share: Option<SystemTime>,
}

impl WorkerStats {
    fn detail(&mut self) -> &mut Detail {
        self.detail.get_or_insert_with(|| {
            Box::new(Detail { window: [(0, 0.0); BUCKETS], rejected_by: [0; 7], reported: Reported::default() })
        })
    }

    /// A share the proxy's checks refused.
    pub fn record_refused(&mut self, reason: RejectReason) {
        self.last_share = Some(SystemTime::now());
        self.rejected += 1;
        let slot = &mut self.detail().rejected_by[reason.local_index()];
        *slot = slot.saturating_add(1);
    }

    /// A share that passed the proxy's checks: counted, and added to the hashrate window.
    /// `elapsed` is the time since the session began.
    pub fn record_valid(&mut self, elapsed: Duration, job_difficulty: f64, share_difficulty: f64) {
        self.last_share = Some(SystemTime::now());
        self.accepted += 1;
        self.accepted_difficulty += job_difficulty;
        self.best_share_difficulty = self.best_share_difficulty.max(share_difficulty);
        let bucket = elapsed.as_secs() / BUCKET_SECS;
        let slot = &mut self.detail().window[(bucket % BUCKETS as u64) as usize];
        if slot.0 != bucket {
            *slot = (bucket, 0.0);
        }
        slot.1 += job_difficulty;
    }

    /// Refused shares by reason, in the order of [`RejectReason::LOCAL`].
    pub fn rejected_by(&self) -> [u32; 7] {
        self.detail.as_ref().map_or([0; 7], |d| d.rejected_by)
    }

    /// The shares and the pool's verdicts (`pool`, this session's tally) since the last call,
    /// or `None` when there are none. Each share is handed on once, whoever calls.
    pub fn take_delta(&mut self, pool: &PoolTally) -> Option<Delta> {
        let (pool_accepted, pool_rejected) = (pool.accepted(), pool.rejected());
        if self.detail.is_none() && pool_accepted == 0 && pool_rejected == 0 {
            return None;
        }
        let (accepted, work, last_share) = (self.accepted, self.accepted_difficulty, self.last_share);
        let detail = self.detail();
        let now = Reported { accepted, rejected_by: detail.rejected_by, work, pool_accepted, pool_rejected };
        let was = std::mem::replace(&mut detail.reported, now);
        let delta = Delta {
            accepted: now.accepted - was.accepted,
            rejected_by: std::array::from_fn(|i| now.rejected_by[i] - was.rejected_by[i]),
            work: now.work - was.work,
            pool_accepted: now.pool_accepted - was.pool_accepted,
            pool_rejected: now.pool_rejected - was.pool_rejected,
            last_share,
        };
        let empty = Delta { last_share, ..Delta::default() };
        (delta != empty).then_some(delta)
    }

    /// Hashes per second over the last five minutes (or the session's life, if shorter), from the
    /// validated difficulty: difficulty × 2³² / seconds.
    pub fn hashrate(&self, elapsed: Duration) -> f64 {
        let current = elapsed.as_secs() / BUCKET_SECS;
        let oldest = (current + 1).saturating_sub(BUCKETS as u64);
        let Some(detail) = &self.detail else { return 0.0 };
        let work: f64 =
            detail.window.iter().filter(|(b, d)| *d > 0.0 && *b >= oldest && *b <= current).map(|(_, d)| d).sum();
        let secs = elapsed.min(HASHRATE_WINDOW).as_secs_f64().max(1.0);
        work * 4_294_967_296.0 / secs
    }
}

/// The pool's verdicts on one session's shares. Atomics rather than a field of [`WorkerStats`]:
/// in aggregate mode the group task credits them, and must not wait on the miner's lock.
#[derive(Debug, Default)]
pub struct PoolTally {
    accepted: AtomicU64,
    rejected: AtomicU64,
}

impl PoolTally {
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
}

/// The difficulty-sum counter's unit: millionths of a difficulty-1 share.
pub const MICRODIFFICULTY: f64 = 1e6;

/// Records the proxy's and the pool's verdicts in the metrics and in the session's statistics,
/// the same way in both upstream modes.
#[derive(Debug, Default)]
pub struct SubmissionManager;

/// One pool's per-share series, looked up once (its [`Pool`](crate::upstream::Pool) holds
/// them), not in the metrics registry on every share. `label` names the pool in the rarer
/// series: reject reasons, blocks, faults.
#[derive(Debug)]
pub struct ShareMetrics {
    pub label: SharedString,
    submitted: Counter,
    accepted: Counter,
    accepted_work: Counter,
    pool_accepted: Counter,
    pool_rejected: Counter,
    pool_unanswered: Counter,
    rtt: Histogram,
    local_only: Counter,
}

impl ShareMetrics {
    pub fn new(label: SharedString) -> Self {
        let verdict = |result: &'static str| counter!(m::UPSTREAM_SHARES, "pool" => label.clone(), "result" => result);
        ShareMetrics {
            submitted: counter!(m::SHARES_SUBMITTED, "pool" => label.clone()),
            accepted: counter!(m::SHARES_ACCEPTED, "pool" => label.clone()),
            accepted_work: counter!(m::SHARES_ACCEPTED_WORK, "pool" => label.clone()),
            pool_accepted: verdict("accepted"),
            pool_rejected: verdict("rejected"),
            pool_unanswered: verdict("unanswered"),
            rtt: histogram!(m::SUBMIT_RTT, "pool" => label.clone()),
            local_only: counter!(m::SHARES_LOCAL_ONLY, "pool" => label.clone()),
            label,
        }
    }

    /// Aggregate mode: a valid share below the pool's target, answered here and not sent.
    pub fn kept_local(&self) {
        self.local_only.increment(1);
    }
}

// The rarer series take the pool's shared label: cloning it bumps a reference count, so
// accounting for a share allocates nothing.
impl SubmissionManager {
    /// A share was sent to the pool; a block candidate is counted and announced here, once sent.
    pub fn forwarded(&self, pool: &ShareMetrics, block: Option<&[u8; 32]>) {
        pool.submitted.increment(1);
        if let Some(hash) = block {
            counter!(m::BLOCKS_FOUND, "pool" => pool.label.clone()).increment(1);
            tracing::info!(block_hash = %share::display_hash(hash), pool = &*pool.label, "block candidate sent to the pool");
        }
    }

    /// A share passed the proxy's checks: it is accepted as work.
    pub fn validated(&self, session: &SessionHandle, pool: &ShareMetrics, share: &ValidShare) {
        pool.accepted.increment(1);
        pool.accepted_work.increment((share.job_difficulty * MICRODIFFICULTY).round() as u64);
        let elapsed = tokio::time::Instant::now().duration_since(session.connected_at);
        session.info().stats.record_valid(elapsed, share.job_difficulty, share.share_difficulty);
        session.share_seen(elapsed);
    }

    /// A share the proxy's checks refused: the miner got an error, the pool never saw it.
    pub fn refused(&self, session: &SessionHandle, pool: &ShareMetrics, reason: RejectReason) {
        counter!(m::SHARES_REJECTED, "pool" => pool.label.clone(), "reason" => reason.as_str()).increment(1);
        session.info().stats.record_refused(reason);
        session.share_seen(tokio::time::Instant::now().duration_since(session.connected_at));
    }

    /// The pool's verdict on a share the proxy sent it for `session`; `rtt` is the time from
    /// sending to the reply. Called by the session's own task in passthrough mode and by the
    /// group task in aggregate mode; takes no lock.
    pub fn pool_verdict(
        &self,
        session: &SessionHandle,
        pool: &ShareMetrics,
        verdict: PoolVerdict,
        rtt: Option<Duration>,
    ) {
        if let Some(rtt) = rtt {
            pool.rtt.record(rtt.as_secs_f64());
        }
        match verdict {
            PoolVerdict::Accepted => {
                pool.pool_accepted.increment(1);
                session.pool_verdicts.accepted.fetch_add(1, Ordering::Relaxed);
            }
            PoolVerdict::Rejected(reason) => {
                pool.pool_rejected.increment(1);
                counter!(m::UPSTREAM_REJECTS, "pool" => pool.label.clone(), "reason" => reason.as_str()).increment(1);
                session.pool_verdicts.rejected.fetch_add(1, Ordering::Relaxed);
            }
            PoolVerdict::Unanswered => pool.pool_unanswered.increment(1),
        }
    }
}

/// A live session as `/api/v1/connections` shows it.
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
    /// Shares that passed the proxy's checks.
    pub accepted: u64,
    /// Shares the proxy's checks refused.
    pub rejected: u64,
    /// The pool's verdicts on the shares the proxy sent it for this session.
    pub pool_accepted: u64,
    pub pool_rejected: u64,
    pub accepted_difficulty: f64,
    pub best_share_difficulty: f64,
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
            pool_accepted: session.pool_verdicts.accepted(),
            pool_rejected: session.pool_verdicts.rejected(),
            accepted_difficulty: info.stats.accepted_difficulty,
            best_share_difficulty: info.stats.best_share_difficulty,
            hashrate_5m: info.stats.hashrate(elapsed),
            last_share: info.stats.last_share.map(unix),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::pool::Notify;
    use proptest::prelude::*;

    const MASK: u32 = 0x1fff_e000;

    fn book(coinb1: Vec<u8>, coinb2: Vec<u8>, branch: Vec<[u8; 32]>, difficulty: f64) -> (Notify, f64) {
        let notify = Notify {
            job_id: "j".into(),
            prevhash: [0x11; 32],
            coinb1,
            coinb2,
            merkle_branch: branch,
            version: 0x2000_0000,
            nbits: 0x1703_4219,
            ntime: 0x6745_a1b0,
            clean_jobs: true,
        };
        (notify, difficulty)
    }

    fn submit(en2: u32, ntime: u32, nonce: u32, bits: u32) -> Submit<'static> {
        Submit {
            worker: "w".into(),
            job_id: "j".into(),
            extranonce2: format!("{en2:08x}").into(),
            ntime: format!("{ntime:08x}").into(),
            nonce: format!("{nonce:08x}").into(),
            version_bits: Some(format!("{bits:08x}").into()),
        }
    }

    fn judge(book: &mut (Notify, f64), s: &Submit) -> Result<ValidShare, LocalReject> {
        let target = share::target_from_difficulty(book.1);
        let job = JobTarget { notify: &book.0, difficulty: book.1, target: &target };
        let miner = ShareContext { extranonce1: &[8, 0, 0, 2], extranonce2_size: 4, version_mask: MASK };
        check(job, miner, s, |_| false)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// A share the test miner grinds to meet the target validates; flipping any one bit of
        /// extranonce2, ntime, nonce or the version bits gives another hash.
        #[test]
        fn ground_shares_validate_and_every_bit_counts(
            coinb1 in proptest::collection::vec(any::<u8>(), 0..120),
            coinb2 in proptest::collection::vec(any::<u8>(), 0..120),
            branch in proptest::collection::vec(any::<[u8; 32]>(), 0..13),
            en2 in any::<u32>(),
            ntime_offset in 0u32..=NTIME_WINDOW,
            bits in any::<u32>().prop_map(|b| b & MASK),
            flip in 0usize..128,
        ) {
            let ntime = 0x6745_a1b0 + ntime_offset;
            // One hash in ~40 meets difficulty 1e-8: the grind stays short.
            let mut hard = book(coinb1.clone(), coinb2.clone(), branch.clone(), 1e-8);
            let nonce = (0..100_000u32).find(|n| judge(&mut hard, &submit(en2, ntime, *n, bits)).is_ok());
            prop_assert!(nonce.is_some());
            let nonce = nonce.unwrap();
            let mut any = book(coinb1, coinb2, branch, 1e-12);
            let base = judge(&mut any, &submit(en2, ntime, nonce, bits)).unwrap().hash;
            let bit = 1u32 << (flip % 32);
            let flipped = match flip / 32 {
                0 => submit(en2 ^ bit, ntime, nonce, bits),
                1 => submit(en2, ntime ^ bit, nonce, bits),
                2 => submit(en2, ntime, nonce ^ bit, bits),
                _ => submit(en2, ntime, nonce, bits ^ (bit & MASK)),
            };
            // Flips that leave the window or the mask are refused before hashing, or change nothing.
            if flip / 32 == 3 && bit & MASK == 0 {
                return Ok(());
            }
            if let Ok(v) = judge(&mut any, &flipped) {
                prop_assert_ne!(v.hash, base);
            }
        }
    }

    #[test]
    fn hashrate_over_the_window() {
        let mut s = WorkerStats::default();
        // 60 shares of difficulty 1 over the first minute: 2^32 hashes per second.
        for i in 0..60 {
            s.record_valid(Duration::from_secs(i), 1.0, 1.5 + i as f64);
        }
        let h = s.hashrate(Duration::from_secs(60));
        assert!((h - 4_294_967_296.0).abs() < 1.0, "{h}");
        assert_eq!(s.best_share_difficulty, 60.5);
        // After five minutes of nothing, the window is empty.
        assert_eq!(s.hashrate(Duration::from_secs(400)), 0.0);
        s.record_refused(RejectReason::Stale);
        assert_eq!((s.accepted, s.rejected, s.accepted_difficulty), (60, 1, 60.0));
    }

    /// Each share is handed on once, whoever takes it; an idle session allocates nothing.
    #[test]
    fn deltas_hand_each_share_on_once() {
        let mut s = WorkerStats::default();
        let pool = PoolTally::default();
        assert_eq!(s.take_delta(&pool), None);
        assert!(s.detail.is_none());
        s.record_valid(Duration::from_secs(1), 2.0, 3.0);
        s.record_refused(RejectReason::Duplicate);
        pool.accepted.fetch_add(1, Ordering::Relaxed);
        let d = s.take_delta(&pool).unwrap();
        assert_eq!((d.accepted, d.work, d.pool_accepted), (1, 2.0, 1));
        assert_eq!(d.rejected_by[RejectReason::Duplicate.local_index()], 1);
        assert_eq!(s.take_delta(&pool), None, "nothing new");
        s.record_refused(RejectReason::Stale);
        let d = s.take_delta(&pool).unwrap();
        assert_eq!((d.accepted, d.rejected_by[0], d.rejected_by.iter().sum::<u32>()), (0, 1, 1));
        for (i, reason) in RejectReason::LOCAL.iter().enumerate() {
            assert_eq!(reason.local_index(), i);
        }
    }

    #[test]
    fn codes_map_to_reasons() {
        assert_eq!(RejectReason::from_code(21), RejectReason::Stale);
        assert_eq!(RejectReason::from_code(23), RejectReason::LowDifficulty);
        assert_eq!(RejectReason::from_code(99), RejectReason::Other);
    }
}
