//! Writing a diffusers model folder as one SD3-style single file: the
//! transformer under `model.diffusion_model.*` (fused qkv), the VAE decoder
//! under `first_stage_model.*` (original LDM names), the text encoders under
//! `text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`. What flowfarm reads
//! back from it renders exactly as the folder does.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::checkpoint::{single_file_tensors, HEADS_METADATA_KEY};
use crate::pipeline::{SINGLE_FILE_CLIP_G, SINGLE_FILE_CLIP_L, SINGLE_FILE_T5};
use crate::vae::ldm_name;
use crate::{Checkpoint, EngineError, Layout};

/// What a conversion wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    pub tensors: usize,
    /// `transformer`, `vae decoder`, `clip_l`, `clip_g`, `t5xxl`: the parts written.
    pub parts: Vec<&'static str>,
    /// Tensors of the folder not written: the VAE encoder (flowfarm only decodes).
    pub left_out: usize,
}

fn load(path: &Path) -> Result<HashMap<String, Tensor>, EngineError> {
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| EngineError::checkpoint(path, e.to_string()))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Io { path: path.display().to_string(), source }
}

/// Every tensor of the safetensors files in `dir` (one file or shards).
fn load_folder(dir: &Path) -> Result<HashMap<String, Tensor>, EngineError> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    let mut all = HashMap::new();
    for file in files {
        all.extend(load(&file)?);
    }
    Ok(all)
}

/// Writes the diffusers model folder `dir` as one single file at `out`
/// (through a temporary file, so a failure leaves nothing half-written).
/// Tensors keep their dtype. The whole model passes through memory.
///
/// # Errors
/// [`EngineError::Checkpoint`] if `dir` is not a diffusers folder with a
/// transformer and a VAE; read and write errors.
pub fn diffusers_to_single_file(dir: &Path, out: &Path) -> Result<Converted, EngineError> {
    let checkpoint = Checkpoint::open(dir)?;
    if checkpoint.layout() != Layout::Diffusers || !dir.is_dir() {
        return Err(EngineError::checkpoint(dir, "not a diffusers model folder (it is a single file already?)"));
    }
    let config = checkpoint.config()?;
    let mut tensors = single_file_tensors(&config, &load_folder(&dir.join("transformer"))?, out)?;
    let mut parts = vec!["transformer"];
    let mut metadata = HashMap::from([(HEADS_METADATA_KEY.to_owned(), config.heads.to_string())]);

    let vae_dir = dir.join("vae");
    let vae = load(&vae_dir.join("diffusion_pytorch_model.safetensors"))?;
    let up = vae
        .keys()
        .filter_map(|k| k.strip_prefix("decoder.up_blocks.")?.split('.').next()?.parse::<usize>().ok())
        .collect::<BTreeSet<_>>()
        .len();
    let mut left_out = 0;
    for (name, tensor) in vae {
        if name.starts_with("decoder.") || name.starts_with("post_quant_conv.") {
            tensors.insert(format!("first_stage_model.{}", ldm_name(&name, up)), tensor);
        } else {
            left_out += 1;
        }
    }
    let vae_config: serde_json::Value = crate::read_json(&vae_dir.join("config.json"), "a VAE config")?;
    for key in ["norm_num_groups", "sample_size"] {
        if let Some(value) = vae_config.get(key).and_then(|v| v.as_u64()) {
            metadata.insert(key.to_owned(), value.to_string());
        }
    }
    parts.push("vae decoder");

    for (folder, prefix, part) in
        [("text_encoder", SINGLE_FILE_CLIP_L, "clip_l"), ("text_encoder_2", SINGLE_FILE_CLIP_G, "clip_g"), ("text_encoder_3", SINGLE_FILE_T5, "t5xxl")]
    {
        let weights = dir.join(folder).join("model.safetensors");
        if weights.is_file() {
            tensors.extend(load(&weights)?.into_iter().map(|(name, t)| (format!("{prefix}{name}"), t)));
            parts.push(part);
        }
    }

    let partial = out.with_extension("partial");
    safetensors::serialize_to_file(tensors.iter(), Some(metadata), &partial)
        .map_err(|e| EngineError::checkpoint(out, e.to_string()))?;
    std::fs::rename(&partial, out).map_err(io(out))?;
    Ok(Converted { tensors: tensors.len(), parts, left_out })
}
