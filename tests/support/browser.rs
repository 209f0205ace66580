//! A real headless browser (Debian's `chromium`; `.ci/run` installs it) for the status page.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// How long one chromium run may take before it is killed and the test fails.
pub const BROWSER_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs chromium headless on `url` with `extra` arguments; returns its stdout. Fails the test
/// when chromium is missing, fails or runs past [`BROWSER_TIMEOUT`].
pub async fn chromium(url: &str, extra: &[String]) -> String {
    let profile = tempfile::tempdir().expect("a temporary profile directory");
    let mut command = tokio::process::Command::new("chromium");
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = match command.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`chromium` is not on PATH: this test needs a headless browser. Run `.ci/run`, or \
             `apt-get install chromium`"
        ),
        Err(e) => panic!("starting chromium: {e}"),
    };
    // Dropping the future on timeout drops the child, which kills it.
    let output = tokio::time::timeout(BROWSER_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("chromium did not finish within {BROWSER_TIMEOUT:?}"))
        .expect("chromium's output");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "chromium failed ({}):\n{}\n{stdout}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The page's DOM after its scripts ran, as chromium serializes it.
pub async fn dump_dom(url: &str) -> String {
    chromium(url, &["--dump-dom".to_owned()]).await
}

/// A screenshot of `url` at `width`×`height` into `target/{name}`; fails unless it has some
/// content. Returns its path.
pub async fn screenshot(url: &str, name: &str, width: u32, height: u32) -> PathBuf {
    let png = target_dir().join(name);
    let _ = std::fs::remove_file(&png);
    chromium(url, &[format!("--screenshot={}", png.display()), format!("--window-size={width},{height}")]).await;
    let size = std::fs::metadata(&png).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", png.display())).len();
    assert!(size > 10_000, "the screenshot {} is only {size} bytes", png.display());
    png
}

/// The markup of `<section id="…">`, from the dumped DOM.
pub fn section<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom.find(&format!("<section id=\"{id}\"")).unwrap_or_else(|| panic!("no section {id} in\n{dom}"));
    let len = dom[start..].find("</section>").expect("the section ends");
    &dom[start..start + len]
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}
