//! Delivers worker state changes to the operator's webhook: coalesced over a window, one summary
//! past `webhook_max_events`, rate-limited, and retried with backoff.
//!
//! [`Notifier::send`] never waits: it offers the event to a bounded queue and counts it as
//! dropped when the queue is full; the next POST reports the drop. One task ([`spawn`]) drains the
//! queue into a [`Batch`](payload::Batch), which is itself bounded, and POSTs it when its window
//! closes, while an earlier POST may still be retrying. On cancel it sends what it holds, within
//! [`Settings::flush_grace`].
//!
//! `http`: one POST and what its answer means; `payload`: the JSON and its `text`.

mod http;
mod payload;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use metrics::counter;
use rand::Rng;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;

pub use self::http::{Attempt, Endpoint};
pub(crate) use self::payload::serialize_time;
use self::payload::Batch;
use crate::config::NotifyConfig;
use crate::metrics::{WEBHOOK_EVENTS, WEBHOOK_POSTS};

/// Events waiting for the notifier's task. It drains them as they come, so the queue fills only
/// when the task is starved; past it events are counted, not kept.
pub const QUEUE: usize = 4096;

/// The inventory's worker states and changes of state: what the notifier delivers.
pub use crate::inventory::{Transition as Event, WorkerState};

impl Event {
    /// Whether the operator is told: a worker going offline or stale, or coming back online from
    /// either. `never_seen` is a worker not seen since the proxy started, or a new one: its first
    /// authorize is not news, and the proxy's restart must not page anyone.
    pub fn is_notable(&self) -> bool {
        use WorkerState::{Offline, Online, Stale};
        self.from != self.to && matches!((self.from, self.to), (_, Offline | Stale) | (Offline | Stale, Online))
    }
}

/// The notifier's settings, in the units it works in; [`Settings::from_config`] reads them from
/// the `[notify]` section.
#[derive(Clone)]
pub struct Settings {
    pub endpoint: Endpoint,
    pub timeout: Duration,
    pub coalesce: Duration,
    pub max_events: usize,
    pub min_interval: Duration,
    pub retries: u32,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Time the task has on cancel to finish a POST under way and send what it holds.
    pub flush_grace: Duration,
}

impl Settings {
    /// The settings of `[notify]`; `None` while `webhook_url` is empty (off). The error is the
    /// reason the URL or the CA file cannot be used.
    pub fn from_config(config: &NotifyConfig) -> Result<Option<Self>, String> {
        if config.webhook_url.is_empty() {
            return Ok(None);
        }
        let timeout = Duration::from_secs(config.webhook_timeout);
        Ok(Some(Self {
            endpoint: Endpoint::parse(&config.webhook_url, &config.webhook_ca_file)?,
            timeout,
            coalesce: Duration::from_secs(config.webhook_coalesce),
            max_events: config.webhook_max_events,
            min_interval: Duration::from_secs(config.webhook_min_interval),
            retries: config.webhook_retries,
            retry_initial: Duration::from_millis(config.webhook_retry_initial_ms),
            retry_max: Duration::from_millis(config.webhook_retry_max_ms),
            // One attempt's worth: shutdown waits for the webhook no longer than for one POST.
            flush_grace: timeout,
        }))
    }
}

/// The sending side, cheap to clone. When every clone is dropped, the task sends what it holds
/// and ends, as on cancel.
#[derive(Clone)]
pub struct Notifier {
    queue: Option<mpsc::Sender<Event>>,
    /// Events that found the queue full, taken by the task into its next batch.
    dropped: Arc<AtomicU64>,
}

impl Notifier {
    /// A notifier that sends nothing, for when no webhook is configured.
    pub fn off() -> Self {
        Self { queue: None, dropped: Arc::default() }
    }

    /// `count` events never reached the notifier: the next POST is a summary that counts them.
    pub fn lost(&self, count: u64) {
        if self.queue.is_some() {
            self.dropped.fetch_add(count, Ordering::Relaxed);
            counter!(WEBHOOK_EVENTS, "result" => "dropped").increment(count);
        }
    }

    /// Offers `event` to the webhook; never waits. Events that are not notable are ignored.
    pub fn send(&self, event: Event) {
        let Some(queue) = &self.queue else { return };
        if !event.is_notable() {
            return;
        }
        if queue.try_send(event).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            counter!(WEBHOOK_EVENTS, "result" => "dropped").increment(1);
        }
    }
}

