use std::path::Path;

use serde::de::DeserializeOwned;

/// What can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// The files are not a checkpoint this engine can read.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: String, reason: String },
    /// A weight the model needs is absent.
    #[error("checkpoint has no tensor `{key}`")]
    MissingTensor { key: String },
    /// A weight has another shape than the model built from the checkpoint expects.
    #[error("tensor `{key}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { key: String, expected: Vec<usize>, found: Vec<usize> },
    /// The image is larger than the position-embedding grid allows.
    #[error("latent of {height}×{width} is {h_patches}×{w_patches} patches; this model's position embedding covers at most {max}×{max} ({max_px} pixels a side)")]
    TooLarge { height: usize, width: usize, h_patches: usize, w_patches: usize, max: usize, max_px: usize },
    /// Inputs that do not fit together (batch sizes, channels, steps).
    #[error("invalid input: {0}")]
    Input(String),
    /// What this worker loaded cannot serve the request (a model or an
    /// encoder it lacks); another worker's may.
    #[error("not served here: {0}")]
    Unserved(String),
    /// A device or dtype name that cannot be used here.
    #[error("device `{spec}`: {reason}")]
    Device { spec: String, reason: String },
    /// The per-step callback asked to stop.
    #[error("cancelled after step {step}")]
    Cancelled { step: usize },
}

impl EngineError {
    /// A checkpoint file or folder that cannot be used, and why.
    pub(crate) fn checkpoint(path: &Path, reason: impl Into<String>) -> Self {
        EngineError::Checkpoint { path: path.display().to_string(), reason: reason.into() }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        EngineError::Io { path: path.display().to_string(), source }
    }
}

/// Reads a JSON config file; `what` names it in the error ("a CLIP config").
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path, what: &str) -> Result<T, EngineError> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| EngineError::checkpoint(path, format!("not {what}: {e}")))
}
