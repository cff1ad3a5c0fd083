//! Prompt to pixels against diffusers' StableDiffusion3Pipeline on a whole
//! tiny random SD3 (the bundled models/flowfarm-tiny: three encoders, MM-DiT,
//! VAE) from a given initial latent.
//! Fixture: tools/parity/make_pipeline_fixtures.py.

use candle_core::{DType, Device, Tensor};
use flowfarm_engine::pipeline::{Pipeline, RenderRequest, VaeTiling};

mod support;

/// The bundled model, models/flowfarm-tiny, which the fixture script writes too.
fn bundled_model() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/flowfarm-tiny")
}

fn rel(ours: &Tensor, reference: &Tensor) -> f32 {
    let max = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    max(&(ours.to_device(&Device::Cpu).unwrap() - reference).unwrap()) / max(reference)
}

#[test]
fn whole_pipeline_matches_diffusers() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let f = candle_core::safetensors::load(dir.join("pipeline-tiny_render.safetensors"), &Device::Cpu).unwrap();
    let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("pipeline-tiny_render.json")).unwrap()).unwrap();
    let t5_length = spec["t5_length"].as_u64().unwrap() as usize;
    let dev = support::device();
    let pipeline = Pipeline::open(bundled_model(), t5_length, DType::F32, &dev).unwrap();
    let (prompt, negative) = (spec["prompt"].as_str().unwrap(), spec["negative_prompt"].as_str().unwrap());

    let cond = pipeline.encoders.encode(prompt, true, 48, &dev).unwrap();
    let uncond = pipeline.encoders.encode(negative, true, 48, &dev).unwrap();
    let errors = [
        rel(&cond.context, &f["context"]),
        rel(&cond.pooled, &f["pooled"]),
        rel(&uncond.context, &f["negative_context"]),
        rel(&uncond.pooled, &f["negative_pooled"]),
    ];
    println!("conditioning relative errors (context, pooled, negative context, negative pooled): {errors:?}");
    assert!(errors.iter().all(|&e| e <= 1e-5), "{errors:?}");

    let request = RenderRequest {
        prompt: prompt.into(),
        negative_prompt: negative.into(),
        initial_latent: f["initial_latent"].clone(),
        steps: spec["steps"].as_u64().unwrap() as u32,
        guidance: spec["guidance"].as_f64().unwrap() as f32,
        shift: spec["shift"].as_f64().unwrap(),
        use_t5: true,
        vae: VaeTiling::Whole,
    };
    let rendered = pipeline.render(&request, &mut |_, _| true).unwrap();
    let abs = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let latent = rendered.latent.to_device(&Device::Cpu).unwrap();
    let latent_error = abs(&latent, &f["final_latent_precise_time"]);
    let latent_error_shipped = abs(&latent, &f["final_latent"]);
    let reference: Vec<u8> = f["rgb"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let worst = rendered.rgb.iter().zip(&reference).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    let differing = rendered.rgb.iter().zip(&reference).filter(|(a, b)| a != b).count();
    println!(
        "final latent max abs error {latent_error:.2e} ({latent_error_shipped:.2e} vs diffusers' float32 timestep sinusoid); \
         pixels: worst {worst} level(s), {differing} of {} values differ",
        reference.len()
    );
    assert!(latent_error <= 1e-4, "final latent differs by {latent_error}");
    assert_eq!((rendered.width, rendered.height), (24, 16));
    assert!(worst <= 1, "decoded pixels differ by {worst} levels");
    let distinct: std::collections::BTreeSet<u8> = reference.iter().copied().collect();
    assert!(distinct.len() > 50, "the reference image is nearly flat ({} levels): the comparison would prove little", distinct.len());

    // CLIP-only: T5's place is zeros of the transformer's text width.
    let clip_only = pipeline.encoders.encode(prompt, false, 48, &dev).unwrap();
    let t5_part = clip_only.context.narrow(1, 77, t5_length).unwrap();
    assert_eq!(t5_part.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
}

/// A 12-job batch of 3 distinct prompts: each encoder runs exactly 3 times,
/// whether the batch dedupes or the cache does.
#[test]
fn equal_prompts_are_encoded_once_per_encoder() {
    use flowfarm_engine::cache::EmbeddingCache;
    use flowfarm_engine::pipeline::{EncodeCounts, TextEncoders};
    let dir = bundled_model();
    let prompts: Vec<&str> = ["a cat", "the mat", "dusk"].iter().cycle().take(12).copied().collect();

    let deduped = TextEncoders::open(&dir, 16, DType::F32, &Device::Cpu).unwrap();
    let out = deduped.encode_many(&prompts, true, 48, &Device::Cpu).unwrap();
    assert_eq!(out.len(), 12);
    assert_eq!(deduped.encode_counts(), EncodeCounts { clip_l: 3, clip_g: 3, t5: 3 });

    let cache = std::sync::Arc::new(EmbeddingCache::new(64 << 20));
    let cached = TextEncoders::open(&dir, 16, DType::F32, &Device::Cpu).unwrap().with_cache(cache.clone());
    for prompt in &prompts {
        cached.encode(prompt, true, 48, &Device::Cpu).unwrap();
    }
    assert_eq!(cached.encode_counts(), EncodeCounts { clip_l: 3, clip_g: 3, t5: 3 });
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.hits, stats.entries), (9, 27, 9));
    assert!(stats.bytes > 0);
    // Cached conditioning is the same as freshly computed.
    let again = cached.encode("a cat", true, 48, &Device::Cpu).unwrap();
    let diff = (&again.context - &out[0].context).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0);
}

