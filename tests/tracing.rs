//! Spans: one per RPC on the coordinator and one per job attempt on the
//! worker, with their ids as fields, exported over OTLP/gRPC to a collector
//! the test runs (the collector protocol's own server), and the same ids in
//! the logs.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use flowfarm_testkit::TestDb;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// A span as received: its service, name, string-valued attributes and
/// place in its trace.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    attributes: std::collections::BTreeMap<String, String>,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v.as_ref().and_then(|v| v.value.as_ref()) {
            Some(Value::StringValue(s)) => s.clone(),
            Some(Value::IntValue(i)) => i.to_string(),
            Some(other) => format!("{other:?}"),
            None => String::new(),
        };
        let mut received = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(&kv.value))
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                let attributes = span.attributes.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect();
                received.push(Received {
                    service: service.clone(),
                    name: span.name,
                    attributes,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpcs_and_job_attempts_are_spans_exported_over_otlp_with_their_ids() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let serving = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let redis = RedisServer::start();
    let config = write(dir.path(), "flowfarm.toml", &coordinator_config());
    let results = dir.path().join("results");
    let env = vec![("FLOWFARM_TRACING__OTLP_ENDPOINT".to_owned(), endpoint.clone())];
    let server = Server::start_env(&db, &config, &results, &redis.url(), "127.0.0.1:0", &env);
    let (submitter, worker_token) = (token(&db, "submit", "alice"), token(&db, "worker", "fleet"));
    let worker_config = write(
        dir.path(),
        "worker.toml",
        &format!(
            "name = \"traced\"\ncapacity = 1\n[tracing]\nservice_name = \"render-node\"\n[[models]]\nname = \"flowfarm-tiny\"\npath = {:?}\n",
            repo_path("models/flowfarm-tiny").display().to_string()
        ),
    );
    let mut worker = WorkerProcess::spawn(
        &worker_config,
        &[
            ("FLOWFARM_SERVER", server.url()),
            ("FLOWFARM_TOKEN", worker_token),
            ("FLOWFARM_REDIS_URL", redis.url()),
            ("FLOWFARM_RESULTS_DIR", results.display().to_string()),
            ("FLOWFARM_WORKER__TRACING__OTLP_ENDPOINT", endpoint.clone()),
        ],
        dir.path().join("worker.log"),
    );
    let job = "{\"model\":\"flowfarm-tiny\",\"prompt\":\"a kite\",\"seed\":5,\"steps\":2,\"width\":64,\"height\":64}\n";
    let jobs = write(dir.path(), "jobs.jsonl", job);
    let submitted = ok_json(farmctl(&server.url(), &submitter, &["--json", "submit", jobs.to_str().unwrap()]));
    let batch = submitted["batch"]["id"].as_str().unwrap().to_owned();
    let watched = farmctl(&server.url(), &submitter, &["watch", &batch]);
    assert!(watched.status.success(), "{}\n{}", String::from_utf8_lossy(&watched.stderr), worker.log());
    let job_id: String = sqlx::query_scalar("SELECT id::text FROM jobs").fetch_one(db.store.pool()).await.unwrap();

    // Stopped gracefully, both flush what they still hold.
    signal(&worker.child, "TERM");
    assert!(worker.child.wait().unwrap().success(), "{}", worker.log());
    server.stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let spans = collector.0.lock().unwrap().clone();

    let submit = spans
        .iter()
        .find(|s| s.name == "rpc" && s.attributes.get("method").map(String::as_str) == Some("/flowfarm.v1.RenderService/SubmitBatch"))
        .unwrap_or_else(|| panic!("no SubmitBatch span in {spans:#?}"));
    assert_eq!(submit.service, "flowfarm-coordinator");
    assert_eq!(submit.attributes.get("caller").map(String::as_str), Some("submitter:alice"));
    assert_eq!(submit.attributes.get("batch"), Some(&batch));
    let start = spans
        .iter()
        .find(|s| s.name == "rpc" && s.attributes.get("method").is_some_and(|m| m.ends_with("/StartJobs") || m.ends_with("/StartJob")))
        .unwrap_or_else(|| panic!("no StartJob span in {spans:#?}"));
    assert!(start.attributes.contains_key("worker"), "{start:?}");

    let attempt = spans.iter().find(|s| s.name == "job_attempt").unwrap_or_else(|| panic!("no job_attempt span in {spans:#?}"));
    assert_eq!(attempt.service, "render-node", "the worker's [tracing] service_name");
    assert_eq!(attempt.attributes.get("job"), Some(&job_id));
    assert_eq!(attempt.attributes.get("batch"), Some(&batch));
    assert_eq!(attempt.attributes.get("attempt").map(String::as_str), Some("1"));
    assert!(attempt.attributes.contains_key("worker"), "{attempt:?}");

    // The attempt's calls continue its trace on the coordinator: each
    // ReportProgress of the job is a child of the job_attempt span.
    let reports: Vec<&Received> =
        spans.iter().filter(|s| s.name == "rpc" && s.attributes.get("method").is_some_and(|m| m.ends_with("/ReportProgress"))).collect();
    assert!(!reports.is_empty(), "no ReportProgress span in {spans:#?}");
    for report in reports {
        assert_eq!(report.service, "flowfarm-coordinator");
        assert_eq!((&report.trace_id, &report.parent_span_id), (&attempt.trace_id, &attempt.span_id), "{report:?}\n{attempt:?}");
    }
    assert_ne!(submit.trace_id, attempt.trace_id, "a call made outside any trace starts its own");

    // The worker's log lines of the attempt carry the same ids.
    let log = worker.log();
    let line = log.lines().find(|l| l.contains("job_attempt{") && l.contains("started")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains(&format!("job={job_id}")) && line.contains(&format!("batch={batch}")) && line.contains("attempt=1"), "{line}");
    serving.abort();
}
