//! One job, prompt to PNG bytes, through flowfarm-engine.

use std::sync::Arc;

use candle_core::{DType, Device};
use flowfarm_core::{ResolvedJob, TextEncoderSet};
use flowfarm_engine::cache::EmbeddingCache;
use flowfarm_engine::noise::initial_latent;
use flowfarm_engine::pipeline::{run_prepared, Loading, Pipeline, RenderRequest, Rendered, Split, VaeTiling};
use flowfarm_engine::png_output::{encode, RenderParameters};
use flowfarm_engine::sampler::Replica;
use flowfarm_engine::stages::BlockPipeline;
use flowfarm_engine::vae::Decoding;
use flowfarm_engine::MmDit;
use flowfarm_engine::{EngineError, ModelSource};
use flowfarm_proto::v1 as pb;

/// The resolved spec StartJob returned, as the engine renders it.
///
/// # Errors
/// [`EngineError::Input`] naming what the coordinator left unresolved.
pub fn resolved_job(job: &pb::Job) -> Result<ResolvedJob, EngineError> {
    let spec = job.spec.as_ref().ok_or_else(|| EngineError::Input(format!("job {} has no spec", job.id)))?;
    let missing = |what: &str| EngineError::Input(format!("job {} has no resolved {what}", job.id));
    Ok(ResolvedJob {
        model: spec.model.clone(),
        prompt: spec.prompt.clone(),
        negative_prompt: spec.negative_prompt.clone(),
        width: spec.width,
        height: spec.height,
        steps: spec.steps,
        guidance: spec.guidance_scale.ok_or_else(|| missing("guidance_scale"))?,
        seed: spec.seed.ok_or_else(|| missing("seed"))?,
        shift: spec.shift.ok_or_else(|| missing("shift"))?,
        text_encoders: if spec.text_encoders == pb::TextEncoderSet::ClipOnly as i32 {
            TextEncoderSet::ClipOnly
        } else {
            TextEncoderSet::All
        },
        priority: spec.priority,
        max_attempts: spec.max_attempts,
        labels: spec.labels.clone().into_iter().collect(),
        tile_vae: spec.tile_vae,
    })
}

fn parameters(job: &ResolvedJob, model_hash: String, decoding: Decoding) -> RenderParameters {
    RenderParameters {
        prompt: job.prompt.clone(),
        negative_prompt: job.negative_prompt.clone(),
        model: job.model.clone(),
        model_hash: Some(model_hash),
        width: job.width,
        height: job.height,
        steps: job.steps,
        guidance: job.guidance,
        seed: job.seed,
        shift: job.shift,
        sampler: "euler-flow-matching".into(),
        text_encoders: job.text_encoders.as_str().into(),
        vae_decode: Some(decoding.as_str().into()),
    }
}

/// A loaded model that renders jobs; `Send + Sync`, one per model.
pub struct JobRenderer {
    pipeline: Pipeline,
    device: Device,
    /// For jobs that leave it to the worker.
    vae_tiling: VaeTiling,
    /// How its transformer calls are split across devices.
    split: Splitting,
}

enum Splitting {
    One,
    /// CFG-parallel: the unconditional half on another device's replica.
    Cfg(Box<CfgPartner>),
    /// The blocks across several devices; renders in flight together.
    Blocks(BlockPipeline),
}

/// The second device of a CFG pair, and the threads of both halves (CPU
/// devices split the cores); one render at a time uses them.
struct CfgPartner {
    model: MmDit,
    threads: [Option<rayon::ThreadPool>; 2],
    one_at_a_time: std::sync::Mutex<()>,
}

impl JobRenderer {
    /// Finds, checks and loads the model `source` names, in any published
    /// form, as `loading` says (device, dtype, encoder placement, T5 or not).
    ///
    /// # Errors
    /// [`EngineError`] naming every part of the model that is missing or malformed.
    pub fn open(source: &ModelSource, loading: &Loading, cache: Arc<EmbeddingCache>) -> Result<Self, EngineError> {
        let mut pipeline = Pipeline::load_with(source, loading)?;
        pipeline.encoders = pipeline.encoders.with_cache(cache);
        Ok(JobRenderer { pipeline, device: loading.device.clone(), vae_tiling: VaeTiling::Auto, split: Splitting::One })
    }

    /// [`JobRenderer::open`] with the transformer's blocks split across
    /// `stages` (a device each, with its threads for CPU devices); the
    /// VAE and, unless `loading` places them, the encoders on the first.
    ///
    /// # Errors
    /// As [`JobRenderer::open`]; more stages than blocks.
    pub fn open_staged(
        source: &ModelSource,
        loading: &Loading,
        cache: Arc<EmbeddingCache>,
        stages: Vec<(Device, Option<rayon::ThreadPool>)>,
    ) -> Result<Self, EngineError> {
        let (mut pipeline, blocks) = Pipeline::load_staged(source, loading, stages)?;
        pipeline.encoders = pipeline.encoders.with_cache(cache);
        let device = blocks.devices()[0].clone();
        Ok(JobRenderer { pipeline, device, vae_tiling: VaeTiling::Auto, split: Splitting::Blocks(blocks) })
    }

    /// The stages' block ranges, for a block pipeline.
    pub fn stage_blocks(&self) -> Option<Vec<std::ops::Range<usize>>> {
        match &self.split {
            Splitting::Blocks(blocks) => Some(blocks.ranges().to_vec()),
            _ => None,
        }
    }

