//! The admin port's numbers against the pool's own count, in both modes: the proxy's verdicts and
//! the pool's kept apart. Alone in its binary: the metrics recorder is process-global, and the two
//! modes take turns on it.

mod support;

use loka_stratum::config::Mode;
use serde_json::{json, Value};
use support::*;

in_both_modes!(tokio::test(flavor = "multi_thread", worker_threads = 2), admin_port_matches_the_pool);
async fn admin_port_matches_the_pool(mode: Mode) {
    const MINERS: usize = 4;
    const SHARES: u64 = 5;
    const DIFFICULTY: f64 = 1e-6;
    let pool = MockPool::start(PoolOptions { validate: true, difficulty: DIFFICULTY, ..PoolOptions::default() }).await;
    let mut config = mode_config(mode, pool.addr);
    // Aggregated miners work at the pool's difficulty, held there: every share the proxy accepts
    // is forwarded, as in passthrough.
    config.vardiff.start_difficulty = DIFFICULTY;
    config.vardiff.min_difficulty = DIFFICULTY;
    config.vardiff.max_difficulty = DIFFICULTY;
    let proxy = spawn_proxy(config).await;
    let label = pool.label();
    // Counters without a pool label are the process's: the twin in the other mode moved them too.
    let (_, text) = proxy.http_get("/metrics").await;
    let submits_before =
        metric(&text, "loka_messages_total", &[("method", "mining.submit"), ("direction", "from_miner")])
            .unwrap_or(0.0);
    let connections_before = metric(&text, "loka_connections_active", &[]).unwrap_or(0.0);

    let mut miners = Vec::new();
    for i in 0..MINERS {
        let worker = format!("farm.w{i}");
        let mut miner = proxy.miner().await;
        miner.handshake(&worker).await;
        assert_eq!(miner.difficulty, DIFFICULTY);
        for _ in 0..SHARES {
            let share = miner.grind(None);
            let id = miner.submit(&worker, &share).await;
            let reply = miner.wait_reply(&id).await.expect("submit reply");
            assert_eq!(reply["result"], json!(true), "{reply}");
        }
        miners.push(miner);
    }
    // One share that misses the target, from the first worker.
    let miner = &mut miners[0];
    let mut low = miner.grind(None);
    let job = miner.job.clone().unwrap();
    let en2 = hex::decode(&low.extranonce2).unwrap();
    let nonce = (0u32..1000)
        .find(|n| hash_difficulty(&job.share_hash(&miner.extranonce1, &en2, job.ntime, *n, job.version)) < DIFFICULTY)
        .unwrap();
    low.nonce = format!("{nonce:08x}");
    let id = miner.submit("farm.w0", &low).await;
    assert_eq!(miner.wait_reply(&id).await.unwrap()["error"][0], 23);
    // One share that passes the proxy's checks and that the pool rejects, from the second worker.
    pool.set_submit_replies(SubmitReplies::Reject);
    let miner = &mut miners[1];
    let share = miner.grind(None);
    let id = miner.submit("farm.w1", &share).await;
    let reply = miner.wait_reply(&id).await.unwrap();
    match mode {
        Mode::Passthrough => assert_eq!(reply["error"][0], 23, "the pool's verdict reaches the miner: {reply}"),
        // An aggregated miner is answered from the proxy's own check; the pool's verdict is counted.
        Mode::Aggregate => assert_eq!(reply["result"], true, "the proxy's verdict reaches the miner: {reply}"),
    }

    let total = MINERS as u64 * SHARES;
    // The low-difficulty share was refused by the proxy: the pool never saw it. An aggregate
    // proxy forwards after answering: wait for the pool's count.
    assert!(pool.wait_submits(total as usize + 1).await);
    assert!(eventually(WAIT, || async { pool.rejected() == 1 }).await);
    assert_eq!(pool.submits().len() as u64, total + 1);
    assert_eq!((pool.accepted(), pool.rejected()), (total, 1));

    // The proxy records an outcome right after writing the reply, so poll briefly.
    let pool_label = [("pool", label.as_str())];
    let upstream = |result| [("pool", label.as_str()), ("result", result)];
    let settled = eventually(WAIT, || async {
        let (_, text) = proxy.http_get("/metrics").await;
        metric(&text, "loka_shares_accepted_total", &pool_label) == Some((total + 1) as f64)
            && metric(&text, "loka_shares_rejected_total", &pool_label) == Some(1.0)
            && metric(&text, "loka_upstream_shares_total", &upstream("rejected")) == Some(1.0)
    })
    .await;
    let (status, text) = proxy.http_get("/metrics").await;
    assert!(settled, "{text}");
    assert_eq!(status, 200);
    let value = |name: &str, labels: &[(&str, &str)]| metric(&text, name, labels);
    // The pool's own counts are the pool's verdicts in the metrics.
    assert_eq!(value("loka_shares_submitted_total", &pool_label), Some(pool.submits().len() as f64));
    assert_eq!(value("loka_upstream_shares_total", &upstream("accepted")), Some(pool.accepted() as f64));
    assert_eq!(value("loka_upstream_shares_total", &upstream("rejected")), Some(pool.rejected() as f64));
    assert_eq!(value("loka_upstream_shares_total", &upstream("unanswered")), Some(0.0));
    assert_eq!(value("loka_upstream_shares_total", &upstream("dropped")), Some(0.0));
    assert_eq!(
        value("loka_upstream_rejects_total", &[("pool", label.as_str()), ("reason", "low_difficulty")]),
        Some(1.0)
    );
    // The proxy's verdicts: every share but the low one passed its checks.
    assert_eq!(value("loka_shares_accepted_total", &pool_label), Some((total + 1) as f64));
    assert_eq!(
        value("loka_shares_rejected_total", &[("pool", label.as_str()), ("reason", "low_difficulty")]),
        Some(1.0)
    );
    assert_eq!(value("loka_shares_local_only_total", &pool_label), Some(0.0));
    // Difficulty 1e-6 is one unit of the counter.
    let work = value("loka_shares_accepted_microdifficulty_total", &pool_label).unwrap();
    assert_eq!(work, ((total + 1) as f64 * DIFFICULTY * 1e6).round(), "{work}");
    assert_eq!(value("loka_pool_up", &pool_label), Some(1.0));
    // A pool session per miner in passthrough; the miners share one in aggregate mode.
    let sessions = match mode {
        Mode::Passthrough => MINERS,
        Mode::Aggregate => 1,
    };
    assert_eq!(value("loka_upstream_sessions_active", &pool_label), Some(sessions as f64));
    assert_eq!(value("loka_connections_active", &[]).map(|v| v - connections_before), Some(MINERS as f64));
    assert_eq!(
        value("loka_messages_total", &[("method", "mining.submit"), ("direction", "from_miner")])
            .map(|v| v - submits_before),
        Some((total + 2) as f64)
    );
    assert!(text.contains("# HELP loka_shares_accepted_total"), "{text}");

    let (status, body) = proxy.http_get("/api/v1/connections").await;
    assert_eq!(status, 200);
    let workers: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(workers.len(), MINERS, "{body}");
    for i in 0..MINERS {
        let name = format!("farm.w{i}");
        let w = workers.iter().find(|w| w["worker"] == name.as_str()).unwrap_or_else(|| panic!("{name} in {body}"));
        assert_eq!(w["state"], "authorized", "{w}");
        assert_eq!(w["upstream"], label.as_str(), "{w}");
        let accepted = SHARES + u64::from(i == 1);
        assert_eq!(w["accepted"], accepted, "{w}");
        assert_eq!(w["rejected"], u64::from(i == 0), "{w}");
        assert_eq!(w["pool_accepted"], SHARES, "{w}");
        assert_eq!(w["pool_rejected"], u64::from(i == 1), "{w}");
        assert_eq!(w["difficulty"], DIFFICULTY, "{w}");
        let work = w["accepted_difficulty"].as_f64().unwrap();
        assert!((work - accepted as f64 * DIFFICULTY).abs() < 1e-12, "{w}");
        assert!(w["hashrate_5m"].as_f64().unwrap() > 0.0, "{w}");
        assert!(w["last_share"].as_u64().is_some(), "{w}");
        assert!(w["connected_since"].as_u64().unwrap() > 1_600_000_000, "{w}");
        assert!(w["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{w}");
    }

    let (status, body) = proxy.http_get("/health").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = proxy.http_get("/ready").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"ready": true, "pools": [{"pool": label, "up": true}]})
    );
    drop(miners);
    proxy.shutdown().await;
}
