//! The T5 encoder against transformers' T5EncoderModel (CPU, float32).
//! Fixture: tools/parity/make_t5_fixtures.py.

use candle_core::{DType, Device};
use flowfarm_engine::t5::T5Encoder;

#[test]
fn encoder_matches_transformers() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let f = candle_core::safetensors::load(dir.join("t5_encode.safetensors"), &Device::Cpu).unwrap();
    let encoder = T5Encoder::open(dir.join("t5").join("text_encoder_3"), DType::F32, &Device::Cpu).unwrap();
    let ours = encoder.encode(&f["input_ids"]).unwrap();
    let reference = &f["last_hidden_state"];
    let max = |t: &candle_core::Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let rel = max(&(&ours - reference).unwrap()) / max(reference);
    println!("t5: last hidden state relative error {rel:.2e}");
    assert!(rel <= 1e-5, "relative error {rel}");
    assert_eq!(encoder.width(), 32);
}
