//! Reading batch files: JSONL of job specs, or a TOML grid.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use flowfarm_proto::v1 as pb;
use serde::Deserialize;

/// One job spec as written in a file; unset fields take the model's defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpecInput {
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub steps: Option<u32>,
    pub guidance_scale: Option<f32>,
    pub seed: Option<u64>,
    pub shift: Option<f64>,
    /// `all` or `clip-only`.
    pub text_encoders: Option<String>,
    #[serde(default)]
    pub priority: i32,
    pub max_attempts: Option<u32>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Decode the VAE in tiles (true) or whole (false); unset: the worker decides.
    pub tile_vae: Option<bool>,
}

impl JobSpecInput {
    fn into_proto(self, path: &str) -> Result<pb::JobSpec> {
        let text_encoders = match self.text_encoders.as_deref() {
            None => pb::TextEncoderSet::Unspecified,
            Some("all") => pb::TextEncoderSet::All,
            Some("clip-only") => pb::TextEncoderSet::ClipOnly,
            Some(other) => bail!("{path}.text_encoders: `{other}` is not `all` or `clip-only`"),
        };
        Ok(pb::JobSpec {
            model: self.model,
            prompt: self.prompt,
            negative_prompt: self.negative_prompt,
            width: self.width.unwrap_or(0),
            height: self.height.unwrap_or(0),
            steps: self.steps.unwrap_or(0),
            guidance_scale: self.guidance_scale,
            seed: self.seed,
            shift: self.shift,
            text_encoders: text_encoders as i32,
            priority: self.priority,
            max_attempts: self.max_attempts.unwrap_or(0),
            labels: self.labels,
            tile_vae: self.tile_vae,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SizeInput {
    width: u32,
    height: u32,
}

/// A grid file: `[base]` plus prompts × seeds × sizes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GridInput {
    idempotency_key: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    base: JobSpecInput,
    #[serde(default)]
    prompts: Vec<String>,
    #[serde(default)]
    seeds: Vec<u64>,
    #[serde(default)]
    sizes: Vec<SizeInput>,
}

/// Reads a batch file into a request: `.jsonl` (one job spec per line) or
/// `.toml` (a grid). File-level problems name the file and line.
///
/// # Errors
/// Unreadable file, unknown extension, malformed line, unknown field.
pub fn read_batch(path: &Path) -> Result<pb::SubmitBatchRequest> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let name = path.display();
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") | Some("ndjson") => {
            let mut jobs = Vec::new();
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let spec: JobSpecInput = serde_json::from_str(line).with_context(|| format!("{name}:{}: not a job spec", n + 1))?;
                let path = format!("jobs[{}]", jobs.len());
                jobs.push(spec.into_proto(&path).with_context(|| format!("{name}:{}", n + 1))?);
            }
            if jobs.is_empty() {
                bail!("{name}: no jobs in file (one JSON job spec per line)");
            }
            Ok(pb::SubmitBatchRequest { jobs, ..Default::default() })
        }
        Some("toml") => {
            let grid: GridInput = toml::from_str(&text).with_context(|| format!("{name}: not a grid file"))?;
            Ok(pb::SubmitBatchRequest {
                idempotency_key: grid.idempotency_key.unwrap_or_default(),
                labels: grid.labels,
                jobs: Vec::new(),
                grid: Some(pb::JobGrid {
                    base: Some(grid.base.into_proto("grid.base")?),
                    prompts: grid.prompts,
                    seeds: grid.seeds,
                    sizes: grid.sizes.into_iter().map(|s| pb::ImageSize { width: s.width, height: s.height }).collect(),
                }),
            })
        }
        _ => bail!("{name}: unknown batch file type; use .jsonl (one job spec per line) or .toml (a grid)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> tempfile::TempPath {
        let dir = tempfile::Builder::new().suffix(name).tempfile().unwrap();
        std::fs::write(dir.path(), text).unwrap();
        dir.into_temp_path()
    }

    #[test]
    fn jsonl_reads_jobs_and_names_bad_lines() {
        let ok = write(".jsonl", "{\"model\":\"m\",\"prompt\":\"p\",\"width\":512}\n\n{\"model\":\"m\",\"prompt\":\"q\"}\n");
        let req = read_batch(&ok).unwrap();
        assert_eq!(req.jobs.len(), 2);
        assert_eq!(req.jobs[0].width, 512);
        let bad = write(".jsonl", "{\"model\":\"m\",\"prompt\":\"p\"}\n{\"model\":\"m\",\"widht\":512}\n");
        let err = format!("{:#}", read_batch(&bad).unwrap_err());
        assert!(err.contains(":2:") && err.contains("widht"), "{err}");
    }

    #[test]
    fn toml_reads_a_grid() {
        let grid = write(
            ".toml",
            "idempotency_key = \"k\"\nprompts = [\"a\", \"b\"]\nseeds = [1, 2]\nsizes = [{ width = 512, height = 768 }]\n[base]\nmodel = \"m\"\nsteps = 20\n",
        );
        let req = read_batch(&grid).unwrap();
        let g = req.grid.unwrap();
        assert_eq!((g.prompts.len(), g.seeds.len(), g.sizes[0].height), (2, 2, 768));
        assert_eq!(g.base.unwrap().steps, 20);
        assert_eq!(req.idempotency_key, "k");
    }

    #[test]
    fn unknown_extension_says_what_to_use() {
        let other = write(".csv", "x");
        assert!(read_batch(&other).unwrap_err().to_string().contains(".jsonl"));
    }
}
