//! The `ConnectionManager`: a registry of live miner sessions that the accept loop, the cleanup
//! task, the managers and the HTTP API share.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use tokio::time::Instant;

use crate::submissions::{PoolTally, WorkerStats};

/// Why a miner connection ended; the `reason` label of the closed-connections metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    MinerClosed,
    Idle,
    Handshake,
    AuthorizeTimeout,
    LineTooLong,
    Malformed,
    RateLimited,
    SlowReader,
    UpstreamLost,
    PoolFault,
    NoUpstream,
    PoolReconnect,
    WriteFailed,
    NoShares,
    Shutdown,
}

impl CloseReason {
    /// Every reason, so that each `reason` series exists from start-up. Keep in sync with the enum.
    pub const ALL: [CloseReason; 15] = [
        CloseReason::MinerClosed,
        CloseReason::Idle,
        CloseReason::Handshake,
        CloseReason::AuthorizeTimeout,
        CloseReason::LineTooLong,
        CloseReason::Malformed,
        CloseReason::RateLimited,
        CloseReason::SlowReader,
        CloseReason::UpstreamLost,
        CloseReason::PoolFault,
        CloseReason::NoUpstream,
        CloseReason::PoolReconnect,
        CloseReason::WriteFailed,
        CloseReason::NoShares,
        CloseReason::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::MinerClosed => "miner_closed",
            CloseReason::Idle => "idle",
            CloseReason::Handshake => "handshake_timeout",
            CloseReason::AuthorizeTimeout => "authorize_timeout",
            CloseReason::LineTooLong => "line_too_long",
            CloseReason::Malformed => "malformed",
            CloseReason::RateLimited => "rate_limited",
            CloseReason::SlowReader => "slow_reader",
            CloseReason::UpstreamLost => "upstream_lost",
            CloseReason::PoolFault => "pool_fault",
            CloseReason::NoUpstream => "no_upstream",
            CloseReason::PoolReconnect => "pool_reconnect",
            CloseReason::WriteFailed => "write_failed",
            CloseReason::NoShares => "no_shares",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

/// Where a session is in its life, as the cleanup task and the API see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    Connecting = 0,
    Connected = 1,
    Subscribed = 2,
    Authorized = 3,
}

impl Phase {
    /// A session's phase from its progress: subscribed, and with an authorized worker.
    pub fn of(subscribed: bool, authorized: bool) -> Phase {
        match (subscribed, authorized) {
            (false, _) => Phase::Connected,
            (true, false) => Phase::Subscribed,
            (true, true) => Phase::Authorized,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Connected => "connected",
            Phase::Subscribed => "subscribed",
            Phase::Authorized => "authorized",
        }
    }
}

/// One live session as the rest of the proxy sees it. Written by its own connection task only;
/// read by the cleanup task and the API.
#[derive(Debug)]
pub struct SessionHandle {
    pub id: u64,
    pub peer: SocketAddr,
    pub connected_since: SystemTime,
    pub connected_at: Instant,
    /// Milliseconds since the registry's epoch at the last line from the miner.
    last_activity_ms: AtomicU64,
    /// Milliseconds since `connected_at` at the miner's last share, [`NO_SHARE`] before the first.
    /// Kept beside the handle's own clock, so that the managers that see shares need no registry.
    last_share_ms: AtomicU64,
    /// Milliseconds since the registry's epoch when the session reached its current phase.
    phase_since_ms: AtomicU64,
    phase: AtomicU8,
    /// A close asked for by another task: 0 for none, else 1 + the reason's index in
    /// [`CloseReason::ALL`]. The first request wins; `close_signal` wakes the session.
    close_reason: AtomicU8,
    close_signal: tokio::sync::Notify,
    /// Rarely written, briefly locked: the worker name, the upstream and the share statistics.
    info: Mutex<SessionInfo>,
    /// The pool's verdicts on this session's shares, credited by whichever task hears them.
    pub pool_verdicts: PoolTally,
}

#[derive(Debug, Default, Clone)]
pub struct SessionInfo {
    pub worker: Option<String>,
    pub upstream: Option<Arc<str>>,
    pub difficulty: Option<f64>,
    pub stats: WorkerStats,
}

impl SessionHandle {
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Connecting,
            1 => Phase::Connected,
            2 => Phase::Subscribed,
            _ => Phase::Authorized,
        }
    }

    /// Records the session's phase; `now_ms` is [`ConnectionManager::now_ms`].
    pub fn set_phase(&self, phase: Phase, now_ms: u64) {
        if self.phase.swap(phase as u8, Ordering::Relaxed) != phase as u8 {
            self.phase_since_ms.store(now_ms, Ordering::Relaxed);
        }
    }

    /// Records a share from the miner, valid or refused by the proxy's checks: either way the
    /// miner is hashing. Only `server.share_timeout` reads it.
    /// `elapsed` is the time since the connection began, which the caller has read already.
    pub fn share_seen(&self, elapsed: Duration) {
        self.last_share_ms.store(elapsed.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn info(&self) -> std::sync::MutexGuard<'_, SessionInfo> {
        // A panic while holding this lock cannot leave the plain data inside inconsistent.
        self.info.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the session to close; a close already asked for makes this one redundant.
    pub fn close(&self, reason: CloseReason) {
        let code = CloseReason::ALL.iter().position(|r| *r == reason).expect("every reason is in ALL") as u8 + 1;
        if self.close_reason.compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            // Stores a permit when the session is not waiting, so the request is never lost.
            self.close_signal.notify_one();
        }
    }

    /// The close another task asked for, if any.
    pub fn close_requested(&self) -> Option<CloseReason> {
        match self.close_reason.load(Ordering::Acquire) {
            0 => None,
            code => CloseReason::ALL.get(usize::from(code) - 1).copied(),
        }
    }

    /// Resolves when another task asks the session to close. Cancel-safe.
    pub async fn closed(&self) -> CloseReason {
        loop {
            if let Some(reason) = self.close_requested() {
                return reason;
            }
            self.close_signal.notified().await;
        }
    }
}

