//! Block pipeline: one transformer's joint blocks split into contiguous
//! ranges on several devices, activations handed from stage to stage.
//!
//! Why: a model larger than one card runs at all (each device holds its
//! blocks only), and several renders in flight keep every device busy —
//! while the second stage runs job A's last blocks, the first runs job B's
//! first ones — so throughput approaches the sum of the devices'.
//!
//! Each stage is a thread of its own that takes forwards in arrival order
//! from a channel, runs its blocks (on its own rayon pool for CPU devices,
//! which split the cores), moves the streams to the next stage's device and
//! passes them on. The first stage also embeds the inputs; the last one
//! applies the output head and answers the caller with the velocity, on the
//! first stage's device (where the caller's latents live).
//!
//! Invariant: a stage runs exactly the operations [`MmDit::forward`] runs for
//! its blocks, on the same rows, so on the CPU in F32 a pipelined forward
//! gives the same bits as one device's.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};

use crate::mmdit::{Embedded, MmDit};
use crate::EngineError;

/// One device's part of the pipeline.
pub struct Stage {
    /// Holds a contiguous range of the blocks ([`MmDit::load_blocks`]).
    pub model: Arc<MmDit>,
    /// The threads its CPU work runs on; None: the stage thread's own (and
    /// rayon's global pool).
    pub threads: Option<rayon::ThreadPool>,
}

/// `depth` blocks in `parts` contiguous ranges of (nearly) equal length,
/// the longer ones last.
pub fn split_blocks(depth: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.clamp(1, depth.max(1));
    (0..parts).map(|i| i * depth / parts..(i + 1) * depth / parts).collect()
}

/// One forward travelling through the stages.
struct Work {
    inputs: Inputs,
    skip_layers: Vec<usize>,
    reply: Sender<Result<Tensor, EngineError>>,
}

enum Inputs {
    /// What the caller gave; the first stage embeds it.
    Raw { latents: Tensor, timesteps: Tensor, context: Tensor, pooled: Tensor },
    /// The streams after the blocks of earlier stages.
    Streams(Embedded),
}

/// Running stages, fed by [`BlockPipeline::forward`] from any thread.
pub struct BlockPipeline {
    entry: Option<Sender<Work>>,
    threads: Vec<JoinHandle<()>>,
    ranges: Vec<Range<usize>>,
    devices: Vec<Device>,
}

impl BlockPipeline {
    /// Starts one thread per stage.
    ///
    /// # Errors
    /// [`EngineError::Input`] unless the stages' blocks are contiguous,
    /// in order, and cover the whole model, with one config.
    pub fn start(stages: Vec<Stage>) -> Result<Self, EngineError> {
        let Some(first) = stages.first() else { return Err(EngineError::Input("a block pipeline needs at least one stage".into())) };
        let config = first.model.config().clone();
        let mut next = 0;
        for (i, stage) in stages.iter().enumerate() {
            let blocks = stage.model.blocks();
            if blocks.start != next || stage.model.config() != &config {
                return Err(EngineError::Input(format!(
                    "stage {i} holds blocks {blocks:?}; it must start at block {next} of the same model"
                )));
            }
            next = blocks.end;
        }
        if next != config.depth {
            return Err(EngineError::Input(format!("the stages end at block {next}; the model has {}", config.depth)));
        }
        let ranges = stages.iter().map(|s| s.model.blocks()).collect();
        let devices: Vec<Device> = stages.iter().map(|s| s.model.device().clone()).collect();
        let home = devices[0].clone();
        // Built from the last stage back, each knowing where to pass its work.
        let mut threads = Vec::with_capacity(stages.len());
        let mut downstream: Option<Sender<Work>> = None;
        for (index, stage) in stages.into_iter().enumerate().rev() {
            let (sender, receiver) = channel::<Work>();
            let next = downstream.take().map(|s| (s, devices[index + 1].clone()));
            let home = home.clone();
            let thread = std::thread::Builder::new()
                .name(format!("stage-{index}"))
                .spawn(move || run_stage(stage, index == 0, next, home, receiver))
                .map_err(|e| EngineError::Input(format!("cannot start stage {index}: {e}")))?;
            threads.push(thread);
            downstream = Some(sender);
        }
        threads.reverse();
        Ok(BlockPipeline { entry: downstream, threads, ranges, devices })
    }

