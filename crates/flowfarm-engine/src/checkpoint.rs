//! Reading MM-DiT checkpoints in either published layout.
//!
//! - **Single file** (Stability AI's layout): `model.diffusion_model.*` keys
//!   (or the same keys without the prefix), fused `qkv` projections,
//!   `joint_blocks.{i}.{x_block,context_block}`, and the final and last-context
//!   modulations stored shift-then-scale.
//! - **Diffusers folder**: `transformer/` with `diffusion_pytorch_model.safetensors`
//!   or shards listed in `diffusion_pytorch_model.safetensors.index.json`, and
//!   `config.json`.
//!
//! The layout is told from the keys, the architecture from the keys and shapes
//! ([`MmDitConfig::detect`]). Files are memory-mapped; a tensor is read when
//! the model asks for it, under its diffusers name, and converted on the fly.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::mmdit::{MmDit, MmDitConfig, WeightSource};
use crate::source::ComponentFiles;
use crate::weights::TensorFiles;
use crate::EngineError;

/// Key prefix of the transformer in Stability AI's single files.
pub const SINGLE_FILE_PREFIX: &str = "model.diffusion_model.";
/// Safetensors metadata key giving the head count, for checkpoints whose
/// heads are not 64 channels wide and that carry no QK-norm (tiny test models).
pub const HEADS_METADATA_KEY: &str = "num_heads";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    SingleFile,
    Diffusers,
}

/// How a diffusers-named tensor is read from a single-file checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    Same,
    /// Part `i` of 3 along dim 0 (q, k, v of a fused qkv).
    Third(usize),
    /// The two halves along dim 0 swapped (shift/scale ↔ scale/shift).
    SwapHalves,
}

/// The single-file key and transform for a diffusers name. `last_block` is
/// the index of the final joint block, whose context modulation is swapped.
pub(crate) fn single_file_key(name: &str, last_block: usize) -> Option<(String, Transform)> {
    use Transform::*;
    let fixed = match name {
        "pos_embed.pos_embed" => Some("pos_embed"),
        "pos_embed.proj.weight" => Some("x_embedder.proj.weight"),
        "pos_embed.proj.bias" => Some("x_embedder.proj.bias"),
        _ => None,
    };
    if let Some(key) = fixed {
        return Some((key.to_owned(), Same));
    }
    let (stem, kind) = name.rsplit_once('.')?;
    let simple = |key: &str| Some((format!("{key}.{kind}"), Same));
    match stem {
        "time_text_embed.timestep_embedder.linear_1" => return simple("t_embedder.mlp.0"),
        "time_text_embed.timestep_embedder.linear_2" => return simple("t_embedder.mlp.2"),
        "time_text_embed.text_embedder.linear_1" => return simple("y_embedder.mlp.0"),
        "time_text_embed.text_embedder.linear_2" => return simple("y_embedder.mlp.2"),
        "context_embedder" => return simple("context_embedder"),
        "proj_out" => return simple("final_layer.linear"),
        "norm_out.linear" => return Some((format!("final_layer.adaLN_modulation.1.{kind}"), SwapHalves)),
        _ => {}
    }
    let rest = stem.strip_prefix("transformer_blocks.")?;
    let (index, part) = rest.split_once('.')?;
    let i: usize = index.parse().ok()?;
    let j = format!("joint_blocks.{i}");
    let (key, transform) = match part {
        "attn.to_q" => ("x_block.attn.qkv", Third(0)),
        "attn.to_k" => ("x_block.attn.qkv", Third(1)),
        "attn.to_v" => ("x_block.attn.qkv", Third(2)),
        "attn.add_q_proj" => ("context_block.attn.qkv", Third(0)),
        "attn.add_k_proj" => ("context_block.attn.qkv", Third(1)),
        "attn.add_v_proj" => ("context_block.attn.qkv", Third(2)),
        "attn.norm_q" => ("x_block.attn.ln_q", Same),
        "attn.norm_k" => ("x_block.attn.ln_k", Same),
        "attn.norm_added_q" => ("context_block.attn.ln_q", Same),
        "attn.norm_added_k" => ("context_block.attn.ln_k", Same),
        "attn.to_out.0" => ("x_block.attn.proj", Same),
        "attn.to_add_out" => ("context_block.attn.proj", Same),
        "attn2.to_q" => ("x_block.attn2.qkv", Third(0)),
        "attn2.to_k" => ("x_block.attn2.qkv", Third(1)),
        "attn2.to_v" => ("x_block.attn2.qkv", Third(2)),
        "attn2.norm_q" => ("x_block.attn2.ln_q", Same),
        "attn2.norm_k" => ("x_block.attn2.ln_k", Same),
        "attn2.to_out.0" => ("x_block.attn2.proj", Same),
        "norm1.linear" => ("x_block.adaLN_modulation.1", Same),
        "norm1_context.linear" => ("context_block.adaLN_modulation.1", if i == last_block { SwapHalves } else { Same }),
        "ff.net.0.proj" => ("x_block.mlp.fc1", Same),
        "ff.net.2" => ("x_block.mlp.fc2", Same),
        "ff_context.net.0.proj" => ("context_block.mlp.fc1", Same),
        "ff_context.net.2" => ("context_block.mlp.fc2", Same),
        _ => return None,
    };
    Some((format!("{j}.{key}.{kind}"), transform))
}

