//! The zoo: every simulated firmware and every simulated pool behaviour of `tests/support`, through
//! the proxy in both modes, with what an operator expects of each: no disconnect, every submit
//! answered, valid shares accepted by the pool, stale and low-difficulty shares handled as such.
//! The miners hash real sha256d, and the pools check it. Real sockets, so the real clock, with
//! short intervals standing in for long ones.

mod support;

use std::time::Duration;

use loka_stratum::config::Mode;
use serde_json::{json, Value};
use support::firmware::{Bitaxe, CpuMiner, NatFarm, VersionRollingAsic, XnsubMiner, S19};
use support::*;
use tokio::time::Instant;

async fn metric_now(proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, text) = proxy.http_get("/metrics").await;
    metric(&text, name, labels).unwrap_or(0.0)
}

async fn submit(miner: &mut SimMiner, worker: &str, share: &Share) -> Value {
    let id = miner.submit(worker, share).await;
    miner.wait_reply(&id).await.expect("every submit is answered")
}

/// Waits until the pool has accepted `n` shares, and asserts it rejected none.
async fn pool_accepted(pool: &MockPool, n: u64) {
    let reached = eventually(WAIT, || async { pool.accepted() >= n }).await;
    assert!(reached && pool.accepted() == n, "the pool accepted {} shares, not {n}", pool.accepted());
    assert_eq!(pool.rejected(), 0, "the pool rejected shares");
}

// ---------------------------------------------------------------------------------------------
// The firmware zoo.
// ---------------------------------------------------------------------------------------------

in_both_modes!(tokio::test(flavor = "multi_thread", worker_threads = 2), fast_asic);
/// An S19 at 300 shares a second for 2 s, past a line rate of 200: throttled, never closed, and
/// every share answered and accepted, by the pool too.
async fn fast_asic(mode: Mode) {
    let pool = MockPool::start(PoolOptions::validating()).await;
    let mut c = mode_config(mode, pool.addr);
    c.server.rate_limit = 200;
    c.server.rate_limit_burst = 200;
    c.vardiff.max_difficulty = 1e-12;
    let proxy = spawn_proxy(c).await;
    let mut s19 = S19::connect(proxy.addr, "farm.s19").await;
    let tally = s19.mine_for(Duration::from_secs(2), 3).await;
    assert_eq!((tally.answered, tally.accepted), (tally.sent, tally.sent), "{tally:?}");
    pool_accepted(&pool, tally.sent).await;
    assert!(!s19.miner.closed);
    proxy.shutdown().await;
}

in_both_modes!(tokio::test(flavor = "multi_thread", worker_threads = 2), shares_in_one_write);
/// An S19 that flushes 50 shares in one write, as firmware does after a stall: the proxy takes
/// the lines it already holds in one pass (32 at most) and answers them in one write. Each share
/// is answered once, in the order sent, counted once, and accepted by the pool once.
async fn shares_in_one_write(mode: Mode) {
    let pool = MockPool::start(PoolOptions::validating()).await;
    let mut c = mode_config(mode, pool.addr);
    c.vardiff.max_difficulty = 1e-12;
    let proxy = spawn_proxy(c).await;
    let accepted_before = metric_now(&proxy, "loka_shares_accepted_total", &[("pool", &pool.label())]).await;
    let mut s19 = S19::connect(proxy.addr, "farm.s19").await;
    let mut burst = String::new();
    for id in 1..=50 {
        let s = s19.miner.grind(None);
        let params = json!([s19.worker, s.job_id, s.extranonce2, s.ntime, s.nonce]);
        burst += &json!({"id": id, "method": "mining.submit", "params": params}).to_string();
        burst.push('\n');
    }
    s19.miner.send_bytes(burst.as_bytes()).await;
    let mut ids = Vec::new();
    while ids.len() < 50 {
        let reply = s19.miner.recv_json(WAIT).await.expect("every share of the burst is answered");
        if reply["id"].is_u64() {
            assert_eq!(reply["result"], true, "{reply}");
            ids.push(reply["id"].as_u64().unwrap());
        }
    }
    assert_eq!(ids, (1..=50).collect::<Vec<_>>(), "answered in the order sent");
    pool_accepted(&pool, 50).await;
    let accepted = metric_now(&proxy, "loka_shares_accepted_total", &[("pool", &pool.label())]).await;
    assert_eq!(accepted - accepted_before, 50.0, "each share counted once");
    assert!(s19.miner.recv_json(Duration::from_millis(200)).await.is_none_or(|m| !m["id"].is_u64()), "no reply twice");
    proxy.shutdown().await;
}

