//! `flowfarm train`: a model that draws the procedural scenes' captions,
//! trained with the paper's recipe on this machine.
//!
//! The output folder becomes a whole diffusers-layout model, loadable by
//! every flowfarm command: the frozen text encoders, tokenizers and
//! scheduler of `--base` are copied; a small AutoencoderKL is trained on
//! the scenes first (`vae/`, its latent format measured); then the MM-DiT
//! is trained from scratch on that VAE's latents (`transformer/`, the EMA
//! weights), with whole-prompt dropout for guidance and each text encoder
//! dropped on its own (the paper's 46.3 %), which CLIP-only rendering needs. `training/` holds what `--resume` continues.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use flowfarm_engine::device::open_device;
use flowfarm_engine::pipeline::{EncoderMask, TextEncoders, DEFAULT_T5_LENGTH};
use flowfarm_engine::vae::Vae;
use flowfarm_engine::Checkpoint;
use flowfarm_scenes::{Dataset, Split};
use flowfarm_train::autoencoder::{image_batch, small_config, AutoencoderSettings, AutoencoderTrainer};
use flowfarm_train::params::Params;
use flowfarm_train::{Batch, TimestepSampler, Trainer, TrainerConfig};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// The model folder to write (with --resume: to continue).
    #[arg(long)]
    out: PathBuf,
    /// The model whose text encoders, tokenizers and scheduler are copied
    /// (and frozen); its transformer config sizes the new one unless
    /// --depth, --hidden or --heads say otherwise.
    #[arg(long, default_value = "models/flowfarm-tiny")]
    base: PathBuf,
    /// Image sizes to train at, each a multiple of 16: `64`, or buckets
    /// `64,48x64` (width x height), taken in turn.
    #[arg(long, default_value = "64", value_delimiter = ',')]
    sizes: Vec<String>,
    /// Transformer optimisation steps in all (a resumed run goes on to this).
    #[arg(long, default_value_t = 20_000)]
    steps: u64,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    #[arg(long, default_value_t = 200)]
    warmup: u64,
    /// Where t is drawn: `uniform`, `logit-normal:m,s`, `mode:s` or `cosmap`.
    #[arg(long, default_value = "logit-normal:0,1")]
    sampler: String,
    /// Pixels the sampler is meant for; other sizes shift t by
    /// sqrt(pixels / this). Default: the first size's.
    #[arg(long)]
    shift_reference: Option<u64>,
    /// Probability of training a sample on the empty prompt (what
    /// classifier-free guidance contrasts with).
    #[arg(long, default_value_t = 0.1)]
    text_dropout: f64,
    /// Probability of leaving each text encoder (CLIP-L, CLIP-G, T5) out of
    /// a sample's conditioning, each on its own, as zeros: the paper's 46.3 %.
    /// Leaving T5 out is what CLIP-only rendering does.
    #[arg(long, default_value_t = 0.463)]
    encoder_dropout: f64,
    /// Decay of the weights' moving average, which is what the model serves.
    #[arg(long, default_value_t = 0.999)]
    ema: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Joint blocks of the new transformer.
    #[arg(long)]
    depth: Option<usize>,
    /// Hidden width of the new transformer (a multiple of --heads).
    #[arg(long)]
    hidden: Option<usize>,
    #[arg(long)]
    heads: Option<usize>,
    /// The autoencoder's channels per level; n levels make latents 2^(n−1)
    /// times smaller than the image.
    #[arg(long, default_value = "32,64,64", value_delimiter = ',')]
    vae_channels: Vec<usize>,
    /// Autoencoder steps (skipped when the folder has a trained `vae/`).
    #[arg(long, default_value_t = 2000)]
    vae_steps: u64,
    #[arg(long, default_value_t = 8)]
    vae_batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    vae_lr: f64,
    /// Write the folder every this many steps (and at the end).
    #[arg(long, default_value_t = 500)]
    checkpoint_every: u64,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// T5 tokens per prompt (as the workers that will serve it encode).
    #[arg(long, default_value_t = DEFAULT_T5_LENGTH)]
    t5_length: usize,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The transformer forward's dtype: `f32` or `bf16` (variables stay F32).
    #[arg(long, default_value = "f32")]
    dtype: String,
}

