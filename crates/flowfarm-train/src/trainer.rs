//! One training step, and checkpoints that resume exactly.
//!
//! A step draws each sample's t from the sampler (shifted for the batch's
//! resolution) and its noise ε, both from a stream keyed by (seed, step);
//! builds the engine's model over the variables; predicts the velocity at
//! z_t; takes the mean squared error to ε − x₀; clips the gradients;
//! updates with AdamW at the warmed-up rate; and folds the weights into
//! the EMA.
//!
//! A checkpoint folder holds `transformer/` (the EMA weights in the
//! diffusers layout, which every flowfarm command loads) and `training/`
//! (`state.safetensors`: the variables, AdamW's moments and the EMA;
//! `trainer.json`: the settings and the step). Invariant: a run resumed
//! from a checkpoint takes the same steps, bit for bit, as one that never
//! stopped (on the same device).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use flowfarm_engine::mmdit::MmDitConfig;
use flowfarm_engine::noise::initial_latent;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::objective::{loss, noised, per_sample_loss, velocity_target};
use crate::optim::{clip_grad_norm, warmup_lr, AdamW, AdamWSettings, Ema};
use crate::params::{Params, POSITION_GRID};
use crate::timesteps::{resolution_shift, TimestepSampler};
use crate::TrainError;

/// How a run trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerConfig {
    pub lr: f64,
    pub warmup_steps: u64,
    pub adamw: AdamWSettings,
    /// Global gradient norm is clipped to this (0: no clipping).
    pub max_grad_norm: f64,
    pub ema_decay: f64,
    /// `uniform`, `logit-normal:m,s`, `mode:s` or `cosmap`.
    pub sampler: String,
    /// Pixels of the resolution the sampler is meant for; other sizes
    /// shift t by sqrt(pixels / this). 0: no shift.
    pub shift_reference_pixels: u64,
    /// `f32` or `bf16` (the forward's dtype; variables stay F32).
    pub dtype: String,
    /// Keys each step's t and ε.
    pub seed: u64,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            lr: 1e-4,
            warmup_steps: 100,
            adamw: AdamWSettings::default(),
            max_grad_norm: 1.0,
            ema_decay: 0.999,
            sampler: "logit-normal:0,1".into(),
            shift_reference_pixels: 0,
            dtype: "f32".into(),
            seed: 0,
        }
    }
}

impl TrainerConfig {
    fn parsed(&self) -> Result<(TimestepSampler, DType), TrainError> {
        let sampler = TimestepSampler::parse(&self.sampler).map_err(|e| TrainError::Invalid(format!("sampler: {e}")))?;
        let dtype = match self.dtype.as_str() {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            other => return Err(TrainError::Invalid(format!("dtype: `{other}` is not `f32` or `bf16`"))),
        };
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(TrainError::Invalid(format!("lr: {} must be a positive number", self.lr)));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(TrainError::Invalid(format!("ema_decay: {} is outside [0, 1)", self.ema_decay)));
        }
        Ok((sampler, dtype))
    }
}

/// Clean latents and their text conditioning, one resolution.
#[derive(Debug, Clone)]
pub struct Batch {
    /// (B, C, h, w) x₀, F32.
    pub latents: Tensor,
    /// (B, L, joint_attention_dim).
    pub context: Tensor,
    /// (B, pooled_dim).
    pub pooled: Tensor,
    /// Pixels of the images the latents stand for (for the shift).
    pub pixels: u64,
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    pub step: u64,
    pub loss: f32,
    /// Before clipping.
    pub grad_norm: f64,
    pub lr: f64,
}

pub struct Trainer {
    config: TrainerConfig,
    sampler: TimestepSampler,
    dtype: DType,
    params: Params,
    adam: AdamW,
    ema: Ema,
    step: u64,
}

