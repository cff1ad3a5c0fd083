//! `flowfarm model` with the bundled model (models/flowfarm-tiny), as a user runs it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use flowfarm_engine::png_output::read_parameters;

fn bundled() -> PathBuf {
    common::repo_path("models/flowfarm-tiny")
}

fn render(model: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(common::flowfarm_bin())
        .args(["model", "render", "--model"])
        .arg(model)
        .args(["--prompt", "the cat on the mat", "--negative", "blurry", "--width", "64", "--height", "48"])
        .args(["--steps", "6", "--guidance", "4.5", "--seed", "1234", "--t5-length", "16", "--out"])
        .arg(out)
        .args(extra)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run flowfarm model render")
}

#[test]
fn render_writes_a_png_whose_metadata_round_trips_and_bytes_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.png"), dir.path().join("b.png"));
    let latent = dir.path().join("latent.safetensors");
    for (out, extra) in [(&a, vec!["--save-latent", latent.to_str().unwrap()]), (&b, vec![])] {
        let result = render(&bundled(), out, &extra);
        assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    }
    let bytes = std::fs::read(&a).unwrap();
    assert_eq!(bytes, std::fs::read(&b).unwrap(), "the same command twice gives identical bytes");
    let params = read_parameters(&bytes).unwrap().expect("render parameters in the PNG");
    assert_eq!((params.prompt.as_str(), params.negative_prompt.as_str()), ("the cat on the mat", "blurry"));
    assert_eq!((params.width, params.height, params.steps, params.seed), (64, 48, 6, 1234));
    assert_eq!((params.guidance, params.shift, params.text_encoders.as_str()), (4.5, 3.0, "all"));

    // The final latent is saved before decoding, as one 1×16×h×w tensor.
    let saved = candle_core::safetensors::load(&latent, &candle_core::Device::Cpu).unwrap();
    assert_eq!(saved["latent"].dims(), &[1, 16, 24, 32]);

    // Given the seed's own noise as --init-noise, the render is the same image.
    let noise = dir.path().join("noise.safetensors");
    let initial = flowfarm_engine::noise::initial_latent(1234, &[1, 16, 24, 32], &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("noise".to_string(), initial)]), &noise).unwrap();
    let c = dir.path().join("c.png");
    let result = render(&bundled(), &c, &["--init-noise", noise.to_str().unwrap()]);
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    assert_eq!(std::fs::read(&c).unwrap(), bytes);
}

/// The bundled model with the transformer of each variant's tiny fixture
/// (the same widths as the bundled encoders and VAE).
fn variant_models(dir: &Path) -> Vec<PathBuf> {
    let mut models = vec![bundled()];
    for variant in ["sd3.5-large", "sd3.5-medium"] {
        let model = dir.join(variant);
        copy_dir(&bundled(), &model);
        std::fs::remove_dir_all(model.join("transformer")).unwrap();
        copy_dir(&common::repo_path("crates/flowfarm-engine/tests/fixtures").join(variant).join("transformer"), &model.join("transformer"));
        models.push(model);
    }
    models
}

/// Every multi-device mode on two CPU devices (CFG-parallel: the two halves
/// of every step at once; block pipeline: the blocks split between them,
/// activations handed on), and the pipeline on three, writes the same
/// bytes as one device, for each of the three variants.
#[test]
fn every_parallel_mode_renders_the_same_image_as_one_device_for_every_variant() {
    let dir = tempfile::tempdir().unwrap();
    for model in variant_models(dir.path()) {
        let one = dir.path().join("one.png");
        let result = render(&model, &one, &[]);
        assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
        let modes: [&[&str]; 4] = [
            &["--devices", "cpu:0,cpu:1", "--parallel", "cfg"],
            &["--devices", "cpu:0,cpu:1", "--parallel", "pipeline"],
            &["--devices", "cpu:0,cpu:1,cpu:2", "--parallel", "pipeline"],
            &["--devices", "cpu:0,cpu:1", "--parallel", "pipeline", "--encoders", "cpu"],
        ];
        for mode in modes {
            let split = dir.path().join("split.png");
            let result = render(&model, &split, mode);
            assert!(result.status.success(), "{mode:?}: {}", String::from_utf8_lossy(&result.stderr));
            assert_eq!(std::fs::read(&one).unwrap(), std::fs::read(&split).unwrap(), "{}, {mode:?}: byte for byte", model.display());
        }
    }
    let refused: [(&[&str], &str); 3] = [
        (&["--devices", "cpu:0,cpu:1,cpu:2", "--parallel", "cfg"], "--parallel cfg takes exactly two --devices, got 3"),
        (&["--devices", "cpu:0,cpu:1,cpu:2,cpu:3", "--parallel", "pipeline"], "4 stages for a 3-block model: give 1 to 3"),
        (&["--encoders", "gpu"], "--encoders"),
    ];
    for (args, message) in refused {
        let result = render(&bundled(), &dir.path().join("refused.png"), args);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success() && stderr.contains(message), "{args:?}: {stderr}");
    }
}

