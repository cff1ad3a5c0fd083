//! One suite, every queue: each test below runs against the Redis Streams
//! queue (the server at FLOWFARM_TEST_REDIS_URL, default
//! redis://127.0.0.1:6379/0) and against the in-process one, so both keep
//! the contract the dispatcher and the workers rely on. Each test uses lanes
//! of its own, so tests do not see each other's streams. What only Redis can
//! do (lose its data, hold a message someone else wrote) is tested below the
//! suite.

use std::sync::Arc;
use std::time::Duration;

use flowfarm_queue::{stream_key, Consumer, JobMessage, JobQueue, JobSource, MemoryQueue, WorkQueue};
use redis::AsyncCommands;
use uuid::Uuid;

fn url() -> String {
    std::env::var("FLOWFARM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

fn new_lane() -> String {
    format!("test-{}", Uuid::new_v4())
}

fn jobs(n: u32) -> Vec<JobMessage> {
    (0..n).map(|i| JobMessage { job_id: Uuid::now_v7(), attempt: i % 3 + 1 }).collect()
}

/// A queue and a way to make its readers.
enum Queue {
    Redis(WorkQueue),
    Memory(MemoryQueue),
}

impl Queue {
    async fn redis() -> Queue {
        Queue::Redis(WorkQueue::connect(&url()).await.expect("Redis at FLOWFARM_TEST_REDIS_URL"))
    }

    fn memory() -> Queue {
        Queue::Memory(MemoryQueue::new())
    }

    fn queue(&self) -> &dyn JobQueue {
        match self {
            Queue::Redis(q) => q,
            Queue::Memory(q) => q,
        }
    }

    async fn reader(&self, name: &str, lanes: &[String]) -> Arc<dyn JobSource> {
        match self {
            Queue::Redis(_) => Arc::new(Consumer::connect(&url(), name, lanes).await.unwrap()),
            Queue::Memory(q) => Arc::new(q.consumer(lanes)),
        }
    }

    /// Deletes the streams a test made (Redis only: memory goes with the queue).
    async fn forget(&self, lanes: &[&String]) {
        if let Queue::Redis(_) = self {
            let client = redis::Client::open(url()).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            for lane in lanes {
                let _: () = conn.del(stream_key(lane)).await.unwrap();
            }
        }
    }
}

async fn each_message_goes_to_one_reader_in_order(q: Queue) {
    let lane = new_lane();
    let jobs = jobs(10);
    q.queue().publish(&lane, &jobs).await.unwrap();
    assert_eq!(q.queue().depth(&lane).await.unwrap(), 10);

    let lanes = vec![lane.clone()];
    let (a, b) = (q.reader("a", &lanes).await, q.reader("b", &lanes).await);
    let first = a.read(4, Duration::from_millis(100)).await.unwrap();
    let rest = b.read(100, Duration::from_millis(100)).await.unwrap();
    assert_eq!((first.len(), rest.len()), (4, 6));
    let got: Vec<JobMessage> = first.iter().chain(&rest).map(|d| d.job.clone().unwrap()).collect();
    assert_eq!(got, jobs, "every message once, in order");
    assert!(first.iter().chain(&rest).all(|d| d.lane == lane), "each says its lane");
    assert!(a.read(10, Duration::from_millis(50)).await.unwrap().is_empty(), "nothing is delivered twice");
    assert_eq!(q.queue().depth(&lane).await.unwrap(), 10, "read but not acknowledged: still counted");

    a.ack_many(&first).await.unwrap();
    for d in &rest {
        b.ack(d).await.unwrap();
    }
    assert_eq!(q.queue().depth(&lane).await.unwrap(), 0, "acknowledged messages are deleted");
    q.forget(&[&lane]).await;
}

async fn a_reader_reads_only_its_lanes(q: Queue) {
    let (t5, clip) = (new_lane(), new_lane());
    q.queue().publish(&t5, &jobs(2)).await.unwrap();
    q.queue().publish(&clip, &jobs(3)).await.unwrap();
    let clip_only = q.reader("clip", std::slice::from_ref(&clip)).await;
    let got = clip_only.read(10, Duration::from_millis(100)).await.unwrap();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|d| d.lane == clip));
    assert!(clip_only.read(10, Duration::from_millis(50)).await.unwrap().is_empty(), "the other lane's messages wait");
    let both = q.reader("both", &[t5.clone(), clip.clone()]).await;
    assert_eq!(both.read(10, Duration::from_millis(100)).await.unwrap().len(), 2);
    q.forget(&[&t5, &clip]).await;
}

