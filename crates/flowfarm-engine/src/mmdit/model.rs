//! The whole transformer: embeddings, joint blocks, output head.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use super::block::JointBlock;
use super::layers::{layer_norm, matmul, modulate, timestep_embedding, Linear, Loader, Mlp2, Modulation};
use super::{MmDitConfig, WeightSource};
use crate::EngineError;

/// An MM-DiT with its weights on one device, in one dtype. `Send + Sync`:
/// one model serves concurrent forwards.
///
/// It may hold only a contiguous range of the joint blocks (one stage of a
/// [`crate::stages::BlockPipeline`]); the embeddings and the output head,
/// small beside the blocks, are always loaded.
pub struct MmDit {
    config: MmDitConfig,
    dtype: DType,
    /// Patch embedding as a matrix: (D, C·p·p), and its bias (D).
    patch_weight: Tensor,
    patch_bias: Tensor,
    /// (M, M, D) position grid, cropped around its centre per image.
    pos_embed: Tensor,
    time_embed: Mlp2,
    pooled_embed: Mlp2,
    context_embedder: Linear,
    /// Blocks `first_block..first_block + blocks.len()`.
    blocks: Vec<JointBlock>,
    first_block: usize,
    norm_out: Modulation,
    proj_out: Linear,
}

/// The streams between blocks, so blocks can run one at a time (and, later,
/// on different devices).
#[derive(Debug, Clone)]
pub struct Embedded {
    /// (B, N, D) image tokens.
    pub x: Tensor,
    /// (B, L, D) text tokens.
    pub context: Tensor,
    /// (B, D) timestep + pooled-text conditioning.
    pub conditioning: Tensor,
    /// Latent height and width, to unpatchify.
    pub latent_hw: (usize, usize),
}

impl MmDit {
    /// Builds the model from `weights` named as diffusers names them.
    ///
    /// # Errors
    /// [`EngineError::MissingTensor`] or [`EngineError::ShapeMismatch`] naming the key.
    pub fn load(config: MmDitConfig, weights: &dyn WeightSource, dtype: DType, device: &Device) -> Result<Self, EngineError> {
        let all = 0..config.depth;
        Self::load_blocks(config, weights, dtype, device, all)
    }

    /// [`MmDit::load`] with only the joint blocks `blocks` (a stage of a
    /// block pipeline).
    ///
    /// # Errors
    /// As [`MmDit::load`]; [`EngineError::Input`] for an empty range or one
    /// past the last block.
    pub fn load_blocks(
        config: MmDitConfig,
        weights: &dyn WeightSource,
        dtype: DType,
        device: &Device,
        blocks: Range<usize>,
    ) -> Result<Self, EngineError> {
        Self::build(config, &Loader { weights, dtype, device, trainable: false }, blocks)
    }

    /// The whole model for training: every operation is a tensor op with a
    /// gradient (no fused CPU kernels), and every weight a view of, or an op
    /// on, the tensor `weights` gave, so the gradients of its output reach
    /// them. Rebuilt after each update: products whose weights are built
    /// from several tensors (q, k, v side by side) hold copies.
    ///
    /// # Errors
    /// As [`MmDit::load`].
    pub fn load_trainable(config: MmDitConfig, weights: &dyn WeightSource, dtype: DType, device: &Device) -> Result<Self, EngineError> {
        let all = 0..config.depth;
        Self::build(config, &Loader { weights, dtype, device, trainable: true }, all)
    }

    fn build(config: MmDitConfig, l: &Loader, blocks: Range<usize>) -> Result<Self, EngineError> {
        if blocks.is_empty() || blocks.end > config.depth {
            return Err(EngineError::Input(format!("blocks {blocks:?} of a {}-block model", config.depth)));
        }
        let dtype = l.dtype;
        let d = config.hidden;
        let (c, p, m) = (config.in_channels, config.patch_size, config.pos_embed_max_size);
        let patch_weight = l.tensor("pos_embed.proj.weight", &[d, c, p, p])?.reshape((d, c * p * p))?;
        let first_block = blocks.start;
        let blocks = blocks.map(|i| JointBlock::load(l, &config, i)).collect::<Result<_, _>>()?;
        Ok(MmDit {
            patch_bias: l.tensor("pos_embed.proj.bias", &[d])?,
            pos_embed: l.tensor("pos_embed.pos_embed", &[1, m * m, d])?.reshape((m, m, d))?,
            time_embed: Mlp2::load(l, "time_text_embed.timestep_embedder", 256, d)?,
            pooled_embed: Mlp2::load(l, "time_text_embed.text_embedder", config.pooled_dim, d)?,
            context_embedder: l.linear("context_embedder", config.joint_attention_dim, d)?,
            norm_out: Modulation::load(l, "norm_out", d, 2)?,
            proj_out: l.linear("proj_out", d, p * p * config.out_channels)?,
            patch_weight,
            blocks,
            first_block,
            config,
            dtype,
        })
    }

    pub fn config(&self) -> &MmDitConfig {
        &self.config
    }

