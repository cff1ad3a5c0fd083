//! The 16-channel AutoEncoderKL of SD3-class models: latents to pixels (the
//! decoder, here) and, where the weights have it, pixels to latents (the
//! encoder, `encoder.rs`).
//!
//! Our own decoder, following diffusers' `Decoder` of `AutoencoderKL`, with
//! our own convolutions: candle 0.9.2's CPU conv2d (its tiled im2col path)
//! returns wrong values for some shapes (16→32 channels at 16×16, e.g.),
//! which made whole square images decode wrongly;
//! it reads the diffusers `vae/` folder and applies SD3's latent format:
//! z = latent / scaling_factor + shift_factor. Latents larger than the VAE's
//! tile (`sample_size` pixels) are decoded tile by tile with overlapping,
//! linearly blended seams, as diffusers' `enable_tiling()` does, so memory
//! stays bounded by the tile.
//!
//! Two layouts: the diffusers `vae/` folder, and the decoder inside an SD3
//! single file (`first_stage_model.decoder.*`, the original LDM names), whose
//! sizes are read off the shapes.
//! The single-file `first_stage_model.*` layout and tiled decoding are not
//! read yet.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{GroupNorm, VarBuilder};
use serde::{Deserialize, Serialize};

mod encoder;

use crate::source::{ComponentFiles, Part};
use crate::weights::{DryRun, FilesBackend, TensorFiles};
use crate::EngineError;

/// SD3's latent scale and shift, used when a config does not give them.
pub const SD3_SCALING_FACTOR: f64 = 1.5305;
pub const SD3_SHIFT_FACTOR: f64 = 0.0609;

/// An AutoencoderKL's shape and latent format, as its diffusers
/// `config.json` gives them.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct VaeConfig {
    /// Channels per level, from the image's resolution down.
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "three")]
    pub in_channels: usize,
    pub scaling_factor: Option<f64>,
    pub shift_factor: Option<f64>,
    /// Pixels a side of a decoding tile.
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
}

impl VaeConfig {
    /// The whole `config.json` diffusers' AutoencoderKL reads (block types,
    /// activation and the rest at the values this engine implements).
    pub fn to_diffusers_json(&self) -> serde_json::Value {
        let levels = self.block_out_channels.len();
        serde_json::json!({
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": self.block_out_channels,
            "down_block_types": vec!["DownEncoderBlock2D"; levels],
            "up_block_types": vec!["UpDecoderBlock2D"; levels],
            "force_upcast": true,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "layers_per_block": self.layers_per_block,
            "mid_block_add_attention": true,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor.unwrap_or(SD3_SCALING_FACTOR),
            "shift_factor": self.shift_factor.unwrap_or(SD3_SHIFT_FACTOR),
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
        })
    }
}

fn yes() -> bool {
    true
}

fn three() -> usize {
    3
}

fn default_sample_size() -> usize {
    1024
}

/// Fraction of a tile that overlaps its neighbour (diffusers' tile_overlap_factor).
const TILE_OVERLAP: f64 = 0.25;

const NORM_EPS: f64 = 1e-6;

/// A stride-1 convolution with "same" padding (1×1 or 3×3), computed as
/// im2col (shifted copies of the padded input) and one product over the
/// whole batch: the columns are laid out channels first, (c·k·k, b·h·w).
/// Each image of a render is decoded on its own, so the batch never
/// changes a job's pixels; training batches many images per call.
struct Conv2d {
    /// (out, in·k·k)
    weight: Tensor,
    bias: Tensor,
    kernel: usize,
}

