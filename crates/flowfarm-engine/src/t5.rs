//! The T5 encoder (SD3's third text encoder), through candle-transformers'
//! T5, which the tests check against transformers' `T5EncoderModel`.
//!
//! candle's encoder keeps caches and needs `&mut` to run, so it sits behind a
//! mutex: the type stays `Send + Sync` and concurrent encodes queue.

use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::t5::{Config, T5EncoderModel};

use crate::source::{ComponentFiles, Part};
use crate::weights::{DryRun, FilesBackend};
use crate::EngineError;

/// A loaded T5 encoder.
pub struct T5Encoder {
    model: Mutex<T5EncoderModel>,
    config: Config,
}

impl T5Encoder {
    /// Opens a transformers/diffusers T5 folder (config.json +
    /// model.safetensors, or shards with an index).
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] for a missing or malformed config or weights.
    pub fn open(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self, EngineError> {
        Self::from_component(&ComponentFiles::folder(Part::T5, dir.as_ref(), "model")?, dtype, device, None)
    }

    /// The encoder of a resolved model (its transformers names under the
    /// component's prefix; float8 weights upcast to `dtype`); with `dry`,
    /// checks and records what it would load.
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] for a missing or malformed config or weights.
    pub fn from_component(c: &ComponentFiles, dtype: DType, device: &Device, dry: Option<Arc<Mutex<DryRun>>>) -> Result<Self, EngineError> {
        let config_path = c.config.as_deref().ok_or_else(|| EngineError::Input("t5 has no config".into()))?;
        let config: Config = crate::read_json(config_path, "a T5 config")?;
        let backend = FilesBackend::new(c.files.clone(), &c.prefix);
        let backend = match dry {
            Some(dry) => backend.dry(dry),
            None => backend,
        };
        let weights = c.files.paths().first().cloned().unwrap_or_default();
        let model = T5EncoderModel::load(backend.into_var_builder(dtype, device), &config)
            .map_err(|e| EngineError::checkpoint(&weights, format!("weights do not fit the config: {e}")))?;
        Ok(T5Encoder { model: Mutex::new(model), config })
    }

    /// Width of the hidden states (4096 for T5-XXL).
    pub fn width(&self) -> usize {
        self.config.d_model
    }

    /// Last hidden state (B, S, d_model) of token ids (B, S), F32.
    ///
    /// # Errors
    /// Tensor errors; a poisoned lock is recovered (the model holds no state
    /// that a panic could leave half-written between calls).
    pub fn encode(&self, ids: &Tensor) -> Result<Tensor, EngineError> {
        let ids = ids.to_dtype(DType::U32)?;
        let mut model = self.model.lock().unwrap_or_else(|p| p.into_inner());
        // One prompt at a time, so an encoding never depends on its batch mates.
        let rows = (0..ids.dim(0)?).map(|i| model.forward(&ids.narrow(0, i, 1)?)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 0)?.to_dtype(DType::F32)?)
    }
}
