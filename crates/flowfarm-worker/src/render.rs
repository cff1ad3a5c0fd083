//! One job, prompt to PNG bytes, through flowfarm-engine.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use flowfarm_engine::cache::EmbeddingCache;
use flowfarm_engine::noise::initial_latent;
use flowfarm_engine::pipeline::{Pipeline, RenderRequest};
use flowfarm_engine::png_output::{encode, RenderParameters};
use flowfarm_engine::EngineError;
use flowfarm_proto::v1 as pb;

/// A job's resolved render parameters, as the coordinator stored them.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderJob {
    pub model: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance: f32,
    pub seed: u64,
    pub shift: f64,
    /// False: CLIP-only (T5 replaced by zeros).
    pub use_t5: bool,
}

impl RenderJob {
    /// Reads the resolved spec StartJob returned.
    ///
    /// # Errors
    /// [`EngineError::Input`] naming what the coordinator left unresolved.
    pub fn from_proto(job: &pb::Job) -> Result<Self, EngineError> {
        let spec = job.spec.as_ref().ok_or_else(|| EngineError::Input("job has no spec".into()))?;
        let missing = |what: &str| EngineError::Input(format!("job {} has no resolved {what}", job.id));
        Ok(RenderJob {
            model: spec.model.clone(),
            prompt: spec.prompt.clone(),
            negative_prompt: spec.negative_prompt.clone(),
            width: spec.width,
            height: spec.height,
            steps: spec.steps,
            guidance: spec.guidance_scale.ok_or_else(|| missing("guidance_scale"))?,
            seed: spec.seed.ok_or_else(|| missing("seed"))?,
            shift: spec.shift.ok_or_else(|| missing("shift"))?,
            use_t5: spec.text_encoders != pb::TextEncoderSet::ClipOnly as i32,
        })
    }

    fn parameters(&self) -> RenderParameters {
        RenderParameters {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            model: self.model.clone(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance: self.guidance,
            seed: self.seed,
            shift: self.shift,
            sampler: "euler-flow-matching".into(),
            text_encoders: if self.use_t5 { "all" } else { "clip-only" }.into(),
        }
    }
}

/// A loaded model that renders jobs; `Send + Sync`, one per model.
pub struct JobRenderer {
    pipeline: Pipeline,
    device: Device,
}

impl JobRenderer {
    /// Loads the diffusers model folder at `path` on the CPU, in F32.
    ///
    /// # Errors
    /// [`EngineError`] naming the part of the model that is missing or malformed.
    pub fn open(path: &Path, t5_max_length: usize, cache: Arc<EmbeddingCache>) -> Result<Self, EngineError> {
        let device = Device::Cpu;
        let mut pipeline = Pipeline::open(path, t5_max_length, DType::F32, &device)?;
        pipeline.encoders = pipeline.encoders.with_cache(cache);
        Ok(JobRenderer { pipeline, device })
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
    /// cannot render or T5 asked of a CLIP-only model; engine errors.
    pub fn render_png(&self, job: &RenderJob, on_step: &mut dyn FnMut(usize, usize) -> bool) -> Result<Vec<u8>, EngineError> {
        if job.use_t5 && !self.has_t5() {
            return Err(EngineError::Input("this worker's model has no T5 encoder; the job needs one".into()));
        }
        let scale = self.pipeline.vae.scale_factor();
        let factor = scale * self.pipeline.transformer.config().patch_size;
        let (w, h) = (job.width as usize, job.height as usize);
        if w == 0 || h == 0 || w % factor != 0 || h % factor != 0 {
            return Err(EngineError::Input(format!("{w}×{h}: sides must be positive multiples of {factor}")));
        }
        let shape = [1, self.pipeline.vae.latent_channels(), h / scale, w / scale];
        let request = RenderRequest {
            prompt: job.prompt.clone(),
            negative_prompt: job.negative_prompt.clone(),
            initial_latent: initial_latent(job.seed, &shape, &self.device)?,
            steps: job.steps,
            guidance: job.guidance,
            shift: job.shift,
            use_t5: job.use_t5,
        };
        let rendered = self.pipeline.render(&request, &mut |step, total| on_step(step, total))?;
        encode(rendered.width as u32, rendered.height as u32, &rendered.rgb, &job.parameters())
    }
}
