//! One task per miner connection: reads lines from the miner and the pool, feeds them to the
//! session ([`Passthrough`], or in aggregate mode `aggregate::miner`'s), writes out what it
//! produces, and reports to the registry and the managers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use metrics::{counter, gauge};
use tokio::io::AsyncWriteExt;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{field, Instrument};

use crate::aggregate::Aggregator;
use crate::auth::AuthManager;
use crate::codec::{FrameError, LineCodec};
use crate::config::{Config, Mode, ServerConfig};
use crate::metrics as m;
use crate::passthrough::Passthrough;
use crate::protocol::{code, miner, write, Id};
use crate::registry::{CloseReason, ConnectionManager, Phase, Registration, SessionHandle};
use crate::session::{Event, Output};
use crate::submissions::SubmissionManager;
use crate::upstream::{AsyncStream, NoUpstream, PoolLink, PoolSet};

/// What every connection task shares.
#[derive(Debug)]
pub struct Shared {
    /// Replaced whole by a reload; a session reads it once, when it starts.
    config: ArcSwap<Config>,
    pub registry: Arc<ConnectionManager>,
    pub pools: Arc<PoolSet>,
    pub auth: Arc<AuthManager>,
    pub submissions: SubmissionManager,
    /// Aggregate mode's pool sessions; `None` in passthrough mode.
    pub aggregator: Option<Arc<Aggregator>>,
    /// Cancelled on SIGINT/SIGTERM: sessions stop reading and drain their in-flight requests.
    pub shutdown: CancellationToken,
}

impl Shared {
    /// Everything the connections share, from a validated config. In aggregate mode the first
    /// pool session opens at once, as a task of `tracker`.
    pub fn new(config: Config, tracker: &TaskTracker) -> Self {
        let shutdown = CancellationToken::new();
        let server = &config.server;
        let pools = Arc::new(PoolSet::new(&config, shutdown.clone()));
        let auth = Arc::new(AuthManager::new(
            &config.upstream.user_template,
            Duration::from_secs(server.auth_backoff_initial),
            Duration::from_secs(server.auth_backoff_max),
        ));
        let aggregator = (config.upstream.mode == Mode::Aggregate)
            .then(|| Aggregator::start(&config, pools.clone(), auth.clone(), shutdown.clone(), tracker.clone()));
        Shared {
            registry: Arc::new(ConnectionManager::new(server.max_connections, server.max_connections_per_ip)),
            pools,
            auth,
            submissions: SubmissionManager,
            aggregator,
            shutdown,
            config: ArcSwap::from_pointee(config),
        }
    }

    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Puts a reloaded configuration in force for what starts after it.
    pub fn set_config(&self, config: Config) {
        self.config.store(Arc::new(config));
    }
}

/// Read buffer a miner connection starts with; it grows to the line cap only when a line needs it.
const READ_BUFFER: usize = 256;
/// Bytes queued for a miner's pool past which the miner is not read until the pool takes them.
const MAX_UNWRITTEN: usize = 64 * 1024;

/// Serves one miner until it leaves, is evicted, or the proxy shuts down.
pub async fn serve(shared: Arc<Shared>, stream: impl AsyncStream + 'static, registration: Registration) {
    let stream: MinerStream = Box::new(stream);
    let handle = registration.handle.clone();
    let span = tracing::info_span!("miner", peer = %handle.peer, session = handle.id, worker = field::Empty);
    let reason = run(&shared, stream, &handle).instrument(span.clone()).await;
    span.in_scope(|| match reason {
        CloseReason::MinerClosed | CloseReason::Shutdown => tracing::debug!(reason = reason.as_str(), "closed"),
        _ => tracing::info!(reason = reason.as_str(), "closed"),
    });
    counter!(m::CONNECTIONS_CLOSED, "reason" => reason.as_str()).increment(1);
    gauge!(m::CONNECTIONS_ACTIVE).decrement(1.0);
    drop(registration);
}

async fn run(shared: &Shared, stream: MinerStream, handle: &Arc<SessionHandle>) -> CloseReason {
    let config = shared.config();
    let (reader, writer) = tokio::io::split(stream);
    let reader = FramedRead::with_capacity(reader, LineCodec::new(config.server.max_line_bytes), READ_BUFFER);
    // Each mode's state lives inline in this task, so an idle miner costs one allocation of it.
    match &shared.aggregator {
        Some(aggregator) => crate::aggregate::miner::serve(shared, aggregator, &config, handle, reader, writer).await,
        None => passthrough(shared, &config, handle, reader, writer).await,
    }
}

