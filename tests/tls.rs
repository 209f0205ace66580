//! TLS on both sides of the proxy: to pools over `stratum+ssl://`, trusted through a CA file or a
//! pinned certificate fingerprint, and a second listener that serves miners over TLS.
//!
//! A TLS front that terminates TLS and relays the bytes to the recording mock pool stands in for a
//! TLS pool, so what reached the pool is still asserted on the wire.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use loka_stratum::config::{Config, Mode, PoolConfig};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::codec::{FramedRead, LinesCodec};

// ---------------------------------------------------------------------------------------------
// Certificates.
// ---------------------------------------------------------------------------------------------

/// A test CA and a server certificate for `localhost` and `127.0.0.1` signed by it, as DER and as
/// PEM files in a directory that lives as long as this value.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertificateDer<'static>,
    leaf: CertificateDer<'static>,
    /// The leaf's private key, PKCS#8.
    key: Vec<u8>,
}

impl Pki {
    fn generate() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "loka-stratum test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key).unwrap();

        let key = KeyPair::generate().unwrap();
        // rcgen makes "127.0.0.1" an IP address SAN and "localhost" a DNS name SAN.
        let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "localhost");
        let leaf = params.signed_by(&key, &ca, &ca_key).unwrap();

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("server.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
        Pki { ca: ca.der().clone(), leaf: leaf.der().clone(), key: key.serialize_der(), dir }
    }

    fn path(&self, name: &str) -> String {
        let path: PathBuf = self.dir.path().join(name);
        path_string(&path)
    }

    fn ca_file(&self) -> String {
        self.path("ca.pem")
    }

    fn cert_file(&self) -> String {
        self.path("server.pem")
    }

    fn key_file(&self) -> String {
        self.path("server.key")
    }

    /// Lowercase hex SHA-256 of the leaf certificate's DER.
    fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(self.leaf.as_ref()))
    }

    fn server_config(&self) -> rustls::ServerConfig {
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.leaf.clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone())))
            .unwrap()
    }

    /// A client that trusts only the test CA.
    fn client_config(&self) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
    }
}

fn path_string(path: &Path) -> String {
    path.to_str().expect("temp paths are UTF-8").to_owned()
}

/// `ab:CD:…` form of a hex fingerprint: uppercase, colon-separated.
fn colon_upper(hex: &str) -> String {
    hex.as_bytes().chunks(2).map(|pair| std::str::from_utf8(pair).unwrap().to_uppercase()).collect::<Vec<_>>().join(":")
}

/// The same fingerprint with its first hex digit changed.
fn flip_first_digit(hex: &str) -> String {
    let first = if hex.starts_with('0') { '1' } else { '0' };
    format!("{first}{}", &hex[1..])
}

// ---------------------------------------------------------------------------------------------
// A TLS pool: TLS in front of the mock pool.
// ---------------------------------------------------------------------------------------------

/// Accepts TLS on 127.0.0.1 with the test server certificate and relays each connection's bytes,
/// both ways, to a plain pool.
struct TlsFront {
    addr: SocketAddr,
    /// TLS handshakes completed.
    handshakes: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl TlsFront {
    async fn start(pki: &Pki, pool: SocketAddr) -> TlsFront {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("TLS front binds");
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(pki.server_config()));
        let handshakes = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn(front_loop(listener, acceptor, pool, handshakes.clone()));
        TlsFront { addr, handshakes, accept }
    }

    /// The pool URL; the certificate covers `localhost`.
    fn url(&self) -> String {
        format!("stratum+ssl://localhost:{}", self.addr.port())
    }

    /// The proxy's `pool` metric label for this pool.
    fn label(&self) -> String {
        format!("localhost:{}", self.addr.port())
    }

    fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        // The relays live in the accept task's JoinSet and end with it.
        self.accept.abort();
    }
}

