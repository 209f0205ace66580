//! Every limit is real: connection and handshake limits, outbound backpressure, inbound floods,
//! the auth backoff, and pools that misbehave. Time-bound cases run on a paused clock. Each case
//! that is a safeguard of both modes runs in both; where the mode is policy (a passthrough miner
//! shares its pool session's fate, an aggregated one stays while its session fails over), the
//! assertions say so.

mod support;

use std::time::Duration;

use loka_stratum::config::Mode;
use serde_json::{json, Value};
use support::firmware::S19;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn metric_now(proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, text) = proxy.http_get("/metrics").await;
    metric(&text, name, labels).unwrap_or(0.0)
}

in_both_modes!(tokio::test, authorize_deadline_after_subscribe);
async fn authorize_deadline_after_subscribe(mode: Mode) {
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut config = mode_config(mode, pool.addr);
    config.server.authorize_timeout = 20;
    let proxy = spawn_proxy(config).await;
    let mut subscribed_only = proxy.miner().await;
    subscribed_only.subscribe().await;
    let mut authorized = proxy.miner().await;
    authorized.handshake("farm.rig1").await;

    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(19)).await;
    assert!(!subscribed_only.expect_closed(Duration::from_millis(10)).await, "closed before the deadline");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(subscribed_only.expect_closed(Duration::from_secs(5)).await, "no authorize within 20 s: closed");
    assert!(!authorized.expect_closed(Duration::from_millis(10)).await, "an authorized miner stays");
}

in_both_modes!(tokio::test, per_ip_connection_limit);
async fn per_ip_connection_limit(mode: Mode) {
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut config = mode_config(mode, pool.addr);
    config.server.max_connections_per_ip = 2;
    let proxy = spawn_proxy(config).await;
    let mut a = proxy.miner().await;
    a.handshake("farm.a").await;
    let mut b = proxy.miner().await;
    b.handshake("farm.b").await;
    let mut c = proxy.miner().await;
    assert!(c.expect_closed(Duration::from_secs(5)).await, "a third connection from 127.0.0.1 is closed");
    assert!(c.raw.is_empty(), "{:?}", c.raw);
    let refused = metric_now(&proxy, "loka_connections_rejected_total", &[("reason", "max_connections_per_ip")]).await;
    assert!(refused >= 1.0);
    drop(a);
    assert!(
        eventually(Duration::from_secs(5), || async { proxy.registry.len() == 1 }).await,
        "the slot is freed with its connection"
    );
    proxy.miner().await.handshake("farm.c").await;
    proxy.shutdown().await;
}

