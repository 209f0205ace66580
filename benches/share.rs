//! Validating one share end to end (widths, window, mask, duplicate lookup, sha256d of the
//! coinbase, a 12-entry merkle branch and the header), as every `mining.submit` is.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use loka_stratum::jobs::{JobBook, Lookup};
use loka_stratum::protocol::miner::Submit;
use loka_stratum::protocol::pool::Notify;
use loka_stratum::submissions::{check, ShareContext};

fn bench(c: &mut Criterion) {
    let mut book = JobBook::default();
    // Every hash meets this target, so the bench measures a share that passes every check.
    book.set_difficulty(1e-12);
    book.on_notify(Notify {
        job_id: "6b1e".into(),
        prevhash: [0x5a; 32],
        coinb1: vec![0x01; 60],
        coinb2: vec![0x02; 47],
        merkle_branch: vec![[0x3c; 32]; 12],
        version: 0x2000_0000,
        nbits: 0x1703_4219,
        ntime: 0x6745_a1b0,
        clean_jobs: true,
    });
    let Lookup::Live(job) = book.lookup("6b1e") else { unreachable!() };
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
        b.iter(|| check(black_box(job.as_target()), black_box(miner), black_box(&submit), |_| false).expect("valid"))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
