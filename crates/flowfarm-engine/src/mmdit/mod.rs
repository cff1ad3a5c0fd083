//! The MM-DiT of "Scaling Rectified Flow Transformers for High-Resolution
//! Image Synthesis" (Esser et al. 2024), as SD3-class checkpoints carry it.
//! Weights are named as in diffusers' `SD3Transformer2DModel`;
//! [`crate::checkpoint`] maps other layouts onto these names.
//!
//! Shapes: B batch, C latent channels, H×W latent size, p patch size,
//! N = (H/p)·(W/p) image tokens, L text tokens, D hidden width.

mod block;
mod config;
mod cpu;
pub(crate) mod kernels;
pub(crate) mod layers;
mod model;

pub use config::{MmDitConfig, Variant};
pub use model::{Embedded, MmDit};

/// Where a model gets its weights: a name (diffusers naming) and the shape the
/// model expects.
pub trait WeightSource {
    /// The tensor, converted to `dtype` on `device`.
    ///
    /// # Errors
    /// [`crate::EngineError::MissingTensor`] or [`crate::EngineError::ShapeMismatch`]
    /// naming the key.
    fn tensor(
        &self,
        name: &str,
        shape: &[usize],
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> Result<candle_core::Tensor, crate::EngineError>;

    /// Whether the checkpoint has this tensor.
    fn contains(&self, name: &str) -> bool;

    /// Its shape, if present.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
}
