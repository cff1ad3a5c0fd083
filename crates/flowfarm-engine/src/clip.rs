//! CLIP text encoders (CLIP-L and CLIP-G) as SD3 uses them: the penultimate
//! layer's hidden states and the projected pooled output.
//!
//! Written here rather than taken from candle-transformers, whose CLIP text
//! model has only the quick-GELU activation (CLIP-G uses exact GELU) and does
//! not expose the penultimate layer. Weights and config as transformers'
//! `CLIPTextModelWithProjection` saves them (a diffusers `text_encoder/` folder).
//!
//! Shapes: B prompts, S tokens (77), D width, P projection width.

use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::mmdit::kernels;
use crate::mmdit::layers::matmul;
use crate::source::{ComponentFiles, Part};
use crate::weights::{DryRun, FilesBackend};
use crate::EngineError;

#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    /// `quick_gelu` (CLIP-L) or `gelu` (CLIP-G).
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    pub projection_dim: usize,
    pub eos_token_id: u32,
}

fn default_eps() -> f64 {
    1e-5
}

struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn load(vb: &VarBuilder, name: &str, input: usize, output: usize, bias: bool) -> candle_core::Result<Self> {
        let vb = vb.pp(name);
        Ok(Linear { weight: vb.get((output, input), "weight")?, bias: if bias { Some(vb.get(output, "bias")?) } else { None } })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = matmul(x, &self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(vb: &VarBuilder, name: &str, width: usize, eps: f64) -> candle_core::Result<Self> {
        let vb = vb.pp(name);
        Ok(LayerNorm { weight: vb.get(width, "weight")?, bias: vb.get(width, "bias")?, eps })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let normed = kernels::layer_norm(&x.to_dtype(DType::F32)?, self.eps)?.to_dtype(dtype)?;
        normed.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

struct Layer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// A CLIP text encoder with its projection.
pub struct ClipTextEncoder {
    config: ClipConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    projection: Linear,
}

/// What SD3 takes from a CLIP encoder.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// (B, S, D): hidden states after the second-to-last layer, no final norm.
    pub penultimate: Tensor,
    /// (B, P): final-normed state at each prompt's first end token, projected.
    pub pooled: Tensor,
}

impl ClipTextEncoder {
    /// Opens a transformers/diffusers text-encoder folder (config.json +
    /// model.safetensors, or shards with an index).
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] for a missing or malformed config or weights.
    pub fn open(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self, EngineError> {
        Self::from_component(&ComponentFiles::folder(Part::ClipL, dir.as_ref(), "model")?, dtype, device, None)
    }

    /// The encoder of a resolved model (its transformers names under the
    /// component's prefix); with `dry`, checks and records what it would load.
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] for a missing or malformed config or weights.
    pub fn from_component(c: &ComponentFiles, dtype: DType, device: &Device, dry: Option<Arc<Mutex<DryRun>>>) -> Result<Self, EngineError> {
        let config_path = c.config.as_deref().ok_or_else(|| EngineError::Input(format!("{} has no config", c.part.as_str())))?;
        let config: ClipConfig = crate::read_json(config_path, "a CLIP config")?;
        if config.num_hidden_layers < 2 || config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads)
        {
            return Err(EngineError::checkpoint(config_path, "needs at least 2 layers and a width divisible by the head count"));
        }
        if !matches!(config.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(EngineError::checkpoint(config_path, format!("activation `{}` is not quick_gelu or gelu", config.hidden_act)));
        }
        let backend = FilesBackend::new(c.files.clone(), &c.prefix);
        let backend = match dry {
            Some(dry) => backend.dry(dry),
            None => backend,
        };
        let weights = c.files.paths().first().cloned().unwrap_or_default();
        Self::load(config, &backend.into_var_builder(dtype, device)).map_err(|e| EngineError::checkpoint(&weights, e.to_string()))
    }

    fn load(config: ClipConfig, vb: &VarBuilder) -> candle_core::Result<Self> {
        let (d, i, eps) = (config.hidden_size, config.intermediate_size, config.layer_norm_eps);
        let t = vb.pp("text_model");
        let layers = (0..config.num_hidden_layers)
            .map(|n| {
                let l = t.pp(format!("encoder.layers.{n}"));
                Ok(Layer {
                    norm1: LayerNorm::load(&l, "layer_norm1", d, eps)?,
                    q: Linear::load(&l, "self_attn.q_proj", d, d, true)?,
                    k: Linear::load(&l, "self_attn.k_proj", d, d, true)?,
                    v: Linear::load(&l, "self_attn.v_proj", d, d, true)?,
                    out: Linear::load(&l, "self_attn.out_proj", d, d, true)?,
                    norm2: LayerNorm::load(&l, "layer_norm2", d, eps)?,
                    fc1: Linear::load(&l, "mlp.fc1", d, i, true)?,
                    fc2: Linear::load(&l, "mlp.fc2", i, d, true)?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(ClipTextEncoder {
            token_embedding: t.get((config.vocab_size, d), "embeddings.token_embedding.weight")?,
            position_embedding: t.get((config.max_position_embeddings, d), "embeddings.position_embedding.weight")?,
            final_norm: LayerNorm::load(&t, "final_layer_norm", d, eps)?,
            projection: Linear::load(vb, "text_projection", d, config.projection_dim, false)?,
            layers,
            config,
        })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    fn activation(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.config.hidden_act == "gelu" {
            x.gelu_erf()
        } else {
            x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
        }
    }

    /// Encodes token ids (B, S) (u32 or i64).
    ///
    /// # Errors
    /// [`EngineError::Input`] for sequences longer than the position table or
    /// without an end token.
    pub fn encode(&self, ids: &Tensor) -> Result<ClipOutput, EngineError> {
        let (b, s) = ids.dims2()?;
        if s > self.config.max_position_embeddings {
            return Err(EngineError::Input(format!("{s} tokens, more than this encoder's {}", self.config.max_position_embeddings)));
        }
        let ids_u32 = ids.to_dtype(DType::U32)?;
        let rows = ids_u32.to_vec2::<u32>()?;
        let eos: Vec<usize> = rows
            .iter()
            .enumerate()
            .map(|(n, row)| {
                row.iter()
                    .position(|&t| t == self.config.eos_token_id)
                    .ok_or_else(|| EngineError::Input(format!("prompt {n} has no end token ({})", self.config.eos_token_id)))
            })
            .collect::<Result<_, _>>()?;

        let heads = self.config.num_attention_heads;
        let d = self.config.hidden_size;
        let hd = d / heads;
        let tokens = self.token_embedding.index_select(&ids_u32.flatten_all()?, 0)?.reshape((b, s, d))?;
        let mut x = tokens.broadcast_add(&self.position_embedding.narrow(0, 0, s)?)?;
        let mask: Vec<f32> = (0..s).flat_map(|i| (0..s).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (1, 1, s, s), x.device())?;

        let mut penultimate = None;
        for (n, layer) in self.layers.iter().enumerate() {
            if n + 1 == self.layers.len() {
                penultimate = Some(x.clone());
            }
            let h = layer.norm1.forward(&x)?;
            let split = |t: Tensor| t.reshape((b, s, heads, hd))?.transpose(1, 2)?.contiguous();
            let q = split((layer.q.forward(&h)? * (1.0 / (hd as f64).sqrt()))?)?;
            let k = split(layer.k.forward(&h)?)?;
            let v = split(layer.v.forward(&h)?)?;
            let scores = matmul(&q, &k.t()?)?.to_dtype(DType::F32)?.broadcast_add(&mask)?;
            let probs = kernels::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
            let attn = matmul(&probs, &v)?.transpose(1, 2)?.reshape((b, s, d))?;
            x = (x + layer.out.forward(&attn)?)?;
            let h = layer.norm2.forward(&x)?;
            x = (&x + layer.fc2.forward(&self.activation(&layer.fc1.forward(&h)?)?)?)?;
        }
        let last = self.final_norm.forward(&x)?;
        let pooled: Vec<Tensor> =
            eos.iter().enumerate().map(|(n, &e)| last.narrow(0, n, 1)?.narrow(1, e, 1)?.squeeze(1)).collect::<candle_core::Result<_>>()?;
        let pooled = self.projection.forward(&Tensor::cat(&pooled, 0)?)?;
        Ok(ClipOutput { penultimate: penultimate.unwrap_or(x), pooled: pooled.to_dtype(DType::F32)? })
    }
}
