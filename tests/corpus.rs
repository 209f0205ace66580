//! A malformed-input corpus, run over real sockets against the real proxy: each case is bytes a
//! miner sends on a fresh connection (after a handshake, for the cases that need a session), and
//! the proxy must answer with a JSON-RPC error that echoes the request's id (null when the id
//! could not be parsed) or close the connection. It must never panic, and no share may reach
//! the pool. One case per connection: two malformed lines in a row close a connection.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use loka_stratum::config::Mode;
use serde_json::value::RawValue;
use serde_json::Value;
use support::*;

/// Connections in flight at once.
const BATCH: usize = 16;
/// The proxy's default line cap.
const CAP: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// An error reply whose id is this exact JSON text, with this code (if given) and a message
    /// starting with this text (if given).
    Error {
        id: String,
        code: Option<i64>,
        message: Option<String>,
    },
    /// An error reply whose id is either of these (the line is valid to some parsers and not to
    /// others, e.g. nesting deep enough to hit a recursion limit only when params are typed).
    ErrorEither(String, String),
    Close,
}

struct Case {
    name: String,
    /// Subscribe, authorize "farm.rig1" and wait for a job before sending `bytes`.
    handshake: bool,
    /// Sent as is, after replacing `$JOB`, `$NTIME`, `$NTIME_LOW` and `$NTIME_HIGH` with the
    /// session's job, and `$EN2` with an extranonce2 of the session's width.
    bytes: Vec<u8>,
    /// Half-close after sending.
    eof: bool,
    expect: Expect,
}

fn error(id: &str) -> Expect {
    Expect::Error { id: id.into(), code: None, message: None }
}

fn error_with(id: &str, code: i64, message: &str) -> Expect {
    Expect::Error { id: id.into(), code: Some(code), message: Some(message.into()) }
}

fn case(name: impl Into<String>, line: impl AsRef<[u8]>, expect: Expect) -> Case {
    let mut bytes = line.as_ref().to_vec();
    bytes.push(b'\n');
    Case { name: name.into(), handshake: false, bytes, eof: false, expect }
}

fn session_case(name: impl Into<String>, line: impl AsRef<[u8]>, expect: Expect) -> Case {
    Case { handshake: true, ..case(name, line, expect) }
}

