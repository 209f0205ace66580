//! The way out to a miner, shared by both modes: straight to the socket while it keeps up, a
//! bounded queue and a writer task of its own once it falls behind.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use tokio::io::{AsyncWriteExt, WriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::config::ServerConfig;
use crate::registry::{CloseReason, SessionHandle};
use crate::server::connection::MinerStream;

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
