//! The worker webhook against a receiver on 127.0.0.1 that records every request and answers
//! from a script: what crosses the wire, coalescing, the outage summary, retries, timeouts,
//! https, and the flush on shutdown; and end to end, a proxy's workers going offline and back.
//!
//! Real time with short settings, not a paused clock: the notifier's timers race real sockets,
//! and a paused runtime would jump its timers while the receiver's bytes are in flight.

mod support;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use loka_stratum::config::NotifyConfig;
use loka_stratum::notify::{self, Event, Notifier, Settings, WorkerState};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::{sleep, timeout, Instant};
use tokio_util::sync::CancellationToken;

/// How long any wait for the receiver may take before the test fails.
const WAIT: Duration = Duration::from_secs(10);

/// What the receiver does with a request.
#[derive(Clone, Copy)]
enum Reply {
    Status(u16),
    /// 429 with `Retry-After: 1`.
    TooManyRequests,
    /// Reads the request and never answers, until the client goes away.
    Hang,
}

struct Received {
    at: Instant,
    head: String,
    body: Value,
}

#[derive(Clone, Default)]
struct Receiver {
    requests: Arc<Mutex<Vec<Received>>>,
    /// Replies in order; 200 once they run out.
    script: Arc<Mutex<VecDeque<Reply>>>,
}

impl Receiver {
    /// A plain HTTP receiver and its URL.
    async fn start(script: &[Reply]) -> (Receiver, String) {
        Self::start_with(script, None).await
    }

