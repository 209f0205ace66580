//! Pools: their health, the backoff while they are unreachable, and the [`PoolLink`] a pool
//! session talks to its pool through.

use std::io;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use futures::{FutureExt, StreamExt};
use metrics::{counter, gauge, SharedString};
use rand::Rng;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{sleep_until, Instant};
use tokio_rustls::TlsConnector;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::codec::{FrameError, LineCodec};
use crate::config::{Config, PoolConfig, PoolUrl};
use crate::handshake::handshake;
use crate::metrics as m;
use crate::pool_session::PoolSession;
use crate::submissions::ShareMetrics;

/// Read buffer a pool connection starts with; it grows to the line cap only when a line needs it.
const READ_BUFFER: usize = 1024;
/// An output buffer larger than this is freed once written, not kept for the next line.
const KEPT_OUTPUT: usize = 4096;

/// One connection to a pool. What is queued for the pool is written while the next line is
/// awaited, so that a pool that blocks on writing its replies still has them read, and a pool
/// that stops reading fails the link after `write_timeout` instead of holding its session.
pub struct PoolLink {
    pool: Arc<Pool>,
    /// Apart, so that the link may read and write at once.
    reader: FramedRead<ReadHalf<PoolStream>, LineCodec>,
    writer: WriteHalf<PoolStream>,
    /// Bytes queued for the pool, of which `written` are written.
    output: Vec<u8>,
    written: usize,
    /// A TLS stream may keep what it accepted buffered until flushed.
    unflushed: bool,
    /// When the queued bytes last made progress (or were queued).
    progress_at: Instant,
    write_timeout: Duration,
    /// A session's link, counted in `loka_upstream_sessions_active`; a probe's is not.
    session: bool,
}

/// A byte stream to a pool: TCP, or TLS over TCP.
pub trait AsyncStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncStream for T {}
type PoolStream = Box<dyn AsyncStream>;

/// How a `stratum+ssl://` pool is reached: its client configuration and the name its
/// certificate must carry. An error left by a CA file that went away is a connect failure.
#[derive(Clone)]
struct TlsTarget {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for TlsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTarget").field("name", &self.name).finish_non_exhaustive()
    }
}

