//! A `flowfarm dev` process, started as a new user starts it: from the
//! repository's root, with Postgres and Redis pointed at closed ports so
//! anything that still needed them would fail.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{flowfarm_bin, free_port, repo_path, signal};

pub struct DevFarm {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every stdout line read so far.
    pub seen: Vec<String>,
    /// `http://127.0.0.1:PORT` of the gRPC API.
    pub url: String,
    pub status_page: String,
    pub admin: String,
}

impl DevFarm {
    /// Starts `flowfarm dev --data DATA --workers N` (plus `extra`) on
    /// ephemeral ports and waits until it listens.
    #[allow(clippy::zombie_processes)] // waited for in stop() or Drop
    pub fn start(data: &Path, workers: u32, extra: &[&str]) -> DevFarm {
        let mut child = Command::new(flowfarm_bin())
            .current_dir(repo_path(""))
            .args(["dev", "--data"])
            .arg(data)
            .args(["--listen", "127.0.0.1:0", "--status-listen", "127.0.0.1:0", "--workers", &workers.to_string()])
            .args(extra)
            .env("FLOWFARM_DATABASE_URL", format!("postgres://postgres@127.0.0.1:{}/nothing", free_port()))
            .env("FLOWFARM_REDIS_URL", format!("redis://127.0.0.1:{}/0", free_port()))
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start flowfarm dev");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut farm = DevFarm { child, lines, seen: Vec::new(), url: String::new(), status_page: String::new(), admin: String::new() };
        farm.status_page = farm.wait_line("status page on ", Duration::from_secs(60)).to_owned();
        let addr = farm.wait_line("listening on ", Duration::from_secs(60));
        farm.url = format!("http://{addr}");
        farm.admin = std::fs::read_to_string(data.join("admin.token")).expect("the admin token in the data folder").trim().to_owned();
        farm
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest.
    pub fn wait_line(&mut self, prefix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.to_owned();
                    }
                }
                Err(_) => panic!("no line starting {prefix:?} within {limit:?}; stdout so far:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Sends `name` (INT as Ctrl-C does, TERM) and returns the exit status.
    pub fn stop_with(mut self, name: &str) -> std::process::ExitStatus {
        signal(&self.child, name);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for flowfarm dev") {
                return status;
            }
            assert!(Instant::now() < deadline, "flowfarm dev did not stop within 120 s of SIG{name}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for DevFarm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
