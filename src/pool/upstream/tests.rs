//! Pool links, health and reloads, over sockets on 127.0.0.1.

use super::*;

#[test]
fn jitter_stays_in_range() {
    for _ in 0..1000 {
        let j = jitter(Duration::from_secs(8));
        assert!(j >= Duration::from_secs(4) && j <= Duration::from_secs(8));
    }
}

fn config(urls: &[String]) -> Config {
    let pools = urls
        .iter()
        .map(|u| PoolConfig { url: u.clone(), user: String::new(), password: String::new(), ..PoolConfig::default() })
        .collect();
    let mut c = Config { pools, ..Config::default() };
    c.upstream.retry_initial_ms = 10;
    c.upstream.retry_max_ms = 40;
    c
}

/// A pool that stops reading: its lines are still read while the write waits, and the link
/// fails once the write has made no progress for `write_timeout`.
#[tokio::test(start_paused = true)]
async fn a_pool_that_stops_reading_fails_the_link_after_write_timeout() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpSocket::new_v4().unwrap();
    listener.set_recv_buffer_size(4096).unwrap();
    listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = listener.listen(1).unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(4096).unwrap();
    let stream = socket.connect(listener.local_addr().unwrap()).await.unwrap();
    let (mut peer, _) = listener.accept().await.unwrap();
    let pool =
        PoolSet::new(&config(&["stratum+tcp://127.0.0.1:1".into()]), CancellationToken::new()).pools()[0].clone();
    let timeout = Duration::from_secs(30);
    let mut link = PoolLink::new(pool, Box::new(stream), 1024, timeout, true);

    link.queue(&vec![b'x'; 8 << 20]);
    peer.write_all(b"{\"id\":null,\"method\":\"mining.notify\",\"params\":[]}\n").await.unwrap();
    let line = link.next_line().await.expect("a line").expect("read while the write waits");
    assert!(line.starts_with(b"{\"id\":null"));
    assert!(link.unwritten() > 0, "the peer reads nothing, so the write cannot finish");
    let started = Instant::now();
    let failed = tokio::time::timeout(timeout * 2, link.next_line()).await.expect("failed within write_timeout");
    let Some(Err(FrameError::Io(e))) = failed else { panic!("the link should fail") };
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert!(started.elapsed() >= timeout);
    drop(peer);
}

#[tokio::test]
async fn connects_in_priority_order_skipping_dead_pools() {
    // Bound but not listening: refused, and held so no other test takes the port meanwhile.
    let dead = tokio::net::TcpSocket::new_v4().unwrap();
    dead.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead_addr = dead.local_addr().unwrap();
    let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let set = PoolSet::new(
        &config(&[
            format!("stratum+tcp://{dead_addr}"),
            format!("stratum+tcp://localhost:{}", live.local_addr().unwrap().port()),
        ]),
        CancellationToken::new(),
    );
    let link = set.connect(None).await.unwrap();
    assert_eq!(link.pool().label, format!("localhost:{}", live.local_addr().unwrap().port()));
    // One failed connect is a fault for the probe to judge, not the pool's health: the pool is
    // in doubt, and tried after the others.
    assert!(set.pools()[0].usable() && set.pools()[0].in_doubt());
    assert!(!set.pools()[1].in_doubt());
    let order: Vec<_> = set.candidates().iter().map(|p| p.label.clone()).collect();
    assert_eq!(order, [set.pools()[1].label.clone(), set.pools()[0].label.clone()]);
    let link = set.connect(None).await.unwrap();
    assert_eq!(link.pool().label, set.pools()[1].label, "the dead pool is tried last");
    drop(dead);
}

