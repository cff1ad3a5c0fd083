//! One joint transformer block: image and text streams with their own
//! weights, one attention over both (the paper's Fig. 2).

use candle_core::{DType, Device, Tensor};

use super::cpu::{self, F32View};
use super::layers::{attention, layer_norm, modulate, FeedForward, Linear, Loader, Modulation, Qkv, NORM_EPS};
use super::MmDitConfig;
use crate::EngineError;

/// The text stream of a block. The last block only feeds the image stream
/// (context_pre_only): its text stream is normalised and projected, never updated.
enum ContextStream {
    Full { modulation: Modulation, out: Linear, ff: FeedForward },
    PreOnly { modulation: Modulation },
}

pub struct JointBlock {
    heads: usize,
    modulation: Modulation,
    qkv: Qkv,
    out: Linear,
    ff: FeedForward,
    context_qkv: Qkv,
    context: ContextStream,
    /// MMDiT-X: a second, image-only attention.
    dual: Option<(Qkv, Linear)>,
    /// Whether F32 on the CPU runs the fused kernels (not when training).
    fused: bool,
}

impl JointBlock {
    pub fn load(l: &Loader, config: &MmDitConfig, index: usize) -> Result<Self, EngineError> {
        let p = format!("transformer_blocks.{index}");
        let d = config.hidden;
        let heads = config.heads;
        let last = index + 1 == config.depth;
        let dual = config.dual_attention_layers.contains(&index);
        // q, k, v projections named `{stem}{q,k,v}{suffix}` and, with QK-norm, norms `{norm}{q,k}`.
        let qkv = |stem: &str, suffix: &str, norm: &str| {
            let names = ["q", "k", "v"].map(|x| format!("{p}.{stem}{x}{suffix}"));
            let norms = ["q", "k"].map(|x| format!("{p}.{norm}{x}"));
            Qkv::load(l, [&names[0], &names[1], &names[2]], config.qk_norm.then(|| [norms[0].as_str(), norms[1].as_str()]), d, heads)
        };
        let image_qkv = qkv("attn.to_", "", "attn.norm_")?;
        let context_qkv = qkv("attn.add_", "_proj", "attn.norm_added_")?;
        let context = if last {
            ContextStream::PreOnly { modulation: Modulation::load(l, &format!("{p}.norm1_context"), d, 2)? }
        } else {
            ContextStream::Full {
                modulation: Modulation::load(l, &format!("{p}.norm1_context"), d, 6)?,
                out: l.linear(&format!("{p}.attn.to_add_out"), d, d)?,
                ff: FeedForward::load(l, &format!("{p}.ff_context"), d)?,
            }
        };
        let dual = if dual { Some((qkv("attn2.to_", "", "attn2.norm_")?, l.linear(&format!("{p}.attn2.to_out.0"), d, d)?)) } else { None };
        Ok(JointBlock {
            heads,
            modulation: Modulation::load(l, &format!("{p}.norm1"), d, if dual.is_some() { 9 } else { 6 })?,
            qkv: image_qkv,
            out: l.linear(&format!("{p}.attn.to_out.0"), d, d)?,
            ff: FeedForward::load(l, &format!("{p}.ff"), d)?,
            context_qkv,
            context,
            dual,
            fused: !l.trainable,
        })
    }

    /// x: (B, N, D) image tokens, ctx: (B, L, D) text tokens, c: (B, D)
    /// conditioning → updated (x, ctx). The last block returns ctx unchanged.
    ///
    /// F32 on the CPU runs the fused kernels of `cpu.rs`, everything else the
    /// composed tensor ops; both compute the same thing.
    pub fn forward(&self, x: &Tensor, ctx: &Tensor, c: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        if self.fused && x.device().is_cpu() && x.dtype() == DType::F32 {
            self.forward_fused(x, ctx, c)
        } else {
            self.forward_composed(x, ctx, c)
        }
    }

