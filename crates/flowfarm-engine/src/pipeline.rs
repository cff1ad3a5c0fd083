//! Prompt to pixels, as diffusers' StableDiffusion3Pipeline does it: the
//! three text encoders' conditioning, the Euler flow-matching sampler, the
//! VAE decoder.
//!
//! Conditioning (`encode_prompt` in the reference): CLIP-L and CLIP-G
//! penultimate states side by side (77 tokens), zero-padded to T5's width,
//! then T5's sequence appended (or zeros of the transformer's text width when
//! T5 is left out); pooled = CLIP-L pooled ‖ CLIP-G pooled, both projected.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use flowfarm_core::shift::flow_match_sigmas;

use crate::cache::{cache_key, weights_identity, EmbeddingCache};
use crate::clip::ClipTextEncoder;
use crate::sampler::{sample, SampleJob, StepCallback};
use crate::t5::T5Encoder;
use crate::tokenize::{PromptTokenizer, CLIP_MAX_LENGTH};
use crate::vae::{to_rgb8, Vae};
use crate::{Checkpoint, EngineError, MmDit};

/// T5 tokens SD3 encodes by default.
pub const DEFAULT_T5_LENGTH: usize = 256;

/// One prompt's conditioning.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// (1, 77 + T, joint width).
    pub context: Tensor,
    /// (1, pooled width).
    pub pooled: Tensor,
}

/// One encoder with its tokenizer, the identity of its weights (for the
/// cache) and how many times it actually ran.
struct Part<E> {
    tokenizer: PromptTokenizer,
    encoder: E,
    identity: [u8; 32],
    encodes: AtomicU64,
}

impl<E> Part<E> {
    fn open(dir: &Path, n: &str, max_length: usize, open: impl FnOnce(&Path) -> Result<E, EngineError>) -> Result<Self, EngineError> {
        let encoder_dir = dir.join(format!("text_encoder{n}"));
        Ok(Part {
            tokenizer: PromptTokenizer::open(dir.join(format!("tokenizer{n}")), max_length)?,
            identity: weights_identity(&encoder_dir.join("model.safetensors"))?,
            encoder: open(&encoder_dir)?,
            encodes: AtomicU64::new(0),
        })
    }

    /// The encoder's outputs for `prompt`, from the cache when it has them.
    fn run(
        &self,
        prompt: &str,
        dtype: DType,
        cache: Option<&EmbeddingCache>,
        device: &Device,
        encode: impl FnOnce(&E, &Tensor) -> Result<Vec<Tensor>, EngineError>,
    ) -> Result<Vec<Tensor>, EngineError> {
        let ids = self.tokenizer.encode(prompt)?;
        let compute = || {
            self.encodes.fetch_add(1, Ordering::Relaxed);
            encode(&self.encoder, &Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?)
        };
        match cache {
            Some(cache) => cache.get_or_insert(cache_key(&self.identity, dtype, self.tokenizer.max_length(), &ids), compute),
            None => compute(),
        }
    }
}

impl<E> Part<E> {
    /// An encoder inside a single file under `prefix`; its tokenizer and
    /// config come from the diffusers folder `support` (`tokenizer{n}`,
    /// `text_encoder{n}/config.json`), as single files carry neither.
    fn open_single(
        file: &Path,
        support: &Path,
        n: &str,
        prefix: &str,
        max_length: usize,
        open: impl FnOnce(&Path) -> Result<E, EngineError>,
    ) -> Result<Self, EngineError> {
        // One file holds every encoder: the prefix tells their caches apart.
        use sha2::Digest;
        let mut identity = sha2::Sha256::new();
        identity.update(weights_identity(file)?);
        identity.update(prefix.as_bytes());
        Ok(Part {
            tokenizer: PromptTokenizer::open(support.join(format!("tokenizer{n}")), max_length)?,
            identity: identity.finalize().into(),
            encoder: open(&support.join(format!("text_encoder{n}")).join("config.json"))?,
            encodes: AtomicU64::new(0),
        })
    }
}