/// One resolution bucket: width, height.
fn parse_size(text: &str) -> Result<(usize, usize)> {
    let (w, h) = match text.split_once('x') {
        Some((w, h)) => (w.trim().parse::<usize>(), h.trim().parse::<usize>()),
        None => (text.trim().parse::<usize>(), text.trim().parse::<usize>()),
    };
    match (w, h) {
        (Ok(w), Ok(h)) if w > 0 && h > 0 && w % 16 == 0 && h % 16 == 0 => Ok((w, h)),
        _ => bail!("--sizes: `{text}` is not a size with sides that are positive multiples of 16 (`64` or `64x48`)"),
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    let buckets = args.sizes.iter().map(|s| parse_size(s)).collect::<Result<Vec<_>>>()?;
    TimestepSampler::parse(&args.sampler).map_err(|e| anyhow::anyhow!("--sampler: {e}"))?;
    for (name, p) in [("--text-dropout", args.text_dropout), ("--encoder-dropout", args.encoder_dropout)] {
        if !(0.0..1.0).contains(&p) {
            bail!("{name} {p} is outside [0, 1)");
        }
    }
    if args.batch == 0 || args.vae_batch == 0 {
        bail!("--batch and --vae-batch must be at least 1");
    }
    if args.vae_channels.is_empty() || args.vae_channels.iter().any(|&c| c == 0 || c % 8 != 0) {
        bail!("--vae-channels: give one or more channel counts, each a multiple of 8 (its GroupNorm has 8 groups)");
    }
    let training = args.out.join("training");
    if training.exists() && !args.resume {
        bail!("{} already holds a training run: pass --resume to continue it, or choose another --out", args.out.display());
    }
    if args.resume && !training.exists() {
        bail!("--resume: {} holds no training run (no training/ folder); leave --resume out to start one", args.out.display());
    }
    let device = open_device(&args.device)?;
    let base = args.base.as_path();
    let encoders = TextEncoders::open(base, args.t5_length, DType::F32, &device)
        .with_context(|| format!("--base {}: its text encoders", base.display()))?;
    copy_frozen_parts(base, &args.out)?;

    let vae = autoencoder(&args, buckets[0], &device)?;
    let factor = vae.scale_factor();
    let mut trainer = if args.resume {
        let trainer = Trainer::resume(&args.out, &device)?;
        println!("resumed at step {} of {}", trainer.step_count(), args.steps);
        trainer
    } else {
        let config = transformer_config(&args, base, vae.latent_channels())?;
        let settings = TrainerConfig {
            lr: args.lr,
            warmup_steps: args.warmup,
            ema_decay: args.ema,
            sampler: args.sampler.clone(),
            shift_reference_pixels: args.shift_reference.unwrap_or((buckets[0].0 * buckets[0].1) as u64),
            dtype: args.dtype.clone(),
            seed: args.seed,
            ..TrainerConfig::default()
        };
        Trainer::new(settings, Params::init(&config, args.seed, &device)?)?
    };
    let config = trainer.params().config().clone();
    for &(w, h) in &buckets {
        let (pw, ph) = (w / factor / config.patch_size, h / factor / config.patch_size);
        if w % (factor * config.patch_size) != 0
            || h % (factor * config.patch_size) != 0
            || pw > config.pos_embed_max_size
            || ph > config.pos_embed_max_size
        {
            bail!(
                "--sizes: {w}x{h} needs sides that are multiples of {} and at most {} pixels for this VAE and transformer",
                factor * config.patch_size,
                config.pos_embed_max_size * factor * config.patch_size
            );
        }
    }

    let datasets: Vec<Dataset> = buckets.iter().map(|&(w, h)| Dataset::new(args.seed, w, h, Split::Train)).collect::<Result<_, _>>()?;
    let mut conditioning = ConditioningCache::new(&encoders, config.joint_attention_dim, &device);
    let first = trainer.step_count();
    let bar = Progress::new(args.steps, "transformer");
    let started = Instant::now();
    let mut smoothed: Option<f32> = None;
    while trainer.step_count() < args.steps {
        let step = trainer.step_count();
        let data = &datasets[(step % datasets.len() as u64) as usize];
        let (w, h) = data.size();
        let items: Vec<_> = (0..args.batch as u64).map(|i| data.item(step * args.batch as u64 + i)).collect();
        let pixels: Vec<&[u8]> = items.iter().map(|i| i.rgb.as_slice()).collect();
        let latents = vae.encode(&image_batch(&pixels, w, h, &device)?)?.detach();
        // Dropout decisions from a stream keyed by (seed, step), as the noise is.
        let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x7e47);
        rng.set_stream(step);
        let mut contexts = Vec::with_capacity(items.len());
        let mut pooled = Vec::with_capacity(items.len());
        for item in &items {
            let prompt = if rng.gen_bool(args.text_dropout) { "" } else { item.caption.as_str() };
            let mut keep = || !rng.gen_bool(args.encoder_dropout);
            let mask = EncoderMask { clip_l: keep(), clip_g: keep(), t5: keep() };
            let (c, p) = conditioning.get(prompt, mask)?;
            contexts.push(c);
            pooled.push(p);
        }
        let batch = Batch { latents, context: Tensor::cat(&contexts, 0)?, pooled: Tensor::cat(&pooled, 0)?, pixels: (w * h) as u64 };
        let report = trainer.train_step(&batch)?;
        let loss = smoothed.map_or(report.loss, |s| 0.98 * s + 0.02 * report.loss);
        smoothed = Some(loss);
        let rate = (report.step - first) as f64 * args.batch as f64 / started.elapsed().as_secs_f64().max(1e-9);
        bar.update(report.step, format!("loss {loss:.4} · {rate:.1} samples/s"));
        if report.step % args.checkpoint_every.max(1) == 0 || report.step == args.steps {
            trainer.save(&args.out)?;
        }
    }
    bar.finish();
    trainer.save(&args.out)?;
    println!(
        "wrote {}: render with `flowfarm model render --model {} --prompt \"a red circle above a blue square on a yellow background\" --width {} --height {}`",
        args.out.display(),
        args.out.display(),
        buckets[0].0,
        buckets[0].1
    );
    Ok(())
}

