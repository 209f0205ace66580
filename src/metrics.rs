//! Every metric the proxy exports: names, descriptions and their closed label sets, in one place.
//!
//! Metrics go through the `metrics` facade; the Prometheus text comes from
//! `metrics-exporter-prometheus`. Per-worker detail lives in the HTTP API, not in labels.
//!
//! Each name means one thing in both upstream modes. The proxy's own verdicts on miners' shares
//! (`loka_shares_*`) are kept apart from the pool's verdicts on the shares the proxy sent it
//! (`loka_upstream_shares_total`, `loka_upstream_rejects_total`): in passthrough mode the miner is
//! answered with the pool's verdict, in aggregate mode with the proxy's, and neither changes
//! what a series counts.

use std::sync::OnceLock;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::protocol::{miner, pool};
use crate::registry::{CloseReason, Refusal};
use crate::submissions::RejectReason;

pub const CONNECTIONS_ACCEPTED: &str = "loka_connections_accepted_total";
pub const CONNECTIONS_ACTIVE: &str = "loka_connections_active";
/// `server.max_connections`, so that dashboards and alerts can compare the active count with it.
pub const CONNECTIONS_MAX: &str = "loka_connections_max";
/// Label `reason`: one of [`Refusal::as_str`](crate::registry::Refusal::as_str).
pub const CONNECTIONS_REJECTED: &str = "loka_connections_rejected_total";
/// Label `reason`: one of [`CloseReason::as_str`](crate::registry::CloseReason::as_str).
pub const CONNECTIONS_CLOSED: &str = "loka_connections_closed_total";
/// Labels `method` (a known Stratum method or `other`) and `direction` (`from_miner`, `from_pool`).
pub const MESSAGES: &str = "loka_messages_total";
/// Label `source` (`miner`, `pool`).
pub const MALFORMED: &str = "loka_malformed_messages_total";
/// Label `source` (`miner`, `pool`).
pub const LINES_TOO_LONG: &str = "loka_lines_too_long_total";
/// Label `pool`. Shares sent to the pool.
pub const SHARES_SUBMITTED: &str = "loka_shares_submitted_total";
/// Label `pool`. Miners' shares that passed the proxy's checks.
pub const SHARES_ACCEPTED: &str = "loka_shares_accepted_total";
/// Labels `pool` and `reason` (one of [`RejectReason::LOCAL`](crate::submissions::RejectReason::LOCAL)).
/// Miners' shares the proxy's checks refused.
pub const SHARES_REJECTED: &str = "loka_shares_rejected_total";
/// Label `pool`. The difficulty of the shares in [`SHARES_ACCEPTED`], summed, in millionths
/// ([`MICRODIFFICULTY`](crate::submissions::MICRODIFFICULTY)): counters are integers.
pub const SHARES_ACCEPTED_WORK: &str = "loka_shares_accepted_microdifficulty_total";
/// Label `pool`. Block candidates (shares that meet the network target) sent to the pool.
pub const BLOCKS_FOUND: &str = "loka_blocks_found_total";
/// Label `pool`.
pub const SUBMIT_RTT: &str = "loka_upstream_submit_rtt_seconds";
/// Label `pool`.
pub const UPSTREAM_SESSIONS_ACTIVE: &str = "loka_upstream_sessions_active";
/// Label `pool`.
pub const UPSTREAM_CONNECT_FAILURES: &str = "loka_upstream_connect_failures_total";
/// Labels `pool` and `reason` (a fixed description of the protocol breach).
pub const UPSTREAM_FAULTS: &str = "loka_upstream_faults_total";
/// Labels `pool` and `result` (`honoured`, `refused`, `same_address`).
pub const POOL_REDIRECTS: &str = "loka_pool_redirects_total";
/// Label `pool`. 1 when the last connect attempt to the pool succeeded.
pub const POOL_UP: &str = "loka_pool_up";
pub const READY: &str = "loka_ready";
/// Label `state` (`online`, `stale`, `offline`, `never_seen`). Workers in the inventory by state.
pub const WORKERS: &str = "loka_workers";
/// Workers that went offline: their last session closed and `worker_offline_after` passed.
pub const WORKER_OFFLINE_TRANSITIONS: &str = "loka_worker_offline_transitions_total";
/// Label `reason` (`no_upstream`, `full`).
pub const MINERS_REFUSED: &str = "loka_miners_refused_total";
/// Label `pool`. Shares valid at the miner's difficulty but below the pool's and no block
/// candidates, accepted and counted as work, never forwarded (aggregate mode; in passthrough mode miners work at the
/// pool's difficulty, so it stays 0).
pub const SHARES_LOCAL_ONLY: &str = "loka_shares_local_only_total";
/// Labels `pool` and `result`: the pool's verdict on shares the proxy sent it (`accepted`,
/// `rejected`, `unanswered` when the pool session ended first), and `dropped` for shares that
/// met the pool's difficulty but were never sent (aggregate mode: a full queue, or the pool
/// session they were worked for had ended).
pub const UPSTREAM_SHARES: &str = "loka_upstream_shares_total";
/// Labels `pool` and `reason` (one of [`RejectReason::POOL`](crate::submissions::RejectReason::POOL)):
/// the pool's rejects, by the error code it gave.
pub const UPSTREAM_REJECTS: &str = "loka_upstream_rejects_total";
/// Label `kind` (`failover`, `failback`, `reload`). Aggregate sessions moved from one pool to
/// another; `reload` when a reload changed or removed the pool, which alerts do not count.
pub const FAILOVERS: &str = "loka_failovers_total";
/// Label `pool`. Aggregate mode: 1 while some pool session is on the pool.
pub const POOL_ACTIVE: &str = "loka_pool_active";
/// Label `pool`. Aggregate mode: miners served through the pool now.
pub const POOL_MINERS: &str = "loka_pool_miners";
/// Aggregate mode: pool sessions that have a pool now.
pub const AGGREGATE_SESSIONS: &str = "loka_aggregate_sessions";
/// Label `session` (its index). Aggregate mode: miners in each pool session.
pub const AGGREGATE_SESSION_MINERS: &str = "loka_aggregate_session_miners";
/// Label `state` (`live`, `quarantined`). Aggregate mode: extranonce1 prefixes held by miners, and
/// freed ones waiting until no live job can have used them.
pub const AGGREGATE_PREFIXES: &str = "loka_aggregate_prefixes";
/// Label `result`: `ok` (delivered), `retried` (an attempt failed and another follows), `failed`
/// (given up: out of retries, a status not worth retrying, or shutdown). POSTs to `[notify] webhook_url`.
pub const WEBHOOK_POSTS: &str = "loka_webhook_posts_total";
/// Label `result`: `delivered`, `failed` (in a POST given up), `dropped` (the notifier's queue was
/// full; the next POST's summary counts them). Worker state changes for the webhook.
pub const WEBHOOK_EVENTS: &str = "loka_webhook_events_total";