/// Sends `count` jobs with `coinb1` of `bytes` bytes to one pool connection (or, without one, to
/// every connection), a new id each, 5 ms apart: an aggregated miner is sent only the newest of
/// the jobs that arrived since its last step, so a burst would reach it as one job. Stops early
/// once the connection is gone.
async fn flood_jobs(pool: &MockPool, conn: Option<u64>, job: &Job, count: usize, bytes: usize) {
    let mut job = job.clone();
    job.clean = false;
    job.coinb1 = vec![0x5a; bytes];
    for n in 0..count {
        job.id = format!("big{n}");
        let line = json!({"id": null, "method": "mining.notify", "params": job.notify_params()}).to_string();
        let sent = match conn {
            Some(conn) => pool.send_to(conn, &line),
            None => pool.broadcast(&line) > 0,
        };
        if !sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

in_both_modes!(
    tokio::test(flavor = "multi_thread", worker_threads = 2),
    a_miner_that_stops_reading_is_dropped_and_others_go_on
);
async fn a_miner_that_stops_reading_is_dropped_and_others_go_on(mode: Mode) {
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut config = mode_config(mode, pool.addr);
    // A pool session each in aggregate mode too, so that the flood reaches only the sleeper.
    config.aggregate.miners_per_upstream = 1;
    config.server.max_queue_bytes = 256 * 1024;
    let proxy = spawn_proxy(config).await;
    let slow_readers = || metric_now(&proxy, "loka_connections_closed_total", &[("reason", "slow_reader")]);
    let before = slow_readers().await;
    let mut sleeper = proxy.miner().await;
    sleeper.handshake("farm.sleeper").await;
    // The monitor's probe connects too: wait until only the sleeper's session is left.
    assert!(eventually(WAIT, || async { pool.connections() == 1 }).await, "{} pool connections", pool.connections());
    let sleeper_session = pool.newest_connection().unwrap();
    let mut worker = proxy.miner().await;
    worker.handshake("farm.worker").await;
    assert!(eventually(WAIT, || async { pool.connections() == 2 }).await, "a pool session each");
    assert_eq!(pool.subscribes(), 2);

    // Up to ~24 MB of jobs (coinb1 in hex) to the sleeper's session, which never reads them.
    flood_jobs(&pool, Some(sleeper_session), sleeper.job.as_ref().unwrap(), 400, 30_000).await;
    let closed = eventually(WAIT, || async { slow_readers().await >= before + 1.0 }).await;
    assert!(closed, "the slow reader was not dropped");
    assert!(sleeper.expect_closed(WAIT).await);
    let share = worker.any_share();
    let id = worker.submit("farm.worker", &share).await;
    assert_eq!(worker.wait_reply(&id).await.unwrap()["result"], true, "the other miner is unaffected");
    assert!(eventually(WAIT, || async { pool.accepted() == 1 }).await, "and its share reaches the pool");
    proxy.shutdown().await;
}

in_both_modes!(tokio::test, writes_stalled_past_write_timeout_drop_the_miner);
async fn writes_stalled_past_write_timeout_drop_the_miner(mode: Mode) {
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut config = mode_config(mode, pool.addr);
    // The queue is large enough that only the stalled write can end the session.
    config.server.max_queue_bytes = 256 * 1024 * 1024;
    config.server.max_queue_messages = 100_000;
    config.server.write_timeout = 30;
    let proxy = spawn_proxy(config).await;
    let write_failures = || metric_now(&proxy, "loka_connections_closed_total", &[("reason", "write_failed")]);
    let before = write_failures().await;
    let mut sleeper = proxy.miner().await;
    sleeper.handshake("farm.sleeper").await;
    // Let the relay fill every socket buffer on the way, then stop the clock.
    flood_jobs(&pool, None, sleeper.job.as_ref().unwrap(), 400, 30_000).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(31)).await;
    tokio::time::resume();
    let dropped = eventually(Duration::from_secs(10), || async { write_failures().await >= before + 1.0 }).await;
    assert!(dropped, "a write stalled past write_timeout ends the session");
    assert!(sleeper.expect_closed(WAIT).await);
    proxy.shutdown().await;
}

in_both_modes!(tokio::test, junk_floods_close_the_connection);
async fn junk_floods_close_the_connection(mode: Mode) {
    let pool = MockPool::start(PoolOptions::default()).await;
    // The line rate only throttles; the junk budget (10/s, burst 100) is what closes.
    let proxy = spawn_proxy(mode_config(mode, pool.addr)).await;
    let mut polite = proxy.miner().await;
    polite.handshake("farm.polite").await;
    let mut flooder = proxy.miner().await;
    flooder.handshake("farm.flood").await;
    let flood: String =
        (0..150).map(|i| format!("{{\"id\":{},\"method\":\"mining.junk\",\"params\":[]}}\n", 1000 + i)).collect();
    flooder.send(flood.trim_end()).await;
    assert!(flooder.expect_closed(Duration::from_secs(5)).await, "past the junk budget the connection is closed");
    let forwarded = pool.recorded_json().iter().filter(|m| m["method"] == "mining.junk").count();
    assert!(forwarded <= 110, "{forwarded} lines of the flood were forwarded");
    assert!(metric_now(&proxy, "loka_connections_closed_total", &[("reason", "rate_limited")]).await >= 1.0);
    let share = polite.any_share();
    let id = polite.submit("farm.polite", &share).await;
    assert_eq!(polite.wait_reply(&id).await.unwrap()["result"], true);
    proxy.shutdown().await;
}

in_both_modes!(tokio::test(flavor = "multi_thread", worker_threads = 2), a_fast_miner_is_throttled_never_closed);
/// An S21 (the zoo's fast ASIC) at a low pool difficulty: 1,000 valid shares a second for 30 s, past a line rate of
/// 800. It is read more slowly, and every submit is answered; nothing closes it.
async fn a_fast_miner_is_throttled_never_closed(mode: Mode) {
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut config = mode_config(mode, pool.addr);
    config.server.rate_limit = 800;
    config.server.rate_limit_burst = 1000;
    // Every hash meets the difficulty, which vardiff must not raise.
    config.vardiff.max_difficulty = 1e-12;
    let proxy = spawn_proxy(config).await;
    let mut s21 = S19::connect(proxy.addr, "farm.s21").await;
    let tally = s21.mine_for(Duration::from_secs(30), 10).await;
    assert_eq!((tally.answered, tally.accepted), (tally.sent, tally.sent), "every submit answered, and accepted");
    // Still connected: one more share is answered. (The close counters are the process's, which
    // the junk test shares.)
    let share = s21.miner.any_share();
    let id = s21.miner.submit("farm.s21", &share).await;
    assert_eq!(s21.miner.wait_reply(&id).await.expect("the fast miner is still connected")["result"], true);
    proxy.shutdown().await;
}

in_both_modes!(tokio::test, failed_authorizes_back_off_per_worker);
async fn failed_authorizes_back_off_per_worker(mode: Mode) {
    let pool = MockPool::start(PoolOptions { reject_user: Some("farm.bad".into()), ..PoolOptions::default() }).await;
    let mut config = mode_config(mode, pool.addr);
    // An aggregate proxy asks the pool about workers only with worker_passthrough.
    config.aggregate.worker_passthrough = true;
    let proxy = spawn_proxy(config).await;
    let mut miner = proxy.miner().await;
    miner.subscribe().await;
    // The workers' authorizes, not an aggregate session's own login as the pool's user.
    let authorizes = |worker: &str| {
        pool.recorded_json().iter().filter(|m| m["method"] == "mining.authorize" && m["params"][0] == worker).count()
    };

    // The pool's refusal, relayed in passthrough, the proxy's answer to it in aggregate mode.
    let refused = |reply: Value| reply["error"][0] == 24 && reply["result"] != true;
    assert!(refused(miner.authorize("farm.bad", "x").await));
    // Within 3 s the failing worker is answered locally...
    let reply = miner.authorize("farm.bad", "x").await;
    assert_eq!(reply["error"], json!([24, "too many failed authorizations; retry in 3 s", null]));
    // ...while other workers at its address, on its connection or another, go on.
    assert_eq!(miner.authorize("farm.good", "x").await["result"], true);
    let mut neighbour = proxy.miner().await;
    neighbour.subscribe().await;
    assert_eq!(neighbour.authorize("farm.good2", "x").await["result"], true, "the backoff is per worker");
    assert_eq!(authorizes("farm.bad"), 1);

    // Real time, not a paused clock: paused, the runtime jumps ahead while the pool's answer
    // crosses a real socket, and an aggregate group takes the pool's silence for a pool of one
    // authorize per connection.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(refused(miner.authorize("farm.bad", "x").await), "forwarded again after 3 s");
    assert_eq!(authorizes("farm.bad"), 2);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(miner.authorize("farm.bad", "x").await["error"][0], 24, "the second failure doubles the wait to 6 s");
    assert_eq!(authorizes("farm.bad"), 2);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(refused(miner.authorize("farm.bad", "x").await));
    assert_eq!(authorizes("farm.bad"), 3);
}

/// A miner with a submit in flight when the pool sends `line`: the line never reaches the miner,
/// the fault is counted, and the pool is judged down. In passthrough the submit gets exactly one
/// error and the connection closes; in aggregate mode the miner was answered from the proxy's own
/// check, stays connected, and the share is counted unanswered.
async fn assert_pool_fault(mode: Mode, line: &str, counter: &str, label: (&str, &str)) {
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut config = mode_config(mode, pool.addr);
    config.upstream.retry_initial_ms = 60_000;
    config.upstream.retry_max_ms = 60_000;
    let proxy = spawn_proxy(config).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig1").await;
    pool.set_submit_replies(SubmitReplies::Never);
    let share = miner.any_share();
    let id = miner.submit("farm.rig1", &share).await;
    assert!(pool.wait_submits(1).await);
    if mode == Mode::Aggregate {
        assert_eq!(miner.wait_reply(&id).await.unwrap()["result"], true, "answered from the proxy's check");
    }
    let lines_before = miner.raw.len();
    let probes = pool.probes();
    assert_eq!(pool.broadcast(line), 1);
    match mode {
        Mode::Passthrough => {
            let (messages, closed) = miner.drain_until_closed(Duration::from_secs(5)).await;
            assert!(closed, "the session ends on {line:.120}");
            let replies: Vec<&Value> = messages.iter().filter(|m| m["id"] == id).collect();
            assert_eq!(replies.len(), 1, "{messages:?}");
            assert_eq!(replies[0]["error"], json!([20, "upstream unavailable", null]));
        }
        Mode::Aggregate => {
            assert!(!miner.expect_closed(Duration::from_millis(500)).await, "the miner stays on {line:.120}");
            let unanswered = eventually(WAIT, || async {
                let labels = [("pool", pool.label()), ("result", "unanswered".into())];
                let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                metric_now(&proxy, "loka_upstream_shares_total", &labels).await >= 1.0
            })
            .await;
            assert!(unanswered, "the forwarded share is counted unanswered");
        }
    }
    // Nothing of the hostile line reaches the miner. In aggregate mode the group's next session
    // on the pool (which the probe finds up) sends its own first job, never the hostile one's
    // (prevhash 0707…).
    let relayed = |l: &String| match mode {
        Mode::Passthrough => l.contains("mining.notify") || l.contains("set_"),
        Mode::Aggregate => l.contains(&"07".repeat(32)) || l.contains("set_extranonce"),
    };
    assert!(!miner.raw[lines_before..].iter().any(relayed), "{:?}", miner.raw);
    let label = if label.0 == "pool" { ("pool", pool.label()) } else { (label.0, label.1.to_owned()) };
    assert!(metric_now(&proxy, counter, &[(label.0, &label.1)]).await >= 1.0, "{counter} for {line:.120}");
    // One session's fault is not the pool's health: the probe checks the pool at once, finds it
    // answering, and the proxy stays ready.
    assert!(eventually(WAIT, || async { pool.probes() > probes }).await, "the fault wakes the probe");
    assert_eq!(proxy.http_get("/ready").await.0, 200);
    proxy.shutdown().await;
}

in_both_modes!(tokio::test, hostile_pool_messages_are_faults);
async fn hostile_pool_messages_are_faults(mode: Mode) {
    let job = Job {
        id: "h".into(),
        prevhash: [7; 32],
        coinb1: vec![1; 40],
        coinb2: vec![2; 40],
        branch: vec![[3; 32]; 2],
        version: 0x2000_0000,
        nbits: 0x1d00_ffff,
        ntime: 0x6745_a1b0,
        clean: true,
    };
    let notify = |params: Value| json!({"id": null, "method": "mining.notify", "params": params}).to_string();
    let with = |i: usize, v: Value| {
        let mut p = job.notify_params();
        p[i] = v;
        notify(p)
    };
    let mut faults = vec![
        with(0, json!(17)),
        with(1, json!(["not", "hex"])),
        with(5, json!(536870912)),
        with(8, json!("true")),
        with(4, json!(vec![hex::encode([0u8; 32]); 33])),
        notify(json!(["h"])),
    ];
    for d in [json!(0), json!(-1), json!(1e300), json!("NaN")] {
        faults.push(json!({"id": null, "method": "mining.set_difficulty", "params": [d]}).to_string());
    }
    for size in [json!(0), json!(-2)] {
        faults.push(json!({"id": null, "method": "mining.set_extranonce", "params": ["0a0b0c0d", size]}).to_string());
    }
    for line in &faults {
        assert_pool_fault(mode, line, "loka_upstream_faults_total", ("pool", "")).await;
    }
    // A coinb1 over 64 KiB cannot even fit the pool line cap.
    let too_long = with(2, json!("00".repeat(64 * 1024 + 1)));
    assert_pool_fault(mode, &too_long, "loka_lines_too_long_total", ("source", "pool")).await;
}

in_both_modes!(tokio::test, unusable_extranonce2_sizes_are_not_relayed);
async fn unusable_extranonce2_sizes_are_not_relayed(mode: Mode) {
    for size in [0, 17] {
        let pool = MockPool::start(PoolOptions { extranonce2_size: size, ..PoolOptions::default() }).await;
        let proxy = spawn_proxy(mode_config(mode, pool.addr)).await;
        let mut miner = proxy.miner().await;
        let id = miner.request("mining.subscribe", json!(["bitaxe/2.4"])).await;
        let reply = miner.wait_reply(&id).await.expect("a reply");
        // A passthrough miner's own pool session failed; an aggregate proxy has no session to seat it in.
        let message = match mode {
            Mode::Passthrough => "upstream unavailable",
            Mode::Aggregate => "no upstream pool available, retry later",
        };
        assert_eq!(reply["error"], json!([20, message, null]), "size {size}");
        assert!(miner.expect_closed(Duration::from_secs(5)).await);
        proxy.shutdown().await;
    }
}

in_both_modes!(tokio::test, a_silent_pool_is_detected_by_the_job_timeout);
async fn a_silent_pool_is_detected_by_the_job_timeout(mode: Mode) {
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut config = mode_config(mode, pool.addr);
    config.upstream.job_timeout = 120;
    let proxy = spawn_proxy(config).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig1").await;
    // The pool keeps its connection open and sends nothing more.
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(119)).await;
    assert!(!miner.expect_closed(Duration::from_millis(10)).await);
    tokio::time::advance(Duration::from_secs(2)).await;
    // No job for 120 s: the pool session is dropped, and a passthrough miner with it.
    match mode {
        Mode::Passthrough => assert!(miner.expect_closed(Duration::from_secs(5)).await),
        Mode::Aggregate => assert!(!miner.expect_closed(Duration::from_millis(500)).await, "the miner stays"),
    }
    tokio::time::resume();
    let faults = metric_now(
        &proxy,
        "loka_upstream_faults_total",
        &[("pool", &pool.label()), ("reason", "no job within job_timeout")],
    )
    .await;
    assert_eq!(faults, 1.0);
}

