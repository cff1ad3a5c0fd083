//! A small AutoencoderKL of the engine's VAE architecture trained on images,
//! so that a model trained on its latents decodes to real pixels: an L1
//! reconstruction of a sample of the latent distribution plus a weighted KL
//! divergence to N(0, 1), as AutoencoderKL is trained (without its
//! perceptual and adversarial terms, which flat procedural scenes do not
//! need). The latent format (shift and scale) is measured on the data.
//!
//! Invariant: the autoencoder trained is the engine's own [`Vae`] built
//! over the variables ([`Vae::autoencoder`]), and the folder it saves is
//! read back by [`Vae::open`] and [`Vae::open_autoencoder`] as it trained.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use flowfarm_engine::noise::initial_latent;
use flowfarm_engine::vae::{Vae, VaeConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::optim::{clip_grad_norm, warmup_lr, AdamW, AdamWSettings};
use crate::TrainError;

/// How the autoencoder trains.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoencoderSettings {
    pub lr: f64,
    pub warmup_steps: u64,
    pub max_grad_norm: f64,
    /// Weight of the KL term (LDM's autoencoders use 1e-6; small latents
    /// of simple images take more to stay near N(0, 1)).
    pub kl_weight: f64,
    /// Keys the initial weights and each step's latent sample.
    pub seed: u64,
}