/// How often histogram samples are folded into their buckets between scrapes.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds the histograms' samples into their buckets until `shutdown`. The recorder holds every
/// sample until a scrape or an upkeep takes it, so without this, memory would grow with each
/// pool verdict for as long as nobody scrapes `/metrics`.
pub async fn upkeep(handle: PrometheusHandle, shutdown: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}

/// Installs the Prometheus recorder once per process and returns the handle that renders it.
/// Several proxies in one process (as in tests) share it.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(SUBMIT_RTT.into()),
                    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
                )
                .expect("buckets are not empty")
                .install_recorder()
                .expect("the metrics recorder is installed once, here");
            describe();
            let labels = MINER_METHODS.iter().chain(&POOL_METHODS).copied().chain(["other"]);
            let counters = labels.map(|m| (m, counter!(MESSAGES, "method" => m, "direction" => "from_miner")));
            let _ = FROM_MINER.set(counters.collect());
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(CONNECTIONS_ACCEPTED, "Miner connections accepted by the listener.");
    describe_gauge!(CONNECTIONS_ACTIVE, "Miner connections currently open.");
    describe_gauge!(CONNECTIONS_MAX, "The configured limit on open miner connections (server.max_connections).");
    describe_counter!(
        CONNECTIONS_REJECTED,
        "Miner connections closed at the door: a connection limit, an untrusted or a bad PROXY header."
    );
    describe_counter!(CONNECTIONS_CLOSED, "Miner connections closed, by reason.");
    describe_counter!(MESSAGES, "Stratum messages received, by method and direction.");
    describe_counter!(MALFORMED, "Lines that were not valid Stratum messages, by source.");
    describe_counter!(LINES_TOO_LONG, "Lines over max_line_bytes, by source.");
    describe_counter!(SHARES_SUBMITTED, "Shares the proxy sent to the pool.");
    describe_counter!(
        SHARES_ACCEPTED,
        "Miners' shares that passed the proxy's checks at the miner's difficulty (not the pool's verdict: see loka_upstream_shares_total)."
    );
    describe_counter!(
        SHARES_REJECTED,
        "Miners' shares the proxy's checks refused, by reason; the pool never saw them."
    );
    describe_counter!(
        SHARES_ACCEPTED_WORK,
        "Difficulty of the shares in loka_shares_accepted_total, summed, in millionths: rate() x 4294.967296 is hashes per second."
    );
    describe_counter!(BLOCKS_FOUND, "Block candidates (shares whose hash met the network target) sent to the pool.");
    describe_histogram!(SUBMIT_RTT, Unit::Seconds, "Time from forwarding a share to the pool's reply.");
    describe_gauge!(UPSTREAM_SESSIONS_ACTIVE, "Pool sessions currently open.");
    describe_counter!(UPSTREAM_CONNECT_FAILURES, "Failed connection attempts and probes of a pool.");
    describe_counter!(
        UPSTREAM_FAULTS,
        "Pool sessions dropped because the pool broke the protocol, sent no job or left a share unanswered."
    );
    describe_counter!(POOL_REDIRECTS, "client.reconnect requests from pools, by outcome.");
    describe_gauge!(POOL_UP, "1 when the pool completed its last probe (subscribe, login, a job), else 0.");
    describe_gauge!(READY, "1 when the listener is bound and a pool is reachable, else 0.");
    describe_gauge!(WORKERS, "Workers in the inventory, by state (online, stale, offline, never_seen).");
    describe_counter!(
        WORKER_OFFLINE_TRANSITIONS,
        "Workers that went offline: no session left for inventory.worker_offline_after."
    );
    describe_counter!(MINERS_REFUSED, "Miner sessions answered with an error and closed, by reason.");
    describe_counter!(
        SHARES_LOCAL_ONLY,
        "Valid shares below the pool's difficulty and no block candidates: counted as work, not forwarded."
    );
    describe_counter!(
        UPSTREAM_SHARES,
        "Shares for the pool by its verdict: accepted, rejected, unanswered (the session ended first), or dropped (never sent)."
    );
    describe_counter!(UPSTREAM_REJECTS, "Shares the pool rejected, by the reason its error code gives.");
    describe_counter!(FAILOVERS, "Aggregate pool sessions moved to another pool, by kind.");
    describe_gauge!(POOL_ACTIVE, "1 while an aggregate pool session is on the pool.");
    describe_gauge!(POOL_MINERS, "Miners served through the pool (aggregate mode).");
    describe_gauge!(AGGREGATE_SESSIONS, "Aggregate pool sessions that are on a pool.");
    describe_gauge!(AGGREGATE_SESSION_MINERS, "Miners in each aggregate pool session.");
    describe_gauge!(AGGREGATE_PREFIXES, "Extranonce1 prefixes held by miners, or quarantined after they left.");
    describe_counter!(
        WEBHOOK_POSTS,
        "POSTs to the worker webhook: ok, retried (an attempt failed), failed (given up)."
    );
    describe_counter!(
        WEBHOOK_EVENTS,
        "Worker state changes for the webhook: delivered, failed (in a POST given up), dropped (queue full)."
    );
}

