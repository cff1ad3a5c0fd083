//! The engine on tiny random models: both checkpoint layouts (and shards) for
//! every variant, clear errors for broken checkpoints and oversize images,
//! seeded noise, batching and cancellation.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use flowfarm_core::shift::flow_match_sigmas;
use flowfarm_engine::checkpoint::{write_diffusers, write_single_file};
use flowfarm_engine::mmdit::Variant;
use flowfarm_engine::noise::initial_latent;
use flowfarm_engine::sampler::{sample, sample_batch, sample_on, Replica, Replicas, SampleJob, SkipLayerGuidance};
use flowfarm_engine::stages::{split_blocks, BlockPipeline, Stage};
use flowfarm_engine::tiny::{random_weights, tiny_config};
use flowfarm_engine::{Checkpoint, EngineError, Layout, MmDit};

mod support;

const VARIANTS: [Variant; 3] = [Variant::Sd3Medium, Variant::Sd35Large, Variant::Sd35Medium];

fn inputs(batch: usize, h: usize, w: usize, seed: u64) -> (Tensor, Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let latents = initial_latent(seed, &[batch, 16, h, w], &dev).unwrap();
    let context = initial_latent(seed + 1, &[batch, 7, 48], &dev).unwrap();
    let pooled = initial_latent(seed + 2, &[batch, 40], &dev).unwrap();
    let t = Tensor::from_vec((0..batch).map(|i| 900.0 - 100.0 * i as f32).collect::<Vec<_>>(), batch, &dev).unwrap();
    (latents, t, context, pooled)
}