async fn passthrough(
    shared: &Shared,
    config: &Arc<Config>,
    handle: &Arc<SessionHandle>,
    mut reader: MinerReader,
    writer: WriteHalf<MinerStream>,
) -> CloseReason {
    let server = &config.server;
    // Until the first line, a connection holds only this small future and its read half.
    let first = match first_line(shared, handle, &mut reader).await {
        Ok(first) => first,
        Err(reason) => return reason,
    };
    let link = match unless_closed(shared, handle, Box::pin(shared.pools.connect())).await {
        Ok(link) => link,
        Err(reason) => return reason,
    };
    let mut outbox = Outbox::new(writer, handle);
    let reason = match link {
        Err(NoUpstream) => refuse(&first, &mut outbox, server),
        Ok(link) => {
            handle.set_phase(Phase::Connected, shared.registry.now_ms());
            handle.info().upstream = Some(link.pool().label.as_str().into());
            let limiter = RateLimiter::new(server.rate_limit, server.rate_limit_burst);
            let driver = Driver {
                shared,
                config: config.clone(),
                handle,
                reader,
                outbox: &mut outbox,
                link,
                limiter,
                out: Output::default(),
            };
            // Boxed, so the session's state is allocated only for connections that get one.
            Box::pin(driver.run(first)).await
        }
    };
    outbox.close(reason, server).await;
    reason
}

/// Waits for the miner's first line; only then does the session get a pool. A socket that never
/// speaks costs the pool nothing, and the accept loop never waits on a pool: this task does.
/// `work`'s output, unless the session is asked to close or the proxy shuts down first.
pub(crate) async fn unless_closed<T>(
    shared: &Shared,
    handle: &SessionHandle,
    work: impl std::future::Future<Output = T>,
) -> Result<T, CloseReason> {
    tokio::select! {
        biased;
        reason = handle.closed() => Err(reason),
        _ = shared.shutdown.cancelled() => Err(CloseReason::Shutdown),
        output = work => Ok(output),
    }
}

pub(crate) async fn first_line(
    shared: &Shared,
    handle: &SessionHandle,
    reader: &mut MinerReader,
) -> Result<BytesMut, CloseReason> {
    let first = match unless_closed(shared, handle, reader.next()).await? {
        Some(Ok(line)) => line,
        Some(Err(FrameError::TooLong(_))) => {
            counter!(m::LINES_TOO_LONG, "source" => "miner").increment(1);
            return Err(CloseReason::LineTooLong);
        }
        Some(Err(FrameError::Io(_))) | None => return Err(CloseReason::MinerClosed),
    };
    shared.registry.touch(handle);
    Ok(first)
}

/// What a session writes to its miner through: passthrough and aggregate mode alike.
///
/// While the socket takes everything at once, a push writes straight to it, and an idle miner
/// costs nothing beyond its write half. Once the socket falls behind, a writer task takes the
/// write half and drains a queue bounded in messages and bytes, so that the session never waits
/// on a miner that does not read: past the bounds the miner is closed `slow_reader`. A write
/// stalled past `write_timeout` (or failed) closes the session through its handle,
/// `write_failed`, so the session's one close signal covers it and needs no second branch.
pub(crate) struct Outbox {
    state: OutboxState,
    handle: Arc<SessionHandle>,
}

enum OutboxState {
    Direct(WriteHalf<MinerStream>),
    Queued(Queue),
    /// A direct write failed: the socket is gone.
    Failed,
}

struct Queue {
    /// Bounded by `max_queue_messages`.
    tx: mpsc::Sender<Bytes>,
    /// Bytes queued and not yet written.
    queued: Arc<AtomicUsize>,
    /// Ends early only when a write fails or stalls.
    writer: JoinHandle<()>,
}

impl Outbox {
    pub(crate) fn new(writer: WriteHalf<MinerStream>, handle: &Arc<SessionHandle>) -> Self {
        Outbox { state: OutboxState::Direct(writer), handle: handle.clone() }
    }

