//! Euler sampling of the rectified-flow ODE with classifier-free guidance.
//!
//! Each job of a batch keeps its own sigmas (its shift), guidance scale and
//! text conditioning; jobs share the latent shape and the step count. One
//! transformer call per step evaluates every job's conditional and (when its
//! guidance is not 1) unconditional halves together; or, CFG-parallel, two
//! calls at once on two replicas of the transformer, the conditional halves
//! on one and the unconditional halves on the other ([`Replicas::Cfg`]); or
//! through a block pipeline whose stages are on several devices
//! ([`Replicas::Blocks`]).
//!
//! Invariant: on the CPU in F32 a sample's rows give the same bits whatever
//! other rows share the call, and whichever device runs which blocks, so
//! every form gives the same latents.

use candle_core::{DType, Tensor};

use crate::mmdit::MmDit;
use crate::stages::BlockPipeline;
use crate::EngineError;

/// One job's inputs.
#[derive(Debug, Clone)]
pub struct SampleJob {
    /// (1, C, H, W) initial noise, F32.
    pub latent: Tensor,
    /// (1, L, joint_attention_dim) prompt embedding.
    pub context: Tensor,
    /// (1, pooled_dim).
    pub pooled: Tensor,
    /// Negative-prompt embedding and pooled embedding, same shapes; used when
    /// `guidance` is not 1.
    pub negative_context: Tensor,
    pub negative_pooled: Tensor,
    pub guidance: f32,
    /// `steps + 1` decreasing sigmas ending at 0 (`flowfarm_core::shift::flow_match_sigmas`).
    pub sigmas: Vec<f64>,
}

/// Skip-layer guidance (SD3.5-medium), as diffusers' StableDiffusion3Pipeline
/// applies it: on steps i with start·N < i < stop·N, one more conditional pass
/// without `layers`, and v ← v + scale·(v_c − v_skip). Shared by the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct SkipLayerGuidance {
    pub layers: Vec<usize>,
    pub scale: f32,
    /// Fractions of the step count.
    pub start: f32,
    pub stop: f32,
}

impl SkipLayerGuidance {
    /// The reference's defaults for SD3.5-medium: blocks 7, 8, 9, scale 2.8, steps 1%–20%.
    pub fn sd35_medium() -> Self {
        SkipLayerGuidance { layers: vec![7, 8, 9], scale: 2.8, start: 0.01, stop: 0.2 }
    }

    fn active(&self, step: usize, steps: usize) -> bool {
        let (i, n) = (step as f32, steps as f32);
        i > n * self.start && i < n * self.stop
    }
}

/// Called after every step with (step done, steps): return false to stop.
pub type StepCallback<'a> = dyn FnMut(usize, usize) -> bool + 'a;

/// A transformer, and the threads its CPU work runs on (None: the caller's).
#[derive(Clone, Copy)]
pub struct Replica<'a> {
    pub model: &'a MmDit,
    pub threads: Option<&'a rayon::ThreadPool>,
}

impl Replica<'_> {
    fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> T {
        match self.threads {
            Some(pool) => pool.install(work),
            None => work(),
        }
    }
}

/// Where a step's transformer calls run.
#[derive(Clone, Copy)]
pub enum Replicas<'a> {
    /// Every row in one call.
    One(&'a MmDit),
    /// CFG-parallel: the conditional rows on `cond`, the unconditional rows
    /// on `uncond` (the same weights, on another device or other threads),
    /// both at once; the velocity is combined on `cond`'s device, where the
    /// latents live.
    Cfg { cond: Replica<'a>, uncond: Replica<'a> },
    /// Every row in one call that travels through the stages of a block
    /// pipeline; the latents live on its first stage's device.
    Blocks(&'a BlockPipeline),
}

impl Replicas<'_> {
    /// One call with every row given (not split by halves).
    fn forward(&self, x: &Tensor, t: &Tensor, context: &Tensor, pooled: &Tensor, skip: &[usize]) -> Result<Tensor, EngineError> {
        match self {
            Replicas::One(model) => model.forward(x, t, context, pooled, skip),
            Replicas::Cfg { cond, .. } => cond.run(|| cond.model.forward(x, t, context, pooled, skip)),
            Replicas::Blocks(stages) => stages.forward(x, t, context, pooled, skip),
        }
    }
}

/// Samples every job to its final latent, (1, C, H, W) F32 each, in order.
///
/// x ← x + (σ_{i+1} − σ_i)·v, v = v_u + g·(v_c − v_u), with the model fed
/// t = 1000·σ_i per sample. The update runs in F32 whatever the model's dtype.
///
/// # Errors
/// [`EngineError::Input`] if jobs differ in latent shape, step count or text
/// length; [`EngineError::Cancelled`] when the callback says stop.
pub fn sample(
    model: &MmDit,
    jobs: &[SampleJob],
    slg: Option<&SkipLayerGuidance>,
    on_step: &mut StepCallback,
) -> Result<Vec<Tensor>, EngineError> {
    sample_on(Replicas::One(model), jobs, slg, on_step)
}