/// `weights` (diffusers names) under their single-file keys
/// (`model.diffusion_model.*`): q, k, v fused, modulation halves swapped
/// where the original layout has them the other way. `path` names the
/// output in errors.
///
/// # Errors
/// [`EngineError::Checkpoint`] for a weight with no single-file name or a
/// fused projection with a part missing.
pub(crate) fn single_file_tensors(
    config: &MmDitConfig,
    weights: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<HashMap<String, Tensor>, EngineError> {
    let last = config.depth.saturating_sub(1);
    let mut fused: HashMap<String, [Option<Tensor>; 3]> = HashMap::new();
    let mut out = HashMap::new();
    for (name, tensor) in weights {
        let (key, transform) = single_file_key(name, last).ok_or_else(|| EngineError::Checkpoint {
            path: path.display().to_string(),
            reason: format!("`{name}` has no single-file name"),
        })?;
        let key = format!("{SINGLE_FILE_PREFIX}{key}");
        match transform {
            Transform::Same => {
                out.insert(key, tensor.clone());
            }
            // Swapping the halves is its own inverse.
            Transform::SwapHalves => {
                out.insert(key, apply(transform, tensor.clone())?);
            }
            Transform::Third(part) => {
                fused.entry(key).or_default()[part] = Some(tensor.clone());
            }
        }
    }
    for (key, parts) in fused {
        let parts: Vec<Tensor> = parts
            .into_iter()
            .collect::<Option<_>>()
            .ok_or_else(|| EngineError::Checkpoint { path: path.display().to_string(), reason: format!("{key}: q, k or v missing") })?;
        out.insert(key, Tensor::cat(&parts, 0)?);
    }
    Ok(out)
}

/// Applies `transform` to a single-file tensor.
pub(crate) fn apply(transform: Transform, t: Tensor) -> candle_core::Result<Tensor> {
    match transform {
        Transform::Same => Ok(t),
        Transform::Third(i) => {
            let third = t.dim(0)? / 3;
            t.narrow(0, i * third, third)
        }
        Transform::SwapHalves => {
            let half = t.dim(0)? / 2;
            Tensor::cat(&[t.narrow(0, half, half)?, t.narrow(0, 0, half)?], 0)
        }
    }
}

/// An opened checkpoint: its files plus what was learnt from their keys.
pub struct Checkpoint {
    path: PathBuf,
    layout: Layout,
    prefix: String,
    files: Arc<TensorFiles>,
    /// Storage dtype of the weights (of the patch embedding, which every variant has).
    dtype: Option<DType>,
    heads: Option<usize>,
    last_block: usize,
}

fn bad(path: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::checkpoint(path, reason)
}

/// The `__metadata__` map of a safetensors file, read from its header only.
pub(crate) fn read_metadata(path: &Path) -> Result<HashMap<String, String>, EngineError> {
    let io_err = |source| EngineError::io(path, source);
    let mut file = std::fs::File::open(path).map_err(io_err)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(io_err)?;
    let len = u64::from_le_bytes(len);
    if len > 100 * 1024 * 1024 {
        return Err(bad(path, "safetensors header larger than 100 MiB"));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(io_err)?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(path, format!("unreadable safetensors header: {e}")))?;
    Ok(header
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
        .unwrap_or_default())
}

/// The safetensors files of a path: a file, a folder with `transformer/`, or
/// a transformer folder (single file or shards with an index).
fn weight_files(path: &Path) -> Result<(Vec<PathBuf>, Option<PathBuf>), EngineError> {
    if path.is_file() {
        return Ok((vec![path.to_owned()], None));
    }
    if !path.is_dir() {
        return Err(bad(path, "no such file or folder"));
    }
    let dir = if path.join("transformer").is_dir() { path.join("transformer") } else { path.to_owned() };
    let config = Some(dir.join("config.json")).filter(|c| c.is_file());
    match crate::source::folder_weights(&dir, "diffusion_pytorch_model", None) {
        Ok((files, _)) => Ok((files, config)),
        Err(e) => {
            let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|source| EngineError::io(&dir, source))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            match found.len() {
                1 => Ok((vec![found.remove(0)], config)),
                0 => Err(bad(&dir, "no .safetensors files")),
                _ if dir.join("diffusion_pytorch_model.safetensors.index.json").is_file() => Err(e),
                _ => Err(bad(&dir, "several .safetensors files and no index.json; name the file")),
            }
        }
    }
}

