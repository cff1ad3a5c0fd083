//! Bench (not a test): one denoising step (a transformer forward), batch 2 (a
//! CFG pair), 154 text tokens, on a 6-block × 384-hidden MM-DiT at 32×32 and
//! 64×64 latents; on a GPU also on SD3-medium's sizes at 64×64 and 128×128
//! (1024² images). Prints medians and writes `target/flowfarm-bench/step.json`
//! (`step-gpu.json` on a GPU), which `tools/bench/diffusers_step.py` reads to
//! print the ratio against diffusers on the same configs.
//!
//! `cargo bench -p flowfarm-engine --bench step` (CPU, F32), or with
//! `--features cuda` and `FLOWFARM_BENCH_DEVICE=cuda:0 FLOWFARM_BENCH_DTYPES=f32,bf16`.

mod support;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use flowfarm_engine::checkpoint::write_diffusers;
use flowfarm_engine::device::{device_name, open_device, parse_dtype};
use flowfarm_engine::mmdit::{MmDitConfig, WeightSource};
use flowfarm_engine::noise::initial_latent;
use flowfarm_engine::tiny::random_weights;
use flowfarm_engine::{Checkpoint, EngineError, MmDit};

/// SD3-medium's real sizes (24 blocks × 1536, 24 heads): only timed on a GPU.
fn sd3_medium_config() -> MmDitConfig {
    MmDitConfig { depth: 24, hidden: 1536, heads: 24, pos_embed_max_size: 192, ..support::bench_config() }
}

/// Random weights made on the device itself (σ 0.02), so a 2B-parameter
/// model needs neither a file nor minutes of CPU random numbers.
struct RandomWeights(std::collections::HashMap<String, Vec<usize>>);

impl WeightSource for RandomWeights {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor, EngineError> {
        let scale = if name.contains("norm_") { 1.0 } else { 0.0 };
        Ok((Tensor::randn(0f32, 0.02, shape, device)? + scale)?.to_dtype(dtype)?)
    }
    fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.0.get(name).cloned()
    }
}

/// Median and minimum of `runs` timed calls after one warm-up, in ms.
fn time(device: &Device, runs: usize, run: &dyn Fn()) -> (f64, f64) {
    run();
    let _ = device.synchronize();
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            run();
            let _ = device.synchronize();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[0])
}

/// `FLOWFARM_BENCH_DEVICE` (`cpu`, default, or `cuda:N`) and
/// `FLOWFARM_BENCH_DTYPES` (comma-separated, default `f32`) choose where and
/// in what precision; on a GPU an SD3-medium-sized model at 1024² is timed too.
fn main() {
    support::keep_freed_memory();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let device_spec = std::env::var("FLOWFARM_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    let dev = open_device(&device_spec).expect("FLOWFARM_BENCH_DEVICE");
    let dtypes: Vec<DType> = std::env::var("FLOWFARM_BENCH_DTYPES")
        .unwrap_or_else(|_| "f32".into())
        .split(',')
        .map(|d| parse_dtype(d).expect("FLOWFARM_BENCH_DTYPES"))
        .collect();
    let on_cpu = dev.is_cpu();
    let mut results = Vec::new();
    let mut cases: Vec<(&str, MmDitConfig, Vec<usize>)> = vec![("6×384", support::bench_config(), vec![32, 64])];
    if !on_cpu {
        cases.push(("sd3-medium", sd3_medium_config(), vec![64, 128]));
    }
    for (label, config, sides) in cases {
        for &dtype in &dtypes {
            let model = if label == "6×384" {
                let dir = tempfile::tempdir().expect("temp dir");
                write_diffusers(&config, &random_weights(&config, 1).expect("weights"), dir.path()).expect("write");
                Checkpoint::open(dir.path()).and_then(|c| c.load_model(dtype, &dev)).expect("model")
            } else {
                let shapes = RandomWeights(config.weight_shapes().into_iter().collect());
                MmDit::load(config.clone(), &shapes, dtype, &dev).expect("model")
            };
            println!(
                "MM-DiT {label} ({} blocks × {} hidden), {dtype:?}, batch 2, 154 text tokens, on {} ({threads} CPU threads):",
                config.depth,
                config.hidden,
                device_name(&dev)
            );
            for &side in &sides {
                let input = |seed: u64, shape: &[usize]| initial_latent(seed, shape, &dev).and_then(|t| t.to_dtype(dtype)).expect("input");
                let x = input(1, &[2, 16, side, side]);
                let ctx = input(2, &[2, 154, 4096]);
                let pooled = input(3, &[2, 2048]);
                let t = Tensor::new(&[700f32, 700.0], &dev).expect("t");
                let runs = match (on_cpu, side) {
                    (true, 32) => 20,
                    (true, _) => 8,
                    (false, _) => 20,
                };
                let (median, min) = time(&dev, runs, &|| {
                    model.forward(&x, &t, &ctx, &pooled, &[]).expect("forward");
                });
                println!("  {side}×{side} latent: median {median:.2} ms  (min {min:.2} ms, {runs} runs)");
                results.push(serde_json::json!({
                    "model": label, "dtype": format!("{dtype:?}").to_lowercase(), "latent": side, "median_ms": median,
                }));
            }
        }
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/flowfarm-bench");
    let _ = std::fs::create_dir_all(&out);
    let json = serde_json::json!({ "threads": threads, "device": device_name(&dev), "results": results });
    let file = if on_cpu { "step.json".to_string() } else { "step-gpu.json".to_string() };
    if std::fs::write(out.join(&file), json.to_string()).is_ok() {
        println!("  wrote target/flowfarm-bench/{file}; run tools/bench/diffusers_step.py for the ratio");
    }
}
