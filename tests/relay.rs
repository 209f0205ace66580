//! Relaying between miners and the pool: the handshake, id remapping, credential rewriting,
//! notifications, version rolling, and many miners at once.

mod support;

use serde_json::{json, Value};
use support::*;

/// The test's own hashing must match Bitcoin's before the pool can judge shares with it.
#[test]
fn share_hash_matches_public_block_vectors() {
    // Genesis: its coinbase split into coinb1 ‖ extranonce1 ‖ extranonce2 ‖ coinb2, no branch.
    let coinbase = hex::decode(
        "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff4d04ffff001d01\
         04455468652054696d65732030332f4a616e2f32303039204368616e63656c6c6f72206f6e206272696e6b206f6620\
         7365636f6e64206261696c6f757420666f722062616e6b73ffffffff0100f2052a01000000434104678afdb0fe5548\
         271967f1a67130b7105cd6a828e03909a67962e0ea1f61deb649f6bc3f4cef38c4f35504e51ec112de5c384df7ba0b\
         8d578a4c702b6bf11d5fac00000000",
    )
    .unwrap();
    let job = Job {
        id: "genesis".into(),
        prevhash: [0; 32],
        coinb1: coinbase[..40].to_vec(),
        coinb2: coinbase[48..].to_vec(),
        branch: vec![],
        version: 1,
        nbits: 0x1d00ffff,
        ntime: 0x495fab29,
        clean: true,
    };
    let (en1, en2) = (&coinbase[40..44], &coinbase[44..48]);
    let mut root = job.merkle_root(en1, en2);
    root.reverse();
    assert_eq!(hex::encode(root), "4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b");
    let mut hash = job.share_hash(en1, en2, 0x495fab29, 0x7c2bac1d, 1);
    assert!(hash_difficulty(&hash) >= 1.0);
    hash.reverse();
    assert_eq!(hex::encode(hash), "000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f");
    // A notify round trip keeps the job.
    assert_eq!(Job::from_notify(&job.notify_params()), Some(job));

    // Block 125552, with the prevhash as a notify spells it (word-swapped).
    let internal = |display: &str| -> [u8; 32] {
        let mut b: [u8; 32] = hex::decode(display).unwrap().try_into().unwrap();
        b.reverse();
        b
    };
    let prev = internal("00000000000008a3a41b85b8b29ad444def299fee21793cd8b9e567eab02cd81");
    let notify_prev = swap_words(&prev);
    let root = internal("2b12fcf1b09288fcaff797d71e950e71ae42b91e8bdb2304758dfcffc2b620e3");
    let mut hash = sha256d(&header(1, &swap_words(&notify_prev), &root, 1305998791, 440711666, 2504433986));
    hash.reverse();
    assert_eq!(hex::encode(hash), "00000000000000001e8d6829a8a21adc5d38d0a473b144b6765798e61f98bd1d");
}

