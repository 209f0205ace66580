//! The `Type=notify` contract, seen from systemd's side: a datagram socket stands in for
//! `NOTIFY_SOCKET` and records what the daemon sends.

use std::io::{ErrorKind, Read};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// No child may outlive this; a hung daemon fails the test instead of hanging it.
const CHILD_TIMEOUT: Duration = Duration::from_secs(20);

/// A running daemon. Dropping it (a failed assertion included) kills the process.
struct Daemon {
    child: Child,
    /// The daemon's worker store; removed with it.
    _data: tempfile::TempDir,
    listen: String,
    stderr: Option<JoinHandle<String>>,
}

impl Daemon {
    fn start(env: &[(&str, &str)]) -> Daemon {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let listen = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_loka-stratum"));
        cmd.args(["--listen", &listen, "--http-listen", "127.0.0.1:0", "--pool", "stratum+tcp://127.0.0.1:1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Neither the runner's configuration nor its own service manager may leak into the child.
        for (key, _) in std::env::vars_os() {
            let key_text = key.to_string_lossy().to_lowercase();
            if key_text.starts_with("loka_") || key_text.starts_with("watchdog_") {
                cmd.env_remove(key);
            }
        }
        cmd.env_remove("RUST_LOG").env_remove("NOTIFY_SOCKET").env("LOKA_SERVER__SHUTDOWN_GRACE", "1");
        cmd.envs(env.iter().copied());
        let data = tempfile::tempdir().unwrap();
        cmd.env("LOKA_INVENTORY__DATA_DIR", data.path());
        let mut child = cmd.spawn().unwrap();
        let mut pipe = child.stderr.take().unwrap();
        // Drained on a thread so a chatty child cannot block on a full pipe.
        let stderr = thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        });
        Daemon { child, _data: data, listen, stderr: Some(stderr) }
    }

    fn terminate(&self) {
        let killed = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(killed.success());
    }

    /// Waits for the exit, killing the child after `CHILD_TIMEOUT`; returns the status and stderr.
    fn finish(mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + CHILD_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                panic!("loka-stratum did not exit within {CHILD_TIMEOUT:?}");
            }
            thread::sleep(Duration::from_millis(20));
        };
        let stderr = self.stderr.take().unwrap().join().unwrap();
        (status, stderr)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Stands in for systemd's notification socket.
struct NotifySocket {
    socket: UnixDatagram,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> (NotifySocket, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        (NotifySocket { socket, _dir: dir }, path_text(&path))
    }

    /// The next datagram's lines, or `None` when nothing arrives by `deadline`.
    fn recv_until(&self, deadline: Instant) -> Option<Vec<String>> {
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8(buf[..n].to_vec()).unwrap();
                    return Some(text.lines().map(str::to_owned).collect());
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("notify socket: {e}"),
            }
        }
        None
    }

    /// Reads datagrams until one contains `line`, returning every datagram seen on the way.
    fn expect(&self, line: &str, within: Duration) -> Vec<Vec<String>> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        while let Some(message) = self.recv_until(deadline) {
            let found = message.iter().any(|l| l == line);
            seen.push(message);
            if found {
                return seen;
            }
        }
        panic!("no {line:?} within {within:?}; got {seen:?}");
    }
}

fn path_text(path: &Path) -> String {
    path.to_str().unwrap().to_owned()
}

#[test]
fn notifies_ready_watchdog_and_stopping() {
    let (notify, path) = NotifySocket::bind();
    // WATCHDOG_PID is left unset: it would have to be the child's pid, unknown before the spawn,
    // and when absent the daemon does not check it.
    let daemon = Daemon::start(&[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "200000")]);

    let seen = notify.expect("READY=1", CHILD_TIMEOUT);
    let ready = seen.last().unwrap();
    assert_eq!(seen.len(), 1, "READY=1 must come first: {seen:?}");
    assert!(
        ready.iter().any(|l| l.starts_with("STATUS=") && l.contains(&daemon.listen)),
        "STATUS must name the miner port: {ready:?}"
    );
    // Ready means bound: the miner port takes a connection at once.
    TcpStream::connect(&daemon.listen).expect("miner port not accepting after READY=1");

    // Pings every 100 ms; two within 2 s leaves plenty of slack on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut pings = 0;
    while pings < 2 {
        let message = notify.recv_until(deadline).unwrap_or_else(|| panic!("{pings} watchdog pings within 2 s"));
        assert_eq!(message, ["WATCHDOG=1"]);
        pings += 1;
    }

    daemon.terminate();
    let seen = notify.expect("STOPPING=1", Duration::from_secs(5));
    let before = &seen[..seen.len() - 1];
    assert!(before.iter().all(|m| m == &["WATCHDOG=1"]), "{seen:?}");
    let (status, stderr) = daemon.finish();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("systemd"), "{stderr}");
}

/// Without `NOTIFY_SOCKET` the daemon neither pings nor complains, even with a watchdog set.
#[test]
fn runs_without_notify_socket() {
    let daemon = Daemon::start(&[("WATCHDOG_USEC", "200000")]);
    let deadline = Instant::now() + CHILD_TIMEOUT;
    while TcpStream::connect(&daemon.listen).is_err() {
        assert!(Instant::now() < deadline, "never listened on {}", daemon.listen);
        thread::sleep(Duration::from_millis(20));
    }
    // Long enough for a few pings, had the watchdog started.
    thread::sleep(Duration::from_millis(300));
    daemon.terminate();
    let (status, stderr) = daemon.finish();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("systemd"), "{stderr}");
}
