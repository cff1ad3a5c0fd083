use serde::{Deserialize, Serialize};

use super::WeightSource;
use crate::EngineError;

/// Which published architecture a checkpoint follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Variant {
    /// SD3-medium: no QK-norm, no dual attention.
    Sd3Medium,
    /// SD3.5-medium: MMDiT-X (image-only second attention in the first
    /// blocks) and QK RMSNorm.
    Sd35Medium,
    /// SD3.5-large: QK RMSNorm in every block, the last block's context stream included.
    Sd35Large,
}

/// Sizes of an MM-DiT. Real models have `heads = depth` and
/// `hidden = 64·depth`; nothing here assumes it, so tiny test models are cheap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmDitConfig {
    pub variant: Variant,
    /// Joint blocks.
    pub depth: usize,
    /// Hidden width D.
    pub hidden: usize,
    pub heads: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the text-encoder sequence (4096 for T5-XXL-sized conditioning).
    pub joint_attention_dim: usize,
    /// Width of the pooled text embedding (2048 for CLIP-L ‖ CLIP-G).
    pub pooled_dim: usize,
    /// The position-embedding grid is this many patches a side.
    pub pos_embed_max_size: usize,
    /// RMSNorm on queries and keys.
    pub qk_norm: bool,
    /// Blocks with the MMDiT-X image-only second attention.
    pub dual_attention_layers: Vec<usize>,
}

/// Channels per head when a checkpoint does not say otherwise.
pub const DEFAULT_HEAD_DIM: usize = 64;

impl MmDitConfig {
    /// The config a diffusers `transformer/config.json` describes (the
    /// memory planner reads it where there are no weights to detect from).
    ///
    /// # Errors
    /// [`EngineError::Input`] naming a missing or malformed key.
    pub fn from_diffusers_json(json: &serde_json::Value) -> Result<MmDitConfig, EngineError> {
        let number = |key: &str| -> Result<usize, EngineError> {
            json.get(key)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| EngineError::Input(format!("transformer config: `{key}` is missing or not a number")))
        };
        let dual_attention_layers: Vec<usize> = json
            .get("dual_attention_layers")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_u64().map(|v| v as usize)).collect())
            .unwrap_or_default();
        let qk_norm = json.get("qk_norm").is_some_and(|v| v.as_str().is_some());
        let heads = number("num_attention_heads")?;
        Ok(MmDitConfig {
            variant: match (dual_attention_layers.is_empty(), qk_norm) {
                (false, _) => Variant::Sd35Medium,
                (true, true) => Variant::Sd35Large,
                (true, false) => Variant::Sd3Medium,
            },
            depth: number("num_layers")?,
            hidden: heads * number("attention_head_dim")?,
            heads,
            patch_size: number("patch_size")?,
            in_channels: number("in_channels")?,
            out_channels: number("out_channels")?,
            joint_attention_dim: number("joint_attention_dim")?,
            pooled_dim: number("pooled_projection_dim")?,
            pos_embed_max_size: number("pos_embed_max_size")?,
            qk_norm,
            dual_attention_layers,
        })
    }

    /// Every tensor of a model with this config, diffusers names and shapes:
    /// what loading asks for and `verify` checks.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let config = self;
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

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Reads the sizes off the weights (diffusers names): widths from the
    /// patch embedding, depth from the block count, QK-norm and dual attention
    /// from the keys present. Heads come from `heads` when the caller knows
    /// them (a config file), else from the QK-norm width, else D / 64.
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] if a tensor the detection needs is absent or odd.
    pub fn detect(weights: &dyn WeightSource, heads: Option<usize>) -> Result<MmDitConfig, EngineError> {
        let shape = |name: &str| weights.shape(name).ok_or_else(|| EngineError::MissingTensor { key: name.to_owned() });
        let odd = |reason: String| EngineError::Checkpoint { path: String::new(), reason };
        let proj = shape("pos_embed.proj.weight")?; // (D, C, p, p)
        if proj.len() != 4 || proj[2] != proj[3] {
            return Err(odd(format!("pos_embed.proj.weight has shape {proj:?}, expected (D, C, p, p)")));
        }
        let (hidden, in_channels, patch_size) = (proj[0], proj[1], proj[2]);
        let mut depth = 0;
        while weights.contains(&format!("transformer_blocks.{depth}.norm1.linear.weight")) {
            depth += 1;
        }
        if depth == 0 {
            return Err(odd("no transformer blocks found".into()));
        }
        let pos = shape("pos_embed.pos_embed")?; // (1, M·M, D)
        let cells = pos.get(1).copied().unwrap_or(0);
        let pos_embed_max_size = (cells as f64).sqrt().round() as usize;
        if pos_embed_max_size * pos_embed_max_size != cells {
            return Err(odd(format!("pos_embed.pos_embed has {cells} positions, not a square grid")));
        }
        let joint_attention_dim = shape("context_embedder.weight")?[1];
        let pooled_dim = shape("time_text_embed.text_embedder.linear_1.weight")?[1];
        let out = shape("proj_out.weight")?[0];
        let qk_norm = weights.contains("transformer_blocks.0.attn.norm_q.weight");
        let dual_attention_layers: Vec<usize> =
            (0..depth).filter(|i| weights.contains(&format!("transformer_blocks.{i}.attn2.to_q.weight"))).collect();
        let heads = match heads {
            Some(h) => h,
            None if qk_norm => hidden / shape("transformer_blocks.0.attn.norm_q.weight")?[0],
            None => hidden / DEFAULT_HEAD_DIM,
        };
        if heads == 0 || hidden % heads != 0 {
            return Err(odd(format!("hidden width {hidden} does not split into {heads} heads")));
        }
        let variant = if !dual_attention_layers.is_empty() {
            Variant::Sd35Medium
        } else if qk_norm {
            Variant::Sd35Large
        } else {
            Variant::Sd3Medium
        };
        Ok(MmDitConfig {
            variant,
            depth,
            hidden,
            heads,
            patch_size,
            in_channels,
            out_channels: out / (patch_size * patch_size),
            joint_attention_dim,
            pooled_dim,
            pos_embed_max_size,
            qk_norm,
            dual_attention_layers,
        })
    }
}
