//! Memory planner: what each device needs to run a model in a given mode,
//! computed from the parts' configs alone (nothing is loaded, so a model
//! whose weights are not here can be planned), and which mode fits.
//!
//! Weights: every part's parameter count from its config (the formulas
//! below; the tests check them against the tensors of real checkpoints),
//! in the dtype the part runs in. Activations, for the largest job the
//! worker takes (`width` × `height`, `batch` jobs at once per device):
//! - transformer: one forward of 2·batch rows (CFG) of S = N + L tokens
//!   through one block: [`STREAM_COPIES`] copies of the (rows, S, D)
//!   streams, and the attention scores of every head, S × S each, in the
//!   model's dtype plus the softmax's F32 copy (attention is not fused yet);
//!   plus the streams of every other job in flight through a pipeline;
//! - VAE: [`crate::vae::Vae::whole_decode_bytes`]'s bound, the decode at
//!   the largest size;
//! - encoders: a prompt's activations are small beside their weights and
//!   are covered by [`HEADROOM`].
//!
//! Invariant: a plan says "fits" only when every device's weights and
//! activations, times 1 + [`HEADROOM`], are within its memory.

use std::path::Path;

use candle_core::DType;
use serde::Deserialize;

use crate::clip::ClipConfig;
use crate::mmdit::MmDitConfig;
use crate::source::ModelLayout;
use crate::EngineError;

/// Copies of a block's (rows, S, D) streams alive at its peak: input,
/// modulated norm, q, k, v, attention output, projection, and the MLP's
/// 4·D hidden layer.
pub const STREAM_COPIES: u64 = 11;
/// Allowance over the computed need for allocator slack, the CUDA context
/// and encoder activations.
pub const HEADROOM: f64 = 0.10;

/// How a model's work is spread over devices (as a worker's `parallel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Replicate,
    Cfg,
    Pipeline,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Replicate => "replicate",
            Mode::Cfg => "cfg",
            Mode::Pipeline => "pipeline",
        }
    }

    /// Parses `replicate`, `cfg` or `pipeline`.
    ///
    /// # Errors
    /// A message naming the accepted values.
    pub fn parse(text: &str) -> Result<Mode, String> {
        match text {
            "replicate" => Ok(Mode::Replicate),
            "cfg" => Ok(Mode::Cfg),
            "pipeline" => Ok(Mode::Pipeline),
            other => Err(format!("`{other}` is not `replicate`, `cfg` or `pipeline`")),
        }
    }
}

/// Where the text encoders go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderPlace {
    /// On the device of the transformer (or of its first stage).
    Same,
    /// In host memory, run by the CPU.
    Cpu,
}

/// A model's sizes, from its configs.
#[derive(Debug, Clone)]
pub struct ModelShapes {
    pub transformer: MmDitConfig,
    /// Parameters of each joint block, in order.
    pub block_parameters: Vec<u64>,
    /// Parameters outside the blocks (embeddings, output head): every
    /// pipeline stage holds them.
    pub shared_parameters: u64,
    pub clip_l: u64,
    pub clip_g: u64,
    /// None: the model has no T5 (or it is not to be loaded).
    pub t5: Option<u64>,
    pub vae: u64,
    vae_channels: Vec<usize>,
    vae_scale: usize,
}

#[derive(Deserialize)]
struct T5Shape {
    vocab_size: usize,
    d_model: usize,
    d_kv: usize,
    d_ff: usize,
    num_layers: usize,
    num_heads: usize,
    relative_attention_num_buckets: usize,
}

#[derive(Deserialize)]
struct VaeShape {
    block_out_channels: Vec<usize>,
    layers_per_block: usize,
    latent_channels: usize,
    out_channels: usize,
    #[serde(default)]
    use_post_quant_conv: bool,
}

impl ModelShapes {
    /// Reads the configs of a resolved model.
    ///
    /// # Errors
    /// [`EngineError::Input`] for a part without a config; config errors.
    pub fn of(layout: &ModelLayout) -> Result<Self, EngineError> {
        let config = |c: &crate::source::ComponentFiles| {
            c.config.clone().ok_or_else(|| EngineError::Input(format!("{} has no config.json to plan from", c.part.as_str())))
        };
        let transformer = crate::Checkpoint::from_component(&layout.transformer)?.config()?;
        let t5 = match &layout.t5 {
            Some(c) => Some(config(c)?),
            None => None,
        };
        Self::from_configs(transformer, &config(&layout.clip_l)?, &config(&layout.clip_g)?, t5.as_deref(), &config(&layout.vae)?)
    }