in_both_modes!(tokio::test, slow_bitaxe);
/// `idle_timeout` is for connections that have not authorized. A Bitaxe silent for longer than
/// it, through several jobs, stays, and its shares are accepted.
async fn slow_bitaxe(mode: Mode) {
    let pool = MockPool::start(PoolOptions::validating()).await;
    let mut config = mode_config(mode, pool.addr);
    config.server.idle_timeout = 1;
    let proxy = spawn_proxy(config).await;
    let idle_before = metric_now(&proxy, "loka_connections_closed_total", &[("reason", "idle")]).await;
    let mut bitaxe = Bitaxe::connect(proxy.addr, "farm.bitaxe", Duration::from_millis(2500)).await;
    let mut unauthorized = proxy.miner().await;
    unauthorized.subscribe().await;
    for round in 1..=2 {
        // Jobs that keep the earlier ones valid, so no share crosses a clean job.
        let jobs = async {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(700)).await;
                // A passthrough proxy has a pool session for the unauthorized one too.
                assert!(pool.new_job_kept() >= 1, "the pool has a session");
            }
        };
        let (reply, ()) = tokio::join!(bitaxe.next_share(), jobs);
        let reply = reply.expect("the Bitaxe is still connected, and answered");
        assert_eq!(reply["result"], true, "{reply}");
        assert!(bitaxe.jobs >= 3 * round, "round {round}: {} jobs while silent", bitaxe.jobs);
    }
    pool_accepted(&pool, 2).await;
    assert!(unauthorized.expect_closed(Duration::from_secs(1)).await, "closed by idle_timeout");
    let idle = metric_now(&proxy, "loka_connections_closed_total", &[("reason", "idle")]).await - idle_before;
    assert_eq!(idle, 1.0, "one idle eviction: the unauthorized connection");
    proxy.shutdown().await;
}

in_both_modes!(tokio::test(flavor = "multi_thread", worker_threads = 2), stubborn_cpuminer);
/// cpuminer finds a share about every 150 ms while the pool sends a job that keeps the earlier
/// ones every 100 ms: it finishes its scans on jobs that are no longer the newest, and each of
/// those shares is accepted. A clean job then moves it at once.
async fn stubborn_cpuminer(mode: Mode) {
    let pool = MockPool::start(PoolOptions { difficulty: 1e-9, ..PoolOptions::validating() }).await;
    let mut c = mode_config(mode, pool.addr);
    c.vardiff.start_difficulty = 1e-9;
    c.vardiff.min_difficulty = 1e-9;
    let proxy = spawn_proxy(c).await;
    // Difficulty 1e-9 is a share in about 4.3 hashes.
    let mut cpu = CpuMiner::connect(proxy.addr, "farm.cpu", 30.0).await;
    for _ in 0..15 {
        cpu.run_until(Instant::now() + Duration::from_millis(100)).await;
        assert_eq!(pool.new_job_kept(), 1);
    }
    pool.new_job();
    cpu.run_until(Instant::now() + Duration::from_millis(500)).await;
    assert!(cpu.settle(WAIT).await, "every share answered");
    assert!(cpu.shares.len() >= 5, "{} shares", cpu.shares.len());
    assert!(cpu.refused.iter().all(|r| r["error"][0] == 21), "only stale ones: {:?}", cpu.refused);
    assert!(cpu.refused.len() <= 1, "at most the one share in flight at the clean job: {:?}", cpu.refused);
    pool_accepted(&pool, cpu.accepted).await;
    assert!(cpu.behind >= 1, "no share on a job that a newer one had followed");
    eprintln!("{mode:?}: {} shares, {} on an older job, {:?} refused", cpu.shares.len(), cpu.behind, cpu.refused);
    proxy.shutdown().await;
}

