//! Assembling the gRPC server: the three services, health and reflection.

use std::future::Future;

use flowfarm_proto::v1::admin_service_server::AdminServiceServer;
use flowfarm_proto::v1::render_service_server::RenderServiceServer;
use flowfarm_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

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
/// runs the lease reaper, until
/// `shutdown` resolves; then stops accepting calls and lets running ones end
/// for at most `server.shutdown_grace_seconds` (watch streams and idle
/// clients would otherwise hold it open forever).
///
/// # Errors
/// [`ServeError`] if the server cannot be built or the transport fails.
pub async fn serve(
    coordinator: Coordinator,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
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

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = || {
        let mut stop = stop_rx.clone();
        async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        }
    };
    let reaper = tokio::spawn(run_reaper(coordinator.clone(), stopped()));
    let progress = tokio::spawn(crate::progress::relay_progress(coordinator.clone(), stopped()));
    let dependencies = tokio::spawn(crate::health::watch_dependencies(coordinator.clone(), health.clone(), stopped()));
    let sweep_every = coordinator.shared.results_sweep_interval;
    let sweeper = (!sweep_every.is_zero()).then(|| tokio::spawn(crate::sweeper::run_sweeper(coordinator.clone(), sweep_every, stopped())));

    let render = RenderServiceServer::new(coordinator.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let admin = AdminServiceServer::new(coordinator.clone());
    let grace = coordinator.shared.shutdown_grace;
    let tls = coordinator.shared.tls.clone();
    let sighup = tokio::spawn(crate::tls::reload_on_sighup(tls.clone(), stopped()));
    let worker = WorkerServiceServer::new(coordinator);
    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .trace_fn(crate::spans::rpc_span)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(render)
        .add_service(admin)
        .add_service(worker);
    let draining = async move {
        shutdown.await;
        let _ = draining_tx.send(());
    };
    let server: std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> = match tls {
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(tls.incoming(listener), draining)),
        None => Box::pin(router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), draining)),
    };
    let deadline = async move {
        if draining_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        result = server => result,
        _ = deadline => {
            tracing::warn!(grace_seconds = grace.as_secs_f64(), "shutdown grace period over; closing the remaining connections");
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    let _ = reaper.await;
    let _ = progress.await;
    let _ = dependencies.await;
    for task in sweeper.into_iter().chain([sighup]) {
        let _ = task.await;
    }
    result?;
    Ok(())
}
