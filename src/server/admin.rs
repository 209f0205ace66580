//! The admin HTTP port: the status page, Prometheus metrics, the JSON API, and liveness and
//! readiness probes.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{FromRef, State as Extract};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::aggregate::{Aggregator, SessionView};
use crate::hashrate::{History, Sample};
use crate::inventory::{api as inventory_api, Inventory};
use crate::registry::{ConnectionManager, Phase};
use crate::submissions::WorkerView;
use crate::upstream::PoolSet;

#[derive(Clone)]
pub struct State {
    pub prometheus: PrometheusHandle,
    pub registry: Arc<ConnectionManager>,
    pub pools: Arc<PoolSet>,
    /// Aggregate mode's pool sessions; `None` in passthrough mode.
    pub aggregator: Option<Arc<Aggregator>>,
    /// The total hashrate over the last hour, filled by [`crate::hashrate::sample`].
    pub history: Arc<History>,
    /// When the server started running, for `uptime_s`.
    pub started: Instant,
    /// Cancelled when the listeners close: a draining proxy is not ready, whatever its pools.
    pub draining: CancellationToken,
    /// Every worker ever authorized, with its state.
    pub inventory: Arc<Inventory>,
}

impl FromRef<State> for Arc<Inventory> {
    fn from_ref(state: &State) -> Self {
        state.inventory.clone()
    }
}

/// The status page: inline CSS and script, no external assets, so it works offline and
/// behind any firewall that lets the admin port through.
const STATUS_PAGE: &str = include_str!("status.html");

/// The page loads nothing from elsewhere and talks only to this port.
const STATUS_PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
     connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn router(state: State) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .route("/api/v1/workers", get(inventory_api::list))
        .route("/api/v1/workers/{name}", get(inventory_api::one).delete(inventory_api::delete))
        .route("/api/v1/connections", get(connections))
        .route("/api/v1/pools", get(pools))
        .route("/api/v1/sessions", get(sessions))
        .route("/api/v1/summary", get(summary))
        .route("/api/v1/hashrate", get(hashrate))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .with_state(state)
}

/// Serves until `stop` is cancelled.
pub async fn serve(listener: TcpListener, state: State, stop: CancellationToken) {
    if let Err(e) = axum::serve(listener, router(state)).with_graceful_shutdown(stop.cancelled_owned()).await {
        tracing::error!(error = %e, "admin HTTP server failed");
    }
}

async fn status_page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, STATUS_PAGE_CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        STATUS_PAGE,
    )
}

async fn metrics(Extract(state): Extract<State>) -> impl IntoResponse {
    // Gauges that are cheaper to read at scrape time than to keep moving.
    if let Some(aggregator) = &state.aggregator {
        crate::aggregate::set_gauges(aggregator);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.prometheus.render())
}

/// `/api/v1/connections`: the authorized sessions open now, one per miner connection.
async fn connections(Extract(state): Extract<State>) -> Json<Vec<WorkerView>> {
    Json(
        state
            .registry
            .snapshot()
            .iter()
            .filter(|h| h.phase() == Phase::Authorized)
            .map(|h| WorkerView::of(h))
            .collect(),
    )
}

/// A pool as `/api/v1/pools` shows it.
#[derive(Serialize)]
struct PoolView {
    /// `host:port`, as in the metrics' `pool` label and the workers' `upstream`.
    pool: String,
    url: String,
    /// `active` (aggregate sessions are on it), `up`, `down` or `unknown` (not tried yet).
    state: &'static str,
    up: bool,
    /// Miner sessions on this pool: each passthrough miner's own, or the aggregate sessions.
    upstream_sessions: usize,
    /// Miners served through this pool.
    miners: usize,
    /// The smoothed round trip of forwarded shares, in milliseconds, once one was answered.
    latency_ms: Option<f64>,
    /// The pool's verdicts on forwarded shares since start-up.
    accepted: u64,
    rejected: u64,
    /// Seconds since the pool's last `mining.notify`, if it sent one.
    last_notify_age_s: Option<f64>,
}

/// `/api/v1/sessions`: aggregate mode's pool sessions (none in passthrough mode).
async fn sessions(Extract(state): Extract<State>) -> Json<Vec<SessionView>> {
    Json(state.aggregator.as_ref().map(|a| a.sessions()).unwrap_or_default())
}