/// Hands the inventory's changes of state to `notifier` until `cancel`; changes the channel lost
/// while this task was behind are counted as dropped, and the next POST is a summary.
pub async fn forward(mut changes: broadcast::Receiver<Event>, notifier: Notifier, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            change = changes.recv() => match change {
                Ok(event) => notifier.send(event),
                Err(broadcast::error::RecvError::Lagged(lost)) => notifier.lost(lost),
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// Starts the notifier for `[notify]`: [`Notifier::off`] and no task when no URL is set.
pub fn start(config: &NotifyConfig, cancel: CancellationToken) -> Result<(Notifier, Option<JoinHandle<()>>), String> {
    Ok(match Settings::from_config(config)? {
        None => (Notifier::off(), None),
        Some(settings) => {
            let (notifier, task) = spawn(settings, cancel);
            (notifier, Some(task))
        }
    })
}

/// Spawns the task that POSTs events; it ends after `cancel`, or once every [`Notifier`] is
/// dropped, having sent what it held (within [`Settings::flush_grace`]).
pub fn spawn(settings: Settings, cancel: CancellationToken) -> (Notifier, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let dropped = Arc::<AtomicU64>::default();
    let notifier = Notifier { queue: Some(tx), dropped: dropped.clone() };
    (notifier, tokio::spawn(run(Arc::new(settings), rx, dropped, cancel)))
}

type Delivery = Pin<Box<dyn Future<Output = ()> + Send>>;

async fn run(
    settings: Arc<Settings>,
    mut rx: mpsc::Receiver<Event>,
    dropped: Arc<AtomicU64>,
    cancel: CancellationToken,
) {
    let mut batch = Batch::new(settings.max_events);
    // When the batch's first event came: the window closes `coalesce` after it.
    let mut opened: Option<Instant> = None;
    // No POST starts before this (`min_interval`).
    let mut next_post = Instant::now();
    // The POST under way with its retries, and the events it carries; the next batch waits for
    // it, so POSTs never overlap.
    let mut delivery: Option<(Delivery, u64)> = None;
    loop {
        let due = opened.map(|opened| (opened + settings.coalesce).max(next_post));
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            () = async { (&mut delivery.as_mut().expect("guarded").0).await }, if delivery.is_some() => delivery = None,
            event = rx.recv() => match event {
                Some(event) => {
                    opened.get_or_insert_with(Instant::now);
                    batch.push(event);
                }
                None => break,
            },
            () = sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() && delivery.is_none() => {
                batch.add_dropped(dropped.swap(0, Ordering::Relaxed));
                let full = std::mem::replace(&mut batch, Batch::new(settings.max_events));
                let events = full.received();
                delivery = Some((Box::pin(deliver(settings.clone(), full)), events));
                opened = None;
                next_post = Instant::now() + settings.min_interval;
            }
        }
    }
    // Flush: the POST under way, then everything received, at once.
    while let Ok(event) = rx.try_recv() {
        batch.push(event);
    }
    batch.add_dropped(dropped.swap(0, Ordering::Relaxed));
    // The events of each POST not yet done, counted as failed if the grace runs out.
    let mut unfinished: Vec<u64> = delivery.iter().map(|(_, events)| *events).collect();
    if !batch.is_empty() {
        unfinished.push(batch.received());
    }
    let flush = async {
        if let Some((delivery, _)) = delivery {
            delivery.await;
            unfinished.remove(0);
        }
        if !batch.is_empty() {
            deliver(settings.clone(), batch).await;
            unfinished.pop();
        }
    };
    if tokio::time::timeout(settings.flush_grace, flush).await.is_err() {
        tracing::warn!(
            url = settings.endpoint.shown(),
            grace = ?settings.flush_grace,
            "webhook: shutting down with a POST not delivered"
        );
        counter!(WEBHOOK_POSTS, "result" => "failed").increment(unfinished.len() as u64);
        counter!(WEBHOOK_EVENTS, "result" => "failed").increment(unfinished.iter().sum::<u64>());
    }
}

/// POSTs `batch`, retrying as the settings allow, and counts the outcome. Events lost to a full
/// queue were counted as `dropped` already; the rest are `delivered` or `failed` with the POST.
async fn deliver(settings: Arc<Settings>, batch: Batch) {
    let body = Bytes::from(batch.to_json());
    let events = batch.received();
    let mut backoff = settings.retry_initial;
    let mut attempt = 0;
    let reason = loop {
        let retry_after = match settings.endpoint.post(body.clone(), settings.timeout).await {
            Attempt::Delivered => {
                counter!(WEBHOOK_POSTS, "result" => "ok").increment(1);
                counter!(WEBHOOK_EVENTS, "result" => "delivered").increment(events);
                tracing::debug!(events, "webhook: delivered");
                return;
            }
            Attempt::Refused(status) => break format!("status {status}, not retried"),
            Attempt::Failed { reason, .. } if attempt == settings.retries => break reason,
            Attempt::Failed { reason, retry_after } => {
                tracing::debug!(%reason, attempt, "webhook: POST failed, retrying");
                retry_after
            }
        };
        counter!(WEBHOOK_POSTS, "result" => "retried").increment(1);
        attempt += 1;
        // A random wait in the upper half of the backoff, so that proxies that failed together
        // do not retry together.
        let half = backoff / 2;
        let mut wait = half + half.mul_f64(rand::rng().random::<f64>());
        if let Some(asked) = retry_after {
            wait = wait.max(asked.min(settings.retry_max));
        }
        sleep(wait).await;
        backoff = (backoff * 2).min(settings.retry_max);
    };
    tracing::warn!(url = settings.endpoint.shown(), events, attempts = attempt + 1, %reason, "webhook: POST given up");
    counter!(WEBHOOK_POSTS, "result" => "failed").increment(1);
    counter!(WEBHOOK_EVENTS, "result" => "failed").increment(events);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notable_changes() {
        use WorkerState::*;
        let change = |from, to| Event {
            worker: "w".into(),
            from,
            to,
            at: std::time::SystemTime::now(),
            address: None,
            pool: None,
        };
        for (from, to, notable) in [
            (Online, Offline, true),
            (Online, Stale, true),
            (Stale, Online, true),
            (Offline, Online, true),
            (NeverSeen, Online, false),
            (NeverSeen, Offline, true),
            (Stale, Offline, true),
            (Online, Online, false),
            (Offline, NeverSeen, false),
        ] {
            assert_eq!(change(from, to).is_notable(), notable, "{from} → {to}");
        }
    }

    #[test]
    fn off_without_a_url() {
        let (notifier, task) = start(&NotifyConfig::default(), CancellationToken::new()).unwrap();
        assert!(task.is_none() && notifier.queue.is_none());
        let config = NotifyConfig { webhook_url: "gopher://x".into(), ..NotifyConfig::default() };
        assert_eq!(start(&config, CancellationToken::new()).err().unwrap(), "expected an http:// or https:// URL");
    }
}
