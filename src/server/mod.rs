//! The server: binds the listeners, accepts miners into the registry, runs the background tasks,
//! and drains on shutdown.
//!
//! Shutdown order: signal → stop accepting → cancel → sessions answer their in-flight requests
//! (within `shutdown_grace`) → wait for the tasks → stop the admin port.

pub mod admin;
pub mod connection;
pub mod hashrate;
pub mod outbox;
pub mod proxy_protocol;
pub mod registry;
mod side;
pub mod systemd;
pub mod tls;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{counter, gauge};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, PoolUrl};
use crate::metrics as m;
use crate::registry::{ConnectionManager, Deadlines, Refusal, Registration};
use crate::upstream::set_keepalive;
use connection::Shared;
use proxy_protocol::{Header, HeaderError};

/// How often the cleanup task looks for idle and handshake-expired sessions.
const CLEANUP_INTERVAL: Duration = Duration::from_secs(1);

/// A proxy with its ports bound, ready to run.
pub struct Server {
    listener: TcpListener,
    http: TcpListener,
    shared: Arc<Shared>,
    prometheus: PrometheusHandle,
    /// Every connection and background task, waited for on shutdown.
    tracker: TaskTracker,
    /// The miners' TLS listener, when `server.tls_listen` is set.
    tls: Option<(TcpListener, TlsAcceptor)>,
    /// The worker webhook's task and what stops it, when `notify.webhook_url` is set.
    webhook: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl Server {
    /// Binds the miner and admin ports. The config must already be validated.
    pub async fn bind(config: Config) -> io::Result<Server> {
        let prometheus = m::install();
        m::register(
            &config
                .pools
                .iter()
                .map(|p| {
                    crate::config::PoolUrl::parse(&p.url).expect("pool URLs are validated with the config").to_string()
                })
                .collect::<Vec<_>>(),
            config.server.max_connections,
        );
        // Before any port: a store that cannot be opened stops start-up.
        let inventory =
            crate::inventory::Inventory::open(&config.inventory).map_err(|e| io::Error::other(e.to_string()))?;
        let stop_webhook = CancellationToken::new();
        let webhook = match crate::notify::start(&config.notify, stop_webhook.clone()).map_err(io::Error::other)? {
            (_, None) => None,
            (notifier, Some(task)) => {
                tokio::spawn(crate::notify::forward(inventory.subscribe(), notifier, stop_webhook.clone()));
                Some((stop_webhook, task))
            }
        };
        let listener = listen(config.server.listen)?;
        let tls = match config.server.tls_addr() {
            Ok(None) => None,
            Ok(Some(addr)) => {
                let s = &config.server;
                let tls =
                    tls::server_config(Path::new(&s.tls_cert), Path::new(&s.tls_key)).map_err(io::Error::other)?;
                Some((listen(addr)?, TlsAcceptor::from(tls)))
            }
            Err(e) => return Err(io::Error::other(e.to_string())),
        };
        let http = TcpListener::bind(config.http.listen).await?;
        tracing::info!(listen = %listener.local_addr()?, http = %http.local_addr()?, pools = config.pools.len(), "listening");
        let tracker = TaskTracker::new();
        let shared = Arc::new(Shared::new(config, inventory, &tracker));
        Ok(Server { listener, http, shared, prometheus, tracker, tls, webhook })
    }

    /// A handle that applies a reloaded configuration to this server while it runs.
    pub fn reloader(&self) -> Reloader {
        Reloader { shared: self.shared.clone(), tracker: self.tracker.clone() }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// The miners' TLS listener's address, if there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|(l, _)| l.local_addr().expect("a bound listener has an address"))
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr().expect("a bound listener has an address")
    }

    pub fn registry(&self) -> Arc<ConnectionManager> {
        self.shared.registry.clone()
    }

    pub fn inventory(&self) -> Arc<crate::inventory::Inventory> {
        self.shared.inventory.clone()
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let Server { listener, http, shared, prometheus, tracker, tls, webhook } = self;
        let admin_stop = CancellationToken::new();
        let draining = CancellationToken::new();
        let history = Arc::new(crate::hashrate::History::default());
        let admin_task = tokio::spawn(admin::serve(
            http,
            admin::State {
                prometheus: prometheus.clone(),
                registry: shared.registry.clone(),
                pools: shared.pools.clone(),
                aggregator: shared.aggregator.clone(),
                history: history.clone(),
                started: Instant::now(),
                draining: draining.clone(),
                inventory: shared.inventory.clone(),
            },
            admin_stop.clone(),
        ));
        shared.pools.spawn_monitors(&tracker);
        tracker.spawn(m::upkeep(prometheus.clone(), shared.shutdown.clone()));
        tracker.spawn(cleanup(shared.clone()));
        tracker.spawn(shared.inventory.clone().run(shared.registry.clone(), shared.shutdown.clone()));
        tracker.spawn(crate::hashrate::sample(shared.registry.clone(), history, shared.shutdown.clone()));

        // Both listeners stop together when `shutdown` resolves.
        let stop_accepting = CancellationToken::new();
        let tls_loop = tls.map(|(listener, acceptor)| {
            let (shared, tracker, stop) = (shared.clone(), tracker.clone(), stop_accepting.clone());
            tokio::spawn(async move {
                accept_loop(&listener, &shared, &tracker, stop.cancelled(), Some(acceptor)).await;
            })
        });
        accept_loop(&listener, &shared, &tracker, shutdown, None).await;
        draining.cancel();
        gauge!(m::READY).set(0.0);
        stop_accepting.cancel();
        if let Some(tls_loop) = tls_loop {
            let _ = tls_loop.await;
        }
        drop(listener);
        tracing::info!(sessions = shared.registry.len(), "shutting down: draining sessions");
        shared.shutdown.cancel();
        tracker.close();
        let grace = shared.config().server.shutdown_grace() + Duration::from_secs(1);
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(sessions = shared.registry.len(), "drain did not finish within the grace period");
        }
        // After the sessions: their last counts are in the inventory's last flush.
        let flush = shared.inventory.shutdown(&shared.registry);
        if tokio::time::timeout(crate::inventory::store::SHUTDOWN_FLUSH, flush).await.is_err() {
            tracing::warn!("the worker store's last flush did not finish in time");
        }
        // The webhook sends what it holds, within its own grace.
        if let Some((stop, task)) = webhook {
            stop.cancel();
            let _ = task.await;
        }
        admin_stop.cancel();
        let _ = admin_task.await;
        tracing::info!("stopped");
    }
}

