//! The bundled tiny model in every form published SD3 and SD3.5 weights come
//! in (tools/parity/make_published_forms.py writes the diffusers ones with
//! diffusers itself; the single files are written here from them). Each form
//! renders the same PNG bytes as the plain folder of the same weights, and
//! has the same weights identity; float8 T5 renders close to F16.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use flowfarm_engine::noise::initial_latent;
use flowfarm_engine::pipeline::{Pipeline, RenderRequest, VaeTiling, SINGLE_FILE_T5};
use flowfarm_engine::png_output::{encode, RenderParameters};
use flowfarm_engine::source::Part;
use flowfarm_engine::verify::examine;
use flowfarm_engine::{ModelSource, WeightsIdentity};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/published")
}

fn bundled() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/flowfarm-tiny")
}

fn fp16_folder() -> ModelSource {
    ModelSource { variant: Some("fp16".into()), ..ModelSource::at(fixtures().join("diffusers-fp16")) }
}

struct Render {
    png: Vec<u8>,
    rgb: Vec<u8>,
    latent: Tensor,
    identity: WeightsIdentity,
}

fn render(source: &ModelSource) -> Render {
    let pipeline = Pipeline::load(source, 16, DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", source.path.display()));
    let request = RenderRequest {
        prompt: "the cat on the mat, at dusk".into(),
        negative_prompt: "blurry".into(),
        initial_latent: initial_latent(7, &[1, 16, 8, 12], &Device::Cpu).unwrap(),
        steps: 4,
        guidance: 4.5,
        shift: 3.0,
        use_t5: true,
        vae: VaeTiling::Auto,
    };
    let rendered = pipeline.render(&request, &mut |_, _| true).unwrap();
    let parameters = RenderParameters {
        prompt: request.prompt.clone(),
        negative_prompt: request.negative_prompt.clone(),
        model: "flowfarm-tiny".into(),
        model_hash: Some(pipeline.identity.short()),
        width: rendered.width as u32,
        height: rendered.height as u32,
        steps: request.steps,
        guidance: request.guidance,
        seed: 7,
        shift: request.shift,
        sampler: "euler-flow-matching".into(),
        text_encoders: "all".into(),
        vae_decode: Some(rendered.decoding.as_str().into()),
    };
    let png = encode(rendered.width as u32, rendered.height as u32, &rendered.rgb, &parameters).unwrap();
    Render { png, rgb: rendered.rgb, latent: rendered.latent, identity: pipeline.identity }
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// Writes `tensors` with the `__metadata__` of `like` (the tiny model's head
/// and group counts, which its weights cannot tell).
fn save_like(tensors: &HashMap<String, Tensor>, like: &Path, path: &Path) {
    let bytes = std::fs::read(like).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = header.metadata().clone();
    safetensors::serialize_to_file(tensors.iter(), metadata, path).unwrap();
}

fn save(tensors: &HashMap<String, Tensor>, path: &Path) {
    candle_core::safetensors::save(tensors, path).unwrap();
}

/// Single files as Stability AI distributes them, written from the F16
/// folder: everything inside; CLIP only; no encoders (SD3.5); T5 in float8.
struct SingleFiles {
    _dir: tempfile::TempDir,
    all: PathBuf,
    clips: PathBuf,
    bare: PathBuf,
    fp8: PathBuf,
}

fn single_files() -> SingleFiles {
    let dir = tempfile::tempdir().unwrap();
    let all = dir.path().join("sd3_incl_clips_t5xxlfp16.safetensors");
    flowfarm_engine::convert::diffusers_to_single_file(&fp16_folder(), &all).unwrap();
    let tensors = load(&all);
    let transformer = tensors.iter().filter(|(k, _)| k.starts_with("model.diffusion_model."));
    assert!(
        transformer.clone().count() > 0 && transformer.into_iter().all(|(_, t)| t.dtype() == DType::F16),
        "the variant's dtype is kept"
    );
    let keep = |f: &dyn Fn(&str) -> bool| tensors.iter().filter(|(k, _)| f(k)).map(|(k, t)| (k.clone(), t.clone())).collect();
    let clips = dir.path().join("sd3_incl_clips.safetensors");
    save_like(&keep(&|k| !k.starts_with(SINGLE_FILE_T5)), &all, &clips);
    let bare = dir.path().join("sd35.safetensors");
    save_like(&keep(&|k| !k.starts_with("text_encoders.")), &all, &bare);
    let fp8 = dir.path().join("sd3_incl_clips_t5xxlfp8.safetensors");
    let mut with_fp8: HashMap<String, Tensor> = keep(&|k| !k.starts_with(SINGLE_FILE_T5));
    for (name, t) in load(&fixtures().join("sd35-encoders/t5xxl_fp8_e4m3fn.safetensors")) {
        with_fp8.insert(format!("{SINGLE_FILE_T5}{name}"), t);
    }
    save_like(&with_fp8, &all, &fp8);
    SingleFiles { _dir: dir, all, clips, bare, fp8 }
}

#[test]
fn sharded_folders_render_as_the_plain_folder() {
    let plain = render(&ModelSource::at(bundled()));
    let sharded = ModelSource::at(fixtures().join("diffusers-sharded"));
    let layout = sharded.resolve().unwrap();
    for c in [&layout.transformer, &layout.vae, &layout.t5.clone().unwrap()] {
        assert!(c.index.is_some() && c.files.paths().len() > 1, "{:?} is sharded in the fixture", c.part);
    }
    let from_shards = render(&sharded);
    assert_eq!(from_shards.png, plain.png, "same PNG bytes");
    assert_eq!(from_shards.identity, plain.identity, "same weights, same identity");
}

#[test]
fn variant_files_are_chosen_by_the_variant_and_render_as_the_plain_files() {
    let plain = ModelSource::at(fixtures().join("diffusers-fp16"));
    let (wide, half) = (examine(&plain.resolve().unwrap()), examine(&fp16_folder().resolve().unwrap()));
    for (report, dtype) in [(&wide, "f32"), (&half, "f16")] {
        let transformer = report.component(Part::Transformer).unwrap();
        assert_eq!(transformer.dtypes_on_disk().keys().copied().collect::<Vec<_>>(), vec![dtype]);
    }
    let (a, b) = (render(&plain), render(&fp16_folder()));
    assert_eq!(a.png, b.png, "the float16 files hold the float32 files' values");
    assert_eq!(a.identity, b.identity);
    assert_ne!(a.identity, render(&ModelSource::at(bundled())).identity, "rounded to float16 is other weights");

    let unknown = ModelSource { variant: Some("bf16".into()), ..plain.clone() };
    let err = unknown.resolve().unwrap_err().to_string();
    assert!(err.contains("no part has `bf16` variant files"), "{err}");
    let only_variant = tempfile::tempdir().unwrap();
    let folder = only_variant.path().join("transformer");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(
        fixtures().join("diffusers-fp16/transformer/diffusion_pytorch_model.fp16.safetensors"),
        folder.join("diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    let err = flowfarm_engine::source::folder_weights(&folder, "diffusion_pytorch_model", None).unwrap_err().to_string();
    assert!(err.contains("set variant = \"fp16\""), "{err}");
}

#[test]
fn single_files_with_and_without_encoders_render_as_the_folder() {
    let files = single_files();
    let folder = render(&fp16_folder());
    let support = fixtures().join("diffusers-fp16");
    let enc = fixtures().join("sd35-encoders");
    let forms = [
        ("encoders inside", ModelSource { support: Some(support.clone()), ..ModelSource::at(&files.all) }),
        ("CLIP inside, T5 from support", ModelSource { support: Some(support.clone()), ..ModelSource::at(&files.clips) }),
        ("no encoders, all from support", ModelSource { support: Some(support.clone()), ..ModelSource::at(&files.bare) }),
        (
            "SD3.5 separate encoder files",
            ModelSource {
                support: Some(support.clone()),
                clip_l: Some(enc.join("clip_l.safetensors")),
                clip_g: Some(enc.join("clip_g.safetensors")),
                t5: Some(enc.join("t5xxl_fp16.safetensors")),
                ..ModelSource::at(&files.bare)
            },
        ),
    ];
    for (form, source) in forms {
        let r = render(&source);
        assert_eq!(r.png, folder.png, "{form}: same PNG bytes as the folder");
        assert_eq!(r.identity, folder.identity, "{form}: same identity");
    }
}

/// Float8 T5, inside a single file or as SD3.5's separate file, upcast as
/// the reference loaders do: the same image either way, close to F16's.
#[test]
fn float8_t5_renders_close_to_float16() {
    let files = single_files();
    let support = fixtures().join("diffusers-fp16");
    let enc = fixtures().join("sd35-encoders");
    let inside = render(&ModelSource { support: Some(support.clone()), ..ModelSource::at(&files.fp8) });
    let separate = render(&ModelSource {
        support: Some(support.clone()),
        clip_l: Some(enc.join("clip_l.safetensors")),
        clip_g: Some(enc.join("clip_g.safetensors")),
        t5: Some(enc.join("t5xxl_fp8_e4m3fn.safetensors")),
        ..ModelSource::at(&files.bare)
    });
    assert_eq!(inside.png, separate.png, "float8 T5 inside the file or beside it: the same image");
    assert_eq!(inside.identity, separate.identity);

    let f16 = render(&fp16_folder());
    assert_ne!(inside.identity, f16.identity, "float8 weights are other weights");
    let diff = (&inside.latent - &f16.latent).unwrap().abs().unwrap();
    let max = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
    let mean = diff.mean_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = f16.latent.abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
    let pixels = inside.rgb.iter().zip(&f16.rgb).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
    println!(
        "float8 T5 vs float16 T5: final latent max |Δ| {max:.4}, mean |Δ| {mean:.5} (mean |latent| {scale:.3}); pixels max |Δ| {pixels} of 255"
    );
    assert!(max > 0.0, "float8 rounding changes the conditioning");
    // Stated tolerance: the mean latent difference under 5 % of the latent's mean magnitude.
    assert!(mean < 0.05 * scale, "mean |Δ| {mean} against mean |latent| {scale}");
}

#[test]
fn every_form_examines_sound_and_names_its_tensors() {
    let files = single_files();
    let support = fixtures().join("diffusers-fp16");
    for source in [
        ModelSource::at(bundled()),
        ModelSource::at(fixtures().join("diffusers-sharded")),
        fp16_folder(),
        ModelSource { support: Some(support.clone()), ..ModelSource::at(&files.all) },
        ModelSource { support: Some(support), ..ModelSource::at(&files.fp8) },
    ] {
        let report = examine(&source.resolve().unwrap());
        assert!(report.is_sound(), "{}: {:?}", source.path.display(), report.problems());
        let t5 = report.component(Part::T5).unwrap();
        assert!(t5.parameters() > 0 && t5.bytes_at(DType::F16) == 2 * t5.parameters());
    }
    let fp8 = examine(&ModelSource { support: Some(fixtures().join("diffusers-fp16")), ..ModelSource::at(&files.fp8) }.resolve().unwrap());
    let on_disk = fp8.component(Part::T5).unwrap().dtypes_on_disk();
    assert!(on_disk.contains_key("f8e4m3") && on_disk.contains_key("f16"), "{on_disk:?}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

#[test]
fn broken_copies_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let broken = |name: &str| {
        let copy = dir.path().join(name);
        copy_dir(&fixtures().join("diffusers-sharded"), &copy);
        copy
    };
    let missing = broken("missing-shard");
    std::fs::remove_file(missing.join("text_encoder_3/model-00002-of-00003.safetensors")).unwrap();
    let err = ModelSource::at(&missing).resolve().unwrap_err().to_string();
    assert!(err.contains("model-00002-of-00003.safetensors, which is missing"), "{err}");

    let truncated = broken("truncated");
    let shard = truncated.join("transformer/diffusion_pytorch_model-00003-of-00010.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 100]).unwrap();
    let err = ModelSource::at(&truncated).resolve().unwrap_err().to_string();
    assert!(err.contains("00003-of-00010.safetensors") && err.contains("not a complete safetensors file"), "{err}");

    let wrong = broken("wrong-shape");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(wrong.join("vae/diffusion_pytorch_model.safetensors.index.json")).unwrap()).unwrap();
    let name = "decoder.conv_in.weight";
    let shard = wrong.join("vae").join(index["weight_map"][name].as_str().unwrap());
    let mut tensors = load(&shard);
    let t = tensors[name].clone();
    let (o, i, h, w) = t.dims4().unwrap();
    tensors.insert(name.to_owned(), Tensor::zeros((o, i, h + 1, w), t.dtype(), &Device::Cpu).unwrap());
    save(&tensors, &shard);
    let report = examine(&ModelSource::at(&wrong).resolve().unwrap());
    let problems = report.problems().join("\n");
    assert!(!report.is_sound() && report.identity.is_none());
    assert!(
        problems.contains(&format!("vae: tensor `{name}` has shape [{o}, {i}, {}, {w}], expected [{o}, {i}, {h}, {w}]", h + 1)),
        "{problems}"
    );
}

/// Parts a single file leaves out come from the support folder only where it
/// has their weights: a support folder of configs and tokenizers makes a
/// file with CLIP inside CLIP-only, as it was before any T5 was found.
#[test]
fn support_folders_lend_weights_only_when_they_have_them() {
    let files = single_files();
    let dir = tempfile::tempdir().unwrap();
    let support = dir.path().join("configs-only");
    copy_dir(&fixtures().join("diffusers-fp16"), &support);
    for part in ["text_encoder_3"] {
        for entry in std::fs::read_dir(support.join(part)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "safetensors") {
                std::fs::remove_file(path).unwrap();
            }
        }
    }
    let layout = ModelSource { support: Some(support), ..ModelSource::at(&files.clips) }.resolve().unwrap();
    assert!(layout.t5.is_none() && layout.form.ends_with("no T5"), "{}", layout.form);
}

/// A variant missing for one part falls back to that part's plain files, as
/// diffusers does; the counts are the model's, whatever the layout.
#[test]
fn a_part_without_the_variant_takes_its_plain_files() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("mixed");
    copy_dir(&fixtures().join("diffusers-fp16"), &folder);
    std::fs::remove_file(folder.join("vae/diffusion_pytorch_model.fp16.safetensors")).unwrap();
    let layout = ModelSource { variant: Some("fp16".into()), ..ModelSource::at(&folder) }.resolve().unwrap();
    assert_eq!((layout.transformer.variant.as_deref(), layout.vae.variant.as_deref()), (Some("fp16"), None));

    let files = single_files();
    let single =
        examine(&ModelSource { support: Some(fixtures().join("diffusers-fp16")), ..ModelSource::at(&files.all) }.resolve().unwrap());
    let folder = examine(&fp16_folder().resolve().unwrap());
    for part in [Part::Transformer, Part::Vae, Part::T5] {
        assert_eq!(single.component(part).unwrap().parameters(), folder.component(part).unwrap().parameters(), "{part:?}");
    }
}

/// ComfyUI's "scaled" float8 files carry a scale per weight that plain
/// upcasting would drop: refused, with what to use instead.
#[test]
fn scaled_float8_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let scaled = dir.path().join("t5xxl_fp8_e4m3fn_scaled.safetensors");
    let mut tensors = load(&fixtures().join("sd35-encoders/t5xxl_fp8_e4m3fn.safetensors"));
    tensors.insert("encoder.block.0.layer.0.SelfAttention.q.scale_weight".into(), Tensor::ones(1, DType::F32, &Device::Cpu).unwrap());
    save(&tensors, &scaled);
    let files = single_files();
    let enc = fixtures().join("sd35-encoders");
    let source = ModelSource {
        support: Some(fixtures().join("diffusers-fp16")),
        clip_l: Some(enc.join("clip_l.safetensors")),
        clip_g: Some(enc.join("clip_g.safetensors")),
        t5: Some(scaled),
        ..ModelSource::at(&files.bare)
    };
    let report = examine(&source.resolve().unwrap());
    let problems = report.problems().join("\n");
    assert!(
        !report.is_sound() && problems.contains("t5: `encoder.block.0.layer.0.SelfAttention.q.scale_weight`: scaled float8"),
        "{problems}"
    );
}