async fn front_loop(listener: TcpListener, acceptor: TlsAcceptor, pool: SocketAddr, handshakes: Arc<AtomicUsize>) {
    let mut relays = JoinSet::new();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        while relays.try_join_next().is_some() {}
        let acceptor = acceptor.clone();
        let handshakes = handshakes.clone();
        relays.spawn(async move {
            let Ok(Ok(mut tls)) = tokio::time::timeout(WAIT, acceptor.accept(tcp)).await else { return };
            handshakes.fetch_add(1, Ordering::SeqCst);
            let Ok(mut plain) = TcpStream::connect(pool).await else { return };
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------------

fn tls_pool_config(mode: Mode, pool: &MockPool, url: String, ca_file: String, fingerprint: String) -> Config {
    let mut config = mode_config(mode, pool.addr);
    config.pools = vec![PoolConfig { url, user: "acct".into(), password: "pw".into(), ca_file, fingerprint }];
    config
}

async fn scrape(proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (status, text) = proxy.http_get("/metrics").await;
    assert_eq!(status, 200, "{text}");
    metric(&text, name, labels).unwrap_or(0.0)
}

/// A pool that checks every share's sha256d with its own extranonce1.
fn validating() -> PoolOptions {
    PoolOptions { validate: true, ..PoolOptions::default() }
}

/// A passthrough share reaches the pool as the miner sent it; an aggregated one under the pool's
/// job id, with the miner's prefix in front of its extranonce2.
fn assert_relayed(mode: Mode, submit: &Value, share: &Share) {
    let en2 = submit["params"][2].as_str().expect("extranonce2");
    match mode {
        Mode::Passthrough => {
            assert_eq!(submit["params"][1], json!(share.job_id));
            assert_eq!(en2, share.extranonce2);
        }
        Mode::Aggregate => assert!(en2.ends_with(&share.extranonce2) && en2.len() > share.extranonce2.len()),
    }
}

/// Handshake as `worker` and one share, accepted.
async fn mine_one_share(proxy: &Proxy, worker: &str) -> Share {
    let mut miner = proxy.miner().await;
    miner.handshake(worker).await;
    let share = miner.any_share();
    let id = miner.submit(worker, &share).await;
    let reply = miner.wait_reply(&id).await.expect("a submit reply");
    assert_eq!(reply["result"], json!(true), "{reply}");
    share
}

/// A miner on a proxy whose only pool fails TLS is refused and closed, the failure is counted
/// against the pool, and no TLS session to the pool was ever established.
async fn assert_connect_failure(proxy: &Proxy, front: &TlsFront, pool: &MockPool) {
    let mut miner = proxy.miner().await;
    miner.request_with_id(json!("s1"), "mining.subscribe", json!(["sim/1.0"])).await;
    let reply = miner.wait_reply(&json!("s1")).await.expect("an error reply");
    assert_eq!(
        reply,
        json!({"id": "s1", "result": null, "error": [20, "no upstream pool available, retry later", null]})
    );
    assert!(miner.expect_closed(WAIT).await, "the refused miner is closed");

    let label = front.label();
    let failures = || async { scrape(proxy, "loka_upstream_connect_failures_total", &[("pool", &label)]).await };
    assert!(eventually(WAIT, || async { failures().await >= 1.0 }).await, "{} connect failures", failures().await);
    assert_eq!(front.handshakes(), 0, "no TLS session to the pool was established");
    assert_eq!(pool.connections_accepted(), 0, "nothing reached the pool");
}

// ---------------------------------------------------------------------------------------------
// TLS to the pool.
// ---------------------------------------------------------------------------------------------

in_both_modes!(tokio::test, tls_pool_with_ca_file);
async fn tls_pool_with_ca_file(mode: Mode) {
    let pki = Pki::generate();
    let pool = MockPool::start(validating()).await;
    let front = TlsFront::start(&pki, pool.addr).await;
    let proxy = spawn_proxy(tls_pool_config(mode, &pool, front.url(), pki.ca_file(), String::new())).await;

    let share = mine_one_share(&proxy, "tls.rig1").await;
    assert!(pool.wait_submits(1).await, "the submit reached the pool");
    let submits = pool.submits();
    assert_eq!(submits.len(), 1, "{submits:?}");
    assert_relayed(mode, &submits[0], &share);
    assert_eq!((pool.accepted(), pool.rejected()), (1, 0), "the pool's own sha256d check");
    assert!(front.handshakes() >= 1, "the pool session went through TLS");
    proxy.shutdown().await;
}

in_both_modes!(tokio::test, tls_pool_untrusted_is_a_connect_failure);
async fn tls_pool_untrusted_is_a_connect_failure(mode: Mode) {
    let pki = Pki::generate();
    let pool = MockPool::start(PoolOptions::default()).await;
    let front = TlsFront::start(&pki, pool.addr).await;
    // The system roots do not trust the test CA.
    let proxy = spawn_proxy(tls_pool_config(mode, &pool, front.url(), String::new(), String::new())).await;

    assert_connect_failure(&proxy, &front, &pool).await;
    proxy.shutdown().await;
}

in_both_modes!(tokio::test, tls_pool_pinned_fingerprint);
async fn tls_pool_pinned_fingerprint(mode: Mode) {
    let pki = Pki::generate();
    let pool = MockPool::start(PoolOptions::default()).await;
    let front = TlsFront::start(&pki, pool.addr).await;

    // A pin replaces chain verification: no CA file, and both spellings of the pin work.
    for (n, pin) in [pki.fingerprint(), colon_upper(&pki.fingerprint())].into_iter().enumerate() {
        let before = pool.submits().len();
        let proxy = spawn_proxy(tls_pool_config(mode, &pool, front.url(), String::new(), pin.clone())).await;
        let share = mine_one_share(&proxy, &format!("pinned.rig{n}")).await;
        assert!(pool.wait_submits(before + 1).await, "the submit reached the pool with pin {pin}");
        assert_relayed(mode, &pool.submits()[before], &share);
        proxy.shutdown().await;
    }

    // A wrong pin fails, also beside a CA file the chain would verify against.
    let wrong = flip_first_digit(&pki.fingerprint());
    for ca_file in [String::new(), pki.ca_file()] {
        let other = MockPool::start(PoolOptions::default()).await;
        let other_front = TlsFront::start(&pki, other.addr).await;
        let proxy = spawn_proxy(tls_pool_config(mode, &other, other_front.url(), ca_file, wrong.clone())).await;
        assert_connect_failure(&proxy, &other_front, &other).await;
        proxy.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------------
// TLS for miners.
// ---------------------------------------------------------------------------------------------

/// A line-based Stratum client over TLS.
struct TlsMiner {
    lines: FramedRead<ReadHalf<TlsStream<TcpStream>>, LinesCodec>,
    writer: WriteHalf<TlsStream<TcpStream>>,
    local: SocketAddr,
    /// Notifications read while waiting for replies.
    notifications: Vec<Value>,
}

impl TlsMiner {
    async fn connect(addr: SocketAddr, pki: &Pki) -> TlsMiner {
        let connector = TlsConnector::from(Arc::new(pki.client_config()));
        let tls = async {
            let tcp = TcpStream::connect(addr).await?;
            let local = tcp.local_addr()?;
            let tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await?;
            Ok::<_, std::io::Error>((tls, local))
        };
        let (tls, local) =
            tokio::time::timeout(WAIT, tls).await.expect("TLS connect timed out").expect("TLS connect to the proxy");
        let (reader, writer) = tokio::io::split(tls);
        TlsMiner {
            lines: FramedRead::new(reader, LinesCodec::new_with_max_length(1 << 20)),
            writer,
            local,
            notifications: Vec::new(),
        }
    }

    async fn request(&mut self, id: u64, method: &str, params: Value) {
        let line = json!({"id": id, "method": method, "params": params}).to_string() + "\n";
        let write = async {
            self.writer.write_all(line.as_bytes()).await?;
            self.writer.flush().await
        };
        tokio::time::timeout(WAIT, write).await.expect("TLS write timed out").expect("TLS write");
    }

    /// The next message; panics on timeout or close.
    async fn next(&mut self, deadline: tokio::time::Instant) -> Value {
        let line = tokio::time::timeout_at(deadline, self.lines.next())
            .await
            .expect("timed out waiting for the proxy")
            .expect("the proxy closed the TLS connection")
            .expect("a line from the proxy");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("invalid JSON {line:?}: {e}"))
    }

    /// The reply to `id`; notifications met on the way are kept.
    async fn reply(&mut self, id: u64) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let msg = self.next(deadline).await;
            if is_reply(&msg) {
                assert_eq!(msg["id"], json!(id), "replies come in order: {msg}");
                return msg;
            }
            self.notifications.push(msg);
        }
    }

    /// The params of the first `method` notification, read now or earlier.
    async fn notification(&mut self, method: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(n) = self.notifications.iter().find(|n| n["method"] == method) {
                return n["params"].clone();
            }
            let msg = self.next(deadline).await;
            assert!(!is_reply(&msg), "no reply is pending: {msg}");
            self.notifications.push(msg);
        }
    }
}

in_both_modes!(tokio::test, tls_listener_for_miners);
async fn tls_listener_for_miners(mode: Mode) {
    let pki = Pki::generate();
    let pool = MockPool::start(validating()).await;
    let mut config = mode_config(mode, pool.addr);
    config.server.tls_listen = "127.0.0.1:0".into();
    config.server.tls_cert = pki.cert_file();
    config.server.tls_key = pki.key_file();
    let proxy = spawn_proxy(config).await;
    let tls_addr = proxy.tls.expect("the proxy listens for TLS");
    assert_ne!(tls_addr.port(), 0);
    assert_ne!(tls_addr, proxy.addr);

    let mut miner = TlsMiner::connect(tls_addr, &pki).await;
    miner.request(1, "mining.subscribe", json!(["tlsminer/1.0"])).await;
    let sub = miner.reply(1).await;
    assert!(sub["error"].is_null(), "{sub}");
    let en2_size = sub["result"][2].as_u64().expect("extranonce2_size") as usize;
    miner.request(2, "mining.authorize", json!(["tls.rig1", "x"])).await;
    let auth = miner.reply(2).await;
    assert_eq!(auth["result"], json!(true), "{auth}");

    let notify = miner.notification("mining.notify").await;
    let job_id = notify[0].as_str().expect("job id").to_owned();
    let ntime = notify[7].as_str().expect("ntime").to_owned();
    let en2 = format!("{:0width$x}", 1, width = en2_size * 2);
    miner.request(3, "mining.submit", json!(["tls.rig1", job_id, en2, ntime, "00000000"])).await;
    let submit = miner.reply(3).await;
    assert_eq!(submit, json!({"id": 3, "result": true, "error": null}));
    assert!(pool.wait_submits(1).await);
    assert_eq!((pool.accepted(), pool.rejected()), (1, 0), "the pool's own sha256d check");

    // The plain listener still serves miners; this one stays connected, so the API lists it.
    let mut plain = proxy.miner().await;
    plain.handshake("plain.rig1").await;
    let share = plain.any_share();
    let id = plain.submit("plain.rig1", &share).await;
    assert_eq!(plain.wait_reply(&id).await.expect("a submit reply")["result"], json!(true));

    let (status, body) = proxy.http_get("/api/v1/connections").await;
    assert_eq!(status, 200, "{body}");
    let workers: Vec<Value> = serde_json::from_str(&body).unwrap();
    let tls_worker = workers.iter().find(|w| w["worker"] == "tls.rig1").unwrap_or_else(|| panic!("{body}"));
    assert_eq!(tls_worker["peer"], json!(miner.local.to_string()), "the TLS miner's own address: {body}");
    assert_eq!(tls_worker["accepted"], json!(1), "{body}");
    assert!(workers.iter().any(|w| w["worker"] == "plain.rig1"), "{body}");
    proxy.shutdown().await;
}

/// Reads until the peer closes; true if it did within `timeout`. Returns what was read.
async fn read_until_closed(stream: &mut TcpStream, timeout: Duration) -> (Vec<u8>, bool) {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (seen, true),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => return (seen, false),
        }
    }
}

