//! diffusers' `Encoder` of `AutoencoderKL`: pixels to the latent
//! distribution, for img2img-style inputs and for training data (the
//! latents a model is trained on are its VAE's).
//!
//! conv_in; per level, resnets and (except at the last level) a stride-2
//! 3×3 convolution after padding one zero row and column at the bottom and
//! right (`Downsample2D` with `padding=0`); the mid block (resnet,
//! attention, resnet); GroupNorm, SiLU, conv_out to the mean and
//! log-variance side by side; an optional 1×1 `quant_conv`.

use candle_core::{Module, Tensor};
use candle_nn::{GroupNorm, VarBuilder};

use super::{conv, group_norm, Conv2d, Resnet, SpatialAttention, VaeConfig};

pub(super) struct Encoder {
    conv_in: Conv2d,
    down: Vec<(Vec<Resnet>, Option<Conv2d>)>,
    mid: (Resnet, SpatialAttention, Resnet),
    norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
}

impl Encoder {
    pub(super) fn load(vb: &VarBuilder, config: &VaeConfig) -> candle_core::Result<Self> {
        let groups = config.norm_num_groups;
        let channels = &config.block_out_channels;
        let top = *channels.last().ok_or_else(|| candle_core::Error::Msg("block_out_channels is empty".into()))?;
        let e = vb.pp("encoder");
        let mid = e.pp("mid_block");
        let moments = 2 * config.latent_channels;
        let mut down = Vec::new();
        let mut previous = channels[0];
        for (i, &out) in channels.iter().enumerate() {
            let block = e.pp(format!("down_blocks.{i}"));
            let resnets = (0..config.layers_per_block)
                .map(|j| Resnet::load(&block.pp(format!("resnets.{j}")), groups, if j == 0 { previous } else { out }, out))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let downsample = if i + 1 < channels.len() { Some(conv(&block, "downsamplers.0.conv", out, out, 3)?) } else { None };
            down.push((resnets, downsample));
            previous = out;
        }
        Ok(Encoder {
            conv_in: conv(&e, "conv_in", config.in_channels, channels[0], 3)?,
            down,
            mid: (
                Resnet::load(&mid.pp("resnets.0"), groups, top, top)?,
                SpatialAttention::load(&mid.pp("attentions.0"), groups, top)?,
                Resnet::load(&mid.pp("resnets.1"), groups, top, top)?,
            ),
            norm_out: group_norm(&e, "conv_norm_out", groups, top)?,
            conv_out: conv(&e, "conv_out", top, moments, 3)?,
            quant_conv: if config.use_quant_conv { Some(conv(vb, "quant_conv", moments, moments, 1)?) } else { None },
        })
    }

    /// Images (B, C, H, W), sides multiples of the VAE's scale factor →
    /// moments (B, 2·latent, H/f, W/f): the mean, then the log-variance.
    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for (resnets, downsample) in &self.down {
            for r in resnets {
                h = r.forward(&h)?;
            }
            if let Some(c) = downsample {
                h = c.forward_halving(&h)?;
            }
        }
        h = self.mid.0.forward(&h)?;
        h = self.mid.1.forward(&h)?;
        h = self.mid.2.forward(&h)?;
        let moments = self.conv_out.forward(&self.norm_out.forward(&h)?.silu()?)?;
        match &self.quant_conv {
            Some(c) => c.forward(&moments),
            None => Ok(moments),
        }
    }
}