impl Trainer {
    /// A run from step 0 on `params`.
    ///
    /// # Errors
    /// [`TrainError::Invalid`] naming a setting that cannot be used.
    pub fn new(config: TrainerConfig, params: Params) -> Result<Trainer, TrainError> {
        let (sampler, dtype) = config.parsed()?;
        let ema = Ema::new(config.ema_decay, params.trainable())?;
        Ok(Trainer { adam: AdamW::new(config.adamw), sampler, dtype, params, ema, step: 0, config })
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    /// Each sample's t and noise for step `step`.
    fn draw(&self, step: u64, latents: &Tensor, pixels: u64) -> Result<(Tensor, Tensor), TrainError> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
        rng.set_stream(step);
        let alpha = resolution_shift(self.config.shift_reference_pixels, pixels);
        let b = latents.dim(0)?;
        let t: Vec<f32> = (0..b).map(|_| flowfarm_core::shift::shift_timestep(alpha, self.sampler.sample(&mut rng)) as f32).collect();
        let noise = initial_latent(rng.next_u64(), latents.dims(), latents.device())?;
        Ok((Tensor::from_vec(t, b, latents.device())?, noise))
    }

    /// One optimisation step on `batch`.
    ///
    /// # Errors
    /// The engine's errors for inputs the model cannot take; tensor errors.
    pub fn train_step(&mut self, batch: &Batch) -> Result<StepReport, TrainError> {
        let (t, noise) = self.draw(self.step, &batch.latents, batch.pixels)?;
        let z = noised(&batch.latents, &noise, &t)?;
        let model = self.params.model(self.dtype)?;
        let prediction = model.forward(&z, &(&t * 1000.0)?, &batch.context, &batch.pooled, &[])?;
        let loss = loss(&prediction, &velocity_target(&batch.latents, &noise)?)?;
        let mut grads = loss.backward()?;
        let grad_norm = clip_grad_norm(self.params.trainable(), &mut grads, self.config.max_grad_norm)?;
        let lr = warmup_lr(self.config.lr, self.config.warmup_steps, self.step);
        self.adam.step(self.params.trainable(), &grads, lr)?;
        self.step += 1;
        self.ema.update(self.params.trainable(), self.step)?;
        Ok(StepReport { step: self.step, loss: loss.to_scalar::<f32>()?, grad_norm, lr })
    }

    /// The loss of the EMA weights on `batch` at each fixed t of `grid`
    /// (unshifted), with noise from `seed`: the paper's validation, which
    /// does not depend on the sampler being compared.
    ///
    /// # Errors
    /// As [`Trainer::train_step`].
    pub fn validation_loss(&self, batch: &Batch, grid: &[f64], seed: u64) -> Result<Vec<f64>, TrainError> {
        let model = Params::from_tensors(self.params.config(), self.ema_weights()?, self.params.device())?.model(self.dtype)?;
        let b = batch.latents.dim(0)?;
        let noise = initial_latent(seed, batch.latents.dims(), batch.latents.device())?;
        let target = velocity_target(&batch.latents, &noise)?;
        grid.iter()
            .map(|&t| {
                let t = Tensor::full(t as f32, b, batch.latents.device())?;
                let z = noised(&batch.latents, &noise, &t)?;
                let prediction = model.forward(&z, &(&t * 1000.0)?, &batch.context, &batch.pooled, &[])?;
                Ok(f64::from(per_sample_loss(&prediction.detach(), &target)?.mean_all()?.to_scalar::<f32>()?))
            })
            .collect()
    }

    /// The EMA weights, and the frozen tensors: what a checkpoint serves.
    ///
    /// # Errors
    /// Tensor errors only.
    pub fn ema_weights(&self) -> Result<HashMap<String, Tensor>, TrainError> {
        let mut weights = self.params.snapshot()?;
        for (name, tensor) in self.ema.state() {
            weights.insert(name.clone(), tensor.clone());
        }
        Ok(weights)
    }