impl Default for AutoencoderSettings {
    fn default() -> Self {
        AutoencoderSettings { lr: 1e-3, warmup_steps: 20, max_grad_norm: 1.0, kl_weight: 1e-4, seed: 0 }
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoencoderReport {
    pub step: u64,
    pub loss: f32,
    /// Mean absolute error of the reconstruction, images in [-1, 1].
    pub reconstruction: f32,
    /// Mean per latent value.
    pub kl: f32,
}

pub struct AutoencoderTrainer {
    config: VaeConfig,
    settings: AutoencoderSettings,
    vars: BTreeMap<String, Var>,
    vae: Vae,
    adam: AdamW,
    step: u64,
}

impl AutoencoderTrainer {
    /// A fresh autoencoder of `config`: PyTorch's default initialisation
    /// (uniform in ±1/√fan-in for products), unit GroupNorm scales, zero biases.
    ///
    /// # Errors
    /// [`TrainError::Engine`] for a config the engine cannot build.
    pub fn new(config: VaeConfig, settings: AutoencoderSettings, device: &Device) -> Result<AutoencoderTrainer, TrainError> {
        if !(settings.lr.is_finite() && settings.lr > 0.0) {
            return Err(TrainError::Invalid(format!("lr: {} must be a positive number", settings.lr)));
        }
        // Building once over an empty VarMap names every tensor and its shape.
        let discovery = VarMap::new();
        Vae::autoencoder(config.clone(), VarBuilder::from_varmap(&discovery, DType::F32, device), DType::F32)?;
        let mut shapes: Vec<(String, Vec<usize>)> = {
            let data = discovery.data().lock().map_err(|_| TrainError::Invalid("variables poisoned".into()))?;
            data.iter().map(|(name, var)| (name.clone(), var.dims().to_vec())).collect()
        };
        shapes.sort();
        let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
        let mut vars = BTreeMap::new();
        for (name, shape) in shapes {
            let count: usize = shape.iter().product();
            let norm = name.contains("norm");
            let values: Vec<f32> = if shape.len() == 1 {
                vec![if norm && name.ends_with(".weight") { 1.0 } else { 0.0 }; count]
            } else {
                let bound = 1.0 / ((count / shape[0].max(1)) as f64).sqrt();
                (0..count).map(|_| rng.gen_range(-bound..bound) as f32).collect()
            };
            vars.insert(name, Var::from_tensor(&Tensor::from_vec(values, shape, device)?)?);
        }
        let vae = Self::build(&config, &vars, device)?;
        Ok(AutoencoderTrainer {
            config,
            settings,
            vars,
            vae,
            adam: AdamW::new(AdamWSettings { weight_decay: 0.0, ..AdamWSettings::default() }),
            step: 0,
        })
    }

    /// The engine's autoencoder over the variables (it holds views of them,
    /// so it follows their updates).
    fn build(config: &VaeConfig, vars: &BTreeMap<String, Var>, device: &Device) -> Result<Vae, TrainError> {
        let tensors: HashMap<String, Tensor> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        Ok(Vae::autoencoder(config.clone(), VarBuilder::from_tensors(tensors, DType::F32, device), DType::F32)?)
    }

    pub fn vae(&self) -> &Vae {
        &self.vae
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One step on `images` (B, 3, H, W) in [-1, 1].
    ///
    /// # Errors
    /// The engine's errors for images it cannot encode; tensor errors.
    pub fn train_step(&mut self, images: &Tensor) -> Result<AutoencoderReport, TrainError> {
        let (mean, logvar) = self.vae.encode_distribution(images)?;
        let mut rng = ChaCha8Rng::seed_from_u64(self.settings.seed);
        rng.set_stream(self.step + 1);
        let noise = initial_latent(rng.gen(), mean.dims(), mean.device())?;
        let z = (&mean + (logvar.affine(0.5, 0.0)?.exp()? * noise)?)?;
        let reconstruction = (self.vae.decode_raw(&z)? - images)?.abs()?.mean_all()?;
        let kl = ((mean.sqr()? + logvar.exp()?)? - logvar)?.affine(0.5, -0.5)?.mean_all()?;
        let loss = (&reconstruction + (&kl * self.settings.kl_weight)?)?;
        let mut grads = loss.backward()?;
        clip_grad_norm(&self.vars, &mut grads, self.settings.max_grad_norm)?;
        let lr = warmup_lr(self.settings.lr, self.settings.warmup_steps, self.step);
        self.adam.step(&self.vars, &grads, lr)?;
        self.step += 1;
        Ok(AutoencoderReport { step: self.step, loss: loss.to_scalar()?, reconstruction: reconstruction.to_scalar()?, kl: kl.to_scalar()? })
    }

    /// The latent format measured on `images`: shift = the mean of the
    /// distribution's means, scale = 1 / their standard deviation, so the
    /// sampler's latents have zero mean and unit variance.
    ///
    /// # Errors
    /// As [`AutoencoderTrainer::train_step`].
    pub fn latent_format(&self, images: &Tensor) -> Result<(f64, f64), TrainError> {
        let (mean, _) = self.vae.encode_distribution(images)?;
        let values = mean.detach().flatten_all()?.to_vec1::<f32>()?;
        let n = values.len().max(1) as f64;
        let shift = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let variance = values.iter().map(|&v| (f64::from(v) - shift).powi(2)).sum::<f64>() / n;
        Ok((shift, 1.0 / variance.sqrt().max(1e-6)))
    }

    /// Writes `dir/vae` as diffusers writes an AutoencoderKL: `config.json`
    /// (with `shift` and `scale` as the latent format) and the weights.
    ///
    /// # Errors
    /// [`TrainError::Io`] and tensor errors.
    pub fn save(&self, dir: &Path, shift: f64, scale: f64) -> Result<(), TrainError> {
        let folder = dir.join("vae");
        std::fs::create_dir_all(&folder).map_err(|source| TrainError::Io { path: folder.display().to_string(), source })?;
        let config = VaeConfig { shift_factor: Some(shift), scaling_factor: Some(scale), ..self.config.clone() };
        let json = serde_json::to_string_pretty(&config.to_diffusers_json()).map_err(|e| TrainError::Invalid(e.to_string()))?;
        let path = folder.join("config.json");
        std::fs::write(&path, json).map_err(|source| TrainError::Io { path: path.display().to_string(), source })?;
        let tensors: HashMap<String, Tensor> = self.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        candle_core::safetensors::save(&tensors, folder.join("diffusion_pytorch_model.safetensors"))?;
        Ok(())
    }
}

/// A small autoencoder of the engine's VAE architecture for `flowfarm
/// train`: SD3's 16 latent channels, `block_out_channels` per level (n
/// levels make latents 2^(n−1) times smaller), one resnet per level, 8
/// GroupNorm groups, no quant convolutions; `sample_size` pixels a tile.
pub fn small_config(block_out_channels: Vec<usize>, sample_size: usize) -> VaeConfig {
    VaeConfig {
        block_out_channels,
        layers_per_block: 1,
        latent_channels: 16,
        norm_num_groups: 8,
        use_post_quant_conv: false,
        use_quant_conv: false,
        in_channels: 3,
        scaling_factor: None,
        shift_factor: None,
        sample_size,
        out_channels: 3,
    }
}

/// RGB8 images (width × height × 3 bytes each) as a (B, 3, H, W) batch in [-1, 1].
///
/// # Errors
/// [`TrainError::Invalid`] for an image of another size.
pub fn image_batch(images: &[&[u8]], width: usize, height: usize, device: &Device) -> Result<Tensor, TrainError> {
    let mut values = Vec::with_capacity(images.len() * width * height * 3);
    for (i, rgb) in images.iter().enumerate() {
        if rgb.len() != width * height * 3 {
            return Err(TrainError::Invalid(format!("image {i} has {} bytes, not {width}×{height}×3", rgb.len())));
        }
        values.extend(rgb.iter().map(|&b| f32::from(b) / 127.5 - 1.0));
    }
    Ok(Tensor::from_vec(values, (images.len(), height, width, 3), device)?.permute((0, 3, 1, 2))?.contiguous()?)
}
