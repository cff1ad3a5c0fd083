//! Prompt to pixels, as diffusers' StableDiffusion3Pipeline does it: the
//! three text encoders' conditioning, the Euler flow-matching sampler, the
//! VAE decoder.
//!
//! Conditioning (`encode_prompt` in the reference): CLIP-L and CLIP-G
//! penultimate states side by side (77 tokens), zero-padded to T5's width,
//! then T5's sequence appended (or zeros of the transformer's text width when
//! T5 is left out); pooled = CLIP-L pooled ‖ CLIP-G pooled, both projected.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use flowfarm_core::shift::flow_match_sigmas;

use crate::cache::{cache_key, EmbeddingCache};
use crate::clip::ClipTextEncoder;
use crate::identity::WeightsIdentity;
use crate::sampler::{sample_batch, JobStepCallback, Replica, Replicas, SampleJob, StepCallback};
use crate::source::{ComponentFiles, ModelLayout, ModelSource, Part as ModelPart};
use crate::stages::{split_blocks, BlockPipeline, Stage};
use crate::t5::T5Encoder;
use crate::tokenize::{PromptTokenizer, CLIP_MAX_LENGTH};
use crate::vae::{to_rgb8, Decoding, Vae};
use crate::verify::ModelReport;
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
    fn new(c: &ComponentFiles, identity: WeightsIdentity, max_length: usize, encoder: E) -> Result<Self, EngineError> {
        let tokenizer = c.tokenizer.as_deref().ok_or_else(|| EngineError::Input(format!("{} has no tokenizer", c.part.as_str())))?;
        Ok(Part { tokenizer: PromptTokenizer::open(tokenizer, max_length)?, identity: identity.0, encoder, encodes: AtomicU64::new(0) })
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

/// Where an SD3 single file keeps each text encoder (transformers names follow).
pub const SINGLE_FILE_CLIP_L: &str = "text_encoders.clip_l.transformer.";
pub const SINGLE_FILE_CLIP_G: &str = "text_encoders.clip_g.transformer.";
pub const SINGLE_FILE_T5: &str = "text_encoders.t5xxl.transformer.";

/// Which encoders' features a conditioning keeps; the others are zeros, as
/// SD3 trains with each encoder dropped on its own (and as CLIP-only
/// rendering leaves T5 out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderMask {
    pub clip_l: bool,
    pub clip_g: bool,
    pub t5: bool,
}

impl EncoderMask {
    /// Every encoder, T5 as `use_t5` says.
    pub fn all(use_t5: bool) -> Self {
        EncoderMask { clip_l: true, clip_g: true, t5: use_t5 }
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
    /// Opens the encoders of a whole diffusers model folder
    /// (`text_encoder{,_2,_3}`, `tokenizer{,_2,_3}`; T5 optional), after
    /// examining the whole model as [`Pipeline::load`] does.
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] naming the part that is missing or malformed.
    pub fn open(dir: &Path, t5_length: usize, dtype: DType, device: &Device) -> Result<Self, EngineError> {
        let layout = ModelSource::at(dir).resolve()?;
        let report = crate::verify::examine(&layout);
        report.ensure_sound(dir)?;
        Self::from_layout(&layout, &report, t5_length, true, dtype, device)
    }

