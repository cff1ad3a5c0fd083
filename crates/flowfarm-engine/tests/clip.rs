//! CLIP-L and CLIP-G style text encoders against transformers'
//! CLIPTextModelWithProjection (CPU, float32). Fixtures: tools/parity/make_clip_fixtures.py.

use candle_core::{DType, Device, Tensor};
use flowfarm_engine::clip::ClipTextEncoder;

fn rel(ours: &Tensor, reference: &Tensor) -> f32 {
    let max = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    max(&(ours - reference).unwrap()) / max(reference)
}

#[test]
fn encoders_match_transformers() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for name in ["clip-l", "clip-g"] {
        let f = candle_core::safetensors::load(dir.join(format!("{name}_encode.safetensors")), &Device::Cpu).unwrap();
        let encoder = ClipTextEncoder::open(dir.join(name).join("text_encoder"), DType::F32, &Device::Cpu).unwrap();
        let out = encoder.encode(&f["input_ids"]).unwrap();
        let (hidden, pooled) = (rel(&out.penultimate, &f["penultimate"]), rel(&out.pooled, &f["text_embeds"]));
        println!("{name}: penultimate hidden states relative error {hidden:.2e}, pooled {pooled:.2e}");
        assert!(hidden <= 1e-5 && pooled <= 1e-5, "{name}: {hidden} / {pooled}");
        // A prompt's encoding does not depend on what else is in the batch.
        let alone = encoder.encode(&f["input_ids"].narrow(0, 1, 1).unwrap()).unwrap();
        let diff = (&alone.penultimate - out.penultimate.narrow(0, 1, 1).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{name}: batch-dependent encoding");
    }
}

#[test]
fn prompts_without_an_end_token_are_refused() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let encoder = ClipTextEncoder::open(dir.join("clip-l").join("text_encoder"), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[998u32, 5, 6]], &Device::Cpu).unwrap();
    assert!(encoder.encode(&ids).unwrap_err().to_string().contains("no end token"));
}