in_both_modes!(tokio::test(flavor = "multi_thread", worker_threads = 2), version_rolling_asic);
/// A Whatsminer configures version rolling and suggests a difficulty before it authorizes; its
/// rolled shares are valid sha256d, and the pool accepts every one with its version bits.
async fn version_rolling_asic(mode: Mode) {
    let pool = MockPool::start(PoolOptions::validating()).await;
    let proxy = spawn_proxy(mode_config(mode, pool.addr)).await;
    let mut asic = VersionRollingAsic::connect(proxy.addr, "farm.m30", 1e-9).await;
    assert_eq!(asic.configured["result"], json!({"version-rolling": true, "version-rolling.mask": "1fffe000"}));
    match mode {
        // Relayed: the pool hears it before the worker's authorize.
        Mode::Passthrough => {
            let methods = pool.recorded_methods();
            let suggest = methods.iter().position(|m| m == "mining.suggest_difficulty");
            let authorize = methods.iter().position(|m| m == "mining.authorize");
            assert!(suggest.is_some() && suggest < authorize, "{methods:?}");
        }
        // Taken by the proxy's vardiff: the miner works at what it asked for.
        Mode::Aggregate => assert_eq!(asic.miner.difficulty, 1e-9),
    }
    for _ in 0..20 {
        let reply = asic.share().await.expect("answered");
        assert_eq!(reply["result"], true, "{reply}");
    }
    pool_accepted(&pool, 20).await;
    let bits: std::collections::HashSet<String> =
        pool.submits().iter().map(|s| s["params"][5].as_str().expect("version bits").to_owned()).collect();
    assert_eq!(bits.len(), 20, "every share rolled other bits");
    assert!(!asic.miner.closed);
    proxy.shutdown().await;
}

in_both_modes!(tokio::test(flavor = "multi_thread", worker_threads = 2), xnsub_miner);
/// NiceHash-style firmware subscribes to extranonce changes; when the pool changes its
/// extranonce (to a smaller extranonce2), the miner is told and its next shares are accepted.
async fn xnsub_miner(mode: Mode) {
    let pool = MockPool::start(PoolOptions::validating()).await;
    let proxy = spawn_proxy(mode_config(mode, pool.addr)).await;
    let mut nh = XnsubMiner::connect(proxy.addr, "farm.nh").await;
    assert_eq!(nh.share().await.expect("answered")["result"], true);
    // An aggregated miner is answered before the pool sees its share: let it arrive first.
    assert!(eventually(WAIT, || async { pool.accepted() == 1 }).await);
    let size_before = nh.miner.extranonce2_size;
    // The proxy's health probe may still hold a connection: the change is for the session alone.
    assert!(eventually(WAIT, || async { pool.connections() == 1 }).await, "one pool session");
    assert_eq!(pool.set_extranonce(6), 1);
    assert!(nh.miner.clean_job(WAIT).await.is_some(), "a clean job after the change");
    let set = nh.miner.notifications.iter().rfind(|n| n["method"] == "mining.set_extranonce").cloned();
    let set = set.expect("mining.set_extranonce reached the miner");
    // Passthrough relays the pool's; an aggregate proxy keeps the miner's prefix and gives it
    // what is left after its own 2 bytes.
    let size = match mode {
        Mode::Passthrough => 6,
        Mode::Aggregate => 4,
    };
    assert_eq!(set["params"][1].as_u64(), Some(size as u64), "was {size_before}");
    assert_eq!(nh.miner.extranonce2_size, size);
    for _ in 0..3 {
        assert_eq!(nh.share().await.expect("answered")["result"], true);
    }
    pool_accepted(&pool, 4).await;
    assert!(!nh.miner.closed);
    proxy.shutdown().await;
}

in_both_modes!(tokio::test, nat_farm);
/// 50 miners from 127.0.0.1, 5 of them with a bad password. The 45 others authorize, reconnect
/// and have their shares accepted throughout, while each bad worker reaches the pool once and is
/// then answered locally.
async fn nat_farm(mode: Mode) {
    let pool = MockPool::start(PoolOptions { reject_password: Some("bad".into()), ..PoolOptions::validating() }).await;
    let mut config = mode_config(mode, pool.addr);
    config.aggregate.worker_passthrough = true;
    let proxy = spawn_proxy(config).await;
    let farm = NatFarm { proxy: proxy.addr, good: 45, bad: 5 };
    let pool_authorizes = |prefix: &str| {
        pool.recorded_json()
            .iter()
            .filter(|m| {
                m["method"] == "mining.authorize" && m["params"][0].as_str().is_some_and(|u| u.starts_with(prefix))
            })
            .count()
    };

    // The bad ones fail first, so that an address-wide backoff would hit every miner after them.
    let mut bad = farm.connect_bad().await;
    NatFarm::retry_bad(&mut bad).await;
    // Connect, authorize and mine; twice, on new connections, with the bad ones retrying between.
    let first = farm.mine(0).await;
    NatFarm::retry_bad(&mut bad).await;
    drop(first);
    let second = farm.mine(1).await;
    NatFarm::retry_bad(&mut bad).await;

    assert_eq!(pool_authorizes("farm.bad"), farm.bad, "each bad worker reached the pool once");
    assert!(pool_authorizes("farm.rig") >= farm.good, "the good workers were asked about upstream");
    pool_accepted(&pool, (farm.good * 4) as u64).await;
    for mut m in second {
        assert!(!m.expect_closed(Duration::from_millis(1)).await, "the good miners stay connected");
    }
}

