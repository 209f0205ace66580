//! One task per miner connection: reads lines from the miner and the pool, feeds them to the
//! [`Session`], writes out what it produces, and reports to the registry and the managers.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use metrics::{counter, gauge};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{field, Instrument};

use crate::auth::AuthManager;
use crate::codec::{FrameError, LineCodec};
use crate::config::Config;
use crate::metrics as m;
use crate::protocol::{code, miner, write, Id};
use crate::registry::{CloseReason, ConnectionManager, Control, Phase, Registration, SessionHandle};
use crate::session::{Event, Output, Session};
use crate::submissions::SubmissionManager;
use crate::upstream::{PoolSet, Upstream};

/// What every connection task shares.
#[derive(Debug)]
pub struct Shared {
    pub config: Arc<Config>,
    pub registry: Arc<ConnectionManager>,
    pub pools: Arc<PoolSet>,
    pub auth: Arc<AuthManager>,
    pub submissions: SubmissionManager,
    /// Cancelled on SIGINT/SIGTERM: sessions stop reading and drain their in-flight requests.
    pub shutdown: CancellationToken,
}

/// Read buffer a miner connection starts with; it grows to the line cap only when a line needs it.
const READ_BUFFER: usize = 512;

/// Serves one miner until it leaves, is evicted, or the proxy shuts down.
pub async fn serve(shared: Arc<Shared>, stream: TcpStream, mut registration: Registration) {
    let handle = registration.handle.clone();
    let control = registration.take_control();
    let span = tracing::info_span!("miner", peer = %handle.peer, session = handle.id, worker = field::Empty);
    let reason = run(&shared, stream, &handle, control).instrument(span.clone()).await;
    span.in_scope(|| match reason {
        CloseReason::MinerClosed | CloseReason::Shutdown => tracing::debug!(reason = reason.as_str(), "closed"),
        _ => tracing::info!(reason = reason.as_str(), "closed"),
    });
    counter!(m::CONNECTIONS_CLOSED, "reason" => reason.as_str()).increment(1);
    gauge!(m::CONNECTIONS_ACTIVE).decrement(1.0);
    drop(registration);
}

async fn run(
    shared: &Shared,
    stream: TcpStream,
    handle: &SessionHandle,
    mut control: mpsc::Receiver<Control>,
) -> CloseReason {
    let _ = stream.set_nodelay(true);
    let (reader, writer) = stream.into_split();
    let mut miner = Miner {
        reader: FramedRead::with_capacity(reader, LineCodec::new(shared.config.server.max_line_bytes), READ_BUFFER),
        writer,
        write_timeout: shared.config.server.write_timeout(),
    };

    // The accept loop never waits on a pool; this task does, while the miner's first lines wait
    // in the socket.
    let link = tokio::select! {
        biased;
        Some(Control::Close(reason)) = control.recv() => return reason,
        _ = shared.shutdown.cancelled() => return CloseReason::Shutdown,
        link = shared.pools.connect() => link,
    };
    let Ok(link) = link else {
        return refuse(shared, &mut miner, handle, control).await;
    };
    handle.set_phase(Phase::Connected);
    handle.info().upstream = Some(link.pool().label.as_str().into());
    Driver { shared, handle, miner, link, out: Output::default() }.run(control).await
}

struct Miner {
    reader: FramedRead<tokio::net::tcp::OwnedReadHalf, LineCodec>,
    writer: OwnedWriteHalf,
    write_timeout: Duration,
}

impl Miner {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), CloseReason> {
        if bytes.is_empty() {
            return Ok(());
        }
        match timeout(self.write_timeout, self.writer.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "write to miner failed");
                Err(CloseReason::WriteFailed)
            }
            Err(_) => {
                tracing::info!("write to miner stalled past write_timeout");
                Err(CloseReason::WriteFailed)
            }
        }
    }
}

