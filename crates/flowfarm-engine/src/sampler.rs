//! Euler sampling of the rectified-flow ODE with classifier-free guidance.
//!
//! Each job of a batch keeps its own sigmas (its shift and step count),
//! guidance scale and text conditioning; jobs share the latent shape and
//! the text length. One transformer call per step evaluates every job's
//! conditional and (when its guidance is not 1) unconditional halves
//! together, and a job leaves the batch when its steps are done or it is
//! cancelled; or, CFG-parallel, two
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
/// Jobs share the step count here; [`sample_batch`] takes jobs of any.
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

/// [`sample`] with the transformer calls on `replicas`; the callback sees
/// the batch's steps and stops all of it.
///
/// # Errors
/// As [`sample`].
pub fn sample_on(
    replicas: Replicas,
    jobs: &[SampleJob],
    slg: Option<&SkipLayerGuidance>,
    on_step: &mut StepCallback,
) -> Result<Vec<Tensor>, EngineError> {
    if let Some(first) = jobs.first() {
        if let Some(i) = jobs.iter().position(|j| j.sigmas.len() != first.sigmas.len()) {
            return Err(EngineError::Input(format!("job {i}: latent shape and step count must match the batch's")));
        }
    }
    // Every job steps together, the first one's callback speaks for all.
    let mut keep_going = true;
    let outcomes = sample_batch(replicas, jobs, slg, &mut |job, step, steps| {
        if job == 0 {
            keep_going = on_step(step, steps);
        }
        keep_going
    })?;
    outcomes.into_iter().collect()
}

/// Called after each step of each job still sampling, with (job's index,
/// steps it has done, its step count): false takes that job out of the batch.
pub type JobStepCallback<'a> = dyn FnMut(usize, usize, usize) -> bool + 'a;

/// Samples jobs that share the latent shape and text length but may differ
/// in everything else, step count included: each step evaluates the jobs
/// still sampling in one transformer call (or one per CFG half); a job
/// leaves the batch when its steps are done or its callback says stop.
///
/// x ← x + (σ_{i+1} − σ_i)·v, v = v_u + g·(v_c − v_u), with the model fed
/// t = 1000·σ_i per sample. The update runs in F32 whatever the model's dtype.
/// Skip-layer guidance applies to each job on its own steps' window.
///
/// The outcome per job: its final latent, (1, C, H, W) F32;
/// [`EngineError::Cancelled`] for a job stopped by its callback;
/// [`EngineError::Input`] for a job with fewer than two sigmas.
///
/// # Errors
/// [`EngineError::Input`] if jobs differ in latent shape or text length;
/// a transformer error, which ends every job of the batch.
pub fn sample_batch(
    replicas: Replicas,
    jobs: &[SampleJob],
    slg: Option<&SkipLayerGuidance>,
    on_step: &mut JobStepCallback,
) -> Result<Vec<Result<Tensor, EngineError>>, EngineError> {
    let Some(first) = jobs.first() else { return Ok(Vec::new()) };
    for (i, job) in jobs.iter().enumerate() {
        if job.latent.dims() != first.latent.dims() {
            return Err(EngineError::Input(format!("job {i}: latent shape and step count must match the batch's")));
        }
        if job.context.dims() != first.context.dims() || job.negative_context.dims() != first.context.dims() {
            return Err(EngineError::Input(format!("job {i}: text embeddings must have the batch's shape")));
        }
    }
    let steps_of = |j: &SampleJob| j.sigmas.len().saturating_sub(1);
    let mut outcomes: Vec<Option<Result<(), EngineError>>> =
        jobs.iter().map(|j| (steps_of(j) == 0).then(|| Err(EngineError::Input("sigmas must hold at least two values".into())))).collect();
    let mut done = vec![0usize; jobs.len()];
    let mut latents: Vec<Tensor> = jobs.iter().map(|j| j.latent.to_dtype(DType::F32)).collect::<Result<_, _>>()?;
    let device = first.latent.device();
    let mut rows: Option<Rows> = None;
    loop {
        let active: Vec<usize> = (0..jobs.len()).filter(|&i| outcomes[i].is_none()).collect();
        if active.is_empty() {
            break;
        }
        if rows.as_ref().is_none_or(|r| r.active != active) {
            rows = Some(Rows::new(jobs, active, &replicas)?);
        }
        let Some(rows) = rows.as_ref() else { break };
        let n = rows.active.len();
        let g = rows.guided.len();
        // The reference keeps sigmas in F32; so do we, for equal timesteps.
        let sigma = |i: usize, k: usize| jobs[i].sigmas[k] as f32;
        let input: Vec<&Tensor> = rows.order.iter().map(|&(i, _)| &latents[i]).collect();
        let input = Tensor::cat(&input, 0)?;
        let t: Vec<f32> = rows.order.iter().map(|&(i, _)| sigma(i, done[i]) * 1000.0).collect();
        let t = Tensor::from_vec(t, rows.order.len(), device)?;
        let v = match (&replicas, &rows.uncond_text) {
            (Replicas::Cfg { cond, uncond }, Some((u_context, u_pooled))) => {
                let on = uncond.model.device();
                let (x_u, t_u) = (input.narrow(0, n, g)?.to_device(on)?, t.narrow(0, n, g)?.to_device(on)?);
                let (x_c, t_c) = (input.narrow(0, 0, n)?, t.narrow(0, 0, n)?);
                let (v_c, v_u) = std::thread::scope(|scope| {
                    let unconditional = scope.spawn(|| uncond.run(|| uncond.model.forward(&x_u, &t_u, u_context, u_pooled, &[])));
                    let conditional = cond.run(|| cond.model.forward(&x_c, &t_c, &rows.cond_context, &rows.cond_pooled, &[]));
                    let unconditional =
                        unconditional.join().unwrap_or_else(|_| Err(EngineError::Input("the unconditional pass panicked".into())));
                    (conditional, unconditional)
                });
                Tensor::cat(&[v_c?.to_dtype(DType::F32)?, v_u?.to_dtype(DType::F32)?.to_device(device)?], 0)?
            }
            _ => replicas.forward(&input, &t, &rows.context, &rows.pooled, &[])?.to_dtype(DType::F32)?,
        };
        // Skip-layer guidance's extra pass, for the jobs inside their window.
        let skipping: Vec<usize> = match slg {
            Some(slg) => (0..n).filter(|&r| slg.active(done[rows.active[r]], steps_of(&jobs[rows.active[r]]))).collect(),
            None => Vec::new(),
        };
        let v_skip = match slg {
            Some(slg) if !skipping.is_empty() => {
                let pick = |all: &Tensor| -> candle_core::Result<Tensor> {
                    if skipping.len() == n {
                        return all.narrow(0, 0, n);
                    }
                    Tensor::cat(&skipping.iter().map(|&r| all.narrow(0, r, 1)).collect::<Result<Vec<_>, _>>()?, 0)
                };
                let v = replicas.forward(&pick(&input)?, &pick(&t)?, &pick(&rows.cond_context)?, &pick(&rows.cond_pooled)?, &slg.layers)?;
                Some(v.to_dtype(DType::F32)?)
            }
            _ => None,
        };
        for (r, &i) in rows.active.iter().enumerate() {
            let job = &jobs[i];
            let v_cond = v.narrow(0, r, 1)?;
            let mut velocity = match rows.guided.iter().position(|&u| u == i) {
                Some(u) => {
                    let v_uncond = v.narrow(0, n + u, 1)?;
                    (&v_uncond + ((&v_cond - &v_uncond)? * f64::from(job.guidance))?)?
                }
                None => v_cond.clone(),
            };
            if let (Some(v_skip), Some(slg), Some(s)) = (&v_skip, slg, skipping.iter().position(|&s| s == r)) {
                velocity = (velocity + ((&v_cond - v_skip.narrow(0, s, 1)?)? * f64::from(slg.scale))?)?;
            }
            let dt = f64::from(sigma(i, done[i] + 1) - sigma(i, done[i]));
            latents[i] = (&latents[i] + (velocity * dt)?)?;
            done[i] += 1;
        }
        for &i in &rows.active {
            let steps = steps_of(&jobs[i]);
            if !on_step(i, done[i], steps) {
                outcomes[i] = Some(Err(EngineError::Cancelled { step: done[i] }));
            } else if done[i] == steps {
                outcomes[i] = Some(Ok(()));
            }
        }
    }
    Ok(outcomes
        .into_iter()
        .zip(latents)
        .map(|(outcome, latent)| match outcome {
            Some(Ok(())) | None => Ok(latent),
            Some(Err(e)) => Err(e),
        })
        .collect())
}