/// Where an SD3 single file keeps each text encoder (transformers names follow).
pub const SINGLE_FILE_CLIP_L: &str = "text_encoders.clip_l.transformer.";
pub const SINGLE_FILE_CLIP_G: &str = "text_encoders.clip_g.transformer.";
pub const SINGLE_FILE_T5: &str = "text_encoders.t5xxl.transformer.";

/// A text encoder's weights in a file, its transformers names under `prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightsAt {
    pub file: std::path::PathBuf,
    pub prefix: String,
}

/// Where the text encoders are when they are not in a diffusers folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncoderWeights {
    pub clip_l: WeightsAt,
    pub clip_g: WeightsAt,
    /// None: no T5 (CLIP-only).
    pub t5: Option<WeightsAt>,
}

impl EncoderWeights {
    /// The encoders inside an SD3 single file: `text_encoders.clip_l.*`,
    /// `clip_g`, and `t5xxl` when present.
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] when the file is unreadable or has no CLIP encoders.
    pub fn in_single_file(file: &Path) -> Result<Self, EngineError> {
        // SAFETY: mapped read-only; only the header is read here.
        let mapped = unsafe { candle_core::safetensors::MmapedSafetensors::new(file) }
            .map_err(|e| EngineError::checkpoint(file, format!("not a safetensors file: {e}")))?;
        let names: Vec<String> = mapped.tensors().into_iter().map(|(n, _)| n).collect();
        let has = |prefix: &str| names.iter().any(|n| n.starts_with(prefix));
        if !has(SINGLE_FILE_CLIP_L) || !has(SINGLE_FILE_CLIP_G) {
            return Err(EngineError::checkpoint(
                file,
                "no CLIP encoders (text_encoders.clip_l.*, text_encoders.clip_g.*) in this file: give the encoder files separately",
            ));
        }
        let at = |prefix: &str| WeightsAt { file: file.to_owned(), prefix: prefix.to_owned() };
        Ok(EncoderWeights {
            clip_l: at(SINGLE_FILE_CLIP_L),
            clip_g: at(SINGLE_FILE_CLIP_G),
            t5: has(SINGLE_FILE_T5).then(|| at(SINGLE_FILE_T5)),
        })
    }

    /// SD3.5-style separate files (clip_l.safetensors, clip_g.safetensors,
    /// t5xxl_*.safetensors), transformers names at the top level.
    pub fn separate(clip_l: &Path, clip_g: &Path, t5: Option<&Path>) -> Self {
        let at = |file: &Path| WeightsAt { file: file.to_owned(), prefix: String::new() };
        EncoderWeights { clip_l: at(clip_l), clip_g: at(clip_g), t5: t5.map(at) }
    }
}

/// How many times each encoder actually ran (cache misses included, hits not).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodeCounts {
    pub clip_l: u64,
    pub clip_g: u64,
    pub t5: u64,
}

/// The tokenizers and text encoders of a model; T5 may be absent (CLIP-only).
pub struct TextEncoders {
    clip_l: Part<ClipTextEncoder>,
    clip_g: Part<ClipTextEncoder>,
    t5: Option<Part<T5Encoder>>,
    t5_length: usize,
    dtype: DType,
    cache: Option<Arc<EmbeddingCache>>,
}

