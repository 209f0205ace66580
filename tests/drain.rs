//! Shutdown: the proxy stops reading, answers what is in flight, closes, and `run` returns. In
//! passthrough the pool's answers are relayed during the drain; in aggregate mode miners were
//! answered at once, and the drain sends every share they were told is accepted to the pool and
//! hears its answer, within `shutdown_grace`.

mod support;

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use loka_stratum::config::Mode;
use serde_json::{json, Value};
use support::*;

/// Everything the proxy logs at warn and above, from every test in this binary.
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures the proxy's warnings into [`LOG`]; once per process. Each test calls it before it
/// starts a proxy, so that it comes before `RUST_LOG`'s subscriber in the test support.
fn capture_logs() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .try_init();
    });
}

fn logs() -> String {
    String::from_utf8_lossy(&LOG.lock().unwrap()).into_owned()
}

/// `loka_upstream_shares_total{pool, result}` from the process's recorder: the admin port is gone
/// once the proxy has stopped.
fn upstream_shares(pool: &MockPool, result: &str) -> f64 {
    let text = loka_stratum::metrics::install().render();
    metric(&text, "loka_upstream_shares_total", &[("pool", &pool.label()), ("result", result)]).unwrap_or(0.0)
}

/// Each miner's submit, sent and received by the pool before the drain starts.
async fn miners_with_a_submit_in_flight(proxy: &Proxy, pool: &MockPool, count: usize) -> Vec<(SimMiner, Value)> {
    let mut miners = Vec::new();
    for i in 0..count {
        let worker = format!("w{i}");
        let mut miner = proxy.miner().await;
        miner.handshake(&worker).await;
        miners.push(miner);
    }
    let mut pending = Vec::new();
    for (i, mut miner) in miners.into_iter().enumerate() {
        let share = miner.any_share();
        let id = miner.submit(&format!("w{i}"), &share).await;
        pending.push((miner, id));
    }
    // Only lines the proxy has read and forwarded are "in flight"; wait until all are.
    assert!(pool.wait_submits(count).await, "the pool got {} of {count} submits", pool.submits().len());
    pending
}

in_both_modes!(tokio::test(flavor = "multi_thread", worker_threads = 2), shutdown_waits_for_in_flight_replies);
async fn shutdown_waits_for_in_flight_replies(mode: Mode) {
    capture_logs();
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut proxy = spawn_proxy(mode_config(mode, pool.addr)).await;
    pool.set_submit_replies(SubmitReplies::Delay(Duration::from_millis(300)));
    let pending = miners_with_a_submit_in_flight(&proxy, &pool, 20).await;

    proxy.trigger_shutdown();
    let drains = pending.into_iter().map(|(mut miner, id)| async move {
        let (messages, closed) = miner.drain_until_closed(WAIT).await;
        (messages, closed, id)
    });
    // The pool's verdict in passthrough, the proxy's own in aggregate mode: `true` either way.
    for (messages, closed, id) in futures::future::join_all(drains).await {
        assert!(closed, "the miner is closed after the drain");
        let replies: Vec<&Value> = messages.iter().filter(|m| is_reply(m)).collect();
        assert_eq!(replies.len(), 1, "{messages:?}");
        assert_eq!(replies[0], &json!({"id": id, "result": true, "error": null}));
    }
    assert!(proxy.stopped_within(WAIT).await, "Server::run returns after the drain");
    assert_eq!(pool.accepted(), 20);
    // Every share the miners were told is accepted was answered by the pool, and the proxy heard it.
    assert_eq!(upstream_shares(&pool, "accepted"), 20.0);
    assert_eq!(upstream_shares(&pool, "unanswered"), 0.0);
    assert!(tokio::net::TcpStream::connect(proxy.addr).await.is_err(), "the listener is closed");
}

in_both_modes!(
    tokio::test(flavor = "multi_thread", worker_threads = 2),
    shutdown_grace_errors_requests_the_pool_never_answers
);
async fn shutdown_grace_errors_requests_the_pool_never_answers(mode: Mode) {
    capture_logs();
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut config = mode_config(mode, pool.addr);
    config.server.shutdown_grace = 1;
    let mut proxy = spawn_proxy(config).await;
    pool.set_submit_replies(SubmitReplies::Never);
    let pending = miners_with_a_submit_in_flight(&proxy, &pool, 5).await;

    assert_eq!(proxy.http_get("/ready").await.0, 200, "ready while serving");
    let started = tokio::time::Instant::now();
    proxy.trigger_shutdown();
    // From the start of the drain, while the proxy still finishes its shares, it is not ready.
    assert!(
        eventually(WAIT, || async { proxy.http_get("/ready").await.0 == 503 }).await,
        "/ready answers 503 during the drain"
    );
    let drains = pending.into_iter().map(|(mut miner, id)| async move {
        let (messages, closed) = miner.drain_until_closed(WAIT).await;
        (messages, closed, id)
    });
    for (messages, closed, id) in futures::future::join_all(drains).await {
        assert!(closed, "the miner is closed after the grace period");
        let replies: Vec<&Value> = messages.iter().filter(|m| is_reply(m)).collect();
        assert_eq!(replies.len(), 1, "{messages:?}");
        // A passthrough miner waits for the pool's verdict until the grace runs out; an aggregated
        // miner was answered from the proxy's own check when it submitted.
        let expected = match mode {
            Mode::Passthrough => json!({"id": id, "result": null, "error": [20, "proxy shutting down", null]}),
            Mode::Aggregate => json!({"id": id, "result": true, "error": null}),
        };
        assert_eq!(replies[0], &expected);
    }
    assert!(proxy.stopped_within(WAIT).await, "Server::run returns after the grace period");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "the drain waited for the grace period, took {took:?}");
    assert!(took < Duration::from_secs(5), "the drain took {took:?}");
    assert_eq!(upstream_shares(&pool, "unanswered"), 5.0, "the pool never answered them");
    assert_eq!(upstream_shares(&pool, "accepted") + upstream_shares(&pool, "rejected"), 0.0);
    if mode == Mode::Aggregate {
        // Nobody is left to tell but the operator.
        let logs = logs();
        let warning = logs
            .lines()
            .find(|l| l.contains("shutdown_grace ran out") && l.contains(&format!("pool={}", pool.label())))
            .unwrap_or_else(|| panic!("no warning for the unanswered shares in {logs}"));
        assert!(warning.contains("unanswered=5"), "{warning}");
    }
}
