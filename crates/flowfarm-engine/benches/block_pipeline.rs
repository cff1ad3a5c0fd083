//! Bench (not a test): a block pipeline's throughput against one device,
//! where each device is one CPU core of its own.
//!
//! The 6-block × 384-hidden MM-DiT at a 32×32 latent (a 256² SD3 image),
//! 154 text tokens, guidance 5, 4 steps, 4 jobs:
//! - one device (`cpu:0`): the jobs one after another, each alone, on a
//!   one-thread pool (a device renders one job at a time);
//! - two devices (`cpu:0`, `cpu:1`): blocks 0..3 on one one-thread pool and
//!   3..6 on another, the 4 jobs in flight at once from threads of their
//!   own, so while one stage runs a job's later blocks the other runs
//!   another job's first ones.
//!
//! Prints the medians and the throughput ratio (jobs/s on two devices over
//! jobs/s on one). What it measures is the orchestration's overhead (the
//! stage threads, the hand-offs, the bubbles when the stages wait), which
//! on GPUs decides the speedup. Both give the same latents bit for bit,
//! which it checks. Asserts nothing about time.
//!
//! `cargo bench -p flowfarm-engine --bench block_pipeline`

mod support;

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use flowfarm_core::shift::flow_match_sigmas;
use flowfarm_engine::checkpoint::write_diffusers;
use flowfarm_engine::noise::initial_latent;
use flowfarm_engine::sampler::{sample_on, Replicas, SampleJob};
use flowfarm_engine::stages::{split_blocks, BlockPipeline, Stage};
use flowfarm_engine::tiny::random_weights;
use flowfarm_engine::Checkpoint;

const JOBS: usize = 4;

fn main() {
    support::keep_freed_memory();
    let config = support::bench_config();
    let dir = tempfile::tempdir().expect("temp dir");
    write_diffusers(&config, &random_weights(&config, 1).expect("weights"), dir.path()).expect("write");
    let checkpoint = Checkpoint::open(dir.path()).expect("checkpoint");
    let whole = checkpoint.load_model(DType::F32, &Device::Cpu).expect("model");
    let core = || rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("thread pool");
    let stages = split_blocks(config.depth, 2)
        .into_iter()
        .map(|blocks| Stage {
            model: Arc::new(checkpoint.load_stage(DType::F32, &Device::Cpu, blocks).expect("stage")),
            threads: Some(core()),
        })
        .collect();
    let pipeline = BlockPipeline::start(stages).expect("pipeline");
    let input = |seed: u64, shape: &[usize]| initial_latent(seed, shape, &Device::Cpu).expect("input");
    let jobs: Vec<SampleJob> = (0..JOBS as u64)
        .map(|i| SampleJob {
            latent: input(10 * i + 1, &[1, 16, 32, 32]),
            context: input(10 * i + 2, &[1, 154, 4096]),
            pooled: input(10 * i + 3, &[1, 2048]),
            negative_context: Tensor::zeros((1, 154, 4096), DType::F32, &Device::Cpu).expect("zeros"),
            negative_pooled: Tensor::zeros((1, 2048), DType::F32, &Device::Cpu).expect("zeros"),
            guidance: 5.0,
            sigmas: flow_match_sigmas(3.0, 4),
        })
        .collect();
    let alone_pool = core();
    let alone = || -> Vec<Tensor> {
        alone_pool.install(|| {
            jobs.iter()
                .map(|job| sample_on(Replicas::One(&whole), std::slice::from_ref(job), None, &mut |_, _| true).expect("sample").remove(0))
                .collect()
        })
    };
    let staged = || -> Vec<Tensor> {
        std::thread::scope(|scope| {
            let runs: Vec<_> = jobs
                .iter()
                .map(|job| {
                    let pipeline = &pipeline;
                    scope.spawn(move || sample_on(Replicas::Blocks(pipeline), std::slice::from_ref(job), None, &mut |_, _| true))
                })
                .collect();
            runs.into_iter().map(|r| r.join().expect("job thread").expect("sample").remove(0)).collect()
        })
    };
    let (a, b) = (alone(), staged());
    for (x, y) in a.iter().zip(&b) {
        let diff = (x - y).and_then(|d| d.abs()).and_then(|d| d.flatten_all()).and_then(|d| d.max(0)).and_then(|d| d.to_scalar::<f32>());
        assert_eq!(diff.expect("compare"), 0.0, "the block pipeline must give the same latents");
    }
    let runs = 5;
    let time = |run: &dyn Fn() -> Vec<Tensor>| {
        support::median(
            (0..runs)
                .map(|_| {
                    let start = Instant::now();
                    run();
                    start.elapsed().as_secs_f64() * 1e3
                })
                .collect(),
        )
    };
    let (one_ms, two_ms) = (time(&alone), time(&staged));
    println!("Block pipeline, MM-DiT 6×384, 32×32 latent, 154 text tokens, guidance 5, 4 steps, {JOBS} jobs, one core per device:");
    println!(
        "  one device (cpu:0), jobs one after another:       median {one_ms:.1} ms ({runs} runs), {:.2} jobs/s",
        JOBS as f64 / one_ms * 1e3
    );
    println!(
        "  two devices (blocks {:?} | {:?}), {JOBS} in flight: median {two_ms:.1} ms, {:.2} jobs/s",
        pipeline.ranges()[0],
        pipeline.ranges()[1],
        JOBS as f64 / two_ms * 1e3
    );
    println!("  throughput ratio, two devices / one: {:.3} (the same latents, bit for bit)", one_ms / two_ms);
}
