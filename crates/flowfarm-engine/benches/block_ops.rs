//! Bench (not a test): where one joint block's time goes at SD3-medium's
//! sizes (D = 1536, 24 heads, 1024² image: 4096 image + 154 text tokens,
//! batch 2), op by op as the MM-DiT composes them: the linear layers (one
//! sample at a time, as `mmdit::layers::matmul` runs them), GELU, the
//! attention's pieces (head split, QKᵀ, the casts around the F32 softmax,
//! P·V) and the F32 layer norm. Meant for GPUs (a CPU takes minutes).
//!
//! `FLOWFARM_BENCH_DEVICE=cuda:0 FLOWFARM_BENCH_DTYPES=bf16 cargo bench -p flowfarm-engine --features cuda --bench block_ops`

use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use flowfarm_engine::device::{device_name, open_device, parse_dtype};

mod support;

const HIDDEN: usize = 1536;
const HEADS: usize = 24;
const TOKENS: usize = 4096 + 154;
const BATCH: usize = 2;

/// Median ms of `runs` calls after a warm-up, the device synchronised around each.
fn time(device: &Device, runs: usize, f: &dyn Fn() -> candle_core::Result<Tensor>) -> f64 {
    f().expect("op");
    device.synchronize().expect("sync");
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f().expect("op");
            device.synchronize().expect("sync");
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

fn main() -> candle_core::Result<()> {
    support::keep_freed_memory();
    let device = open_device(&std::env::var("FLOWFARM_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into())).expect("device");
    let dtype = parse_dtype(&std::env::var("FLOWFARM_BENCH_DTYPES").unwrap_or_else(|_| "f32".into())).expect("dtype");
    let runs = if device.is_cpu() { 3 } else { 20 };
    let rand = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &device).and_then(|t| t.to_dtype(dtype));
    let x = rand(&[BATCH, TOKENS, HIDDEN])?;
    let w = rand(&[HIDDEN, HIDDEN])?;
    let w_up = rand(&[4 * HIDDEN, HIDDEN])?;
    let up = rand(&[BATCH, TOKENS, 4 * HIDDEN])?;
    let head_dim = HIDDEN / HEADS;
    let split = |t: &Tensor| t.reshape((BATCH, TOKENS, HEADS, head_dim))?.transpose(1, 2)?.contiguous();
    let q = split(&x)?;
    let scores = q.matmul(&q.t()?)?;
    let scores_f32 = scores.to_dtype(DType::F32)?;
    let per_sample = |a: &Tensor, b: &Tensor| -> candle_core::Result<Tensor> {
        let parts = (0..BATCH).map(|i| a.narrow(0, i, 1)?.broadcast_matmul(b)).collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    };

    println!(
        "one joint block's pieces, {dtype:?}, on {}, batch {BATCH}, {TOKENS} tokens, D {HIDDEN}, {HEADS} heads:",
        device_name(&device)
    );
    let rows: Vec<(&str, usize, f64)> = vec![
        (
            "linear D→D, per sample + cat (×6 per block: q k v out ×2 streams, mostly image)",
            6,
            time(&device, runs, &|| per_sample(&x, &w.t()?)),
        ),
        ("linear D→D, one batched GEMM", 6, time(&device, runs, &|| x.broadcast_matmul(&w.t()?))),
        ("MLP up D→4D, per sample + cat (×1; down is the same size)", 2, time(&device, runs, &|| per_sample(&x, &w_up.t()?))),
        ("GELU (tanh) on B×N×4D", 1, time(&device, runs, &|| up.gelu())),
        ("split heads (reshape, transpose, contiguous) (×3)", 3, time(&device, runs, &|| split(&x))),
        ("QKᵀ scores", 1, time(&device, runs, &|| q.matmul(&q.t()?))),
        ("scores → F32", 1, time(&device, runs, &|| scores.to_dtype(DType::F32))),
        ("softmax F32 (candle's fused kernel)", 1, time(&device, runs, &|| candle_nn::ops::softmax_last_dim(&scores_f32))),
        ("probabilities F32 → model dtype", 1, time(&device, runs, &|| scores_f32.to_dtype(dtype))),
        ("P·V", 1, time(&device, runs, &|| scores.matmul(&q))),
        (
            "layer norm, composed in F32 with casts (×4)",
            4,
            time(&device, runs, &|| {
                let x32 = x.to_dtype(DType::F32)?;
                let mean = x32.mean_keepdim(D::Minus1)?;
                let centered = x32.broadcast_sub(&mean)?;
                let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
                centered.broadcast_div(&(var + 1e-6)?.sqrt()?)?.to_dtype(dtype)
            }),
        ),
    ];
    let mut per_block = 0.0;
    for (what, count, ms) in &rows {
        println!("  {ms:8.3} ms  × {count}  {what}");
        if !what.contains("one batched GEMM") {
            per_block += ms * *count as f64;
        }
    }
    println!("  ≈ {per_block:.1} ms a block as composed (per-sample linears), × 24 blocks ≈ {:.0} ms", per_block * 24.0);
    Ok(())
}
