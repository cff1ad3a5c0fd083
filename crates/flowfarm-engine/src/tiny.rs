//! Tiny random MM-DiTs, for tests and benches: a small config and random
//! weights for it. No weights can be downloaded on the farm's build
//! machines; written in the real checkpoint layouts (`checkpoint::write_*`)
//! these exercise every loading and forward path at a few hundred kilobytes.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

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
    for (name, shape) in config.weight_shapes() {
        let count: usize = shape.iter().product();
        let base = if name.contains("norm_q") || name.contains("norm_k") || name.contains("norm_added") { 1.0 } else { 0.0 };
        let values: Vec<f32> = (0..count).map(|_| base + 0.2 * normal()).collect();
        weights.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
    }
    Ok(weights)
}
