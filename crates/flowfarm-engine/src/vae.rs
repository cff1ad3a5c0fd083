//! The 16-channel AutoEncoderKL decoder of SD3-class models: latents to pixels.
//!
//! The network is candle-transformers' `AutoEncoderKL` (checked against
//! diffusers in the tests); this module reads the diffusers `vae/` folder and
//! applies SD3's latent format: z = latent / scaling_factor + shift_factor.
//! The single-file `first_stage_model.*` layout and tiled decoding are not
//! read yet.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde::Deserialize;

use crate::EngineError;

/// SD3's latent scale and shift, used when a config does not give them.
pub const SD3_SCALING_FACTOR: f64 = 1.5305;
pub const SD3_SHIFT_FACTOR: f64 = 0.0609;

#[derive(Debug, Deserialize)]
struct DiffusersVaeConfig {
    block_out_channels: Vec<usize>,
    layers_per_block: usize,
    latent_channels: usize,
    norm_num_groups: usize,
    #[serde(default = "yes")]
    use_quant_conv: bool,
    #[serde(default = "yes")]
    use_post_quant_conv: bool,
    scaling_factor: Option<f64>,
    shift_factor: Option<f64>,
    #[serde(default = "three")]
    in_channels: usize,
    #[serde(default = "three")]
    out_channels: usize,
}

fn yes() -> bool {
    true
}

fn three() -> usize {
    3
}

/// A loaded VAE.
pub struct Vae {
    model: AutoEncoderKL,
    latent_channels: usize,
    /// Pixels per latent cell a side: 2^(blocks − 1), 8 for SD3.
    scale_factor: usize,
    scaling_factor: f64,
    shift_factor: f64,
    dtype: DType,
}

fn bad(path: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::Checkpoint { path: path.display().to_string(), reason: reason.into() }
}

impl Vae {
    /// Opens a diffusers VAE: a model folder with `vae/`, or the `vae/`
    /// folder itself (config.json + diffusion_pytorch_model.safetensors).
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] naming what is missing or malformed.
    pub fn open(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Vae, EngineError> {
        let path = path.as_ref();
        let dir: PathBuf = if path.join("vae").is_dir() { path.join("vae") } else { path.to_owned() };
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|source| EngineError::Io { path: config_path.display().to_string(), source })?;
        let config: DiffusersVaeConfig =
            serde_json::from_str(&text).map_err(|e| bad(&config_path, format!("not a VAE config: {e}")))?;
        let weights = dir.join("diffusion_pytorch_model.safetensors");
        if !weights.is_file() {
            return Err(bad(&dir, "no diffusion_pytorch_model.safetensors"));
        }
        // SAFETY: mapped read-only; flowfarm never writes a checkpoint it has open.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, device) }
            .map_err(|e| bad(&weights, e.to_string()))?;
        let scale_factor = 1usize << config.block_out_channels.len().saturating_sub(1);
        let kl = AutoEncoderKLConfig {
            block_out_channels: config.block_out_channels,
            layers_per_block: config.layers_per_block,
            latent_channels: config.latent_channels,
            norm_num_groups: config.norm_num_groups,
            use_quant_conv: config.use_quant_conv,
            use_post_quant_conv: config.use_post_quant_conv,
        };
        let model = AutoEncoderKL::new(vb, config.in_channels, config.out_channels, kl)
            .map_err(|e| bad(&weights, format!("weights do not fit the config: {e}")))?;
        Ok(Vae {
            model,
            latent_channels: config.latent_channels,
            scale_factor,
            scaling_factor: config.scaling_factor.unwrap_or(SD3_SCALING_FACTOR),
            shift_factor: config.shift_factor.unwrap_or(SD3_SHIFT_FACTOR),
            dtype,
        })
    }

    /// Pixels per latent cell a side (8 for SD3's VAE).
    pub fn scale_factor(&self) -> usize {
        self.scale_factor
    }

    pub fn latent_channels(&self) -> usize {
        self.latent_channels
    }

    /// Decodes sampler latents (B, 16, h, w) to images (B, 3, 8h, 8w) in
    /// about [-1, 1], F32.
    ///
    /// # Errors
    /// [`EngineError::Input`] for a latent of the wrong channel count.
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor, EngineError> {
        let (_, c, _, _) = latent.dims4()?;
        if c != self.latent_channels {
            return Err(EngineError::Input(format!("latent has {c} channels; this VAE takes {}", self.latent_channels)));
        }
        let z = ((latent.to_dtype(DType::F32)? / self.scaling_factor)? + self.shift_factor)?;
        Ok(self.model.decode(&z.to_dtype(self.dtype)?)?.to_dtype(DType::F32)?)
    }
}

/// One image (3, H, W) in [-1, 1] as interleaved RGB bytes, rounded as the
/// reference post-processing does: (x / 2 + 0.5) clamped to [0, 1], × 255, rounded.
///
/// # Errors
/// [`EngineError::Input`] for a tensor that is not (3, H, W).
pub fn to_rgb8(image: &Tensor) -> Result<(usize, usize, Vec<u8>), EngineError> {
    let (c, h, w) = image.dims3()?;
    if c != 3 {
        return Err(EngineError::Input(format!("image has {c} channels, expected 3")));
    }
    let pixels = ((image.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let hwc = pixels.permute((1, 2, 0))?.flatten_all()?.to_vec1::<f32>()?;
    Ok((w, h, hwc.iter().map(|v| (v * 255.0).round() as u8).collect()))
}