    /// The encoders of a resolved and examined model; T5's weights are not
    /// read unless `with_t5` (and the model has them).
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] when a part does not fit its config; tokenizer errors.
    pub fn from_layout(
        layout: &ModelLayout,
        report: &ModelReport,
        t5_length: usize,
        with_t5: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let identity = |part| {
            report.component(part).and_then(|c| c.identity).ok_or_else(|| EngineError::Input(format!("{} was not examined", part.as_str())))
        };
        let clip =
            |c: &ComponentFiles| Part::new(c, identity(c.part)?, CLIP_MAX_LENGTH, ClipTextEncoder::from_component(c, dtype, device, None)?);
        let t5 = match layout.t5.as_ref().filter(|_| with_t5) {
            Some(c) => Some(Part::new(c, identity(ModelPart::T5)?, t5_length, T5Encoder::from_component(c, dtype, device, None)?)?),
            None => None,
        };
        Ok(TextEncoders { clip_l: clip(&layout.clip_l)?, clip_g: clip(&layout.clip_g)?, t5, t5_length, dtype, cache: None })
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
        self.encode_masked(prompt, EncoderMask::all(use_t5), joint_width, device)
    }

    /// [`TextEncoders::encode`] with the encoders `mask` leaves out as
    /// zeros (their sequence and pooled features alike, at the shapes the
    /// encoder gives, so a dropped CLIP still runs; a dropped T5 does not).
    ///
    /// # Errors
    /// As [`TextEncoders::encode`].
    pub fn encode_masked(&self, prompt: &str, mask: EncoderMask, joint_width: usize, device: &Device) -> Result<Conditioning, EngineError> {
        let cache = self.cache.as_deref();
        let use_t5 = mask.t5;
        let clip = |part: &Part<ClipTextEncoder>| {
            part.run(prompt, self.dtype, cache, device, |e, ids| {
                let out = e.encode(ids)?;
                Ok(vec![out.penultimate.to_dtype(DType::F32)?, out.pooled])
            })
        };
        let kept = |part: &Part<ClipTextEncoder>, keep: bool| -> Result<Vec<Tensor>, EngineError> {
            let features = clip(part)?;
            if keep {
                return Ok(features);
            }
            features.iter().map(|t| Ok(t.zeros_like()?)).collect()
        };
        let (l, g) = (kept(&self.clip_l, mask.clip_l)?, kept(&self.clip_g, mask.clip_g)?);
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

/// Runs `run` on the items whose preparation succeeded (with each one's
/// index in `prepared`) and puts its outcomes back in their items' places;
/// the others keep the error they were prepared with. A batch where some
/// jobs cannot start renders the rest.
///
/// # Errors
/// What `run` says ends every item.
pub fn run_prepared<T, U>(
    prepared: Vec<Result<T, EngineError>>,
    run: impl FnOnce(Vec<T>, &[usize]) -> Result<Vec<Result<U, EngineError>>, EngineError>,
) -> Result<Vec<Result<U, EngineError>>, EngineError> {
    let mut outcomes: Vec<Option<Result<U, EngineError>>> = Vec::with_capacity(prepared.len());
    let (mut places, mut items) = (Vec::new(), Vec::new());
    for (i, item) in prepared.into_iter().enumerate() {
        match item {
            Ok(item) => {
                places.push(i);
                items.push(item);
                outcomes.push(None);
            }
            Err(e) => outcomes.push(Some(Err(e))),
        }
    }
    let done = run(items, &places)?;
    for (&i, outcome) in places.iter().zip(done) {
        outcomes[i] = Some(outcome);
    }
    Ok(outcomes.into_iter().map(|o| o.unwrap_or_else(|| Err(EngineError::Input("no outcome for this item".into())))).collect())
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
    /// How the VAE decodes the image.
    pub vae: VaeTiling,
}

/// How a render's VAE decode is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaeTiling {
    /// Whole, as the reference pipeline decodes.
    Whole,
    /// In tiles (a latent of one tile or less is still decoded whole).
    Tiled,
    /// Whole, unless [`Vae::whole_decode_bytes`] says it would not fit in
    /// the memory the device has ([`crate::device::available_memory`]; on a
    /// GPU, whose free memory is not read yet, its total).
    Auto,
}