    /// Sends `bytes` to the miner, taking the buffer itself: it is freed once written, so an idle
    /// session holds no output buffer. A miner whose queue is full is too slow to keep.
    pub(crate) fn push(&mut self, bytes: Vec<u8>, server: &ServerConfig) -> Result<(), CloseReason> {
        if bytes.is_empty() {
            return Ok(());
        }
        let writer = match &mut self.state {
            OutboxState::Failed => return Err(CloseReason::WriteFailed),
            OutboxState::Queued(queue) => return queue.push(Bytes::from(bytes), server.max_queue_bytes),
            OutboxState::Direct(writer) => writer,
        };
        // What the socket takes without waiting goes now. Polled once, with no waker to call:
        // whatever is left, and the wake-up, are the writer task's.
        let mut written = 0;
        while written < bytes.len() {
            match writer.write(&bytes[written..]).now_or_never() {
                Some(Ok(0)) => return self.fail(None),
                Some(Ok(n)) => written += n,
                Some(Err(e)) => return self.fail(Some(e)),
                None => break,
            }
        }
        // A TLS stream may hold back what it took until flushed.
        if written == bytes.len() {
            match writer.flush().now_or_never() {
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) => return self.fail(Some(e)),
                None => {}
            }
        }
        let OutboxState::Direct(writer) = std::mem::replace(&mut self.state, OutboxState::Failed) else {
            unreachable!("matched above")
        };
        let queue = Queue::spawn(writer, self.handle.clone(), server.max_queue_messages, server.write_timeout());
        // An empty rest still makes the writer flush.
        let rest = Bytes::from(bytes).slice(written..);
        let pushed = queue.push(rest, server.max_queue_bytes);
        self.state = OutboxState::Queued(queue);
        pushed
    }

    fn fail(&mut self, error: Option<std::io::Error>) -> Result<(), CloseReason> {
        tracing::debug!(error = ?error, "write to miner failed");
        self.state = OutboxState::Failed;
        Err(CloseReason::WriteFailed)
    }

    /// Writes out what is queued (each write bounded by `write_timeout`), then closes the socket.
    /// A miner closed for not reading (or whose writes fail) is cut at once: what is queued for it
    /// would only wait out `write_timeout`.
    pub(crate) async fn close(self, reason: CloseReason, server: &ServerConfig) {
        let cut = matches!(reason, CloseReason::SlowReader | CloseReason::WriteFailed);
        match self.state {
            OutboxState::Direct(_) if cut => {}
            OutboxState::Direct(mut writer) => {
                let _ = timeout(server.write_timeout(), writer.shutdown()).await;
            }
            OutboxState::Queued(Queue { writer, .. }) if cut => writer.abort(),
            OutboxState::Queued(Queue { tx, mut writer, .. }) => {
                drop(tx);
                if timeout(server.write_timeout(), &mut writer).await.is_err() {
                    writer.abort();
                }
            }
            OutboxState::Failed => {}
        }
    }
}

impl Queue {
    fn spawn(
        mut writer: WriteHalf<MinerStream>,
        handle: Arc<SessionHandle>,
        max_messages: usize,
        write_timeout: Duration,
    ) -> Self {
        let (tx, mut rx) = mpsc::channel::<Bytes>(max_messages);
        let queued = Arc::new(AtomicUsize::new(0));
        let writer = tokio::spawn({
            let queued = queued.clone();
            async move {
                while let Some(bytes) = rx.recv().await {
                    let write = async {
                        writer.write_all(&bytes).await?;
                        if rx.is_empty() {
                            writer.flush().await?;
                        }
                        Ok::<_, std::io::Error>(())
                    };
                    match timeout(write_timeout, write).await {
                        Ok(Ok(())) => queued.fetch_sub(bytes.len(), Ordering::AcqRel),
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "write to miner failed");
                            return handle.close(CloseReason::WriteFailed);
                        }
                        Err(_) => {
                            tracing::info!("write to miner stalled past write_timeout");
                            return handle.close(CloseReason::WriteFailed);
                        }
                    };
                }
                let _ = writer.shutdown().await;
            }
        });
        Queue { tx, queued, writer }
    }

    fn push(&self, bytes: Bytes, max_bytes: usize) -> Result<(), CloseReason> {
        if self.writer.is_finished() {
            return Err(CloseReason::WriteFailed);
        }
        if self.queued.load(Ordering::Acquire) + bytes.len() > max_bytes {
            return Err(CloseReason::SlowReader);
        }
        self.queued.fetch_add(bytes.len(), Ordering::AcqRel);
        self.tx.try_send(bytes).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => CloseReason::SlowReader,
            mpsc::error::TrySendError::Closed(_) => CloseReason::WriteFailed,
        })
    }
}

