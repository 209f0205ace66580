//! One task per miner connection, in both modes: it reads the miner's lines and its pool side's
//! wake-ups (its own pool session's lines in passthrough, its group's work in aggregate mode),
//! feeds them to the session, writes out what it produces, and reports to the registry and the
//! managers.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use futures::{FutureExt, StreamExt};
use metrics::{counter, gauge, SharedString};
use tokio::io::ReadHalf;
use tokio::time::{sleep_until, Instant};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{field, Instrument};

use super::outbox::Outbox;
use super::side::Side;
use crate::aggregate::{Aggregator, Refused};
use crate::auth::AuthManager;
use crate::codec::{FrameError, LineCodec};
use crate::config::{Config, Mode};
use crate::inventory::Inventory;
use crate::metrics as m;
use crate::protocol::{code, miner, write, Id};
use crate::registry::{CloseReason, ConnectionManager, Registration, SessionHandle};
use crate::session::{Event, Output};
use crate::submissions::{ShareMetrics, SubmissionManager};
use crate::upstream::{AsyncStream, NoUpstream, Pool, PoolSet};

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
    /// Every worker ever authorized; told of each authorize and each close.
    pub inventory: Arc<Inventory>,
    /// Cancelled on SIGINT/SIGTERM: sessions stop reading and drain their in-flight requests.
    pub shutdown: CancellationToken,
}

