//! The chaos suite: a whole farm of real processes with the shipped timings
//! (`config/flowfarm.toml`: 30 s leases, 10 s heartbeats), faults injected
//! one scenario at a time, each on its own batch, each ending with one audit.
//!
//! The farm: a Postgres of the test's own (initdb on a free port, so it may
//! be stopped and killed), a private redis-server, two coordinators on that
//! one database, and two workers rendering in different dtypes (f32 and
//! bf16, so a late upload from the wrong attempt would change the bytes):
//! `w1` talks to coordinator A directly, `w2` to coordinator B through a TCP
//! proxy in the test that can drop and delay connections.
//!
//! The audit of a batch: every job succeeded, with exactly one `succeeded`
//! event; one result object per job, the recorded one, whose SHA-256 is the
//! recorded one, and no other object under the batch; every job's event
//! chain legal and continuous; a watcher that followed the batch throughout
//! (reconnecting to either coordinator with its cursor) saw every transition
//! once: its first snapshot plus the changes it saw equal the final counts.
//! The suite prints a table: scenario, jobs, lost, duplicated, recovery time.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use flowfarm_core::{JobState, Transition};
use flowfarm_proto::v1 as pb;
use flowfarm_proto::v1::render_service_client::RenderServiceClient;
use flowfarm_store::PgStore;
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tokio_stream::StreamExt;
use uuid::Uuid;

const MODEL: &str = "flowfarm-tiny";
/// Longer than the shipped 30 s lease.
const PAST_THE_LEASE: Duration = Duration::from_secs(35);