    async fn start_with(script: &[Reply], tls: Option<tokio_rustls::TlsAcceptor>) -> (Receiver, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let receiver = Receiver { script: Arc::new(Mutex::new(script.iter().copied().collect())), ..Self::default() };
        let r = receiver.clone();
        let scheme = if tls.is_some() { "https" } else { "http" };
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (r, tls) = (r.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => r.serve(tcp).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                r.serve(stream).await;
                            }
                        }
                    }
                });
            }
        });
        (receiver, format!("{scheme}://{addr}/hooks/T0/secret?x=1"))
    }

    /// One request per connection, as the notifier sends them.
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(&self, mut stream: S) {
        let mut data = Vec::new();
        let mut buf = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => data.extend_from_slice(&buf[..n]),
            }
        };
        let head = String::from_utf8(data[..head_end].to_vec()).unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
            .expect("a Content-Length");
        while data.len() < head_end + length {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => data.extend_from_slice(&buf[..n]),
            }
        }
        let body = serde_json::from_slice(&data[head_end..head_end + length]).unwrap();
        self.requests.lock().unwrap().push(Received { at: Instant::now(), head, body });
        let reply = self.script.lock().unwrap().pop_front().unwrap_or(Reply::Status(200));
        let answer = match reply {
            Reply::Status(code) => format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"),
            Reply::TooManyRequests => {
                "HTTP/1.1 429 Too Many\r\nretry-after: 1\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into()
            }
            Reply::Hang => {
                while !matches!(stream.read(&mut buf).await, Ok(0) | Err(_)) {}
                return;
            }
        };
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    }

    fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    fn body(&self, i: usize) -> Value {
        self.requests.lock().unwrap()[i].body.clone()
    }

    /// The time between the arrivals of requests `i` and `j`.
    fn gap(&self, i: usize, j: usize) -> Duration {
        let requests = self.requests.lock().unwrap();
        requests[j].at - requests[i].at
    }

    /// Waits until `n` requests came; false after [`WAIT`].
    async fn wait_for(&self, n: usize) -> bool {
        let deadline = Instant::now() + WAIT;
        while self.count() < n {
            if Instant::now() > deadline {
                return false;
            }
            sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

/// Short windows and backoffs, so that each test takes a second or two of real time.
fn quick(url: &str) -> Settings {
    let config = NotifyConfig { webhook_url: url.into(), ..NotifyConfig::default() };
    let mut settings = Settings::from_config(&config).unwrap().expect("a URL is set");
    settings.timeout = Duration::from_secs(2);
    settings.coalesce = Duration::from_millis(200);
    settings.min_interval = Duration::ZERO;
    settings.retries = 3;
    settings.retry_initial = Duration::from_millis(20);
    settings.retry_max = Duration::from_millis(200);
    settings.flush_grace = Duration::from_secs(5);
    settings
}

fn event(worker: &str, from: WorkerState, to: WorkerState) -> Event {
    Event {
        worker: worker.into(),
        from,
        to,
        at: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        address: Some("10.1.2.3".parse().unwrap()),
        pool: Some("pool.example.com:3333".into()),
    }
}

fn offline(worker: &str) -> Event {
    event(worker, WorkerState::Online, WorkerState::Offline)
}

/// Sends each of `events`; the notifier's task is stopped and awaited by [`Running::stop`].
struct Running {
    notifier: Notifier,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(settings: Settings) -> Running {
        let cancel = CancellationToken::new();
        let (notifier, task) = notify::spawn(settings, cancel.clone());
        Running { notifier, cancel, task }
    }

    async fn stop(self) {
        self.cancel.cancel();
        timeout(WAIT, self.task).await.expect("the notifier stops").unwrap();
    }
}

/// The value of a `loka_webhook_…{result="…"}` counter in the process's recorder.
fn counter(name: &str, result: &str) -> f64 {
    let text = loka_stratum::metrics::install().render();
    let series = format!("{name}{{result=\"{result}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&series)).map_or(0.0, |v| v.parse().unwrap())
}

#[tokio::test]
async fn one_event_as_json() {
    let (receiver, url) = Receiver::start(&[]).await;
    let running = Running::start(quick(&url));
    running.notifier.send(offline("farm.s19-1"));
    // Not changes an operator is told of.
    running.notifier.send(event("farm.x", WorkerState::Offline, WorkerState::NeverSeen));
    running.notifier.send(event("farm.y", WorkerState::Online, WorkerState::Online));
    assert!(receiver.wait_for(1).await);
    let head = receiver.requests.lock().unwrap()[0].head.to_ascii_lowercase();
    assert!(head.starts_with("post /hooks/t0/secret?x=1 http/1.1\r\n"), "{head}");
    assert!(head.contains("\r\ncontent-type: application/json\r\n"), "{head}");
    assert!(head.contains(&format!("\r\nhost: {}\r\n", url.split('/').nth(2).unwrap())), "{head}");
    assert_eq!(
        receiver.body(0),
        json!({
            "type": "worker_events",
            "text": "loka-stratum: 1 worker state change\nfarm.s19-1: online → offline at 2023-11-14T22:13:20Z \
                     from 10.1.2.3 on pool.example.com:3333",
            "events": [{"worker": "farm.s19-1", "from": "online", "to": "offline", "at": "2023-11-14T22:13:20Z",
                        "address": "10.1.2.3", "pool": "pool.example.com:3333"}],
        })
    );
    running.stop().await;
    assert_eq!(receiver.count(), 1);
}

/// Changes within the window go as one POST, though they came apart; `min_interval` spaces the
/// POSTs that follow past what the window alone would.
#[tokio::test]
async fn coalesced_and_rate_limited() {
    let (receiver, url) = Receiver::start(&[]).await;
    let mut settings = quick(&url);
    settings.coalesce = Duration::from_secs(1);
    settings.min_interval = Duration::from_millis(2_500);
    let running = Running::start(settings);
    running.notifier.send(offline("a"));
    sleep(Duration::from_millis(100)).await;
    running.notifier.send(event("b", WorkerState::Online, WorkerState::Stale));
    sleep(Duration::from_millis(100)).await;
    running.notifier.send(event("c", WorkerState::Offline, WorkerState::Online));
    assert!(receiver.wait_for(1).await);
    let workers: Vec<_> = receiver.body(0)["events"].as_array().unwrap().iter().map(|e| e["worker"].clone()).collect();
    assert_eq!(workers, [json!("a"), json!("b"), json!("c")]);
    // Its window closes a second after it, but the POST waits for min_interval.
    running.notifier.send(offline("d"));
    assert!(receiver.wait_for(2).await);
    assert!(receiver.gap(0, 1) >= Duration::from_millis(2_500), "{:?}", receiver.gap(0, 1));
    assert_eq!(receiver.body(1)["events"][0]["worker"], "d");
    running.stop().await;
    assert_eq!(receiver.count(), 2);
}

/// A farm-wide outage: 3,000 workers offline at once is one summary POST.
#[tokio::test]
async fn an_outage_is_one_summary() {
    let (receiver, url) = Receiver::start(&[]).await;
    let running = Running::start(quick(&url));
    for i in 0..3_000 {
        running.notifier.send(offline(&format!("farm.w{i:04}")));
    }
    assert!(receiver.wait_for(1).await);
    // Well past the window: nothing else follows.
    sleep(Duration::from_millis(600)).await;
    assert_eq!(receiver.count(), 1);
    let body = receiver.body(0);
    assert_eq!(body["type"], "worker_summary");
    assert_eq!((body["total"].as_u64(), body["dropped"].as_u64()), (Some(3_000), Some(0)));
    assert_eq!(body["transitions"], json!([{"from": "online", "to": "offline", "count": 3_000}]));
    let workers = body["workers"].as_array().unwrap();
    assert_eq!((workers.len(), &workers[0]), (20, &json!("farm.w0000")));
    let text = body["text"].as_str().unwrap();
    assert!(text.starts_with("loka-stratum: 3000 worker state changes: 3000 online → offline.\n"), "{text}");
    assert!(text.ends_with("farm.w0019 and 2980 more"), "{text}");
    running.stop().await;
}

/// On this single-threaded runtime the notifier's task cannot run while the test sends: past
/// the queue, changes are counted and the summary says so.
#[tokio::test]
async fn a_full_queue_is_counted() {
    let (receiver, url) = Receiver::start(&[]).await;
    let running = Running::start(quick(&url));
    let dropped_before = counter("loka_webhook_events_total", "dropped");
    for i in 0..10_000 {
        running.notifier.send(offline(&format!("w{i}")));
    }
    assert!(receiver.wait_for(1).await);
    let body = receiver.body(0);
    let dropped = (10_000 - notify::QUEUE) as u64;
    assert_eq!((body["total"].as_u64(), body["dropped"].as_u64()), (Some(10_000), Some(dropped)));
    assert_eq!(body["transitions"][0]["count"].as_u64(), Some(notify::QUEUE as u64));
    let text = body["text"].as_str().unwrap();
    assert!(text.contains(&format!(", and {dropped} not itemised (the notifier's queue was full)")), "{text}");
    // Only this test fills the queue; the recorder is the process's.
    assert_eq!(counter("loka_webhook_events_total", "dropped") - dropped_before, dropped as f64);
    running.stop().await;
}

#[tokio::test]
async fn retried_after_500_and_503() {
    let (receiver, url) = Receiver::start(&[Reply::Status(500), Reply::Status(503)]).await;
    let running = Running::start(quick(&url));
    running.notifier.send(offline("a"));
    assert!(receiver.wait_for(3).await);
    assert_eq!(receiver.body(0), receiver.body(2), "the same POST again");
    running.stop().await;
    assert_eq!(receiver.count(), 3);
}

/// A 429's `Retry-After` is waited out, though the backoff alone would retry sooner.
#[tokio::test]
async fn retry_after_is_honoured() {
    let (receiver, url) = Receiver::start(&[Reply::TooManyRequests]).await;
    let mut settings = quick(&url);
    settings.retry_max = Duration::from_secs(5);
    let running = Running::start(settings);
    running.notifier.send(offline("a"));
    assert!(receiver.wait_for(2).await);
    assert!(receiver.gap(0, 1) >= Duration::from_secs(1), "{:?}", receiver.gap(0, 1));
    assert_eq!(receiver.body(0), receiver.body(1));
    running.stop().await;
}

/// Out of retries, or a status that retrying will not change: given up, logged and counted.
/// Only this test gives POSTs up; the recorder is the process's.
#[tokio::test]
async fn given_up_and_counted() {
    let failed_before = counter("loka_webhook_posts_total", "failed");
    let events_before = counter("loka_webhook_events_total", "failed");
    let (receiver, url) = Receiver::start(&[Reply::Status(503); 10]).await;
    let mut settings = quick(&url);
    settings.retries = 2;
    let running = Running::start(settings);
    running.notifier.send(offline("a"));
    running.notifier.send(offline("b"));
    assert!(receiver.wait_for(3).await);
    let deadline = Instant::now() + WAIT;
    while counter("loka_webhook_posts_total", "failed") == failed_before && Instant::now() < deadline {
        sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(counter("loka_webhook_posts_total", "failed") - failed_before, 1.0);
    assert_eq!(counter("loka_webhook_events_total", "failed") - events_before, 2.0);
    sleep(Duration::from_millis(400)).await;
    assert_eq!(receiver.count(), 3, "one attempt and two retries");
    running.stop().await;

    let (receiver, url) = Receiver::start(&[Reply::Status(404)]).await;
    let running = Running::start(quick(&url));
    running.notifier.send(offline("a"));
    assert!(receiver.wait_for(1).await);
    let deadline = Instant::now() + WAIT;
    while counter("loka_webhook_posts_total", "failed") - failed_before < 2.0 && Instant::now() < deadline {
        sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(counter("loka_webhook_posts_total", "failed") - failed_before, 2.0);
    sleep(Duration::from_millis(400)).await;
    assert_eq!(receiver.count(), 1, "a 404 is not retried");
    running.stop().await;

    // A receiver that never answers cannot hold shutdown past the grace; the POST is given up.
    let (receiver, url) = Receiver::start(&[Reply::Hang]).await;
    let mut settings = quick(&url);
    settings.coalesce = Duration::from_secs(3_600);
    settings.timeout = Duration::from_secs(60);
    settings.flush_grace = Duration::from_millis(300);
    let running = Running::start(settings);
    running.notifier.send(offline("a"));
    sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    running.stop().await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(receiver.count(), 1);
    assert_eq!(counter("loka_webhook_posts_total", "failed") - failed_before, 3.0);
    assert_eq!(counter("loka_webhook_events_total", "failed") - events_before, 4.0);
}

/// A receiver that takes the request and never answers: the attempt times out and is retried.
#[tokio::test]
async fn a_silent_receiver_times_out() {
    let (receiver, url) = Receiver::start(&[Reply::Hang]).await;
    let mut settings = quick(&url);
    settings.timeout = Duration::from_millis(500);
    let retried_before = counter("loka_webhook_posts_total", "retried");
    let running = Running::start(settings);
    running.notifier.send(offline("a"));
    assert!(receiver.wait_for(2).await);
    assert!(receiver.gap(0, 1) >= Duration::from_millis(500));
    assert_eq!(receiver.body(0), receiver.body(1));
    assert!(counter("loka_webhook_posts_total", "retried") > retried_before);
    running.stop().await;
}

/// https against a rustls receiver whose certificate a test CA signed, trusted through
/// `webhook_ca_file`.
#[tokio::test]
async fn https_with_a_private_ca() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().signed_by(&key, &ca, &ca_key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("ca.pem"), ca.pem()).unwrap();
    std::fs::write(path("server.pem"), leaf.pem()).unwrap();
    std::fs::write(path("server.key"), key.serialize_pem()).unwrap();
    let server = loka_stratum::tls::server_config(&path("server.pem"), &path("server.key")).unwrap();

    let (receiver, url) = Receiver::start_with(&[], Some(server.into())).await;
    assert!(url.starts_with("https://127.0.0.1:"));
    let config = NotifyConfig {
        webhook_url: url.clone(),
        webhook_ca_file: path("ca.pem").to_str().unwrap().into(),
        ..NotifyConfig::default()
    };
    let mut settings = Settings::from_config(&config).unwrap().unwrap();
    settings.coalesce = Duration::from_millis(100);
    let running = Running::start(settings);
    running.notifier.send(offline("tls.w1"));
    assert!(receiver.wait_for(1).await);
    assert_eq!(receiver.body(0)["events"][0]["worker"], "tls.w1");
    running.stop().await;
}

/// On cancel, changes still inside their window are sent at once, and the task ends.
#[tokio::test]
async fn flushed_on_shutdown() {
    let (receiver, url) = Receiver::start(&[]).await;
    let mut settings = quick(&url);
    settings.coalesce = Duration::from_secs(3_600);
    let running = Running::start(settings);
    running.notifier.send(offline("a"));
    running.notifier.send(offline("b"));
    sleep(Duration::from_millis(100)).await;
    assert_eq!(receiver.count(), 0, "the window is an hour");
    let started = Instant::now();
    running.stop().await;
    assert!(started.elapsed() < WAIT);
    assert_eq!(receiver.count(), 1);
    assert_eq!(receiver.body(0)["events"].as_array().unwrap().len(), 2);

    // Dropping every Notifier ends the task the same way.
    let (receiver, url) = Receiver::start(&[]).await;
    let mut settings = quick(&url);
    settings.coalesce = Duration::from_secs(3_600);
    let (notifier, task) = notify::spawn(settings, CancellationToken::new());
    notifier.send(offline("c"));
    drop(notifier);
    timeout(WAIT, task).await.expect("the notifier stops").unwrap();
    assert_eq!(receiver.body(0)["events"][0]["worker"], "c");
}

/// End to end, in both modes: a worker that leaves is offline after `worker_offline_after`, and
/// the proxy POSTs that to the webhook; when it comes back, that too. A new worker's first
/// authorize is not news.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxys_worker_going_offline_and_back_reaches_the_webhook() {
    for mode in support::MODES {
        let (receiver, url) = Receiver::start(&[]).await;
        let pool = support::MockPool::start(support::PoolOptions::default()).await;
        let mut config = support::mode_config(mode, pool.addr);
        config.notify.webhook_url = url;
        config.notify.webhook_coalesce = 1;
        config.inventory.worker_offline_after = 1;
        let proxy = support::spawn_proxy(config).await;
        let mut steady = proxy.miner().await;
        steady.handshake("farm.steady").await;
        let mut leaving = proxy.miner().await;
        leaving.handshake("farm.leaving").await;
        sleep(Duration::from_secs(2)).await;
        assert_eq!(receiver.count(), 0, "{mode:?}: new workers are not news");

        drop(leaving);
        assert!(receiver.wait_for(1).await, "{mode:?}: the offline worker is POSTed");
        let body = receiver.body(0);
        assert_eq!(body["type"], "worker_events", "{mode:?}: {body}");
        let events = body["events"].as_array().unwrap();
        assert_eq!(events.len(), 1, "{mode:?}: {body}");
        assert_eq!(events[0]["worker"], "farm.leaving");
        assert_eq!((&events[0]["from"], &events[0]["to"]), (&json!("online"), &json!("offline")));
        assert_eq!(events[0]["address"], "127.0.0.1");

        let mut back = proxy.miner().await;
        back.handshake("farm.leaving").await;
        assert!(receiver.wait_for(2).await, "{mode:?}: its return is POSTed");
        let body = receiver.body(1);
        let events = body["events"].as_array().unwrap();
        assert_eq!(events.len(), 1, "{mode:?}: {body}");
        assert_eq!((&events[0]["from"], &events[0]["to"]), (&json!("offline"), &json!("online")), "{body}");
        assert!(!steady.closed);
        proxy.shutdown().await;
        assert_eq!(receiver.count(), 2, "{mode:?}: the shutdown sends nothing");
    }
}