impl Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let by_channel = x.transpose(0, 1)?; // (c, b, h, w)
        let columns = if self.kernel == 1 {
            by_channel.contiguous()?.reshape((c, b * h * w))?
        } else {
            let pad = self.kernel / 2;
            let padded = by_channel.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?;
            // Order (c, ky, kx) to match the weight's (in, k, k) flattening.
            let mut shifted = Vec::with_capacity(self.kernel * self.kernel);
            for ky in 0..self.kernel {
                for kx in 0..self.kernel {
                    shifted.push(padded.narrow(2, ky, h)?.narrow(3, kx, w)?);
                }
            }
            Tensor::stack(&shifted, 1)?.reshape((c * self.kernel * self.kernel, b * h * w))?
        };
        self.product(&columns, b, h, w)
    }

    /// weight × columns + bias, (out, b·h·w) → (b, out, h, w).
    fn product(&self, columns: &Tensor, b: usize, h: usize, w: usize) -> candle_core::Result<Tensor> {
        let out = self.weight.matmul(columns)?.broadcast_add(&self.bias.reshape(((), 1))?)?;
        out.reshape(((), b, h, w))?.transpose(0, 1)?.contiguous()
    }

    /// The 3×3 convolution at stride 2 after one zero row and column at the
    /// bottom and right (diffusers' `Downsample2D`, `padding=0`): (B, C, H,
    /// W) → (B, out, H/2, W/2), H and W even. Every other window of the
    /// same im2col, taken by folding each side into (half, 2) and keeping
    /// the first of each pair.
    fn forward_halving(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if h % 2 != 0 || w % 2 != 0 || self.kernel != 3 {
            candle_core::bail!("a halving convolution takes a 3×3 kernel and even sides, not {h}×{w}");
        }
        let (ho, wo) = (h / 2, w / 2);
        // One zero row and column as the reference pads, one more that no kept window reads.
        let padded = x.transpose(0, 1)?.pad_with_zeros(2, 0, 2)?.pad_with_zeros(3, 0, 2)?;
        let mut shifted = Vec::with_capacity(9);
        for ky in 0..3 {
            for kx in 0..3 {
                let window = padded.narrow(2, ky, 2 * ho)?.narrow(3, kx, 2 * wo)?.contiguous()?;
                shifted.push(window.reshape((c, b, ho, 2, wo, 2))?.narrow(3, 0, 1)?.narrow(5, 0, 1)?.reshape((c, b, ho, wo))?);
            }
        }
        let columns = Tensor::stack(&shifted, 1)?.reshape((c * 9, b * ho * wo))?;
        self.product(&columns, b, ho, wo)
    }
}

fn conv(vb: &VarBuilder, name: &str, input: usize, output: usize, kernel: usize) -> candle_core::Result<Conv2d> {
    let vb = vb.pp(name);
    let weight = vb.get((output, input, kernel, kernel), "weight")?.reshape((output, input * kernel * kernel))?;
    Ok(Conv2d { weight, bias: vb.get(output, "bias")?, kernel })
}

fn group_norm(vb: &VarBuilder, name: &str, groups: usize, channels: usize) -> candle_core::Result<GroupNorm> {
    candle_nn::group_norm(groups, channels, NORM_EPS, vb.pp(name))
}

