//! Helpers shared by the end-to-end tests: the `flowfarm` and `farmctl`
//! binaries as processes, private Postgres and Redis servers, tokens.
#![allow(dead_code)] // each test file uses its own subset

pub mod browser;
pub mod dev;
pub mod http;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use flowfarm_testkit::TestDb;
use serde_json::Value;

/// A binary of the workspace, built beside these tests, that must be newer
/// than the sources of the crates it is built from (`sources`, under
/// crates/), or the tests would run old code.
fn workspace_bin(name: &str, sources: &[&str]) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe.parent().and_then(Path::parent).expect("target folder").join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)", path.display()));
    let folders = sources.iter().map(|c| repo_path(&format!("crates/{c}/src"))).chain([repo_path("proto")]);
    if let Some(newer) = folders.into_iter().find_map(|folder| changed_after(&folder, built)) {
        panic!("{} is older than {}: run `cargo build --workspace --bins` first (scripts/test.sh does)", path.display(), newer.display());
    }
    path
}

/// A file under `dir` changed after `time`, if any.
fn changed_after(dir: &Path, time: std::time::SystemTime) -> Option<PathBuf> {
    walk(dir).into_iter().find(|p| std::fs::metadata(p).and_then(|m| m.modified()).is_ok_and(|m| m > time))
}

/// Every file under `dir`, at any depth (none if it does not exist).
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

pub fn flowfarm_bin() -> PathBuf {
    workspace_bin(
        "flowfarm",
        &[
            "flowfarm",
            "flowfarm-config",
            "flowfarm-coordinator",
            "flowfarm-core",
            "flowfarm-engine",
            "flowfarm-group",
            "flowfarm-proto",
            "flowfarm-queue",
            "flowfarm-results",
            "flowfarm-sheet",
            "flowfarm-store",
            "flowfarm-worker",
        ],
    )
}

pub fn farmctl_bin() -> PathBuf {
    workspace_bin("farmctl", &["farmctl", "flowfarm-core", "flowfarm-proto", "flowfarm-sheet"])
}

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative)
}

pub fn config_path() -> PathBuf {
    repo_path("config/flowfarm.toml")
}

/// The example config's `flowfarm-tiny` model with short timings (lease 3 s,
/// heartbeat 1 s, re-dispatch after 3 s), so failures recover quickly.
pub fn coordinator_config() -> String {
    let example = std::fs::read_to_string(config_path()).unwrap();
    let tiny = example.find("[[models]]\nname = \"flowfarm-tiny\"").expect("flowfarm-tiny in the example config");
    let end = example[tiny + 10..].find("[[models]]").map_or(example.len(), |i| tiny + 10 + i);
    format!(
        "[server]\nshutdown_grace_seconds = 2.0\n\
         [leases]\nlease_seconds = 3\nheartbeat_interval_seconds = 1\nworker_timeout_seconds = 5\nreaper_interval_seconds = 0.5\n\
         [queue]\nlookahead_per_worker = 2\ndispatch_interval_seconds = 0.2\nredispatch_after_seconds = 3.0\n\
         [retries]\nbackoff_base_seconds = 0.2\nbackoff_max_seconds = 1.0\n\
         {}",
        &example[tiny..end]
    )
}

/// A `flowfarm coordinator` process over one test database.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub metrics: Option<SocketAddr>,
    /// `http://127.0.0.1:PORT` (https with TLS), as the coordinator printed it.
    pub status_page: Option<String>,
    // Held open: the coordinator must be able to write to its stdout.
    _stdout: BufReader<ChildStdout>,
}

impl Server {
    /// The example config, with dispatch pointed at a Redis that is not
    /// there: for tests of the API alone, which move jobs themselves.
    pub fn start(db: &TestDb, results: &Path) -> Server {
        Server::start_with(db, &config_path(), results, "redis://127.0.0.1:1/")
    }

    pub fn start_with(db: &TestDb, config: &Path, results: &Path, redis_url: &str) -> Server {
        Server::start_on(db, config, results, redis_url, "127.0.0.1:0")
    }

    /// As [`Server::start_with`], listening on `listen` (a restart keeps its address).
    pub fn start_on(db: &TestDb, config: &Path, results: &Path, redis_url: &str, listen: &str) -> Server {
        Server::start_env(db, config, results, redis_url, listen, &[])
    }

