//! The limits the .proto files document are the limits the coordinator
//! applies: each number is read from the field's comment and probed on a
//! running coordinator, accepted at the limit and refused just past it, with
//! INVALID_ARGUMENT naming the field.

use std::collections::BTreeMap;
use std::path::Path;

use flowfarm_proto::v1 as pb;
use flowfarm_testkit::Harness;
use tonic::Code;

/// The comment block above `field` inside `message` of `proto/flowfarm/v1/{file}`.
fn comment(file: &str, message: &str, field: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto/flowfarm/v1").join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let start = text.find(&format!("message {message} {{")).unwrap_or_else(|| panic!("no message {message} in {file}"));
    let body = &text[start..start + text[start..].find("\n}").unwrap()];
    let lines: Vec<&str> = body.lines().collect();
    let at = lines
        .iter()
        .position(|l| {
            let l = l.trim();
            !l.starts_with("//") && l.split_whitespace().any(|w| w == field) && l.contains('=')
        })
        .unwrap_or_else(|| panic!("no field {message}.{field} in {file}"));
    let mut out: Vec<&str> = lines[..at].iter().rev().map(|l| l.trim()).take_while(|l| l.starts_with("//")).collect();
    out.reverse();
    out.iter().map(|l| l.trim_start_matches("//").trim()).collect::<Vec<_>>().join(" ")
}

/// Every number in `text`, in order; `2^63` is one number.
fn numbers(text: &str) -> Vec<f64> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let negative = chars[i] == '-' && chars.get(i + 1).is_some_and(|c| c.is_ascii_digit());
        if chars[i].is_ascii_digit() || negative {
            let start = i;
            i += 1;
            while i < chars.len()
                && (chars[i].is_ascii_digit() || (chars[i] == '.' && chars.get(i + 1).is_some_and(|c| c.is_ascii_digit())))
            {
                i += 1;
            }
            let mut value: f64 = chars[start..i].iter().collect::<String>().parse().unwrap();
            if chars.get(i) == Some(&'^') {
                let exp_start = i + 1;
                i += 1;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
                let exp: i32 = chars[exp_start..i].iter().collect::<String>().parse().unwrap();
                value = value.powi(exp);
            }
            out.push(value);
        } else {
            i += 1;
        }
    }
    out
}

fn spec() -> pb::JobSpec {
    pb::JobSpec { model: "sd3".into(), prompt: "a lighthouse".into(), width: 1024, height: 1024, ..Default::default() }
}

fn batch(f: impl FnOnce(&mut pb::JobSpec)) -> pb::SubmitBatchRequest {
    let mut s = spec();
    f(&mut s);
    pb::SubmitBatchRequest { jobs: vec![s], ..Default::default() }
}

/// Submits `ok` and `bad`: the first is accepted, the second refused naming `field`.
async fn probe(h: &Harness, what: &str, ok: pb::SubmitBatchRequest, bad: pb::SubmitBatchRequest, field: &str) {
    let mut r = h.render();
    if let Err(status) = r.submit_batch(ok).await {
        panic!("{what}: the documented limit is refused: {}", status.message());
    }
    let status = r.submit_batch(bad).await.expect_err(&format!("{what}: past the documented limit is accepted"));
    assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    assert!(status.message().contains(field), "{what}: {} does not name {field}", status.message());
}