/// Applies a reloaded configuration to a running server, without dropping a miner: pools,
/// credentials, limits and the log level change for what starts after the reload; sessions
/// already open keep their pool and settings. A change that needs new sockets is refused.
#[derive(Clone)]
pub struct Reloader {
    shared: Arc<Shared>,
    tracker: TaskTracker,
}

impl Reloader {
    /// Puts `new` (already validated) in force, or refuses it and leaves the running one.
    pub fn reload(&self, mut new: Config) -> Result<(), String> {
        let old = self.shared.config();
        // An unset data directory (a config built in code rather than loaded) keeps the store.
        if new.inventory.data_dir.is_empty() {
            new.inventory.data_dir.clone_from(&old.inventory.data_dir);
        }
        let needs_restart = [
            ("server.listen", old.server.listen != new.server.listen),
            ("http.listen", old.http.listen != new.http.listen),
            (
                "server.tls_listen",
                (&old.server.tls_listen, &old.server.tls_cert, &old.server.tls_key)
                    != (&new.server.tls_listen, &new.server.tls_cert, &new.server.tls_key),
            ),
            ("log.format", old.log.format != new.log.format),
            ("upstream.mode", old.upstream.mode != new.upstream.mode),
            ("notify", old.notify != new.notify),
            ("inventory.data_dir", old.inventory.data_dir != new.inventory.data_dir),
            ("inventory.on_store_error", old.inventory.on_store_error != new.inventory.on_store_error),
            ("inventory.flush_interval", old.inventory.flush_interval != new.inventory.flush_interval),
            ("inventory.history_interval", old.inventory.history_interval != new.inventory.history_interval),
        ];
        if let Some((key, _)) = needs_restart.iter().find(|(_, changed)| *changed) {
            return Err(format!("{key} changed, which needs a restart"));
        }
        if let Some(aggregator) = &self.shared.aggregator {
            aggregator.reconfigure(&new)?;
        }
        let server = &new.server;
        self.shared.registry.set_limits(server.max_connections, server.max_connections_per_ip);
        self.shared.auth.reconfigure(
            &new.upstream.user_template,
            Duration::from_secs(server.auth_backoff_initial),
            Duration::from_secs(server.auth_backoff_max),
        );
        if old.pools != new.pools || old.upstream != new.upstream {
            let labels = new
                .pools
                .iter()
                .map(|p| PoolUrl::parse(&p.url).expect("pool URLs are validated with the config").to_string())
                .collect::<Vec<_>>();
            m::register(&labels, server.max_connections);
            self.shared.pools.replace(&new, &self.tracker);
        }
        gauge!(m::CONNECTIONS_MAX).set(server.max_connections as f64);
        self.shared.inventory.reconfigure(&new.inventory);
        crate::logging::set_level(&new.log.level);
        self.shared.set_config(new);
        Ok(())
    }
}