/// Each encoder dropped on its own leaves zeros exactly where its features
/// go (CLIP-L's and CLIP-G's columns of the first 77 tokens and of the
/// pooled vector; T5's tokens) and the rest as the full encoding has them.
#[test]
fn a_dropped_encoder_leaves_zeros_where_its_features_go() {
    use flowfarm_engine::pipeline::{EncoderMask, TextEncoders};
    let encoders = TextEncoders::open(&bundled_model(), 16, DType::F32, &Device::Cpu).unwrap();
    let width = 48;
    let full = encoders.encode("a red circle on the left on a green background", true, width, &Device::Cpu).unwrap();
    let all =
        encoders.encode_masked("a red circle on the left on a green background", EncoderMask::all(true), width, &Device::Cpu).unwrap();
    let same =
        |a: &Tensor, b: &Tensor| a.flatten_all().unwrap().to_vec1::<f32>().unwrap() == b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(same(&full.context, &all.context) && same(&full.pooled, &all.pooled), "every encoder kept is `encode`");
    // The two CLIPs' widths, from the pooled vector's halves (CLIP-L's projection first).
    let l_only = encoders
        .encode_masked(
            "a red circle on the left on a green background",
            EncoderMask { clip_l: true, clip_g: false, t5: true },
            width,
            &Device::Cpu,
        )
        .unwrap();
    let pooled_l = l_only.pooled.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let pooled_full = full.pooled.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let kept = pooled_l.iter().zip(&pooled_full).take_while(|(a, b)| a == b).count();
    assert!(kept > 0 && pooled_l[kept..].iter().all(|&v| v == 0.0), "CLIP-G's pooled half is zeros, CLIP-L's as encoded");
    let none = encoders
        .encode_masked(
            "a red circle on the left on a green background",
            EncoderMask { clip_l: false, clip_g: false, t5: false },
            width,
            &Device::Cpu,
        )
        .unwrap();
    assert!(none.context.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() == 0.0);
    assert!(none.pooled.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() == 0.0);
    // T5 alone dropped: the first 77 tokens as encoded, the T5 tokens zeros.
    let no_t5 =
        encoders.encode_masked("a red circle on the left on a green background", EncoderMask::all(false), width, &Device::Cpu).unwrap();
    assert!(same(&no_t5.context.narrow(1, 0, 77).unwrap(), &full.context.narrow(1, 0, 77).unwrap()));
    assert!(no_t5.context.narrow(1, 77, 16).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() == 0.0);
}
