//! Bench (not a test): the stages of one render with the bundled model
//! (models/flowfarm-tiny): text encoding, the same prompt again from the
//! embedding cache, sampling, VAE decoding, PNG encoding. Prints medians.
//!
//! `cargo bench -p flowfarm-engine --bench render`

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use flowfarm_core::shift::flow_match_sigmas;
use flowfarm_engine::cache::EmbeddingCache;
use flowfarm_engine::noise::initial_latent;
use flowfarm_engine::pipeline::Pipeline;
use flowfarm_engine::png_output::{encode, RenderParameters};
use flowfarm_engine::sampler::{sample, SampleJob};
use flowfarm_engine::vae::{to_rgb8, Decoding};

fn median(mut f: impl FnMut() -> Duration, runs: usize) -> f64 {
    let mut times: Vec<Duration> = (0..runs).map(|_| f()).collect();
    times.sort();
    times[runs / 2].as_secs_f64() * 1e3
}

fn main() {
    support::keep_freed_memory();
    let dev = Device::Cpu;
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/flowfarm-tiny");
    let mut pipeline = Pipeline::open(&model, 256, DType::F32, &dev).expect("bundled model");
    let joint = pipeline.transformer.config().joint_attention_dim;
    let runs = 10;

    let encode_ms = median(
        || {
            let start = Instant::now();
            pipeline.encoders.encode("the cat on the mat, at dusk", true, joint, &dev).expect("encode");
            start.elapsed()
        },
        runs,
    );
    let cache = Arc::new(EmbeddingCache::new(256 << 20));
    pipeline.encoders =
        flowfarm_engine::pipeline::TextEncoders::open(&model, 256, DType::F32, &dev).expect("encoders").with_cache(cache.clone());
    let cond = pipeline.encoders.encode("the cat on the mat, at dusk", true, joint, &dev).expect("warm cache");
    let uncond = pipeline.encoders.encode("", true, joint, &dev).expect("negative");
    let cached_ms = median(
        || {
            let start = Instant::now();
            pipeline.encoders.encode("the cat on the mat, at dusk", true, joint, &dev).expect("cached");
            start.elapsed()
        },
        runs,
    );
    let job = SampleJob {
        latent: initial_latent(1, &[1, 16, 32, 32], &dev).expect("noise"),
        context: cond.context,
        pooled: cond.pooled,
        negative_context: uncond.context,
        negative_pooled: uncond.pooled,
        guidance: 5.0,
        sigmas: flow_match_sigmas(3.0, 28),
    };
    let mut latent = None;
    let sample_ms = median(
        || {
            let start = Instant::now();
            latent = Some(sample(&pipeline.transformer, std::slice::from_ref(&job), None, &mut |_, _| true).expect("sample").remove(0));
            start.elapsed()
        },
        runs,
    );
    let latent = latent.expect("sampled");
    let mut image = None;
    let decode_ms = median(
        || {
            let start = Instant::now();
            image = Some(pipeline.vae.decode(&latent, Decoding::Whole).expect("decode"));
            start.elapsed()
        },
        runs,
    );
    let (w, h, rgb) = to_rgb8(&image.expect("decoded").squeeze(0).expect("squeeze")).expect("rgb");
    let params = RenderParameters {
        prompt: "the cat on the mat, at dusk".into(),
        negative_prompt: String::new(),
        model: "flowfarm-tiny".into(),
        model_hash: None,
        width: w as u32,
        height: h as u32,
        steps: 28,
        guidance: 5.0,
        seed: 1,
        shift: 3.0,
        sampler: "euler-flow-matching".into(),
        text_encoders: "all".into(),
        vae_decode: Some("whole".into()),
    };
    let png_ms = median(
        || {
            let start = Instant::now();
            encode(w as u32, h as u32, &rgb, &params).expect("png");
            start.elapsed()
        },
        runs,
    );
    println!("bundled model (models/flowfarm-tiny), CPU F32, 32×32 latent → {w}×{h} image, medians of {runs}:");
    println!("  encode prompt (CLIP-L, CLIP-G, T5 256 tokens)  {encode_ms:>8.2} ms");
    println!("  encode again, from the embedding cache         {cached_ms:>8.3} ms   ({:?})", cache.stats());
    println!("  sample 28 steps with CFG                       {sample_ms:>8.2} ms");
    println!("  VAE decode                                     {decode_ms:>8.2} ms");
    println!("  PNG encode with metadata                       {png_ms:>8.3} ms");
}
