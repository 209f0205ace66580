//! The fuzz targets' logic on stable: every committed seed in `fuzz/corpus/<target>/` is replayed,
//! then the same functions run as bounded proptest properties, so `cargo test` covers in seconds
//! what `cargo fuzz run` explores for hours.

#[path = "../fuzz/src/lib.rs"]
mod fuzz_logic;

use std::path::Path;

use proptest::collection::vec;
use proptest::prelude::*;

/// The seeds of one target, sorted by name so failures are reproducible.
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("a corpus entry").path();
            let data = std::fs::read(&path).expect("a readable seed");
            (path.file_name().unwrap().to_string_lossy().into_owned(), data)
        })
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 20, "{target} has only {} seeds", seeds.len());
    seeds
}

fn replay(target: &str, run: fn(&[u8])) {
    for (name, data) in seeds(target) {
        let result = std::panic::catch_unwind(|| run(&data));
        assert!(result.is_ok(), "seed fuzz/corpus/{target}/{name} fails");
    }
}

#[test]
fn line_codec_seeds() {
    replay("line_codec", fuzz_logic::line_codec);
}

#[test]
fn miner_message_seeds() {
    replay("miner_message", fuzz_logic::miner_message);
}

#[test]
fn pool_message_seeds() {
    replay("pool_message", fuzz_logic::pool_message);
}

#[test]
fn session_seeds() {
    replay("session", fuzz_logic::session);
}

/// The session seeds reach the checks that matter under both policies: shares forwarded and shares
/// refused locally.
#[test]
fn session_seeds_reach_deep_states() {
    let (mut forwarded, mut rejected, mut local) = (0, 0, 0);
    for (_, data) in seeds("session") {
        let stats = fuzz_logic::session_stats(&data);
        forwarded += stats.forwarded_submits;
        rejected += stats.local_rejects;
        local += fuzz_logic::session_local(&data);
    }
    assert!(forwarded >= 20, "only {forwarded} submits forwarded");
    assert!(local >= 10, "only {local} shares handed to the pool side under the local policy");
    assert!(rejected >= 20, "only {rejected} submits refused locally");
}

/// Bytes that make line structure likely: terminators, blanks and braces.
fn stream_bytes() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => prop::sample::select(vec![b'a', b'{', b'}', b'\r', b'\n', b' ', b'\t']),
        1 => any::<u8>(),
    ]
}

/// JSON-RPC-shaped lines with hostile ids, methods and params.
fn rpc_line() -> impl Strategy<Value = String> {
    let id = prop::sample::select(vec!["1", "1.5", "-0", "1e400", "\"a\"", "null", "{}", "[1]", "true", "1e3"]);
    let method = prop::sample::select(vec![
        "mining.submit",
        "mining.authorize",
        "mining.subscribe",
        "mining.configure",
        "mining.suggest_difficulty",
        "mining.extranonce.subscribe",
        "mining.notify",
        "mining.set_difficulty",
        "mining.set_extranonce",
        "mining.set_version_mask",
        "client.reconnect",
        "client.show_message",
        "client.get_version",
        "x",
    ]);
    let param = prop::sample::select(vec![
        "\"00000001\"",
        "\"0x000001\"",
        "\"5c8f0a1\"",
        "\"zzzzzzzz\"",
        "\"\"",
        "1",
        "-1",
        "1e-12",
        "null",
        "true",
        "[]",
        "{}",
        "[\"version-rolling\"]",
        "{\"version-rolling.mask\":\"1fffe000\"}",
        "\"4d16b6f85af6e2198f44ae2a6de67f78487ae5611b77c6c0440b921e00000000\"",
    ]);
    (id, method, vec(param, 0..10), any::<bool>()).prop_map(|(id, method, params, array)| {
        let params = if array { format!("[{}]", params.join(",")) } else { params.first().unwrap_or(&"7").to_string() };
        format!(r#"{{"id":{id},"method":"{method}","params":{params}}}"#)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn line_codec_any_bytes(data in vec(any::<u8>(), 0..2048)) {
        fuzz_logic::line_codec(&data);
    }

    #[test]
    fn line_codec_line_shaped(cap in 0u8..40, seed in any::<u8>(), stream in vec(stream_bytes(), 0..512)) {
        let mut data = vec![cap, seed];
        data.extend(stream);
        fuzz_logic::line_codec(&data);
    }

    #[test]
    fn miner_message_any_bytes(data in vec(any::<u8>(), 0..512)) {
        fuzz_logic::miner_message(&data);
    }

    #[test]
    fn miner_message_rpc_shaped(line in rpc_line(), cut in any::<prop::sample::Index>()) {
        fuzz_logic::miner_message(line.as_bytes());
        fuzz_logic::miner_message(&line.as_bytes()[..cut.index(line.len() + 1)]);
    }

    #[test]
    fn pool_message_rpc_shaped(line in rpc_line()) {
        fuzz_logic::pool_message(line.as_bytes());
    }

    #[test]
    fn pool_message_any_bytes(data in vec(any::<u8>(), 0..512)) {
        fuzz_logic::pool_message(&data);
    }

    #[test]
    fn session_any_ops(data in vec(any::<u8>(), 0..1536)) {
        fuzz_logic::session(&data);
    }

    /// Starts every run with a handshake, so most of the input is spent past it.
    #[test]
    fn session_after_handshake(size in 0u8..8, tail in vec(any::<u8>(), 0..1024)) {
        let mut data = vec![0, 0, 0, 0, size, 8, 0, 0, 2];
        data.extend(tail);
        fuzz_logic::session(&data);
    }
}
