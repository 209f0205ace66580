//! The binary's command-line contract: the default config it prints, `check-config`, and that a
//! bad configuration exits with 64 before anything is bound.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// No child may outlive this; a hung daemon fails the test instead of hanging it.
const CHILD_TIMEOUT: Duration = Duration::from_secs(20);

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loka-stratum"));
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // The test runner's own environment must not leak into the child's configuration.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().to_lowercase().starts_with("loka_") {
            cmd.env_remove(key);
        }
    }
    cmd.env_remove("RUST_LOG").envs(env.iter().copied());
    cmd
}

/// Waits for `child`, killing it after `CHILD_TIMEOUT`. Pipes are drained on threads so a chatty
/// child cannot block on a full pipe.
fn finish(mut child: Child) -> Output {
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut text = String::new();
            pipe.read_to_string(&mut text).unwrap();
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + CHILD_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("loka-stratum did not exit within {CHILD_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output { code: status.code(), stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    finish(command(args, env).spawn().unwrap())
}

fn temp_config(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
    file
}

#[test]
fn default_config_prints_the_shipped_file() {
    let out = run(&["default-config"], &[]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/loka-stratum.toml")).unwrap();
    assert_eq!(out.stdout, shipped);
}

#[test]
fn check_config_masks_passwords() {
    let file = temp_config(
        "[server]\nmax_connections = 10\n\n[[pools]]\nurl = \"stratum+tcp://pool.example.com:3333\"\n\
         user = \"acct\"\npassword = \"hunter2-secret\"\n",
    );
    let out = run(&["check-config", file.path().to_str().unwrap()], &[("LOKA_SERVER__IDLE_TIMEOUT", "42")]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("password = \"***\""), "{}", out.stdout);
    assert!(out.stdout.contains("max_connections = 10"), "{}", out.stdout);
    assert!(out.stdout.contains("idle_timeout = 42"), "{}", out.stdout);
    assert!(!out.stdout.contains("hunter2") && !out.stderr.contains("hunter2"));
}

/// Every case must exit 64 with a message naming the key and the value. The listen port is held
/// by this test, so a daemon that bound before validating would exit 69 instead.
/// (arguments, environment, what stderr must contain)
type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, Vec<&'a str>);

#[test]
fn bad_configs_exit_64_before_binding() {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = held.local_addr().unwrap().to_string();
    let pool = "stratum+tcp://127.0.0.1:1";
    let unknown = temp_config("[server]\nmax_conections = 5\n");
    let negative = temp_config("[server]\nidle_timeout = -3\n");
    let unknown_path = unknown.path().to_str().unwrap();
    let negative_path = negative.path().to_str().unwrap();
    let net = ["--listen", listen.as_str(), "--http-listen", "127.0.0.1:0"];
    let with_pool = [&net[..], &["--pool", pool]].concat();
    let cases: Vec<Case<'_>> = vec![
        (
            [&with_pool[..], &["--config", unknown_path]].concat(),
            vec![],
            vec!["unknown key server.max_conections", unknown_path],
        ),
        (vec!["check-config", unknown_path], vec![], vec!["unknown key server.max_conections"]),
        (vec!["check-config", negative_path], vec![], vec!["server.idle_timeout: -3"]),
        (with_pool.clone(), vec![("LOKA_SERVER__MAX_CONNECTIONS", "0")], vec!["server.max_connections: 0"]),
        (with_pool.clone(), vec![("LOKA_SERVER__MAX_CONNECTIONS", "-1")], vec!["server.max_connections: -1"]),
        ([&["run"], &with_pool[..], &["--config", negative_path]].concat(), vec![], vec!["server.idle_timeout: -3"]),
        (vec!["--listen", "notanaddr", "--pool", pool], vec![], vec!["--listen", "\"notanaddr\""]),
        (
            [&net[..], &["--pool", "http://x:1"]].concat(),
            vec![],
            vec!["pools[0].url: \"http://x:1\"", "unsupported scheme"],
        ),
        (net.to_vec(), vec![], vec!["no pools configured", "--pool"]),
        (
            [&with_pool[..], &["--config", "/nonexistent/loka.toml"]].concat(),
            vec![],
            vec!["cannot read /nonexistent/loka.toml"],
        ),
    ];
    for (args, env, needles) in cases {
        let out = run(&args, &env);
        assert_eq!(out.code, Some(64), "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains("loka-stratum: config error:"), "{args:?}: {}", out.stderr);
        for needle in needles {
            assert!(out.stderr.contains(needle), "{args:?}: {:?} lacks {needle:?}", out.stderr);
        }
    }
    drop(held);
}

/// SIGTERM drains and exits 0. Readiness is a successful connect to the miner port, which also
/// means the signal handlers are installed (they go in before binding).
#[test]
fn sigterm_stops_the_daemon() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let data = tempfile::tempdir().unwrap();
    let child = command(
        &["--listen", &listen, "--http-listen", "127.0.0.1:0", "--pool", "stratum+tcp://127.0.0.1:1"],
        &[("LOKA_SERVER__SHUTDOWN_GRACE", "1"), ("LOKA_INVENTORY__DATA_DIR", data.path().to_str().unwrap())],
    )
    .spawn()
    .unwrap();
    let deadline = Instant::now() + CHILD_TIMEOUT;
    while TcpStream::connect(&listen).is_err() {
        if Instant::now() > deadline {
            let out = finish(child);
            panic!("never listened on {listen}: {}", out.stderr);
        }
        thread::sleep(Duration::from_millis(20));
    }
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let out = finish(child);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}