fn equal(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims() && a.flatten_all().unwrap().to_vec1::<f32>().unwrap() == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn generated_models_load_in_both_layouts_with_identical_outputs() {
    for variant in VARIANTS {
        let dir = tempfile::tempdir().unwrap();
        let config = tiny_config(variant);
        let weights = random_weights(&config, 7).unwrap();
        write_diffusers(&config, &weights, &dir.path().join("diffusers")).unwrap();
        write_single_file(&config, &weights, &dir.path().join("sd3.safetensors")).unwrap();
        let a = Checkpoint::open(dir.path().join("diffusers")).unwrap();
        let b = Checkpoint::open(dir.path().join("sd3.safetensors")).unwrap();
        assert_eq!((a.layout(), b.layout()), (Layout::Diffusers, Layout::SingleFile));
        assert_eq!((a.dtype(), b.dtype()), (Some(DType::F32), Some(DType::F32)));
        assert_eq!(a.config().unwrap(), config, "{variant:?} detected from the diffusers folder");
        assert_eq!(b.config().unwrap(), config, "{variant:?} detected from the single file");
        let (x, t, c, y) = inputs(2, 16, 24, 1);
        let out_a = a.load_model(DType::F32, &Device::Cpu).unwrap().forward(&x, &t, &c, &y, &[]).unwrap();
        let out_b = b.load_model(DType::F32, &Device::Cpu).unwrap().forward(&x, &t, &c, &y, &[]).unwrap();
        assert_eq!(out_a.dims(), &[2, 16, 16, 24]);
        assert!(equal(&out_a, &out_b), "{variant:?}: layouts differ");
    }
}

#[test]
fn sharded_diffusers_checkpoints_load() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(Variant::Sd35Large);
    let weights = random_weights(&config, 3).unwrap();
    write_diffusers(&config, &weights, dir.path()).unwrap();
    let folder = dir.path().join("transformer");
    let whole = Checkpoint::open(dir.path()).unwrap().load_model(DType::F32, &Device::Cpu).unwrap();
    // Split the same weights over two shards with an index, as large models ship.
    std::fs::remove_file(folder.join("diffusion_pytorch_model.safetensors")).unwrap();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in
        [("diffusion_pytorch_model-00001-of-00002.safetensors", first), ("diffusion_pytorch_model-00002-of-00002.safetensors", second)]
    {
        let shard: HashMap<String, Tensor> = part.iter().map(|n| ((*n).clone(), weights[*n].clone())).collect();
        candle_core::safetensors::save(&shard, folder.join(file)).unwrap();
        for n in part.iter() {
            map.insert((*n).clone(), serde_json::Value::String(file.into()));
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(folder.join("diffusion_pytorch_model.safetensors.index.json"), index.to_string()).unwrap();
    let sharded = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(sharded.layout(), Layout::Diffusers);
    let sharded = sharded.load_model(DType::F32, &Device::Cpu).unwrap();
    let (x, t, c, y) = inputs(1, 8, 8, 5);
    assert!(equal(&whole.forward(&x, &t, &c, &y, &[]).unwrap(), &sharded.forward(&x, &t, &c, &y, &[]).unwrap()));
}

#[test]
fn broken_checkpoints_name_the_key_and_shapes() {
    let config = tiny_config(Variant::Sd3Medium);
    let dir = tempfile::tempdir().unwrap();

    let mut missing = random_weights(&config, 1).unwrap();
    missing.remove("transformer_blocks.1.ff.net.2.weight");
    write_diffusers(&config, &missing, &dir.path().join("missing")).unwrap();
    let err = Checkpoint::open(dir.path().join("missing")).unwrap().load_model(DType::F32, &Device::Cpu).err().unwrap();
    assert_eq!(err.to_string(), "checkpoint has no tensor `transformer_blocks.1.ff.net.2.weight`");

    let mut wrong = random_weights(&config, 1).unwrap();
    wrong.insert("transformer_blocks.0.attn.to_k.weight".into(), Tensor::zeros((32, 31), DType::F32, &Device::Cpu).unwrap());
    write_single_file(&config, &wrong, &dir.path().join("wrong.safetensors")).ok();
    write_diffusers(&config, &wrong, &dir.path().join("wrong")).unwrap();
    let err = Checkpoint::open(dir.path().join("wrong")).unwrap().load_model(DType::F32, &Device::Cpu).err().unwrap();
    assert_eq!(err.to_string(), "tensor `transformer_blocks.0.attn.to_k.weight` has shape [32, 31], expected [32, 32]");

    let err = Checkpoint::open(dir.path().join("nothing-here")).err().unwrap();
    assert!(err.to_string().contains("no such file or folder"), "{err}");
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a checkpoint").unwrap();
    assert!(matches!(Checkpoint::open(&junk), Err(EngineError::Checkpoint { .. })));
}

#[test]
fn images_beyond_the_position_grid_are_refused_with_the_limit() {
    let config = tiny_config(Variant::Sd3Medium);
    let dir = tempfile::tempdir().unwrap();
    write_diffusers(&config, &random_weights(&config, 1).unwrap(), dir.path()).unwrap();
    let model = Checkpoint::open(dir.path()).unwrap().load_model(DType::F32, &Device::Cpu).unwrap();
    // 24×24 patches of 2: latents up to 48 a side, any aspect ratio within.
    let (x, t, c, y) = inputs(1, 48, 16, 1);
    assert_eq!(model.forward(&x, &t, &c, &y, &[]).unwrap().dims(), &[1, 16, 48, 16]);
    let (x, t, c, y) = inputs(1, 50, 16, 1);
    let err = model.forward(&x, &t, &c, &y, &[]).err().unwrap();
    assert!(matches!(err, EngineError::TooLarge { max: 24, .. }), "{err}");
    assert!(err.to_string().contains("at most 24×24"), "{err}");
}

fn tiny_model(variant: Variant) -> MmDit {
    let config = tiny_config(variant);
    let dir = tempfile::tempdir().unwrap();
    write_diffusers(&config, &random_weights(&config, 11).unwrap(), dir.path()).unwrap();
    Checkpoint::open(dir.path()).unwrap().load_model(DType::F32, &support::device()).unwrap()
}

fn job(seed: u64, shift: f64, guidance: f32) -> SampleJob {
    let dev = support::device();
    SampleJob {
        latent: initial_latent(seed, &[1, 16, 8, 12], &dev).unwrap(),
        context: initial_latent(seed ^ 0xc0, &[1, 7, 48], &dev).unwrap(),
        pooled: initial_latent(seed ^ 0x90, &[1, 40], &dev).unwrap(),
        negative_context: Tensor::zeros((1, 7, 48), DType::F32, &dev).unwrap(),
        negative_pooled: Tensor::zeros((1, 40), DType::F32, &dev).unwrap(),
        guidance,
        sigmas: flow_match_sigmas(shift, 6),
    }
}

/// CFG-parallel: the conditional rows on one replica and the unconditional
/// rows on another, each on threads of its own, give the same bits as one
/// call with every row, for each variant (with skip-layer guidance too).
#[test]
fn cfg_parallel_gives_the_same_latents_as_one_call() {
    let pools: Vec<rayon::ThreadPool> = (0..2).map(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap()).collect();
    let every_step = SkipLayerGuidance { layers: vec![1], scale: 2.8, start: 0.0, stop: 1.0 };
    for (variant, slg) in [(Variant::Sd3Medium, None), (Variant::Sd35Large, None), (Variant::Sd35Medium, Some(&every_step))] {
        let (cond, uncond) = (tiny_model(variant), tiny_model(variant));
        let jobs = [job(7, 1.5, 1.0), job(42, 3.0, 5.0), job(9, 6.0, 7.5)];
        let one = sample(&cond, &jobs, slg, &mut |_, _| true).unwrap();
        let replicas = Replicas::Cfg {
            cond: Replica { model: &cond, threads: Some(&pools[0]) },
            uncond: Replica { model: &uncond, threads: Some(&pools[1]) },
        };
        let mut steps = Vec::new();
        let split = sample_on(replicas, &jobs, slg, &mut |step, _| {
            steps.push(step);
            true
        })
        .unwrap();
        assert_eq!(steps, (1..=6).collect::<Vec<_>>(), "{variant:?}: every step reported");
        for (i, (a, b)) in one.iter().zip(&split).enumerate() {
            assert!(equal(a, b), "{variant:?}: job {i} differs between one call and CFG-parallel");
        }
    }
}

/// A block pipeline over two or three stages, each on threads of its own,
/// gives the same bits as one call, for each variant (with skip-layer
/// guidance too), and renders from several threads at once are in flight
/// together without mixing up their answers.
#[test]
fn a_block_pipeline_gives_the_same_latents_as_one_model() {
    let every_step = SkipLayerGuidance { layers: vec![1], scale: 2.8, start: 0.0, stop: 1.0 };
    for (variant, slg) in [(Variant::Sd3Medium, None), (Variant::Sd35Large, None), (Variant::Sd35Medium, Some(&every_step))] {
        let config = tiny_config(variant);
        let dir = tempfile::tempdir().unwrap();
        write_diffusers(&config, &random_weights(&config, 11).unwrap(), dir.path()).unwrap();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        let whole = checkpoint.load_model(DType::F32, &support::device()).unwrap();
        let jobs = [job(7, 1.5, 1.0), job(42, 3.0, 5.0), job(9, 6.0, 7.5)];
        let one = sample(&whole, &jobs, slg, &mut |_, _| true).unwrap();
        for parts in [2, 3] {
            let stages = split_blocks(config.depth, parts)
                .into_iter()
                .map(|blocks| Stage {
                    model: std::sync::Arc::new(checkpoint.load_stage(DType::F32, &support::device(), blocks).unwrap()),
                    threads: Some(rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap()),
                })
                .collect();
            let pipeline = BlockPipeline::start(stages).unwrap();
            assert_eq!(pipeline.ranges().len(), parts);
            // Each job sampled alone, all three at once from their own threads.
            let split: Vec<Tensor> = std::thread::scope(|scope| {
                let runs: Vec<_> = jobs
                    .iter()
                    .map(|job| {
                        let pipeline = &pipeline;
                        scope.spawn(move || sample_on(Replicas::Blocks(pipeline), std::slice::from_ref(job), slg, &mut |_, _| true))
                    })
                    .collect();
                runs.into_iter().map(|r| r.join().unwrap().unwrap().remove(0)).collect()
            });
            for (i, (a, b)) in one.iter().zip(&split).enumerate() {
                assert!(equal(a, b), "{variant:?}, {parts} stages: job {i} differs from one model's");
            }
            let together = sample_on(Replicas::Blocks(&pipeline), &jobs, slg, &mut |_, _| true).unwrap();
            assert!(one.iter().zip(&together).all(|(a, b)| equal(a, b)), "{variant:?}: the batch through {parts} stages");
        }
    }
}

#[test]
fn stages_must_cover_the_model_in_order_and_a_stage_alone_cannot_forward() {
    let config = tiny_config(Variant::Sd3Medium);
    let dir = tempfile::tempdir().unwrap();
    write_diffusers(&config, &random_weights(&config, 3).unwrap(), dir.path()).unwrap();
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let stage = |blocks: std::ops::Range<usize>| Stage {
        model: std::sync::Arc::new(checkpoint.load_stage(DType::F32, &Device::Cpu, blocks).unwrap()),
        threads: None,
    };
    let (x, t, c, y) = inputs(1, 8, 8, 1);
    let err = stage(0..1).model.forward(&x, &t, &c, &y, &[]).unwrap_err().to_string();
    assert!(err.contains("holds blocks 0..1 of 3: run it as a stage of a block pipeline"), "{err}");
    let gap = BlockPipeline::start(vec![stage(0..1), stage(2..3)]).err().unwrap().to_string();
    assert!(gap.contains("stage 1 holds blocks 2..3; it must start at block 1"), "{gap}");
    let short = BlockPipeline::start(vec![stage(0..1), stage(1..2)]).err().unwrap().to_string();
    assert!(short.contains("the stages end at block 2; the model has 3"), "{short}");
    let past = checkpoint.load_stage(DType::F32, &Device::Cpu, 2..4).err().unwrap().to_string();
    assert!(past.contains("blocks 2..4 of a 3-block model"), "{past}");
    assert_eq!(split_blocks(24, 2), vec![0..12, 12..24]);
    assert_eq!(split_blocks(38, 3), vec![0..12, 12..25, 25..38]);
}

#[test]
fn same_seed_gives_the_same_latent_alone_or_in_a_batch() {
    let model = tiny_model(Variant::Sd35Large);
    let alone = sample(&model, &[job(42, 3.0, 5.0)], None, &mut |_, _| true).unwrap();
    let again = sample(&model, &[job(42, 3.0, 5.0)], None, &mut |_, _| true).unwrap();
    assert!(equal(&alone[0], &again[0]), "same seed, same latent");
    // In a batch of 3 with other seeds, shifts and guidance (one without CFG).
    let batch = sample(&model, &[job(7, 1.5, 1.0), job(42, 3.0, 5.0), job(9, 6.0, 7.5)], None, &mut |_, _| true).unwrap();
    assert!(equal(&alone[0], &batch[1]), "the job's latent must not depend on its batch mates");
    let other = sample(&model, &[job(43, 3.0, 5.0)], None, &mut |_, _| true).unwrap();
    assert!(!equal(&alone[0], &other[0]));
}

/// Jobs of different step counts share a batch: each leaves when its steps
/// are done, or when its callback says stop, and every other job's latent
/// is the one it samples alone, skip-layer guidance on its own window included.
#[test]
fn jobs_of_any_step_count_share_a_batch_and_leave_it_alone() {
    let model = tiny_model(Variant::Sd35Medium);
    let slg = SkipLayerGuidance { layers: vec![1], scale: 2.8, start: 0.1, stop: 0.5 };
    let with_steps = |seed, shift, guidance, steps| SampleJob { sigmas: flow_match_sigmas(shift, steps), ..job(seed, shift, guidance) };
    let jobs = [with_steps(1, 3.0, 5.0, 4), with_steps(2, 1.5, 1.0, 9), with_steps(3, 6.0, 7.5, 6), with_steps(4, 3.0, 4.0, 12)];
    let alone: Vec<Tensor> =
        jobs.iter().map(|j| sample(&model, std::slice::from_ref(j), Some(&slg), &mut |_, _| true).unwrap().remove(0)).collect();
    let mut seen = Vec::new();
    // Job 3 is cancelled after its 5th step, while jobs 1 and 2 still sample.
    let together = sample_batch(Replicas::One(&model), &jobs, Some(&slg), &mut |job, step, steps| {
        seen.push((job, step, steps));
        !(job == 3 && step == 5)
    })
    .unwrap();
    for i in 0..3 {
        assert!(equal(together[i].as_ref().unwrap(), &alone[i]), "job {i} must not depend on its batch mates");
    }
    assert!(matches!(together[3], Err(EngineError::Cancelled { step: 5 })), "{:?}", together[3]);
    for (job, steps) in [(0, 4), (1, 9), (2, 6), (3, 5)] {
        let reports: Vec<usize> = seen.iter().filter(|s| s.0 == job).map(|s| s.1).collect();
        assert_eq!(reports, (1..=steps).collect::<Vec<_>>(), "job {job} reports each of its steps once, then leaves");
    }
    assert!(seen.iter().all(|&(job, _, steps)| steps == [4, 9, 6, 12][job]));
}

#[test]
fn the_step_callback_reports_progress_and_cancels() {
    let model = tiny_model(Variant::Sd3Medium);
    let mut seen = Vec::new();
    let err = sample(&model, &[job(1, 3.0, 4.0)], None, &mut |step, total| {
        seen.push((step, total));
        step < 2
    })
    .err()
    .unwrap();
    assert!(matches!(err, EngineError::Cancelled { step: 2 }), "{err}");
    assert_eq!(seen, vec![(1, 6), (2, 6)]);
}

#[test]
fn skip_layer_guidance_changes_only_the_steps_in_its_window() {
    let model = tiny_model(Variant::Sd35Medium);
    let plain = sample(&model, &[job(5, 3.0, 4.0)], None, &mut |_, _| true).unwrap();
    let outside = SkipLayerGuidance { layers: vec![1], scale: 2.8, start: 0.99, stop: 1.0 };
    let unchanged = sample(&model, &[job(5, 3.0, 4.0)], Some(&outside), &mut |_, _| true).unwrap();
    assert!(equal(&plain[0], &unchanged[0]), "no step falls in the window");
    let inside = SkipLayerGuidance { layers: vec![1], scale: 2.8, start: 0.0, stop: 1.0 };
    let guided = sample(&model, &[job(5, 3.0, 4.0)], Some(&inside), &mut |_, _| true).unwrap();
    assert!(!equal(&plain[0], &guided[0]));
}

#[test]
fn mismatched_batches_are_refused() {
    let model = tiny_model(Variant::Sd3Medium);
    let mut odd = job(2, 3.0, 4.0);
    odd.sigmas = flow_match_sigmas(3.0, 4);
    let err = sample(&model, &[job(1, 3.0, 4.0), odd], None, &mut |_, _| true).err().unwrap();
    assert!(err.to_string().contains("job 1"), "{err}");
}
