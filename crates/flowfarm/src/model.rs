//! `flowfarm model …`: local work with a model (folder or single file), no farm needed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Subcommand};
use flowfarm_engine::device::{open_device, parse_dtype};
use flowfarm_engine::pipeline::{EncoderWeights, Pipeline, RenderRequest, DEFAULT_T5_LENGTH};
use flowfarm_engine::png_output::{encode, RenderParameters};
use flowfarm_engine::{noise, Checkpoint};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Show a checkpoint's layout, variant, sizes and which parts are present.
    Inspect { path: PathBuf },
    /// Render one image locally.
    // Boxed: the render flags dwarf every other command's.
    Render(Box<RenderArgs>),
    /// Convert between a diffusers model folder and one SD3-style single
    /// file (transformer, VAE decoder, text encoders).
    Convert {
        /// A diffusers model folder (to single-file) or a single file (to diffusers).
        path: PathBuf,
        #[arg(long, value_enum)]
        to: ConvertTo,
        /// The file or folder to write; must not exist.
        out: PathBuf,
        /// To diffusers: a diffusers folder of the same architecture, for the
        /// configs, tokenizers and scheduler a single file does not carry.
        #[arg(long)]
        support: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ConvertTo {
    /// Stability AI's layout: model.diffusion_model.*, first_stage_model.*, text_encoders.*.
    SingleFile,
    /// A diffusers folder: transformer/, vae/, text_encoder{,_2,_3}/, tokenizers, scheduler.
    Diffusers,
}

#[derive(Args)]
pub struct RenderArgs {
    /// Model folder in the diffusers layout (e.g. models/flowfarm-tiny), or
    /// an SD3 single file with its text encoders inside (then pass --support).
    #[arg(long)]
    model: PathBuf,
    /// For a single-file --model: a diffusers folder of the same model
    /// architecture, for the tokenizers, the encoders' configs and the
    /// scheduler (a single file carries none of them).
    #[arg(long)]
    support: Option<PathBuf>,
    /// For a single-file --model without encoders inside (SD3.5 style): the
    /// CLIP-L weights file (transformers names).
    #[arg(long, requires = "clip_g")]
    clip_l: Option<PathBuf>,
    /// The CLIP-G weights file, with --clip-l.
    #[arg(long, requires = "clip_l")]
    clip_g: Option<PathBuf>,
    /// The T5-XXL encoder weights file, with --clip-l and --clip-g (leave out for CLIP-only).
    #[arg(long, requires = "clip_l")]
    t5: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative: String,
    /// Pixels; a multiple of the VAE's scale factor × 2.
    #[arg(long)]
    width: usize,
    #[arg(long)]
    height: usize,
    #[arg(long, default_value_t = 28)]
    steps: u32,
    #[arg(long, default_value_t = 7.0)]
    guidance: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Timestep shift α; default: the model's scheduler config (3.0 if absent).
    #[arg(long)]
    shift: Option<f64>,
    /// Leave T5 out: its place is zeros.
    #[arg(long)]
    clip_only: bool,
    /// T5 tokens.
    #[arg(long, default_value_t = DEFAULT_T5_LENGTH)]
    t5_length: usize,
    /// Start from this initial latent (a safetensors file with one 1×C×h×w tensor).
    #[arg(long)]
    init_noise: Option<PathBuf>,
    /// Write the final latent, before decoding, to this safetensors file.
    #[arg(long)]
    save_latent: Option<PathBuf>,
    /// Where to run: `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Precision of the weights and activations: `f32`, `f16` or `bf16`.
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long)]
    out: PathBuf,
}

pub fn run(command: ModelCommand) -> Result<()> {
    match command {
        ModelCommand::Inspect { path } => inspect(&path),
        ModelCommand::Render(args) => render(&args),
        ModelCommand::Convert { path, to, out, support } => {
            if out.exists() {
                bail!("{} exists; choose another output path or remove it", out.display());
            }
            let done = match to {
                ConvertTo::SingleFile => flowfarm_engine::convert::diffusers_to_single_file(&path, &out),
                ConvertTo::Diffusers => {
                    let Some(support) = support else {
                        bail!("--to diffusers needs --support DIR: a diffusers folder of the same architecture for the configs and tokenizers a single file does not carry");
                    };
                    flowfarm_engine::convert::single_file_to_diffusers(&path, &support, &out)
                }
            }
            .with_context(|| format!("converting {}", path.display()))?;
            println!("wrote {} ({} tensors: {})", out.display(), done.tensors, done.parts.join(", "));
            if done.left_out > 0 {
                println!("left out {} VAE encoder tensors (flowfarm only decodes)", done.left_out);
            }
            Ok(())
        }
    }
}

fn inspect(path: &Path) -> Result<()> {
    let checkpoint = Checkpoint::open(path).with_context(|| format!("opening {}", path.display()))?;
    let config = checkpoint.config()?;
    println!("path: {}", path.display());
    println!("layout: {:?}", checkpoint.layout());
    println!("variant: {:?}", config.variant);
    println!("dtype: {}", checkpoint.dtype().map_or("unknown", |d| d.as_str()));
    println!(
        "transformer: {} blocks, hidden {}, {} heads, patch {}, text width {}, pooled width {}, position grid {}×{}",
        config.depth,
        config.hidden,
        config.heads,
        config.patch_size,
        config.joint_attention_dim,
        config.pooled_dim,
        config.pos_embed_max_size,
        config.pos_embed_max_size
    );
    if path.is_dir() {
        for part in ["vae", "text_encoder", "text_encoder_2", "text_encoder_3"] {
            println!("{part}: {}", if path.join(part).is_dir() { "present" } else { "absent" });
        }
    } else {
        let names = single_file_names(path)?;
        let has = |prefix: &str| names.iter().any(|n| n.starts_with(prefix));
        use flowfarm_engine::pipeline::{SINGLE_FILE_CLIP_G, SINGLE_FILE_CLIP_L, SINGLE_FILE_T5};
        for (part, prefix) in [
            ("vae decoder", "first_stage_model.decoder."),
            ("clip_l", SINGLE_FILE_CLIP_L),
            ("clip_g", SINGLE_FILE_CLIP_G),
            ("t5xxl", SINGLE_FILE_T5),
        ] {
            println!("{part}: {}", if has(prefix) { "present" } else { "absent" });
        }
    }
    Ok(())
}