#[tokio::test]
async fn documented_limits_are_the_applied_limits() {
    let h = Harness::start().await;

    let doc = comment("common.proto", "JobSpec", "prompt");
    let chars = numbers(&doc)[0] as usize;
    probe(&h, "prompt", batch(|s| s.prompt = "p".repeat(chars)), batch(|s| s.prompt = "p".repeat(chars + 1)), "jobs[0].prompt").await;

    let doc = comment("common.proto", "JobSpec", "width");
    let n = numbers(&doc);
    let (multiple, min) = (n[0] as u32, n[1] as u32);
    probe(&h, "width minimum", batch(|s| s.width = min), batch(|s| s.width = min - multiple), "jobs[0].width").await;
    probe(&h, "width multiple", batch(|s| s.width = min + multiple), batch(|s| s.width = min + multiple / 2), "jobs[0].width").await;

    let doc = comment("common.proto", "JobSpec", "steps");
    let max_steps = *numbers(&doc).iter().find(|&&v| v > 1.0).unwrap() as u32;
    probe(&h, "steps", batch(|s| s.steps = max_steps), batch(|s| s.steps = max_steps + 1), "jobs[0].steps").await;

    let doc = comment("common.proto", "JobSpec", "guidance_scale");
    let n = numbers(&doc);
    let (low, high) = (n[0] as f32, n[1] as f32);
    probe(&h, "guidance max", batch(|s| s.guidance_scale = Some(high)), batch(|s| s.guidance_scale = Some(high + 0.5)), "guidance_scale")
        .await;
    probe(&h, "guidance min", batch(|s| s.guidance_scale = Some(low)), batch(|s| s.guidance_scale = Some(low - 0.5)), "guidance_scale")
        .await;

    let doc = comment("common.proto", "JobSpec", "seed");
    let end = numbers(&doc)[1] as u128 as u64; // exclusive
    probe(&h, "seed", batch(|s| s.seed = Some(end - 1)), batch(|s| s.seed = Some(end)), "jobs[0].seed").await;

    let doc = comment("common.proto", "JobSpec", "shift");
    let max_shift = numbers(&doc).into_iter().fold(f64::MIN, f64::max);
    probe(&h, "shift", batch(|s| s.shift = Some(max_shift)), batch(|s| s.shift = Some(max_shift + 0.5)), "jobs[0].shift").await;

    let doc = comment("common.proto", "JobSpec", "priority");
    let n = numbers(&doc);
    let (low, high) = (n[0] as i32, n[1] as i32);
    probe(&h, "priority max", batch(|s| s.priority = high), batch(|s| s.priority = high + 1), "jobs[0].priority").await;
    probe(&h, "priority min", batch(|s| s.priority = low), batch(|s| s.priority = low - 1), "jobs[0].priority").await;

    let doc = comment("common.proto", "JobSpec", "max_attempts");
    let max_attempts = *numbers(&doc).iter().find(|&&v| v > 3.0).unwrap() as u32;
    probe(&h, "max_attempts", batch(|s| s.max_attempts = max_attempts), batch(|s| s.max_attempts = max_attempts + 1), "max_attempts").await;

    let doc = comment("common.proto", "JobSpec", "labels");
    let n = numbers(&doc);
    // "at most 32, keys 1..=63 chars of [a-z0-9_.-/], values at most 256 chars"
    let (count, key_chars, value_chars) = (n[0] as usize, n[2] as usize, n[n.len() - 1] as usize);
    let labels = |k: usize| (0..k).map(|i| (format!("k{i}"), "v".to_string())).collect::<BTreeMap<_, _>>();
    probe(&h, "label count", batch(|s| s.labels = labels(count)), batch(|s| s.labels = labels(count + 1)), "labels").await;
    let key = |len: usize| BTreeMap::from([("k".repeat(len), "v".to_string())]);
    probe(&h, "label key", batch(|s| s.labels = key(key_chars)), batch(|s| s.labels = key(key_chars + 1)), "labels").await;
    let value = |len: usize| BTreeMap::from([("k".to_string(), "v".repeat(len))]);
    probe(&h, "label value", batch(|s| s.labels = value(value_chars)), batch(|s| s.labels = value(value_chars + 1)), "labels").await;

    let doc = comment("render.proto", "SubmitBatchRequest", "idempotency_key");
    let key_chars = numbers(&doc)[0] as usize;
    let keyed =
        |len: usize, prompt: &str| pb::SubmitBatchRequest { idempotency_key: "i".repeat(len), ..batch(|s| s.prompt = prompt.into()) };
    probe(&h, "idempotency key", keyed(key_chars, "a"), keyed(key_chars + 1, "b"), "idempotency_key").await;

    let doc = comment("render.proto", "ListJobsRequest", "page_size");
    let max_page = numbers(&doc)[1] as u32;
    let mut r = h.render();
    r.list_jobs(pb::ListJobsRequest { page_size: max_page, ..Default::default() }).await.expect("the documented page size");
    let status = r.list_jobs(pb::ListJobsRequest { page_size: max_page + 1, ..Default::default() }).await.unwrap_err();
    assert!(status.code() == Code::InvalidArgument && status.message().contains("page_size"), "{status:?}");

    let mut w = h.worker();
    let doc = comment("worker.proto", "RegisterWorkerRequest", "name");
    let name_chars = numbers(&doc)[1] as usize;
    let doc = comment("worker.proto", "RegisterWorkerRequest", "capacity");
    let capacity = numbers(&doc)[1] as u32;
    let register = |name: usize, capacity: u32| pb::RegisterWorkerRequest {
        name: "w".repeat(name),
        models: vec!["sd3".into()],
        capacity,
        ..Default::default()
    };
    w.register_worker(register(name_chars, capacity)).await.expect("the documented name length and capacity");
    let status = w.register_worker(register(name_chars + 1, 1)).await.unwrap_err();
    assert!(status.code() == Code::InvalidArgument && status.message().contains("name"), "{status:?}");
    let status = w.register_worker(register(1, capacity + 1)).await.unwrap_err();
    assert!(status.code() == Code::InvalidArgument && status.message().contains("capacity"), "{status:?}");

    let doc = comment("admin.proto", "PurgeJobsRequest", "older_than_seconds");
    let max_age = numbers(&doc)[0] as u64;
    let mut a = h.admin();
    a.purge_jobs(pb::PurgeJobsRequest { older_than_seconds: max_age, ..Default::default() }).await.expect("the documented maximum age");
    let status = a.purge_jobs(pb::PurgeJobsRequest { older_than_seconds: max_age + 1, ..Default::default() }).await.unwrap_err();
    assert!(status.code() == Code::InvalidArgument && status.message().contains("older_than_seconds"), "{status:?}");
    h.stop().await;
}

#[test]
fn numbers_are_read_as_written() {
    assert_eq!(numbers("Seed 0..2^63, -1000..=1000; [0, 30] and 2.5"), vec![0.0, 2f64.powi(63), -1000.0, 1000.0, 0.0, 30.0, 2.5]);
}