/// GroupNorm → SiLU → conv, twice, plus a (1×1-projected) shortcut.
struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl Resnet {
    fn load(vb: &VarBuilder, groups: usize, input: usize, output: usize) -> candle_core::Result<Self> {
        Ok(Resnet {
            norm1: group_norm(vb, "norm1", groups, input)?,
            conv1: conv(vb, "conv1", input, output, 3)?,
            norm2: group_norm(vb, "norm2", groups, output)?,
            conv2: conv(vb, "conv2", output, output, 3)?,
            shortcut: if input != output { Some(conv(vb, "conv_shortcut", input, output, 1)?) } else { None },
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        skip + h
    }
}

/// Single-head self-attention over the pixels of the mid block.
struct SpatialAttention {
    norm: GroupNorm,
    q: candle_nn::Linear,
    k: candle_nn::Linear,
    v: candle_nn::Linear,
    out: candle_nn::Linear,
}

/// A c×c projection stored as a linear (c, c) or, in LDM files, a 1×1 conv (c, c, 1, 1).
fn projection(vb: &VarBuilder, name: &str, c: usize) -> candle_core::Result<candle_nn::Linear> {
    let vb = vb.pp(name);
    // What is stored, (c, c) or an LDM 1×1 conv, reshaped; a VarMap (training)
    // holds nothing yet and makes it at the shape asked.
    let weight = if vb.contains_tensor("weight") { vb.get_unchecked("weight")?.reshape((c, c))? } else { vb.get((c, c), "weight")? };
    Ok(candle_nn::Linear::new(weight, Some(vb.get(c, "bias")?)))
}

impl SpatialAttention {
    fn load(vb: &VarBuilder, groups: usize, c: usize) -> candle_core::Result<Self> {
        Ok(SpatialAttention {
            norm: group_norm(vb, "group_norm", groups, c)?,
            q: projection(vb, "to_q", c)?,
            k: projection(vb, "to_k", c)?,
            v: projection(vb, "to_v", c)?,
            out: projection(vb, "to_out.0", c)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        // (B, C, H, W) → (B, H·W, C), made contiguous before the products.
        let tokens = self.norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let (q, k, v) = (self.q.forward(&tokens)?, self.k.forward(&tokens)?, self.v.forward(&tokens)?);
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (c as f64).sqrt())?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        let attended = self.out.forward(&probs.matmul(&v)?)?;
        let back = attended.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w))?;
        back + x
    }
}

/// diffusers' `Decoder`: conv_in, mid block (resnet, attention, resnet), up
/// blocks (resnets, then nearest ×2 and a conv, except the last), norm, SiLU, conv_out.
struct Decoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: (Resnet, SpatialAttention, Resnet),
    up: Vec<(Vec<Resnet>, Option<Conv2d>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn load(vb: &VarBuilder, config: &VaeConfig) -> candle_core::Result<Self> {
        let groups = config.norm_num_groups;
        let channels = &config.block_out_channels;
        let top = *channels.last().ok_or_else(|| candle_core::Error::Msg("block_out_channels is empty".into()))?;
        let d = vb.pp("decoder");
        let mid = d.pp("mid_block");
        let mut up = Vec::new();
        let mut previous = top;
        for (i, &out) in channels.iter().rev().enumerate() {
            let block = d.pp(format!("up_blocks.{i}"));
            let resnets = (0..=config.layers_per_block)
                .map(|j| Resnet::load(&block.pp(format!("resnets.{j}")), groups, if j == 0 { previous } else { out }, out))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let upsample = if i + 1 < channels.len() { Some(conv(&block, "upsamplers.0.conv", out, out, 3)?) } else { None };
            up.push((resnets, upsample));
            previous = out;
        }
        Ok(Decoder {
            post_quant_conv: if config.use_post_quant_conv {
                Some(conv(vb, "post_quant_conv", config.latent_channels, config.latent_channels, 1)?)
            } else {
                None
            },
            conv_in: conv(&d, "conv_in", config.latent_channels, top, 3)?,
            mid: (
                Resnet::load(&mid.pp("resnets.0"), groups, top, top)?,
                SpatialAttention::load(&mid.pp("attentions.0"), groups, top)?,
                Resnet::load(&mid.pp("resnets.1"), groups, top, top)?,
            ),
            up,
            norm_out: group_norm(&d, "conv_norm_out", groups, channels[0])?,
            conv_out: conv(&d, "conv_out", channels[0], config.out_channels, 3)?,
        })
    }

    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        let mut x = self.conv_in.forward(&z)?;
        x = self.mid.0.forward(&x)?;
        x = self.mid.1.forward(&x)?;
        x = self.mid.2.forward(&x)?;
        for (resnets, upsample) in &self.up {
            for r in resnets {
                x = r.forward(&x)?;
            }
            if let Some(c) = upsample {
                let (_, _, h, w) = x.dims4()?;
                x = c.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&x)?.silu()?)
    }
}

