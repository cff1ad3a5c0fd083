//! Tiny random MM-DiTs in the real checkpoint layouts, for tests and benches.
//! No weights can be downloaded on the farm's build machines; these exercise
//! every loading and forward path at a few hundred kilobytes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::checkpoint::{single_file_tensors, HEADS_METADATA_KEY};
use crate::mmdit::{MmDitConfig, Variant};
use crate::EngineError;

/// A 3-block model of `variant`: 2 heads of 16 channels, text width 48,
/// pooled width 40, a 24×24 position grid. Dual attention (SD3.5-medium) in
/// blocks 0 and 1.
pub fn tiny_config(variant: Variant) -> MmDitConfig {
    MmDitConfig {
        variant,
        depth: 3,
        hidden: 32,
        heads: 2,
        patch_size: 2,
        in_channels: 16,
        out_channels: 16,
        joint_attention_dim: 48,
        pooled_dim: 40,
        pos_embed_max_size: 24,
        qk_norm: variant != Variant::Sd3Medium,
        dual_attention_layers: if variant == Variant::Sd35Medium { vec![0, 1] } else { Vec::new() },
    }
}

/// Every tensor of a model with `config`, diffusers names and shapes.
pub fn weight_shapes(config: &MmDitConfig) -> Vec<(String, Vec<usize>)> {
    let d = config.hidden;
    let p = config.patch_size;
    let m = config.pos_embed_max_size;
    let hd = config.head_dim();
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let mut linear = |name: String, input: usize, output: usize| {
        out.push((format!("{name}.weight"), vec![output, input]));
        out.push((format!("{name}.bias"), vec![output]));
    };
    linear("time_text_embed.timestep_embedder.linear_1".into(), 256, d);
    linear("time_text_embed.timestep_embedder.linear_2".into(), d, d);
    linear("time_text_embed.text_embedder.linear_1".into(), config.pooled_dim, d);
    linear("time_text_embed.text_embedder.linear_2".into(), d, d);
    linear("context_embedder".into(), config.joint_attention_dim, d);
    linear("norm_out.linear".into(), d, 2 * d);
    linear("proj_out".into(), d, p * p * config.out_channels);
    for i in 0..config.depth {
        let b = format!("transformer_blocks.{i}");
        let last = i + 1 == config.depth;
        let dual = config.dual_attention_layers.contains(&i);
        linear(format!("{b}.norm1.linear"), d, if dual { 9 } else { 6 } * d);
        linear(format!("{b}.norm1_context.linear"), d, if last { 2 } else { 6 } * d);
        for proj in ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0"] {
            linear(format!("{b}.attn.{proj}"), d, d);
        }
        linear(format!("{b}.ff.net.0.proj"), d, 4 * d);
        linear(format!("{b}.ff.net.2"), 4 * d, d);
        if !last {
            linear(format!("{b}.attn.to_add_out"), d, d);
            linear(format!("{b}.ff_context.net.0.proj"), d, 4 * d);
            linear(format!("{b}.ff_context.net.2"), 4 * d, d);
        }
        if dual {
            for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
                linear(format!("{b}.attn2.{proj}"), d, d);
            }
        }
    }
    out.push(("pos_embed.proj.weight".into(), vec![d, config.in_channels, p, p]));
    out.push(("pos_embed.proj.bias".into(), vec![d]));
    out.push(("pos_embed.pos_embed".into(), vec![1, m * m, d]));
    if config.qk_norm {
        for i in 0..config.depth {
            let b = format!("transformer_blocks.{i}");
            for norm in ["attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k"] {
                out.push((format!("{b}.{norm}.weight"), vec![hd]));
            }
            if config.dual_attention_layers.contains(&i) {
                for norm in ["attn2.norm_q", "attn2.norm_k"] {
                    out.push((format!("{b}.{norm}.weight"), vec![hd]));
                }
            }
        }
    }
    out
}

/// Random F32 weights for `config` (normal, σ = 0.2; norm scales around 1),
/// the same for the same seed.
///
/// # Errors
/// Tensor errors only.
pub fn random_weights(config: &MmDitConfig, seed: u64) -> Result<HashMap<String, Tensor>, EngineError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut normal = move || {
        let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    };
    let mut weights = HashMap::new();
    for (name, shape) in weight_shapes(config) {
        let count: usize = shape.iter().product();
        let base = if name.contains("norm_q") || name.contains("norm_k") || name.contains("norm_added") { 1.0 } else { 0.0 };
        let values: Vec<f32> = (0..count).map(|_| base + 0.2 * normal()).collect();
        weights.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
    }
    Ok(weights)
}

fn save(tensors: &HashMap<String, Tensor>, metadata: Option<HashMap<String, String>>, path: &Path) -> Result<(), EngineError> {
    safetensors::serialize_to_file(tensors.iter(), metadata, path)
        .map_err(|e| EngineError::Checkpoint { path: path.display().to_string(), reason: e.to_string() })
}

/// Writes `weights` as a diffusers folder: `dir/transformer/` with the
/// safetensors file and a config.json. Returns `dir`.
///
/// # Errors
/// [`EngineError::Io`] or a serialisation error.
pub fn write_diffusers(config: &MmDitConfig, weights: &HashMap<String, Tensor>, dir: &Path) -> Result<PathBuf, EngineError> {
    let folder = dir.join("transformer");
    std::fs::create_dir_all(&folder).map_err(|source| EngineError::Io { path: folder.display().to_string(), source })?;
    save(weights, None, &folder.join("diffusion_pytorch_model.safetensors"))?;
    let json = serde_json::json!({
        "_class_name": "SD3Transformer2DModel",
        "attention_head_dim": config.head_dim(),
        "num_attention_heads": config.heads,
        "num_layers": config.depth,
        "patch_size": config.patch_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "joint_attention_dim": config.joint_attention_dim,
        "caption_projection_dim": config.hidden,
        "pooled_projection_dim": config.pooled_dim,
        "pos_embed_max_size": config.pos_embed_max_size,
        "qk_norm": if config.qk_norm { serde_json::json!("rms_norm") } else { serde_json::Value::Null },
        "dual_attention_layers": config.dual_attention_layers,
    });
    let path = folder.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap_or_default())
        .map_err(|source| EngineError::Io { path: path.display().to_string(), source })?;
    Ok(dir.to_owned())
}

/// Writes `weights` (diffusers names) as a Stability AI single file at `path`:
/// `model.diffusion_model.*`, fused qkv, swapped modulation halves; the head
/// count goes in the metadata.
///
/// # Errors
/// [`EngineError::Checkpoint`] for a weight with no single-file name, or a
/// serialisation error.
pub fn write_single_file(config: &MmDitConfig, weights: &HashMap<String, Tensor>, path: &Path) -> Result<(), EngineError> {
    let out = single_file_tensors(config, weights, path)?;
    let metadata = HashMap::from([(HEADS_METADATA_KEY.to_owned(), config.heads.to_string())]);
    save(&out, Some(metadata), path)
}
