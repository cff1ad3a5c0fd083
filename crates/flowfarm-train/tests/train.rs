//! Training a tiny MM-DiT from scratch on the engine: the loss falls in a
//! few dozen steps, a resumed run takes the same steps as one that never
//! stopped, and the checkpoint renders in the engine as it trained.

use candle_core::{DType, Device, Tensor};
use flowfarm_engine::mmdit::Variant;
use flowfarm_engine::noise::initial_latent;
use flowfarm_engine::tiny::tiny_config;
use flowfarm_engine::Checkpoint;
use flowfarm_train::params::Params;
use flowfarm_train::{Batch, Trainer, TrainerConfig};

/// Four 8×8 latents, each a different pattern, with their own text.
fn batch() -> Batch {
    let dev = Device::Cpu;
    let patterns: Vec<Tensor> = (0..4u64)
        .map(|i| {
            let base = initial_latent(100 + i, &[1, 16, 1, 1], &dev).unwrap().broadcast_as((1, 16, 8, 8)).unwrap();
            let ramp = Tensor::arange(0f32, 8.0, &dev).unwrap().affine(0.25 * (i as f64 - 1.5), 0.0).unwrap();
            (base * 1.5).unwrap().broadcast_add(&ramp.reshape((1, 1, 1, 8)).unwrap()).unwrap()
        })
        .collect();
    Batch {
        latents: Tensor::cat(&patterns, 0).unwrap(),
        context: initial_latent(7, &[4, 5, 48], &dev).unwrap(),
        pooled: initial_latent(8, &[4, 40], &dev).unwrap(),
        pixels: 64 * 64,
    }
}

fn settings() -> TrainerConfig {
    TrainerConfig { lr: 3e-3, warmup_steps: 5, ema_decay: 0.9, seed: 11, ..TrainerConfig::default() }
}

fn trainer() -> Trainer {
    let params = Params::init(&tiny_config(Variant::Sd35Medium), 5, &Device::Cpu).unwrap();
    Trainer::new(settings(), params).unwrap()
}

#[test]
fn the_loss_falls_in_a_few_dozen_steps_from_scratch() {
    let data = batch();
    let mut run = trainer();
    let grid = [0.1, 0.3, 0.5, 0.7, 0.9];
    let before: f64 = run.validation_loss(&data, &grid, 3).unwrap().iter().sum::<f64>() / grid.len() as f64;
    let losses: Vec<f32> = (0..40).map(|_| run.train_step(&data).unwrap().loss).collect();
    let after: f64 = run.validation_loss(&data, &grid, 3).unwrap().iter().sum::<f64>() / grid.len() as f64;
    let mean = |l: &[f32]| l.iter().sum::<f32>() / l.len() as f32;
    println!("training loss {:?}", losses);
    println!("validation loss over t ∈ {grid:?}: {before:.4} → {after:.4}");
    assert!(mean(&losses[30..]) < 0.7 * mean(&losses[..10]), "{losses:?}");
    assert!(after < 0.7 * before, "{before} → {after}");
}

#[test]
fn a_resumed_run_takes_the_same_steps_as_one_that_never_stopped() {
    let data = batch();
    let mut straight = trainer();
    let whole: Vec<f32> = (0..12).map(|_| straight.train_step(&data).unwrap().loss).collect();

    let dir = tempfile::tempdir().unwrap();
    let mut first = trainer();
    let mut halves: Vec<f32> = (0..6).map(|_| first.train_step(&data).unwrap().loss).collect();
    first.save(dir.path()).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(resumed.step_count(), 6);
    halves.extend((0..6).map(|_| resumed.train_step(&data).unwrap().loss));
    assert_eq!(halves, whole, "the same loss curve, bit for bit");

    // The served folder is the engine's: its model gives the EMA weights' velocity.
    let served = Checkpoint::open(dir.path().join("transformer")).unwrap().load_model(DType::F32, &Device::Cpu).unwrap();
    let again = Trainer::resume(dir.path(), &Device::Cpu).unwrap();
    let trained =
        Params::from_tensors(again.params().config(), again.ema_weights().unwrap(), &Device::Cpu).unwrap().model(DType::F32).unwrap();
    let t = Tensor::new(&[500f32, 250.0, 750.0, 900.0], &Device::Cpu).unwrap();
    let a = served.forward(&data.latents, &t, &data.context, &data.pooled, &[]).unwrap();
    let b = trained.forward(&data.latents, &t, &data.context, &data.pooled, &[]).unwrap();
    let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(scale > 0.0 && diff <= 1e-5 * scale, "served and trained forwards differ by {diff} (scale {scale})");
}

#[test]
fn bad_settings_and_folders_say_what_is_wrong() {
    let params = || Params::init(&tiny_config(Variant::Sd3Medium), 1, &Device::Cpu).unwrap();
    for (config, said) in [
        (TrainerConfig { sampler: "gauss".into(), ..settings() }, "sampler: `gauss` is not"),
        (TrainerConfig { dtype: "f16".into(), ..settings() }, "dtype: `f16` is not `f32` or `bf16`"),
        (TrainerConfig { lr: 0.0, ..settings() }, "lr: 0 must be a positive number"),
        (TrainerConfig { ema_decay: 1.0, ..settings() }, "ema_decay: 1 is outside [0, 1)"),
    ] {
        let err = Trainer::new(config, params()).err().unwrap().to_string();
        assert!(err.contains(said), "{err}");
    }
    let empty = tempfile::tempdir().unwrap();
    let err = Trainer::resume(empty.path(), &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("trainer.json") && err.contains("not a training checkpoint"), "{err}");
}