impl Checkpoint {
    /// Opens a checkpoint file or folder and detects its layout.
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] for files that are missing, unreadable or
    /// hold no MM-DiT; [`EngineError::Io`].
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint, EngineError> {
        let path = path.as_ref();
        let (files, config) = weight_files(path)?;
        Self::from_files(path, Arc::new(TensorFiles::open(&files)?), config.as_deref())
    }

    /// The transformer of a resolved model.
    ///
    /// # Errors
    /// As [`Checkpoint::open`].
    pub fn from_component(c: &ComponentFiles) -> Result<Checkpoint, EngineError> {
        let path = c.files.paths().first().cloned().unwrap_or_default();
        Self::from_files(&path, c.files.clone(), c.config.as_deref())
    }

    fn from_files(path: &Path, files: Arc<TensorFiles>, config: Option<&Path>) -> Result<Checkpoint, EngineError> {
        let dtype = files
            .names()
            .find(|name| name.ends_with("x_embedder.proj.weight") || name.ends_with("pos_embed.proj.weight"))
            .and_then(|name| files.info(name))
            .map(|info| info.dtype);
        let has = |prefix: &str| files.has_prefix(prefix);
        let (layout, prefix) = if has(&format!("{SINGLE_FILE_PREFIX}joint_blocks.")) {
            (Layout::SingleFile, SINGLE_FILE_PREFIX.to_owned())
        } else if has("joint_blocks.") {
            (Layout::SingleFile, String::new())
        } else if has("transformer_blocks.") {
            (Layout::Diffusers, String::new())
        } else {
            return Err(bad(path, "no MM-DiT weights (neither joint_blocks.* nor transformer_blocks.* keys)"));
        };
        let block_key = if layout == Layout::SingleFile { format!("{prefix}joint_blocks.") } else { "transformer_blocks.".into() };
        let last_block =
            files.names().filter_map(|k| k.strip_prefix(&block_key)?.split('.').next()?.parse::<usize>().ok()).max().unwrap_or(0);
        let mut heads = None;
        if let Some(config) = config {
            let json: serde_json::Value = crate::read_json(config, "a transformer config")?;
            heads = json.get("num_attention_heads").and_then(|h| h.as_u64()).map(|h| h as usize);
        }
        for file in files.paths() {
            if let Some(h) = read_metadata(file)?.get(HEADS_METADATA_KEY) {
                heads = Some(h.parse().map_err(|_| bad(file, format!("metadata {HEADS_METADATA_KEY}={h} is not a number")))?);
            }
        }
        Ok(Checkpoint { path: path.to_owned(), layout, prefix, files, dtype, heads, last_block })
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The weights' storage dtype, when it could be read.
    pub fn dtype(&self) -> Option<DType> {
        self.dtype
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The architecture, read off the weights.
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] when the weights do not describe an MM-DiT.
    pub fn config(&self) -> Result<MmDitConfig, EngineError> {
        MmDitConfig::detect(self, self.heads).map_err(|e| match e {
            EngineError::Checkpoint { reason, .. } => bad(&self.path, reason),
            other => other,
        })
    }

    /// Builds the model in `dtype` on `device`.
    ///
    /// # Errors
    /// As [`Checkpoint::config`] and [`MmDit::load`].
    pub fn load_model(&self, dtype: DType, device: &Device) -> Result<MmDit, EngineError> {
        MmDit::load(self.config()?, self, dtype, device)
    }

    /// Builds one stage of a block pipeline: the joint blocks `blocks` only.
    ///
    /// # Errors
    /// As [`Checkpoint::config`] and [`MmDit::load_blocks`].
    pub fn load_stage(&self, dtype: DType, device: &Device, blocks: std::ops::Range<usize>) -> Result<MmDit, EngineError> {
        MmDit::load_blocks(self.config()?, self, dtype, device, blocks)
    }

    /// Every transformer weight under its diffusers name, in the file's
    /// dtype, on the CPU (q, k, v split out of fused projections).
    ///
    /// # Errors
    /// As loading: missing or mismatched tensors, named.
    pub(crate) fn diffusers_weights(&self) -> Result<HashMap<String, Tensor>, EngineError> {
        let config = self.config()?;
        let dtype = self.dtype.unwrap_or(DType::F32);
        config
            .weight_shapes()
            .into_iter()
            .map(|(name, shape)| Ok((name.clone(), WeightSource::tensor(self, &name, &shape, dtype, &Device::Cpu)?)))
            .collect()
    }

    /// The files the weights are in.
    pub fn files(&self) -> &Arc<TensorFiles> {
        &self.files
    }

    /// The stored key of the diffusers-named weight `name`, and how it is
    /// cut out of the stored tensor.
    pub(crate) fn source(&self, name: &str) -> Option<(String, Transform)> {
        match self.layout {
            Layout::Diffusers => Some((name.to_owned(), Transform::Same)),
            Layout::SingleFile => single_file_key(name, self.last_block).map(|(key, t)| (format!("{}{key}", self.prefix), t)),
        }
    }
}