/// Sends `client.reconnect` from pool `a` to `host`:`b`; returns how many connections each pool
/// got afterwards (the next miner's session) and the redirect counters.
async fn redirect(mode: Mode, allow: bool, host: &str) -> (usize, usize, f64, f64) {
    let a = MockPool::start(PoolOptions::default()).await;
    let b = MockPool::start(PoolOptions::default()).await;
    let mut config = mode_config(mode, a.addr);
    config.upstream.allow_pool_redirect = allow;
    let proxy = spawn_proxy(config).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig1").await;
    let line = json!({"id": null, "method": "client.reconnect", "params": [host, b.addr.port(), 0]}).to_string();
    let before = a.connections_accepted();
    a.broadcast(&line);
    // A passthrough miner reconnects to the proxy, which picks the pool; an aggregate session moves
    // under its miners.
    match mode {
        Mode::Passthrough => assert!(miner.expect_closed(Duration::from_secs(5)).await),
        Mode::Aggregate => assert!(wait_clean_job(&mut miner).await, "the session's next job"),
    }
    assert!(miner.raw.iter().all(|l| !l.contains("client.reconnect")), "never relayed");
    proxy.miner().await.handshake("farm.rig1").await;
    let label = a.label();
    let honoured = metric_now(&proxy, "loka_pool_redirects_total", &[("pool", &label), ("result", "honoured")]).await;
    let refused = metric_now(&proxy, "loka_pool_redirects_total", &[("pool", &label), ("result", "refused")]).await;
    proxy.shutdown().await;
    (a.connections_accepted() - before, b.connections_accepted(), honoured, refused)
}

