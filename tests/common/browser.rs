//! Headless Chromium (Debian's chromium package, which scripts/test.sh
//! installs) for the status page's tests.

use std::path::Path;
use std::process::Command;

/// Headless Chromium on `url` with a profile of its own, once it has loaded,
/// run its scripts and followed its navigations (`--virtual-time-budget`
/// lets the page's polling run ahead of the wall clock), doing `action`
/// (`--dump-dom`, `--screenshot=…`); its stdout.
fn chromium(url: &str, profile: &Path, action: &str, extra: &[&str]) -> String {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or_else(|| panic!("Chromium is missing: apt-get install chromium (scripts/test.sh installs it)"));
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1200,800",
            "--virtual-time-budget=15000",
            action,
        ])
        .args(extra)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .output()
        .expect("start chromium");
    assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The DOM of `url` in headless Chromium.
pub fn chromium_dom(url: &str, profile: &Path) -> String {
    chromium(url, profile, "--dump-dom", &[])
}

/// The DOM of `url` in headless Chromium, trusting any certificate (the
/// tests' own CA is not the system's).
pub fn chromium_dom_trusting(url: &str, profile: &Path) -> String {
    chromium(url, profile, "--dump-dom", &["--ignore-certificate-errors"])
}

/// A PNG of `url` in headless Chromium, written to `to`.
pub fn chromium_screenshot(url: &str, profile: &Path, to: &Path) {
    chromium(url, profile, &format!("--screenshot={}", to.display()), &[]);
    assert!(to.exists(), "chromium wrote no screenshot to {}", to.display());
}