/// [`sample`] with the transformer calls on `replicas`.
///
/// # Errors
/// As [`sample`].
pub fn sample_on(
    replicas: Replicas,
    jobs: &[SampleJob],
    slg: Option<&SkipLayerGuidance>,
    on_step: &mut StepCallback,
) -> Result<Vec<Tensor>, EngineError> {
    let pinned = match replicas {
        Replicas::Cfg { cond, uncond } => Some((cond, uncond)),
        Replicas::One(_) | Replicas::Blocks(_) => None,
    };
    let Some(first) = jobs.first() else { return Ok(Vec::new()) };
    let steps = first.sigmas.len().saturating_sub(1);
    for (i, job) in jobs.iter().enumerate() {
        if job.latent.dims() != first.latent.dims() || job.sigmas.len() != first.sigmas.len() {
            return Err(EngineError::Input(format!("job {i}: latent shape and step count must match the batch's")));
        }
        if job.context.dims() != first.context.dims() || job.negative_context.dims() != first.context.dims() {
            return Err(EngineError::Input(format!("job {i}: text embeddings must have the batch's shape")));
        }
    }
    if steps == 0 {
        return Err(EngineError::Input("sigmas must hold at least two values".into()));
    }
    // Rows of the model batch: every job's conditional half, then the
    // unconditional halves of jobs that use guidance.
    let guided: Vec<usize> = (0..jobs.len()).filter(|&i| jobs[i].guidance != 1.0).collect();
    let rows: Vec<(usize, bool)> = (0..jobs.len()).map(|i| (i, true)).chain(guided.iter().map(|&i| (i, false))).collect();
    let pick = |cond: &dyn Fn(&SampleJob) -> &Tensor, uncond: &dyn Fn(&SampleJob) -> &Tensor| -> candle_core::Result<Tensor> {
        let parts: Vec<&Tensor> = rows.iter().map(|&(i, c)| if c { cond(&jobs[i]) } else { uncond(&jobs[i]) }).collect();
        Tensor::cat(&parts, 0)
    };
    let context = pick(&|j| &j.context, &|j| &j.negative_context)?;
    let pooled = pick(&|j| &j.pooled, &|j| &j.negative_pooled)?;
    let n = jobs.len();
    let cond_context = context.narrow(0, 0, n)?;
    let cond_pooled = pooled.narrow(0, 0, n)?;
    let device = first.latent.device();
    // The unconditional rows' text, on the unconditional replica's device once.
    let g = guided.len();
    let uncond_text = match pinned {
        Some((_, uncond)) if g > 0 => {
            let on = uncond.model.device();
            Some((context.narrow(0, n, g)?.to_device(on)?, pooled.narrow(0, n, g)?.to_device(on)?))
        }
        _ => None,
    };

    let mut latents: Vec<Tensor> = jobs.iter().map(|j| j.latent.to_dtype(DType::F32)).collect::<Result<_, _>>()?;
    for step in 0..steps {
        // The reference keeps sigmas in F32; so do we, for equal timesteps.
        let sigma = |j: &SampleJob, k: usize| j.sigmas[k] as f32;
        let input: Vec<&Tensor> = rows.iter().map(|&(i, _)| &latents[i]).collect();
        let input = Tensor::cat(&input, 0)?;
        let t: Vec<f32> = rows.iter().map(|&(i, _)| sigma(&jobs[i], step) * 1000.0).collect();
        let t = Tensor::from_vec(t, rows.len(), device)?;
        let v = match (pinned, &uncond_text) {
            (Some((cond, uncond)), Some((u_context, u_pooled))) => {
                let on = uncond.model.device();
                let (x_u, t_u) = (input.narrow(0, n, g)?.to_device(on)?, t.narrow(0, n, g)?.to_device(on)?);
                let (x_c, t_c) = (input.narrow(0, 0, n)?, t.narrow(0, 0, n)?);
                let (v_c, v_u) = std::thread::scope(|scope| {
                    let unconditional = scope.spawn(|| uncond.run(|| uncond.model.forward(&x_u, &t_u, u_context, u_pooled, &[])));
                    let conditional = cond.run(|| cond.model.forward(&x_c, &t_c, &cond_context, &cond_pooled, &[]));
                    let unconditional =
                        unconditional.join().unwrap_or_else(|_| Err(EngineError::Input("the unconditional pass panicked".into())));
                    (conditional, unconditional)
                });
                Tensor::cat(&[v_c?.to_dtype(DType::F32)?, v_u?.to_dtype(DType::F32)?.to_device(device)?], 0)?
            }
            _ => replicas.forward(&input, &t, &context, &pooled, &[])?.to_dtype(DType::F32)?,
        };
        let v_skip = match slg {
            Some(slg) if slg.active(step, steps) => {
                let (x, t) = (input.narrow(0, 0, n)?, t.narrow(0, 0, n)?);
                Some(replicas.forward(&x, &t, &cond_context, &cond_pooled, &slg.layers)?.to_dtype(DType::F32)?)
            }
            _ => None,
        };
        for (i, job) in jobs.iter().enumerate() {
            let v_cond = v.narrow(0, i, 1)?;
            let mut velocity = match guided.iter().position(|&g| g == i) {
                Some(u) => {
                    let v_uncond = v.narrow(0, n + u, 1)?;
                    (&v_uncond + ((&v_cond - &v_uncond)? * f64::from(job.guidance))?)?
                }
                None => v_cond.clone(),
            };
            if let (Some(v_skip), Some(slg)) = (&v_skip, slg) {
                velocity = (velocity + ((&v_cond - v_skip.narrow(0, i, 1)?)? * f64::from(slg.scale))?)?;
            }
            let dt = f64::from(sigma(job, step + 1) - sigma(job, step));
            latents[i] = (&latents[i] + (velocity * dt)?)?;
        }
        if !on_step(step + 1, steps) {
            return Err(EngineError::Cancelled { step: step + 1 });
        }
    }
    Ok(latents)
}
