//! Parsing a `mining.submit` and serialising a `mining.notify`: the two hot message paths.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use loka_stratum::protocol::{miner, pool};

const SUBMIT: &[u8] =
    br#"{"params": ["acct.rig1", "1a2b", "0000000000000001", "5c8f0a1e", "b2957c02", "00a6e000"], "id": 4, "method": "mining.submit"}"#;

fn notify() -> pool::Notify {
    pool::Notify {
        job_id: "6b1e".into(),
        prevhash: [0x5a; 32],
        coinb1: vec![0x01; 60],
        coinb2: vec![0x02; 47],
        merkle_branch: vec![[0x3c; 32]; 12],
        version: 0x2000_0000,
        nbits: 0x1703_4219,
        ntime: 0x6745_a1b0,
        clean_jobs: true,
    }
}

fn bench(c: &mut Criterion) {
    c.bench_function("parse mining.submit", |b| {
        b.iter(|| match miner::parse(black_box(SUBMIT)) {
            Ok(miner::MinerMessage::Request(r)) => black_box(r.call),
            other => panic!("{other:?}"),
        })
    });
    let job = notify();
    let mut buf = Vec::with_capacity(2048);
    c.bench_function("serialise mining.notify (12-entry branch)", |b| {
        b.iter(|| {
            buf.clear();
            black_box(&job).write(&mut buf);
            black_box(buf.len())
        })
    });
    let mut line = Vec::new();
    job.write(&mut line);
    line.pop();
    c.bench_function("parse mining.notify (12-entry branch)", |b| {
        b.iter(|| black_box(pool::parse(black_box(&line)).is_ok()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
