//! The admin HTTP port: Prometheus metrics, the workers API, and liveness and readiness probes.

use std::sync::Arc;

use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::registry::{ConnectionManager, Phase};
use crate::submissions::WorkerView;
use crate::upstream::PoolSet;

#[derive(Clone)]
pub struct State {
    pub prometheus: PrometheusHandle,
    pub registry: Arc<ConnectionManager>,
    pub pools: Arc<PoolSet>,
}

pub fn router(state: State) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/api/v1/workers", get(workers))
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

async fn metrics(Extract(state): Extract<State>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.prometheus.render())
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
