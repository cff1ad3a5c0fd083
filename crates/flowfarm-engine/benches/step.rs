//! Bench (not a test): one denoising step (a transformer forward), F32, batch
//! 2 (a CFG pair), 154 text tokens, on a 6-block × 384-hidden MM-DiT, at
//! 32×32 and 64×64 latents. Prints the median and writes
//! `target/flowfarm-bench/step.json`, which `tools/bench/diffusers_step.py`
//! reads to print the ratio against diffusers on the same config and threads.
//!
//! `cargo bench -p flowfarm-engine --bench step`

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use flowfarm_engine::mmdit::{MmDitConfig, Variant};
use flowfarm_engine::noise::initial_latent;
use flowfarm_engine::tiny::{random_weights, write_diffusers};
use flowfarm_engine::Checkpoint;

fn bench_config() -> MmDitConfig {
    MmDitConfig {
        variant: Variant::Sd3Medium,
        depth: 6,
        hidden: 384,
        heads: 6,
        patch_size: 2,
        in_channels: 16,
        out_channels: 16,
        joint_attention_dim: 4096,
        pooled_dim: 2048,
        pos_embed_max_size: 96,
        qk_norm: false,
        dual_attention_layers: Vec::new(),
    }
}

fn main() {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let config = bench_config();
    let dir = tempfile::tempdir().expect("temp dir");
    write_diffusers(&config, &random_weights(&config, 1).expect("weights"), dir.path()).expect("write");
    let model = Checkpoint::open(dir.path()).and_then(|c| c.load_model(DType::F32, &Device::Cpu)).expect("model");
    let dev = Device::Cpu;
    let mut results = Vec::new();
    println!("MM-DiT 6 blocks × 384 hidden, F32, batch 2, 154 text tokens, {threads} threads (candle CPU):");
    for side in [32usize, 64] {
        let x = initial_latent(1, &[2, 16, side, side], &dev).expect("x");
        let t = Tensor::new(&[700f32, 700.0], &dev).expect("t");
        let ctx = initial_latent(2, &[2, 154, 4096], &dev).expect("ctx");
        let pooled = initial_latent(3, &[2, 2048], &dev).expect("pooled");
        let run = || model.forward(&x, &t, &ctx, &pooled, &[]).expect("forward");
        run(); // warm-up
        let iterations = if side == 32 { 20 } else { 8 };
        let mut times: Vec<Duration> = (0..iterations)
            .map(|_| {
                let start = Instant::now();
                run();
                start.elapsed()
            })
            .collect();
        times.sort();
        let median = times[times.len() / 2].as_secs_f64() * 1e3;
        println!("  {side}×{side} latent: median {median:.1} ms  (min {:.1} ms, {iterations} runs)", times[0].as_secs_f64() * 1e3);
        results.push(serde_json::json!({ "latent": side, "median_ms": median }));
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/flowfarm-bench");
    let _ = std::fs::create_dir_all(&out);
    let json = serde_json::json!({ "threads": threads, "results": results });
    if std::fs::write(out.join("step.json"), json.to_string()).is_ok() {
        println!("  wrote target/flowfarm-bench/step.json; run tools/bench/diffusers_step.py for the ratio");
    }
}