/// `flowfarm model plan` on published shapes (configs only): SD3.5-large in
/// BF16 fits two 24 GB devices as a pipeline and is refused on one, with
/// the shortfall; SD3-medium on one 80 GB device is replicated.
#[test]
fn model_plan_proposes_a_mode_that_fits_or_names_the_shortfall() {
    let configs = common::repo_path("crates/flowfarm-engine/tests/fixtures/configs");
    let plan = |model: &str, devices: &str, extra: &[&str]| {
        let model = configs.join(model);
        let mut args = vec!["model", "plan", "--model", model.to_str().unwrap(), "--devices", devices];
        args.extend(extra);
        flowfarm(&args)
    };
    let two = plan("sd3.5-large", "24GB,24GB", &[]);
    let out = String::from_utf8_lossy(&two.stdout);
    assert!(two.status.success(), "{out}{}", String::from_utf8_lossy(&two.stderr));
    assert!(out.contains("transformer 8.15B parameters (38 blocks)") && out.contains("T5 4.76B"), "{out}");
    assert!(out.contains("proposed (the fastest that fits): parallel = \"pipeline\""), "{out}");
    assert!(out.contains("holds blocks 0..19") && out.contains("holds blocks 19..38"), "{out}");

    let one = plan("sd3.5-large", "24GB", &[]);
    let err = String::from_utf8_lossy(&one.stderr);
    assert_eq!(one.status.code(), Some(1), "{err}");
    assert!(err.contains("no plan fits") && err.contains("device 0 needs") && err.contains("short"), "{err}");

    let medium = plan("sd3-medium", "80GB", &[]);
    let out = String::from_utf8_lossy(&medium.stdout);
    assert!(medium.status.success() && out.contains("parallel = \"replicate\", encoders on the first device"), "{out}");

    // A mode asked for is planned as asked, and refused when it does not fit.
    let asked = plan("sd3-medium", "80GB,80GB", &["--parallel", "cfg"]);
    assert!(asked.status.success() && String::from_utf8_lossy(&asked.stdout).contains("plan: parallel = \"cfg\""));
    let small = plan("sd3.5-large", "24GB,24GB", &["--parallel", "replicate"]);
    assert!(!small.status.success() && String::from_utf8_lossy(&small.stderr).contains("replicate with encoders on the CPU"));
    let bad = plan("sd3-medium", "lots", &[]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--devices: `lots` is not a size like 24GB"));
}

#[test]
fn clip_only_renders_with_a_model_that_has_no_t5_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("no-t5");
    copy_dir(&bundled(), &model);
    std::fs::remove_dir_all(model.join("text_encoder_3")).unwrap();
    std::fs::remove_dir_all(model.join("tokenizer_3")).unwrap();
    let out = dir.path().join("clip.png");
    let refused = render(&model, &out, &[]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("pass --clip-only"));
    assert!(!out.exists(), "nothing written on error");
    let result = render(&model, &out, &["--clip-only"]);
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    let params = read_parameters(&std::fs::read(&out).unwrap()).unwrap().unwrap();
    assert_eq!(params.text_encoders, "clip-only");
}