/// Connections the kernel may hold before the accept loop takes them (capped by
/// `net.core.somaxconn`): a farm's miners reconnect all at once after a power cut or a restart.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts miners on one listener until `shutdown` resolves; with `tls`, each connection's TLS
/// handshake runs in its own task.
async fn accept_loop(
    listener: &TcpListener,
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    shutdown: impl Future<Output = ()>,
    tls: Option<TlsAcceptor>,
) {
    tokio::pin!(shutdown);
    // The trusted networks as of the config in force; parsed again only after a reload.
    let mut config = shared.config();
    let mut trusted = config.server.proxy_protocol.then(|| config.server.proxy_protocol_trusted());
    let door = Arc::new(DoorLogs::default());
    let mut error_log = RateLimitedLog::new(Duration::from_secs(10));
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    if let Some(suppressed) = error_log.allow() {
                        tracing::warn!(error = %e, suppressed, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        counter!(m::CONNECTIONS_ACCEPTED).increment(1);
        let _ = stream.set_nodelay(true);
        let current = shared.config();
        set_keepalive(&stream, current.upstream.keepalive());
        if !Arc::ptr_eq(&current, &config) {
            config = current;
            trusted = config.server.proxy_protocol.then(|| config.server.proxy_protocol_trusted());
        }
        match &trusted {
            None => {
                if let Some(registration) = register(shared, peer, &door) {
                    tracker.spawn(serve(shared.clone(), stream, registration, tls.clone()));
                }
            }
            Some(trusted) if trusted.contains(peer.ip()) => {
                // The header is read in the connection's own task: the accept loop never waits
                // on a peer.
                tracker.spawn(serve_proxied(shared.clone(), stream, peer, door.clone(), tls.clone()));
            }
            Some(_) => {
                door.refuse(Refusal::UntrustedProxy, peer, &"not in server.proxy_protocol_trusted");
                drop(stream);
            }
        }
    }
}

/// Registers a connection under `peer`, the address its limits and logs go by; `None` (counted
/// and logged) when a connection limit refuses it.
fn register(shared: &Shared, peer: SocketAddr, door: &DoorLogs) -> Option<Registration> {
    match shared.registry.register(peer) {
        Ok(registration) => {
            gauge!(m::CONNECTIONS_ACTIVE).increment(1.0);
            Some(registration)
        }
        Err(refusal) => {
            door.refuse(refusal, peer, &"limit reached");
            None
        }
    }
}

/// A connection from a trusted load balancer `lb`: reads its PROXY header within
/// `handshake_timeout`, then registers and serves it as the client the header names, so the
/// registry, the per-IP limit, the auth backoff and the logs all see the miner, not the balancer.
/// The registry's own handshake deadline starts at registration, after the header.
async fn serve_proxied(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    lb: SocketAddr,
    door: Arc<DoorLogs>,
    tls: Option<TlsAcceptor>,
) {
    let deadline = shared.config().server.handshake_timeout();
    let read = tokio::select! {
        biased;
        _ = shared.shutdown.cancelled() => return,
        read = tokio::time::timeout(deadline, proxy_protocol::read_header(&mut stream)) => read,
    };
    let client = match read {
        Ok(Ok(Header { source: Some(client), .. })) => client,
        Ok(Ok(Header { source: None, .. })) => {
            tracing::debug!(%lb, "PROXY header without a client (a health check); closing");
            return;
        }
        Ok(Err(HeaderError::Empty)) => {
            tracing::debug!(%lb, "closed before a PROXY header");
            return;
        }
        Ok(Err(e @ (HeaderError::Io(_) | HeaderError::Truncated))) => {
            counter!(m::CONNECTIONS_REJECTED, "reason" => Refusal::BadProxyHeader.as_str()).increment(1);
            tracing::debug!(%lb, error = %e, "connection lost inside the PROXY header");
            return;
        }
        Ok(Err(e)) => {
            door.refuse(Refusal::BadProxyHeader, lb, &e);
            return;
        }
        Err(_) => {
            door.refuse(Refusal::BadProxyHeader, lb, &format_args!("no PROXY header within {deadline:?}"));
            return;
        }
    };
    tracing::debug!(%lb, %client, "PROXY header read");
    if let Some(registration) = register(&shared, client, &door) {
        serve(shared, stream, registration, tls).await;
    }
}

/// Serves a registered connection, after its TLS handshake on the TLS listener. A handshake
/// that fails or outlasts `handshake_timeout` closes the connection and is counted.
async fn serve(shared: Arc<Shared>, stream: TcpStream, registration: Registration, tls: Option<TlsAcceptor>) {
    match tls {
        None => connection::serve(shared, stream, registration).await,
        // Boxed: the TLS handshake's state is large, and a plain connection's task must not carry it.
        Some(acceptor) => Box::pin(serve_tls(shared, stream, registration, acceptor)).await,
    }
}

async fn serve_tls(shared: Arc<Shared>, stream: TcpStream, registration: Registration, acceptor: TlsAcceptor) {
    let deadline = shared.config().server.handshake_timeout();
    let handshake = tokio::select! {
        biased;
        _ = shared.shutdown.cancelled() => return,
        handshake = tokio::time::timeout(deadline, acceptor.accept(stream)) => handshake,
    };
    match handshake {
        Ok(Ok(stream)) => connection::serve(shared, stream, registration).await,
        Ok(Err(e)) => {
            counter!(m::CONNECTIONS_REJECTED, "reason" => Refusal::TlsHandshake.as_str()).increment(1);
            tracing::debug!(peer = %registration.handle.peer, error = %e, "TLS handshake failed");
        }
        Err(_) => {
            counter!(m::CONNECTIONS_REJECTED, "reason" => Refusal::TlsHandshake.as_str()).increment(1);
            tracing::debug!(peer = %registration.handle.peer, "no TLS handshake within handshake_timeout");
        }
    }
}

/// Rate-limited warnings for connections closed at the door, shared with the tasks that read
/// PROXY headers. A flood of refusals must not become a flood of log lines.
struct DoorLogs {
    limits: Mutex<RateLimitedLog>,
    proxy: Mutex<RateLimitedLog>,
}

impl Default for DoorLogs {
    fn default() -> Self {
        let period = Duration::from_secs(10);
        Self { limits: Mutex::new(RateLimitedLog::new(period)), proxy: Mutex::new(RateLimitedLog::new(period)) }
    }
}

impl DoorLogs {
    /// Counts a refusal and logs it unless one was logged within the period.
    fn refuse(&self, refusal: Refusal, peer: SocketAddr, why: &dyn std::fmt::Display) {
        counter!(m::CONNECTIONS_REJECTED, "reason" => refusal.as_str()).increment(1);
        let reason = refusal.as_str();
        match refusal {
            Refusal::Limit | Refusal::PerIp => {
                if let Some(suppressed) = lock(&self.limits).allow() {
                    tracing::warn!(%peer, limit = reason, suppressed, "connection limit reached; closing new connections");
                }
            }
            Refusal::UntrustedProxy | Refusal::BadProxyHeader => {
                if let Some(suppressed) = lock(&self.proxy).allow() {
                    tracing::warn!(%peer, reason, error = %why, suppressed, "PROXY protocol: closing connection");
                }
            }
            // Counted where the handshake runs; a failed handshake is the client's affair.
            Refusal::TlsHandshake => tracing::debug!(%peer, error = %why, "TLS handshake failed"),
        }
    }
}

/// The logs' state stays valid even if a holder panicked: it is two plain numbers.
fn lock(log: &Mutex<RateLimitedLog>) -> std::sync::MutexGuard<'_, RateLimitedLog> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

/// Evicts sessions past their deadlines (see [`Deadlines`]), and keeps the readiness gauge current.
async fn cleanup(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(CLEANUP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let config = shared.config();
        let server = &config.server;
        let evicted = shared.registry.evict_expired(&Deadlines::of(server));
        shared.auth.prune(Instant::now());
        if evicted > 0 {
            tracing::debug!(evicted, "evicting expired sessions");
        }
        let ready = match &shared.aggregator {
            Some(aggregator) => aggregator.ready(),
            None => shared.pools.any_up(),
        };
        gauge!(m::READY).set(if ready { 1.0 } else { 0.0 });
    }
}

/// Lets a repeated warning through at most once per period, counting what it held back.
struct RateLimitedLog {
    period: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn new(period: Duration) -> Self {
        Self { period, last: None, suppressed: 0 }
    }

    /// `Some(suppressed since the last one)` when this occurrence may be logged.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|last| now.duration_since(last) < self.period) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limited_log() {
        let mut log = RateLimitedLog::new(Duration::from_secs(10));
        assert_eq!(log.allow(), Some(0));
        assert_eq!(log.allow(), None);
        assert_eq!(log.allow(), None);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(log.allow(), Some(2));
    }
}
