//! Validating one share end to end (widths, window, mask, duplicate lookup, sha256d of the
//! coinbase, a 12-entry merkle branch and the header), as every `mining.submit` is; and an
//! aggregate-mode submit line from bytes in to the answer out.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use loka_stratum::protocol::miner::Submit;
use loka_stratum::protocol::pool::Notify;
use loka_stratum::share::target_from_difficulty;
use loka_stratum::submissions::{check, JobTarget, ShareContext};

/// A job with a 12-entry merkle branch and a `coinb1_len`-byte coinb1.
fn job(id: &str, coinb1_len: usize) -> Notify {
    Notify {
        job_id: id.into(),
        prevhash: [0x5a; 32],
        coinb1: vec![0x01; coinb1_len],
        coinb2: vec![0x02; 47],
        merkle_branch: vec![[0x3c; 32]; 12],
        version: 0x2000_0000,
        nbits: 0x1703_4219,
        ntime: 0x6745_a1b0,
        clean_jobs: true,
    }
}

fn bench(c: &mut Criterion) {
    // Every hash meets this target, so the bench measures a share that passes every check.
    let notify = job("6b1e", 60);
    let target = target_from_difficulty(1e-12);
    let job = JobTarget { notify: &notify, difficulty: 1e-12, target: &target };
    let miner = ShareContext { extranonce1: &[8, 0, 0, 2], extranonce2_size: 4, version_mask: 0x1fff_e000 };
    let submit = Submit {
        worker: "acct.rig1".into(),
        job_id: "6b1e".into(),
        extranonce2: "0000a1b2".into(),
        ntime: "6745a1c0".into(),
        nonce: "b2957c02".into(),
        version_bits: Some("00a6e000".into()),
    };
    c.bench_function("validate share (12-entry branch)", |b| {
        b.iter(|| check(black_box(job), black_box(miner), black_box(&submit), |_| false).expect("valid"))
    });
}

/// An aggregated miner's `mining.submit` line: parsed, judged at the miner's difficulty (every
/// hash meets it), answered, and checked against the pool's difficulty (which none meets).
fn aggregate_submit(c: &mut Criterion) {
    use std::sync::Arc;

    use loka_stratum::aggregate::Work;
    use loka_stratum::jobs::Job;
    use loka_stratum::session::{MinerSession, Output};
    use loka_stratum::vardiff::VardiffConfig;
    use tokio::time::Instant;

    let job = Arc::new(Job {
        seq: 1,
        epoch: 1,
        upstream_id: "6b1e".into(),
        // The pool's 60-byte coinb1 with its 4-byte extranonce1, as a group sends it to miners.
        notify: job("", 64),
        en2_size: 6,
        pad: 0,
        upstream_difficulty: 1e6,
        upstream_target: target_from_difficulty(1e6),
    });
    let work =
        Arc::new(Work { epoch: 1, pool: None, en2_size: 6, version_mask: None, jobs: vec![job], leaving: false });
    let vardiff = VardiffConfig {
        start_difficulty: 1e-12,
        min_difficulty: 1e-12,
        max_difficulty: 1e-12,
        target_shares_per_minute: 20.0,
        retarget_secs: 30.0,
    };
    let now = Instant::now();
    // A fresh session per input, so that its duplicate set stays as small as a real miner's.
    let setup = || {
        let mut session = MinerSession::local(vec![0, 7], work.clone(), vardiff, false, now);
        let mut out = Output::default();
        session.on_miner_line(br#"{"id":1,"method":"mining.subscribe","params":[]}"#, now, &mut out);
        session.on_miner_line(br#"{"id":2,"method":"mining.authorize","params":["acct.rig1","x"]}"#, now, &mut out);
        out.to_miner.clear();
        out.events.clear();
        (session, out)
    };
    let line =
        br#"{"id":3,"method":"mining.submit","params":["acct.rig1","100","00000000a1b2","6745a1c0","b2957c02"]}"#;
    c.bench_function("aggregate submit line (parse, validate, answer)", |b| {
        b.iter_batched_ref(
            setup,
            |(session, out)| {
                session.on_miner_line(black_box(line), now, out);
                debug_assert!(out.to_miner.ends_with(b"\"result\":true,\"error\":null}\n"));
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench, aggregate_submit);
criterion_main!(benches);