    /// Each stage's blocks, in order.
    pub fn ranges(&self) -> &[Range<usize>] {
        &self.ranges
    }

    /// Each stage's device, in order; the first is where inputs and the
    /// velocity live.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// [`MmDit::forward`] through every stage; blocks until the velocity is
    /// back. Forwards from several threads at once are in flight together.
    ///
    /// # Errors
    /// As [`MmDit::forward`]; [`EngineError::Input`] if a stage has stopped.
    pub fn forward(
        &self,
        latents: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
        skip_layers: &[usize],
    ) -> Result<Tensor, EngineError> {
        let stopped = || EngineError::Input("the block pipeline's stages have stopped".into());
        let (reply, answer) = channel();
        let inputs =
            Inputs::Raw { latents: latents.clone(), timesteps: timesteps.clone(), context: context.clone(), pooled: pooled.clone() };
        let work = Work { inputs, skip_layers: skip_layers.to_vec(), reply };
        self.entry.as_ref().ok_or_else(stopped)?.send(work).map_err(|_| stopped())?;
        answer.recv().map_err(|_| stopped())?
    }
}

impl Drop for BlockPipeline {
    fn drop(&mut self) {
        // Closing the first channel stops the first stage, whose end closes
        // the next one's, and so on.
        self.entry.take();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A stage's thread: forwards in arrival order until its channel closes.
fn run_stage(stage: Stage, first: bool, next: Option<(Sender<Work>, Device)>, home: Device, receiver: Receiver<Work>) {
    while let Ok(Work { inputs, skip_layers, reply }) = receiver.recv() {
        let step = || -> Result<Output, EngineError> {
            let mut state = match inputs {
                Inputs::Raw { latents, timesteps, context, pooled } if first => {
                    stage.model.embed(&latents, &timesteps, &context, &pooled)?
                }
                Inputs::Streams(state) => state,
                Inputs::Raw { .. } => return Err(EngineError::Input("unembedded inputs reached a later stage".into())),
            };
            for index in stage.model.blocks() {
                if !skip_layers.contains(&index) {
                    state = stage.model.run_block(index, state)?;
                }
            }
            match &next {
                Some((_, device)) => Ok(Output::Pass(Embedded {
                    x: state.x.to_device(device)?,
                    context: state.context.to_device(device)?,
                    conditioning: state.conditioning.to_device(device)?,
                    latent_hw: state.latent_hw,
                })),
                None => Ok(Output::Velocity(stage.model.unembed(&state)?.to_device(&home)?)),
            }
        };
        let outcome = match &stage.threads {
            Some(pool) => pool.install(|| catch_unwind(AssertUnwindSafe(step))),
            None => catch_unwind(AssertUnwindSafe(step)),
        }
        .unwrap_or_else(|_| Err(EngineError::Input("a pipeline stage panicked".into())));
        match (outcome, &next) {
            (Ok(Output::Pass(state)), Some((sender, _))) => {
                // A closed next stage means the pipeline is being dropped.
                let _ = sender.send(Work { inputs: Inputs::Streams(state), skip_layers, reply });
            }
            (Ok(Output::Velocity(velocity)), _) => {
                let _ = reply.send(Ok(velocity));
            }
            (Ok(Output::Pass(_)), None) => {
                let _ = reply.send(Err(EngineError::Input("the last stage has no next stage".into())));
            }
            (Err(e), _) => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

/// What a stage does with a forward when its blocks are done.
enum Output {
    Pass(Embedded),
    Velocity(Tensor),
}
