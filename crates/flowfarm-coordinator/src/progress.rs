//! Relays step progress from the store's notifications (sent by whichever
//! coordinator took the worker's report) to this coordinator's watchers.

use std::time::Duration;

use flowfarm_proto::v1 as pb;

use crate::{Coordinator, Progress};

/// Listens until `shutdown` resolves, re-opening the listening connection
/// with backoff while the database is away.
pub(crate) async fn relay_progress(coordinator: Coordinator, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    let store = coordinator.shared.store.clone();
    let mut pause = Duration::from_millis(200);
    loop {
        let mut listener = tokio::select! {
            _ = &mut shutdown => return,
            opened = store.listen_progress() => match opened {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for step progress; retrying");
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        pause = Duration::from_millis(200);
        loop {
            let note = tokio::select! {
                _ = &mut shutdown => return,
                note = listener.recv() => note,
            };
            match note {
                Ok(note) => {
                    // Nobody watching is fine: send only fails without receivers.
                    let _ = coordinator.shared.progress.send(Progress {
                        batch_id: note.batch_id,
                        event: pb::JobProgress {
                            job_id: note.job_id.to_string(),
                            attempt: note.attempt,
                            step: note.step,
                            total_steps: note.total_steps,
                        },
                    });
                }
                Err(flowfarm_store::StoreError::Corrupt(why)) => tracing::warn!(%why, "ignoring a progress note"),
                Err(e) => {
                    tracing::warn!(error = %e, "lost the progress listener; reconnecting");
                    break;
                }
            }
        }
    }
}
