//! The admin HTTP port: the status page, Prometheus metrics, the JSON API, and liveness and
//! readiness probes.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State as Extract;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::hashrate::{History, Sample};
use crate::registry::{ConnectionManager, Phase};
use crate::submissions::WorkerView;
use crate::upstream::PoolSet;

#[derive(Clone)]
pub struct State {
    pub prometheus: PrometheusHandle,
    pub registry: Arc<ConnectionManager>,
    pub pools: Arc<PoolSet>,
    /// The total hashrate over the last hour, filled by [`crate::hashrate::sample`].
    pub history: Arc<History>,
    /// When the server started running, for `uptime_s`.
    pub started: Instant,
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
        .route("/api/v1/workers", get(workers))
        .route("/api/v1/pools", get(pools))
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
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.prometheus.render())
}

async fn workers(Extract(state): Extract<State>) -> Json<Vec<WorkerView>> {
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
    up: bool,
    /// Live miner sessions relayed to this pool.
    upstream_sessions: usize,
}

async fn pools(Extract(state): Extract<State>) -> Json<Vec<PoolView>> {
    let mut sessions: HashMap<Arc<str>, usize> = HashMap::new();
    for handle in state.registry.snapshot() {
        if let Some(upstream) = handle.info().upstream.clone() {
            *sessions.entry(upstream).or_default() += 1;
        }
    }
    Json(
        state
            .pools
            .pools()
            .iter()
            .map(|p| PoolView {
                pool: p.label.clone(),
                url: format!("stratum+tcp://{}", p.url),
                up: p.is_up(),
                upstream_sessions: sessions.get(p.label.as_str()).copied().unwrap_or(0),
            })
            .collect(),
    )
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
    /// The sum of the workers' `hashrate_5m`, in hashes per second.
    hashrate_5m: f64,
    /// Shares of the sessions connected now: a worker's counts leave with its connection.
    accepted: u64,
    rejected: u64,
}

async fn summary(Extract(state): Extract<State>) -> Json<Summary> {
    let sessions = state.registry.snapshot();
    let mut summary = Summary {
        version: env!("CARGO_PKG_VERSION"),
        uptime_s: state.started.elapsed().as_secs(),
        connections: sessions.len(),
        workers: 0,
        hashrate_5m: 0.0,
        accepted: 0,
        rejected: 0,
    };
    // The same figures as /api/v1/workers, so the page's totals match its table.
    for view in sessions.iter().filter(|h| h.phase() == Phase::Authorized).map(|h| WorkerView::of(h)) {
        summary.workers += 1;
        summary.hashrate_5m += view.hashrate_5m;
        summary.accepted += view.accepted;
        summary.rejected += view.rejected;
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

/// Ready when the listener is bound (it is, while this port serves) and some pool is reachable.
async fn ready(Extract(state): Extract<State>) -> impl IntoResponse {
    let pools: Vec<_> =
        state.pools.pools().iter().map(|p| PoolReadiness { pool: p.label.clone(), up: p.is_up() }).collect();
    let ready = pools.iter().any(|p| p.up);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(Readiness { ready, pools }))
}
