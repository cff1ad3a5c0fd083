//! Group commit for async calls: whatever arrived while the previous group
//! ran goes out together in one batched operation. Under light load a group
//! is a single call and waits for nothing; under load one operation serves
//! many callers. The coordinator groups StartJob and CompleteJob statements
//! this way; workers group their CompleteJobs reports.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot};

type Queue<Req, Out> = mpsc::UnboundedSender<(Req, oneshot::Sender<Out>)>;
type Run<Req, Out> = Arc<dyn Fn(Vec<Req>) -> std::pin::Pin<Box<dyn Future<Output = Vec<Out>> + Send>> + Send + Sync>;

/// A grouper of calls `Req → Out`; `run` answers a group, one output per
/// request, in order.
pub struct Grouper<Req, Out> {
    max: usize,
    /// Groups that may run at once: a new group forms while earlier ones run.
    in_flight: usize,
    run: Run<Req, Out>,
    // Started on first use, inside the runtime.
    queue: OnceLock<Queue<Req, Out>>,
}

impl<Req: Send + 'static, Out: Send + 'static> Grouper<Req, Out> {
    /// A grouper whose groups hold at most `max` calls, answered by `run`,
    /// one group at a time.
    pub fn new<F, Fut>(max: usize, run: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Out>> + Send + 'static,
    {
        Grouper { max, in_flight: 1, run: Arc::new(move |group| Box::pin(run(group))), queue: OnceLock::new() }
    }

    /// Lets up to `groups` groups run at once (at least 1): under load the
    /// next group forms and starts while earlier ones wait on I/O (a commit's
    /// WAL flush, say), instead of queueing behind them.
    pub fn in_flight(mut self, groups: usize) -> Self {
        self.in_flight = groups.max(1);
        self
    }

    fn queue(&self) -> &Queue<Req, Out> {
        self.queue.get_or_init(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<(Req, oneshot::Sender<Out>)>();
            let (run, max) = (self.run.clone(), self.max);
            let slots = Arc::new(tokio::sync::Semaphore::new(self.in_flight));
            tokio::spawn(async move {
                while let Some(first) = rx.recv().await {
                    // Calls that arrive while every slot is busy join this group.
                    let Ok(slot) = slots.clone().acquire_owned().await else { return };
                    let mut group = vec![first];
                    while group.len() < max {
                        match rx.try_recv() {
                            Ok(call) => group.push(call),
                            Err(_) => break,
                        }
                    }
                    let run = run.clone();
                    tokio::spawn(async move {
                        let (requests, replies): (Vec<Req>, Vec<oneshot::Sender<Out>>) = group.into_iter().unzip();
                        for (reply, out) in replies.into_iter().zip(run(requests).await) {
                            // The caller may have gone (deadline, disconnect): nothing to do.
                            let _ = reply.send(out);
                        }
                        drop(slot);
                    });
                }
            });
            tx
        })
    }

    /// Answers `request` as part of the next group. None if the grouper's
    /// task is gone (the runtime is shutting down).
    pub async fn call(&self, request: Req) -> Option<Out> {
        let (tx, rx) = oneshot::channel();
        self.queue().send((request, tx)).ok()?;
        rx.await.ok()
    }
}

impl<Req, Out> std::fmt::Debug for Grouper<Req, Out> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grouper").field("max", &self.max).field("in_flight", &self.in_flight).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_groups_and_get_their_own_answers() {
        let groups = Arc::new(AtomicUsize::new(0));
        let counted = groups.clone();
        let grouper = Arc::new(Grouper::new(8, move |requests: Vec<u32>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                requests.into_iter().map(|r| r * 10).collect::<Vec<u32>>()
            }
        }));
        let calls: Vec<_> = (0..32u32)
            .map(|i| {
                let grouper = grouper.clone();
                tokio::spawn(async move { (i, grouper.call(i).await) })
            })
            .collect();
        for call in calls {
            let (i, answer) = call.await.unwrap();
            assert_eq!(answer, Some(i * 10));
        }
        let groups = groups.load(Ordering::SeqCst);
        // 32 calls in groups of at most 8, and fewer groups than calls.
        assert!((4..32).contains(&groups), "{groups} groups");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn groups_run_side_by_side_up_to_the_in_flight_limit() {
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (r, m) = (running.clone(), most.clone());
        let grouper = Arc::new(
            Grouper::new(1, move |requests: Vec<u32>| {
                let (r, m) = (r.clone(), m.clone());
                async move {
                    let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    r.fetch_sub(1, Ordering::SeqCst);
                    requests
                }
            })
            .in_flight(3),
        );
        let calls: Vec<_> = (0..9u32)
            .map(|i| {
                let grouper = grouper.clone();
                tokio::spawn(async move { grouper.call(i).await })
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap(), Some(i as u32));
        }
        assert_eq!(most.load(Ordering::SeqCst), 3, "three groups of one at a time");
    }
}