/// A TCP proxy between a worker and a coordinator. While flaky, it refuses
/// a third of new connections, delays the others by up to 300 ms, and cuts
/// every connection, new or already open, 0.2–1.5 s after it turned flaky
/// (or after it opened).
struct Proxy {
    port: u16,
    flaky: Arc<AtomicBool>,
    /// Connections refused or cut while flaky.
    broken: Arc<AtomicUsize>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let flaky = Arc::new(AtomicBool::new(false));
        let broken = Arc::new(AtomicUsize::new(0));
        let (is_flaky, breaks) = (flaky.clone(), broken.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let (refuse, delay) = {
                    let mut rng = rand::thread_rng();
                    (rng.gen_bool(1.0 / 3.0), rng.gen_range(0..300))
                };
                if is_flaky.load(Ordering::SeqCst) && refuse {
                    breaks.fetch_add(1, Ordering::SeqCst);
                    drop(inbound);
                    continue;
                }
                let (flaky, breaks) = (is_flaky.clone(), breaks.clone());
                tokio::spawn(async move {
                    if flaky.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                    }
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else { return };
                    let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                    tokio::pin!(copy);
                    let mut cut_at: Option<Instant> = None;
                    loop {
                        tokio::select! {
                            _ = &mut copy => return,
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                                if !flaky.load(Ordering::SeqCst) {
                                    cut_at = None;
                                    continue;
                                }
                                let at = *cut_at.get_or_insert_with(|| Instant::now() + Duration::from_millis(rand::thread_rng().gen_range(200..1500)));
                                if Instant::now() >= at {
                                    breaks.fetch_add(1, Ordering::SeqCst);
                                    // Dropping the copy and both streams closes the connection.
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        Proxy { port, flaky, broken }
    }
}

/// The farm under test.
struct Cluster {
    // Fields drop in order: processes before the servers they use.
    a: Option<Server>,
    /// Held: the second coordinator runs throughout.
    _b: Server,
    w1: Option<WorkerProcess>,
    w2: Option<WorkerProcess>,
    redis: RedisServer,
    pg: PgServer,
    dir: tempfile::TempDir,
    db_url: String,
    results: PathBuf,
    a_addr: String,
    b_addr: String,
    proxy: Proxy,
    submitter: String,
    worker_token: String,
    store: PgStore,
    restarts: u32,
}

impl Cluster {
    async fn start() -> Cluster {
        let pg = PgServer::start();
        let db_url = pg.url("flowfarm");
        let dir = tempfile::tempdir().unwrap();
        let results = dir.path().join("results");
        let redis = RedisServer::start();
        // The coordinator creates and migrates the database; the shipped config otherwise.
        let a = Server::spawn(&db_url, &config_path(), &results, &redis.url(), "127.0.0.1:0", &[]);
        let b = Server::spawn(&db_url, &config_path(), &results, &redis.url(), "127.0.0.1:0", &[]);
        let (a_addr, b_addr) = (a.addr.to_string(), b.addr.to_string());
        let proxy = Proxy::start(b.addr).await;
        let submitter = token_at(&db_url, "submit", "studio");
        let worker_token = token_at(&db_url, "worker", "fleet");
        let store = PgStore::connect(&db_url, 4).await.unwrap();
        let mut c = Cluster {
            a: Some(a),
            _b: b,
            w1: None,
            w2: None,
            redis,
            pg,
            dir,
            db_url,
            results,
            a_addr,
            b_addr,
            proxy,
            submitter,
            worker_token,
            store,
            restarts: 0,
        };
        c.w1 = Some(c.worker("w1", "f32", &format!("http://{}", c.a_addr)));
        c.w2 = Some(c.worker("w2", "bf16", &format!("http://127.0.0.1:{}", c.proxy.port)));
        c
    }

    fn worker(&mut self, name: &str, dtype: &str, coordinator: &str) -> WorkerProcess {
        self.restarts += 1;
        let config = write(
            self.dir.path(),
            &format!("{name}-{}.toml", self.restarts),
            &format!(
                "name = \"{name}\"\ncapacity = 1\ndtype = \"{dtype}\"\ndrain_timeout_seconds = 30\n[[models]]\nname = \"{MODEL}\"\npath = \"{}\"\n",
                repo_path("models/flowfarm-tiny").display()
            ),
        );
        let log = self.dir.path().join(format!("{name}-{}.log", self.restarts));
        let env = [
            ("FLOWFARM_SERVER", coordinator.to_owned()),
            ("FLOWFARM_TOKEN", self.worker_token.clone()),
            ("FLOWFARM_REDIS_URL", self.redis.url()),
            ("FLOWFARM_RESULTS_DIR", self.results.display().to_string()),
        ];
        WorkerProcess::spawn(&config, &env, log)
    }

    fn logs(&self) -> String {
        [("w1", &self.w1), ("w2", &self.w2)]
            .iter()
            .map(|(name, w)| format!("--- {name} ---\n{}", w.as_ref().map(|w| w.log()).unwrap_or_default()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn submit(&self, scenario: &str, jobs: usize) -> Uuid {
        let lines: Vec<String> = (0..jobs)
            .map(|i| {
                format!("{{\"model\":\"{MODEL}\",\"prompt\":\"{scenario} shot {i}\",\"seed\":{i},\"steps\":30,\"width\":64,\"height\":64}}")
            })
            .collect();
        let path = write(self.dir.path(), &format!("{}.jsonl", Uuid::new_v4()), &(lines.join("\n") + "\n"));
        let out = ok_json(farmctl(&format!("http://{}", self.a_addr), &self.submitter, &["--json", "submit", path.to_str().unwrap()]));
        out["batch"]["id"].as_str().unwrap().parse().unwrap()
    }

    /// A query that may meet Postgres down: retried until it answers.
    async fn count(&self, sql: &str, batch: Uuid) -> i64 {
        loop {
            match sqlx::query_scalar::<_, i64>(sql).bind(batch).fetch_one(self.store.pool()).await {
                Ok(n) => return n,
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    async fn wait_for(&self, what: &str, limit: Duration, batch: Uuid, sql: &str, enough: i64) {
        let deadline = Instant::now() + limit;
        while self.count(sql, batch).await < enough {
            assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_running_on(&self, batch: Uuid, worker: &str) {
        let sql = format!(
            "SELECT count(*) FROM jobs j JOIN workers w ON w.id = j.worker_id WHERE j.batch_id = $1 AND j.state = 'running' AND w.name = '{worker}'"
        );
        self.wait_for(&format!("a job running on {worker}"), Duration::from_secs(120), batch, &sql, 1).await;
    }
}

/// What one watcher saw of a batch.
#[derive(Default)]
struct Watched {
    first: Option<pb::JobCounts>,
    last: Option<pb::JobCounts>,
    events: Vec<pb::JobEvent>,
    reconnects: u32,
}

/// Follows `batch` to its end, reconnecting to the other coordinator with
/// its cursor whenever a stream breaks; `subscribed` fires once the first snapshot is in,
/// so that a fault injected after it finds the watcher's stream open.
async fn watch(addrs: [String; 2], token: String, batch: Uuid, limit: Duration, subscribed: oneshot::Sender<()>) -> Watched {
    let mut subscribed = Some(subscribed);
    let mut seen = Watched::default();
    let mut cursor = String::new();
    let deadline = Instant::now() + limit;
    let mut turn = 0;
    while Instant::now() < deadline {
        let addr = &addrs[turn % 2];
        turn += 1;
        let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut client = RenderServiceClient::with_interceptor(channel, flowfarm_testkit::Auth::new(&token).unwrap());
        let request = pb::WatchBatchRequest { batch_id: batch.to_string(), after: cursor.clone() };
        let mut stream = match client.watch_batch(request).await {
            Ok(r) => r.into_inner(),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if seen.first.is_some() {
            seen.reconnects += 1;
        }
        while let Some(message) = stream.next().await {
            let Ok(message) = message else { break };
            cursor = message.cursor.clone();
            match message.event {
                Some(pb::watch_batch_event::Event::Snapshot(b)) => {
                    if seen.first.is_none() {
                        seen.first = b.counts;
                        if let Some(subscribed) = subscribed.take() {
                            let _ = subscribed.send(());
                        }
                    } else {
                        seen.last = b.counts;
                        return seen;
                    }
                }
                Some(pb::watch_batch_event::Event::StateChange(e)) => seen.events.push(e),
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    seen
}

fn state_of(proto: i32) -> Option<JobState> {
    match pb::JobState::try_from(proto).ok()? {
        pb::JobState::Queued => Some(JobState::Queued),
        pb::JobState::Dispatched => Some(JobState::Dispatched),
        pb::JobState::Running => Some(JobState::Running),
        pb::JobState::Succeeded => Some(JobState::Succeeded),
        pb::JobState::Failed => Some(JobState::Failed),
        pb::JobState::Cancelled => Some(JobState::Cancelled),
        pb::JobState::Dead => Some(JobState::Dead),
        pb::JobState::Unspecified => None,
    }
}

fn counts_by_state(c: &pb::JobCounts) -> BTreeMap<JobState, i64> {
    BTreeMap::from([
        (JobState::Queued, c.queued as i64),
        (JobState::Dispatched, c.dispatched as i64),
        (JobState::Running, c.running as i64),
        (JobState::Succeeded, c.succeeded as i64),
        (JobState::Failed, c.failed as i64),
        (JobState::Cancelled, c.cancelled as i64),
        (JobState::Dead, c.dead as i64),
    ])
}

/// One line of the table.
struct Row {
    scenario: &'static str,
    jobs: usize,
    lost: usize,
    duplicated: usize,
    /// Objects of attempts that did not succeed, removed by the sweeper.
    swept: u64,
    recovery: Duration,
    reconnects: u32,
}

/// The audit of one batch; panics naming what is wrong. Returns lost and
/// duplicated jobs and the objects the sweeper removed first (a worker
/// killed between its upload and its report leaves one; the coordinators'
/// own sweeps wait 10 minutes, this one does not).
async fn audit(c: &Cluster, scenario: &str, batch: Uuid, watched: &Watched) -> (usize, usize, u64) {
    let results = flowfarm_results::ResultStore::local(&c.results).unwrap();
    let swept = flowfarm_coordinator::sweeper::sweep_orphans(&c.store, &results, Duration::from_secs(3600), Duration::ZERO)
        .await
        .unwrap_or_else(|e| panic!("{scenario}: sweep: {e}"));
    let jobs: Vec<(Uuid, String, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT id, state, result_key, result_sha256 FROM jobs WHERE batch_id = $1 ORDER BY id")
            .bind(batch)
            .fetch_all(c.store.pool())
            .await
            .unwrap();
    let events: Vec<(i64, Uuid, Option<String>, String)> =
        sqlx::query_as("SELECT id, job_id, from_state, to_state FROM job_events WHERE batch_id = $1 ORDER BY job_id, id")
            .bind(batch)
            .fetch_all(c.store.pool())
            .await
            .unwrap();
    let parse = |s: &str| s.parse::<JobState>().unwrap_or_else(|_| panic!("state {s}"));

    // Each job's chain: created queued, each event from where the last left
    // it, each move legal (a redispatch stays dispatched).
    let mut last: BTreeMap<Uuid, JobState> = BTreeMap::new();
    let mut succeeded_events: BTreeMap<Uuid, usize> = BTreeMap::new();
    for (id, job, from, to) in &events {
        let to = parse(to);
        match (from.as_deref().map(parse), last.get(job)) {
            (None, None) => assert_eq!(to, JobState::Queued, "{scenario}: job {job} created as {to:?}"),
            (Some(from), Some(&before)) => {
                assert_eq!(from, before, "{scenario}: event {id} of job {job} starts from {from:?}, the job was {before:?}");
                let redispatch = from == JobState::Dispatched && to == JobState::Dispatched;
                assert!(redispatch || Transition::is_legal(from, to), "{scenario}: event {id}: {from:?} → {to:?} is not a legal move");
            }
            other => panic!("{scenario}: event {id} of job {job} breaks the chain: {other:?}"),
        }
        last.insert(*job, to);
        if to == JobState::Succeeded {
            *succeeded_events.entry(*job).or_default() += 1;
        }
    }

    // Results: one object per success, the recorded one, bytes as recorded.
    let mut lost = 0;
    let mut duplicated = 0;
    let mut recorded = HashSet::new();
    for (job, state, key, sha) in &jobs {
        assert_eq!(last.get(job).map(|s| s.as_str()), Some(state.as_str()), "{scenario}: job {job}'s events end elsewhere than its state");
        if state != "succeeded" {
            lost += 1;
            continue;
        }
        duplicated += succeeded_events.get(job).copied().unwrap_or(0).saturating_sub(1);
        let key = key.clone().unwrap_or_else(|| panic!("{scenario}: job {job} succeeded without a result"));
        let bytes = std::fs::read(c.results.join(&key)).unwrap_or_else(|e| panic!("{scenario}: result {key}: {e}"));
        assert_eq!(hex::encode(Sha256::digest(&bytes)), sha.clone().unwrap(), "{scenario}: {key} is not the bytes whose hash was recorded");
        recorded.insert(c.results.join(&key));
    }
    let objects: Vec<PathBuf> = walk(&c.results.join(batch.to_string()));
    let stray: Vec<&PathBuf> = objects.iter().filter(|p| !recorded.contains(*p)).collect();
    duplicated += stray.len();
    assert!(stray.is_empty(), "{scenario}: objects no success recorded: {stray:?}");

    // The watcher: no transition twice, and first snapshot + changes = the end.
    let ids: Vec<u64> = watched.events.iter().map(|e| e.id).collect();
    let unique: HashSet<u64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "{scenario}: the watcher saw a transition twice");
    let known: HashSet<u64> = events.iter().map(|(id, ..)| *id as u64).collect();
    assert!(unique.is_subset(&known), "{scenario}: the watcher saw transitions the store does not have");
    let first = watched.first.as_ref().unwrap_or_else(|| panic!("{scenario}: the watcher got no snapshot"));
    let mut counts = counts_by_state(first);
    for e in &watched.events {
        if let Some(from) = state_of(e.from_state) {
            *counts.entry(from).or_default() -= 1;
        }
        *counts.entry(state_of(e.to_state).unwrap()).or_default() += 1;
    }
    let mut end = BTreeMap::new();
    for (_, state, ..) in &jobs {
        *end.entry(parse(state)).or_insert(0i64) += 1;
    }
    let end: BTreeMap<JobState, i64> =
        counts_by_state(&pb::JobCounts::default()).into_keys().map(|s| (s, end.get(&s).copied().unwrap_or(0))).collect();
    assert_eq!(
        counts, end,
        "{scenario}: the watcher's first snapshot plus what it saw is not the batch's end ({} reconnects)",
        watched.reconnects
    );
    let last_snapshot = watched.last.as_ref().unwrap_or_else(|| panic!("{scenario}: the watcher got no final snapshot"));
    assert_eq!(counts_by_state(last_snapshot), end, "{scenario}: the final snapshot");
    (lost, duplicated, swept)
}

/// Submits a batch, injects `fault` once a job runs on `on`, waits for the
/// batch to finish and audits it.
async fn scenario(c: &mut Cluster, name: &'static str, jobs: usize, on: &str, fault: impl AsyncFnOnce(&mut Cluster)) -> Row {
    let batch = c.submit(name, jobs);
    let (subscribed, on_stream) = oneshot::channel();
    let watcher =
        tokio::spawn(watch([c.a_addr.clone(), c.b_addr.clone()], c.submitter.clone(), batch, Duration::from_secs(400), subscribed));
    // A fault before the watcher's first snapshot would test nothing of its
    // reconnection (and once made this suite flaky): wait for it.
    tokio::time::timeout(Duration::from_secs(60), on_stream)
        .await
        .unwrap_or_else(|_| panic!("{name}: the watcher got no snapshot within 60 s"))
        .unwrap_or_else(|_| panic!("{name}: the watcher ended before its first snapshot"));
    c.wait_running_on(batch, on).await;
    let fault_at = Instant::now();
    fault(c).await;
    c.wait_for(
        &format!("{name}: every job to finish"),
        Duration::from_secs(300),
        batch,
        "SELECT count(*) FROM jobs WHERE batch_id = $1 AND state IN ('succeeded', 'failed', 'cancelled', 'dead')",
        jobs as i64,
    )
    .await;
    let recovery = fault_at.elapsed();
    let watched = watcher.await.unwrap();
    let (lost, duplicated, swept) = audit(c, name, batch, &watched).await;
    Row { scenario: name, jobs, lost, duplicated, swept, recovery, reconnects: watched.reconnects }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_farm_loses_and_doubles_nothing_under_faults() {
    let mut c = Cluster::start().await;
    let mut rows = Vec::new();

    rows.push(scenario(&mut c, "no fault (two coordinators)", 6, "w1", async |_| {}).await);

    rows.push(
        scenario(&mut c, "worker kill -9 mid-render", 6, "w1", async |c| {
            drop(c.w1.take());
            let a = format!("http://{}", c.a_addr);
            c.w1 = Some(c.worker("w1", "f32", &a));
        })
        .await,
    );

    let killed = scenario(&mut c, "coordinator kill -9 mid-batch", 6, "w1", async |c| {
        c.a.take().unwrap().kill();
        tokio::time::sleep(Duration::from_secs(2)).await;
        c.a = Some(Server::spawn(&c.db_url, &config_path(), &c.results, &c.redis.url(), &c.a_addr, &[]));
    })
    .await;
    // The watcher's first stream was on A: it went on through B with its cursor.
    assert!(killed.reconnects > 0, "the watcher never lost its coordinator");
    rows.push(killed);

    rows.push(
        scenario(&mut c, "Redis FLUSHALL", 6, "w1", async |c| {
            assert_eq!(c.redis.cli(&["FLUSHALL"]).trim(), "OK");
        })
        .await,
    );

    rows.push(
        scenario(&mut c, "Redis restart", 6, "w1", async |c| {
            c.redis.restart(Duration::from_secs(2));
        })
        .await,
    );

    rows.push(
        scenario(&mut c, "Postgres restart mid-batch", 6, "w1", async |c| {
            c.pg.down("fast");
            tokio::time::sleep(Duration::from_secs(3)).await;
            c.pg.up();
        })
        .await,
    );

    rows.push(
        scenario(&mut c, "Postgres outage longer than a lease", 6, "w1", async |c| {
            c.pg.down("immediate");
            tokio::time::sleep(PAST_THE_LEASE).await;
            c.pg.up();
        })
        .await,
    );

    rows.push(
        scenario(&mut c, "worker SIGSTOP past its lease (bf16 vs f32)", 6, "w2", async |c| {
            let w2 = c.w2.as_ref().unwrap();
            signal(&w2.child, "STOP");
            tokio::time::sleep(PAST_THE_LEASE).await;
            signal(&c.w2.as_ref().unwrap().child, "CONT");
        })
        .await,
    );

    rows.push(
        scenario(&mut c, "flaky network worker → coordinator", 6, "w2", async |c| {
            c.proxy.flaky.store(true, Ordering::SeqCst);
        })
        .await,
    );
    c.proxy.flaky.store(false, Ordering::SeqCst);
    let broken = c.proxy.broken.load(Ordering::SeqCst);
    assert!(broken > 0, "the flaky proxy broke no connection: the scenario tested nothing");
    println!("flaky network: {broken} connections refused or cut");

    println!(
        "\n| scenario | jobs | lost | duplicated | recovery | orphans swept | watcher reconnects |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.1} s | {} | {} |",
            r.scenario,
            r.jobs,
            r.lost,
            r.duplicated,
            r.recovery.as_secs_f64(),
            r.swept,
            r.reconnects
        );
    }
    for r in &rows {
        assert_eq!((r.lost, r.duplicated), (0, 0), "{}: lost {}, duplicated {}\n{}", r.scenario, r.lost, r.duplicated, c.logs());
    }
}

/// Health tells the truth: NOT_SERVING within 5 s of the coordinator's
/// Postgres or Redis going away, SERVING again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_postgres_and_redis() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let pg = PgServer::start();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::spawn(&pg.url("flowfarm"), &config_path(), &dir.path().join("results"), &redis.url(), "127.0.0.1:0", &[]);
    let channel = tonic::transport::Channel::from_shared(server.url()).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel);
    let mut wait_for = async |wanted: ServingStatus, limit: Duration| -> Duration {
        let start = Instant::now();
        loop {
            let status = health.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner().status;
            if status == wanted as i32 {
                return start.elapsed();
            }
            assert!(start.elapsed() < limit, "health still {status} after {limit:?}, waiting for {wanted:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    wait_for(ServingStatus::Serving, Duration::from_secs(5)).await;

    pg.down("fast");
    let down = wait_for(ServingStatus::NotServing, Duration::from_secs(5)).await;
    let mut liveness = HealthClient::new(tonic::transport::Channel::from_shared(server.url()).unwrap().connect().await.unwrap());
    let live = liveness.check(HealthCheckRequest { service: "liveness".into() }).await.unwrap().into_inner().status;
    assert_eq!(live, ServingStatus::Serving as i32, "liveness is not readiness: the process still answers");
    // The same over plain HTTP, for probes that cannot speak gRPC over TLS.
    let metrics = server.metrics.expect("metrics served");
    let (status, body) = http_get(metrics, "/readyz");
    assert!(status.contains("503") && body.contains("Postgres"), "{status} {body}");
    assert!(http_get(metrics, "/healthz").0.contains("200"));
    pg.up();
    let up = wait_for(ServingStatus::Serving, Duration::from_secs(30)).await;
    let (status, _) = http_get(metrics, "/readyz");
    assert!(status.contains("200"), "{status}");
    println!("Postgres stopped: NOT_SERVING after {down:.1?}; restarted: SERVING after {up:.1?}");

    let mut redis = redis;
    let restart = std::thread::spawn(move || {
        redis.restart(Duration::from_secs(4));
        redis
    });
    let down = wait_for(ServingStatus::NotServing, Duration::from_secs(5)).await;
    let up = wait_for(ServingStatus::Serving, Duration::from_secs(30)).await;
    println!("Redis stopped: NOT_SERVING after {down:.1?}; restarted: SERVING after {up:.1?}");
    drop(restart.join().unwrap());
    server.stop();
}