/// The `result` label of [`UPSTREAM_SHARES`].
const UPSTREAM_RESULTS: [&str; 4] = ["accepted", "rejected", "unanswered", "dropped"];

/// Stratum methods a miner sends; with [`POOL_METHODS`], the known values of the `method` label.
const MINER_METHODS: [&str; 6] = [
    miner::SUBSCRIBE,
    miner::AUTHORIZE,
    miner::CONFIGURE,
    miner::EXTRANONCE_SUBSCRIBE,
    miner::SUGGEST_DIFFICULTY,
    miner::SUBMIT,
];
/// Stratum methods a pool sends.
const POOL_METHODS: [&str; 7] = [
    pool::NOTIFY,
    pool::SET_DIFFICULTY,
    pool::SET_EXTRANONCE,
    pool::SET_VERSION_MASK,
    pool::RECONNECT,
    pool::SHOW_MESSAGE,
    pool::GET_VERSION,
];
/// The `source` label of [`MALFORMED`] and [`LINES_TOO_LONG`].
const LINE_SOURCES: [&str; 2] = ["miner", "pool"];
/// The `result` label of [`POOL_REDIRECTS`], as `upstream::Pool::reconnect_requested` sets it.
const REDIRECT_RESULTS: [&str; 3] = ["honoured", "refused", "same_address"];

/// The `method` label for a Stratum method: known names as themselves, anything else `other`.
fn method_label(method: &str) -> &'static str {
    MINER_METHODS.iter().chain(&POOL_METHODS).find(|m| **m == method).copied().unwrap_or("other")
}

