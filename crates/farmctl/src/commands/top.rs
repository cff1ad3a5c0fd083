//! `farmctl top`: a live view of the farm.

use anyhow::Result;
use flowfarm_proto::v1 as pb;
use serde_json::json;

use farmctl::client::Farm;
use farmctl::output;

/// `farmctl top`: redraws queue figures, throughput since the previous
/// frame, and the workers, until Ctrl-C.
pub(crate) async fn top(farm: &Farm, json: bool, interval: std::time::Duration, once: bool) -> Result<()> {
    let mut admin = farm.admin();
    let mut previous: Option<(std::time::Instant, u64)> = None;
    let redraw = !once && !json && std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        let stats = admin.get_queue_stats(pb::GetQueueStatsRequest::default()).await.map_err(|s| farm.explain(s))?.into_inner();
        let workers =
            admin.list_workers(pb::ListWorkersRequest { include_gone: false }).await.map_err(|s| farm.explain(s))?.into_inner().workers;
        let finished = stats.total.as_ref().map_or(0, |c| c.succeeded + c.failed + c.dead);
        let now = std::time::Instant::now();
        let rate = previous.map(|(at, n)| finished.saturating_sub(n) as f64 / (now - at).as_secs_f64().max(1e-3));
        previous = Some((now, finished));
        if json {
            println!(
                "{}",
                json!({
                    "queue": output::queue_stats(&stats),
                    "finished_per_second": rate,
                    "workers": workers.iter().map(output::worker).collect::<Vec<_>>(),
                })
            );
        } else {
            let mut frame = String::new();
            if redraw {
                frame.push_str("\x1b[2J\x1b[H");
            }
            frame.push_str(&output::queue_stats_text(&stats));
            frame.push_str(&match rate {
                Some(r) => format!("\nthroughput: {r:.1} jobs/s finished"),
                None => "\nthroughput: (next frame)".into(),
            });
            frame.push_str(&format!("\nworkers: {}", workers.len()));
            for w in &workers {
                frame.push_str("\n  ");
                frame.push_str(&output::worker_line(w));
            }
            println!("{frame}");
        }
        if once {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