    /// Reads a diffusers folder's configs only (`transformer/`, `vae/`,
    /// `text_encoder{,_2,_3}/` `config.json`): a model whose weights are
    /// not here can be planned.
    ///
    /// # Errors
    /// Config errors, naming the file.
    pub fn from_config_folder(dir: &Path) -> Result<Self, EngineError> {
        let transformer: serde_json::Value = crate::read_json(&dir.join("transformer/config.json"), "a transformer config")?;
        let transformer = MmDitConfig::from_diffusers_json(&transformer)?;
        let t5 = dir.join("text_encoder_3/config.json");
        Self::from_configs(
            transformer,
            &dir.join("text_encoder/config.json"),
            &dir.join("text_encoder_2/config.json"),
            t5.exists().then_some(t5.as_path()),
            &dir.join("vae/config.json"),
        )
    }

    fn from_configs(transformer: MmDitConfig, clip_l: &Path, clip_g: &Path, t5: Option<&Path>, vae: &Path) -> Result<Self, EngineError> {
        let mut block_parameters = vec![0u64; transformer.depth];
        let mut shared_parameters = 0u64;
        for (name, shape) in transformer.weight_shapes() {
            let n: u64 = shape.iter().map(|&d| d as u64).product();
            let block =
                name.strip_prefix("transformer_blocks.").and_then(|rest| rest.split('.').next()).and_then(|i| i.parse::<usize>().ok());
            match block {
                Some(i) if i < block_parameters.len() => block_parameters[i] += n,
                _ => shared_parameters += n,
            }
        }
        let clip = |path: &Path| -> Result<u64, EngineError> { Ok(clip_parameters(&crate::read_json(path, "a CLIP config")?)) };
        let t5 = match t5 {
            Some(path) => Some(t5_parameters(&crate::read_json(path, "a T5 config")?)),
            None => None,
        };
        let vae_shape: VaeShape = crate::read_json(vae, "a VAE config")?;
        Ok(ModelShapes {
            transformer,
            block_parameters,
            shared_parameters,
            clip_l: clip(clip_l)?,
            clip_g: clip(clip_g)?,
            t5,
            vae: vae_decoder_parameters(&vae_shape),
            vae_scale: 1 << vae_shape.block_out_channels.len().saturating_sub(1),
            vae_channels: vae_shape.block_out_channels,
        })
    }

    /// The transformer's parameters.
    pub fn transformer_parameters(&self) -> u64 {
        self.block_parameters.iter().sum::<u64>() + self.shared_parameters
    }

    /// The encoders' parameters (T5 included when present).
    pub fn encoder_parameters(&self) -> u64 {
        self.clip_l + self.clip_g + self.t5.unwrap_or(0)
    }

    /// Pixels a side of the model's native image: 64 patches (1024 px for
    /// SD3), or the position grid when it is smaller.
    pub fn native_side(&self) -> usize {
        self.transformer.pos_embed_max_size.min(64) * self.transformer.patch_size * self.vae_scale
    }

    /// Leaves T5 out (a CLIP-only model entry).
    pub fn without_t5(mut self) -> Self {
        self.t5 = None;
        self
    }
}

/// CLIPTextModelWithProjection: embeddings, pre-norm layers of attention
/// (q, k, v, out with biases) and MLP, final norm, projection (no bias).
pub fn clip_parameters(c: &ClipConfig) -> u64 {
    let (v, h, i, p) = (c.vocab_size as u64, c.hidden_size as u64, c.intermediate_size as u64, c.projection_dim as u64);
    let layer = 4 * (h * h + h) + 2 * (2 * h) + (h * i + i) + (i * h + h);
    v * h + c.max_position_embeddings as u64 * h + c.num_hidden_layers as u64 * layer + 2 * h + h * p
}

/// T5 v1.1's encoder: shared embedding, layers of attention (no biases;
/// relative position buckets on the first only) and gated feed-forward,
/// RMS norms.
fn t5_parameters(c: &T5Shape) -> u64 {
    let (d, inner, ff) = (c.d_model as u64, (c.num_heads * c.d_kv) as u64, c.d_ff as u64);
    let layer = 4 * d * inner + d + 3 * d * ff + d;
    c.vocab_size as u64 * d + c.num_layers as u64 * layer + (c.relative_attention_num_buckets * c.num_heads) as u64 + d
}