/// A read takes up to `count` from each lane, so a busy lane never starves
/// the others (Redis: XREADGROUP COUNT is per stream).
async fn a_busy_lane_does_not_starve_the_others(q: Queue) {
    let (busy, quiet) = (new_lane(), new_lane());
    q.queue().publish(&busy, &jobs(5)).await.unwrap();
    q.queue().publish(&quiet, &jobs(5)).await.unwrap();
    let reader = q.reader("w", &[busy.clone(), quiet.clone()]).await;
    let got = reader.read(2, Duration::from_millis(100)).await.unwrap();
    let from = |lane: &String| got.iter().filter(|d| &d.lane == lane).count();
    assert_eq!((from(&busy), from(&quiet)), (2, 2), "{got:?}");
    q.forget(&[&busy, &quiet]).await;
}

async fn a_blocked_read_wakes_when_work_arrives(q: Queue) {
    let lane = new_lane();
    let reader = q.reader("w", std::slice::from_ref(&lane)).await;
    let waiting = tokio::spawn({
        let reader = reader.clone();
        async move { reader.read(1, Duration::from_secs(10)).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let job = jobs(1);
    let published = std::time::Instant::now();
    q.queue().publish(&lane, &job).await.unwrap();
    let got = waiting.await.unwrap();
    assert_eq!(got.iter().map(|d| d.job.clone().unwrap()).collect::<Vec<_>>(), job);
    assert!(published.elapsed() < Duration::from_secs(5), "woken by the publish, not by the end of the block");
    assert!(reader.read(1, Duration::from_millis(20)).await.unwrap().is_empty(), "an empty lane waits out the block");
    q.forget(&[&lane]).await;
}

async fn sweep_removes_messages_whose_reader_died(q: Queue) {
    let lane = new_lane();
    q.queue().publish(&lane, &jobs(2)).await.unwrap();
    let dead = q.reader("dead", std::slice::from_ref(&lane)).await;
    assert_eq!(dead.read(1, Duration::from_millis(100)).await.unwrap().len(), 1);
    drop(dead);
    assert_eq!(q.queue().sweep_pending(&lane, Duration::from_secs(60)).await.unwrap(), 0, "not idle long enough");
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(q.queue().sweep_pending(&lane, Duration::from_millis(10)).await.unwrap(), 1);
    assert_eq!(q.queue().depth(&lane).await.unwrap(), 1, "the unread message stays");
    assert_eq!(q.queue().sweep_pending(&new_lane(), Duration::ZERO).await.unwrap(), 0, "a lane never used has nothing to sweep");
    q.forget(&[&lane]).await;
}

/// Each test of the suite, once per queue.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod redis_streams {
            $(#[tokio::test]
            async fn $test() {
                super::$test(super::Queue::redis().await).await
            })*
        }
        mod in_process {
            $(#[tokio::test]
            async fn $test() {
                super::$test(super::Queue::memory()).await
            })*
        }
    };
}

conformance!(
    each_message_goes_to_one_reader_in_order,
    a_reader_reads_only_its_lanes,
    a_busy_lane_does_not_starve_the_others,
    a_blocked_read_wakes_when_work_arrives,
    sweep_removes_messages_whose_reader_died,
);

#[tokio::test]
async fn a_redis_reader_survives_its_stream_being_flushed() {
    let q = Queue::redis().await;
    let lane = new_lane();
    let reader = q.reader("w", std::slice::from_ref(&lane)).await;
    q.forget(&[&lane]).await; // as FLUSHALL would, for this stream only
    assert!(reader.read(1, Duration::from_millis(50)).await.unwrap().is_empty(), "a lost group is recreated");
    let job = jobs(1);
    q.queue().publish(&lane, &job).await.unwrap();
    let got = reader.read(1, Duration::from_millis(500)).await.unwrap();
    assert_eq!(got.iter().map(|d| d.job.clone().unwrap()).collect::<Vec<_>>(), job);
    q.forget(&[&lane]).await;
}

#[tokio::test]
async fn malformed_redis_messages_are_delivered_as_errors() {
    let q = Queue::redis().await;
    let lane = new_lane();
    let reader = q.reader("w", std::slice::from_ref(&lane)).await;
    let client = redis::Client::open(url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: String = conn.xadd(stream_key(&lane), "*", &[("job", "not-a-uuid"), ("attempt", "1")]).await.unwrap();
    let got = reader.read(1, Duration::from_millis(200)).await.unwrap();
    assert!(got[0].job.as_ref().unwrap_err().contains("not-a-uuid"), "{:?}", got[0].job);
    q.forget(&[&lane]).await;
}