#[test]
fn init_noise_of_the_wrong_shape_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let noise = dir.path().join("noise.safetensors");
    let t = candle_core::Tensor::zeros((1, 16, 8, 8), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("x".to_string(), t)]), &noise).unwrap();
    let out = dir.path().join("x.png");
    let result = render(&bundled(), &out, &["--init-noise", noise.to_str().unwrap()]);
    assert!(!result.status.success());
    assert!(
        String::from_utf8_lossy(&result.stderr).contains("this render needs [1, 16, 24, 32]"),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn flowfarm(args: &[&str]) -> std::process::Output {
    Command::new(common::flowfarm_bin()).args(args).env("RUST_BACKTRACE", "0").output().expect("run flowfarm")
}

/// `model convert --to single-file` writes one SD3-style file; rendered from
/// it (tokenizers and configs from --support) the PNG is byte for byte the
/// folder's. Without T5 in the folder, the file has none and CLIP-only works.
#[test]
fn a_converted_single_file_renders_exactly_as_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("flowfarm-tiny.safetensors");
    let out = flowfarm(&["model", "convert", bundled().to_str().unwrap(), "--to", "single-file", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("transformer, vae decoder, clip_l, clip_g, t5xxl"));
    let again = flowfarm(&["model", "convert", bundled().to_str().unwrap(), "--to", "single-file", file.to_str().unwrap()]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("exists"), "never overwrites");

    let inspect = flowfarm(&["model", "inspect", "--model", file.to_str().unwrap(), "--support", bundled().to_str().unwrap()]);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(text.contains("layout: SingleFile") && text.contains("form: single file, CLIP inside, T5 inside"), "{text}");

    let (from_file, from_folder) = (dir.path().join("file.png"), dir.path().join("folder.png"));
    let result = render(&file, &from_file, &["--support", bundled().to_str().unwrap()]);
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    assert!(render(&bundled(), &from_folder, &[]).status.success());
    assert_eq!(std::fs::read(&from_file).unwrap(), std::fs::read(&from_folder).unwrap());

    let refused = render(&file, &dir.path().join("x.png"), &[]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("pass --support DIR"), "{}", String::from_utf8_lossy(&refused.stderr));

    let no_t5 = dir.path().join("no-t5");
    copy_dir(&bundled(), &no_t5);
    std::fs::remove_dir_all(no_t5.join("text_encoder_3")).unwrap();
    let clip_file = dir.path().join("clip-only.safetensors");
    assert!(flowfarm(&["model", "convert", no_t5.to_str().unwrap(), "--to", "single-file", clip_file.to_str().unwrap()]).status.success());
    let text = String::from_utf8_lossy(
        &flowfarm(&["model", "inspect", "--model", clip_file.to_str().unwrap(), "--support", no_t5.to_str().unwrap()]).stdout,
    )
    .into_owned();
    assert!(text.contains("CLIP inside, no T5") && text.contains("absent (CLIP-only)"), "{text}");
    let png = dir.path().join("clip.png");
    let result = render(&clip_file, &png, &["--support", no_t5.to_str().unwrap(), "--clip-only"]);
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
}

/// SD3.5's layout: a single file with transformer and VAE only, and the
/// encoders in files of their own (transformers names); rendered so, the
/// PNG is byte for byte the folder's.
#[test]
fn a_single_file_with_separate_encoder_files_renders_as_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("bare");
    copy_dir(&bundled(), &bare);
    for part in ["text_encoder", "text_encoder_2", "text_encoder_3"] {
        std::fs::remove_dir_all(bare.join(part)).unwrap();
    }
    let file = dir.path().join("flowfarm-tiny.safetensors");
    let out = flowfarm(&["model", "convert", bare.to_str().unwrap(), "--to", "single-file", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(
        &flowfarm(&["model", "inspect", "--model", file.to_str().unwrap(), "--support", bare.to_str().unwrap()]).stderr,
    )
    .into_owned();
    assert!(text.contains("no CLIP encoders"), "{text}");

    let encoder = |part: &str| bundled().join(part).join("model.safetensors").to_str().unwrap().to_owned();
    let support = bundled().to_str().unwrap().to_owned();
    let png = dir.path().join("separate.png");
    let (l, g, t5) = (encoder("text_encoder"), encoder("text_encoder_2"), encoder("text_encoder_3"));
    let result = render(&file, &png, &["--support", &support, "--clip-l", &l, "--clip-g", &g, "--t5", &t5]);
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    let folder = dir.path().join("folder.png");
    assert!(render(&bundled(), &folder, &[]).status.success());
    assert_eq!(std::fs::read(&png).unwrap(), std::fs::read(&folder).unwrap());

    // Encoders neither inside nor given come from the support folder, as
    // diffusers takes missing parts from the model's repository.
    let from_support = dir.path().join("support.png");
    let result = render(&file, &from_support, &["--support", &support]);
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    assert_eq!(std::fs::read(&from_support).unwrap(), std::fs::read(&folder).unwrap());
    let refused = render(&file, &dir.path().join("x.png"), &["--support", bare.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("no CLIP encoders"), "{stderr}");

    // Converted back to a folder, the separate encoder files come along
    // (the folder named as the model, which the PNG records).
    let back = dir.path().join("flowfarm-tiny");
    let args = ["model", "convert", file.to_str().unwrap(), "--to", "diffusers", back.to_str().unwrap(), "--support", &support];
    let out = flowfarm(&[&args[..], &["--clip-l", &l, "--clip-g", &g, "--t5", &t5]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("clip_l, clip_g, t5xxl"), "{}", String::from_utf8_lossy(&out.stdout));
    let from_back = dir.path().join("round-trip.png");
    assert!(render(&back, &from_back, &[]).status.success());
    assert_eq!(std::fs::read(&from_back).unwrap(), std::fs::read(&folder).unwrap());
}

/// Folder → single file → folder: the second folder renders the same bytes.
#[test]
fn a_single_file_converts_back_to_a_diffusers_folder() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("flowfarm-tiny.safetensors");
    assert!(flowfarm(&["model", "convert", bundled().to_str().unwrap(), "--to", "single-file", file.to_str().unwrap()]).status.success());
    let back = dir.path().join("flowfarm-tiny");
    let refused = flowfarm(&["model", "convert", file.to_str().unwrap(), "--to", "diffusers", back.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("needs --support DIR"));
    let support = bundled().to_str().unwrap().to_owned();
    let out = flowfarm(&["model", "convert", file.to_str().unwrap(), "--to", "diffusers", back.to_str().unwrap(), "--support", &support]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&flowfarm(&["model", "inspect", "--model", back.to_str().unwrap()]).stdout).into_owned();
    assert!(text.contains("layout: Diffusers") && text.contains("form: diffusers folder") && text.contains("\nt5 "), "{text}");
    let (a, b) = (dir.path().join("back.png"), dir.path().join("folder.png"));
    let result = render(&back, &a, &[]);
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    assert!(render(&bundled(), &b, &[]).status.success());
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

/// Past the position-embedding grid the error names the limit in this
/// model's pixels (its VAE scales by 2, not SD3's 8).
#[test]
fn too_large_a_render_names_the_models_own_limit() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::flowfarm_bin())
        .args(["model", "render", "--model"])
        .arg(bundled())
        .args(["--prompt", "x", "--width", "128", "--height", "64", "--steps", "1", "--t5-length", "16", "--out"])
        .arg(dir.path().join("big.png"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("96 pixels a side"), "{stderr}");
    assert!(!dir.path().join("big.png").exists());
}

fn published() -> PathBuf {
    common::repo_path("crates/flowfarm-engine/tests/fixtures/published")
}

fn verify(args: &[&str]) -> (bool, String) {
    let out = flowfarm(&[&["model", "verify"], args].concat());
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.code().is_some_and(|c| c == 0 || c == 1), "exit code 0 or 1: {text}");
    (out.status.success(), text)
}

fn hash_of(text: &str) -> String {
    text.lines().find_map(|l| l.strip_prefix("ok: model hash ")).expect("a model hash").to_owned()
}

/// `model verify` on each published form (exit 0, one model hash for the
/// same weights) and on three broken copies (exit 1, the problem named).
#[test]
fn model_verify_judges_every_published_form_and_names_what_is_broken() {
    let dir = tempfile::tempdir().unwrap();
    let p = |path: PathBuf| path.to_str().unwrap().to_owned();
    let (sharded, fp16, enc) =
        (p(published().join("diffusers-sharded")), p(published().join("diffusers-fp16")), published().join("sd35-encoders"));
    let file = p(dir.path().join("sd3_medium_incl_clips_t5xxlfp16.safetensors"));
    let out = flowfarm(&["model", "convert", &fp16, "--variant", "fp16", "--to", "single-file", &file]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let (ok, plain) = verify(&["--model", &p(bundled())]);
    assert!(ok && plain.contains("transformer  ok") && plain.contains("t5           ok"), "{plain}");
    let (ok, shards) = verify(&["--model", &sharded]);
    assert!(ok, "{shards}");
    assert_eq!(hash_of(&shards), hash_of(&plain), "the same weights sharded have the same hash");
    let (ok, half) = verify(&["--model", &fp16, "--variant", "fp16"]);
    assert!(ok && half.contains("variant fp16"), "{half}");
    let (ok, single) = verify(&["--model", &file, "--support", &fp16]);
    assert!(ok && single.contains("CLIP inside, T5 inside"), "{single}");
    assert_eq!(hash_of(&single), hash_of(&half), "the folder's F16 weights in one file have the folder's hash");
    let (l, g, t5) = (p(enc.join("clip_l.safetensors")), p(enc.join("clip_g.safetensors")), p(enc.join("t5xxl_fp8_e4m3fn.safetensors")));
    let (ok, sd35) = verify(&["--model", &file, "--support", &fp16, "--clip-l", &l, "--clip-g", &g, "--t5", &t5]);
    assert!(ok && sd35.contains("separate encoder files") && sd35.contains("extra: "), "{sd35}");
    assert_ne!(hash_of(&sd35), hash_of(&half), "float8 T5 is other weights");

    let copy = |name: &str| {
        let to = dir.path().join(name);
        copy_dir(&published().join("diffusers-sharded"), &to);
        to
    };
    let missing = copy("missing");
    std::fs::remove_file(missing.join("transformer/diffusion_pytorch_model-00004-of-00010.safetensors")).unwrap();
    let (ok, text) = verify(&["--model", &p(missing)]);
    assert!(
        !ok && text.contains("BROKEN") && text.contains("diffusion_pytorch_model-00004-of-00010.safetensors, which is missing"),
        "{text}"
    );

    let truncated = copy("truncated");
    let shard = truncated.join("text_encoder_3/model-00001-of-00003.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, text) = verify(&["--model", &p(truncated)]);
    assert!(!ok && text.contains("model-00001-of-00003.safetensors") && text.contains("not a complete safetensors file"), "{text}");

    let wrong = copy("wrong-shape");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(wrong.join("transformer/diffusion_pytorch_model.safetensors.index.json")).unwrap())
            .unwrap();
    let name = "context_embedder.weight";
    let shard = wrong.join("transformer").join(index["weight_map"][name].as_str().unwrap());
    let mut tensors = candle_core::safetensors::load(&shard, &candle_core::Device::Cpu).unwrap();
    let (rows, cols) = tensors[name].dims2().unwrap();
    tensors.insert(name.into(), candle_core::Tensor::zeros((rows, cols + 8), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, &shard).unwrap();
    let (ok, text) = verify(&["--model", &p(wrong)]);
    // The architecture is read off the shapes, so a wider context embedder
    // reads as another model's transformer, which the encoders do not fit.
    assert!(
        !ok && text.contains("transformer  BROKEN") && text.contains(&format!("takes text {} wide, but T5 gives {cols}", cols + 8)),
        "{text}"
    );
}

/// `model inspect` sizes each part: parameters, dtype on disk, bytes at F32/F16/BF16.
#[test]
fn model_inspect_reports_parameters_and_memory_per_dtype() {
    let out = flowfarm(&["model", "inspect", "--model", bundled().to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let row = |part: &str| {
        text.lines().find(|l| l.starts_with(&format!("{part} "))).unwrap_or_else(|| panic!("no {part} row: {text}")).to_owned()
    };
    for part in ["transformer", "vae", "clip_l", "clip_g", "t5", "total"] {
        row(part);
    }
    let transformer = row("transformer");
    let parameters: u64 = transformer.split_whitespace().nth(1).unwrap().replace(',', "").parse().unwrap();
    let checkpoint = flowfarm_engine::Checkpoint::open(bundled()).unwrap();
    let expected: usize = checkpoint.config().unwrap().weight_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    assert_eq!(parameters, expected as u64);
    assert!(transformer.contains("f32 "), "{transformer}");
    assert!(text.contains("model hash: "), "{text}");
}

/// `flowfarm train` as a user runs it: a few steps write a whole model
/// folder that `model render` loads (its own trained VAE, the base's frozen
/// encoders); `--resume` goes on from the last checkpoint to the new step
/// count; bad settings are refused before anything is written.
#[test]
fn train_writes_a_model_that_renders_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("scenes-model");
    let out_arg = out.to_str().unwrap();
    let base = bundled();
    let small = [
        "--base",
        base.to_str().unwrap(),
        "--sizes",
        "32",
        "--batch",
        "2",
        "--vae-steps",
        "3",
        "--vae-batch",
        "2",
        "--vae-channels",
        "16,32",
        "--warmup",
        "2",
        "--checkpoint-every",
        "2",
        "--t5-length",
        "16",
    ];
    let train = |extra: &[&str]| {
        let mut args = vec!["train", "--out", out_arg];
        args.extend_from_slice(&small);
        args.extend_from_slice(extra);
        flowfarm(&args)
    };
    let first = train(&["--steps", "4"]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let said = String::from_utf8_lossy(&first.stdout);
    assert!(said.contains("autoencoder: latent shift") && said.contains("flowfarm model render --model"), "{said}");
    for part in [
        "transformer/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer_3",
        "scheduler/scheduler_config.json",
        "training/trainer.json",
    ] {
        assert!(out.join(part).exists(), "{part} is missing");
    }
    let step = |path: &Path| -> u64 {
        let record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path.join("training/trainer.json")).unwrap()).unwrap();
        record["step"].as_u64().unwrap()
    };
    assert_eq!(step(&out), 4);

    let png = dir.path().join("drawn.png");
    let rendered = flowfarm(&[
        "model",
        "render",
        "--model",
        out_arg,
        "--prompt",
        "a red circle above a blue square on a yellow background",
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "3",
        "--t5-length",
        "16",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(rendered.status.success(), "{}", String::from_utf8_lossy(&rendered.stderr));
    let params = read_parameters(&std::fs::read(&png).unwrap()).unwrap().expect("parameters");
    assert_eq!(
        (params.width, params.height, params.shift),
        (32, 32, 1.0),
        "the scheduler's shift: the model trained unshifted at its size"
    );

    // Scored on held-out captions by the scenes' detector, with a contact sheet.
    let sheet = dir.path().join("sheet.png");
    let scored = flowfarm(&[
        "model",
        "score",
        "--model",
        out_arg,
        "--prompts",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "2",
        "--t5-length",
        "16",
        "--sheet",
        sheet.to_str().unwrap(),
    ]);
    assert!(scored.status.success(), "{}", String::from_utf8_lossy(&scored.stderr));
    let said = String::from_utf8_lossy(&scored.stdout);
    assert!(said.contains("2 held-out prompts at 32x32") && said.contains("objects right") && said.contains("positions right"), "{said}");
    let decoded = png::Decoder::new(std::io::Cursor::new(std::fs::read(&sheet).unwrap())).read_info().unwrap();
    assert!(decoded.info().width >= 64, "two renders side by side");

    let again = train(&["--steps", "6"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a training run: pass --resume"));
    let resumed = train(&["--steps", "6", "--resume"]);
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert!(String::from_utf8_lossy(&resumed.stdout).contains("resumed at step 4 of 6"));
    assert_eq!(step(&out), 6);

    let fresh = dir.path().join("never");
    for (extra, said) in [
        (vec!["--sizes", "40"], "--sizes: `40` is not a size"),
        (vec!["--sampler", "gauss"], "--sampler: `gauss` is not"),
        (vec!["--text-dropout", "1"], "--text-dropout 1 is outside [0, 1)"),
        (vec!["--vae-channels", "12"], "--vae-channels: give one or more channel counts, each a multiple of 8"),
        (vec!["--resume"], "holds no training run"),
    ] {
        let mut args = vec!["train", "--out", fresh.to_str().unwrap()];
        args.extend(extra.iter().copied());
        let refused = flowfarm(&args);
        assert!(!refused.status.success());
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(err.contains(said), "{err}");
        assert!(!fresh.exists(), "a refused run writes nothing");
    }
}