    /// Writes `dir/transformer` (EMA weights, diffusers layout) and `dir/training`.
    ///
    /// # Errors
    /// [`TrainError::Io`] and the engine's write errors.
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        let served = self.ema_weights()?;
        flowfarm_engine::checkpoint::write_diffusers(self.params.config(), &served, dir)?;
        let training = dir.join("training");
        std::fs::create_dir_all(&training).map_err(|source| TrainError::Io { path: training.display().to_string(), source })?;
        let mut state: HashMap<String, Tensor> = HashMap::new();
        for (name, var) in self.params.trainable() {
            state.insert(format!("param.{name}"), var.as_tensor().clone());
        }
        for (name, tensor) in self.adam.state() {
            state.insert(format!("adam.{name}"), tensor);
        }
        for (name, tensor) in self.ema.state() {
            state.insert(format!("ema.{name}"), tensor.clone());
        }
        if let Some(grid) = served.get(POSITION_GRID) {
            state.insert(format!("frozen.{POSITION_GRID}"), grid.clone());
        }
        let path = training.join("state.safetensors");
        candle_core::safetensors::save(&state, &path)?;
        let record =
            Record { step: self.step, adam_steps: self.adam.steps(), trainer: self.config.clone(), model: self.params.config().clone() };
        let json = serde_json::to_string_pretty(&record).map_err(|e| TrainError::Invalid(e.to_string()))?;
        let path = training.join("trainer.json");
        std::fs::write(&path, json).map_err(|source| TrainError::Io { path: path.display().to_string(), source })
    }

    /// A run resumed from a folder [`Trainer::save`] wrote, on `device`.
    ///
    /// # Errors
    /// [`TrainError::Checkpoint`] for a folder without a training state or
    /// with one that does not fit its model.
    pub fn resume(dir: &Path, device: &Device) -> Result<Trainer, TrainError> {
        let training = dir.join("training");
        let json_path = training.join("trainer.json");
        let bad = |path: &Path, reason: String| TrainError::Checkpoint { path: path.display().to_string(), reason };
        let text = std::fs::read_to_string(&json_path)
            .map_err(|e| bad(&json_path, format!("{e}: not a training checkpoint (written by `flowfarm train`)")))?;
        let record: Record = serde_json::from_str(&text).map_err(|e| bad(&json_path, e.to_string()))?;
        let state_path = training.join("state.safetensors");
        let mut state = candle_core::safetensors::load(&state_path, device).map_err(|e| bad(&state_path, e.to_string()))?;
        let config = record.model.clone();
        let mut weights = HashMap::new();
        let mut ema = BTreeMap::new();
        for (name, _) in config.weight_shapes() {
            if name == POSITION_GRID {
                continue;
            }
            let param = state.remove(&format!("param.{name}")).ok_or_else(|| bad(&state_path, format!("no variable `{name}`")))?;
            weights.insert(name.clone(), param);
            ema.insert(
                name.clone(),
                state.remove(&format!("ema.{name}")).ok_or_else(|| bad(&state_path, format!("no average of `{name}`")))?,
            );
        }
        let grid = state.remove(&format!("frozen.{POSITION_GRID}")).ok_or_else(|| bad(&state_path, "no position grid".into()))?;
        weights.insert(POSITION_GRID.to_owned(), grid);
        let params = Params::from_tensors(&config, weights, device)?;
        let adam_state: HashMap<String, Tensor> =
            state.into_iter().filter_map(|(k, v)| k.strip_prefix("adam.").map(|k| (k.to_owned(), v))).collect();
        let (sampler, dtype) = record.trainer.parsed()?;
        Ok(Trainer {
            adam: AdamW::restore(record.trainer.adamw, record.adam_steps, &adam_state)?,
            ema: Ema::restore(record.trainer.ema_decay, ema),
            sampler,
            dtype,
            params,
            step: record.step,
            config: record.trainer,
        })
    }
}

/// `training/trainer.json`.
#[derive(Serialize, Deserialize)]
struct Record {
    step: u64,
    adam_steps: u64,
    trainer: TrainerConfig,
    model: MmDitConfig,
}