impl VaeTiling {
    /// Parses `whole`, `tiled` or `auto`.
    ///
    /// # Errors
    /// A message naming what is accepted.
    pub fn parse(text: &str) -> Result<VaeTiling, String> {
        match text {
            "whole" => Ok(VaeTiling::Whole),
            "tiled" => Ok(VaeTiling::Tiled),
            "auto" => Ok(VaeTiling::Auto),
            other => Err(format!("`{other}` is not `whole`, `tiled` or `auto`")),
        }
    }
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
    /// How the VAE decoded it.
    pub decoding: Decoding,
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

/// How a [`Pipeline`] is loaded, beyond where its weights are.
#[derive(Debug, Clone)]
pub struct Loading {
    /// T5 tokens per prompt.
    pub t5_length: usize,
    /// The transformer's dtype (the once-per-image parts follow
    /// [`once_per_image_dtype`]).
    pub dtype: DType,
    /// Where the transformer (or its first stage) and the VAE run.
    pub device: Device,
    /// Where the text encoders run; None: on `device`. Their conditioning
    /// is moved to `device` (T5-XXL on the CPU or a card of its own).
    pub encoders: Option<Device>,
    /// Whether to load T5 when the model has it; false: CLIP-only, T5's
    /// weights never read.
    pub t5: bool,
}

impl Loading {
    /// Everything on `device`, T5 included.
    pub fn on(device: &Device, dtype: DType, t5_length: usize) -> Self {
        Loading { t5_length, dtype, device: device.clone(), encoders: None, t5: true }
    }
}

/// How a render's transformer calls are split across devices.
pub enum Split<'a> {
    /// On this pipeline's transformer alone.
    One,
    /// CFG-parallel: the conditional halves on this pipeline's transformer
    /// (on `threads`), the unconditional halves on `uncond`, at once.
    Cfg { threads: Option<&'a rayon::ThreadPool>, uncond: Replica<'a> },
    /// Through a block pipeline whose first stage is on this pipeline's device.
    Blocks(&'a BlockPipeline),
}

pub struct Pipeline {
    /// The whole transformer, or the first stage of a block pipeline.
    pub transformer: Arc<MmDit>,
    pub vae: Vae,
    pub encoders: TextEncoders,
    /// The weights' identity, the same in every form they come in.
    pub identity: WeightsIdentity,
    /// The form the model was found in, in words.
    pub form: String,
    /// The scheduler config's shift, when the model has one.
    pub scheduler_shift: Option<f64>,
    device: Device,
    encoder_device: Device,
}

impl Pipeline {
    /// Opens a diffusers model folder.
    ///
    /// # Errors
    /// As [`Pipeline::load`].
    pub fn open(dir: impl AsRef<Path>, t5_length: usize, dtype: DType, device: &Device) -> Result<Self, EngineError> {
        Self::load(&ModelSource::at(dir.as_ref()), t5_length, dtype, device)
    }

    /// Finds the model's parts in whatever form `source` names, checks them
    /// all ([`crate::verify::examine`]) and loads them.
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] naming every missing or malformed part.
    pub fn load(source: &ModelSource, t5_length: usize, dtype: DType, device: &Device) -> Result<Self, EngineError> {
        Self::load_with(source, &Loading::on(device, dtype, t5_length))
    }

    /// [`Pipeline::load`] as `loading` says.
    ///
    /// # Errors
    /// As [`Pipeline::load`].
    pub fn load_with(source: &ModelSource, loading: &Loading) -> Result<Self, EngineError> {
        Self::load_part(source, loading, None)
    }

    /// Loads the model with its transformer as a block pipeline across
    /// `stages` (a device each, and its threads for CPU devices): the
    /// returned pipeline holds the first stage's blocks, the VAE and the
    /// encoders on the first device; render with [`Split::Blocks`] of the
    /// returned [`BlockPipeline`]. The blocks are split evenly
    /// ([`split_blocks`]).
    ///
    /// # Errors
    /// As [`Pipeline::load`]; [`EngineError::Input`] for no stages, or more
    /// stages than blocks.
    pub fn load_staged(
        source: &ModelSource,
        loading: &Loading,
        stages: Vec<(Device, Option<rayon::ThreadPool>)>,
    ) -> Result<(Self, BlockPipeline), EngineError> {
        let layout = source.resolve()?;
        let checkpoint = Checkpoint::from_component(&layout.transformer)?;
        let depth = checkpoint.config()?.depth;
        if stages.is_empty() || stages.len() > depth {
            return Err(EngineError::Input(format!("{} stages for a {depth}-block model: give 1 to {depth}", stages.len())));
        }
        let ranges = split_blocks(depth, stages.len());
        let mut parts = Vec::with_capacity(stages.len());
        let mut pipeline = None;
        for ((device, threads), blocks) in stages.into_iter().zip(ranges) {
            let model = match pipeline {
                None => {
                    let first = Self::load_part(source, &Loading { device: device.clone(), ..loading.clone() }, Some(blocks))?;
                    let model = first.transformer.clone();
                    pipeline = Some(first);
                    model
                }
                Some(_) => Arc::new(checkpoint.load_stage(loading.dtype, &device, blocks)?),
            };
            parts.push(Stage { model, threads });
        }
        let pipeline = pipeline.ok_or_else(|| EngineError::Input("no stages".into()))?;
        Ok((pipeline, BlockPipeline::start(parts)?))
    }

