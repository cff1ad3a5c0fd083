//! Health that tells the truth: the coordinator answers gRPC health checks
//! with SERVING only while the Postgres it keeps every job in and the Redis
//! it dispatches through both answer. Load balancers and Kubernetes probes
//! then take a coordinator that cannot work out of rotation, and put it back
//! when its dependencies return. The same verdict is served over plain HTTP
//! at `/readyz` beside `/metrics`, for probes that cannot speak gRPC over TLS.

use std::time::Duration;

use flowfarm_proto::v1::admin_service_server::AdminServiceServer;
use flowfarm_proto::v1::render_service_server::RenderServiceServer;
use flowfarm_proto::v1::worker_service_server::WorkerServiceServer;
use flowfarm_queue::Pinger;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::Coordinator;

/// How often the dependencies are asked.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long an answer may take before it counts as none.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// What is wrong, or None when both answer. Without a pinger the queue is
/// in this process (`flowfarm dev`) and only the store is asked.
async fn unhealthy(coordinator: &Coordinator, redis: Option<&mut Pinger>) -> Option<String> {
    let redis_answer = async {
        match redis {
            Some(redis) => tokio::time::timeout(ANSWER_WITHIN, redis.ping()).await,
            None => Ok(Ok(())),
        }
    };
    let (db, redis) = tokio::join!(tokio::time::timeout(ANSWER_WITHIN, coordinator.shared.store.ping()), redis_answer);
    let db = match db {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("Postgres: {e}")),
        Err(_) => Some("Postgres: no answer".to_owned()),
    };
    let redis = match redis {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("Redis: {e}")),
        Err(_) => Some("Redis: no answer".to_owned()),
    };
    match (db, redis) {
        (None, None) => None,
        (a, b) => Some([a, b].into_iter().flatten().collect::<Vec<_>>().join("; ")),
    }
}

async fn report(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    match status {
        ServingStatus::Serving => {
            reporter.set_serving::<RenderServiceServer<Coordinator>>().await;
            reporter.set_serving::<AdminServiceServer<Coordinator>>().await;
            reporter.set_serving::<WorkerServiceServer<Coordinator>>().await;
        }
        _ => {
            reporter.set_not_serving::<RenderServiceServer<Coordinator>>().await;
            reporter.set_not_serving::<AdminServiceServer<Coordinator>>().await;
            reporter.set_not_serving::<WorkerServiceServer<Coordinator>>().await;
        }
    }
}

/// Checks Postgres and Redis every second until `shutdown` resolves and
/// reports the coordinator (overall and per service) SERVING or NOT_SERVING
/// accordingly, logging each change.
pub(crate) async fn watch_dependencies(
    coordinator: Coordinator,
    reporter: HealthReporter,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut redis = match Pinger::new(coordinator.shared.queue.redis_target()) {
        _ if coordinator.shared.queue.in_process => None,
        Ok(pinger) => Some(pinger),
        Err(e) => {
            // The dispatcher's connection fails on the same URL, loudly too.
            tracing::error!(error = %e, "not serving: queue.redis_url cannot be used");
            coordinator.set_not_ready(Some(format!("Redis: {e}")));
            report(&reporter, ServingStatus::NotServing).await;
            return;
        }
    };
    let mut serving = true;
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => {
                let problem = unhealthy(&coordinator, redis.as_mut()).await;
                coordinator.set_not_ready(problem.clone());
                match (&problem, serving) {
                    (Some(problem), true) => {
                        tracing::error!(%problem, "not serving: a dependency does not answer");
                        report(&reporter, ServingStatus::NotServing).await;
                        serving = false;
                    }
                    (None, false) => {
                        tracing::info!("serving again: Postgres and Redis answer");
                        report(&reporter, ServingStatus::Serving).await;
                        serving = true;
                    }
                    _ => {}
                }
            }
        }
    }
}