    /// The same renderer, CFG-parallel: the unconditional half of every
    /// step on a replica of the transformer loaded on `partner`. Two CPU
    /// devices split the cores between them.
    ///
    /// # Errors
    /// [`EngineError`] loading the replica, or making the threads.
    pub fn with_cfg_partner(mut self, source: &ModelSource, partner: &Device, dtype: DType) -> Result<Self, EngineError> {
        let model = Pipeline::load_transformer(source, dtype, partner)?;
        let both_cpu = self.device.is_cpu() && partner.is_cpu();
        let half = (std::thread::available_parallelism().map_or(2, |n| n.get()) / 2).max(1);
        let threads = || -> Result<Option<rayon::ThreadPool>, EngineError> {
            if !both_cpu {
                return Ok(None);
            }
            let pool = rayon::ThreadPoolBuilder::new().num_threads(half).build();
            Ok(Some(pool.map_err(|e| EngineError::Input(format!("CFG threads: {e}")))?))
        };
        self.split =
            Splitting::Cfg(Box::new(CfgPartner { model, threads: [threads()?, threads()?], one_at_a_time: std::sync::Mutex::new(()) }));
        Ok(self)
    }

    /// The same renderer, decoding jobs that leave it to the worker as `tiling` says.
    pub fn with_vae_tiling(mut self, tiling: VaeTiling) -> Self {
        self.vae_tiling = tiling;
        self
    }

    /// The weights' identity (64 hex characters), the same in every form.
    pub fn model_hash(&self) -> String {
        self.pipeline.identity.hex()
    }

    /// Whether this model can serve jobs that use T5.
    pub fn has_t5(&self) -> bool {
        self.pipeline.encoders.has_t5()
    }

    /// Renders `job` to PNG bytes with its parameters in the text chunks.
    /// `on_step(done, total)` runs after every step; returning false cancels.
    ///
    /// # Errors
    /// [`EngineError::Cancelled`]; [`EngineError::Input`] for a size the model
    /// cannot render; [`EngineError::Unserved`] for T5 asked of a CLIP-only
    /// model; engine errors.
    pub fn render_png(&self, job: &ResolvedJob, on_step: &mut dyn FnMut(usize, usize) -> bool) -> Result<Vec<u8>, EngineError> {
        self.render_pngs(std::slice::from_ref(job), &mut |_, step, total| on_step(step, total))?.remove(0)
    }

    /// Renders jobs of one size and text-encoder set together, each with
    /// its own prompt, seed, shift, guidance and step count
    /// ([`Pipeline::render_batch`]); each job's PNG is the one it renders
    /// alone. `on_step(job, done, total)` runs after each of a job's
    /// steps; returning false takes that job out of the batch.
    ///
    /// The outcome per job: its PNG, or why it has none (as
    /// [`JobRenderer::render_png`] says).
    ///
    /// # Errors
    /// What ends every job of the batch (a transformer error).
    pub fn render_pngs(
        &self,
        jobs: &[ResolvedJob],
        on_step: &mut dyn FnMut(usize, usize, usize) -> bool,
    ) -> Result<Vec<Result<Vec<u8>, EngineError>>, EngineError> {
        let prepared = jobs.iter().map(|job| self.request(job)).collect();
        run_prepared(prepared, |requests, places| {
            let mut on_step = |job: usize, step, total| on_step(places[job], step, total);
            let rendered = match &self.split {
                Splitting::Cfg(partner) => {
                    let _turn = partner.one_at_a_time.lock().unwrap_or_else(|p| p.into_inner());
                    let uncond = Replica { model: &partner.model, threads: partner.threads[1].as_ref() };
                    self.pipeline.render_batch(&requests, Split::Cfg { threads: partner.threads[0].as_ref(), uncond }, &mut on_step)?
                }
                Splitting::Blocks(blocks) => self.pipeline.render_batch(&requests, Split::Blocks(blocks), &mut on_step)?,
                Splitting::One => self.pipeline.render_batch(&requests, Split::One, &mut on_step)?,
            };
            let png = |i: usize, rendered: Rendered| {
                let parameters = parameters(&jobs[i], self.pipeline.identity.short(), rendered.decoding);
                encode(rendered.width as u32, rendered.height as u32, &rendered.rgb, &parameters)
            };
            Ok(places.iter().zip(rendered).map(|(&i, rendered)| rendered.and_then(|r| png(i, r))).collect())
        })
    }

    /// What the engine renders for `job`: its size and encoders checked
    /// against this model, its noise drawn from its seed.
    fn request(&self, job: &ResolvedJob) -> Result<RenderRequest, EngineError> {
        let use_t5 = job.text_encoders == TextEncoderSet::All;
        if use_t5 && !self.has_t5() {
            return Err(EngineError::Unserved("this worker's model has no T5 encoder; the job needs one".into()));
        }
        let scale = self.pipeline.vae.scale_factor();
        let factor = scale * self.pipeline.transformer.config().patch_size;
        let (w, h) = (job.width as usize, job.height as usize);
        if w == 0 || h == 0 || w % factor != 0 || h % factor != 0 {
            return Err(EngineError::Input(format!("{w}×{h}: sides must be positive multiples of {factor}")));
        }
        let shape = [1, self.pipeline.vae.latent_channels(), h / scale, w / scale];
        Ok(RenderRequest {
            prompt: job.prompt.clone(),
            negative_prompt: job.negative_prompt.clone(),
            initial_latent: initial_latent(job.seed, &shape, &self.device)?,
            steps: job.steps,
            guidance: job.guidance,
            shift: job.shift,
            use_t5,
            vae: match job.tile_vae {
                Some(true) => VaeTiling::Tiled,
                Some(false) => VaeTiling::Whole,
                None => self.vae_tiling,
            },
        })
    }
}
