//! The MM-DiT and sampler against diffusers 0.42.1 (CPU, float32) on the same
//! weights and inputs. Fixtures: `tests/fixtures`, written by
//! `tools/parity/make_mmdit_fixtures.py`.
//!
//! Error measure: max |ours − reference| / max |reference| over the tensor
//! (normwise relative), plus the max absolute error where the issue asks for it.
//!
//! The forward reference is diffusers with its timestep sinusoid computed in
//! float64 (`output_precise_time`), as flowfarm computes it; diffusers as
//! shipped rounds t·f in float32, which these random tiny models amplify to
//! ~3e-5 relative. Both figures are printed; see the fixture script.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use flowfarm_core::shift::flow_match_sigmas;
use flowfarm_engine::mmdit::Variant;
use flowfarm_engine::sampler::{sample, SampleJob};
use flowfarm_engine::{Checkpoint, Layout};

mod support;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &Device::Cpu).expect("fixture")
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// (normwise relative error, max absolute error)
fn errors(ours: &Tensor, reference: &Tensor) -> (f32, f32) {
    assert_eq!(ours.dims(), reference.dims());
    let ours = ours.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let diff = max_abs(&(ours - reference).unwrap());
    (diff / max_abs(reference), diff)
}

fn forward(checkpoint: &Checkpoint, dtype: DType, inputs: &std::collections::HashMap<String, Tensor>, skip: &[usize]) -> Tensor {
    let dev = support::device();
    let model = checkpoint.load_model(dtype, &dev).expect("model");
    let input = |name: &str| inputs[name].to_device(&dev).unwrap();
    model
        .forward(&input("hidden_states"), &input("timestep"), &input("encoder_hidden_states"), &input("pooled_projections"), skip)
        .expect("forward")
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

const VARIANTS: [(&str, Variant); 3] =
    [("sd3-medium", Variant::Sd3Medium), ("sd3.5-large", Variant::Sd35Large), ("sd3.5-medium", Variant::Sd35Medium)];

#[test]
fn forward_matches_diffusers_in_f32_for_every_variant_and_both_layouts() {
    for (name, variant) in VARIANTS {
        let inputs = load(&format!("{name}_forward.safetensors"));
        let diffusers = Checkpoint::open(fixtures().join(name)).unwrap();
        let single = Checkpoint::open(fixtures().join(name).join("single_file.safetensors")).unwrap();
        assert_eq!((diffusers.layout(), single.layout()), (Layout::Diffusers, Layout::SingleFile));
        let config = diffusers.config().unwrap();
        assert_eq!(config.variant, variant, "{name}");
        assert_eq!(single.config().unwrap(), config, "{name}: both layouts describe the same model");

        let ours = forward(&diffusers, DType::F32, &inputs, &[]);
        let (rel, abs) = errors(&ours, &inputs["output_precise_time"]);
        let (rel_shipped, _) = errors(&ours, &inputs["output"]);
        println!(
            "{name}: forward F32 relative error {rel:.2e} (max abs {abs:.2e}); \
             vs diffusers' float32 timestep sinusoid {rel_shipped:.2e}"
        );
        assert!(rel <= 1e-5, "{name}: relative error {rel}");
        assert!(rel_shipped <= 1e-4, "{name}: relative error vs shipped diffusers {rel_shipped}");

        let from_single = forward(&single, DType::F32, &inputs, &[]);
        assert_eq!(max_abs(&(&from_single - &ours).unwrap()), 0.0, "{name}: layouts must give identical outputs");

        if variant == Variant::Sd35Medium {
            let skipped = forward(&diffusers, DType::F32, &inputs, &[1]);
            let (rel, _) = errors(&skipped, &inputs["output_skip_1"]);
            println!("{name}: skip-layer forward relative error {rel:.2e}");
            assert!(rel <= 1e-5, "skip layers: {rel}");
        }
    }
}

/// Half precision against our own F32 on the same weights: F16 keeps ~3
/// decimal digits, BF16 ~2; norms and softmax run in F32 in both.
#[test]
fn half_precision_stays_close_to_f32() {
    for (name, _) in VARIANTS {
        let inputs = load(&format!("{name}_forward.safetensors"));
        let checkpoint = Checkpoint::open(fixtures().join(name)).unwrap();
        let reference = forward(&checkpoint, DType::F32, &inputs, &[]);
        for (dtype, tolerance) in [(DType::F16, 5e-3), (DType::BF16, 4e-2)] {
            let (rel, _) = errors(&forward(&checkpoint, dtype, &inputs, &[]), &reference);
            println!("{name}: {dtype:?} relative error vs F32 {rel:.2e}");
            assert!(rel <= tolerance, "{name} {dtype:?}: {rel} > {tolerance}");
        }
    }
}

#[test]
fn whole_sample_matches_the_diffusers_pipeline() {
    let f = load("sd3-medium_sample.safetensors");
    let dev = support::device();
    let model = Checkpoint::open(fixtures().join("sd3-medium")).unwrap().load_model(DType::F32, &dev).unwrap();
    let sigmas = flow_match_sigmas(3.0, 28);
    let reference_sigmas = f["sigmas"].to_vec1::<f32>().unwrap();
    for (ours, theirs) in sigmas.iter().zip(&reference_sigmas) {
        assert!((*ours as f32 - theirs).abs() <= 1e-7, "sigmas {ours} vs {theirs}");
    }
    let job = SampleJob {
        latent: f["initial_latent"].to_device(&dev).unwrap(),
        context: f["cond"].to_device(&dev).unwrap(),
        pooled: f["pooled"].to_device(&dev).unwrap(),
        negative_context: f["uncond"].to_device(&dev).unwrap(),
        negative_pooled: f["negative_pooled"].to_device(&dev).unwrap(),
        guidance: 5.0,
        sigmas,
    };
    let mut steps_seen = 0;
    let out = sample(&model, &[job], None, &mut |step, total| {
        steps_seen = step;
        assert_eq!(total, 28);
        true
    })
    .unwrap();
    assert_eq!(steps_seen, 28);
    let (rel, abs) = errors(&out[0], &f["final_latent_precise_time"]);
    let (_, abs_shipped) = errors(&out[0], &f["final_latent"]);
    println!("28-step sample: max abs error {abs:.2e} (relative {rel:.2e}); vs diffusers' float32 timestep sinusoid {abs_shipped:.2e}");
    assert!(abs <= 1e-4, "max abs error {abs}");
    assert!(abs_shipped <= 1e-3, "max abs error vs shipped diffusers {abs_shipped}");
}