/// A token bucket over the lines a miner sends.
pub(crate) struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub(crate) fn new(rate: u32, burst: u32) -> Self {
        Self { rate: f64::from(rate), burst: f64::from(burst), tokens: f64::from(burst), last: Instant::now() }
    }

    /// Takes a token for one line; false when the miner is past its rate and burst.
    pub(crate) fn allow(&mut self, now: Instant) -> bool {
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// No pool is reachable: answer the miner's first request with an error instead of hanging it.
fn refuse(line: &[u8], outbox: &mut Outbox, server: &ServerConfig) -> CloseReason {
    let _ = outbox.push(refusal(line, "no_upstream", "no upstream pool available, retry later"), server);
    CloseReason::NoUpstream
}

/// The error that refuses a miner's first request (`line`), with its id when that can be read;
/// counted under `reason`.
pub(crate) fn refusal(line: &[u8], reason: &'static str, message: &str) -> Vec<u8> {
    counter!(m::MINERS_REFUSED, "reason" => reason).increment(1);
    tracing::info!(reason, "refusing the miner");
    let id = match miner::parse(line) {
        Ok(miner::MinerMessage::Request(r)) => r.id,
        Ok(_) => Id::null(),
        Err(e) => e.id.unwrap_or_else(Id::null),
    };
    let mut buf = Vec::new();
    write::error(&mut buf, &id, code::OTHER, message);
    buf
}

/// A miner's connection, plain TCP or TLS: boxed once, so the rest of the task is one type.
pub(crate) type MinerStream = Box<dyn AsyncStream>;
pub(crate) type MinerReader = FramedRead<ReadHalf<MinerStream>, LineCodec>;

struct Driver<'a> {
    shared: &'a Shared,
    /// The configuration the session started under.
    config: Arc<Config>,
    handle: &'a SessionHandle,
    reader: MinerReader,
    outbox: &'a mut Outbox,
    link: PoolLink,
    limiter: RateLimiter,
    out: Output,
}