/// `last_share_ms` before the miner's first share.
const NO_SHARE: u64 = u64::MAX;

/// The deadlines the cleanup task holds sessions to, from `[server]`.
///
/// `idle` applies only until a worker is authorized. An authorized miner may be silent for hours
/// (a small miner at a high pool difficulty finds a share every few), so from then on its
/// liveness is the socket's: TCP keepalive finds a peer that is gone, and a write that fails or
/// stalls past `write_timeout` closes it. `share`, off unless set, is the operator's own limit
/// on an authorized miner's silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// From connecting to `mining.subscribe`.
    pub handshake: Duration,
    /// From subscribing to an authorized worker.
    pub authorize: Duration,
    /// Without a line from a miner that has no authorized worker.
    pub idle: Duration,
    /// Without a share from an authorized miner, counted from its authorize; `None` is off.
    pub share: Option<Duration>,
}

impl Deadlines {
    pub fn of(server: &crate::config::ServerConfig) -> Self {
        Self {
            handshake: server.handshake_timeout(),
            authorize: server.authorize_timeout(),
            idle: server.idle_timeout(),
            share: server.share_timeout(),
        }
    }
}

/// Why a connection was refused at the door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` are live.
    Limit,
    /// `max_connections_per_ip` are live from this address.
    PerIp,
    /// `server.proxy_protocol` is on and the connection came from outside
    /// `server.proxy_protocol_trusted`.
    UntrustedProxy,
    /// A trusted source sent no valid PROXY header in time.
    BadProxyHeader,
    /// The TLS handshake failed or did not finish within the handshake deadline.
    TlsHandshake,
}

impl Refusal {
    /// Every refusal, so that each `reason` series exists from start-up. Keep in sync with the enum.
    pub const ALL: [Refusal; 5] =
        [Refusal::Limit, Refusal::PerIp, Refusal::UntrustedProxy, Refusal::BadProxyHeader, Refusal::TlsHandshake];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Limit => "max_connections",
            Refusal::PerIp => "max_connections_per_ip",
            Refusal::UntrustedProxy => "untrusted_proxy",
            Refusal::BadProxyHeader => "bad_proxy_header",
            Refusal::TlsHandshake => "tls_handshake",
        }
    }
}

/// The registry of live sessions, with the connection limits.
#[derive(Debug)]
pub struct ConnectionManager {
    sessions: DashMap<u64, Arc<SessionHandle>>,
    /// Live connections per address, kept also while the per-IP limit is off, so that a reload
    /// that turns it on counts the connections already open.
    per_ip: DashMap<IpAddr, usize>,
    next_id: AtomicU64,
    count: AtomicUsize,
    /// Limits; a reload changes them for connections that come after it.
    max: AtomicUsize,
    /// 0: no per-IP limit.
    max_per_ip: AtomicUsize,
    epoch: Instant,
}

impl ConnectionManager {
    pub fn new(max_connections: usize, max_connections_per_ip: usize) -> Self {
        Self {
            sessions: DashMap::new(),
            per_ip: DashMap::new(),
            next_id: AtomicU64::new(1),
            count: AtomicUsize::new(0),
            max: AtomicUsize::new(max_connections),
            max_per_ip: AtomicUsize::new(max_connections_per_ip),
            epoch: Instant::now(),
        }
    }

