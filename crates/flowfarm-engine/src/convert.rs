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

/// Writes a single file as a diffusers folder at `out` (which must not
/// exist; built beside it and renamed at the end): `transformer/` and `vae/`
/// from the file, `text_encoder{,_2,_3}/` from wherever `source` has its
/// encoders (inside the file, SD3.5-style separate files, or the support
/// folder); the configs a single file does not carry (VAE, encoders), the
/// tokenizers, the scheduler and model_index.json come from `source.support`.
/// Tensors keep their dtype (float8 T5 stays float8).
///
/// # Errors
/// [`EngineError::Checkpoint`] if `source.path` is not a single file with a
/// transformer and a VAE decoder, or the support folder lacks a config it needs.
pub fn single_file_to_diffusers(source: &ModelSource, out: &Path) -> Result<Converted, EngineError> {
    let file = source.path.as_path();
    if !file.is_file() {
        return Err(EngineError::checkpoint(file, "not a single file"));
    }
    let layout = source.resolve()?;
    let support = source.support.as_deref().ok_or_else(|| EngineError::checkpoint(file, "a single file needs a support folder"))?;
    let checkpoint = Checkpoint::from_component(&layout.transformer)?;
    if checkpoint.layout() != Layout::SingleFile {
        return Err(EngineError::checkpoint(file, "not a single file"));
    }
    let config = checkpoint.config()?;
    let partial = out.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io(&partial))?;
    }
    let weights = checkpoint.diffusers_weights()?;
    crate::checkpoint::write_diffusers(&config, &weights, &partial)?;
    let mut written = weights.len();
    let mut parts = vec!["transformer"];

    let vae = if layout.vae.config.is_some() {
        // Taken from the support folder: already in diffusers names.
        load_component(&layout.vae)?
    } else {
        vae_from_single_file(&layout.vae, file)?
    };
    written += vae.len();
    save_folder_file(&vae, &partial.join("vae"), "diffusion_pytorch_model.safetensors")?;
    std::fs::copy(support.join("vae/config.json"), partial.join("vae/config.json")).map_err(io(&support.join("vae/config.json")))?;
    parts.push("vae decoder");

    for (folder, component, part) in [
        ("text_encoder", Some(&layout.clip_l), "clip_l"),
        ("text_encoder_2", Some(&layout.clip_g), "clip_g"),
        ("text_encoder_3", layout.t5.as_ref(), "t5xxl"),
    ] {
        let Some(c) = component else { continue };
        let encoder = load_component(c)?;
        written += encoder.len();
        save_folder_file(&encoder, &partial.join(folder), "model.safetensors")?;
        let config = c.config.clone().unwrap_or_else(|| support.join(folder).join("config.json"));
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

/// The VAE decoder of a single file (`first_stage_model.*`, LDM names) under
/// its diffusers names.
fn vae_from_single_file(vae: &ComponentFiles, file: &Path) -> Result<HashMap<String, Tensor>, EngineError> {
    let mut all = HashMap::new();
    for name in vae.files.names().filter(|n| n.starts_with("first_stage_model.")) {
        let dtype = vae.files.info(name).map_or(candle_core::DType::F32, |i| i.dtype);
        all.insert(name.to_owned(), vae.files.load(name, dtype, &Device::Cpu)?);
    }
    let up = all
        .keys()
        .filter_map(|k| k.strip_prefix("first_stage_model.decoder.up.")?.split('.').next()?.parse::<usize>().ok())
        .collect::<BTreeSet<_>>()
        .len();
    let mut out = HashMap::new();
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
        out.insert(name, tensor);
    }
    if out.is_empty() {
        return Err(EngineError::checkpoint(file, "no VAE decoder (first_stage_model.decoder.*)"));
    }
    Ok(out)
}