impl TextEncoders {
    /// Opens `text_encoder{,_2,_3}` and `tokenizer{,_2,_3}` under a diffusers
    /// model folder; T5 is optional (a folder without `text_encoder_3`).
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] naming the part that is missing or malformed.
    pub fn open(dir: &Path, t5_length: usize, dtype: DType, device: &Device) -> Result<Self, EngineError> {
        let clip = |n: &str| Part::open(dir, n, CLIP_MAX_LENGTH, |d| ClipTextEncoder::open(d, dtype, device));
        let t5 = if dir.join("text_encoder_3").is_dir() {
            Some(Part::open(dir, "_3", t5_length, |d| T5Encoder::open(d, dtype, device))?)
        } else {
            None
        };
        Ok(TextEncoders { clip_l: clip("")?, clip_g: clip("_2")?, t5, t5_length, dtype, cache: None })
    }

    /// Opens encoders from files outside a diffusers folder (inside an SD3
    /// single file, or SD3.5-style separate files), with tokenizers and
    /// configs from the diffusers folder `support`.
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] when a part does not fit its config;
    /// tokenizer errors.
    pub fn open_weights(
        weights: &EncoderWeights,
        support: &Path,
        t5_length: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let clip = |n: &str, at: &WeightsAt| {
            Part::open_single(&at.file, support, n, &at.prefix, CLIP_MAX_LENGTH, |config| {
                ClipTextEncoder::open_with(config, &at.file, &at.prefix, dtype, device)
            })
        };
        let t5 = match &weights.t5 {
            Some(at) => Some(Part::open_single(&at.file, support, "_3", &at.prefix, t5_length, |config| {
                T5Encoder::open_with(config, &at.file, &at.prefix, dtype, device)
            })?),
            None => None,
        };
        Ok(TextEncoders { clip_l: clip("", &weights.clip_l)?, clip_g: clip("_2", &weights.clip_g)?, t5, t5_length, dtype, cache: None })
    }

    /// Shares `cache` for every encoding from now on.
    pub fn with_cache(mut self, cache: Arc<EmbeddingCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Whether T5 weights were found.
    pub fn has_t5(&self) -> bool {
        self.t5.is_some()
    }

    pub fn encode_counts(&self) -> EncodeCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EncodeCounts {
            clip_l: get(&self.clip_l.encodes),
            clip_g: get(&self.clip_g.encodes),
            t5: self.t5.as_ref().map_or(0, |t| get(&t.encodes)),
        }
    }

    /// Conditioning for `prompt`. With `use_t5` false (or no T5 weights) the
    /// T5 part is zeros, `joint_width` wide, as SD3 allows.
    ///
    /// # Errors
    /// [`EngineError::Input`] when the widths cannot be assembled, tokenizer errors.
    pub fn encode(&self, prompt: &str, use_t5: bool, joint_width: usize, device: &Device) -> Result<Conditioning, EngineError> {
        let cache = self.cache.as_deref();
        let clip = |part: &Part<ClipTextEncoder>| {
            part.run(prompt, self.dtype, cache, device, |e, ids| {
                let out = e.encode(ids)?;
                Ok(vec![out.penultimate.to_dtype(DType::F32)?, out.pooled])
            })
        };
        let (l, g) = (clip(&self.clip_l)?, clip(&self.clip_g)?);
        let clip = Tensor::cat(&[&l[0], &g[0]], 2)?;
        let t5 = match (&self.t5, use_t5) {
            (Some(part), true) => part.run(prompt, self.dtype, cache, device, |e, ids| Ok(vec![e.encode(ids)?]))?.remove(0),
            _ => Tensor::zeros((1, self.t5_length, joint_width), DType::F32, device)?,
        };
        let width = t5.dim(2)?;
        let clip_width = clip.dim(2)?;
        if clip_width > width {
            return Err(EngineError::Input(format!("CLIP states are {clip_width} wide, more than T5's {width}")));
        }
        let clip = clip.pad_with_zeros(2, 0, width - clip_width)?;
        Ok(Conditioning { context: Tensor::cat(&[&clip, &t5], 1)?, pooled: Tensor::cat(&[&l[1], &g[1]], 1)? })
    }

    /// Conditioning for several prompts; equal prompts are encoded once.
    ///
    /// # Errors
    /// As [`TextEncoders::encode`].
    pub fn encode_many(
        &self,
        prompts: &[&str],
        use_t5: bool,
        joint_width: usize,
        device: &Device,
    ) -> Result<Vec<Conditioning>, EngineError> {
        let mut done: HashMap<&str, Conditioning> = HashMap::new();
        prompts
            .iter()
            .map(|&p| {
                if let Some(c) = done.get(p) {
                    return Ok(c.clone());
                }
                let c = self.encode(p, use_t5, joint_width, device)?;
                done.insert(p, c.clone());
                Ok(c)
            })
            .collect()
    }
}

/// What to render.
#[derive(Debug, Clone)]
pub struct RenderRequest {
    pub prompt: String,
    pub negative_prompt: String,
    /// (1, 16, h, w) initial noise.
    pub initial_latent: Tensor,
    pub steps: u32,
    pub guidance: f32,
    /// Timestep shift α.
    pub shift: f64,
    /// False: CLIP-only (T5 replaced by zeros).
    pub use_t5: bool,
}