// ---------------------------------------------------------------------------------------------
// The pool zoo.
// ---------------------------------------------------------------------------------------------

in_both_modes!(tokio::test(flavor = "multi_thread", worker_threads = 2), ckpool_ignores_a_second_authorize);
/// ckpool answers one authorize per connection. A miner with two workers, or one that authorizes
/// again, gets an answer to each and stays, and the shares of its authorized workers are accepted.
/// An aggregate proxy authorizes the workers itself; a passthrough one relays them, so ckpool's
/// silence is answered with an error after `submit_timeout`, and only the first worker mines.
async fn ckpool_ignores_a_second_authorize(mode: Mode) {
    let pool = MockPool::start(PoolOptions::ckpool()).await;
    let mut c = mode_config(mode, pool.addr);
    c.aggregate.worker_passthrough = true;
    c.upstream.submit_timeout = 2;
    let proxy = spawn_proxy(c).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig1").await;
    let started = Instant::now();
    let second = miner.authorize("farm.rig2", "x").await;
    let again = miner.authorize("farm.rig1", "x").await;
    eprintln!("{mode:?}: second worker {second} and again {again} after {:?}", started.elapsed());
    let share = miner.grind(None);
    assert_eq!(submit(&mut miner, "farm.rig1", &share).await["result"], true);
    let share = miner.grind(None);
    let rig2 = submit(&mut miner, "farm.rig2", &share).await;
    match mode {
        Mode::Passthrough => {
            let silence = json!([20, "no answer from the pool", null]);
            assert_eq!((&second["error"], &again["error"]), (&silence, &silence));
            assert!(started.elapsed() < Duration::from_secs(6), "each within submit_timeout");
            assert_eq!(rig2["error"][0], 24, "{rig2}");
        }
        Mode::Aggregate => {
            assert_eq!((&second["result"], &again["result"]), (&json!(true), &json!(true)));
            assert_eq!(rig2["result"], true, "{rig2}");
        }
    }
    assert!(!miner.expect_closed(Duration::from_millis(200)).await, "the miner stays");
    pool_accepted(&pool, if mode == Mode::Passthrough { 1 } else { 2 }).await;
    proxy.shutdown().await;
}

in_both_modes!(tokio::test(flavor = "multi_thread", worker_threads = 2), a_pool_that_refuses_version_rolling);
/// A pool that refuses `mining.configure`: the Whatsminer rolls nothing, nothing is rolled
/// upstream, and its shares are accepted.
async fn a_pool_that_refuses_version_rolling(mode: Mode) {
    let pool = MockPool::start(PoolOptions::no_version_rolling()).await;
    let proxy = spawn_proxy(mode_config(mode, pool.addr)).await;
    let mut asic = VersionRollingAsic::connect(proxy.addr, "farm.m30", 1e-9).await;
    // Passthrough relays the pool's error; aggregate mode answers false itself.
    assert_ne!(asic.configured["result"]["version-rolling"], json!(true), "{}", asic.configured);
    assert_eq!(asic.miner.version_mask, None);
    // Firmware that rolls anyway is refused here...
    let rolled = Share { version_bits: Some("00002000".into()), ..asic.miner.grind(None) };
    assert_eq!(submit(&mut asic.miner, "farm.m30", &rolled).await["error"][0], 20, "refused here");
    // ...while bits of zero roll nothing: the share goes up without them, as the pool expects.
    let unrolled = Share { version_bits: Some("00000000".into()), ..asic.miner.grind(None) };
    assert_eq!(submit(&mut asic.miner, "farm.m30", &unrolled).await["result"], true);
    for _ in 0..5 {
        assert_eq!(asic.share().await.expect("answered")["result"], true);
    }
    pool_accepted(&pool, 6).await;
    assert!(pool.submits().iter().all(|s| s["params"].as_array().unwrap().len() == 5));
    proxy.shutdown().await;
}

