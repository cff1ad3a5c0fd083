//! Training an MM-DiT as "Scaling Rectified Flow Transformers" (Esser et
//! al., 2024) does, on flowfarm's own engine.
//!
//! - [`timesteps`]: where on [0, 1] the steps go: `uniform`,
//!   `logit-normal:m,s`, `mode:s`, `cosmap`, and the resolution shift.
//! - [`objective`]: z_t = (1 − t)·x₀ + t·ε and the velocity target ε − x₀.
//! - [`params`]: the weights as named variables, initialised from scratch or
//!   from a checkpoint, and seen by the engine as a weight source.
//! - [`optim`]: AdamW with decoupled weight decay, linear warm-up, clipping
//!   by global norm, and an exponential moving average of the weights.
//! - [`trainer`]: one step (sample t and ε, forward, loss, backward,
//!   update), and checkpoints that resume exactly.
//! - [`autoencoder`]: the VAE the model's latents come from, trained on
//!   the same images (reconstruction + KL), its latent format measured.
//! - [`evaluate`]: a model's renders of grammar captions, scored by the
//!   scenes' analytic detector.
//!
//! Invariant: the model trained is the engine's own [`MmDit`], built from
//! the variables at every step by the loader that serves it
//! ([`MmDit::load_trainable`]): what is trained is what renders, with no
//! second implementation to drift from it.
//!
//! [`MmDit`]: flowfarm_engine::MmDit
//! [`MmDit::load_trainable`]: flowfarm_engine::MmDit::load_trainable

pub mod autoencoder;
pub mod evaluate;
pub mod objective;
pub mod optim;
pub mod params;
pub mod timesteps;
pub mod trainer;

pub use timesteps::TimestepSampler;
pub use trainer::{Batch, Trainer, TrainerConfig};

/// What can go wrong training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Engine(#[from] flowfarm_engine::EngineError),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// A setting that cannot be used, naming it.
    #[error("{0}")]
    Invalid(String),
    /// A checkpoint or training state that does not fit this run.
    #[error("{path}: {reason}")]
    Checkpoint { path: String, reason: String },
}