/// A progress bar on a terminal; elsewhere (a log file, CI) a line every
/// `LOG_EVERY` steps, so a long run is never silent.
struct Progress {
    bar: ProgressBar,
    what: &'static str,
    terminal: bool,
    steps: u64,
}

const LOG_EVERY: u64 = 50;

impl Progress {
    fn new(steps: u64, what: &'static str) -> Progress {
        let bar = ProgressBar::new(steps);
        let template = format!("{what} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}}] {{msg}}");
        bar.set_style(ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()));
        Progress { bar, what, terminal: std::io::IsTerminal::is_terminal(&std::io::stderr()), steps }
    }

    fn update(&self, step: u64, message: String) {
        if !self.terminal && (step.is_multiple_of(LOG_EVERY) || step == self.steps) {
            println!("{} step {step}/{}: {message}", self.what, self.steps);
        }
        self.bar.set_message(message);
        self.bar.set_position(step);
    }

    fn finish(&self) {
        self.bar.finish();
    }
}

/// The folder's VAE: the trained one it holds, or one trained now on scenes
/// of `size` and saved with its measured latent format.
fn autoencoder(args: &TrainArgs, size: (usize, usize), device: &Device) -> Result<Vae> {
    let folder = args.out.join("vae");
    if folder.join("config.json").exists() {
        return Vae::open_autoencoder(&folder, DType::F32, device).with_context(|| format!("{}: the trained VAE", folder.display()));
    }
    let config = small_config(args.vae_channels.clone(), size.0.max(size.1));
    let settings = AutoencoderSettings { lr: args.vae_lr, seed: args.seed, ..AutoencoderSettings::default() };
    let mut trainer = AutoencoderTrainer::new(config, settings, device)?;
    let data = Dataset::new(args.seed ^ 0xae, size.0, size.1, Split::Train)?;
    let batch_of = |from: u64, count: usize| -> Result<Tensor> {
        let items: Vec<Vec<u8>> = (from..from + count as u64).map(|i| data.item(i).rgb).collect();
        let refs: Vec<&[u8]> = items.iter().map(Vec::as_slice).collect();
        Ok(image_batch(&refs, size.0, size.1, device)?)
    };
    let bar = Progress::new(args.vae_steps, "autoencoder");
    for step in 0..args.vae_steps {
        let report = trainer.train_step(&batch_of(step * args.vae_batch as u64, args.vae_batch)?)?;
        bar.update(report.step, format!("L1 {:.4} · KL {:.3}", report.reconstruction, report.kl));
    }
    bar.finish();
    // The latent format from images the autoencoder did not train on.
    let (shift, scale) = trainer.latent_format(&batch_of(u64::MAX / 2, 64)?)?;
    trainer.save(&args.out, shift, scale)?;
    println!("autoencoder: latent shift {shift:.4}, scale {scale:.4}");
    Vae::open_autoencoder(&folder, DType::F32, device).with_context(|| format!("{}: the VAE just trained", folder.display()))
}