    fn forward_composed(&self, x: &Tensor, ctx: &Tensor, c: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let m = self.modulation.forward(c)?;
        // m: shift, scale, gate (attention); shift, scale, gate (MLP); [shift, scale, gate (attn2)]
        let x_norm = layer_norm(x)?;
        let x_in = modulate(&x_norm, &m[0], &m[1])?;
        let (ctx_in, ctx_mod) = match &self.context {
            ContextStream::Full { modulation, .. } => {
                let cm = modulation.forward(c)?;
                (modulate(&layer_norm(ctx)?, &cm[0], &cm[1])?, Some(cm))
            }
            ContextStream::PreOnly { modulation } => {
                // AdaLayerNormContinuous: scale first, then shift.
                let cm = modulation.forward(c)?;
                (modulate(&layer_norm(ctx)?, &cm[1], &cm[0])?, None)
            }
        };

        // Joint attention over [image; text].
        let n = x.dim(1)?;
        let (q, k, v) = self.qkv.forward(&x_in)?;
        let (cq, ck, cv) = self.context_qkv.forward(&ctx_in)?;
        let joint = attention(&Tensor::cat(&[&q, &cq], 1)?, &Tensor::cat(&[&k, &ck], 1)?, &Tensor::cat(&[&v, &cv], 1)?, self.heads)?;
        let x_attn = joint.narrow(1, 0, n)?;
        let ctx_attn = joint.narrow(1, n, joint.dim(1)? - n)?;

        let gate = |g: &Tensor, t: &Tensor| t.broadcast_mul(&g.unsqueeze(1)?);
        let mut x = (x + gate(&m[2], &self.out.forward(&x_attn)?)?)?;
        if let Some((qkv2, out2)) = &self.dual {
            let x_in2 = modulate(&x_norm, &m[6], &m[7])?;
            let (q2, k2, v2) = qkv2.forward(&x_in2)?;
            x = (x + gate(&m[8], &out2.forward(&attention(&q2, &k2, &v2, self.heads)?)?)?)?;
        }
        let x = (&x + gate(&m[5], &self.ff.forward(&modulate(&layer_norm(&x)?, &m[3], &m[4])?)?)?)?;

        let ctx = match (&self.context, ctx_mod) {
            (ContextStream::Full { out, ff, .. }, Some(cm)) => {
                let ctx = (ctx + gate(&cm[2], &out.forward(&ctx_attn)?)?)?;
                (&ctx + gate(&cm[5], &ff.forward(&modulate(&layer_norm(&ctx)?, &cm[3], &cm[4])?)?)?)?
            }
            _ => ctx.clone(),
        };
        Ok((x, ctx))
    }

    /// [`JointBlock::forward`] on CPU F32 data: the same steps, fused.
    fn forward_fused(&self, x: &Tensor, ctx: &Tensor, c: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (batch, n, d) = x.dims3()?;
        let l = ctx.dim(1)?;
        let (x, ctx) = (x.contiguous()?, ctx.contiguous()?);
        let cm = match &self.context {
            ContextStream::Full { modulation, .. } | ContextStream::PreOnly { modulation } => modulation.flat(c)?,
        };
        let m = self.modulation.flat(c)?;
        let (xv, cv, mv, cmv) = (F32View::of(&x)?, F32View::of(&ctx)?, F32View::of(&m)?, F32View::of(&cm)?);
        let part = |all, p| modulation_part(all, batch, d, p);
        let eps = NORM_EPS as f32;
        let x_in = cpu::layer_norm_modulate(&xv, d, n, &part(&mv, 0), &part(&mv, 1), eps);
        let ctx_in = match &self.context {
            ContextStream::Full { .. } => cpu::layer_norm_modulate(&cv, d, l, &part(&cmv, 0), &part(&cmv, 1), eps),
            // AdaLayerNormContinuous: scale first, then shift.
            ContextStream::PreOnly { .. } => cpu::layer_norm_modulate(&cv, d, l, &part(&cmv, 1), &part(&cmv, 0), eps),
        };

        // Joint attention over [image; text].
        let joint = {
            let (x_qkv, ctx_qkv) = (self.qkv.product_fused(&x_in, batch, n)?, self.context_qkv.product_fused(&ctx_in, batch, l)?);
            let (x_views, ctx_views) = (self.qkv.views()?, self.context_qkv.views()?);
            let streams = [x_views.stream(&x_qkv, n), ctx_views.stream(&ctx_qkv, l)];
            cpu::attention(&cpu::split_heads(&streams, batch, d, self.heads, eps))
        }; // (B, N + L, D)
        let seq = n + l;

        let mut x_out = xv.to_vec();
        self.out.add_gated_fused(&mut x_out, &joint, batch, n, seq * d, &part(&mv, 2))?;
        if let Some((qkv2, out2)) = &self.dual {
            let x_in2 = cpu::layer_norm_modulate(&xv, d, n, &part(&mv, 6), &part(&mv, 7), eps);
            let products = qkv2.product_fused(&x_in2, batch, n)?;
            let views = qkv2.views()?;
            let attn = cpu::attention(&cpu::split_heads(&[views.stream(&products, n)], batch, d, self.heads, eps));
            out2.add_gated_fused(&mut x_out, &attn, batch, n, n * d, &part(&mv, 8))?;
        }
        let h = cpu::layer_norm_modulate(&x_out, d, n, &part(&mv, 3), &part(&mv, 4), eps);
        self.ff.add_gated_fused(&mut x_out, &h, batch, n, &part(&mv, 5))?;
        let x_out = Tensor::from_vec(x_out, (batch, n, d), &Device::Cpu)?;

        let ctx_out = match &self.context {
            ContextStream::Full { out, ff, .. } => {
                let mut ctx_out = cv.to_vec();
                out.add_gated_fused(&mut ctx_out, &joint[n * d..], batch, l, seq * d, &part(&cmv, 2))?;
                let h = cpu::layer_norm_modulate(&ctx_out, d, l, &part(&cmv, 3), &part(&cmv, 4), eps);
                ff.add_gated_fused(&mut ctx_out, &h, batch, l, &part(&cmv, 5))?;
                Tensor::from_vec(ctx_out, (batch, l, d), &Device::Cpu)?
            }
            ContextStream::PreOnly { .. } => ctx.clone(),
        };
        Ok((x_out, ctx_out))
    }
}

