//! The T5 encoder (SD3's third text encoder), through candle-transformers'
//! T5, which the tests check against transformers' `T5EncoderModel`.
//!
//! candle's encoder keeps caches and needs `&mut` to run, so it sits behind a
//! mutex: the type stays `Send + Sync` and concurrent encodes queue.

use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::t5::{Config, T5EncoderModel};

use crate::EngineError;

/// A loaded T5 encoder.
pub struct T5Encoder {
    model: Mutex<T5EncoderModel>,
    config: Config,
}

impl T5Encoder {
    /// Opens a transformers/diffusers T5 folder (config.json + model.safetensors).
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] for a missing or malformed config or weights.
    pub fn open(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self, EngineError> {
        let dir = dir.as_ref();
        Self::open_with(&dir.join("config.json"), &dir.join("model.safetensors"), "", dtype, device)
    }

    /// Opens the encoder whose transformers names stand under `prefix` in
    /// `weights` (an SD3 single file's `text_encoders.t5xxl.transformer.`),
    /// with the config at `config_path`.
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] for a missing or malformed config or weights.
    pub fn open_with(config_path: &Path, weights: &Path, prefix: &str, dtype: DType, device: &Device) -> Result<Self, EngineError> {
        let config: Config = crate::read_json(config_path, "a T5 config")?;
        // SAFETY: mapped read-only; flowfarm never writes a checkpoint it has open.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], dtype, device) }
            .map_err(|e| EngineError::checkpoint(weights, e.to_string()))?;
        let vb = if prefix.is_empty() { vb } else { vb.pp(prefix.trim_end_matches('.')) };
        let model = T5EncoderModel::load(vb, &config)
            .map_err(|e| EngineError::checkpoint(weights, format!("weights do not fit the config: {e}")))?;
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