    /// New limits, from a reloaded configuration. Connections already open stay.
    pub fn set_limits(&self, max_connections: usize, max_connections_per_ip: usize) {
        self.max.store(max_connections, Ordering::Release);
        self.max_per_ip.store(max_connections_per_ip, Ordering::Release);
    }

    /// Registers a new session, unless a connection limit is reached.
    pub fn register(self: &Arc<Self>, peer: SocketAddr) -> Result<Registration, Refusal> {
        if self.count.fetch_add(1, Ordering::AcqRel) >= self.max.load(Ordering::Acquire) {
            self.count.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Limit);
        }
        let max_per_ip = self.max_per_ip.load(Ordering::Acquire);
        let mut n = self.per_ip.entry(peer.ip()).or_insert(0);
        if max_per_ip > 0 && *n >= max_per_ip {
            drop(n);
            self.count.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::PerIp);
        }
        *n += 1;
        drop(n);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let handle = Arc::new(SessionHandle {
            id,
            peer,
            connected_since: SystemTime::now(),
            connected_at: Instant::now(),
            last_activity_ms: AtomicU64::new(self.now_ms()),
            last_share_ms: AtomicU64::new(NO_SHARE),
            phase_since_ms: AtomicU64::new(self.now_ms()),
            phase: AtomicU8::new(Phase::Connecting as u8),
            close_reason: AtomicU8::new(0),
            close_signal: tokio::sync::Notify::new(),
            info: Mutex::new(SessionInfo::default()),
            pool_verdicts: PoolTally::default(),
        });
        self.sessions.insert(id, handle.clone());
        Ok(Registration { manager: self.clone(), handle })
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the live handles, for the API.
    pub fn snapshot(&self) -> Vec<Arc<SessionHandle>> {
        let mut v: Vec<_> = self.sessions.iter().map(|e| e.value().clone()).collect();
        v.sort_by_key(|h| h.id);
        v
    }

    pub fn touch(&self, handle: &SessionHandle) {
        handle.last_activity_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Closes the sessions past one of `deadlines`. Returns how many were asked to close.
    pub fn evict_expired(&self, deadlines: &Deadlines) -> usize {
        let now = Instant::now();
        let now_ms = self.now_ms();
        let mut evicted = 0;
        for entry in self.sessions.iter() {
            let h = entry.value();
            let phase = h.phase();
            let in_phase_ms = now_ms.saturating_sub(h.phase_since_ms.load(Ordering::Relaxed));
            let silent_ms = now_ms.saturating_sub(h.last_activity_ms.load(Ordering::Relaxed));
            let reason = if phase < Phase::Subscribed && now.duration_since(h.connected_at) >= deadlines.handshake {
                Some(CloseReason::Handshake)
            } else if phase == Phase::Subscribed && in_phase_ms >= millis(deadlines.authorize) {
                Some(CloseReason::AuthorizeTimeout)
            } else if phase < Phase::Authorized && silent_ms >= millis(deadlines.idle) {
                Some(CloseReason::Idle)
            } else if phase == Phase::Authorized
                && deadlines.share.is_some_and(|share| {
                    // From the authorize, or from the last share if one came since.
                    let since_share = match h.last_share_ms.load(Ordering::Relaxed) {
                        NO_SHARE => u64::MAX,
                        at => (now.duration_since(h.connected_at).as_millis() as u64).saturating_sub(at),
                    };
                    in_phase_ms.min(since_share) >= millis(share)
                })
            {
                Some(CloseReason::NoShares)
            } else {
                None
            };
            if let Some(reason) = reason {
                h.close(reason);
                evicted += 1;
            }
        }
        evicted
    }

    /// Milliseconds since the registry was made, on tokio's clock.
    pub fn now_ms(&self) -> u64 {
        Instant::now().duration_since(self.epoch).as_millis() as u64
    }

    fn remove(&self, id: u64) {
        let Some((_, handle)) = self.sessions.remove(&id) else { return };
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.per_ip.remove_if_mut(&handle.peer.ip(), |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

/// A registered session; dropping it removes the session from the registry.
#[derive(Debug)]
pub struct Registration {
    manager: Arc<ConnectionManager>,
    pub handle: Arc<SessionHandle>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.manager.remove(self.handle.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    #[test]
    fn limit_is_enforced_and_released() {
        let m = Arc::new(ConnectionManager::new(2, 0));
        let a = m.register(peer()).unwrap();
        let _b = m.register(peer()).unwrap();
        assert_eq!(m.register(peer()).unwrap_err(), Refusal::Limit);
        assert_eq!(m.len(), 2);
        drop(a);
        assert_eq!(m.len(), 1);
        assert!(m.register(peer()).is_ok());
    }

    #[test]
    fn per_ip_limit() {
        let m = Arc::new(ConnectionManager::new(10, 2));
        let other: SocketAddr = "127.0.0.2:1".parse().unwrap();
        let a = m.register(peer()).unwrap();
        let _b = m.register(peer()).unwrap();
        assert_eq!(m.register(peer()).unwrap_err(), Refusal::PerIp);
        let _o = m.register(other).unwrap();
        drop(a);
        let _c = m.register(peer()).unwrap();
        assert_eq!(m.len(), 3);
        drop(_c);
        drop(_b);
        assert!(!m.per_ip.contains_key(&peer().ip()), "entries are freed with their last connection");
    }

    /// The defaults, with `share_timeout` as given.
    fn deadlines(share: Option<u64>) -> Deadlines {
        Deadlines {
            handshake: Duration::from_secs(15),
            authorize: Duration::from_secs(30),
            idle: Duration::from_secs(600),
            share: share.map(Duration::from_secs),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn eviction_by_handshake_and_idle() {
        let m = Arc::new(ConnectionManager::new(10, 0));
        let fresh = m.register(peer()).unwrap();
        let connected = m.register(peer()).unwrap();
        connected.handle.set_phase(Phase::Connected, m.now_ms());
        let authorized = m.register(peer()).unwrap();
        authorized.handle.set_phase(Phase::Authorized, m.now_ms());
        // A handshake deadline past the idle one, so that only the idle deadline can apply.
        let d_long_handshake = Deadlines { handshake: Duration::from_secs(3600), ..deadlines(None) };

        tokio::time::advance(Duration::from_secs(14)).await;
        assert_eq!(m.evict_expired(&d_long_handshake), 0);
        assert_eq!(m.evict_expired(&deadlines(None)), 0);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(m.evict_expired(&deadlines(None)), 2);
        assert_eq!(fresh.handle.close_requested(), Some(CloseReason::Handshake));
        assert_eq!(connected.handle.close_requested(), Some(CloseReason::Handshake));
        drop((fresh, connected));

        // Idle applies until authorized; an authorized miner is never closed for silence.
        let unauthorized = m.register(peer()).unwrap();
        unauthorized.handle.set_phase(Phase::Connected, m.now_ms());
        m.touch(&unauthorized.handle);
        tokio::time::advance(Duration::from_secs(599)).await;
        assert_eq!(m.evict_expired(&d_long_handshake), 0);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(m.evict_expired(&d_long_handshake), 1);
        assert_eq!(unauthorized.handle.closed().await, CloseReason::Idle);
        tokio::time::advance(Duration::from_secs(6 * 3600)).await;
        m.evict_expired(&d_long_handshake);
        assert_eq!(authorized.handle.close_requested(), None, "silent for hours, and authorized");
    }

    #[tokio::test(start_paused = true)]
    async fn share_timeout_runs_from_authorize_and_from_each_share() {
        let m = Arc::new(ConnectionManager::new(10, 0));
        let r = m.register(peer()).unwrap();
        r.handle.set_phase(Phase::Subscribed, m.now_ms());
        tokio::time::advance(Duration::from_secs(20)).await;
        r.handle.set_phase(Phase::Authorized, m.now_ms());
        let d = deadlines(Some(60));

        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(m.evict_expired(&d), 0, "counted from the authorize, not from the connect");
        r.handle.share_seen(Instant::now().duration_since(r.handle.connected_at));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(m.evict_expired(&d), 0, "a share restarts it");
        assert_eq!(m.evict_expired(&deadlines(None)), 0);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(m.evict_expired(&deadlines(None)), 0, "off by default");
        assert_eq!(m.evict_expired(&d), 1);
        assert_eq!(r.handle.closed().await, CloseReason::NoShares);
    }

    #[tokio::test(start_paused = true)]
    async fn authorize_deadline_runs_from_subscribe() {
        let m = Arc::new(ConnectionManager::new(10, 0));
        let r = m.register(peer()).unwrap();
        let evict = || m.evict_expired(&deadlines(None));
        tokio::time::advance(Duration::from_secs(10)).await;
        r.handle.set_phase(Phase::Subscribed, m.now_ms());
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(evict(), 0);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(evict(), 1);
        assert_eq!(r.handle.close_requested(), Some(CloseReason::AuthorizeTimeout));
        // The first request wins.
        r.handle.close(CloseReason::Idle);
        assert_eq!(r.handle.closed().await, CloseReason::AuthorizeTimeout);
    }
}