impl Driver<'_> {
    async fn run(mut self, first: BytesMut) -> CloseReason {
        let mut session = Passthrough::new(self.shared.auth.clone(), self.link.pool().clone(), self.handle.peer.ip());
        let started = Instant::now();
        let job_timeout = self.config.upstream.job_timeout();
        let submit_timeout = self.config.upstream.submit_timeout();
        // Set once the proxy starts shutting down: no more miner lines, only replies.
        let mut drain_deadline: Option<Instant> = None;
        let mut first = Some(first);
        loop {
            let job_deadline = session.last_notify().unwrap_or(started) + job_timeout;
            let answer_deadline = session.oldest_waiting().map(|sent| sent + submit_timeout);
            // A reason to close after this step's output is written.
            let mut close: Option<CloseReason> = None;
            if let Some(line) = first.take() {
                self.miner_line(&mut session, &line, &mut close);
            } else {
                tokio::select! {
                    biased;
                    reason = self.handle.closed() => {
                        session.on_miner_closing(&mut self.out);
                        close = Some(reason);
                    }
                    _ = self.shared.shutdown.cancelled(), if drain_deadline.is_none() => {
                        drain_deadline = Some(Instant::now() + self.config.server.shutdown_grace());
                    }
                    _ = sleep_until(drain_deadline.unwrap_or_else(Instant::now)), if drain_deadline.is_some() => {
                        session.on_shutdown_deadline(&mut self.out);
                    }
                    _ = sleep_until(job_deadline) => {
                        tracing::warn!(pool = %self.link.pool().label, ?job_timeout, "no job from the pool; dropping the pool session");
                        session.on_job_timeout(&mut self.out);
                    }
                    _ = sleep_until(answer_deadline.unwrap_or(job_deadline)), if answer_deadline.is_some() => {
                        session.on_answer_timeout(Instant::now(), submit_timeout, &mut self.out);
                    }
                    line = self.link.next_line() => match line {
                        Some(Ok(line)) => session.on_pool_line(&line, Instant::now(), &mut self.out),
                        Some(Err(FrameError::TooLong(max))) => {
                            counter!(m::LINES_TOO_LONG, "source" => "pool").increment(1);
                            tracing::warn!(max, pool = %self.link.pool().label, "pool line over the cap");
                            session.on_pool_line_too_long(&mut self.out);
                        }
                        Some(Err(FrameError::Io(e))) => {
                            tracing::info!(error = %e, "pool connection failed");
                            self.link.pool().connection_lost();
                            session.on_pool_lost(&mut self.out);
                        }
                        None => {
                            tracing::info!("pool closed the connection");
                            self.link.pool().connection_lost();
                            session.on_pool_lost(&mut self.out);
                        }
                    },
                    // While the pool does not take what is queued, the miner waits: TCP pushes back.
                    line = self.reader.next(), if drain_deadline.is_none() && self.link.unwritten() < MAX_UNWRITTEN => match line {
                        Some(Ok(line)) => self.miner_line(&mut session, &line, &mut close),
                        Some(Err(FrameError::TooLong(max))) => {
                            counter!(m::LINES_TOO_LONG, "source" => "miner").increment(1);
                            tracing::info!(max, "miner line over the cap");
                            session.on_miner_closing(&mut self.out);
                            close = Some(CloseReason::LineTooLong);
                        }
                        Some(Err(FrameError::Io(_))) | None => {
                            // Nobody is left to answer; the shares in flight are still accounted for.
                            session.on_miner_closing(&mut self.out);
                            self.report();
                            return CloseReason::MinerClosed;
                        }
                    },
                }
            }
            // Written while the pool is awaited; a pool that stops reading fails in `next_line`.
            self.link.queue(&self.out.to_pool);
            // Accounting first, so that a miner holding its reply sees it in the metrics and the API.
            self.handle.set_phase(session.phase(), self.shared.registry.now_ms());
            close = close.or(self.report());
            if let Err(reason) = self.outbox.push(std::mem::take(&mut self.out.to_miner), &self.config.server) {
                close = close.or(Some(reason));
            }
            if let Some(reason) = close {
                return reason;
            }
            if drain_deadline.is_some() && session.pending() == 0 {
                return CloseReason::Shutdown;
            }
        }
    }

    /// One line from the miner, within its rate limit.
    fn miner_line(&mut self, session: &mut Passthrough, line: &[u8], close: &mut Option<CloseReason>) {
        let now = Instant::now();
        self.shared.registry.touch(self.handle);
        if self.limiter.allow(now) {
            session.on_miner_line(line, now, &mut self.out);
        } else {
            tracing::info!("miner past its message rate limit");
            session.on_miner_closing(&mut self.out);
            *close = Some(CloseReason::RateLimited);
        }
    }

    /// Hands the step's events to the registry and the managers. Returns the session's close
    /// reason, if it ended.
    fn report(&mut self) -> Option<CloseReason> {
        let pool = self.link.pool();
        let label = &pool.label;
        let mut close = None;
        for event in self.out.events.drain(..) {
            match event {
                Event::PoolFault(reason) => {
                    counter!(m::UPSTREAM_FAULTS, "pool" => label.clone(), "reason" => reason).increment(1);
                    tracing::warn!(pool = %label, reason, "pool fault; dropping the pool session");
                    pool.report_fault();
                }
                Event::PoolReconnect { host, port } => {
                    pool.reconnect_requested(host.as_deref(), port, self.config.upstream.allow_pool_redirect)
                }
                Event::ShareValid(share) => self.shared.submissions.validated(self.handle, &pool.metric_label, &share),
                Event::ShareRefused(reason) => self.shared.submissions.refused(self.handle, &pool.metric_label, reason),
                Event::PoolVerdict(verdict, rtt) => {
                    self.shared.submissions.pool_verdict(self.handle, &pool.metric_label, verdict, rtt)
                }
                Event::Authorized(worker) => {
                    tracing::Span::current().record("worker", field::display(&worker));
                    tracing::debug!(%worker, "authorized");
                    self.handle.info().worker = Some(worker);
                }
                Event::Difficulty(d) => self.handle.info().difficulty = Some(d),
                Event::Close(reason) => close = Some(reason),
            }
        }
        self.out.to_pool.clear();
        close
    }
}