/// AutoencoderKL's decoder (flowfarm only decodes).
fn vae_decoder_parameters(c: &VaeShape) -> u64 {
    let conv = |i: u64, o: u64, k: u64| i * o * k * k + o;
    let norm = |c: u64| 2 * c;
    let resnet = |i: u64, o: u64| norm(i) + conv(i, o, 3) + norm(o) + conv(o, o, 3) + if i != o { conv(i, o, 1) } else { 0 };
    let z = c.latent_channels as u64;
    let channels: Vec<u64> = c.block_out_channels.iter().map(|&c| c as u64).collect();
    let (Some(&top), Some(&bottom)) = (channels.last(), channels.first()) else { return 0 };
    let mut n = if c.use_post_quant_conv { conv(z, z, 1) } else { 0 };
    n += conv(z, top, 3);
    n += 2 * resnet(top, top) + norm(top) + 4 * (top * top + top);
    let mut previous = top;
    for (level, &out) in channels.iter().rev().enumerate() {
        for r in 0..=c.layers_per_block {
            n += resnet(if r == 0 { previous } else { out }, out);
        }
        if level + 1 < channels.len() {
            n += conv(out, out, 3);
        }
        previous = out;
    }
    n + norm(bottom) + conv(bottom, c.out_channels as u64, 3)
}

/// What the largest job looks like.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub width: usize,
    pub height: usize,
    /// Jobs rendered at once per device (a worker's `capacity`).
    pub batch: usize,
    pub t5_length: usize,
    pub dtype: DType,
}

/// One device's share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNeed {
    pub device: String,
    pub weights: u64,
    pub activations: u64,
    pub memory: u64,
    /// What it holds, in words (`blocks 0..12, VAE, CLIP-L, CLIP-G`).
    pub holds: String,
}

impl DeviceNeed {
    /// Weights and activations with [`HEADROOM`].
    pub fn need(&self) -> u64 {
        ((self.weights + self.activations) as f64 * (1.0 + HEADROOM)) as u64
    }

    pub fn fits(&self) -> bool {
        self.need() <= self.memory
    }
}

/// A mode's needs on every device, and the host's for CPU encoders.
#[derive(Debug, Clone)]
pub struct Plan {
    pub mode: Mode,
    pub encoders: EncoderPlace,
    pub devices: Vec<DeviceNeed>,
    /// Host memory the encoders take when they run on the CPU.
    pub host: u64,
}

impl Plan {
    pub fn fits(&self) -> bool {
        self.devices.iter().all(DeviceNeed::fits)
    }

    /// The first device that does not fit.
    pub fn shortfall(&self) -> Option<&DeviceNeed> {
        self.devices.iter().find(|d| !d.fits())
    }
}

/// Bytes per element of a part that runs in `dtype` (the once-per-image
/// parts run in F32 on the CPU when the transformer is BF16).
fn element_bytes(dtype: DType) -> u64 {
    dtype.size_in_bytes() as u64
}