/// [`MESSAGES`] from miners by `method` label, looked up once the recorder is installed.
static FROM_MINER: OnceLock<Vec<(&'static str, Counter)>> = OnceLock::new();

/// Counts a request from a miner under [`MESSAGES`]: every share is one, so its counter is
/// held, not looked up in the registry each time.
pub fn message_from_miner(method: &str) {
    match FROM_MINER.get() {
        // The last is `other`.
        Some(counters) => {
            let (_, counter) = counters.iter().find(|(m, _)| *m == method).or(counters.last()).expect("not empty");
            counter.increment(1);
        }
        None => counter!(MESSAGES, "method" => method_label(method), "direction" => "from_miner").increment(1),
    }
}

/// Creates every series with its closed label sets, so that a fresh proxy exports all of them at
/// zero: the exporter renders only what has been touched, and a rule on an absent series sees nothing.
///
/// Counters and the gauges that other code moves by increments are touched with a zero increment,
/// which leaves any value already there alone (several proxies in one process, as in tests, share
/// the recorder). `loka_pool_up` and `loka_ready` start at 0 too: not yet known to be reachable.
/// A histogram only needs registering: the exporter renders it with empty buckets. Upstream fault
/// reasons are not a set this module knows, so `loka_upstream_faults_total` appears with the first
/// fault.
pub fn register(pools: &[String], max_connections: usize) {
    counter!(CONNECTIONS_ACCEPTED).increment(0);
    gauge!(CONNECTIONS_ACTIVE).increment(0.0);
    gauge!(CONNECTIONS_MAX).set(max_connections as f64);
    gauge!(READY).increment(0.0);
    counter!(MINERS_REFUSED, "reason" => "no_upstream").increment(0);
    counter!(MINERS_REFUSED, "reason" => "full").increment(0);
    for kind in ["failover", "failback", "reload"] {
        counter!(FAILOVERS, "kind" => kind).increment(0);
    }
    gauge!(AGGREGATE_SESSIONS).increment(0.0);
    for result in ["ok", "retried", "failed"] {
        counter!(WEBHOOK_POSTS, "result" => result).increment(0);
    }
    for result in ["delivered", "failed", "dropped"] {
        counter!(WEBHOOK_EVENTS, "result" => result).increment(0);
    }
    for state in ["live", "quarantined"] {
        gauge!(AGGREGATE_PREFIXES, "state" => state).increment(0.0);
    }
    for refusal in Refusal::ALL {
        counter!(CONNECTIONS_REJECTED, "reason" => refusal.as_str()).increment(0);
    }
    for reason in CloseReason::ALL {
        counter!(CONNECTIONS_CLOSED, "reason" => reason.as_str()).increment(0);
    }
    // Each direction with the methods that side sends, and `other` for the rest.
    for (methods, direction) in [(&MINER_METHODS[..], "from_miner"), (&POOL_METHODS[..], "from_pool")] {
        for method in methods.iter().copied().chain(["other"]) {
            counter!(MESSAGES, "method" => method, "direction" => direction).increment(0);
        }
    }
    for source in LINE_SOURCES {
        counter!(MALFORMED, "source" => source).increment(0);
        counter!(LINES_TOO_LONG, "source" => source).increment(0);
    }
    for pool in pools {
        counter!(SHARES_SUBMITTED, "pool" => pool.clone()).increment(0);
        counter!(SHARES_ACCEPTED, "pool" => pool.clone()).increment(0);
        counter!(SHARES_ACCEPTED_WORK, "pool" => pool.clone()).increment(0);
        counter!(BLOCKS_FOUND, "pool" => pool.clone()).increment(0);
        gauge!(UPSTREAM_SESSIONS_ACTIVE, "pool" => pool.clone()).increment(0.0);
        counter!(UPSTREAM_CONNECT_FAILURES, "pool" => pool.clone()).increment(0);
        gauge!(POOL_UP, "pool" => pool.clone()).increment(0.0);
        counter!(SHARES_LOCAL_ONLY, "pool" => pool.clone()).increment(0);
        gauge!(POOL_ACTIVE, "pool" => pool.clone()).increment(0.0);
        gauge!(POOL_MINERS, "pool" => pool.clone()).increment(0.0);
        for result in UPSTREAM_RESULTS {
            counter!(UPSTREAM_SHARES, "pool" => pool.clone(), "result" => result).increment(0);
        }
        let _ = histogram!(SUBMIT_RTT, "pool" => pool.clone());
        for result in REDIRECT_RESULTS {
            counter!(POOL_REDIRECTS, "pool" => pool.clone(), "result" => result).increment(0);
        }
        for reason in RejectReason::LOCAL {
            counter!(SHARES_REJECTED, "pool" => pool.clone(), "reason" => reason.as_str()).increment(0);
        }
        for reason in RejectReason::POOL {
            counter!(UPSTREAM_REJECTS, "pool" => pool.clone(), "reason" => reason.as_str()).increment(0);
        }
    }
}