fn single_file_names(path: &Path) -> Result<Vec<String>> {
    // SAFETY: mapped read-only; only the header is read.
    let mapped = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    Ok(mapped.tensors().into_iter().map(|(name, _)| name).collect())
}

fn scheduler_shift(model: &Path) -> Result<f64> {
    let path = model.join("scheduler/scheduler_config.json");
    if !path.is_file() {
        return Ok(3.0);
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path)?).with_context(|| format!("{} is not JSON", path.display()))?;
    Ok(json.get("shift").and_then(|v| v.as_f64()).unwrap_or(3.0))
}

fn render(args: &RenderArgs) -> Result<()> {
    let device = open_device(&args.device).context("--device")?;
    let dtype = parse_dtype(&args.dtype).context("--dtype")?;
    let pipeline = if args.model.is_file() {
        let Some(support) = &args.support else {
            bail!(
                "{} is a single file, which carries no tokenizers or encoder configs: pass --support DIR, a diffusers folder of the same architecture",
                args.model.display()
            );
        };
        let encoders = match (&args.clip_l, &args.clip_g) {
            (Some(l), Some(g)) => EncoderWeights::separate(l, g, args.t5.as_deref()),
            _ => EncoderWeights::in_single_file(&args.model)?,
        };
        Pipeline::open_single_file(&args.model, &encoders, support, args.t5_length, dtype, &device)
    } else {
        if args.clip_l.is_some() {
            bail!("--clip-l, --clip-g and --t5 go with a single-file --model; {} is a folder", args.model.display());
        }
        Pipeline::open(&args.model, args.t5_length, dtype, &device)
    }
    .with_context(|| format!("loading model {}", args.model.display()))?;
    if !args.clip_only && !pipeline.encoders.has_t5() {
        bail!("{} has no T5 encoder (text_encoder_3); pass --clip-only", args.model.display());
    }
    let factor = pipeline.vae.scale_factor() * pipeline.transformer.config().patch_size;
    if args.width == 0 || args.height == 0 || !args.width.is_multiple_of(factor) || !args.height.is_multiple_of(factor) {
        bail!("--width and --height must be positive multiples of {factor} for this model");
    }
    let channels = pipeline.vae.latent_channels();
    let shape = [1, channels, args.height / pipeline.vae.scale_factor(), args.width / pipeline.vae.scale_factor()];
    let initial = match &args.init_noise {
        Some(file) => {
            let tensors = candle_core::safetensors::load(file, &Device::Cpu).with_context(|| format!("reading {}", file.display()))?;
            let mut values = tensors.into_values();
            let (Some(t), None) = (values.next(), values.next()) else {
                bail!("{} must hold exactly one tensor", file.display());
            };
            if t.dims() != shape {
                bail!("{} holds a {:?} tensor; this render needs {shape:?}", file.display(), t.dims());
            }
            t.to_dtype(DType::F32)?.to_device(&device)?
        }
        None => noise::initial_latent(args.seed, &shape, &device)?,
    };
    let shift = match args.shift {
        Some(s) if s.is_finite() && s > 0.0 => s,
        Some(s) => bail!("--shift {s} must be a positive number"),
        None => scheduler_shift(args.support.as_deref().filter(|_| args.model.is_file()).unwrap_or(&args.model))?,
    };
    let bar = ProgressBar::new(u64::from(args.steps));
    bar.set_style(
        ProgressStyle::with_template("{bar:40} step {pos}/{len} [{elapsed_precise}]").unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let request = RenderRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative.clone(),
        initial_latent: initial,
        steps: args.steps,
        guidance: args.guidance,
        shift,
        use_t5: !args.clip_only,
    };
    let rendered = pipeline.render(&request, &mut |step, _| {
        bar.set_position(step as u64);
        true
    })?;
    bar.finish_and_clear();
    if let Some(path) = &args.save_latent {
        write_atomically(path, |tmp| {
            Ok(candle_core::safetensors::save(
                &std::collections::HashMap::from([("latent".to_string(), rendered.latent.to_device(&Device::Cpu)?)]),
                tmp,
            )?)
        })?;
    }
    let parameters = RenderParameters {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative.clone(),
        model: model_name(&args.model),
        width: rendered.width as u32,
        height: rendered.height as u32,
        steps: args.steps,
        guidance: args.guidance,
        seed: args.seed,
        shift,
        sampler: "euler-flow-matching".into(),
        text_encoders: if args.clip_only { "clip-only" } else { "all" }.into(),
    };
    let png = encode(rendered.width as u32, rendered.height as u32, &rendered.rgb, &parameters)?;
    write_atomically(&args.out, |tmp| Ok(std::fs::write(tmp, &png)?))?;
    println!("wrote {} ({}×{})", args.out.display(), rendered.width, rendered.height);
    Ok(())
}

/// The folder's name, or a single file's name without `.safetensors`.
fn model_name(path: &Path) -> String {
    let name = if path.is_file() { path.file_stem() } else { path.file_name() };
    name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

/// Writes through a temporary file in the same folder, so a failed or
/// interrupted render leaves no half-written output.
fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension("partial");
    write(&tmp).with_context(|| format!("writing {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
