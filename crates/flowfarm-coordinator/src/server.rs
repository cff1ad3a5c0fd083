//! Assembling the gRPC server: the three services, health and reflection.

use std::future::Future;

use flowfarm_proto::v1::admin_service_server::AdminServiceServer;
use flowfarm_proto::v1::render_service_server::RenderServiceServer;
use flowfarm_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::{run_reaper, Coordinator};

/// Largest request accepted: a batch of 100,000 explicit jobs fits.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("building reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves RenderService, AdminService, WorkerService, grpc.health.v1 (SERVING
/// only while Postgres and Redis answer) and server reflection on
/// `listener` (over TLS when `server.tls` is set, reloaded on SIGHUP), and
/// runs the lease reaper, until `shutdown` is cancelled; then stops
/// accepting calls and lets running ones end for at most
/// `server.shutdown_grace_seconds` (watch streams and idle clients would
/// otherwise hold it open forever). Returns once every task it and its
/// services spawned has ended (or the grace ran out again).
///
/// # Errors
/// [`ServeError`] if the server cannot be built or the transport fails.
pub async fn serve(coordinator: Coordinator, listener: TcpListener, shutdown: CancellationToken) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // For liveness probes: SERVING while the process answers, whatever its
    // dependencies (restarting would not bring Postgres back).
    health.set_service_status("liveness", tonic_health::ServingStatus::Serving).await;
    health.set_serving::<RenderServiceServer<Coordinator>>().await;
    health.set_serving::<AdminServiceServer<Coordinator>>().await;
    health.set_serving::<WorkerServiceServer<Coordinator>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(flowfarm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    // The background loops outlive the signal: calls in their grace period
    // still need the reaper, the progress relay and health. They stop once
    // the server has.
    let background = CancellationToken::new();
    let tasks = coordinator.shared.tasks.clone();
    tasks.reopen();
    tasks.spawn(run_reaper(coordinator.clone(), background.clone().cancelled_owned()));
    tasks.spawn(crate::progress::relay_progress(coordinator.clone(), background.clone().cancelled_owned()));
    tasks.spawn(crate::health::watch_dependencies(coordinator.clone(), health.clone(), background.clone().cancelled_owned()));
    let sweep_every = coordinator.shared.results_sweep_interval;
    if !sweep_every.is_zero() {
        tasks.spawn(crate::sweeper::run_sweeper(coordinator.clone(), sweep_every, background.clone().cancelled_owned()));
    }

    let render = RenderServiceServer::new(coordinator.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let admin = AdminServiceServer::new(coordinator.clone());
    let grace = coordinator.shared.shutdown_grace;
    let tls = coordinator.shared.tls.clone();
    tasks.spawn(crate::tls::reload_on_sighup(tls.clone(), background.clone().cancelled_owned()));
    let worker = WorkerServiceServer::new(coordinator);
    let router = tonic::transport::Server::builder()
        .trace_fn(crate::spans::rpc_span)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(render)
        .add_service(admin)
        .add_service(worker);
    let draining = shutdown.clone().cancelled_owned();
    let server: std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> = match tls {
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(tls.incoming(listener, &tasks), draining)),
        None => Box::pin(router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), draining)),
    };
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    let result = tokio::select! {
        result = server => result,
        () = deadline => {
            tracing::warn!(grace_seconds = grace.as_secs_f64(), "shutdown grace period over; closing the remaining connections");
            Ok(())
        }
    };
    background.cancel();
    tasks.close();
    // Streams cut at the deadline end at their next send; nothing waits
    // longer than another grace period.
    if tokio::time::timeout(grace.max(std::time::Duration::from_secs(1)), tasks.wait()).await.is_err() {
        tracing::warn!(left = tasks.len(), "tasks still running after the grace period; leaving them");
    }
    result?;
    Ok(())
}
