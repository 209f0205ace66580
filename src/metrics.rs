//! Every metric the proxy exports: names, descriptions and their closed label sets, in one place.
//!
//! Metrics go through the `metrics` facade; the Prometheus text comes from
//! `metrics-exporter-prometheus`. Per-worker detail lives in the HTTP API, not in labels.

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS_ACCEPTED: &str = "loka_connections_accepted_total";
pub const CONNECTIONS_ACTIVE: &str = "loka_connections_active";
/// Label `reason` (`max_connections`, `max_connections_per_ip`).
pub const CONNECTIONS_REJECTED: &str = "loka_connections_rejected_total";
/// Label `reason`: one of [`CloseReason::as_str`](crate::registry::CloseReason::as_str).
pub const CONNECTIONS_CLOSED: &str = "loka_connections_closed_total";
/// Labels `method` (a known Stratum method or `other`) and `direction` (`from_miner`, `from_pool`).
pub const MESSAGES: &str = "loka_messages_total";
/// Label `source` (`miner`, `pool`).
pub const MALFORMED: &str = "loka_malformed_messages_total";
/// Label `source` (`miner`, `pool`).
pub const LINES_TOO_LONG: &str = "loka_lines_too_long_total";
/// Label `pool`.
pub const SHARES_SUBMITTED: &str = "loka_shares_submitted_total";
/// Label `pool`.
pub const SHARES_ACCEPTED: &str = "loka_shares_accepted_total";
/// Labels `pool`, `reason` (one of [`RejectReason::as_str`](crate::submissions::RejectReason::as_str))
/// and `source` (`local` for the proxy's own checks, `pool` for the pool's verdict).
pub const SHARES_REJECTED: &str = "loka_shares_rejected_total";
/// Label `pool`.
pub const SHARES_ACCEPTED_DIFFICULTY: &str = "loka_shares_accepted_difficulty_sum";
/// Label `pool`.
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
/// Label `reason` (`no_upstream`).
pub const MINERS_REFUSED: &str = "loka_miners_refused_total";

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
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(CONNECTIONS_ACCEPTED, "Miner connections accepted by the listener.");
    describe_gauge!(CONNECTIONS_ACTIVE, "Miner connections currently open.");
    describe_counter!(CONNECTIONS_REJECTED, "Miner connections closed at once at a connection limit, by limit.");
    describe_counter!(CONNECTIONS_CLOSED, "Miner connections closed, by reason.");
    describe_counter!(MESSAGES, "Stratum messages received, by method and direction.");
    describe_counter!(MALFORMED, "Lines that were not valid Stratum messages, by source.");
    describe_counter!(LINES_TOO_LONG, "Lines over max_line_bytes, by source.");
    describe_counter!(SHARES_SUBMITTED, "Shares forwarded to a pool after passing local validation.");
    describe_counter!(SHARES_ACCEPTED, "Shares the pool accepted.");
    describe_counter!(SHARES_REJECTED, "Shares rejected, by pool, reason and who rejected them.");
    describe_counter!(BLOCKS_FOUND, "Shares whose hash met the network target (block candidates).");
    describe_gauge!(SHARES_ACCEPTED_DIFFICULTY, "Sum of the difficulty of accepted shares.");
    describe_histogram!(SUBMIT_RTT, Unit::Seconds, "Time from forwarding a share to the pool's reply.");
    describe_gauge!(UPSTREAM_SESSIONS_ACTIVE, "Pool sessions currently open.");
    describe_counter!(UPSTREAM_CONNECT_FAILURES, "Failed connection attempts to a pool.");
    describe_counter!(UPSTREAM_FAULTS, "Pool sessions dropped because the pool broke the protocol or sent no job.");
    describe_counter!(POOL_REDIRECTS, "client.reconnect requests from pools, by outcome.");
    describe_gauge!(POOL_UP, "1 when the pool's last connection attempt succeeded, else 0.");
    describe_gauge!(READY, "1 when the listener is bound and a pool is reachable, else 0.");
    describe_counter!(MINERS_REFUSED, "Miner sessions answered with an error and closed, by reason.");
}

/// The `method` label for a Stratum method: known names as themselves, anything else `other`.
pub fn method_label(method: &str) -> &'static str {
    use crate::protocol::{miner, pool};
    const KNOWN: &[&str] = &[
        miner::SUBSCRIBE,
        miner::AUTHORIZE,
        miner::CONFIGURE,
        miner::EXTRANONCE_SUBSCRIBE,
        miner::SUGGEST_DIFFICULTY,
        miner::SUBMIT,
        pool::NOTIFY,
        pool::SET_DIFFICULTY,
        pool::SET_EXTRANONCE,
        pool::SET_VERSION_MASK,
        pool::RECONNECT,
        pool::SHOW_MESSAGE,
        pool::GET_VERSION,
    ];
    KNOWN.iter().find(|m| **m == method).copied().unwrap_or("other")
}