/// How a latent is decoded to pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoding {
    /// In one piece, as diffusers' `AutoencoderKL.decode` does by default.
    Whole,
    /// In overlapping tiles of the config's `sample_size` pixels, blended at
    /// the seams, as diffusers does after `enable_tiling()`: less memory, and
    /// pixels that differ from a whole decode. A latent of one tile or less
    /// is decoded whole.
    Tiled,
}

impl Decoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Decoding::Whole => "whole",
            Decoding::Tiled => "tiled",
        }
    }
}

/// Elements a 3×3 convolution keeps at its peak per input element: the
/// padded input, nine shifted copies for the product, and the block's
/// residual input (the output is counted with the next layer's input).
const CONV_PEAK_PER_INPUT: u64 = 12;

/// A loaded VAE.
pub struct Vae {
    model: Decoder,
    /// Loaded only when asked for ([`Vae::open_autoencoder`]).
    encoder: Option<encoder::Encoder>,
    /// The decoder's channels per level, from the widest resolution.
    block_out_channels: Vec<usize>,
    latent_channels: usize,
    /// Pixels per latent cell a side: 2^(blocks − 1), 8 for SD3.
    scale_factor: usize,
    scaling_factor: f64,
    shift_factor: f64,
    /// Tile side in latent cells and in pixels.
    tile_latent: usize,
    tile_pixels: usize,
    dtype: DType,
}