    /// The device its weights are on.
    pub fn device(&self) -> &candle_core::Device {
        self.patch_weight.device()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The joint blocks it holds: `0..depth` unless it is a pipeline stage.
    pub fn blocks(&self) -> Range<usize> {
        self.first_block..self.first_block + self.blocks.len()
    }

    /// Predicted velocity for a batch.
    ///
    /// - `latents`: (B, C, H, W); H and W multiples of the patch size.
    /// - `timesteps`: (B,) in [0, 1000] (σ·1000), one per sample.
    /// - `context`: (B, L, joint_attention_dim) text embeddings.
    /// - `pooled`: (B, pooled_dim).
    /// - `skip_layers`: blocks to leave out (skip-layer guidance).
    ///
    /// Returns (B, C_out, H, W) in the model's dtype.
    ///
    /// # Errors
    /// [`EngineError::TooLarge`] past the position-embedding grid;
    /// [`EngineError::Input`] for mismatched shapes, or a model that holds
    /// only some blocks.
    pub fn forward(
        &self,
        latents: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
        skip_layers: &[usize],
    ) -> Result<Tensor, EngineError> {
        if self.blocks() != (0..self.config.depth) {
            return Err(EngineError::Input(format!(
                "this model holds blocks {:?} of {}: run it as a stage of a block pipeline",
                self.blocks(),
                self.config.depth
            )));
        }
        let mut state = self.embed(latents, timesteps, context, pooled)?;
        for index in self.blocks() {
            if !skip_layers.contains(&index) {
                state = self.run_block(index, state)?;
            }
        }
        self.unembed(&state)
    }

    /// Patchifies and embeds the inputs (see [`MmDit::forward`] for shapes).
    ///
    /// # Errors
    /// As [`MmDit::forward`].
    pub fn embed(&self, latents: &Tensor, timesteps: &Tensor, context: &Tensor, pooled: &Tensor) -> Result<Embedded, EngineError> {
        let cfg = &self.config;
        let (b, c, h, w) = latents.dims4()?;
        let p = cfg.patch_size;
        if c != cfg.in_channels || h % p != 0 || w % p != 0 || h == 0 || w == 0 {
            return Err(EngineError::Input(format!(
                "latents are {b}×{c}×{h}×{w}; this model takes {} channels and non-zero sides that are multiples of {p}",
                cfg.in_channels
            )));
        }
        let (hp, wp) = (h / p, w / p);
        let max = cfg.pos_embed_max_size;
        if hp > max || wp > max {
            return Err(EngineError::TooLarge { height: h, width: w, h_patches: hp, w_patches: wp, max, max_px: max * p * 8 });
        }
        for (what, t, dims) in [("timesteps", timesteps, 1), ("context", context, 3), ("pooled", pooled, 2)] {
            if t.rank() != dims || t.dim(0)? != b {
                return Err(EngineError::Input(format!("{what} has shape {:?}; expected batch {b} and rank {dims}", t.dims())));
            }
        }
        let latents = latents.to_dtype(self.dtype)?;
        // (B, C, H, W) → (B, hp, wp, C, p, p) → (B, N, C·p·p), the conv's weight order.
        let patches = latents.reshape((b, c, hp, p, wp, p))?.permute([0, 2, 4, 1, 3, 5])?.reshape((b, hp * wp, c * p * p))?;
        let x = matmul(&patches, &self.patch_weight.t()?)?.broadcast_add(&self.patch_bias)?;
        // Centre crop of the position grid.
        let (top, left) = ((max - hp) / 2, (max - wp) / 2);
        let pos = self.pos_embed.narrow(0, top, hp)?.narrow(1, left, wp)?.reshape((1, hp * wp, cfg.hidden))?;
        let x = x.broadcast_add(&pos)?;

        let t = self.time_embed.forward(&timestep_embedding(timesteps)?.to_dtype(self.dtype)?)?;
        let y = self.pooled_embed.forward(&pooled.to_dtype(self.dtype)?)?;
        let context = self.context_embedder.forward(&context.to_dtype(self.dtype)?)?;
        Ok(Embedded { x, context, conditioning: (t + y)?, latent_hw: (h, w) })
    }

    /// Runs joint block `index` on the streams.
    ///
    /// # Errors
    /// [`EngineError::Input`] for a block this model does not hold.
    pub fn run_block(&self, index: usize, state: Embedded) -> Result<Embedded, EngineError> {
        let block = index
            .checked_sub(self.first_block)
            .and_then(|i| self.blocks.get(i))
            .ok_or_else(|| EngineError::Input(format!("block {index}: this model holds blocks {:?}", self.blocks())))?;
        let (x, context) = block.forward(&state.x, &state.context, &state.conditioning)?;
        Ok(Embedded { x, context, ..state })
    }

    /// Final norm, projection and unpatchify: (B, N, D) → (B, C_out, H, W).
    ///
    /// # Errors
    /// Tensor errors only.
    pub fn unembed(&self, state: &Embedded) -> Result<Tensor, EngineError> {
        let cfg = &self.config;
        let (p, co) = (cfg.patch_size, cfg.out_channels);
        let (h, w) = state.latent_hw;
        let (hp, wp) = (h / p, w / p);
        let b = state.x.dim(0)?;
        let m = self.norm_out.forward(&state.conditioning)?; // scale, shift
        let x = self.proj_out.forward(&modulate(&layer_norm(&state.x)?, &m[1], &m[0])?)?;
        // (B, N, p·p·C) → (B, hp, wp, p, p, C) → (B, C, hp, p, wp, p) → (B, C, H, W)
        Ok(x.reshape((b, hp, wp, p, p, co))?.permute([0, 5, 1, 3, 2, 4])?.reshape((b, co, h, w))?)
    }
}

#[cfg(test)]
mod tests {
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn model_is_send_and_sync() {
        assert_send_sync::<super::MmDit>();
    }
}