/// The rows of one transformer call: every job still sampling's
/// conditional half, then the unconditional halves of those that use
/// guidance, with their text stacked the same way.
struct Rows {
    /// Jobs still sampling, in order.
    active: Vec<usize>,
    /// Those of `active` with guidance other than 1.
    guided: Vec<usize>,
    /// (job, conditional?) per row.
    order: Vec<(usize, bool)>,
    context: Tensor,
    pooled: Tensor,
    cond_context: Tensor,
    cond_pooled: Tensor,
    /// CFG-parallel: the unconditional rows' text, on that replica's device.
    uncond_text: Option<(Tensor, Tensor)>,
}

impl Rows {
    fn new(jobs: &[SampleJob], active: Vec<usize>, replicas: &Replicas) -> Result<Self, EngineError> {
        let guided: Vec<usize> = active.iter().copied().filter(|&i| jobs[i].guidance != 1.0).collect();
        let order: Vec<(usize, bool)> = active.iter().map(|&i| (i, true)).chain(guided.iter().map(|&i| (i, false))).collect();
        let pick = |cond: &dyn Fn(&SampleJob) -> &Tensor, uncond: &dyn Fn(&SampleJob) -> &Tensor| -> candle_core::Result<Tensor> {
            let parts: Vec<&Tensor> = order.iter().map(|&(i, c)| if c { cond(&jobs[i]) } else { uncond(&jobs[i]) }).collect();
            Tensor::cat(&parts, 0)
        };
        let context = pick(&|j| &j.context, &|j| &j.negative_context)?;
        let pooled = pick(&|j| &j.pooled, &|j| &j.negative_pooled)?;
        let (n, g) = (active.len(), guided.len());
        let uncond_text = match replicas {
            Replicas::Cfg { uncond, .. } if g > 0 => {
                let on = uncond.model.device();
                Some((context.narrow(0, n, g)?.to_device(on)?, pooled.narrow(0, n, g)?.to_device(on)?))
            }
            _ => None,
        };
        Ok(Rows {
            cond_context: context.narrow(0, 0, n)?,
            cond_pooled: pooled.narrow(0, 0, n)?,
            active,
            guided,
            order,
            context,
            pooled,
            uncond_text,
        })
    }
}
