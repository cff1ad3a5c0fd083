//! One joint transformer block: image and text streams with their own
//! weights, one attention over both (DESIGN.md §5, paper Fig. 2).

use candle_core::Tensor;

use super::layers::{attention, layer_norm, modulate, FeedForward, Linear, Loader, Modulation, Qkv};
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
            Qkv::load(
                l,
                [&names[0], &names[1], &names[2]],
                config.qk_norm.then(|| [norms[0].as_str(), norms[1].as_str()]),
                d,
                heads,
            )
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
        let dual = if dual {
            Some((qkv("attn2.to_", "", "attn2.norm_")?, l.linear(&format!("{p}.attn2.to_out.0"), d, d)?))
        } else {
            None
        };
        Ok(JointBlock {
            heads,
            modulation: Modulation::load(l, &format!("{p}.norm1"), d, if dual.is_some() { 9 } else { 6 })?,
            qkv: image_qkv,
            out: l.linear(&format!("{p}.attn.to_out.0"), d, d)?,
            ff: FeedForward::load(l, &format!("{p}.ff"), d)?,
            context_qkv,
            context,
            dual,
        })
    }

    /// x: (B, N, D) image tokens, ctx: (B, L, D) text tokens, c: (B, D)
    /// conditioning → updated (x, ctx). The last block returns ctx unchanged.
    pub fn forward(&self, x: &Tensor, ctx: &Tensor, c: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
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
}