impl WeightSource for Checkpoint {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor, EngineError> {
        let missing = || EngineError::MissingTensor { key: name.to_owned() };
        let (key, transform) = self.source(name).ok_or_else(missing)?;
        if self.files.info(&key).is_none() {
            return Err(if key == name { missing() } else { EngineError::MissingTensor { key: format!("{key} (for {name})") } });
        }
        let found = self.shape(name).ok_or_else(missing)?;
        if found != shape {
            let key = if key == name { key } else { format!("{key} (for {name})") };
            return Err(EngineError::ShapeMismatch { key, expected: shape.to_vec(), found });
        }
        let raw = self.files.load(&key, dtype, device)?;
        Ok(apply(transform, raw)?.contiguous()?)
    }

    fn contains(&self, name: &str) -> bool {
        self.source(name).is_some_and(|(key, _)| self.files.info(&key).is_some())
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let (key, transform) = self.source(name)?;
        let mut shape = self.files.info(&key)?.shape.clone();
        if let (Transform::Third(_), Some(first)) = (transform, shape.first_mut()) {
            *first /= 3;
        }
        Some(shape)
    }
}

fn save(tensors: &HashMap<String, Tensor>, metadata: Option<HashMap<String, String>>, path: &Path) -> Result<(), EngineError> {
    safetensors::serialize_to_file(tensors.iter(), metadata, path)
        .map_err(|e| EngineError::Checkpoint { path: path.display().to_string(), reason: e.to_string() })
}

/// Writes `weights` as a diffusers folder: `dir/transformer/` with the
/// safetensors file and a config.json. Returns `dir`.
///
/// # Errors
/// [`EngineError::Io`] or a serialisation error.
pub fn write_diffusers(config: &MmDitConfig, weights: &HashMap<String, Tensor>, dir: &Path) -> Result<PathBuf, EngineError> {
    let folder = dir.join("transformer");
    std::fs::create_dir_all(&folder).map_err(|source| EngineError::Io { path: folder.display().to_string(), source })?;
    save(weights, None, &folder.join("diffusion_pytorch_model.safetensors"))?;
    let json = serde_json::json!({
        "_class_name": "SD3Transformer2DModel",
        "attention_head_dim": config.head_dim(),
        "num_attention_heads": config.heads,
        "num_layers": config.depth,
        "patch_size": config.patch_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "joint_attention_dim": config.joint_attention_dim,
        "caption_projection_dim": config.hidden,
        "pooled_projection_dim": config.pooled_dim,
        "pos_embed_max_size": config.pos_embed_max_size,
        "qk_norm": if config.qk_norm { serde_json::json!("rms_norm") } else { serde_json::Value::Null },
        "dual_attention_layers": config.dual_attention_layers,
    });
    let path = folder.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap_or_default())
        .map_err(|source| EngineError::Io { path: path.display().to_string(), source })?;
    Ok(dir.to_owned())
}

/// Writes `weights` (diffusers names) as a Stability AI single file at `path`:
/// `model.diffusion_model.*`, fused qkv, swapped modulation halves; the head
/// count goes in the metadata.
///
/// # Errors
/// [`EngineError::Checkpoint`] for a weight with no single-file name, or a
/// serialisation error.
pub fn write_single_file(config: &MmDitConfig, weights: &HashMap<String, Tensor>, path: &Path) -> Result<(), EngineError> {
    let out = single_file_tensors(config, weights, path)?;
    let metadata = HashMap::from([(HEADS_METADATA_KEY.to_owned(), config.heads.to_string())]);
    save(&out, Some(metadata), path)
}
