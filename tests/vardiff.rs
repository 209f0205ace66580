//! Vardiff against firmware that keeps its work while a job's header bytes are unchanged, as
//! cpuminer does, through an aggregate proxy over real sockets, in simulated time: with no new
//! job from the pool, only the proxy's re-sends can move the miner to a new difficulty.

mod support;

use std::time::Duration;

use loka_stratum::config::Mode;
use support::firmware::CpuMiner;
use support::*;
use tokio::time::Instant;

/// The difficulty at which the simulated miner finds `TARGET` shares a minute.
const IDEAL: f64 = 1e-6;
/// `vardiff.target_shares_per_minute`, the default.
const TARGET: f64 = 20.0;
const MINUTE: Duration = Duration::from_secs(60);

/// Runs the cpuminer-like miner for `minutes` simulated minutes from `start` × its ideal
/// difficulty; returns it, with its records.
async fn mine(start: f64, minutes: u32) -> CpuMiner {
    // The pool's difficulty is the miners' ceiling: above where the miner starts.
    let pool =
        MockPool::start(PoolOptions { difficulty: 1e-3, extranonce2_size: 8, validate: true, ..Default::default() })
            .await;
    let mut c = proxy_config(pool.addr);
    c.upstream.mode = Mode::Aggregate;
    // The pool sends one job for the whole run: no clean job of its own moves the miner.
    c.upstream.job_timeout = 24 * 3600;
    c.vardiff.start_difficulty = start * IDEAL;
    c.vardiff.min_difficulty = 1e-12;
    c.vardiff.max_difficulty = 1.0;
    assert_eq!((c.vardiff.target_shares_per_minute, c.vardiff.retarget_secs), (TARGET, 30.0), "the defaults");
    let proxy = spawn_proxy(c).await;
    let hashrate = IDEAL * 4_294_967_296.0 * TARGET / 60.0;
    let mut miner = CpuMiner::connect(proxy.addr, "farm.cpu", hashrate).await;
    // From here on every timer, the proxy's vardiff included, runs on simulated time.
    tokio::time::pause();
    miner.start_clock();
    miner.run_until(Instant::now() + MINUTE * minutes).await;
    assert!(miner.refused.is_empty(), "the proxy refused shares: {:?}", &miner.refused[..miner.refused.len().min(3)]);
    assert_eq!(pool.rejected(), 0, "the pool refused forwarded shares");
    assert_eq!(pool.subscribes(), 1, "one pool session all along");
    miner
}

/// Shares per minute between the two minutes.
fn rate(miner: &CpuMiner, from: u32, to: u32) -> f64 {
    let n = miner.shares.iter().filter(|(t, _)| *t >= MINUTE * from && *t < MINUTE * to).count();
    n as f64 / f64::from(to - from)
}

/// The last of `(time, difficulty)` at or before `t`.
fn at(series: &[(Duration, f64)], t: Duration) -> f64 {
    series.iter().take_while(|(at, _)| *at <= t).last().map_or(f64::NAN, |(_, d)| *d)
}

/// The convergence curve, one line a simulated half-minute, for the test's output.
fn curve(start: f64, miner: &CpuMiner, minutes: u32) {
    eprintln!("start {start} × ideal: t (s) | told / ideal | hashing at / ideal | shares in the last 30 s");
    for half in 1..=minutes * 2 {
        let t = Duration::from_secs(30 * u64::from(half));
        let shares = miner.shares.iter().filter(|(s, _)| *s < t && *s + Duration::from_secs(30) >= t).count();
        eprintln!(
            "{:>5} | {:>8.3} | {:>8.3} | {shares}",
            t.as_secs(),
            at(&miner.told, t) / IDEAL,
            at(&miner.hashing, t) / IDEAL,
        );
    }
}

async fn converges_from(start: f64) {
    let minutes = 20;
    let miner = mine(start, minutes).await;
    curve(start, &miner, minutes);
    let per_minute = rate(&miner, 5, minutes);
    eprintln!("from {start} × ideal: {per_minute} shares a minute from minute 5 to {minutes}");
    assert!(
        (0.75 * TARGET..=1.25 * TARGET).contains(&per_minute),
        "from {start} × ideal: {per_minute} shares a minute from minute 5 on, not {TARGET} ± 25 %"
    );
}

#[tokio::test]
async fn a_cpuminer_far_too_slow_for_its_difficulty_converges_within_five_minutes() {
    converges_from(100.0).await;
}

#[tokio::test]
async fn a_cpuminer_far_too_fast_for_its_difficulty_converges_within_five_minutes() {
    converges_from(0.01).await;
}