in_both_modes!(tokio::test(flavor = "multi_thread", worker_threads = 2), a_pool_that_applies_set_difficulty_at_once);
/// A pool that raises its difficulty and judges the jobs already out by it. Shares found on the
/// current job at the old difficulty, submitted after the change, are low-difficulty for this
/// pool: they are answered, the miner stays, and from the next job its shares are accepted.
async fn a_pool_that_applies_set_difficulty_at_once(mode: Mode) {
    at_once(mode, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// The same with 30 shares on the old difficulty, as a group of fast miners sends between the
/// pool's `set_difficulty` and its next job: more than the 20 verdicts of the group's reject
/// window, which must not count them and leave a healthy pool as "reject rate over
/// max_reject_rate" (it did before the window knew of raised difficulties).
async fn a_pool_that_applies_set_difficulty_at_once_under_many_shares() {
    at_once(Mode::Aggregate, 30).await;
}

/// A miner on an at-once pool that raises its difficulty; `around` shares found on the current
/// job at the old difficulty are submitted after the change.
async fn at_once(mode: Mode, around: u64) {
    const OLD: f64 = 1e-9;
    const NEW: f64 = 1e-5;
    let pool = MockPool::start(PoolOptions { difficulty: OLD, ..PoolOptions::difficulty_at_once() }).await;
    let mut c = mode_config(mode, pool.addr);
    c.vardiff.start_difficulty = OLD;
    c.vardiff.min_difficulty = OLD;
    c.vardiff.max_difficulty = OLD;
    let proxy = spawn_proxy(c).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig1").await;
    let share = miner.grind(None);
    assert_eq!(submit(&mut miner, "farm.rig1", &share).await["result"], true);
    assert!(eventually(WAIT, || async { pool.accepted() == 1 }).await, "judged before the change");
    // The proxy's health probe may still hold a connection: the change is for the session alone.
    assert!(eventually(WAIT, || async { pool.connections() == 1 }).await, "one pool session");
    assert_eq!(pool.set_difficulty(NEW), 1);
    match mode {
        Mode::Passthrough => {
            let deadline = Instant::now() + WAIT;
            while miner.difficulty != NEW && Instant::now() < deadline {
                miner.recv_json(Duration::from_millis(10)).await;
            }
            assert_eq!(miner.difficulty, NEW, "the pool's new difficulty, relayed");
        }
        Mode::Aggregate => tokio::time::sleep(Duration::from_millis(200)).await,
    }
    // Work the miner had on the current job at the old difficulty.
    let mut replies = Vec::new();
    for _ in 0..around {
        miner.difficulty = OLD;
        let share = miner.grind(None);
        replies.push(submit(&mut miner, "farm.rig1", &share).await);
    }
    // What the miner was told last.
    miner.difficulty = if mode == Mode::Passthrough { NEW } else { OLD };
    let accepted = replies.iter().filter(|r| r["result"] == true).count() as u64;
    let low = replies.iter().filter(|r| r["error"][0] == 23).count() as u64;
    eprintln!("{mode:?}: {accepted} answered true, {low} low difficulty of {around} at the old difficulty");
    assert!(!miner.expect_closed(Duration::from_millis(200)).await, "the miner stays");
    let rejected_by_pool = pool.rejected();
    eprintln!("{mode:?}: the pool rejected {rejected_by_pool}, accepted {}", pool.accepted());
    match mode {
        // The pool's verdict, relayed as it came.
        Mode::Passthrough => assert_eq!(low, around, "{replies:?}"),
        // The miner's work was valid at the difficulty it was given: credited.
        Mode::Aggregate => {
            assert_eq!(accepted, around, "{replies:?}");
            assert!(eventually(WAIT, || async { pool.rejected() == around }).await, "forwarded, refused by the pool");
        }
    }
    // From the next job on, at the pool's new difficulty (passthrough) or forwarded only when
    // it meets it (aggregate), shares are accepted.
    let before = pool.accepted();
    pool.new_job();
    assert!(miner.clean_job(WAIT).await.is_some(), "the pool's next job");
    let mut forwarded = 0;
    for _ in 0..3 {
        if mode == Mode::Passthrough {
            assert_eq!(miner.difficulty, NEW);
        }
        let share = miner.grind(None);
        assert_eq!(submit(&mut miner, "farm.rig1", &share).await["result"], true);
        forwarded += 1;
    }
    if mode == Mode::Passthrough {
        assert!(eventually(WAIT, || async { pool.accepted() == before + forwarded }).await);
    }
    assert_eq!(pool.rejected(), rejected_by_pool, "no reject after the new job");
    assert_eq!(pool.subscribes(), 1, "one pool session all along");
    proxy.shutdown().await;
}

in_both_modes!(tokio::test(flavor = "multi_thread", worker_threads = 2), a_pool_that_hangs_with_its_socket_open);
/// A pool stopped with SIGSTOP: its socket stays open, and nothing is read or answered. The
/// share it holds is answered within `submit_timeout`; an aggregated miner moves to the backup
/// without a disconnect, a passthrough miner is closed and its reconnect lands on the backup.
async fn a_pool_that_hangs_with_its_socket_open(mode: Mode) {
    let primary = MockPool::start(PoolOptions::validating()).await;
    let backup = MockPool::start(PoolOptions::validating()).await;
    let mut c = pools_config(mode, &[&primary, &backup]);
    c.upstream.submit_timeout = 2;
    let proxy = spawn_proxy(c).await;
    let mut miner = proxy.miner().await;
    miner.handshake("farm.rig1").await;
    let share = miner.grind(None);
    assert_eq!(submit(&mut miner, "farm.rig1", &share).await["result"], true);
    pool_accepted(&primary, 1).await;

    primary.freeze();
    let share = miner.grind(None);
    let reply = submit(&mut miner, "farm.rig1", &share).await;
    match mode {
        Mode::Passthrough => {
            assert_eq!(reply["error"][0], 20, "{reply}");
            assert!(miner.expect_closed(WAIT).await, "the session of a hung pool ends");
            miner = proxy.miner().await;
            miner.handshake("farm.rig1").await;
        }
        Mode::Aggregate => {
            assert_eq!(reply["result"], true, "answered from the proxy's check");
            assert!(miner.clean_job(WAIT).await.is_some(), "the backup's job");
            assert!(!miner.closed);
        }
    }
    let share = miner.grind(None);
    assert_eq!(submit(&mut miner, "farm.rig1", &share).await["result"], true);
    pool_accepted(&backup, 1).await;
    let label = primary.label();
    let unanswered =
        metric_now(&proxy, "loka_upstream_shares_total", &[("pool", &label), ("result", "unanswered")]).await;
    assert_eq!(unanswered, 1.0, "the share the hung pool held is counted");
    proxy.shutdown().await;
}

in_both_modes!(tokio::test(flavor = "multi_thread", worker_threads = 2), a_pool_that_sends_clean_jobs_often);
/// A pool that sends a clean job every 250 ms, under an S19 at 200 shares a second: the shares
/// that cross a clean job are refused as stale, never as junk, the miner stays, and every share
/// answered true is accepted by the pool exactly once.
async fn a_pool_that_sends_clean_jobs_often(mode: Mode) {
    let pool = MockPool::start(PoolOptions::clean_jobs_every(Duration::from_millis(250))).await;
    let mut c = mode_config(mode, pool.addr);
    c.vardiff.max_difficulty = 1e-12;
    let proxy = spawn_proxy(c).await;
    let mut s19 = S19::connect(proxy.addr, "farm.s19").await;
    let tally = s19.mine_for(Duration::from_secs(2), 2).await;
    eprintln!("{mode:?}: {tally:?}");
    assert_eq!(tally.answered, tally.sent, "every submit answered");
    assert_eq!(tally.accepted + tally.stale, tally.sent, "only stale refusals: {tally:?}");
    let jobs = s19.miner.notifications.iter().filter(|n| n["method"] == "mining.notify").count();
    assert!(jobs >= 6, "{jobs} jobs");
    pool_accepted(&pool, tally.accepted).await;
    let submits = pool.submits();
    let distinct: std::collections::HashSet<String> = submits.iter().map(|s| s["params"].to_string()).collect();
    assert_eq!(distinct.len(), submits.len(), "no share went to the pool twice");
    assert!(!s19.miner.closed);
    proxy.shutdown().await;
}