in_both_modes!(tokio::test, tls_listener_closes_failed_and_slow_handshakes);
async fn tls_listener_closes_failed_and_slow_handshakes(mode: Mode) {
    let pki = Pki::generate();
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut config = mode_config(mode, pool.addr);
    config.server.tls_listen = "127.0.0.1:0".into();
    config.server.tls_cert = pki.cert_file();
    config.server.tls_key = pki.key_file();
    config.server.handshake_timeout = 1;
    let proxy = spawn_proxy(config).await;
    let tls_addr = proxy.tls.expect("the proxy listens for TLS");
    let scrape_rejected =
        || async { scrape(&proxy, "loka_connections_rejected_total", &[("reason", "tls_handshake")]).await };
    let before = scrape_rejected().await;
    let rejected = || async { scrape_rejected().await - before };

    // Plain Stratum on the TLS port: no JSON back, closed.
    let mut plain = TcpStream::connect(tls_addr).await.unwrap();
    plain.write_all(b"{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[]}\n").await.unwrap();
    let (seen, closed) = read_until_closed(&mut plain, WAIT).await;
    assert!(closed, "plain text on the TLS port is closed");
    assert!(!String::from_utf8_lossy(&seen).contains("\"id\""), "no Stratum reply: {seen:?}");
    assert!(eventually(WAIT, || async { rejected().await >= 1.0 }).await, "{} rejected", rejected().await);

    // Silence past handshake_timeout.
    let mut silent = TcpStream::connect(tls_addr).await.unwrap();
    let (seen, closed) = read_until_closed(&mut silent, Duration::from_secs(5)).await;
    assert!(closed, "a connection that never starts TLS is closed");
    assert!(seen.is_empty(), "{seen:?}");
    assert!(eventually(WAIT, || async { rejected().await >= 2.0 }).await, "{} rejected", rejected().await);

    assert_eq!(proxy.registry.len(), 0);
    assert!(pool.subscribes() <= idle_pool_sessions(mode), "nothing reached the pool");
    proxy.shutdown().await;
}