/// The new transformer's shape: `--base`'s, resized as asked, taking the
/// VAE's latent channels.
fn transformer_config(args: &TrainArgs, base: &Path, latent_channels: usize) -> Result<flowfarm_engine::mmdit::MmDitConfig> {
    let mut config = Checkpoint::open(base.join("transformer"))
        .and_then(|c| c.config())
        .with_context(|| format!("--base {}: its transformer config", base.display()))?;
    if let Some(depth) = args.depth {
        config.depth = depth;
        config.dual_attention_layers.retain(|&i| i < depth);
    }
    if let Some(heads) = args.heads {
        config.heads = heads;
    }
    if let Some(hidden) = args.hidden {
        config.hidden = hidden;
    }
    if config.depth == 0 || config.heads == 0 || config.hidden % config.heads != 0 || config.hidden % 4 != 0 {
        bail!(
            "--depth, --hidden, --heads: {} blocks of width {} in {} heads will not do: the width must divide into the heads and by 4",
            config.depth,
            config.hidden,
            config.heads
        );
    }
    config.in_channels = latent_channels;
    config.out_channels = latent_channels;
    Ok(config)
}

/// Copies the frozen text encoders, tokenizers, scheduler (its shift set
/// to 1: the model trains unshifted at its sizes) and model index of `base`.
fn copy_frozen_parts(base: &Path, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for part in ["text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"] {
        let from = base.join(part);
        if from.is_dir() && !out.join(part).exists() {
            copy_dir(&from, &out.join(part))?;
        }
    }
    let index = base.join("model_index.json");
    if index.is_file() {
        std::fs::copy(&index, out.join("model_index.json")).with_context(|| format!("copying {}", index.display()))?;
    }
    let scheduler = out.join("scheduler/scheduler_config.json");
    if scheduler.is_file() {
        let text = std::fs::read_to_string(&scheduler)?;
        let mut json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}", scheduler.display()))?;
        json["shift"] = serde_json::json!(1.0);
        std::fs::write(&scheduler, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Each (prompt, encoders kept) encoded once.
struct ConditioningCache<'a> {
    encoders: &'a TextEncoders,
    width: usize,
    device: Device,
    done: HashMap<(String, [bool; 3]), (Tensor, Tensor)>,
}

impl<'a> ConditioningCache<'a> {
    fn new(encoders: &'a TextEncoders, width: usize, device: &Device) -> Self {
        ConditioningCache { encoders, width, device: device.clone(), done: HashMap::new() }
    }

    fn get(&mut self, prompt: &str, mask: EncoderMask) -> Result<(Tensor, Tensor)> {
        let key = (prompt.to_owned(), [mask.clip_l, mask.clip_g, mask.t5]);
        if let Some(found) = self.done.get(&key) {
            return Ok(found.clone());
        }
        let c = self.encoders.encode_masked(prompt, mask, self.width, &self.device)?;
        let pair = (c.context.detach(), c.pooled.detach());
        self.done.insert(key, pair.clone());
        Ok(pair)
    }
}