impl Shared {
    /// Everything the connections share, from a validated config. In aggregate mode the first
    /// pool session opens at once, as a task of `tracker`.
    pub fn new(config: Config, inventory: Arc<Inventory>, tracker: &TaskTracker) -> Self {
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
            inventory,
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
/// Read buffer of a miner that sends lines faster than they are read.
const BUSY_READ_BUFFER: usize = 4096;
/// Buffered lines handled before their answers are written.
const MAX_BATCH: usize = 32;

/// The `pool` label of what happens while a miner's group has no pool.
pub(crate) static NO_POOL: SharedString = SharedString::const_str("none");

/// The per-share series of the miner's pool, or of [`NO_POOL`] while its group has none.
fn share_metrics(pool: Option<&Arc<Pool>>) -> &ShareMetrics {
    static NONE: OnceLock<ShareMetrics> = OnceLock::new();
    pool.map_or_else(|| NONE.get_or_init(|| ShareMetrics::new(NO_POOL.clone())), |pool| pool.share_metrics())
}

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
    // The name is cloned once per connection, so that no lock is held across the inventory's.
    let worker = handle.info().worker.clone();
    if let Some(worker) = worker {
        shared.inventory.session_closed(&handle, &worker);
    }
    drop(registration);
}

async fn run(shared: &Shared, stream: MinerStream, handle: &Arc<SessionHandle>) -> CloseReason {
    let config = shared.config();
    let server = &config.server;
    let (reader, writer) = tokio::io::split(stream);
    let mut reader = FramedRead::with_capacity(reader, LineCodec::new(server.max_line_bytes), READ_BUFFER);
    // Until the first line, a connection holds only this small future and its read half: a
    // socket that never speaks costs no pool session and no seat.
    let first = match first_line(shared, handle, &mut reader).await {
        Ok(first) => first,
        Err(reason) => return reason,
    };
    let mut outbox = Outbox::new(writer, handle);
    // The task holds every miner's state inline, so each place in it counts. Built in a block:
    // what the wait leaves behind must not keep a place while the driver runs.
    let mut driver = {
        // Boxed, so that the wait's state is held only while it lasts.
        let open = Box::pin(Side::open(shared, &config, handle));
        match unless_closed(shared, handle, open).await {
            Ok(Ok(side)) => {
                let limiter = RateLimiter::new(server.rate_limit, server.rate_limit_burst);
                let junk = RateLimiter::new(JUNK_RATE, JUNK_BURST);
                let out = Output::default();
                Ok(Driver {
                    shared,
                    config: &config,
                    handle,
                    reader,
                    outbox: &mut outbox,
                    side,
                    limiter,
                    junk,
                    out,
                    pool: None,
                })
            }
            Ok(Err(refused)) => {
                let reason = match refused {
                    Refused::NoUpstream => "no_upstream",
                    Refused::Full => "full",
                };
                let _ = outbox.push(refusal(&first, reason, &refused.to_string()), server);
                Err(CloseReason::NoUpstream)
            }
            Err(reason) => Err(reason),
        }
    };
    // Run in place: a binding of its own would keep a second place in the task.
    let reason = match &mut driver {
        Ok(driver) => driver.run(first).await,
        Err(reason) => *reason,
    };
    // The pool side is gone (a seat is free) before the last output is written.
    drop(driver);
    outbox.close(reason, server).await;
    reason
}

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

/// Waits for the miner's first line; only then does the session get a pool. The accept loop
/// never waits on a pool: this task does.
async fn first_line(
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

/// A token bucket over lines from a miner.
struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    fn new(rate: u32, burst: u32) -> Self {
        Self { rate: f64::from(rate), burst: f64::from(burst), tokens: f64::from(burst), last: Instant::now() }
    }

    fn refill(&mut self, now: Instant) {
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes `n` tokens; false when the miner is past its rate and burst.
    fn allow(&mut self, n: u32, now: Instant) -> bool {
        self.refill(now);
        self.tokens -= f64::from(n);
        self.tokens >= 0.0
    }

    /// When the next token comes, if none is left now.
    fn ready_at(&mut self, now: Instant) -> Option<Instant> {
        self.refill(now);
        (self.tokens < 1.0).then(|| now + Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
    }
}

/// Lines a second of junk (see [`Output::junk`]) a connection may send, and the burst above it,
/// before it is closed. A miner sends none of them in the normal run of work.
const JUNK_RATE: u32 = 10;
const JUNK_BURST: u32 = 100;

/// The error that refuses a miner's first request (`line`), with its id when that can be read;
/// counted under `reason`.
fn refusal(line: &[u8], reason: &'static str, message: &str) -> Vec<u8> {
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
type MinerReader = FramedRead<ReadHalf<MinerStream>, LineCodec>;

/// One miner's task: the miner's lines, its pool side's wake-ups and the timers go into the
/// session; what comes out is written, accounted and reported.
struct Driver<'a> {
    shared: &'a Shared,
    /// The configuration the session started under.
    config: &'a Config,
    handle: &'a Arc<SessionHandle>,
    reader: MinerReader,
    outbox: &'a mut Outbox,
    side: Side,
    /// Past its rate a miner is not read: TCP pushes back, and no share is lost.
    limiter: RateLimiter,
    /// Past this one the connection is closed.
    junk: RateLimiter,
    out: Output,
    /// The pool the miner's work goes to, as the registry was last told.
    pool: Option<Arc<Pool>>,
}

impl Driver<'_> {
    async fn run(&mut self, first: BytesMut) -> CloseReason {
        let mut first = Some(first);
        loop {
            // A reason to close after this step's output is written.
            let mut close: Option<CloseReason> = None;
            // Handled after the select, whose futures would otherwise be held across its await.
            let mut line = first.take();
            // A passed deadline: a silent pool is left after the select, not inside its arm.
            let mut expired = None;
            if line.is_none() {
                let due = self.side.deadline();
                let throttled = self.limiter.ready_at(Instant::now());
                let deadline = throttled.map_or(due, |t| t.min(due));
                let draining = matches!(&self.side, Side::Own(own) if own.drain_deadline.is_some());
                tokio::select! {
                    biased;
                    reason = self.handle.closed() => {
                        self.side.on_closing(&mut self.out);
                        close = Some(reason);
                    }
                    _ = self.shared.shutdown.cancelled(), if !draining => {
                        close = self.side.on_shutdown(self.config.server.shutdown_grace());
                    }
                    _ = sleep_until(deadline) => {
                        let now = Instant::now();
                        if due <= now {
                            self.side.on_deadline(now, &mut self.out);
                            expired = Some(now);
                        }
                    }
                    wake = self.side.wake() => self.side.on_wake(wake, Instant::now(), &mut self.out),
                    next = self.reader.next(), if self.side.reading() && throttled.is_none() => {
                        (line, close) = self.on_read(next);
                    }
                }
            }
            if let Some(now) = expired {
                close = close.or(self.leave_silent_pool(now).await);
            }
            // Lines the miner sent together are answered together: one write for all of them.
            let mut batch = 0;
            while let Some(next) = line.take() {
                first = self.miner_line(&next, &mut close).await;
                // Accounting first, so that a miner holding its reply sees it in the metrics and
                // the API.
                let reported = self.report();
                close = close.or(reported);
                batch += 1;
                if first.is_none() && close.is_none() && batch < MAX_BATCH {
                    (line, close) = self.buffered_line();
                }
            }
            if batch == 0 {
                let reported = self.report();
                close = close.or(reported);
            } else if !self.reader.read_buffer().is_empty() {
                // A line is left half read: the miner sent more than the buffer held, faster than
                // it is read. Its reads take more lines at once from now on. (A handshake sent in
                // one write fits the first buffer, so an idle miner keeps it.)
                let buffer = self.reader.read_buffer_mut();
                buffer.reserve(BUSY_READ_BUFFER.saturating_sub(buffer.len()));
            }
            self.side.flush(&mut self.out);
            self.handle.set_phase(self.side.phase(), self.shared.registry.now_ms());
            // The buffer goes with it, not kept: most miners are idle between jobs.
            if let Err(reason) = self.outbox.push(std::mem::take(&mut self.out.to_miner), &self.config.server) {
                close = close.or(Some(reason));
            }
            if let Some(reason) = close {
                return reason;
            }
            if self.side.drained() {
                return CloseReason::Shutdown;
            }
        }
    }

    /// What a read from the miner gave: a line, or the reason to close.
    fn on_read(&mut self, next: Option<Result<BytesMut, FrameError>>) -> (Option<BytesMut>, Option<CloseReason>) {
        match next {
            Some(Ok(line)) => (Some(line), None),
            Some(Err(FrameError::TooLong(max))) => {
                counter!(m::LINES_TOO_LONG, "source" => "miner").increment(1);
                tracing::info!(max, "miner line over the cap");
                self.side.on_closing(&mut self.out);
                (None, Some(CloseReason::LineTooLong))
            }
            // Nobody is left to answer; the shares in flight are still accounted for.
            Some(Err(FrameError::Io(_))) | None => {
                self.side.on_closing(&mut self.out);
                (None, Some(CloseReason::MinerClosed))
            }
        }
    }

    /// The next line if the read buffer already holds it and the miner may send it now: taken
    /// without a read from the socket.
    fn buffered_line(&mut self) -> (Option<BytesMut>, Option<CloseReason>) {
        let whole = self.reader.read_buffer().contains(&b'\n');
        if !whole || !self.side.reading() || self.limiter.ready_at(Instant::now()).is_some() {
            return (None, None);
        }
        // Polled once; the select polls the read again, with the task's own waker, if this one
        // found only blank lines.
        match self.reader.next().now_or_never() {
            Some(next) => self.on_read(next),
            None => (None, None),
        }
    }

    /// Passthrough, when the pool took the miner's first lines and said nothing for
    /// `connect_timeout` (hung with its socket open): the pool is reported, and the session moves
    /// to the next pool with the miner's lines; with none to move to, `submit_timeout` ends it.
    async fn leave_silent_pool(&mut self, now: Instant) -> Option<CloseReason> {
        let Side::Own(own) = &mut self.side else { return None };
        if own.silence_deadline().is_none_or(|silence| silence > now) {
            return None;
        }
        let pool = own.link.pool().clone();
        let reason = "no answer within upstream.connect_timeout";
        counter!(m::UPSTREAM_FAULTS, "pool" => pool.metric_label.clone(), "reason" => reason).increment(1);
        tracing::warn!(pool = %pool.label, reason, "pool silent; moving the session to the next pool");
        pool.report_fault();
        // Boxed: the wait's state is held only while it lasts.
        let connect = Box::pin(self.shared.pools.connect(Some(&pool)));
        match unless_closed(self.shared, self.handle, connect).await {
            Ok(Ok(link)) => own.reopen(self.shared, self.handle, link, &mut self.out),
            Ok(Err(NoUpstream)) => own.unheard = None,
            Err(reason) => {
                own.session.on_miner_closing(&mut self.out);
                return Some(reason);
            }
        }
        None
    }

    /// One line from the miner, within its rate limit. Returns a line the miner sent while its
    /// authorize waited on the pool, to be handled next.
    async fn miner_line(&mut self, line: &[u8], close: &mut Option<CloseReason>) -> Option<BytesMut> {
        self.shared.registry.touch(self.handle);
        let now = Instant::now();
        self.limiter.allow(1, now);
        self.side.on_miner_line(self.handle, line, now, &mut self.out);
        let junk = std::mem::take(&mut self.out.junk);
        if junk > 0 && !self.junk.allow(junk, now) {
            tracing::info!("miner past its junk budget (malformed lines, unknown methods or jobs, repeats)");
            self.side.on_closing(&mut self.out);
            *close = Some(CloseReason::RateLimited);
            return None;
        }
        let (Side::Member(member), false) = (&mut self.side, self.out.up.is_empty()) else { return None };
        // Boxed: a miner authorizes once or twice, and the wait's state would otherwise be part of
        // every aggregated miner's task.
        let mut authorize = Box::pin(member.authorize(self.shared, self.handle, self.config, &mut self.out));
        // The miner is watched meanwhile: one that leaves is closed as it left, not when the
        // late answer cannot be written. A line it sends waits.
        let mut next = None;
        loop {
            tokio::select! {
                biased;
                () = &mut authorize => return next,
                reason = self.handle.closed() => *close = Some(reason),
                line = self.reader.next(), if next.is_none() => match line {
                    Some(Ok(line)) => {
                        next = Some(line);
                        continue;
                    }
                    Some(Err(FrameError::TooLong(_))) => {
                        counter!(m::LINES_TOO_LONG, "source" => "miner").increment(1);
                        *close = Some(CloseReason::LineTooLong);
                    }
                    Some(Err(FrameError::Io(_))) | None => *close = Some(CloseReason::MinerClosed),
                },
            }
            return None;
        }
    }

    /// Hands the step's events to the registry and the managers. Returns the session's close
    /// reason, if it ended.
    fn report(&mut self) -> Option<CloseReason> {
        // The pool changes only with a switch: compared by pointer, not by name, on each step.
        let pool = self.side.pool();
        if pool.map(Arc::as_ptr) != self.pool.as_ref().map(Arc::as_ptr) {
            self.pool = pool.cloned();
            self.handle.info().upstream = pool.map(|p| Arc::from(p.label.as_str()));
        }
        // Looked up at a share, not on each step: the `none` series appear only once a share
        // has come without a pool.
        let current = &self.pool;
        let metrics = || share_metrics(current.as_ref());
        let (submissions, handle) = (&self.shared.submissions, self.handle);
        let mut close = None;
        // Taken, not drained: an idle miner keeps no buffer.
        for event in std::mem::take(&mut self.out.events) {
            match event {
                Event::ShareValid(share) => submissions.validated(handle, metrics(), &share),
                Event::ShareRefused(reason) => submissions.refused(handle, metrics(), reason),
                Event::PoolVerdict(verdict, rtt) => submissions.pool_verdict(handle, metrics(), verdict, rtt),
                Event::Authorized(worker) => {
                    tracing::Span::current().record("worker", field::display(&worker));
                    tracing::debug!(%worker, "authorized");
                    let previous = handle.info().worker.clone();
                    if previous.as_deref() != Some(worker.as_str()) {
                        // A second name on one connection: the session moves to it.
                        if let Some(previous) = previous {
                            self.shared.inventory.session_closed(handle, &previous);
                        }
                        self.shared.inventory.authorized(handle, &worker);
                        handle.info().worker = Some(worker);
                    }
                }
                Event::Difficulty(d) => {
                    handle.info().difficulty = Some(d);
                    if let Side::Member(member) = &mut self.side {
                        member.set_difficulty(d);
                    }
                }
                Event::Close(reason) => close = close.or(Some(reason)),
                Event::PoolFault(reason) => {
                    let Some(pool) = &self.pool else { continue };
                    counter!(m::UPSTREAM_FAULTS, "pool" => pool.metric_label.clone(), "reason" => reason).increment(1);
                    tracing::warn!(pool = %pool.label, reason, "pool fault; dropping the pool session");
                    pool.report_fault();
                }
                Event::PoolReconnect { host, port } => {
                    if let Some(pool) = &self.pool {
                        pool.reconnect_requested(host.as_deref(), port, self.config.upstream.allow_pool_redirect);
                    }
                }
            }
        }
        close
    }
}