impl PoolLink {
    fn new(pool: Arc<Pool>, stream: PoolStream, max_line_bytes: usize, write_timeout: Duration, session: bool) -> Self {
        let (r, writer) = tokio::io::split(stream);
        if session {
            gauge!(m::UPSTREAM_SESSIONS_ACTIVE, "pool" => pool.label.clone()).increment(1.0);
        }
        PoolLink {
            pool,
            reader: FramedRead::with_capacity(r, LineCodec::new(max_line_bytes), READ_BUFFER),
            writer,
            output: Vec::new(),
            written: 0,
            unflushed: false,
            progress_at: Instant::now(),
            write_timeout,
            session,
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Sends `bytes` to the pool: at once while nothing waits and the socket takes them, and
    /// what it does not take is queued, to be written while [`next_line`](Self::next_line) waits.
    /// A write error here is met again, and reported, by `next_line`.
    pub fn queue(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut rest = bytes;
        if self.unwritten() == 0 {
            self.progress_at = Instant::now();
            while let Some(Ok(n @ 1..)) = self.writer.write(rest).now_or_never() {
                rest = &rest[n..];
                self.unflushed = true;
                if rest.is_empty() {
                    if let Some(Ok(())) = self.writer.flush().now_or_never() {
                        self.unflushed = false;
                    }
                    return;
                }
            }
        }
        self.output.extend_from_slice(rest);
    }

    /// Bytes queued and not yet taken by the socket.
    pub fn unwritten(&self) -> usize {
        self.output.len() - self.written
    }

    /// The next line from the pool, writing what is queued meanwhile; `None` when the pool closed
    /// the connection. A write stalled past `write_timeout` is an error. Cancel-safe: each write
    /// is one `write` or `flush` call, accounted for in the same poll that completes it.
    pub async fn next_line(&mut self) -> Option<Result<BytesMut, FrameError>> {
        loop {
            if self.unwritten() == 0 && !self.unflushed {
                return self.reader.next().await;
            }
            let deadline = self.progress_at + self.write_timeout;
            let Self { reader, writer, output, written, .. } = self;
            let step = async {
                if *written < output.len() {
                    writer.write(&output[*written..]).await.map(Some)
                } else {
                    writer.flush().await.map(|()| None)
                }
            };
            tokio::select! {
                biased;
                line = reader.next() => return line,
                io = step => match io {
                    Ok(Some(0)) => return Some(Err(io::Error::from(io::ErrorKind::WriteZero).into())),
                    Ok(Some(n)) => {
                        self.written += n;
                        self.unflushed = true;
                        self.progress_at = Instant::now();
                        if self.written == self.output.len() {
                            self.written = 0;
                            self.output.clear();
                            if self.output.capacity() > KEPT_OUTPUT {
                                self.output = Vec::new();
                            }
                        }
                    }
                    Ok(None) => self.unflushed = false,
                    Err(e) => return Some(Err(e.into())),
                },
                _ = sleep_until(deadline) => {
                    let stalled = io::Error::new(io::ErrorKind::TimedOut, "write to the pool stalled past write_timeout");
                    return Some(Err(stalled.into()));
                }
            }
        }
    }
}

impl Drop for PoolLink {
    fn drop(&mut self) {
        if self.session {
            gauge!(m::UPSTREAM_SESSIONS_ACTIVE, "pool" => self.pool.label.clone()).decrement(1.0);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Health {
    /// Not tried yet: worth a try.
    Unknown = 0,
    Up = 1,
    Down = 2,
}

/// One configured pool and what the proxy knows of its health.
#[derive(Debug)]
pub struct Pool {
    pub config: Arc<PoolConfig>,
    pub url: PoolUrl,
    /// `host:port`, the `pool` label of the metrics.
    pub label: String,
    /// The same label, shared, for per-share metrics that should not allocate.
    pub metric_label: SharedString,
    health: AtomicU8,
    /// Wakes the pool's monitor when a connect fails or the pool misbehaves.
    failed: Notify,
    /// Faults since the pool last behaved; each doubles the wait before it is tried again.
    faults: AtomicU32,
    /// Faults reported by sessions, and how many of them the monitor has judged: while some are
    /// not, the pool is in doubt and other pools go first.
    fault_seq: AtomicU32,
    judged_seq: AtomicU32,
    /// A port the pool redirected the proxy to with `client.reconnect`; 0 for none.
    redirect_port: AtomicU16,
    /// `Some` for a `stratum+ssl://` pool.
    tls: Option<Result<TlsTarget, String>>,
    /// Since when the pool has been reachable without a break; `None` while it is not.
    up_since: std::sync::Mutex<Option<Instant>>,
    /// What the pool made of the shares forwarded to it, and when it last sent a job.
    pub verdicts: Verdicts,
    /// Found at the first share, once the metrics recorder is surely installed.
    share_metrics: OnceLock<ShareMetrics>,
}

/// A pool's answers to forwarded shares, its latest round trip and its latest job, for the API.
#[derive(Debug, Default)]
pub struct Verdicts {
    accepted: AtomicU64,
    rejected: AtomicU64,
    /// Microseconds: the last submit's round trip, smoothed (1/8 weight per reply).
    rtt_us: AtomicU64,
    /// Milliseconds since `EPOCH` at the last `mining.notify`; 0 for never.
    last_notify_ms: AtomicU64,
}

impl Verdicts {
    /// The pool answered a forwarded share.
    pub fn answered(&self, accepted: bool, rtt: Duration) {
        let counter = if accepted { &self.accepted } else { &self.rejected };
        counter.fetch_add(1, Ordering::Relaxed);
        let sample = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
        let old = self.rtt_us.load(Ordering::Relaxed);
        let new = if old == 0 { sample } else { old - old / 8 + sample / 8 };
        self.rtt_us.store(new.max(1), Ordering::Relaxed);
    }

    /// The pool sent a job.
    pub fn notified(&self) {
        let ms = u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX).max(1);
        self.last_notify_ms.store(ms, Ordering::Relaxed);
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// The smoothed submit round trip, once a share was answered.
    pub fn rtt(&self) -> Option<Duration> {
        Some(self.rtt_us.load(Ordering::Relaxed)).filter(|us| *us > 0).map(Duration::from_micros)
    }

    /// Time since the pool's last job, if it sent one.
    pub fn last_notify_age(&self) -> Option<Duration> {
        let ms = self.last_notify_ms.load(Ordering::Relaxed);
        (ms > 0).then(|| EPOCH.elapsed().saturating_sub(Duration::from_millis(ms)))
    }
}

static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

impl Pool {
    /// A pool from its validated configuration, not tried yet.
    pub fn new(p: &PoolConfig) -> Arc<Pool> {
        let url = PoolUrl::parse(&p.url).expect("pool URLs are validated with the config");
        let tls = url.tls.then(|| {
            let config = crate::tls::client_config(p)?;
            Ok(TlsTarget { connector: TlsConnector::from(config), name: crate::tls::server_name(&url.host)? })
        });
        Arc::new(Pool {
            metric_label: SharedString::from_shared(Arc::from(url.to_string())),
            label: url.to_string(),
            tls,
            url,
            config: Arc::new(p.clone()),
            health: AtomicU8::new(Health::Unknown as u8),
            failed: Notify::new(),
            faults: AtomicU32::new(0),
            fault_seq: AtomicU32::new(0),
            judged_seq: AtomicU32::new(0),
            redirect_port: AtomicU16::new(0),
            up_since: std::sync::Mutex::new(None),
            verdicts: Verdicts::default(),
            share_metrics: OnceLock::new(),
        })
    }

    /// The series every share for this pool moves.
    pub fn share_metrics(&self) -> &ShareMetrics {
        self.share_metrics.get_or_init(|| ShareMetrics::new(self.metric_label.clone()))
    }

    fn health(&self) -> Health {
        match self.health.load(Ordering::Acquire) {
            0 => Health::Unknown,
            1 => Health::Up,
            _ => Health::Down,
        }
    }

    pub fn is_up(&self) -> bool {
        self.health() == Health::Up
    }

    /// How long the pool has been reachable without a break.
    pub fn up_for(&self) -> Option<Duration> {
        self.up_since.lock().unwrap_or_else(|e| e.into_inner()).map(|t| t.elapsed())
    }

    /// `up`, `down` or `unknown` (not tried yet).
    pub fn state(&self) -> &'static str {
        match self.health() {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Down => "down",
        }
    }

    /// Worth a connect attempt: not known to be down.
    pub fn usable(&self) -> bool {
        self.health() != Health::Down
    }

    fn set_health(&self, health: Health) {
        let old = self.health.swap(health as u8, Ordering::AcqRel);
        if old != health as u8 || health != Health::Up {
            let mut since = self.up_since.lock().unwrap_or_else(|e| e.into_inner());
            match health {
                Health::Up => *since = since.or(Some(Instant::now())),
                _ => *since = None,
            }
        }
        gauge!(m::POOL_UP, "pool" => self.label.clone()).set(if health == Health::Up { 1.0 } else { 0.0 });
        if old != health as u8 {
            match health {
                Health::Up => tracing::info!(pool = %self.label, "pool reachable"),
                Health::Down => tracing::warn!(pool = %self.label, "pool unreachable; retrying with backoff"),
                Health::Unknown => {}
            }
        }
    }

    /// A session found the pool at fault (a bad line, no answer in time, a connect that failed).
    /// One session's fault is not the pool's health: the monitor probes the pool at once, and
    /// only the probe marks it down. Meanwhile, and for a backoff that doubles with each fault in
    /// a row, the pool is in doubt: new sessions try other pools first, so that a pool whose
    /// sessions keep failing is not hammered. Its time up restarts too, so an aggregate group
    /// that left it fails back only after `failback_after`.
    pub fn report_fault(&self) {
        self.faults.fetch_add(1, Ordering::AcqRel);
        self.fault_seq.fetch_add(1, Ordering::AcqRel);
        let mut since = self.up_since.lock().unwrap_or_else(|e| e.into_inner());
        if since.is_some() {
            *since = Some(Instant::now());
        }
        drop(since);
        self.failed.notify_one();
    }

    /// A session reported a fault that the monitor has not judged yet.
    pub fn in_doubt(&self) -> bool {
        self.fault_seq.load(Ordering::Acquire) != self.judged_seq.load(Ordering::Acquire)
    }

    /// The faults up to `seq` (a [`Pool::fault_seq`] read before a probe) are judged.
    fn judged(&self, seq: u32) {
        self.judged_seq.store(seq, Ordering::Release);
    }

    fn fault_seq(&self) -> u32 {
        self.fault_seq.load(Ordering::Acquire)
    }

    /// A session's connection to the pool ended: the monitor checks the pool at once, so that
    /// readiness and `loka_pool_up` follow a pool that died.
    pub fn connection_lost(&self) {
        self.failed.notify_one();
    }

    /// The pool sent a job: it behaves.
    pub fn behaved(&self) {
        self.faults.store(0, Ordering::Release);
    }

    /// The pool sent `client.reconnect`. A new port on the same host is honoured only when
    /// `allowed`; another host never is. Sessions opened later use the outcome.
    pub fn reconnect_requested(&self, host: Option<&str>, port: Option<u16>, allowed: bool) {
        let same_host = host.is_none_or(|h| h.eq_ignore_ascii_case(&self.url.host));
        let result = match port {
            Some(port) if allowed && same_host => {
                self.redirect_port.store(port, Ordering::Release);
                tracing::info!(pool = %self.label, port, "pool redirect honoured");
                "honoured"
            }
            Some(port) => {
                tracing::warn!(pool = %self.label, host, port, allowed, "pool redirect refused");
                "refused"
            }
            None => "same_address",
        };
        counter!(m::POOL_REDIRECTS, "pool" => self.label.clone(), "result" => result).increment(1);
    }

    fn port(&self) -> u16 {
        match self.redirect_port.load(Ordering::Acquire) {
            0 => self.url.port,
            port => port,
        }
    }

    /// Connects, and for a TLS pool completes the handshake, within `timeout`.
    async fn connect(&self, timeout: Duration, keepalive: Duration) -> io::Result<PoolStream> {
        let attempt = async {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            let mut stream = None;
            for addr in tokio::net::lookup_host((self.url.host.as_str(), self.port())).await? {
                match TcpStream::connect(addr).await {
                    Ok(s) => {
                        stream = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let stream = stream.ok_or(last)?;
            stream.set_nodelay(true)?;
            set_keepalive(&stream, keepalive);
            match &self.tls {
                None => Ok(Box::new(stream) as PoolStream),
                Some(Ok(tls)) => Ok(Box::new(tls.connector.connect(tls.name.clone(), stream).await?) as PoolStream),
                Some(Err(e)) => Err(io::Error::other(e.clone())),
            }
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
    }
}

/// TCP keepalive after `idle` of silence, so a peer that vanished without a FIN is found even
/// when nothing is being sent.
pub fn set_keepalive(stream: &TcpStream, idle: Duration) {
    let keepalive = socket2::TcpKeepalive::new().with_time(idle).with_interval(Duration::from_secs(10)).with_retries(3);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "TCP keepalive not set");
    }
}

/// Why no pool session could be opened.
#[derive(Debug, thiserror::Error)]
#[error("no pool reachable")]
pub struct NoUpstream;

/// The configured pools in priority order. A reload replaces them as one generation: sessions
/// already open keep the pool they have, new sessions get the new list.
#[derive(Debug)]
pub struct PoolSet {
    current: ArcSwap<Generation>,
    /// Parent of each generation's monitors' token.
    shutdown: CancellationToken,
}

/// One configuration's pools and how to reach them.
#[derive(Debug)]
struct Generation {
    pools: Vec<Arc<Pool>>,
    connect_timeout: Duration,
    keepalive: Duration,
    max_line_bytes: usize,
    write_timeout: Duration,
    retry_initial: Duration,
    retry_max: Duration,
    /// Stops this generation's monitors when a reload replaces it.
    retired: CancellationToken,
}

impl Generation {
    /// The pools of `config`. A pool whose [`PoolConfig`] (URL, credentials, TLS settings) is
    /// unchanged from `previous` is the same `Arc<Pool>`, with its health and verdicts: sessions
    /// on it, aggregate groups above all, see that nothing moved.
    fn new(config: &Config, retired: CancellationToken, previous: Option<&Generation>) -> Self {
        let mut kept: Vec<Option<&Arc<Pool>>> = previous.map_or_else(Vec::new, |g| g.pools.iter().map(Some).collect());
        let pools = config
            .pools
            .iter()
            .map(|p| {
                let same = kept.iter_mut().find(|k| k.is_some_and(|pool| *pool.config == *p));
                if let Some(pool) = same.and_then(Option::take) {
                    return pool.clone();
                }
                Pool::new(p)
            })
            .collect();
        Self {
            pools,
            connect_timeout: config.upstream.connect_timeout(),
            keepalive: config.upstream.keepalive(),
            max_line_bytes: config.upstream.max_line_bytes,
            write_timeout: config.server.write_timeout(),
            retry_initial: Duration::from_millis(config.upstream.retry_initial_ms),
            retry_max: Duration::from_millis(config.upstream.retry_max_ms),
            retired,
        }
    }
}

impl PoolSet {
    /// Builds the set from a validated config. Its monitors stop with `shutdown`.
    pub fn new(config: &Config, shutdown: CancellationToken) -> Self {
        let current = ArcSwap::from_pointee(Generation::new(config, shutdown.child_token(), None));
        Self { current, shutdown }
    }

    /// Replaces the pools with a reloaded configuration's and starts their monitors. A pool whose
    /// URL and credentials did not change is kept as it is; the connection settings apply to
    /// connections opened from now on.
    pub fn replace(&self, config: &Config, tracker: &TaskTracker) {
        let previous = self.current.load_full();
        let new = Generation::new(config, self.shutdown.child_token(), Some(&previous));
        let old = self.current.swap(Arc::new(new));
        old.retired.cancel();
        self.spawn_monitors(tracker);
    }

    /// Starts one monitor per pool of the current generation.
    pub fn spawn_monitors(&self, tracker: &TaskTracker) {
        let generation = self.current.load_full();
        for index in 0..generation.pools.len() {
            tracker.spawn(monitor(generation.clone(), index));
        }
    }

    /// The pools in force now, in priority order.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.current.load().pools.clone()
    }

    /// True when some pool completed its last probe.
    pub fn any_up(&self) -> bool {
        self.current.load().pools.iter().any(|p| p.is_up())
    }

    /// The pools worth a session, in the order to try them: those not known to be down, in
    /// priority order, with the ones in doubt last.
    pub fn candidates(&self) -> Vec<Arc<Pool>> {
        let mut pools: Vec<_> = self.current.load().pools.iter().filter(|p| p.usable()).cloned().collect();
        // Stable: priority order holds within each part.
        pools.sort_by_key(|p| p.in_doubt());
        pools
    }

    /// Opens a session to the first of the [candidates](Self::candidates) that takes a connect,
    /// other than `except`.
    pub async fn connect(&self, except: Option<&Arc<Pool>>) -> Result<PoolLink, NoUpstream> {
        for pool in self.candidates().iter().filter(|p| except.is_none_or(|e| !Arc::ptr_eq(p, e))) {
            if let Ok(link) = self.open(pool).await {
                return Ok(link);
            }
        }
        Err(NoUpstream)
    }

    /// Opens a connection to one pool. A failure is a fault that the pool's probe judges; a
    /// success proves nothing of its health either (a stopped pool process keeps its socket):
    /// only the probe's handshake does.
    pub async fn open(&self, pool: &Arc<Pool>) -> io::Result<PoolLink> {
        let generation = self.current.load_full();
        match pool.connect(generation.connect_timeout, generation.keepalive).await {
            Ok(stream) => {
                let (max_line_bytes, write_timeout) = (generation.max_line_bytes, generation.write_timeout);
                Ok(PoolLink::new(pool.clone(), stream, max_line_bytes, write_timeout, true))
            }
            Err(e) => {
                counter!(m::UPSTREAM_CONNECT_FAILURES, "pool" => pool.label.clone()).increment(1);
                tracing::debug!(pool = %pool.label, error = %e, "pool connect failed");
                pool.report_fault();
                Err(e)
            }
        }
    }
}

/// Watches one pool: probes it at start, again when a session loses it, and while it is down
/// retries with jittered exponential backoff until a probe succeeds. Returns when the
/// generation is retired or the proxy shuts down.
async fn monitor(generation: Arc<Generation>, index: usize) {
    let pool = generation.pools[index].clone();
    let cancel = generation.retired.clone();
    let mut delay = generation.retry_initial;
    loop {
        // Faults a probe that succeeds has judged: those reported before it began.
        let seq = pool.fault_seq();
        match pool.health() {
            Health::Unknown => {
                let Some(up) = probe_unless(&cancel, &generation, &pool).await else { return };
                if up {
                    pool.judged(seq);
                }
            }
            Health::Up => {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = pool.failed.notified() => {}
                }
                // A pool that misbehaves again and again waits longer each time.
                let faults = pool.faults.load(Ordering::Acquire).min(16);
                delay = generation.retry_initial.saturating_mul(1 << faults).min(generation.retry_max);
                // A session lost its pool, or found it at fault: is the pool still there?
                let seq = pool.fault_seq();
                let Some(up) = probe_unless(&cancel, &generation, &pool).await else { return };
                if up && pool.in_doubt() {
                    // Up, says the probe; the faults still cost the pool the backoff they earned.
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(jitter(delay)) => {}
                    }
                    pool.judged(seq);
                }
            }
            Health::Down => {
                let wait = jitter(delay);
                tracing::debug!(pool = %pool.label, ?wait, "next pool connect attempt");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                let Some(up) = probe_unless(&cancel, &generation, &pool).await else { return };
                if up {
                    pool.judged(seq);
                } else {
                    delay = (delay * 2).min(generation.retry_max);
                }
            }
        }
    }
}

/// A probe, unless `cancel` comes first (`None`): it may wait `connect_timeout` on a pool that
/// does not answer.
async fn probe_unless(cancel: &CancellationToken, generation: &Generation, pool: &Arc<Pool>) -> Option<bool> {
    tokio::select! {
        _ = cancel.cancelled() => None,
        up = probe(generation, pool) => Some(up),
    }
}

/// The pool is up when it completes a Stratum handshake (subscribe, the pool's user, a job)
/// within `connect_timeout`. One that answers the subscribe and refuses the user is up too: it is
/// not hung, and in passthrough mode miners log in with their own credentials.
async fn probe(generation: &Generation, pool: &Arc<Pool>) -> bool {
    let deadline = Instant::now() + generation.connect_timeout;
    let mut session = PoolSession::new(pool.clone(), false);
    let handshake = async {
        let stream = pool.connect(generation.connect_timeout, generation.keepalive).await.map_err(|e| e.to_string())?;
        let (max_line_bytes, write_timeout) = (generation.max_line_bytes, generation.write_timeout);
        let mut link = PoolLink::new(pool.clone(), stream, max_line_bytes, write_timeout, false);
        let mut requests = Vec::new();
        session.probe(&mut requests);
        handshake(&mut link, &mut session, requests, deadline).await
    };
    let up = match handshake.await {
        Err(e) if !(session.subscribed && session.login_refused) => {
            counter!(m::UPSTREAM_CONNECT_FAILURES, "pool" => pool.label.clone()).increment(1);
            tracing::debug!(pool = %pool.label, error = %e, "pool probe failed");
            pool.set_health(Health::Down);
            false
        }
        _ => {
            pool.set_health(Health::Up);
            true
        }
    };
    up
}

/// A delay drawn uniformly from [d/2, d], so that many proxies do not retry in step.
fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

#[cfg(test)]
mod tests;