#[tokio::test]
async fn handshake_relays_with_remapped_ids_and_rewritten_credentials() {
    let pool = MockPool::start(PoolOptions::default()).await;
    let mut config = proxy_config(pool.addr);
    config.upstream.user_template = "{pool_user}.{worker}".into();
    let proxy = spawn_proxy(config).await;
    let mut miner = proxy.miner().await;

    miner.request_with_id(json!(100), "mining.subscribe", json!(["bitaxe/2.4"])).await;
    let sub = miner.wait_reply(&json!(100)).await.expect("subscribe reply");
    assert!(sub["error"].is_null(), "{sub}");
    assert_eq!(sub["result"][2], 4);
    assert_eq!(sub["result"][1].as_str().map(str::len), Some(8));
    miner.extranonce1 = hex::decode(sub["result"][1].as_str().unwrap()).unwrap();
    miner.extranonce2_size = 4;

    miner.request_with_id(json!("abc"), "mining.authorize", json!(["farm.rig1", "minerpw"])).await;
    let auth = miner.wait_reply(&json!("abc")).await.expect("authorize reply");
    assert_eq!(auth, json!({"id": "abc", "result": true, "error": null}));

    // A notification: relayed, and the pool's reply to it is not passed on.
    miner.send(r#"{"id":null,"method":"mining.suggest_difficulty","params":[512]}"#).await;
    assert!(miner.wait_job().await);
    let share = miner.any_share();
    let params = json!(["farm.rig1", share.job_id, share.extranonce2, share.ntime, share.nonce]);
    miner.request_with_id(json!(7), "mining.submit", params.clone()).await;
    let submit = miner.wait_reply(&json!(7)).await.expect("submit reply");
    assert_eq!(submit, json!({"id": 7, "result": true, "error": null}));

    // What crossed the wire to the pool: the proxy's own ids from 1, the pool's credentials.
    let wire = pool.recorded_json();
    let seen: Vec<(Value, Value)> = wire.iter().map(|v| (v["id"].clone(), v["method"].clone())).collect();
    assert_eq!(
        seen,
        vec![
            (json!(1), json!("mining.subscribe")),
            (json!(2), json!("mining.authorize")),
            (json!(3), json!("mining.suggest_difficulty")),
            (json!(4), json!("mining.submit")),
        ],
        "{wire:?}"
    );
    assert_eq!(wire[0]["params"], json!(["bitaxe/2.4"]));
    assert_eq!(wire[1]["params"], json!(["acct.rig1", "pw"]));
    assert_eq!(wire[2]["params"], json!([512]));
    let mut rewritten = params.clone();
    rewritten[0] = json!("acct.rig1");
    assert_eq!(wire[3]["params"], rewritten);
    assert!(pool.recorded().iter().all(|l| !l.contains("minerpw") && !l.contains("farm.rig1")));

    // The miner got exactly its three replies, under its own ids.
    let replies: Vec<Value> = miner
        .raw
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(is_reply)
        .map(|r| r["id"].clone())
        .collect();
    assert_eq!(replies, vec![json!(100), json!("abc"), json!(7)]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn pool_errors_and_unknown_methods_are_relayed_under_the_miners_id() {
    let opts =
        PoolOptions { reject_user: Some("bad.worker".into()), reject_duplicates: true, ..PoolOptions::default() };
    let pool = MockPool::start(opts).await;
    let proxy = spawn_proxy(proxy_config(pool.addr)).await;
    let mut miner = proxy.miner().await;
    miner.handshake("good.worker").await;

    let rejected = miner.authorize("bad.worker", "x").await;
    assert_eq!(rejected["result"], json!(false));
    assert_eq!(rejected["error"][0], 24);

    let share = miner.any_share();
    let first = miner.submit("good.worker", &share).await;
    assert_eq!(miner.wait_reply(&first).await.unwrap()["result"], json!(true));
    let again = miner.submit("good.worker", &share).await;
    let dup = miner.wait_reply(&again).await.unwrap();
    assert_eq!(dup, json!({"id": again, "result": null, "error": [22, "Duplicate share", null]}));

    miner.request_with_id(json!("x-9"), "mining.frobnicate", json!([1, 2])).await;
    let unknown = miner.wait_reply(&json!("x-9")).await.unwrap();
    assert_eq!(unknown["error"][0], 20);
    assert!(pool.recorded_methods().contains(&"mining.frobnicate".to_owned()));
    assert!(!miner.expect_closed(std::time::Duration::from_millis(200)).await, "errors do not close the miner");
    proxy.shutdown().await;
}

#[tokio::test]
async fn crlf_terminators_and_blank_lines_from_firmware() {
    let pool = MockPool::start(PoolOptions::default()).await;
    let proxy = spawn_proxy(proxy_config(pool.addr)).await;
    let mut miner = proxy.miner().await;
    miner.send("\r\n").await;
    miner.send(r#"{"id":1,"method":"mining.subscribe","params":[]}"#).await;
    let reply = miner.wait_reply(&json!(1)).await.expect("subscribe reply");
    assert!(reply["error"].is_null(), "{reply}");
    miner.send("{\"id\":2,\"method\":\"mining.authorize\",\"params\":[\"w\",\"x\"]}\r\n\r\n").await;
    assert_eq!(miner.wait_reply(&json!(2)).await.unwrap()["result"], json!(true));
    assert_eq!(pool.recorded_methods(), ["mining.subscribe", "mining.authorize"]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn pool_notifications_are_relayed_verbatim() {
    let pool = MockPool::start(PoolOptions::default()).await;
    let proxy = spawn_proxy(proxy_config(pool.addr)).await;
    let mut miner = proxy.miner().await;
    miner.handshake("w").await;

    let mut job = miner.job.clone().unwrap();
    job.id = "next-job".into();
    job.clean = false;
    let lines = [
        r#"{"id":null,"method":"mining.set_difficulty","params":[0.125]}"#.to_owned(),
        r#"{"id":null,"method":"client.show_message","params":["maintenance at 12:00"]}"#.to_owned(),
        r#"{"id":null,"method":"mining.set_version_mask","params":["1fffe000"]}"#.to_owned(),
        r#"{"id":null,"method":"mining.set_extranonce","params":["0badcafe",4]}"#.to_owned(),
        json!({"id": null, "method": "mining.notify", "params": job.notify_params()}).to_string(),
    ];
    for line in &lines {
        assert!(pool.broadcast(line) >= 1);
        let got = miner.recv_line(WAIT).await.expect("relayed line");
        assert_eq!(&got, line);
    }
    assert_eq!(miner.difficulty, 0.125);
    assert_eq!(miner.extranonce1, hex::decode("0badcafe").unwrap());
    assert_eq!(miner.job.as_ref().map(|j| j.id.as_str()), Some("next-job"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn version_rolling_is_negotiated_and_relayed() {
    let opts = PoolOptions { validate: true, difficulty: 1e-6, ..PoolOptions::default() };
    let pool = MockPool::start(opts).await;
    let proxy = spawn_proxy(proxy_config(pool.addr)).await;
    let mut miner = proxy.miner().await;

    // Firmware sends configure before subscribe.
    let reply = miner.configure("00fff000").await;
    assert_eq!(reply["result"], json!({"version-rolling": true, "version-rolling.mask": "00ffe000"}));
    assert_eq!(miner.version_mask, Some(0x00ffe000));
    let configure = &pool.recorded_json()[0];
    assert_eq!(configure["method"], "mining.configure");
    assert_eq!(
        configure["params"],
        json!([["version-rolling"], {"version-rolling.mask": "00fff000", "version-rolling.min-bit-count": 2}])
    );

    miner.handshake("roller").await;
    for bits in [0x0000_2000u32, 0x00ff_e000] {
        let share = miner.grind(Some(bits));
        let id = miner.submit("roller", &share).await;
        let reply = miner.wait_reply(&id).await.expect("submit reply");
        assert_eq!(reply["result"], json!(true), "{reply}");
    }
    // Six params, relayed as the miner sent them.
    let submits = pool.submits();
    assert_eq!(submits.len(), 2);
    assert_eq!(submits[0]["params"].as_array().unwrap().len(), 6);
    assert_eq!(submits[0]["params"][5], "00002000");
    assert_eq!(submits[1]["params"][5], "00ffe000");
    assert_eq!((pool.accepted(), pool.rejected()), (2, 0));

    // Bits outside the negotiated mask are refused by the proxy and never reach the pool.
    let mut bad = miner.grind(Some(0x0000_2000));
    bad.version_bits = Some("10000000".into());
    let id = miner.submit("roller", &bad).await;
    let reply = miner.wait_reply(&id).await.unwrap();
    assert_eq!(reply["error"], json!([20, "version bits outside the negotiated mask", null]), "{reply}");
    assert_eq!(pool.submits().len(), 2);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_miners() {
    const MINERS: usize = 200;
    const SHARES: usize = 3;
    let pool = MockPool::start(PoolOptions::default()).await;
    let proxy = spawn_proxy(proxy_config(pool.addr)).await;

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..MINERS {
        let addr = proxy.addr;
        tasks.spawn(async move {
            let worker = format!("farm.w{i}");
            let mut miner = SimMiner::connect(addr).await;
            miner.handshake(&worker).await;
            for _ in 0..SHARES {
                let share = miner.any_share();
                let id = miner.submit(&worker, &share).await;
                let reply = miner.wait_reply(&id).await.expect("submit reply");
                assert_eq!(reply["result"], json!(true), "{reply}");
            }
            miner
        });
    }
    let mut miners = Vec::new();
    while let Some(done) = tasks.join_next().await {
        miners.push(done.expect("miner task"));
    }
    assert_eq!(miners.len(), MINERS);
    // Each miner has its own session and its own pool connection.
    assert_eq!(proxy.registry.len(), MINERS);
    let en1: std::collections::HashSet<_> = miners.iter().map(|m| m.extranonce1.clone()).collect();
    assert_eq!(en1.len(), MINERS);
    assert_eq!(pool.submits().len(), MINERS * SHARES);
    assert_eq!(pool.accepted(), (MINERS * SHARES) as u64);
    drop(miners);
    proxy.shutdown().await;
}

#[tokio::test]
async fn pool_reconnect_closes_the_miner_and_get_version_is_answered() {
    let pool = MockPool::start(PoolOptions::default()).await;
    let proxy = spawn_proxy(proxy_config(pool.addr)).await;
    let mut miner = proxy.miner().await;
    miner.handshake("w").await;

    pool.broadcast(r#"{"id":"gv-1","method":"client.get_version","params":[]}"#);
    let answered = pool
        .wait_recorded(|v| {
            v["id"] == "gv-1"
                && v["error"].is_null()
                && v["result"].as_str().is_some_and(|r| r.starts_with("loka-stratum/"))
        })
        .await;
    assert!(answered, "the proxy answers client.get_version: {:?}", pool.recorded());

    pool.broadcast(r#"{"id":null,"method":"client.reconnect","params":["evil.example",3333,0]}"#);
    assert!(miner.expect_closed(WAIT).await, "client.reconnect closes the miner");
    assert!(
        miner.raw.iter().all(|l| !l.contains("client.reconnect") && !l.contains("client.get_version")),
        "{:?}",
        miner.raw
    );
    // The miner comes back through the proxy, not to the pool's target.
    let mut again = proxy.miner().await;
    again.handshake("w").await;
    proxy.shutdown().await;
}