fn submit_line(params: &[&str]) -> String {
    format!(r#"{{"id":7,"method":"mining.submit","params":[{}]}}"#, params.join(","))
}

/// A submit on the session's job that the proxy would forward, but for the fields replaced.
const GOOD_SUBMIT: [&str; 5] = [r#""farm.rig1""#, r#""$JOB""#, r#""$EN2""#, r#""$NTIME""#, r#""00000002""#];

const METHODS: [&str; 6] = [
    "mining.subscribe",
    "mining.authorize",
    "mining.configure",
    "mining.suggest_difficulty",
    "mining.submit",
    "mining.extranonce.subscribe",
];

fn corpus() -> Vec<Case> {
    let mut cases = Vec::new();

    // Top-level values that are not objects, and objects that are not requests.
    for line in [
        "[1,2]",
        "[]",
        r#"[{"id":1,"method":"mining.subscribe","params":[]}]"#,
        "42",
        "-1",
        "1e999",
        r#""mining.subscribe""#,
        r#""""#,
        "true",
        "false",
        "null",
        "{}",
        "}{",
        "{{}}",
        "not json",
        "GET / HTTP/1.1",
        "\u{feff}{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[]}",
        r#"{"id":1,"method":"mining.subscribe","params":[]} {"id":2}"#,
        r#"{"id":1,"method":"mining.subscribe","params":[]}{"id":2,"method":"mining.subscribe","params":[]}"#,
        r#"{"id":1,"method":"mining.subscribe","params":[],}"#,
        r#"{'id':1,'method':'mining.subscribe','params':[]}"#,
        r#"{id:1,method:"mining.subscribe",params:[]}"#,
        r#"{"id":01,"method":"mining.subscribe","params":[]}"#,
        r#"{"id":NaN,"method":"mining.subscribe","params":[]}"#,
        r#"{"id":1,"method":"mining.subscribe","params":[]"#,
        r#"{"id":1,"method":"mining.subscribe","params":["\x"]}"#,
    ] {
        cases.push(case(format!("top level {line:?}"), line, error("null")));
    }
    cases.push(case(
        "lone surrogate in a param",
        r#"{"id":1,"method":"mining.subscribe","params":["\ud800"]}"#,
        error_with("1", 20, "mining.subscribe: user agent must be a string"),
    ));
    cases.push(case("no method, id 5", r#"{"id":5}"#, error_with("5", 20, "missing method")));
    cases.push(case("method null", r#"{"id":6,"method":null,"params":[]}"#, error_with("6", 20, "missing method")));
    for method in ["7", "[]", "{}", "true"] {
        cases.push(case(
            format!("method {method}"),
            format!(r#"{{"id":6,"method":{method},"params":[]}}"#),
            error("null"),
        ));
    }

    // A valid line truncated at every position: invalid JSON, id unknown.
    for line in [
        r#"{"id":2,"method":"mining.authorize","params":["farm.rig1","x"]}"#,
        r#"{"id":1,"method":"mining.configure","params":[["version-rolling"],{"version-rolling.mask":"1fffe000","version-rolling.min-bit-count":2}]}"#,
        r#"{"params": ["bitaxe/BM1366/v2.4.2"], "id": 1, "method": "mining.subscribe"}"#,
    ] {
        for cut in 1..line.len() {
            cases.push(case(format!("truncated at {cut}: {line}"), &line[..cut], error("null")));
        }
    }
    // A truncated line without its newline, then end of input: dropped, and the connection closes.
    for cut in [1, 10, 30] {
        let line = r#"{"id":2,"method":"mining.authorize","params":["farm.rig1","x"]}"#;
        cases.push(Case {
            eof: true,
            bytes: line[..cut].into(),
            ..case(format!("unterminated {cut}"), "", Expect::Close)
        });
    }

    // Ids: objects, arrays and booleans are not ids; numbers and strings of any form are echoed
    // exactly, whether the proxy answers itself or relays the pool's error.
    for id in ["{}", r#"{"a":1}"#, "[1]", "[]", "true", "false"] {
        for body in [r#""method":"mining.submit","params":[]"#, r#""method":"mining.nope","params":[]"#] {
            cases.push(case(format!("id {id} {body}"), format!("{{\"id\":{id},{body}}}"), error("null")));
        }
    }
    for id in [
        "1.5",
        "-0",
        "0",
        "-1",
        "1e3",
        "1E+3",
        "0.1e-5",
        "-12.50",
        "123456789012345678901234567890",
        "18446744073709551616",
        "1e400",
        r#""a""#,
        r#""""#,
        r#""\u00e9\"q""#,
        r#""\\""#,
        r#""line\nbreak""#,
        r#""\u0000""#,
    ] {
        cases.push(case(
            format!("id {id} echoed by the proxy"),
            format!(r#"{{"id":{id},"method":"mining.submit","params":[]}}"#),
            error_with(id, 20, "mining.submit: expected 5 to 6 params, got 0"),
        ));
        cases.push(case(
            format!("id {id} echoed from the pool"),
            format!(r#"{{"id":{id},"method":"mining.nope","params":[]}}"#),
            // The pool's words in passthrough, the proxy's in aggregate mode.
            Expect::Error { id: id.into(), code: Some(20), message: None },
        ));
    }
    cases.push(case("id with spaces", r#"{"id" :  1.5 ,"method":"mining.submit"}"#, error("1.5")));

    // Missing, extra and mistyped params.
    let strings = |n: usize| vec![r#""00000000""#; n].join(",");
    for n in [0, 1, 2, 3, 4, 7, 8] {
        let line = format!(r#"{{"id":3,"method":"mining.submit","params":[{}]}}"#, strings(n));
        cases.push(case(
            format!("submit with {n} params"),
            line,
            error_with("3", 20, "mining.submit: expected 5 to 6"),
        ));
    }
    for (method, params) in [
        ("mining.submit", "absent"),
        ("mining.submit", "null"),
        ("mining.authorize", "[]"),
        ("mining.authorize", r#"["a","b","c"]"#),
        ("mining.authorize", "absent"),
        ("mining.authorize", r#"[""]"#),
        ("mining.authorize", "[7]"),
        ("mining.authorize", "[null]"),
        ("mining.authorize", r#"["a",7]"#),
        ("mining.authorize", r#"[["a"],"x"]"#),
        ("mining.suggest_difficulty", "[]"),
        ("mining.suggest_difficulty", "[1,2]"),
        ("mining.suggest_difficulty", r#"["abc"]"#),
        ("mining.suggest_difficulty", "[null]"),
        ("mining.suggest_difficulty", "[{}]"),
        ("mining.suggest_difficulty", "absent"),
        ("mining.configure", "[]"),
        ("mining.configure", "[1,2,3]"),
        ("mining.configure", r#"["version-rolling"]"#),
        ("mining.configure", r#"[["version-rolling"],{"version-rolling.mask":"xyz"}]"#),
        ("mining.configure", r#"[["version-rolling"],{"version-rolling.mask":"123456789"}]"#),
        ("mining.configure", r#"[["version-rolling"],{"version-rolling.mask":7}]"#),
        ("mining.configure", r#"[["version-rolling"],{"version-rolling.min-bit-count":99}]"#),
        ("mining.configure", r#"[["version-rolling"],{"version-rolling.min-bit-count":-1}]"#),
        ("mining.configure", r#"[["version-rolling"],7]"#),
        ("mining.configure", r#"[[7],{}]"#),
        ("mining.configure", "absent"),
        ("mining.subscribe", "[5]"),
        ("mining.subscribe", "[{}]"),
        ("mining.subscribe", r#"["a",5]"#),
        ("mining.subscribe", "[[]]"),
        ("mining.subscribe", "[true]"),
    ] {
        let line = if params == "absent" {
            format!(r#"{{"id":4,"method":"{method}"}}"#)
        } else {
            format!(r#"{{"id":4,"method":"{method}","params":{params}}}"#)
        };
        cases.push(case(format!("{method} params {params}"), line, error_with("4", 20, method)));
    }
    // Every known method (and an unknown one) with params that are not an array, or too many.
    let too_many = format!("[{}]", vec!["null"; 65].join(","));
    for method in METHODS.iter().copied().chain(["mining.nope"]) {
        for params in ["{}", r#"{"worker":"w"}"#, "7", r#""farm.rig1""#, "true", "-1.5"] {
            let line = format!(r#"{{"id":"p","method":"{method}","params":{params}}}"#);
            cases.push(case(
                format!("{method} params {params}"),
                line,
                error_with(r#""p""#, 20, "params must be an array"),
            ));
        }
        if method != "mining.nope" && method != "mining.extranonce.subscribe" {
            let line = format!(r#"{{"id":"p","method":"{method}","params":{too_many}}}"#);
            cases.push(case(format!("{method} with 65 params"), line, error_with(r#""p""#, 20, method)));
        }
    }

    // NUL bytes, invalid UTF-8 and control characters.
    for (name, line) in [
        ("NUL alone", b"\0".to_vec()),
        ("NUL after a request", b"{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[]}\0".to_vec()),
        ("NUL before a request", b"\0{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[]}".to_vec()),
        ("NUL in a string", b"{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[\"a\0b\"]}".to_vec()),
        ("NUL in the method", b"{\"id\":1,\"method\":\"mining.sub\0scribe\",\"params\":[]}".to_vec()),
        ("0xff in the method", b"{\"id\":1,\"method\":\"\xff\",\"params\":[]}".to_vec()),
        ("0xff in the id", b"{\"id\":\"\xff\",\"method\":\"mining.subscribe\",\"params\":[]}".to_vec()),
        (
            "0xc3 cut in a worker",
            b"{\"id\":1,\"method\":\"mining.authorize\",\"params\":[\"farm\xc3\",\"x\"]}".to_vec(),
        ),
        ("overlong slash", b"{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[\"\xc0\xaf\"]}".to_vec()),
        (
            "UTF-16 surrogate bytes",
            b"{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[\"\xed\xa0\x80\"]}".to_vec(),
        ),
        ("raw tab in a string", b"{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[\"a\tb\"]}".to_vec()),
        ("raw 0x1f in a string", b"{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[\"a\x1fb\"]}".to_vec()),
        ("0x80 alone", b"\x80".to_vec()),
        ("binary", (0u8..=255).filter(|b| *b != b'\n').collect()),
    ] {
        cases.push(case(name, line, error("null")));
    }

    // CR-only line ends: one long line. Under the cap it is an error, over it a close.
    let crlined = |n: usize| {
        (0..n)
            .map(|i| format!(r#"{{"id":{i},"method":"mining.subscribe","params":[]}}"#))
            .collect::<Vec<_>>()
            .join("\r")
    };
    for n in [2, 3, 10, 100] {
        cases.push(case(format!("{n} requests joined by CR"), crlined(n), error("null")));
    }
    for n in [400, 1000] {
        let bytes = format!("{}\r", crlined(n)).into_bytes();
        assert!(bytes.len() > CAP + 1);
        cases.push(Case { bytes, ..case(format!("{n} requests joined by CR, no LF"), "", Expect::Close) });
    }

    // Deep nesting.
    cases.push(case("10k [", "[".repeat(10_000), error("null")));
    cases.push(case("5k [ then 5k ]", format!("{}{}", "[".repeat(5_000), "]".repeat(5_000)), error("null")));
    cases.push(case("10k {", r#"{"a":"#.repeat(2_000), error("null")));
    cases.push(case(
        "params nested 5k deep",
        format!(r#"{{"id":1,"method":"mining.submit","params":{}{}}}"#, "[".repeat(5_000), "]".repeat(5_000)),
        Expect::ErrorEither("1".into(), "null".into()),
    ));
    cases.push(case(
        "unknown method, params nested 5k deep",
        format!(r#"{{"id":1,"method":"mining.nope","params":{}{}}}"#, "[".repeat(5_000), "]".repeat(5_000)),
        Expect::ErrorEither("1".into(), "null".into()),
    ));
    cases.push(case(
        "id nested 5k deep",
        format!(r#"{{"id":{}{},"method":"mining.subscribe","params":[]}}"#, "[".repeat(5_000), "]".repeat(5_000)),
        error("null"),
    ));
    cases.push(Case { bytes: vec![b'['; 100_000], ..case("100k [ without a newline", "", Expect::Close) });
    cases.push(case("100k [", "[".repeat(100_000), Expect::Close));

    // Duplicate keys, before and after the handshake.
    for line in [
        r#"{"id":1,"id":2,"method":"mining.subscribe","params":[]}"#,
        r#"{"id":1,"method":"mining.subscribe","method":"mining.authorize","params":[]}"#,
        r#"{"id":1,"method":"mining.authorize","params":["farm.rig1","x"],"params":[]}"#,
        r#"{"id":1,"method":"mining.submit","params":[],"result":true,"result":false}"#,
        r#"{"id":1,"method":"mining.submit","params":[],"error":null,"error":null}"#,
        r#"{"id":null,"id":null,"method":"mining.subscribe","params":[]}"#,
    ] {
        cases.push(case(format!("duplicate key {line}"), line, error("null")));
        cases.push(session_case(format!("duplicate key after handshake {line}"), line, error("null")));
    }
    cases.push(session_case(
        "duplicate key in a valid submit",
        r#"{"id":7,"method":"mining.submit","params":["farm.rig1","$JOB","$EN2","$NTIME","00000002"],"id":8}"#,
        error("null"),
    ));

    // Bad hex in each submit field: errors that name the field, never forwarded.
    let fields: [(usize, &str, &str); 4] =
        [(2, "extranonce2", "$EN2"), (3, "ntime", "$NTIME"), (4, "nonce", "00000002"), (5, "version bits", "")];
    let bad_hex = [
        "0x000001",
        "0x00000001",
        "0X000001",
        "0000001",
        "000000001",
        "000001",
        "0000000000",
        "0000000000000001",
        "",
        "0000000g",
        "z0000000",
        " 0000001",
        "0000001 ",
        "00000é0",
        "-0000001",
        "+0000001",
        "0000000\\u0000",
        "ffffffff\\n",
        "１２３４",
    ];
    for (index, field, _) in fields {
        for bad in bad_hex {
            let mut params: Vec<String> = GOOD_SUBMIT.iter().map(|s| s.to_string()).collect();
            let value = format!("\"{bad}\"");
            if index == 5 {
                params.push(value);
            } else {
                params[index] = value;
            }
            let params: Vec<&str> = params.iter().map(String::as_str).collect();
            cases.push(session_case(
                format!("{field} {bad:?}"),
                submit_line(&params),
                Expect::Error { id: "7".into(), code: Some(20), message: Some(field.into()) },
            ));
        }
    }
    // Fields that are not strings.
    for index in 0..6 {
        for value in ["1", "null", "[]", "{}", "true"] {
            let mut params: Vec<&str> = GOOD_SUBMIT.to_vec();
            if index == 5 {
                params.push(value);
            } else {
                params[index] = value;
            }
            cases.push(session_case(
                format!("submit param {index} = {value}"),
                submit_line(&params),
                error_with("7", 20, "mining.submit: "),
            ));
        }
    }
    // Well-formed hex, wrong values.
    for (name, index, value, code, message) in [
        ("ntime before the job", 3, r#""$NTIME_LOW""#, 20, "ntime out of range"),
        ("ntime past the window", 3, r#""$NTIME_HIGH""#, 20, "ntime out of range"),
        ("ntime zero", 3, r#""00000000""#, 20, "ntime out of range"),
        ("ntime max", 3, r#""ffffffff""#, 20, "ntime out of range"),
        ("version bits without a mask", 5, r#""00002000""#, 20, "version bits outside the negotiated mask"),
        ("version bits all set", 5, r#""ffffffff""#, 20, "version bits outside the negotiated mask"),
        ("version bits BIP320", 5, r#""1fffe000""#, 20, "version bits outside the negotiated mask"),
        ("unknown job", 1, r#""no-such-job""#, 21, "Job not found"),
        ("empty job", 1, r#""""#, 21, "Job not found"),
        ("another worker", 0, r#""farm.rig2""#, 24, "Unauthorized worker"),
        ("empty worker", 0, r#""""#, 24, "Unauthorized worker"),
        ("worker in upper case", 0, r#""FARM.RIG1""#, 24, "Unauthorized worker"),
        ("worker with a NUL", 0, r#""farm.rig1\u0000""#, 24, "Unauthorized worker"),
    ] {
        let mut params: Vec<&str> = GOOD_SUBMIT.to_vec();
        if index == 5 {
            params.push(value);
        } else {
            params[index] = value;
        }
        cases.push(session_case(name, submit_line(&params), error_with("7", code, message)));
    }
    // Submits before any handshake.
    for bad in ["0x000001", "00000001", "zz"] {
        let line =
            format!(r#"{{"id":7,"method":"mining.submit","params":["farm.rig1","1","{bad}","00000000","00000000"]}}"#);
        cases.push(case(
            format!("submit before subscribe, extranonce2 {bad}"),
            line,
            error_with("7", 25, "Not subscribed"),
        ));
    }

    // Long worker names: the cap closes the connection; just under it the worker is unknown.
    let worker_line = |len: usize| {
        format!(
            r#"{{"id":9,"method":"mining.submit","params":["{}","$JOB","$EN2","$NTIME","00000002"]}}"#,
            "w".repeat(len)
        )
    };
    cases.push(session_case("1 MiB worker name in a submit", worker_line(1 << 20), Expect::Close));
    cases.push(session_case("17 KiB worker name in a submit", worker_line(17 * 1024), Expect::Close));
    cases.push(session_case(
        "15 KiB worker name in a submit",
        worker_line(15 * 1024),
        error_with("9", 24, "Unauthorized"),
    ));
    let authorize =
        |len: usize| format!(r#"{{"id":9,"method":"mining.authorize","params":["{}","x"]}}"#, "w".repeat(len));
    cases.push(case("1 MiB worker name in an authorize", authorize(1 << 20), Expect::Close));
    cases.push(case("16 KiB + 1 line", format!("{}{}", authorize(CAP - 40), " ".repeat(100)), Expect::Close));
    cases.push(case("1 MiB of spaces", " ".repeat(1 << 20), Expect::Close));
    cases.push(case("1 MiB id", format!(r#"{{"id":"{}","method":"x"}}"#, "1".repeat(1 << 20)), Expect::Close));

    cases
}

#[derive(Debug)]
enum Outcome {
    /// The first reply: the raw line.
    Reply(String),
    Closed,
    /// Neither within the wait.
    Silent,
}

/// Is `line` a notification (it has a non-null method)?
fn is_notification(line: &str) -> bool {
    serde_json::from_str::<HashMap<String, &RawValue>>(line)
        .map(|m| m.get("method").is_some_and(|v| v.get() != "null"))
        .unwrap_or(false)
}

async fn run(proxy: std::net::SocketAddr, case: &Case) -> Outcome {
    let mut miner = SimMiner::connect(proxy).await;
    let mut bytes = case.bytes.clone();
    if case.handshake {
        miner.handshake("farm.rig1").await;
        let job = miner.job.clone().expect("a job");
        let text = String::from_utf8(bytes)
            .expect("session cases are UTF-8")
            .replace("$JOB", &job.id)
            .replace("$EN2", &format!("{}01", "00".repeat(miner.extranonce2_size - 1)))
            .replace("$NTIME_LOW", &format!("{:08x}", job.ntime - 1))
            .replace("$NTIME_HIGH", &format!("{:08x}", job.ntime + 7001))
            .replace("$NTIME", &format!("{:08x}", job.ntime));
        bytes = text.into_bytes();
    }
    miner.send_bytes(&bytes).await;
    if case.eof {
        miner.shutdown_write().await;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match miner.recv_line(left).await {
            Some(line) if is_notification(&line) => continue,
            Some(line) => return Outcome::Reply(line),
            None if miner.closed => return Outcome::Closed,
            None => return Outcome::Silent,
        }
    }
}

/// `Ok(())` when `outcome` is what `expect` allows, else why not.
fn judge(expect: &Expect, outcome: &Outcome) -> Result<(), String> {
    let line = match (expect, outcome) {
        (Expect::Close, Outcome::Closed) => return Ok(()),
        (_, Outcome::Reply(line)) if *expect != Expect::Close => line,
        _ => return Err(format!("expected {expect:?}, got {outcome:?}")),
    };
    let (ids, code, message) = match expect {
        Expect::Error { id, code, message } => (vec![id.as_str()], *code, message.as_deref()),
        Expect::ErrorEither(a, b) => (vec![a.as_str(), b.as_str()], None, None),
        Expect::Close => unreachable!(),
    };
    let Some(id) = ids.iter().find(|id| line.starts_with(&format!("{{\"id\":{id},\"result\":"))) else {
        return Err(format!("the reply does not echo id {ids:?}: {line}"));
    };
    // Parse without the id, which may be a number serde_json cannot hold (1e400).
    let rest: Value = serde_json::from_str(&format!("{{{}", &line[6 + id.len() + 1..]))
        .map_err(|e| format!("the reply is not JSON ({e}): {line}"))?;
    let error = &rest["error"];
    let Some(got_code) = error[0].as_i64() else { return Err(format!("not an error reply: {line}")) };
    let got_message = error[1].as_str().unwrap_or_default();
    if code.is_some_and(|c| c != got_code) || message.is_some_and(|m| !got_message.starts_with(m)) {
        return Err(format!("expected code {code:?} and a message starting {message:?}: {line}"));
    }
    Ok(())
}

/// Panics on the runtime's worker threads, where the proxy's tasks run; the test bodies of both
/// modes run on their own threads and share this hook.
static PANICS: AtomicUsize = AtomicUsize::new(0);

in_both_modes!(tokio::test(flavor = "multi_thread", worker_threads = 4), malformed_input_corpus);

async fn malformed_input_corpus(mode: Mode) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name().is_some_and(|n| n.starts_with("tokio-runtime-worker")) {
            PANICS.fetch_add(1, Ordering::SeqCst);
        }
        previous(info);
    }));
    let started = Instant::now();
    let pool = MockPool::start(PoolOptions::default()).await;
    let proxy = spawn_proxy(mode_config(mode, pool.addr)).await;
    let cases = Arc::new(corpus());
    assert!(cases.len() >= 300, "only {} cases", cases.len());

    let addr = proxy.addr;
    let outcomes: Vec<(usize, Outcome)> = futures::stream::iter(0..cases.len())
        .map(|i| {
            let cases = cases.clone();
            async move { (i, run(addr, &cases[i]).await) }
        })
        .buffer_unordered(BATCH)
        .collect()
        .await;

    let mut failures = Vec::new();
    let (mut replies, mut closes) = (0, 0);
    for (i, outcome) in &outcomes {
        match outcome {
            Outcome::Reply(line) if line.contains(r#","error":["#) => replies += 1,
            Outcome::Reply(_) => {}
            Outcome::Closed => closes += 1,
            Outcome::Silent => {}
        }
        let case = &cases[*i];
        if let Err(why) = judge(&case.expect, outcome) {
            failures.push(format!("{}: {why}", case.name));
        }
    }
    // A forwarded share would have reached the pool long before the last case's reply.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let submits = pool.submits();
    proxy.shutdown().await;
    eprintln!(
        "{mode:?}: {} cases: {replies} error replies, {closes} closes, in {:.2?}",
        cases.len(),
        started.elapsed()
    );
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
    assert!(submits.is_empty(), "shares reached the pool: {submits:?}");
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "the proxy panicked");
}