/// A rendered image.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// (1, 16, h, w) before decoding.
    pub latent: Tensor,
    pub width: usize,
    pub height: usize,
    /// Interleaved RGB, 8 bits.
    pub rgb: Vec<u8>,
}

/// A whole model: transformer, VAE and text encoders.
/// candle's CPU backend has no BF16 matmul and the text encoders and the VAE
/// use candle's layers, so on the CPU they run in F32 when the transformer
/// runs in BF16 (they run once per image, not once per step).
fn once_per_image_dtype(dtype: DType, device: &Device) -> DType {
    if dtype == DType::BF16 && device.is_cpu() {
        DType::F32
    } else {
        dtype
    }
}

pub struct Pipeline {
    pub transformer: MmDit,
    pub vae: Vae,
    pub encoders: TextEncoders,
    device: Device,
}

impl Pipeline {
    /// Opens a diffusers model folder.
    ///
    /// # Errors
    /// As the parts' `open`.
    pub fn open(dir: impl AsRef<Path>, t5_length: usize, dtype: DType, device: &Device) -> Result<Self, EngineError> {
        let dir = dir.as_ref();
        Ok(Pipeline {
            transformer: Checkpoint::open(dir)?.load_model(dtype, device)?,
            vae: Vae::open(dir, once_per_image_dtype(dtype, device), device)?,
            encoders: TextEncoders::open(dir, t5_length, once_per_image_dtype(dtype, device), device)?,
            device: device.clone(),
        })
    }

    /// Opens a single file holding transformer and VAE, with the text
    /// encoders in it (SD3) or in separate files (SD3.5); tokenizers and
    /// encoder configs come from the diffusers folder `support` (single files
    /// carry neither).
    ///
    /// # Errors
    /// As the parts' `open`.
    pub fn open_single_file(
        file: impl AsRef<Path>,
        encoders: &EncoderWeights,
        support: impl AsRef<Path>,
        t5_length: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let file = file.as_ref();
        Ok(Pipeline {
            transformer: Checkpoint::open(file)?.load_model(dtype, device)?,
            vae: Vae::open(file, once_per_image_dtype(dtype, device), device)?,
            encoders: TextEncoders::open_weights(encoders, support.as_ref(), t5_length, once_per_image_dtype(dtype, device), device)?,
            device: device.clone(),
        })
    }

    /// Renders one image; `on_step` sees every step and may cancel.
    ///
    /// # Errors
    /// Encoder, sampler and decoder errors; [`EngineError::Cancelled`].
    pub fn render(&self, request: &RenderRequest, on_step: &mut StepCallback) -> Result<Rendered, EngineError> {
        let joint = self.transformer.config().joint_attention_dim;
        let cond = self.encoders.encode(&request.prompt, request.use_t5, joint, &self.device)?;
        let uncond = self.encoders.encode(&request.negative_prompt, request.use_t5, joint, &self.device)?;
        let job = SampleJob {
            latent: request.initial_latent.to_device(&self.device)?,
            context: cond.context,
            pooled: cond.pooled,
            negative_context: uncond.context,
            negative_pooled: uncond.pooled,
            guidance: request.guidance,
            sigmas: flow_match_sigmas(request.shift, request.steps),
        };
        let scale = self.vae.scale_factor();
        let patch = self.transformer.config().patch_size;
        let latent = sample(&self.transformer, &[job], None, on_step)
            .map_err(|e| match e {
                // The transformer alone assumes SD3's VAE (8 pixels a latent cell); this model's may differ.
                EngineError::TooLarge { height, width, h_patches, w_patches, max, .. } => {
                    EngineError::TooLarge { height, width, h_patches, w_patches, max, max_px: max * patch * scale }
                }
                other => other,
            })?
            .remove(0);
        let image = self.vae.decode(&latent)?;
        let (width, height, rgb) = to_rgb8(&image.squeeze(0)?)?;
        Ok(Rendered { latent, width, height, rgb })
    }
}
