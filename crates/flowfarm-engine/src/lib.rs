//! flowfarm's inference engine, part 1: the MM-DiT transformer of SD3-class
//! models, its checkpoints, the rectified-flow Euler sampler and the seeded
//! initial noise.
//!
//! - [`mmdit`]: the transformer (SD3-medium, SD3.5-medium with MMDiT-X dual
//!   attention, SD3.5-large with QK RMSNorm), dtype-generic, `Send + Sync`,
//!   runnable block by block.
//! - [`checkpoint`]: the single-file (`model.diffusion_model.*`) and diffusers
//!   (`transformer/`, sharded or not) layouts, detected from the keys, memory-mapped.
//! - [`sampler`]: Euler flow matching with classifier-free guidance, each
//!   sample of a batch with its own sigmas (shift) and guidance.
//! - [`plan`]: the memory each device needs per mode, from the configs
//!   alone, and the fastest mode that fits.
//! - [`stages`]: the transformer's blocks split across devices, several
//!   renders in flight through them (block pipeline).
//! - [`noise`]: the initial latent from a portable seeded RNG on the CPU.
//! - [`tiny`]: random tiny models in both layouts, for tests and benchmarks.
//! - [`vae`]: the 16-channel VAE decoder (diffusers layout), latents to pixels.
//! - [`png_output`]: PNG bytes carrying the render parameters.
//! - [`source`]: where a model's parts are in each published form (diffusers
//!   folders sharded or with variants, single files with or without encoders,
//!   SD3.5-style separate encoder files); [`weights`] reads them, float8 included.
//! - [`verify`]: every part checked without loading it; [`identity`]: one hash
//!   of the weights, the same in every form.
//! - [`device`]: `cpu` / `cuda:N` and `f32` / `f16` / `bf16` as configs name them.
//!
//! The timestep-shift math lives in `flowfarm_core::shift`, so the coordinator
//! resolves the same sigmas the engine samples with.

pub mod cache;
pub mod checkpoint;
pub mod clip;
pub mod convert;
pub mod device;
mod error;
pub mod identity;
pub mod mmdit;
pub mod noise;
pub mod pipeline;
pub mod plan;
pub mod png_output;
pub mod sampler;
pub mod source;
pub mod stages;
pub mod t5;
pub mod tiny;
pub mod tokenize;
pub mod vae;
pub mod verify;
pub mod weights;

pub use checkpoint::{Checkpoint, Layout};
pub(crate) use error::read_json;
pub use error::EngineError;
pub use identity::WeightsIdentity;
pub use mmdit::{MmDit, MmDitConfig};
pub use source::ModelSource;