    fn load_part(source: &ModelSource, loading: &Loading, blocks: Option<Range<usize>>) -> Result<Self, EngineError> {
        let layout = source.resolve()?;
        let report = crate::verify::examine(&layout);
        let identity = report.ensure_sound(&source.path)?;
        let scheduler_shift = match &layout.scheduler_config {
            Some(path) => crate::read_json::<serde_json::Value>(path, "a scheduler config")?.get("shift").and_then(|v| v.as_f64()),
            None => None,
        };
        let (dtype, device) = (loading.dtype, &loading.device);
        let encoder_device = loading.encoders.clone().unwrap_or_else(|| device.clone());
        let checkpoint = Checkpoint::from_component(&layout.transformer)?;
        let transformer = match blocks {
            Some(blocks) => checkpoint.load_stage(dtype, device, blocks)?,
            None => checkpoint.load_model(dtype, device)?,
        };
        Ok(Pipeline {
            transformer: Arc::new(transformer),
            vae: Vae::from_component(&layout.vae, once_per_image_dtype(dtype, device), device, None)?,
            encoders: TextEncoders::from_layout(
                &layout,
                &report,
                loading.t5_length,
                loading.t5,
                once_per_image_dtype(dtype, &encoder_device),
                &encoder_device,
            )?,
            identity,
            form: layout.form.clone(),
            scheduler_shift,
            device: device.clone(),
            encoder_device,
        })
    }

