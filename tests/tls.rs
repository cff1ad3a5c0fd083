//! TLS on every connection of the farm, with certificate authorities made by
//! the test: the coordinator's gRPC API (server TLS, SIGHUP reload, workers
//! bound to client certificates), Postgres and Redis.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use flowfarm_proto::client::{endpoint, BearerToken, ClientTls};
use flowfarm_proto::v1 as pb;
use flowfarm_proto::v1::worker_service_client::WorkerServiceClient;
use flowfarm_testkit::TestDb;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use tonic::Code;

/// A certificate authority of the test's own.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        Ca { cert: params.self_signed(&key).unwrap(), key }
    }

    /// Writes this CA's certificate, and a certificate for `names` (DNS
    /// names or IPs) with its key, into `dir` as `<stem>.crt`/`<stem>.key`.
    fn issue(&self, dir: &Path, stem: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (write_atomically(dir, &format!("{stem}.crt"), &cert.pem()), write_atomically(dir, &format!("{stem}.key"), &key.serialize_pem()))
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        write_atomically(dir, name, &self.cert.pem())
    }
}

/// Replaced in one step, as a certificate renewal would: a reader sees the old file or the new one.
fn write_atomically(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

fn farmctl_tls(server: &str, token: &str, ca: Option<&Path>, args: &[&str]) -> Output {
    let mut command = Command::new(farmctl_bin());
    command.arg("--server").arg(server).args(args).env("FLOWFARM_TOKEN", token).env_remove("FLOWFARM_CA");
    if let Some(ca) = ca {
        command.arg("--ca").arg(ca);
    }
    command.output().expect("run farmctl")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn register_over(url: &str, tls: ClientTls, token: &str) -> Result<(), tonic::Status> {
    let channel = endpoint(url, &tls).unwrap().connect().await.map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
    let mut client = WorkerServiceClient::with_interceptor(channel, BearerToken::new(token).unwrap());
    client
        .register_worker(pb::RegisterWorkerRequest {
            name: "probe".into(),
            hostname: "probe".into(),
            models: vec!["flowfarm-tiny".into()],
            text_encoder_sets: vec![pb::TextEncoderSet::ClipOnly as i32],
            capacity: 1,
            version: "test".into(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_worker_and_farmctl_speak_tls_and_refuse_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = TestDb::new().await;
    let redis = RedisServer::start();
    let (ca, other_ca) = (Ca::new("flowfarm test CA"), Ca::new("someone else's CA"));
    let (ca_pem, other_ca_pem) = (ca.write(d, "ca.pem"), other_ca.write(d, "other-ca.pem"));
    let (server_cert, server_key) = ca.issue(d, "server", &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let (worker_cert, worker_key) = ca.issue(d, "gpu-1", &["gpu-1"], ExtendedKeyUsagePurpose::ClientAuth);
    let (wrong_name_cert, wrong_name_key) = ca.issue(d, "gpu-2", &["gpu-2"], ExtendedKeyUsagePurpose::ClientAuth);
    let (foreign_cert, foreign_key) = other_ca.issue(d, "foreign", &["gpu-1"], ExtendedKeyUsagePurpose::ClientAuth);

    let config = write(d, "flowfarm.toml", &coordinator_config());
    let results = d.join("results");
    let path = |p: &PathBuf| p.display().to_string();
    let env = vec![
        ("FLOWFARM_SERVER__TLS__CERT_FILE".to_owned(), path(&server_cert)),
        ("FLOWFARM_SERVER__TLS__KEY_FILE".to_owned(), path(&server_key)),
        ("FLOWFARM_SERVER__TLS__CLIENT_CA_FILE".to_owned(), path(&ca_pem)),
        ("FLOWFARM_SERVER__TLS__REQUIRE_WORKER_CERTIFICATES".to_owned(), "true".to_owned()),
    ];
    let server = Server::start_env(&db, &config, &results, &redis.url(), "127.0.0.1:0", &env);
    let url = format!("https://localhost:{}", server.addr.port());
    let submitter = token(&db, "submit", "alice");
    let worker_token = token(&db, "worker", "gpu-1");

    // A worker over mutual TLS renders a batch that farmctl submitted and watched over TLS.
    let worker_config = write(
        d,
        "worker.toml",
        &format!(
            "name = \"gpu-1\"\ncapacity = 1\ntls_ca_file = {:?}\ntls_cert_file = {:?}\ntls_key_file = {:?}\n\
             [[models]]\nname = \"flowfarm-tiny\"\npath = {:?}\n",
            path(&ca_pem),
            path(&worker_cert),
            path(&worker_key),
            path(&repo_path("models/flowfarm-tiny")),
        ),
    );
    let mut worker = WorkerProcess::spawn(
        &worker_config,
        &[
            ("FLOWFARM_SERVER", url.clone()),
            ("FLOWFARM_TOKEN", worker_token.clone()),
            ("FLOWFARM_REDIS_URL", redis.url()),
            ("FLOWFARM_RESULTS_DIR", path(&results)),
        ],
        d.join("worker.log"),
    );
    // A reload signal does not stop a worker (once up: the handler is its first act).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !worker.log().contains("registered") {
        assert!(Instant::now() < deadline, "the worker did not register:\n{}", worker.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    signal(&worker.child, "HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert!(worker.child.try_wait().unwrap().is_none(), "SIGHUP stopped the worker:\n{}", worker.log());
    let line =
        |seed: u32| format!("{{\"model\":\"flowfarm-tiny\",\"prompt\":\"a lock\",\"seed\":{seed},\"steps\":2,\"width\":64,\"height\":64}}");
    let jobs = write(d, "jobs.jsonl", &format!("{}\n{}\n", line(1), line(2)));
    let submitted = farmctl_tls(&url, &submitter, Some(&ca_pem), &["submit", jobs.to_str().unwrap(), "--watch"]);
    assert!(submitted.status.success(), "farmctl over TLS: {}\nworker log:\n{}", stderr(&submitted), worker.log());
    let succeeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'succeeded'").fetch_one(db.store.pool()).await.unwrap();
    assert_eq!(succeeded, 2, "both jobs rendered by the TLS worker");
    // The status page over the same TLS, where a browser speaks HTTP/2 (no
    // Host header): signed in from a link, it shows the batch's two images.
    let status_page = server.status_page.clone().expect("the status page is served");
    assert!(status_page.starts_with("https://"), "{status_page}");
    let batch: String = sqlx::query_scalar("SELECT id::text FROM batches").fetch_one(db.store.pool()).await.unwrap();
    let link = format!("{status_page}/login#token={submitter}&next=/batches/{batch}");
    let dom = common::browser::chromium_dom_trusting(&link, &d.join("chromium"));
    assert_eq!(dom.matches("<img").count(), 2, "signed in over TLS, the sheet shows:\n{dom}");
    let batches = || async { sqlx::query_scalar::<_, i64>("SELECT count(*) FROM batches").fetch_one(db.store.pool()).await.unwrap() };

    // A plaintext client, and a client that trusts another CA, are refused; they store nothing.
    let plaintext = farmctl_tls(&format!("http://127.0.0.1:{}", server.addr.port()), &submitter, None, &["submit", jobs.to_str().unwrap()]);
    assert!(!plaintext.status.success(), "plaintext accepted");
    assert!(stderr(&plaintext).contains("cannot reach the coordinator"), "{}", stderr(&plaintext));
    let distrusting = farmctl_tls(&url, &submitter, Some(&other_ca_pem), &["submit", jobs.to_str().unwrap()]);
    assert!(!distrusting.status.success(), "a client trusting another CA connected");
    assert!(stderr(&distrusting).to_lowercase().contains("certificate"), "{}", stderr(&distrusting));
    assert_eq!(batches().await, 1);

    // Workers must present a certificate from the client CA naming their token.
    let ca_only = ClientTls { ca_file: Some(ca_pem.clone()), ..Default::default() };
    let refused = register_over(&url, ca_only.clone(), &worker_token).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("client certificate"), "{}", refused.message());
    let other_name = ClientTls { cert_file: Some(wrong_name_cert), key_file: Some(wrong_name_key), ..ca_only.clone() };
    let refused = register_over(&url, other_name, &worker_token).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("not issued to `gpu-1`"), "{}", refused.message());
    let foreign = ClientTls { cert_file: Some(foreign_cert), key_file: Some(foreign_key), ..ca_only.clone() };
    let refused = register_over(&url, foreign, &worker_token).await.unwrap_err();
    assert_ne!(refused.code(), Code::Ok, "a certificate of another CA fails the handshake");
    let right = ClientTls { cert_file: Some(worker_cert.clone()), key_file: Some(worker_key.clone()), ..ca_only.clone() };
    register_over(&url, right, &worker_token).await.expect("the worker's own certificate");

    // SIGHUP: a renewed certificate from a new CA serves new connections, without a restart.
    let renewed = Ca::new("renewed CA");
    let renewed_pem = renewed.write(d, "renewed-ca.pem");
    renewed.issue(d, "server", &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    server.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = farmctl_tls(&url, &submitter, Some(&renewed_pem), &["jobs", "list"]);
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "the renewed certificate was not served: {}", stderr(&out));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let old = farmctl_tls(&url, &submitter, Some(&ca_pem), &["jobs", "list"]);
    assert!(!old.status.success(), "new connections still get the old certificate");
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_redis_connections_use_tls_when_their_urls_ask() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, other_ca) = (Ca::new("database CA"), Ca::new("someone else's CA"));
    let (ca_pem, other_ca_pem) = (ca.write(d, "ca.pem"), other_ca.write(d, "other-ca.pem"));
    let (cert, key) = ca.issue(d, "db", &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);

    // Postgres that accepts TLS connections only.
    let pg = PgServer::start_with(|data| {
        std::fs::copy(&cert, data.join("server.crt")).unwrap();
        std::fs::copy(&key, data.join("server.key")).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(data.join("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf, text).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 0.0.0.0/0 reject\n",
        )
        .unwrap();
    });
    let migrate = |url: String| {
        Command::new(flowfarm_bin())
            .args(["--config", config_path().to_str().unwrap(), "migrate"])
            .env("FLOWFARM_DATABASE_URL", url)
            .env("RUST_LOG", "error")
            .output()
            .unwrap()
    };
    let base = format!("postgres://postgres@localhost:{}/flowfarm", pg.port);
    let verified = migrate(format!("{base}?sslmode=verify-full&sslrootcert={}", ca_pem.display()));
    assert!(verified.status.success(), "migrate over verified TLS: {}", stderr(&verified));
    let plaintext = migrate(format!("{base}?sslmode=disable"));
    assert!(!plaintext.status.success(), "Postgres accepted plaintext");
    let distrusting = migrate(format!("{base}?sslmode=verify-full&sslrootcert={}", other_ca_pem.display()));
    assert!(!distrusting.status.success(), "a server certificate of an untrusted CA was accepted");

    // Redis that speaks TLS only.
    let port = free_port();
    let mut redis = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--tls-cert-file", cert.to_str().unwrap(), "--tls-key-file", key.to_str().unwrap()])
        .args(["--tls-ca-cert-file", ca_pem.to_str().unwrap(), "--tls-auth-clients", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server");
    let url = format!("rediss://localhost:{port}/0");
    let deadline = Instant::now() + Duration::from_secs(10);
    let target = flowfarm_queue::RedisTarget { url: url.clone(), ca_file: Some(ca_pem.clone()) };
    let queue = loop {
        match flowfarm_queue::WorkQueue::connect(target.clone()).await {
            Ok(queue) => break queue,
            Err(e) => {
                assert!(Instant::now() < deadline, "rediss:// with the CA: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    flowfarm_queue::Pinger::new(target.clone()).unwrap().ping().await.expect("PING over TLS");
    drop(queue);
    let distrusting = flowfarm_queue::RedisTarget { url: url.clone(), ca_file: Some(other_ca_pem.clone()) };
    assert!(flowfarm_queue::WorkQueue::connect(distrusting).await.is_err(), "Redis with an untrusted certificate accepted");
    let plaintext = flowfarm_queue::RedisTarget { url: format!("redis://localhost:{port}/0"), ca_file: None };
    assert!(flowfarm_queue::Pinger::new(plaintext).unwrap().ping().await.is_err(), "Redis answered plaintext");
    let _ = redis.kill();
    let _ = redis.wait();
}