in_both_modes!(tokio::test, pool_redirects_only_to_the_same_host_and_only_when_allowed);
async fn pool_redirects_only_to_the_same_host_and_only_when_allowed(mode: Mode) {
    assert_eq!(redirect(mode, false, "127.0.0.1").await, (1, 0, 0.0, 1.0), "off by default");
    assert_eq!(redirect(mode, true, "evil.example").await, (1, 0, 0.0, 1.0), "never to another host");
    assert_eq!(redirect(mode, true, "127.0.0.1").await, (0, 1, 1.0, 0.0), "same host, allowed");
}

/// Reads until a clean job arrives; false if none comes within the wait.
async fn wait_clean_job(miner: &mut SimMiner) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match miner.recv_json(left).await {
            Some(msg) if msg["method"] == "mining.notify" && msg["params"][8] == json!(true) => return true,
            Some(_) => {}
            None => return false,
        }
    }
}

in_both_modes!(tokio::test, silent_sockets_are_reaped);
/// A raw socket that sends nothing is reaped at the handshake deadline, and its memory with it.
async fn silent_sockets_are_reaped(mode: Mode) {
    let pool = MockPool::start(PoolOptions::default()).await;
    let proxy = spawn_proxy(mode_config(mode, pool.addr)).await;
    let mut sockets = Vec::new();
    for _ in 0..50 {
        sockets.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    assert!(eventually(Duration::from_secs(5), || async { proxy.registry.len() == 50 }).await);
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(16)).await;
    tokio::time::resume();
    for mut s in sockets {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("closed in time");
        assert!(matches!(n, Ok(0) | Err(_)));
        let _ = s.shutdown().await;
    }
    assert!(eventually(Duration::from_secs(5), || async { proxy.registry.is_empty() }).await);
    proxy.shutdown().await;
}