    /// Loads only the transformer of `source`, on `device`: a replica for
    /// CFG-parallel rendering ([`Pipeline::render_on`]).
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] naming what is missing or malformed.
    pub fn load_transformer(source: &ModelSource, dtype: DType, device: &Device) -> Result<MmDit, EngineError> {
        let layout = source.resolve()?;
        Checkpoint::from_component(&layout.transformer)?.load_model(dtype, device)
    }

    /// Renders one image; `on_step` sees every step and may cancel.
    ///
    /// # Errors
    /// Encoder, sampler and decoder errors; [`EngineError::Cancelled`].
    pub fn render(&self, request: &RenderRequest, on_step: &mut StepCallback) -> Result<Rendered, EngineError> {
        self.render_on(request, Split::One, on_step)
    }

    /// [`Pipeline::render`] with the transformer calls split as `split`
    /// says: CFG-parallel with a replica of the same weights
    /// ([`Pipeline::load_transformer`]) for the unconditional halves, or
    /// through a block pipeline ([`Pipeline::load_staged`]).
    ///
    /// # Errors
    /// As [`Pipeline::render`]; [`EngineError::Input`] for a block pipeline
    /// that does not start on this pipeline's device.
    pub fn render_on(&self, request: &RenderRequest, split: Split, on_step: &mut StepCallback) -> Result<Rendered, EngineError> {
        self.render_batch(std::slice::from_ref(request), split, &mut |_, step, steps| on_step(step, steps))?.remove(0)
    }

    /// Renders several requests of one latent size together: their prompts
    /// are encoded one by one, every step samples the requests still
    /// sampling in one transformer call ([`sample_batch`]), and each image
    /// is decoded on its own. Each request keeps its own prompt, seed,
    /// shift, guidance, step count and decode; `on_step(request, step,
    /// steps)` follows each one and takes it out of the batch when it says
    /// stop.
    ///
    /// Invariant: where the device's rows are independent of their batch
    /// mates (the CPU, F32 or BF16), a request renders the same bits alone
    /// and in any batch.
    ///
    /// The outcome per request: its image; [`EngineError::Cancelled`];
    /// [`EngineError::Input`] for a latent of another size than the
    /// first's; its encoders' or decoder's error.
    ///
    /// # Errors
    /// What ends every request: the split's and the transformer's errors.
    pub fn render_batch(
        &self,
        requests: &[RenderRequest],
        split: Split,
        on_step: &mut JobStepCallback,
    ) -> Result<Vec<Result<Rendered, EngineError>>, EngineError> {
        let replicas = match split {
            Split::Cfg { threads, uncond } => Replicas::Cfg { cond: Replica { model: &self.transformer, threads }, uncond },
            Split::One => Replicas::One(&self.transformer),
            Split::Blocks(stages) => {
                if !stages.devices().first().is_some_and(|d| d.same_device(&self.device)) {
                    return Err(EngineError::Input("the block pipeline must start on this pipeline's device".into()));
                }
                Replicas::Blocks(stages)
            }
        };
        let Some(first) = requests.first() else { return Ok(Vec::new()) };
        let prepared = requests.iter().map(|request| self.sample_job(request, first.initial_latent.dims())).collect();
        let scale = self.vae.scale_factor();
        let patch = self.transformer.config().patch_size;
        run_prepared(prepared, |jobs, places| {
            let latents = sample_batch(replicas, &jobs, None, &mut |job, step, steps| on_step(places[job], step, steps)).map_err(|e| {
                match e {
                    // The transformer alone assumes SD3's VAE (8 pixels a latent cell); this model's may differ.
                    EngineError::TooLarge { height, width, h_patches, w_patches, max, .. } => {
                        EngineError::TooLarge { height, width, h_patches, w_patches, max, max_px: max * patch * scale }
                    }
                    other => other,
                }
            })?;
            Ok(places.iter().zip(latents).map(|(&i, latent)| latent.and_then(|latent| self.decode(&requests[i], latent))).collect())
        })
    }

    /// A request's sampler input: its prompts' conditioning on this
    /// pipeline's device, its noise and sigmas; refused unless its latent
    /// has the `batch_latent` shape.
    fn sample_job(&self, request: &RenderRequest, batch_latent: &[usize]) -> Result<SampleJob, EngineError> {
        if request.initial_latent.dims() != batch_latent {
            return Err(EngineError::Input(format!(
                "a latent of {:?} cannot join a batch of {batch_latent:?}",
                request.initial_latent.dims()
            )));
        }
        let joint = self.transformer.config().joint_attention_dim;
        let cond = self.encoders.encode(&request.prompt, request.use_t5, joint, &self.encoder_device)?;
        let uncond = self.encoders.encode(&request.negative_prompt, request.use_t5, joint, &self.encoder_device)?;
        let here = |t: Tensor| t.to_device(&self.device);
        Ok(SampleJob {
            latent: request.initial_latent.to_device(&self.device)?,
            context: here(cond.context)?,
            pooled: here(cond.pooled)?,
            negative_context: here(uncond.context)?,
            negative_pooled: here(uncond.pooled)?,
            guidance: request.guidance,
            sigmas: flow_match_sigmas(request.shift, request.steps),
        })
    }

    /// Decodes a sampled latent as `request` asks.
    fn decode(&self, request: &RenderRequest, latent: Tensor) -> Result<Rendered, EngineError> {
        let decoding = self.decoding(request.vae, &latent)?;
        let image = self.vae.decode(&latent, decoding)?;
        let (width, height, rgb) = to_rgb8(&image.squeeze(0)?)?;
        Ok(Rendered { latent, width, height, rgb, decoding })
    }

    /// The decode `tiling` comes to for `latent` on this pipeline's device.
    fn decoding(&self, tiling: VaeTiling, latent: &Tensor) -> Result<Decoding, EngineError> {
        let (batch, _, h, w) = latent.dims4()?;
        let requested = match tiling {
            VaeTiling::Whole => Decoding::Whole,
            VaeTiling::Tiled => Decoding::Tiled,
            VaeTiling::Auto => {
                // Where free memory cannot be read (GPUs, for now), the
                // device's total bounds it: a decode that needs more than the
                // whole card is tiled.
                let room = crate::device::available_memory(&self.device).or_else(|| crate::device::device_info(&self.device).1);
                match room {
                    Some(room) if self.vae.whole_decode_bytes(batch, h, w) > room => Decoding::Tiled,
                    _ => Decoding::Whole,
                }
            }
        };
        Ok(self.vae.decoding_for(requested, h, w))
    }
}