/// `/api/v1/pools`: the pools in priority order.
async fn pools(Extract(state): Extract<State>) -> Json<Vec<PoolView>> {
    let sessions = state.aggregator.as_ref().map(|a| a.sessions()).unwrap_or_default();
    let mut miners: HashMap<String, usize> = HashMap::new();
    let mut upstreams: HashMap<String, usize> = HashMap::new();
    if state.aggregator.is_some() {
        for s in &sessions {
            if let Some(pool) = &s.pool {
                *miners.entry(pool.clone()).or_default() += s.miners;
                *upstreams.entry(pool.clone()).or_default() += 1;
            }
        }
    } else {
        for handle in state.registry.snapshot() {
            if let Some(upstream) = handle.info().upstream.clone() {
                *miners.entry(upstream.to_string()).or_default() += 1;
                *upstreams.entry(upstream.to_string()).or_default() += 1;
            }
        }
    }
    let pools = state
        .pools
        .pools()
        .iter()
        .map(|p| {
            let upstream_sessions = upstreams.get(&p.label).copied().unwrap_or(0);
            let active = state.aggregator.is_some() && upstream_sessions > 0;
            PoolView {
                pool: p.label.clone(),
                url: format!("{}://{}", if p.url.tls { "stratum+ssl" } else { "stratum+tcp" }, p.url),
                state: if active { "active" } else { p.state() },
                up: p.is_up(),
                upstream_sessions,
                miners: miners.get(&p.label).copied().unwrap_or(0),
                latency_ms: p.verdicts.rtt().map(|d| d.as_secs_f64() * 1000.0),
                accepted: p.verdicts.accepted(),
                rejected: p.verdicts.rejected(),
                last_notify_age_s: p.verdicts.last_notify_age().map(|d| d.as_secs_f64()),
            }
        })
        .collect();
    Json(pools)
}

/// The proxy's totals, as `/api/v1/summary` shows them.
#[derive(Serialize)]
struct Summary {
    version: &'static str,
    uptime_s: u64,
    /// Miner connections open, in any phase.
    connections: usize,
    /// Authorized sessions.
    workers: usize,
    /// The inventory's workers by state, as `/api/v1/workers` counts them.
    worker_states: inventory_api::Counts,
    /// The sum of the workers' `hashrate_5m`, in hashes per second.
    hashrate_5m: f64,
    /// Shares of the sessions connected now: a worker's counts leave with its connection. The
    /// proxy's verdicts, as in the workers' `accepted` and `rejected`.
    accepted: u64,
    rejected: u64,
    /// The pool's verdicts on those sessions' shares.
    pool_accepted: u64,
    pool_rejected: u64,
}

async fn summary(Extract(state): Extract<State>) -> Json<Summary> {
    let sessions = state.registry.snapshot();
    let mut summary = Summary {
        version: env!("CARGO_PKG_VERSION"),
        uptime_s: state.started.elapsed().as_secs(),
        connections: sessions.len(),
        workers: 0,
        worker_states: inventory_api::Counts::of(state.inventory.counts()),
        hashrate_5m: 0.0,
        accepted: 0,
        rejected: 0,
        pool_accepted: 0,
        pool_rejected: 0,
    };
    // The same figures as /api/v1/connections, so the page's totals match its table.
    for view in sessions.iter().filter(|h| h.phase() == Phase::Authorized).map(|h| WorkerView::of(h)) {
        summary.workers += 1;
        summary.hashrate_5m += view.hashrate_5m;
        summary.accepted += view.accepted;
        summary.rejected += view.rejected;
        summary.pool_accepted += view.pool_accepted;
        summary.pool_rejected += view.pool_rejected;
    }
    Json(summary)
}

async fn hashrate(Extract(state): Extract<State>) -> Json<Vec<Sample>> {
    Json(state.history.samples())
}

async fn health() -> &'static str {
    "ok\n"
}

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    pools: Vec<PoolReadiness>,
}

#[derive(Serialize)]
struct PoolReadiness {
    pool: String,
    up: bool,
}

/// Ready when the listener is bound and some pool is reachable; never from the start of the drain,
/// so that a load balancer sends new miners elsewhere while this proxy finishes its shares.
async fn ready(Extract(state): Extract<State>) -> impl IntoResponse {
    let pools: Vec<_> =
        state.pools.pools().iter().map(|p| PoolReadiness { pool: p.label.clone(), up: p.is_up() }).collect();
    let ready = !state.draining.is_cancelled()
        && match &state.aggregator {
            Some(aggregator) => aggregator.ready(),
            None => pools.iter().any(|p| p.up),
        };
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(Readiness { ready, pools }))
}
