//! The memory planner: its parameter counts from configs against the
//! tensors of real checkpoints, and its proposals for published models
//! (configs only) on the devices studios have.

use std::path::{Path, PathBuf};

use candle_core::DType;
use flowfarm_engine::plan::{parse_size, plan, propose, EncoderPlace, Mode, ModelShapes, Workload};
use flowfarm_engine::source::Part;
use flowfarm_engine::ModelSource;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(path)
}

fn published(name: &str) -> ModelShapes {
    ModelShapes::from_config_folder(&repo("crates/flowfarm-engine/tests/fixtures/configs").join(name)).unwrap()
}

const GB: u64 = 1_000_000_000;

fn bf16_1024() -> Workload {
    Workload { width: 1024, height: 1024, batch: 1, t5_length: 256, dtype: DType::BF16 }
}

/// Every part's count from its config equals the parameters of the tensors
/// loading asks for, for the bundled model and a published form of each
/// variant: the formulas are the checkpoints'.
#[test]
fn parameter_counts_from_configs_match_the_checkpoints_tensors() {
    let mut sources = vec![ModelSource::at(repo("models/flowfarm-tiny"))];
    let mut folders = Vec::new();
    for variant in ["sd3-medium", "sd3.5-large", "sd3.5-medium"] {
        let dir = repo("crates/flowfarm-engine/tests/fixtures").join(variant);
        // The variants' transformers beside the bundled encoders and VAE.
        let folder = tempfile::tempdir().unwrap();
        let model = folder.path().to_owned();
        folders.push(folder);
        for part in ["text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3", "vae", "scheduler"] {
            copy_dir(&repo("models/flowfarm-tiny").join(part), &model.join(part));
        }
        std::fs::copy(repo("models/flowfarm-tiny/model_index.json"), model.join("model_index.json")).unwrap();
        copy_dir(&dir.join("transformer"), &model.join("transformer"));
        sources.push(ModelSource::at(model));
    }
    for source in sources {
        let layout = source.resolve().unwrap();
        let report = flowfarm_engine::verify::examine(&layout);
        let shapes = ModelShapes::of(&layout).unwrap();
        let counted = |part| report.component(part).unwrap().parameters();
        let name = source.path.display();
        assert_eq!(shapes.transformer_parameters(), counted(Part::Transformer), "{name}: transformer");
        assert_eq!(shapes.clip_l, counted(Part::ClipL), "{name}: CLIP-L");
        assert_eq!(shapes.clip_g, counted(Part::ClipG), "{name}: CLIP-G");
        assert_eq!(shapes.t5, Some(counted(Part::T5)), "{name}: T5");
        assert_eq!(shapes.vae, counted(Part::Vae), "{name}: VAE decoder");
        // The folder's configs alone say the same.
        assert_eq!(ModelShapes::from_config_folder(&source.path).unwrap().transformer_parameters(), counted(Part::Transformer));
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn sd35_large_in_bf16_fits_two_24_gb_devices_and_not_one() {
    let shapes = published("sd3.5-large");
    let two = [("a".to_string(), 24 * GB), ("b".to_string(), 24 * GB)];
    let proposed = propose(&shapes, &bf16_1024(), &two).expect("a mode fits two 24 GB devices");
    assert!(proposed.fits());
    assert_eq!(proposed.mode, Mode::Pipeline, "the transformer alone is larger than one card: {proposed:?}");
    // Each stage holds about half the blocks.
    let weights: Vec<u64> = proposed.devices.iter().map(|d| d.weights).collect();
    assert!(weights.iter().all(|&w| w < 20 * GB), "{weights:?}");

    let one = [("a".to_string(), 24 * GB)];
    let tried = propose(&shapes, &bf16_1024(), &one).expect_err("nothing fits one 24 GB device");
    assert!(!tried.is_empty());
    for p in &tried {
        let short = p.shortfall().expect("each plan names its shortfall");
        assert!(short.need() > short.memory && short.device == "a", "{short:?}");
    }
}

#[test]
fn sd3_medium_on_one_80_gb_device_is_replicated_with_its_encoders() {
    let shapes = published("sd3-medium");
    let proposed = propose(&shapes, &bf16_1024(), &[("h100".to_string(), 80 * GB)]).unwrap();
    assert_eq!((proposed.mode, proposed.encoders), (Mode::Replicate, EncoderPlace::Same));
    assert!(proposed.devices[0].holds.contains("T5"), "{:?}", proposed.devices[0]);
    // On 8 such devices, replicas still come first: no mode is faster per image.
    let eight: Vec<(String, u64)> = (0..8).map(|i| (format!("cuda:{i}"), 80 * GB)).collect();
    assert_eq!(propose(&shapes, &bf16_1024(), &eight).unwrap().mode, Mode::Replicate);
}

#[test]
fn needs_grow_with_the_workload_and_shrink_with_the_encoders_on_the_cpu() {
    let shapes = published("sd3-medium");
    let devices = [("a".to_string(), 80 * GB), ("b".to_string(), 80 * GB)];
    let at = |work: &Workload, mode, place| plan(&shapes, work, &devices, mode, place).unwrap().devices[0].need();
    let base = bf16_1024();
    let larger = Workload { width: 2048, height: 2048, ..base };
    let batch = Workload { batch: 4, ..base };
    assert!(at(&larger, Mode::Replicate, EncoderPlace::Same) > at(&base, Mode::Replicate, EncoderPlace::Same));
    assert!(at(&batch, Mode::Replicate, EncoderPlace::Same) > at(&base, Mode::Replicate, EncoderPlace::Same));
    assert!(at(&base, Mode::Replicate, EncoderPlace::Cpu) < at(&base, Mode::Replicate, EncoderPlace::Same));
    assert!(at(&base, Mode::Pipeline, EncoderPlace::Cpu) < at(&base, Mode::Replicate, EncoderPlace::Cpu));
    let err = plan(&shapes, &base, &devices[..1], Mode::Cfg, EncoderPlace::Same).unwrap_err().to_string();
    assert!(err.contains("cfg cannot use 1 devices"), "{err}");
    assert_eq!(shapes.without_t5().t5, None);
}

#[test]
fn sizes_parse_in_decimal_and_binary_units() {
    assert_eq!(parse_size("24GB"), Ok(24 * GB));
    assert_eq!(parse_size("80GiB"), Ok(80 << 30));
    assert_eq!(parse_size("512 MiB"), Ok(512 << 20));
    assert_eq!(parse_size("1000"), Ok(1000));
    assert!(parse_size("lots").unwrap_err().contains("is not a size like 24GB"));
    assert!(parse_size("24XB").unwrap_err().contains("`xb` in `24XB` is not a unit"));
}