/// The needs of `mode` with encoders at `encoders` on `devices` (name,
/// memory in bytes).
///
/// # Errors
/// [`EngineError::Input`] when the mode cannot use that many devices.
pub fn plan(
    shapes: &ModelShapes,
    work: &Workload,
    devices: &[(String, u64)],
    mode: Mode,
    encoders: EncoderPlace,
) -> Result<Plan, EngineError> {
    let n = devices.len();
    match mode {
        Mode::Replicate if n >= 1 => {}
        Mode::Cfg if n >= 2 && n.is_multiple_of(2) => {}
        Mode::Pipeline if n >= 2 && n <= shapes.transformer.depth => {}
        _ => return Err(EngineError::Input(format!("{} cannot use {n} devices", mode.as_str()))),
    }
    let t = &shapes.transformer;
    let bytes = element_bytes(work.dtype);
    let scale = shapes.vae_scale.max(1) * t.patch_size;
    let tokens = (work.height / scale) * (work.width / scale) + crate::tokenize::CLIP_MAX_LENGTH + work.t5_length;
    let (tokens, hidden, heads) = (tokens as u64, t.hidden as u64, t.heads as u64);
    let batch = work.batch.max(1) as u64;
    // Rows per forward: both CFG halves, or one of them on each of a pair.
    let rows = if mode == Mode::Cfg { batch } else { 2 * batch };
    let streams = |rows: u64| rows * tokens * hidden * bytes;
    let block_peak = |rows: u64| STREAM_COPIES * streams(rows) + rows * heads * tokens * tokens * (bytes + 4);
    let (lh, lw) = (work.height / shapes.vae_scale.max(1), work.width / shapes.vae_scale.max(1));
    let vae_peak = crate::vae::decode_peak_bytes(&shapes.vae_channels, bytes, 1, lh, lw);
    let encoder_bytes = shapes.encoder_parameters() * bytes;
    let with_encoders = encoders == EncoderPlace::Same;
    let encoder_words = if shapes.t5.is_some() { "CLIP-L, CLIP-G, T5" } else { "CLIP-L, CLIP-G" };
    let need = |i: usize, weights: u64, activations: u64, holds: String| DeviceNeed {
        device: devices[i].0.clone(),
        weights,
        activations,
        memory: devices[i].1,
        holds,
    };
    let whole = shapes.transformer_parameters() * bytes;
    let vae = shapes.vae * bytes;
    let mut needs = Vec::with_capacity(n);
    match mode {
        Mode::Replicate => {
            for i in 0..n {
                let (w, holds) = if with_encoders {
                    (whole + vae + encoder_bytes, format!("transformer, VAE, {encoder_words}"))
                } else {
                    (whole + vae, "transformer, VAE".into())
                };
                needs.push(need(i, w, block_peak(rows).max(vae_peak), holds));
            }
        }
        Mode::Cfg => {
            for i in 0..n {
                // The first of a pair encodes, decodes and combines.
                let first = i % 2 == 0;
                let mut w = whole;
                let mut holds = String::from("transformer");
                if first {
                    w += vae;
                    holds.push_str(", VAE");
                    if with_encoders {
                        w += encoder_bytes;
                        holds = format!("{holds}, {encoder_words}");
                    }
                }
                needs.push(need(i, w, block_peak(rows).max(if first { vae_peak } else { 0 }), holds));
            }
        }
        Mode::Pipeline => {
            let ranges = crate::stages::split_blocks(t.depth, n);
            // Every job in flight waits at some stage with its streams.
            let in_flight = (n as u64 * batch).saturating_sub(1) * streams(2);
            for (i, range) in ranges.into_iter().enumerate() {
                let blocks: u64 = shapes.block_parameters[range.clone()].iter().sum();
                let mut w = (blocks + shapes.shared_parameters) * bytes;
                let mut holds = format!("blocks {}..{}", range.start, range.end);
                let mut activations = block_peak(2) + in_flight;
                if i == 0 {
                    w += vae;
                    holds.push_str(", VAE");
                    activations = activations.max(vae_peak);
                    if with_encoders {
                        w += encoder_bytes;
                        holds = format!("{holds}, {encoder_words}");
                    }
                }
                needs.push(need(i, w, activations, holds));
            }
        }
    }
    // CPU encoders run in F32 when the rest runs in BF16 (no CPU BF16 matmul).
    let host = if with_encoders { 0 } else { shapes.encoder_parameters() * if work.dtype == DType::BF16 { 4 } else { bytes } };
    Ok(Plan { mode, encoders, devices: needs, host })
}

/// Every mode and encoder place that can use `devices`, the fastest first:
/// replicas (each device renders on its own), then CFG pairs (half the
/// latency), then a block pipeline (a model that fits no single device);
/// encoders on the devices before encoders on the CPU.
pub fn candidates(devices: usize, depth: usize) -> Vec<(Mode, EncoderPlace)> {
    let mut out = Vec::new();
    for mode in [Mode::Replicate, Mode::Cfg, Mode::Pipeline] {
        let usable = match mode {
            Mode::Replicate => devices >= 1,
            Mode::Cfg => devices >= 2 && devices.is_multiple_of(2),
            Mode::Pipeline => devices >= 2 && devices <= depth,
        };
        if usable {
            out.push((mode, EncoderPlace::Same));
            out.push((mode, EncoderPlace::Cpu));
        }
    }
    out
}

/// The fastest plan that fits, or every plan tried (none fits).
///
/// # Errors
/// The plans tried, when none fits.
pub fn propose(shapes: &ModelShapes, work: &Workload, devices: &[(String, u64)]) -> Result<Plan, Vec<Plan>> {
    let mut tried = Vec::new();
    for (mode, place) in candidates(devices.len(), shapes.transformer.depth) {
        if let Ok(plan) = plan(shapes, work, devices, mode, place) {
            if plan.fits() {
                return Ok(plan);
            }
            tried.push(plan);
        }
    }
    Err(tried)
}

/// Parses a memory size: `24GB`, `24GiB`, `80G`, `512MiB`, or bytes.
///
/// # Errors
/// A message saying what is accepted.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("`{text}` is not a size like 24GB or 80GiB"))?;
    let factor: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" | "gi" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024f64.powi(4),
        other => return Err(format!("`{other}` in `{text}` is not a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")),
    };
    Ok((value * factor) as u64)
}