/// Modulation vector `p` of every sample, from (B, parts·D) side by side.
fn modulation_part(all: &[f32], batch: usize, d: usize, p: usize) -> Vec<&[f32]> {
    let parts = all.len() / (batch * d).max(1);
    (0..batch).map(|b| &all[(b * parts + p) * d..(b * parts + p + 1) * d]).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};

    use super::JointBlock;
    use crate::mmdit::layers::Loader;
    use crate::mmdit::{MmDitConfig, Variant, WeightSource};
    use crate::tiny::{random_weights, tiny_config};
    use crate::EngineError;

    struct Weights(HashMap<String, Tensor>);

    impl WeightSource for Weights {
        fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor, EngineError> {
            let t = self.0.get(name).ok_or_else(|| EngineError::MissingTensor { key: name.to_string() })?;
            assert_eq!(t.dims(), shape, "{name}");
            Ok(t.to_dtype(dtype)?.to_device(device)?)
        }
        fn contains(&self, name: &str) -> bool {
            self.0.contains_key(name)
        }
        fn shape(&self, name: &str) -> Option<Vec<usize>> {
            self.0.get(name).map(|t| t.dims().to_vec())
        }
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// The fused CPU kernels against the composed tensor ops (which the GPU
    /// runs) on every kind of block: plain, QK-norm, MMDiT-X dual attention
    /// and the last block's pre-only text stream. On the CPU both forms share
    /// `Linear::forward`'s fused product, so this holds the rest together
    /// (attention, norms, modulation order, gates); the composed linears are
    /// checked by the CUDA parity run. 150 + 33 joint tokens make
    /// two query blocks of 128, the second partial.
    #[test]
    fn fused_and_composed_blocks_agree() {
        for variant in [Variant::Sd3Medium, Variant::Sd35Large, Variant::Sd35Medium] {
            let config = MmDitConfig { hidden: 64, heads: 4, ..tiny_config(variant) };
            let weights = Weights(random_weights(&config, 7).unwrap());
            let loader = Loader { weights: &weights, dtype: DType::F32, device: &Device::Cpu, trainable: false };
            let x = Tensor::randn(0f32, 1.0, (3, 150, 64), &Device::Cpu).unwrap();
            let ctx = Tensor::randn(0f32, 1.0, (3, 33, 64), &Device::Cpu).unwrap();
            let c = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu).unwrap();
            for index in 0..config.depth {
                let block = JointBlock::load(&loader, &config, index).unwrap();
                let (fx, fc) = block.forward_fused(&x, &ctx, &c).unwrap();
                let (cx, cc) = block.forward_composed(&x, &ctx, &c).unwrap();
                for (name, fused, composed) in [("image", &fx, &cx), ("text", &fc, &cc)] {
                    let rel = max_abs(&(fused - composed).unwrap()) / max_abs(composed);
                    assert!(rel <= 1e-5, "{variant:?} block {index} {name} stream: relative difference {rel:.2e}");
                }
                // A sample's result does not depend on what shares its batch.
                let one = |t: &Tensor| t.narrow(0, 1, 1).unwrap();
                let (alone, _) = block.forward_fused(&one(&x), &one(&ctx), &one(&c)).unwrap();
                assert_eq!(max_abs(&(alone - one(&fx)).unwrap()), 0.0, "{variant:?} block {index}: batch-mates changed a sample");
            }
        }
    }
}