/// No pool is reachable: answer the miner's first request with an error instead of hanging it.
async fn refuse(
    shared: &Shared,
    miner: &mut Miner,
    handle: &SessionHandle,
    mut control: mpsc::Receiver<Control>,
) -> CloseReason {
    counter!(m::MINERS_REFUSED, "reason" => "no_upstream").increment(1);
    tracing::info!("no pool reachable; refusing the miner");
    handle.set_phase(Phase::Connected);
    let line = tokio::select! {
        biased;
        Some(Control::Close(reason)) = control.recv() => return reason,
        _ = shared.shutdown.cancelled() => return CloseReason::Shutdown,
        line = miner.reader.next() => line,
    };
    let Some(Ok(line)) = line else { return CloseReason::NoUpstream };
    let id = match miner::parse(&line) {
        Ok(miner::MinerMessage::Request(r)) => r.id,
        Ok(_) => Id::null(),
        Err(e) => e.id.unwrap_or_else(Id::null),
    };
    let mut buf = Vec::new();
    write::error(&mut buf, &id, code::OTHER, "no upstream pool available, retry later");
    let _ = miner.write(&buf).await;
    let _ = miner.writer.shutdown().await;
    CloseReason::NoUpstream
}

struct Driver<'a, U: Upstream> {
    shared: &'a Shared,
    handle: &'a SessionHandle,
    miner: Miner,
    link: U,
    out: Output,
}

impl<U: Upstream> Driver<'_, U> {
    async fn run(mut self, mut control: mpsc::Receiver<Control>) -> CloseReason {
        let pool = self.link.pool().config.clone();
        let mut session = Session::new(self.shared.auth.clone(), pool);
        // Set once the proxy starts shutting down: no more miner lines, only replies.
        let mut drain_deadline: Option<Instant> = None;
        loop {
            // A reason to close after this step's output is written.
            let mut close: Option<CloseReason> = None;
            tokio::select! {
                biased;
                Some(Control::Close(reason)) = control.recv() => {
                    session.on_miner_closing(&mut self.out);
                    close = Some(reason);
                }
                _ = self.shared.shutdown.cancelled(), if drain_deadline.is_none() => {
                    drain_deadline = Some(Instant::now() + self.shared.config.server.shutdown_grace());
                }
                _ = sleep_until(drain_deadline.unwrap_or_else(Instant::now)), if drain_deadline.is_some() => {
                    session.on_shutdown_deadline(&mut self.out);
                }
                line = self.link.next_line() => match line {
                    Some(Ok(line)) => session.on_pool_line(&line, Instant::now(), &mut self.out),
                    Some(Err(FrameError::TooLong(max))) => {
                        counter!(m::LINES_TOO_LONG, "source" => "pool").increment(1);
                        tracing::warn!(max, pool = %self.link.pool().label, "pool line over the cap; dropping the pool session");
                        session.on_pool_lost(&mut self.out);
                    }
                    Some(Err(FrameError::Io(e))) => {
                        tracing::info!(error = %e, "pool connection failed");
                        session.on_pool_lost(&mut self.out);
                    }
                    None => {
                        tracing::info!("pool closed the connection");
                        session.on_pool_lost(&mut self.out);
                    }
                },
                line = self.miner.reader.next(), if drain_deadline.is_none() => match line {
                    Some(Ok(line)) => {
                        self.shared.registry.touch(self.handle);
                        session.on_miner_line(&line, Instant::now(), &mut self.out);
                    }
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
            if !self.out.to_pool.is_empty() {
                if let Err(e) = self.link.send(&self.out.to_pool).await {
                    tracing::info!(error = %e, "write to pool failed");
                    // Everything in flight, this step's requests included, is answered with an error.
                    session.on_pool_lost(&mut self.out);
                }
            }
            // Accounting first, so that a miner holding its reply sees it in the metrics and the API.
            self.handle.set_phase(session.phase());
            close = close.or(self.report());
            if let Err(reason) = self.miner.write(&self.out.to_miner).await {
                close = close.or(Some(reason));
            }
            self.out.to_miner.clear();
            if let Some(reason) = close {
                return reason;
            }
            if drain_deadline.is_some() && session.pending() == 0 {
                return CloseReason::Shutdown;
            }
        }
    }

    /// Hands the step's events to the registry and the managers. Returns the session's close
    /// reason, if it ended.
    fn report(&mut self) -> Option<CloseReason> {
        let pool = &self.link.pool().label;
        let mut close = None;
        for event in self.out.events.drain(..) {
            match event {
                Event::ShareValid(share) => self.shared.submissions.validated(self.handle, pool, &share),
                Event::ShareForwarded => self.shared.submissions.forwarded(pool),
                Event::Share(outcome) => self.shared.submissions.record(self.handle, pool, &outcome),
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
