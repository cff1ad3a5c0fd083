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
use crate::source::{folder_component, ComponentFiles, ModelSource, Part};
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

/// Every tensor of a part under its own names (the part's prefix taken off), as stored.
fn load_component(c: &ComponentFiles) -> Result<HashMap<String, Tensor>, EngineError> {
    let mut all = HashMap::new();
    for name in c.files.names() {
        if let Some(own) = name.strip_prefix(c.prefix.as_str()) {
            let dtype = c.files.info(name).map_or(candle_core::DType::F32, |i| i.dtype);
            all.insert(own.to_owned(), c.files.load(name, dtype, &Device::Cpu)?);
        }
    }
    Ok(all)
}

/// Writes the diffusers model folder `source` names (any shards, its
/// variant) as one single file at `out` (through a temporary file, so a
/// failure leaves nothing half-written). Tensors keep their dtype. The whole
/// model passes through memory.
///
/// # Errors
/// [`EngineError::Checkpoint`] if `source` is not a diffusers folder with a
/// transformer and a VAE; read and write errors.
pub fn diffusers_to_single_file(source: &ModelSource, out: &Path) -> Result<Converted, EngineError> {
    let dir = source.path.as_path();
    if !dir.is_dir() {
        return Err(EngineError::checkpoint(dir, "not a diffusers model folder (it is a single file already?)"));
    }
    // Encoders are optional here: a folder without them makes a file without them.
    let v = source.variant.as_deref();
    let transformer = folder_component(Part::Transformer, dir, "transformer", "diffusion_pytorch_model", v)?;
    let checkpoint = Checkpoint::from_component(&transformer)?;
    if checkpoint.layout() != Layout::Diffusers {
        return Err(EngineError::checkpoint(dir, "its transformer/ holds single-file keys"));
    }
    let config = checkpoint.config()?;
    let mut tensors = single_file_tensors(&config, &load_component(&transformer)?, out)?;
    let mut parts = vec!["transformer"];
    let mut metadata = HashMap::from([(HEADS_METADATA_KEY.to_owned(), config.heads.to_string())]);

    let vae_dir = dir.join("vae");
    let vae = load_component(&folder_component(Part::Vae, dir, "vae", "diffusion_pytorch_model", v)?)?;
    let up = vae
        .keys()
        .filter_map(|k| k.strip_prefix("decoder.up_blocks.")?.split('.').next()?.parse::<usize>().ok())
        .collect::<BTreeSet<_>>()
        .len();
    let mut left_out = 0;
    for (name, tensor) in vae {
        if name.starts_with("decoder.") || name.starts_with("post_quant_conv.") {
            // The original attention projections are 1×1 convolutions.
            let tensor = if name.contains(".attentions.") && name.ends_with(".weight") && tensor.rank() == 2 {
                tensor.unsqueeze(2)?.unsqueeze(3)?
            } else {
                tensor
            };
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

    for (folder, encoder, prefix, part) in [
        ("text_encoder", Part::ClipL, SINGLE_FILE_CLIP_L, "clip_l"),
        ("text_encoder_2", Part::ClipG, SINGLE_FILE_CLIP_G, "clip_g"),
        ("text_encoder_3", Part::T5, SINGLE_FILE_T5, "t5xxl"),
    ] {
        if crate::source::folder_weights(&dir.join(folder), "model", v).is_ok()
            || crate::source::folder_weights(&dir.join(folder), "model", None).is_ok()
        {
            let c = folder_component(encoder, dir, folder, "model", v)?;
            tensors.extend(load_component(&c)?.into_iter().map(|(name, t)| (format!("{prefix}{name}"), t)));
            parts.push(part);
        }
    }

    let partial = out.with_extension("partial");
    safetensors::serialize_to_file(tensors.iter(), Some(metadata), &partial).map_err(|e| EngineError::checkpoint(out, e.to_string()))?;
    std::fs::rename(&partial, out).map_err(io(out))?;
    Ok(Converted { tensors: tensors.len(), parts, left_out })
}

/// The diffusers name of a VAE decoder tensor from its original LDM name:
/// the inverse of the mapping the loader reads single files with, checked
/// against it.
fn diffusers_vae_name(ldm: &str, up: usize) -> Option<String> {
    let mut n = ldm.replace("decoder.norm_out.", "decoder.conv_norm_out.").replace(".nin_shortcut.", ".conv_shortcut.");
    for j in 0..up {
        n = n.replace(&format!("decoder.up.{j}.block."), &format!("decoder.up_blocks.{}.resnets.", up - 1 - j));
        n = n.replace(&format!("decoder.up.{j}.upsample."), &format!("decoder.up_blocks.{}.upsamplers.0.", up - 1 - j));
    }
    for k in 1..=2 {
        n = n.replace(&format!("decoder.mid.block_{k}."), &format!("decoder.mid_block.resnets.{}.", k - 1));
    }
    if let Some(tail) = n.strip_prefix("decoder.mid.attn_1.") {
        let (part, rest) = tail.split_once('.')?;
        let part = match part {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        n = format!("decoder.mid_block.attentions.0.{part}.{rest}");
    }
    (ldm_name(&n, up) == ldm).then_some(n)
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), EngineError> {
    std::fs::create_dir_all(to).map_err(io(to))?;
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let path = entry.map_err(io(from))?.path();
        let target = to.join(path.file_name().unwrap_or_default());
        if path.is_dir() {
            copy_dir(&path, &target)?;
        } else {
            std::fs::copy(&path, &target).map_err(io(&path))?;
        }
    }
    Ok(())
}

fn save_folder_file(tensors: &HashMap<String, Tensor>, dir: &Path, name: &str) -> Result<(), EngineError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(name);
    safetensors::serialize_to_file(tensors.iter(), None, &path).map_err(|e| EngineError::checkpoint(&path, e.to_string()))
}

/// Writes an SD3-style single file as a diffusers folder at `out` (which
/// must not exist; built beside it and renamed at the end): `transformer/`
/// and `vae/` from the file, `text_encoder{,_2,_3}/` from the encoders in
/// it; the configs a single file does not carry (VAE, encoders) and the
/// tokenizers, scheduler and model_index.json come from the diffusers
/// folder `support`.
///
/// # Errors
/// [`EngineError::Checkpoint`] if `file` is not a single file with a
/// transformer and a VAE decoder, or `support` lacks a config it needs.
pub fn single_file_to_diffusers(file: &Path, support: &Path, out: &Path) -> Result<Converted, EngineError> {
    let checkpoint = Checkpoint::open(file)?;
    if checkpoint.layout() != Layout::SingleFile {
        return Err(EngineError::checkpoint(file, "not a single file"));
    }
    let config = checkpoint.config()?;
    let partial = out.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io(&partial))?;
    }
    let weights = checkpoint.diffusers_weights()?;
    crate::tiny::write_diffusers(&config, &weights, &partial)?;
    let mut written = weights.len();
    let mut parts = vec!["transformer"];

    let all = load(file)?;
    let up = all
        .keys()
        .filter_map(|k| k.strip_prefix("first_stage_model.decoder.up.")?.split('.').next()?.parse::<usize>().ok())
        .collect::<BTreeSet<_>>()
        .len();
    let mut vae = HashMap::new();
    for (key, tensor) in &all {
        let Some(ldm) = key.strip_prefix("first_stage_model.") else { continue };
        if !(ldm.starts_with("decoder.") || ldm.starts_with("post_quant_conv.")) {
            continue;
        }
        let name = diffusers_vae_name(ldm, up).ok_or_else(|| EngineError::checkpoint(file, format!("`{key}` has no diffusers name")))?;
        let tensor = if name.contains(".attentions.") && name.ends_with(".weight") && tensor.rank() == 4 {
            tensor.squeeze(3)?.squeeze(2)?
        } else {
            tensor.clone()
        };
        vae.insert(name, tensor);
    }
    if vae.is_empty() {
        return Err(EngineError::checkpoint(file, "no VAE decoder (first_stage_model.decoder.*)"));
    }
    written += vae.len();
    save_folder_file(&vae, &partial.join("vae"), "diffusion_pytorch_model.safetensors")?;
    std::fs::copy(support.join("vae/config.json"), partial.join("vae/config.json")).map_err(io(&support.join("vae/config.json")))?;
    parts.push("vae decoder");

    for (folder, prefix, part) in [
        ("text_encoder", SINGLE_FILE_CLIP_L, "clip_l"),
        ("text_encoder_2", SINGLE_FILE_CLIP_G, "clip_g"),
        ("text_encoder_3", SINGLE_FILE_T5, "t5xxl"),
    ] {
        let encoder: HashMap<String, Tensor> =
            all.iter().filter_map(|(k, t)| Some((k.strip_prefix(prefix)?.to_owned(), t.clone()))).collect();
        if encoder.is_empty() {
            continue;
        }
        written += encoder.len();
        save_folder_file(&encoder, &partial.join(folder), "model.safetensors")?;
        let config = support.join(folder).join("config.json");
        std::fs::copy(&config, partial.join(folder).join("config.json")).map_err(io(&config))?;
        parts.push(part);
    }
    for extra in ["tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"] {
        if support.join(extra).is_dir() {
            copy_dir(&support.join(extra), &partial.join(extra))?;
        }
    }
    if support.join("model_index.json").is_file() {
        std::fs::copy(support.join("model_index.json"), partial.join("model_index.json")).map_err(io(support))?;
    }
    std::fs::rename(&partial, out).map_err(io(out))?;
    Ok(Converted { tensors: written, parts, left_out: 0 })
}
