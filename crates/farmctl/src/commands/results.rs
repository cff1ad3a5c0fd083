//! `farmctl results fetch`: a batch's images, checked, and its contact sheet.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use flowfarm_proto::v1 as pb;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;

use crate::emit;
use farmctl::client::Farm;

#[derive(Subcommand)]
pub(crate) enum ResultsCommand {
    /// Write the images of a batch's succeeded jobs to DIR.
    Fetch {
        batch: String,
        #[arg(long)]
        out: PathBuf,
        /// Also write DIR/contact-sheet.png: the images side by side in job
        /// order (the first 1024 of a larger batch).
        #[arg(long)]
        contact_sheet: bool,
        /// Pixels of each image's square on the contact sheet.
        #[arg(long, default_value_t = 256)]
        sheet_cell: u32,
    },
}

/// Downloads every succeeded job's image into `out` as `<index>-<job id>.png`,
/// checking each against its SHA-256; files appear only once complete. With
/// `sheet` (a cell size), also writes `out/contact-sheet.png`.
pub(crate) async fn fetch_results(farm: &Farm, batch_id: &str, out: &Path, sheet: Option<u32>, json: bool) -> Result<()> {
    if let Some(cell) = sheet {
        // Checked before anything is downloaded.
        if !(16..=2048).contains(&cell) {
            bail!("--sheet-cell {cell}: give 16 to 2048 pixels");
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut render = farm.render();
    let mut page_token = String::new();
    let mut written = Vec::new();
    loop {
        let page = render
            .list_jobs(pb::ListJobsRequest {
                batch_id: batch_id.to_owned(),
                states: vec![pb::JobState::Succeeded as i32],
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await
            .map_err(|s| farm.explain(s))?
            .into_inner();
        for job in &page.jobs {
            let expected = job.result.clone().unwrap_or_default();
            let extension = if expected.content_type == "image/png" { "png" } else { "bin" };
            let path = out.join(format!("{:05}-{}.{extension}", job.index, job.id));
            let partial = path.with_extension("partial");
            let mut stream =
                render.get_result(pb::GetResultRequest { job_id: job.id.clone() }).await.map_err(|s| farm.explain(s))?.into_inner();
            let mut file = std::fs::File::create(&partial).with_context(|| format!("cannot write {}", partial.display()))?;
            let mut hasher = Sha256::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|s| farm.explain(s))?;
                hasher.update(&chunk.data);
                file.write_all(&chunk.data)?;
            }
            file.sync_all()?;
            let digest = hex_string(&hasher.finalize());
            if digest != expected.sha256 {
                let _ = std::fs::remove_file(&partial);
                bail!("job {}: downloaded image has SHA-256 {digest}, the coordinator recorded {}", job.id, expected.sha256);
            }
            std::fs::rename(&partial, &path)?;
            written.push(path);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let contact_sheet = match sheet {
        Some(cell) => Some(write_contact_sheet(&written, out, cell)?),
        None => None,
    };
    emit(json, json!({ "written": written, "contact_sheet": contact_sheet }), || {
        let mut text = format!("wrote {} images to {}", written.len(), out.display());
        if let Some(path) = &contact_sheet {
            text.push_str(&format!("\ncontact sheet: {}", path.display()));
        }
        text
    });
    Ok(())
}

/// `out/contact-sheet.png` of the PNGs among `images` (in job order).
pub(crate) fn write_contact_sheet(images: &[PathBuf], out: &Path, cell: u32) -> Result<PathBuf> {
    let pngs: Vec<&PathBuf> = images.iter().filter(|p| p.extension().is_some_and(|e| e == "png")).collect();
    if pngs.len() > flowfarm_sheet::MAX_IMAGES {
        eprintln!("note: the contact sheet shows the first {} of {} images", flowfarm_sheet::MAX_IMAGES, pngs.len());
    }
    let bytes = pngs
        .iter()
        .take(flowfarm_sheet::MAX_IMAGES)
        .map(|p| std::fs::read(p).with_context(|| format!("cannot read {}", p.display())))
        .collect::<Result<Vec<_>>>()?;
    let sheet = flowfarm_sheet::compose(&bytes, cell)?;
    let path = out.join("contact-sheet.png");
    let partial = path.with_extension("partial");
    std::fs::write(&partial, sheet).with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, &path)?;
    Ok(path)
}

pub(crate) fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