impl Vae {
    /// Opens a diffusers VAE (a model folder with `vae/`, or the `vae/`
    /// folder itself, its weights whole or sharded) or the decoder of an SD3
    /// single file.
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] naming what is missing or malformed.
    pub fn open(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Vae, EngineError> {
        Self::from_component(&Self::component(path.as_ref())?, dtype, device, None)
    }

    /// [`Vae::open`] with the encoder as well, for encoding images
    /// ([`Vae::encode`]): a diffusers `vae/` folder whose weights have one.
    /// Rendering never needs it, so [`Vae::open`] leaves it unread.
    ///
    /// # Errors
    /// As [`Vae::open`]; [`EngineError::Checkpoint`] for weights without an
    /// encoder, or a single file (whose encoder names are not mapped).
    pub fn open_autoencoder(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Vae, EngineError> {
        let path = path.as_ref();
        let c = Self::component(path)?;
        let Some(config) = &c.config else {
            return Err(EngineError::checkpoint(path, "a single file's encoder is not read: give a diffusers `vae/` folder"));
        };
        let config: VaeConfig = crate::read_json(config, "a VAE config")?;
        let vb = FilesBackend::new(c.files.clone(), &c.prefix).into_var_builder(dtype, device);
        if !vb.contains_tensor("encoder.conv_in.weight") {
            return Err(EngineError::checkpoint(path, "these VAE weights have no encoder (encoder.conv_in.weight)"));
        }
        Self::build(config, vb, true, dtype, path)
    }

    /// An autoencoder (encoder and decoder) of `config` over the tensors
    /// `vb` gives, for training: built from a `VarMap`, every weight is one
    /// of its variables or a view of one, and every op has a gradient.
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] when `vb` lacks a tensor or has it misshapen.
    pub fn autoencoder(config: VaeConfig, vb: VarBuilder, dtype: DType) -> Result<Vae, EngineError> {
        Self::build(config, vb, true, dtype, Path::new("(variables)"))
    }

    fn component(path: &Path) -> Result<ComponentFiles, EngineError> {
        let component = if path.is_file() {
            ComponentFiles::file(Part::Vae, path)?
        } else {
            let dir: PathBuf = if path.join("vae").is_dir() { path.join("vae") } else { path.to_owned() };
            ComponentFiles::folder(Part::Vae, &dir, "diffusion_pytorch_model")?
        };
        Ok(component)
    }

    /// The VAE of a resolved model; with `dry`, checks and records what it
    /// would load instead of loading it.
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] naming what is missing or malformed.
    pub fn from_component(c: &ComponentFiles, dtype: DType, device: &Device, dry: Option<Arc<Mutex<DryRun>>>) -> Result<Vae, EngineError> {
        let path = c.files.paths().first().cloned().unwrap_or_default();
        let (config, backend) = match &c.config {
            Some(config) => {
                let config: VaeConfig = crate::read_json(config, "a VAE config")?;
                (config, FilesBackend::new(c.files.clone(), &c.prefix))
            }
            None => {
                let (config, prefix) = Self::single_file_config(&c.files, &path)?;
                let up = config.block_out_channels.len();
                (config, FilesBackend::new(c.files.clone(), &prefix).renamed(move |name| ldm_name(name, up)))
            }
        };
        let backend = match dry {
            Some(dry) => backend.dry(dry),
            None => backend,
        };
        Self::build(config, backend.into_var_builder(dtype, device), false, dtype, &path)
    }

    /// The decoder of an SD3 single file: `first_stage_model.decoder.*` (or
    /// `decoder.*`) in LDM names. Channel widths, depth and latent channels
    /// come from the shapes; the group count (32 in SD3) and tile size
    /// (1024) from the file's metadata when it has them.
    fn single_file_config(files: &TensorFiles, path: &Path) -> Result<(VaeConfig, String), EngineError> {
        let prefix = if files.has_prefix("first_stage_model.decoder.") {
            "first_stage_model."
        } else if files.has_prefix("decoder.up.") {
            ""
        } else {
            return Err(EngineError::checkpoint(path, "no VAE decoder (first_stage_model.decoder.*) in this file"));
        };
        let shape = |key: &str| {
            files
                .info(&format!("{prefix}{key}"))
                .map(|i| i.shape.clone())
                .ok_or_else(|| EngineError::MissingTensor { key: format!("{prefix}{key}") })
        };
        let mut widths = Vec::new();
        while let Ok(s) = shape(&format!("decoder.up.{}.block.0.conv1.weight", widths.len())) {
            widths.push(s[0]);
        }
        let mut layers = 0;
        while files.info(&format!("{prefix}decoder.up.0.block.{}.conv1.weight", layers + 1)).is_some() {
            layers += 1;
        }
        let metadata = crate::checkpoint::read_metadata(path)?;
        let number = |key: &str, default: usize| -> Result<usize, EngineError> {
            metadata.get(key).map_or(Ok(default), |v| {
                v.parse().map_err(|_| EngineError::checkpoint(path, format!("metadata {key}={v} is not a number")))
            })
        };
        let config = VaeConfig {
            latent_channels: shape("decoder.conv_in.weight")?[1],
            out_channels: shape("decoder.conv_out.weight")?[0],
            block_out_channels: widths,
            layers_per_block: layers,
            norm_num_groups: number("norm_num_groups", 32)?,
            use_post_quant_conv: files.info(&format!("{prefix}post_quant_conv.weight")).is_some(),
            use_quant_conv: false,
            in_channels: 3,
            scaling_factor: None,
            shift_factor: None,
            sample_size: number("sample_size", 1024)?,
        };
        if config.block_out_channels.is_empty() {
            return Err(EngineError::checkpoint(path, "no decoder up blocks"));
        }
        Ok((config, prefix.to_owned()))
    }

    fn build(config: VaeConfig, vb: VarBuilder, with_encoder: bool, dtype: DType, path: &Path) -> Result<Vae, EngineError> {
        let scale_factor = 1usize << config.block_out_channels.len().saturating_sub(1);
        let unfit = |e: candle_core::Error| EngineError::checkpoint(path, format!("weights do not fit the config: {e}"));
        let model = Decoder::load(&vb, &config).map_err(unfit)?;
        let encoder = if with_encoder { Some(encoder::Encoder::load(&vb, &config).map_err(unfit)?) } else { None };
        Ok(Vae {
            model,
            encoder,
            block_out_channels: config.block_out_channels.clone(),
            latent_channels: config.latent_channels,
            scale_factor,
            tile_latent: (config.sample_size / scale_factor).max(1),
            tile_pixels: config.sample_size,
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

    /// What `requested` comes to for a latent of `h × w` cells: a tiled
    /// decode of one tile or less is a whole one.
    pub fn decoding_for(&self, requested: Decoding, h: usize, w: usize) -> Decoding {
        match requested {
            Decoding::Tiled if h > self.tile_latent || w > self.tile_latent => Decoding::Tiled,
            _ => Decoding::Whole,
        }
    }

    /// An upper estimate of the bytes a whole decode of `batch` latents of
    /// `h × w` cells holds at its peak: the widest convolution input of any
    /// level times [`CONV_PEAK_PER_INPUT`], or the mid block's attention
    /// ((h·w)² scores and probabilities, and the softmax's F32 copy),
    /// whichever is larger. Weights are not
    /// counted; they are loaded already.
    pub fn whole_decode_bytes(&self, batch: usize, h: usize, w: usize) -> u64 {
        decode_peak_bytes(&self.block_out_channels, self.dtype.size_in_bytes() as u64, batch, h, w)
    }

    /// Whether these weights have an encoder.
    pub fn has_encoder(&self) -> bool {
        self.encoder.is_some()
    }

    /// The latent distribution of images (B, 3, H, W) in [-1, 1], sides
    /// multiples of [`Vae::scale_factor`]: its mean and log-variance
    /// (clamped to [−30, 20] as the reference does), (B, latent, H/f, W/f)
    /// each, F32, before SD3's latent format.
    ///
    /// # Errors
    /// [`EngineError::Input`] without an encoder or for sides the encoder
    /// cannot halve.
    pub fn encode_distribution(&self, image: &Tensor) -> Result<(Tensor, Tensor), EngineError> {
        let encoder = self
            .encoder
            .as_ref()
            .ok_or_else(|| EngineError::Input("this VAE was opened without its encoder: open it with Vae::open_autoencoder".into()))?;
        let (_, _, h, w) = image.dims4()?;
        let f = self.scale_factor;
        if h == 0 || w == 0 || h % f != 0 || w % f != 0 {
            return Err(EngineError::Input(format!("an image of {w}×{h}: sides must be positive multiples of {f} to encode")));
        }
        let moments = encoder.forward(&image.to_dtype(self.dtype)?)?.to_dtype(DType::F32)?;
        let mean = moments.narrow(1, 0, self.latent_channels)?;
        let logvar = moments.narrow(1, self.latent_channels, self.latent_channels)?.clamp(-30f32, 20f32)?;
        Ok((mean, logvar))
    }

    /// Sampler latents of images: the distribution's mean in SD3's latent
    /// format, (mean − shift_factor)·scaling_factor.
    ///
    /// # Errors
    /// As [`Vae::encode_distribution`].
    pub fn encode(&self, image: &Tensor) -> Result<Tensor, EngineError> {
        let (mean, _) = self.encode_distribution(image)?;
        Ok(((mean - self.shift_factor)? * self.scaling_factor)?)
    }

    /// Decodes latents in the VAE's own space (a sample of
    /// [`Vae::encode_distribution`], before the latent format) to images,
    /// F32: what training reconstructs with.
    ///
    /// # Errors
    /// [`EngineError::Input`] for a latent of the wrong channel count.
    pub fn decode_raw(&self, z: &Tensor) -> Result<Tensor, EngineError> {
        let (_, c, _, _) = z.dims4()?;
        if c != self.latent_channels {
            return Err(EngineError::Input(format!("latent has {c} channels; this VAE takes {}", self.latent_channels)));
        }
        Ok(self.model.forward(&z.to_dtype(self.dtype)?)?.to_dtype(DType::F32)?)
    }

    /// Decodes sampler latents (B, 16, h, w) to images (B, 3, 8h, 8w) in
    /// about [-1, 1], F32, whole or in tiles.
    ///
    /// # Errors
    /// [`EngineError::Input`] for a latent of the wrong channel count.
    pub fn decode(&self, latent: &Tensor, decoding: Decoding) -> Result<Tensor, EngineError> {
        let (_, c, _, _) = latent.dims4()?;
        if c != self.latent_channels {
            return Err(EngineError::Input(format!("latent has {c} channels; this VAE takes {}", self.latent_channels)));
        }
        let z = ((latent.to_dtype(DType::F32)? / self.scaling_factor)? + self.shift_factor)?.to_dtype(self.dtype)?;
        let (_, _, h, w) = z.dims4()?;
        let image = match self.decoding_for(decoding, h, w) {
            Decoding::Tiled => self.decode_tiled(&z)?,
            Decoding::Whole => self.model.forward(&z)?,
        };
        Ok(image.to_dtype(DType::F32)?)
    }

    /// Tiles of `tile_latent` cells every `tile_latent·(1 − overlap)` cells;
    /// each tile's top and left `tile_pixels·overlap` rows fade in from its
    /// already blended neighbours, and the tiles' bottom-right remainders are
    /// cut off. Same order of operations as the reference, blends included.
    fn decode_tiled(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = z.dims4()?;
        let step = ((self.tile_latent as f64) * (1.0 - TILE_OVERLAP)) as usize;
        let blend = ((self.tile_pixels as f64) * TILE_OVERLAP) as usize;
        let keep = self.tile_pixels - blend;
        let starts = |len: usize| (0..len).step_by(step.max(1)).collect::<Vec<_>>();
        let mut rows: Vec<Vec<Tensor>> = Vec::new();
        for &i in &starts(h) {
            let mut row = Vec::new();
            for &j in &starts(w) {
                let tile = z.narrow(2, i, self.tile_latent.min(h - i))?.narrow(3, j, self.tile_latent.min(w - j))?;
                row.push(self.model.forward(&tile.contiguous()?)?);
            }
            rows.push(row);
        }
        // Blend in place, as the reference does: later tiles see earlier tiles' blended pixels.
        let mut out_rows = Vec::with_capacity(rows.len());
        for i in 0..rows.len() {
            let mut out_row = Vec::with_capacity(rows[i].len());
            for j in 0..rows[i].len() {
                let mut tile = rows[i][j].clone();
                if i > 0 {
                    tile = blend_along(&rows[i - 1][j], &tile, blend, 2)?;
                }
                if j > 0 {
                    tile = blend_along(&rows[i][j - 1], &tile, blend, 3)?;
                }
                rows[i][j] = tile.clone();
                let (th, tw) = (tile.dim(2)?.min(keep), tile.dim(3)?.min(keep));
                out_row.push(tile.narrow(2, 0, th)?.narrow(3, 0, tw)?);
            }
            out_rows.push(Tensor::cat(&out_row, 3)?);
        }
        Tensor::cat(&out_rows, 2)
    }
}

/// The LDM (single-file) name of a diffusers decoder weight; `up` is the
/// number of up blocks, which LDM numbers from the bottom.
pub(crate) fn ldm_name(name: &str, up: usize) -> String {
    let mut n = name.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut");
    for i in 0..2 {
        n = n.replace(&format!("mid_block.resnets.{i}."), &format!("mid.block_{}.", i + 1));
    }
    if n.contains("mid_block.attentions.0.") {
        n = n.replace("mid_block.attentions.0.", "mid.attn_1.");
        for (a, b) in [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")] {
            n = n.replace(a, b);
        }
    }
    for i in 0..up {
        n = n.replace(&format!("up_blocks.{i}.resnets."), &format!("up.{}.block.", up - 1 - i));
        n = n.replace(&format!("up_blocks.{i}.upsamplers.0."), &format!("up.{}.upsample.", up - 1 - i));
    }
    n
}

/// `b` with its first `extent` rows (dim 2) or columns (dim 3) faded in from
/// the last ones of `a`: b[y] = a[−extent + y]·(1 − y/extent) + b[y]·(y/extent).
fn blend_along(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> candle_core::Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let (a_len, b_len) = (a.dim(dim)?, b.dim(dim)?);
    let mut parts = Vec::with_capacity(extent + 1);
    for y in 0..extent {
        let t = y as f64 / extent as f64;
        parts.push(((a.narrow(dim, a_len - extent + y, 1)? * (1.0 - t))? + (b.narrow(dim, y, 1)? * t)?)?);
    }
    parts.push(b.narrow(dim, extent, b_len - extent)?);
    Tensor::cat(&parts, dim)
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

/// [`Vae::whole_decode_bytes`] for a decoder of `block_out_channels` whose
/// elements are `bytes` wide (the memory planner uses it without a VAE).
pub fn decode_peak_bytes(block_out_channels: &[usize], bytes: u64, batch: usize, h: usize, w: usize) -> u64 {
    let mut pixels = (h * w) as u64;
    let top = block_out_channels.last().copied().unwrap_or(0) as u64;
    // The mid block's attention: scores and probabilities in the VAE's
    // dtype, and the softmax's F32 copy of them.
    let attention = pixels * pixels * (2 * bytes + 8);
    let mut peak = 0u64;
    let mut previous = top;
    let levels = block_out_channels.len();
    for (i, &out) in block_out_channels.iter().rev().enumerate() {
        let out = out as u64;
        // The level's first convolution takes the previous level's channels.
        peak = peak.max(previous.max(out) * pixels * CONV_PEAK_PER_INPUT);
        if i + 1 < levels {
            pixels *= 4;
            peak = peak.max(out * pixels * CONV_PEAK_PER_INPUT);
        }
        previous = out;
    }
    (peak * bytes).max(attention) * batch as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], k: &[f32], c: usize, o: usize, h: usize, w: usize) -> Vec<f32> {
        let mut out = vec![0f32; o * h * w];
        for oc in 0..o {
            for y in 0..h {
                for xx in 0..w {
                    let mut sum = 0f32;
                    for ic in 0..c {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) = (y as isize + ky as isize - 1, xx as isize + kx as isize - 1);
                                if iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize {
                                    sum += x[ic * h * w + iy as usize * w + ix as usize] * k[((oc * c + ic) * 3 + ky) * 3 + kx];
                                }
                            }
                        }
                    }
                    out[oc * h * w + y * w + xx] = sum;
                }
            }
        }
        out
    }

    /// Including 16→32 channels at 16×16, which candle 0.9.2's conv2d gets wrong.
    #[test]
    fn convolution_matches_the_definition() {
        for (c, o, h, w) in [(16, 32, 16, 16), (16, 32, 8, 8), (3, 5, 7, 9), (32, 16, 16, 16)] {
            let x = Tensor::randn(0f32, 1.0, (1, c, h, w), &Device::Cpu).unwrap();
            let k = Tensor::randn(0f32, 1.0, (o, c, 3, 3), &Device::Cpu).unwrap();
            let conv =
                Conv2d { weight: k.reshape((o, c * 9)).unwrap(), bias: Tensor::zeros(o, DType::F32, &Device::Cpu).unwrap(), kernel: 3 };
            let got = conv.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = naive(&x.flatten_all().unwrap().to_vec1().unwrap(), &k.flatten_all().unwrap().to_vec1().unwrap(), c, o, h, w);
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-3, "{c}→{o} at {h}×{w}: {worst}");
        }
    }
}