    /// As [`Server::start_on`], with more environment variables.
    // The child is returned inside `Server`, whose Drop kills and waits for
    // it; clippy cannot follow it there from the loop's other branches.
    pub fn start_env(db: &TestDb, config: &Path, results: &Path, redis_url: &str, listen: &str, env: &[(String, String)]) -> Server {
        Server::spawn(&db.url, config, results, redis_url, listen, env)
    }

    /// A coordinator over the database at `database_url` (which it migrates).
    #[allow(clippy::zombie_processes)]
    pub fn spawn(database_url: &str, config: &Path, results: &Path, redis_url: &str, listen: &str, env: &[(String, String)]) -> Server {
        let mut child = Command::new(flowfarm_bin())
            .arg("--config")
            .arg(config)
            .arg("coordinator")
            .env("FLOWFARM_DATABASE_URL", database_url)
            .env("FLOWFARM_LISTEN", listen)
            .env("FLOWFARM_METRICS_LISTEN", "127.0.0.1:0")
            .env("FLOWFARM_STATUS__LISTEN", "127.0.0.1:0")
            .env("FLOWFARM_RESULTS_DIR", results)
            // The tests make their own tokens; the one that checks the first
            // admin token names its file.
            .env("FLOWFARM_AUTH__ADMIN_TOKEN_FILE", "")
            .env("FLOWFARM_REDIS_URL", redis_url)
            .env("RUST_LOG", "error")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start flowfarm coordinator");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut metrics = None;
        let mut status_page = None;
        loop {
            let mut line = String::new();
            stdout.read_line(&mut line).expect("read coordinator stdout");
            let line = line.trim();
            if let Some(addr) = line.strip_prefix("metrics on ") {
                metrics = Some(addr.parse().expect("metrics address"));
            } else if let Some(url) = line.strip_prefix("status page on ") {
                status_page = Some(url.to_owned());
            } else if let Some(addr) = line.strip_prefix("listening on ") {
                let addr = addr.parse().expect("address");
                return Server { child, addr, metrics, status_page, _stdout: stdout };
            } else {
                panic!("unexpected line from coordinator: {line:?}");
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends the coordinator a signal (`HUP`, `TERM`, …).
    pub fn signal(&self, name: &str) {
        signal(&self.child, name);
    }

    /// kill -9: no shutdown at all.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait: the coordinator shuts down gracefully.
    pub fn stop(mut self) {
        signal(&self.child, "TERM");
        let status = self.child.wait().expect("wait for coordinator");
        assert!(status.success(), "coordinator exited with {status}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `flowfarm worker` process, killed when dropped; its stderr goes to a log file.
pub struct WorkerProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl WorkerProcess {
    /// Starts `flowfarm worker --worker-config config` with `env` (server,
    /// token, Redis, results…), info logs into `log` and one compute thread
    /// (workers and coordinators share the test machine's cores).
    pub fn spawn(config: &Path, env: &[(&str, String)], log: PathBuf) -> WorkerProcess {
        let child = Command::new(flowfarm_bin())
            .arg("worker")
            .arg("--worker-config")
            .arg(config)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("worker log file"))
            .spawn()
            .expect("start flowfarm worker");
        WorkerProcess { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status().expect("kill");
    assert!(status.success(), "kill -{name} failed");
}

/// A private `redis-server` on a free port, keeping nothing on disk, so a
/// test may flush, stop or restart it without touching anyone else's data.
pub struct RedisServer {
    child: Child,
    pub port: u16,
}

fn spawn_redis(port: u16) -> Child {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start redis-server (scripts/test.sh installs it)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_cli(port, &["PING"]).trim() != "PONG" {
        assert!(Instant::now() < deadline, "redis-server on port {port} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        RedisServer { child: spawn_redis(port), port }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stops the server and starts an empty one on the same port, as a
    /// Redis restart without persistence would.
    pub fn restart(&mut self, down_for: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down_for);
        self.child = spawn_redis(self.port);
    }

    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn token(db: &TestDb, role: &str, name: &str) -> String {
    token_at(&db.url, role, name)
}

/// A token created in the database at `database_url`.
pub fn token_at(database_url: &str, role: &str, name: &str) -> String {
    let out = Command::new(flowfarm_bin())
        .arg("--config")
        .arg(config_path())
        .args(["token", "create", "--role", role, "--name", name])
        .env("FLOWFARM_DATABASE_URL", database_url)
        .output()
        .expect("flowfarm token create");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf8").trim().to_owned()
}

pub fn farmctl(server: &str, token: &str, args: &[&str]) -> Output {
    Command::new(farmctl_bin()).args(args).env("FLOWFARM_SERVER", server).env("FLOWFARM_TOKEN", token).output().expect("run farmctl")
}

pub fn ok_json(out: Output) -> Value {
    assert!(out.status.success(), "farmctl failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path
}

/// A private S3-compatible server (s3s-fs, an S3 implementation over a
/// folder) on a free port, with one bucket. `FLOWFARM_TEST_S3S_FS` names the
/// binary; scripts/test.sh installs it.
pub struct S3Server {
    child: Child,
    pub port: u16,
    /// The folder behind the server: bucket `b`'s object `k` is `root/b/k`.
    pub root: tempfile::TempDir,
}

impl S3Server {
    pub fn start(bucket: &str) -> S3Server {
        let binary = std::env::var_os("FLOWFARM_TEST_S3S_FS")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/flowfarm/tools/bin/s3s-fs")))
            .filter(|p| p.is_file())
            .expect(
                "s3s-fs not found: run scripts/test.sh, or `cargo install s3s-fs@0.14.1 --features binary` and set FLOWFARM_TEST_S3S_FS",
            );
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(bucket)).unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(binary)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", "flowfarm", "--secret-key", "flowfarm-secret"])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs on port {port} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        S3Server { child, port, root }
    }

    /// The environment of a coordinator or worker storing results at `url`.
    pub fn env(&self, url: &str) -> Vec<(String, String)> {
        [
            ("FLOWFARM_RESULTS_URL", url.to_owned()),
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "flowfarm".into()),
            ("AWS_SECRET_ACCESS_KEY", "flowfarm-secret".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `program` run as the `postgres` user when the tests run as root (Postgres
/// refuses to run as root).
pub fn as_postgres(program: &Path) -> Command {
    let root = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false);
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A Postgres server of this test's own, in a temporary folder.
pub struct PgServer {
    pub dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

impl PgServer {
    pub fn start() -> PgServer {
        PgServer::start_with(|_| {})
    }

    /// As [`PgServer::start`], with `prepare` run on the data folder
    /// (certificates, `postgresql.conf`, `pg_hba.conf`) before the first start.
    pub fn start_with(prepare: impl FnOnce(&Path)) -> PgServer {
        // pg_config where it is installed; else Debian's versioned folders, newest first.
        let from_pg_config =
            Command::new("pg_config").arg("--bindir").output().ok().map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
        let mut debian: Vec<PathBuf> =
            std::fs::read_dir("/usr/lib/postgresql").into_iter().flatten().flatten().map(|e| e.path().join("bin")).collect();
        debian.sort();
        let bin = from_pg_config
            .into_iter()
            .chain(debian.into_iter().rev())
            .find(|p| p.join("initdb").exists())
            .expect("Postgres server binaries (initdb; scripts/test.sh installs postgresql)");
        let dir = tempfile::tempdir().unwrap();
        // Postgres runs as `postgres` when we are root: it must own its folder.
        let _ = Command::new("chown").arg("postgres:postgres").arg(dir.path()).status();
        let out = as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        prepare(&dir.path().join("data"));
        let _ = Command::new("chown").arg("-R").arg("postgres:postgres").arg(dir.path().join("data")).status();
        let pg = PgServer { dir, bin, port: free_port() };
        pg.up();
        pg
    }

    pub fn up(&self) {
        let options = format!(
            // fsync off is safe here (only the server process dies, never the
            // machine); commits stay synchronous, or an immediate stop would
            // lose acknowledged ones.
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off -c full_page_writes=off \
             -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let out = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-w", "-t", "60", "-o", &options, "start"])
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl start: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }

    /// `fast` (clean shutdown, clients cut off) or `immediate` (as a crash).
    pub fn down(&self, mode: &str) {
        let out = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", mode, "-w", "stop"])
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl stop: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// GET `path` over plain HTTP/1.1: the status line and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.lines().next().unwrap_or_default().to_owned(), body.to_owned())
}
