//! An MM-DiT's weights as named variables, under the names diffusers gives
//! them, and seen by the engine's loader as a [`WeightSource`].
//!
//! Invariant: every tensor of [`MmDitConfig::weight_shapes`] is here once,
//! trainable or frozen (the position grid, fixed sines and cosines as in
//! SD3), in F32 on one device.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use flowfarm_engine::mmdit::{MmDitConfig, WeightSource};
use flowfarm_engine::{Checkpoint, EngineError, MmDit};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::TrainError;

/// The fixed 2-D sine-cosine position grid: not trained.
pub const POSITION_GRID: &str = "pos_embed.pos_embed";

pub struct Params {
    config: MmDitConfig,
    trainable: BTreeMap<String, Var>,
    frozen: BTreeMap<String, Tensor>,
    device: Device,
}

impl Params {
    /// Fresh weights for training from scratch, the same for the same seed:
    /// Xavier-uniform products and zero biases; zero adaLN modulations and
    /// output projection, so every block starts as the identity and the
    /// model predicts zero (DiT's initialisation); N(0, 0.02) timestep and
    /// pooled-text embedders; unit QK-norm scales.
    ///
    /// # Errors
    /// Tensor errors only.
    pub fn init(config: &MmDitConfig, seed: u64, device: &Device) -> Result<Params, TrainError> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut weights = HashMap::new();
        for (name, shape) in config.weight_shapes() {
            let count: usize = shape.iter().product();
            let zero = name.ends_with(".bias")
                || name.contains("norm1.linear")
                || name.contains("norm1_context.linear")
                || name.starts_with("norm_out.")
                || name.starts_with("proj_out.");
            let values: Vec<f32> = if name == POSITION_GRID {
                sincos_grid(config.pos_embed_max_size, config.hidden)
            } else if name.contains("norm_q") || name.contains("norm_k") || name.contains("norm_added") {
                vec![1.0; count]
            } else if zero {
                vec![0.0; count]
            } else if name.starts_with("time_text_embed.") {
                (0..count).map(|_| 0.02 * normal(&mut rng)).collect()
            } else {
                // Xavier-uniform over (out, in…): fan-out the first dim, fan-in the rest.
                let fan_out = shape[0];
                let fan_in = count / fan_out.max(1);
                let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
                (0..count).map(|_| rng.gen_range(-bound..bound) as f32).collect()
            };
            weights.insert(name, Tensor::from_vec(values, shape, device)?);
        }
        Params::from_tensors(config, weights, device)
    }

    /// The weights of a checkpoint in any layout the engine reads, to train on.
    ///
    /// # Errors
    /// The checkpoint's errors, naming what is missing or malformed.
    pub fn open(path: &Path, device: &Device) -> Result<Params, TrainError> {
        let checkpoint = Checkpoint::open(path)?;
        let config = checkpoint.config()?;
        let mut weights = HashMap::new();
        for (name, shape) in config.weight_shapes() {
            let tensor = checkpoint.tensor(&name, &shape, DType::F32, device)?;
            weights.insert(name, tensor);
        }
        Params::from_tensors(&config, weights, device)
    }

    /// Every tensor of `config` from `weights` (copied into variables).
    ///
    /// # Errors
    /// [`TrainError::Checkpoint`] naming a tensor that is missing or misshapen.
    pub fn from_tensors(config: &MmDitConfig, mut weights: HashMap<String, Tensor>, device: &Device) -> Result<Params, TrainError> {
        let (mut trainable, mut frozen) = (BTreeMap::new(), BTreeMap::new());
        for (name, shape) in config.weight_shapes() {
            let bad = |reason: String| TrainError::Checkpoint { path: name.clone(), reason };
            let tensor = weights.remove(&name).ok_or_else(|| bad("missing".into()))?;
            if tensor.dims() != shape.as_slice() {
                return Err(bad(format!("shape {:?}, expected {shape:?}", tensor.dims())));
            }
            let tensor = tensor.to_dtype(DType::F32)?.to_device(device)?;
            if name == POSITION_GRID {
                frozen.insert(name, tensor);
            } else {
                trainable.insert(name, Var::from_tensor(&tensor)?);
            }
        }
        Ok(Params { config: config.clone(), trainable, frozen, device: device.clone() })
    }

    pub fn config(&self) -> &MmDitConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The trained variables, by name.
    pub fn trainable(&self) -> &BTreeMap<String, Var> {
        &self.trainable
    }

    /// Every tensor, trained and frozen, as it is now (copies).
    ///
    /// # Errors
    /// Tensor errors only.
    pub fn snapshot(&self) -> Result<HashMap<String, Tensor>, TrainError> {
        let mut out = HashMap::new();
        for (name, var) in &self.trainable {
            out.insert(name.clone(), var.as_tensor().copy()?);
        }
        for (name, tensor) in &self.frozen {
            out.insert(name.clone(), tensor.clone());
        }
        Ok(out)
    }

    /// The engine's model over these variables, in `dtype`: its forward is
    /// differentiable with respect to every trained variable.
    ///
    /// # Errors
    /// The loader's errors.
    pub fn model(&self, dtype: DType) -> Result<MmDit, EngineError> {
        MmDit::load_trainable(self.config.clone(), self, dtype, &self.device)
    }
}

impl WeightSource for Params {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor, EngineError> {
        let tensor = match (self.trainable.get(name), self.frozen.get(name)) {
            (Some(var), _) => var.as_tensor(),
            (None, Some(tensor)) => tensor,
            (None, None) => return Err(EngineError::MissingTensor { key: name.to_owned() }),
        };
        if tensor.dims() != shape {
            return Err(EngineError::ShapeMismatch { key: name.to_owned(), expected: shape.to_vec(), found: tensor.dims().to_vec() });
        }
        // Same dtype and device: the variable itself, so gradients reach it.
        Ok(tensor.to_dtype(dtype)?.to_device(device)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.trainable.contains_key(name) || self.frozen.contains_key(name)
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let tensor = self.trainable.get(name).map(Var::as_tensor).or_else(|| self.frozen.get(name))?;
        Some(tensor.dims().to_vec())
    }
}

/// The M×M grid of D-wide 2-D sine-cosine position embeddings, rows first:
/// the first half of each vector encodes the row, the second the column,
/// each as sines then cosines at frequencies 10000^(−k/(D/4)).
pub fn sincos_grid(size: usize, hidden: usize) -> Vec<f32> {
    let quarter = hidden / 4;
    let mut out = Vec::with_capacity(size * size * hidden);
    for row in 0..size {
        for col in 0..size {
            for position in [row, col] {
                let frequencies = (0..quarter).map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64));
                let angles: Vec<f64> = frequencies.map(|f| position as f64 * f).collect();
                out.extend(angles.iter().map(|a| a.sin() as f32));
                out.extend(angles.iter().map(|a| a.cos() as f32));
            }
            // A width that is not a multiple of 4 leaves the last channels zero.
            out.resize(out.len() + hidden - 4 * quarter, 0.0);
        }
    }
    out
}

fn normal(rng: &mut impl Rng) -> f32 {
    let u1 = 1.0 - rng.gen::<f64>();
    let u2 = rng.gen::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}
