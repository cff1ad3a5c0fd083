//! An in-process coordinator on an ephemeral port over a throwaway database,
//! with one token per role.

use std::net::SocketAddr;

use crate::TestDb;
use flowfarm_coordinator::{Config, Coordinator};
use flowfarm_core::{ModelConfig, Role, ShiftPolicy, TextEncoderSet, Variant};
use flowfarm_proto::v1::admin_service_client::AdminServiceClient;
use flowfarm_proto::v1::render_service_client::RenderServiceClient;
use flowfarm_proto::v1::worker_service_client::WorkerServiceClient;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A coordinator config with two models: `sd3` (fixed shift 3.0, up to
/// 2048 px) and `tiny` (resolution shift, CLIP-only, up to 512 px), and no
/// retry backoff (tests move retried jobs on at once).
pub fn test_config() -> Config {
    let mut config: Config = toml::from_str("").expect("empty config parses to defaults");
    config.retries.backoff_base_seconds = 0.0;
    config.retries.backoff_max_seconds = 0.0;
    config.models = vec![
        ModelConfig {
            name: "sd3".into(),
            variant: Variant::Sd3Medium,
            default_steps: 28,
            default_guidance: 7.0,
            default_width: 1024,
            default_height: 1024,
            max_side_px: 2048,
            shift: ShiftPolicy::Fixed { alpha: 3.0 },
            text_encoder_sets: vec![TextEncoderSet::All, TextEncoderSet::ClipOnly],
        },
        ModelConfig {
            name: "tiny".into(),
            variant: Variant::Sd35Medium,
            default_steps: 8,
            default_guidance: 4.0,
            default_width: 256,
            default_height: 256,
            max_side_px: 512,
            shift: ShiftPolicy::Resolution { alpha_ref: 3.0, ref_width: 256, ref_height: 256 },
            text_encoder_sets: vec![TextEncoderSet::ClipOnly],
        },
    ];
    config
}

/// The interceptor every client of the tests uses (the one the worker and
/// farmctl use).
pub use flowfarm_proto::client::BearerToken as Auth;

/// A client interceptor for `token`, or none.
fn auth(token: Option<&str>) -> Auth {
    token.map(|t| Auth::new(t).expect("an ASCII token")).unwrap_or_else(Auth::none)
}

pub type Render = RenderServiceClient<InterceptedService<Channel, Auth>>;
pub type Admin = AdminServiceClient<InterceptedService<Channel, Auth>>;
pub type Worker = WorkerServiceClient<InterceptedService<Channel, Auth>>;

/// A running coordinator and its database; `stop` shuts it down.
pub struct Harness {
    pub db: TestDb,
    pub addr: SocketAddr,
    pub channel: Channel,
    pub submit_token: String,
    pub admin_token: String,
    pub worker_token: String,
    pub results_dir: tempfile::TempDir,
    shutdown: CancellationToken,
    /// The server and the dispatcher.
    tasks: TaskTracker,
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Harness {
        Harness::start_inner(tweak, None).await
    }

    /// As [`Harness::start_with`], and runs a dispatcher into the Redis at
    /// `redis_url` (for benches and tests of dispatch).
    pub async fn start_dispatching(redis_url: &str, tweak: impl FnOnce(&mut Config)) -> Harness {
        let queue = flowfarm_queue::WorkQueue::connect(redis_url).await.expect("connect to Redis");
        Harness::start_inner(tweak, Some(std::sync::Arc::new(queue))).await
    }

    /// As [`Harness::start_with`], and runs a dispatcher into `queue`.
    pub async fn start_dispatching_into(queue: std::sync::Arc<dyn flowfarm_queue::JobQueue>, tweak: impl FnOnce(&mut Config)) -> Harness {
        Harness::start_inner(tweak, Some(queue)).await
    }

    async fn start_inner(tweak: impl FnOnce(&mut Config), queue: Option<std::sync::Arc<dyn flowfarm_queue::JobQueue>>) -> Harness {
        let db = TestDb::new().await;
        let results_dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config();
        config.results.dir = results_dir.path().to_owned();
        tweak(&mut config);
        let token = |role: Role, name: &'static str| {
            let store = db.store.clone();
            async move { store.create_token(&flowfarm_store::NewToken::new(name, role), rand::random()).await.expect("token").1 }
        };
        let submit_token = token(Role::Submit, "sub").await;
        let admin_token = token(Role::Admin, "adm").await;
        let worker_token = token(Role::Worker, "wrk").await;
        let coordinator = Coordinator::new(&config, db.store.clone()).expect("coordinator");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (shutdown, tasks) = (CancellationToken::new(), TaskTracker::new());
        if let Some(queue) = queue {
            tasks.spawn(flowfarm_coordinator::Dispatcher::new(coordinator.clone(), queue).run(shutdown.clone()));
        }
        let serving = shutdown.clone();
        tasks.spawn(async move { flowfarm_coordinator::serve(coordinator, listener, serving).await.expect("serve") });
        tasks.close();
        let channel = Channel::from_shared(format!("http://{addr}")).expect("uri").connect_lazy();
        Harness { db, addr, channel, submit_token, admin_token, worker_token, results_dir, shutdown, tasks }
    }

    pub fn render_as(&self, token: Option<&str>) -> Render {
        RenderServiceClient::with_interceptor(self.channel.clone(), auth(token))
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }
    pub fn admin_as(&self, token: Option<&str>) -> Admin {
        AdminServiceClient::with_interceptor(self.channel.clone(), auth(token))
    }
    pub fn worker_as(&self, token: Option<&str>) -> Worker {
        WorkerServiceClient::with_interceptor(self.channel.clone(), auth(token))
    }
    pub fn render(&self) -> Render {
        self.render_as(Some(&self.submit_token))
    }
    pub fn admin(&self) -> Admin {
        self.admin_as(Some(&self.admin_token))
    }
    pub fn worker(&self) -> Worker {
        self.worker_as(Some(&self.worker_token))
    }

    pub async fn rows(&self) -> (i64, i64, i64) {
        let q = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql).fetch_one(self.db.store.pool());
        (
            q("SELECT count(*) FROM batches").await.expect("count"),
            q("SELECT count(*) FROM jobs").await.expect("count"),
            q("SELECT count(*) FROM job_events").await.expect("count"),
        )
    }

    /// Shuts the coordinator down as a signal would, and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.wait().await;
    }
}

impl Drop for Harness {
    /// A harness dropped without [`Harness::stop`] still stops its coordinator.
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
