//! The queue against the Redis server at FLOWFARM_TEST_REDIS_URL
//! (default redis://127.0.0.1:6379/0). Each test uses its own model name, so
//! tests do not see each other's streams.

use std::time::Duration;

use flowfarm_queue::{stream_key, Consumer, JobMessage, WorkQueue};
use redis::AsyncCommands;
use uuid::Uuid;

fn url() -> String {
    std::env::var("FLOWFARM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

fn model() -> String {
    format!("test-{}", Uuid::new_v4())
}

async fn cleanup(model: &str) {
    let client = redis::Client::open(url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = conn.del(stream_key(model)).await.unwrap();
}

#[tokio::test]
async fn each_message_goes_to_one_consumer_in_order() {
    let model = model();
    let queue = WorkQueue::connect(&url()).await.unwrap();
    let jobs: Vec<JobMessage> = (0..10).map(|i| JobMessage { job_id: Uuid::now_v7(), attempt: i % 3 + 1 }).collect();
    queue.publish(&model, &jobs).await.unwrap();
    assert_eq!(queue.depth(&model).await.unwrap(), 10);

    let models = vec![model.clone()];
    let mut a = Consumer::connect(&url(), "a", &models).await.unwrap();
    let mut b = Consumer::connect(&url(), "b", &models).await.unwrap();
    let first = a.read(4, Duration::from_millis(100)).await.unwrap();
    let rest = b.read(100, Duration::from_millis(100)).await.unwrap();
    assert_eq!(first.len(), 4);
    assert_eq!(rest.len(), 6);
    let got: Vec<JobMessage> = first.iter().chain(&rest).map(|d| d.job.clone().unwrap()).collect();
    assert_eq!(got, jobs, "every message once, in order");
    assert!(a.read(10, Duration::from_millis(50)).await.unwrap().is_empty(), "nothing is delivered twice");

    for d in first.iter().chain(&rest) {
        a.ack(d).await.unwrap();
    }
    assert_eq!(queue.depth(&model).await.unwrap(), 0, "acknowledged messages are deleted");
    cleanup(&model).await;
}

#[tokio::test]
async fn a_consumer_survives_the_stream_being_flushed() {
    let model = model();
    let models = vec![model.clone()];
    let mut consumer = Consumer::connect(&url(), "w", &models).await.unwrap();
    cleanup(&model).await; // as FLUSHALL would, for this stream only
    assert!(consumer.read(1, Duration::from_millis(50)).await.unwrap().is_empty(), "a lost group is recreated");
    let queue = WorkQueue::connect(&url()).await.unwrap();
    let job = JobMessage { job_id: Uuid::now_v7(), attempt: 1 };
    queue.publish(&model, &[job]).await.unwrap();
    let got = consumer.read(1, Duration::from_millis(500)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].job, Ok(job));
    cleanup(&model).await;
}

#[tokio::test]
async fn sweep_removes_messages_whose_reader_died() {
    let model = model();
    let models = vec![model.clone()];
    let queue = WorkQueue::connect(&url()).await.unwrap();
    queue
        .publish(&model, &[JobMessage { job_id: Uuid::now_v7(), attempt: 1 }, JobMessage { job_id: Uuid::now_v7(), attempt: 1 }])
        .await
        .unwrap();
    let mut dead = Consumer::connect(&url(), "dead", &models).await.unwrap();
    assert_eq!(dead.read(1, Duration::from_millis(100)).await.unwrap().len(), 1);
    drop(dead);
    assert_eq!(queue.sweep_pending(&model, Duration::from_secs(60)).await.unwrap(), 0, "not idle long enough");
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(queue.sweep_pending(&model, Duration::from_millis(10)).await.unwrap(), 1);
    assert_eq!(queue.depth(&model).await.unwrap(), 1, "the unread message stays");
    cleanup(&model).await;
}

#[tokio::test]
async fn malformed_messages_are_delivered_as_errors() {
    let model = model();
    let client = redis::Client::open(url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let models = vec![model.clone()];
    let mut consumer = Consumer::connect(&url(), "w", &models).await.unwrap();
    let _: String = conn.xadd(stream_key(&model), "*", &[("job", "not-a-uuid"), ("attempt", "1")]).await.unwrap();
    let got = consumer.read(1, Duration::from_millis(200)).await.unwrap();
    assert!(got[0].job.as_ref().unwrap_err().contains("not-a-uuid"), "{:?}", got[0].job);
    cleanup(&model).await;
}
