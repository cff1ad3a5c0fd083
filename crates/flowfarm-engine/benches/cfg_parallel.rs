//! Bench (not a test): CFG-parallel's latency against one device, where
//! each device is one CPU core of its own.
//!
//! A 6-block × 384-hidden MM-DiT at a 32×32 latent (a 256² SD3 image),
//! 154 text tokens, guidance 5, 4 steps, one job:
//! - one device: every step's conditional and unconditional rows in one
//!   call, on a one-thread pool;
//! - CFG-parallel on two devices: the conditional rows on one one-thread
//!   pool and the unconditional rows on another, at once.
//!
//! Prints the medians and the ratio (two devices / one). What it measures is
//! the orchestration's overhead (splitting the rows, a thread per half,
//! combining the velocities), which on GPUs decides the speedup. Both give
//! the same latent bit for bit, which it checks. Asserts nothing about time.
//!
//! `cargo bench -p flowfarm-engine --bench cfg_parallel`

mod support;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use flowfarm_core::shift::flow_match_sigmas;
use flowfarm_engine::checkpoint::write_diffusers;
use flowfarm_engine::mmdit::MmDitConfig;
use flowfarm_engine::noise::initial_latent;
use flowfarm_engine::sampler::{sample_on, Replica, Replicas, SampleJob};
use flowfarm_engine::tiny::random_weights;
use flowfarm_engine::{Checkpoint, MmDit};

fn model(config: &MmDitConfig) -> MmDit {
    let dir = tempfile::tempdir().expect("temp dir");
    write_diffusers(config, &random_weights(config, 1).expect("weights"), dir.path()).expect("write");
    Checkpoint::open(dir.path()).and_then(|c| c.load_model(DType::F32, &Device::Cpu)).expect("model")
}

fn main() {
    support::keep_freed_memory();
    let config = support::bench_config();
    let (cond, uncond) = (model(&config), model(&config));
    let input = |seed: u64, shape: &[usize]| initial_latent(seed, shape, &Device::Cpu).expect("input");
    let job = SampleJob {
        latent: input(1, &[1, 16, 32, 32]),
        context: input(2, &[1, 154, 4096]),
        pooled: input(3, &[1, 2048]),
        negative_context: Tensor::zeros((1, 154, 4096), DType::F32, &Device::Cpu).expect("zeros"),
        negative_pooled: Tensor::zeros((1, 2048), DType::F32, &Device::Cpu).expect("zeros"),
        guidance: 5.0,
        sigmas: flow_match_sigmas(3.0, 4),
    };
    let core = || rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("thread pool");
    let (first, second) = (core(), core());
    // One device: every row in one call on one core.
    let alone = |_: ()| first.install(|| sample_on(Replicas::One(&cond), std::slice::from_ref(&job), None, &mut |_, _| true));
    let split =
        Replicas::Cfg { cond: Replica { model: &cond, threads: Some(&first) }, uncond: Replica { model: &uncond, threads: Some(&second) } };
    let pair = |_: ()| sample_on(split, std::slice::from_ref(&job), None, &mut |_, _| true);
    let a = alone(()).expect("one device");
    let b = pair(()).expect("two devices");
    let same =
        (&a[0] - &b[0]).and_then(|d| d.abs()).and_then(|d| d.flatten_all()).and_then(|d| d.max(0)).and_then(|d| d.to_scalar::<f32>());
    assert_eq!(same.expect("compare"), 0.0, "CFG-parallel must give the same latent");
    let runs = 5;
    let time = |run: &dyn Fn(()) -> Result<Vec<Tensor>, flowfarm_engine::EngineError>| {
        support::median(
            (0..runs)
                .map(|_| {
                    let start = Instant::now();
                    run(()).expect("sample");
                    start.elapsed().as_secs_f64() * 1e3
                })
                .collect(),
        )
    };
    let (one_ms, two_ms) = (time(&alone), time(&pair));
    println!("CFG-parallel, MM-DiT 6×384, 32×32 latent, 154 text tokens, guidance 5, 4 steps, one job, one core per device:");
    println!("  one device (cpu:0):            median {one_ms:.1} ms ({runs} runs)");
    println!("  two devices (cpu:0 + cpu:1):   median {two_ms:.1} ms");
    println!("  latency ratio, two devices / one: {:.3} (the same latent, bit for bit)", two_ms / one_ms);
}