#[tokio::test]
async fn monitor_brings_a_pool_back() {
    // Bound but not listening: refused, and held so no other test takes the port meanwhile.
    let probe = tokio::net::TcpSocket::new_v4().unwrap();
    probe.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = probe.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let set = PoolSet::new(&config(&[format!("stratum+tcp://{addr}")]), cancel.clone());
    let tracker = TaskTracker::new();
    set.spawn_monitors(&tracker);
    for _ in 0..200 {
        if set.pools()[0].health() == Health::Down {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(set.connect(None).await.is_err());
    tokio::spawn(answer_like_a_pool(probe.listen(16).unwrap(), true));
    let mut up = false;
    for _ in 0..400 {
        if set.any_up() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(up, "the monitor reconnects once the pool listens");
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
}

/// Answers every connection as a pool does: the subscribe, the authorize, then a job; or, when
/// it refuses every user, error 24 and no job.
async fn answer_like_a_pool(listener: tokio::net::TcpListener, accept_users: bool) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    const NOTIFY: &str = r#"{"id":null,"method":"mining.notify","params":["1","ab02cd818b9e567ee21793cddef299fe8b29ad44a3a41b85000008a300000000","0100","ffff",[],"20000000","1d00ffff","4dd7f5c7",true]}"#;
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (reader, mut writer) = stream.into_split();
            let mut lines = BufReader::new(reader).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let request: serde_json::Value = serde_json::from_str(&line).unwrap();
                let id = &request["id"];
                let answer = match request["method"].as_str() {
                    Some("mining.subscribe") => format!(r#"{{"id":{id},"result":[[],"0a000001",4],"error":null}}"#),
                    _ if accept_users => format!(r#"{{"id":{id},"result":true,"error":null}}"#) + "\n" + NOTIFY,
                    _ => format!(r#"{{"id":{id},"result":false,"error":[24,"Unauthorized worker",null]}}"#),
                };
                if writer.write_all(format!("{answer}\n").as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[tokio::test]
async fn a_pool_that_accepts_and_never_answers_is_not_up() {
    // A stopped pool process: the kernel completes the TCP handshake, nothing reads or answers.
    // A pool that refuses the proxy's user answers: it is up (passthrough miners bring their own).
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let talking = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refusing = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let urls = [&silent, &talking, &refusing].map(|l| format!("stratum+tcp://{}", l.local_addr().unwrap()));
    tokio::spawn(answer_like_a_pool(talking, true));
    tokio::spawn(answer_like_a_pool(refusing, false));
    let mut c = config(&urls);
    c.upstream.connect_timeout = 1;
    let cancel = CancellationToken::new();
    let set = PoolSet::new(&c, cancel.clone());
    let tracker = TaskTracker::new();
    set.spawn_monitors(&tracker);
    let probed = async {
        while set.pools().iter().any(|p| p.health() == Health::Unknown) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), probed).await.expect("both pools probed");
    assert_eq!(set.pools().iter().map(|p| p.state()).collect::<Vec<_>>(), ["down", "up", "up"]);
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
}

#[tokio::test]
async fn a_reload_replaces_the_pools_and_retires_their_monitors() {
    let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let set = PoolSet::new(&config(&[format!("stratum+tcp://{a}")]), shutdown.clone());
    let tracker = TaskTracker::new();
    set.spawn_monitors(&tracker);
    let old = set.pools();
    set.replace(&config(&[format!("stratum+tcp://{b}")]), &tracker);
    assert_eq!(set.pools()[0].label, b.to_string());
    assert_eq!(old[0].label, a.to_string(), "sessions holding the old pool keep it");
    assert_eq!(set.connect(None).await.unwrap().pool().label, b.to_string());
    shutdown.cancel();
    tracker.close();
    tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await.expect("every monitor stops");
}

#[tokio::test]
async fn a_reload_keeps_each_pool_whose_url_and_credentials_are_unchanged() {
    let urls = ["stratum+tcp://127.0.0.1:1".to_owned(), "stratum+tcp://127.0.0.1:2".to_owned()];
    let shutdown = CancellationToken::new();
    let set = PoolSet::new(&config(&urls), shutdown.clone());
    let tracker = TaskTracker::new();
    let old = set.pools();
    let mut new = config(&urls);
    new.upstream.keepalive += 1;
    new.pools[1].password = "changed".into();
    set.replace(&new, &tracker);
    let now = set.pools();
    assert!(Arc::ptr_eq(&old[0], &now[0]), "same URL and credentials: the same pool, health and verdicts");
    assert!(!Arc::ptr_eq(&old[1], &now[1]), "new credentials: a new pool");
    assert_eq!(now[1].config.password, "changed");
    // Reordered, the kept pool is still itself.
    let mut swapped = new.clone();
    swapped.pools.reverse();
    set.replace(&swapped, &tracker);
    assert!(Arc::ptr_eq(&set.pools()[1], &old[0]) && Arc::ptr_eq(&set.pools()[0], &now[1]));
    shutdown.cancel();
    tracker.close();
    tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await.expect("every monitor stops");
}
