//! `flowfarm model …`: local work with a model (folder or single file), no farm needed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Subcommand};
use flowfarm_engine::device::{open_device, parse_dtype};
use flowfarm_engine::pipeline::{Loading, Pipeline, RenderRequest, Split, VaeTiling, DEFAULT_T5_LENGTH};
use flowfarm_engine::png_output::{encode, RenderParameters};
use flowfarm_engine::sampler::Replica;
use flowfarm_engine::verify::examine;
use flowfarm_engine::{noise, Checkpoint, ModelSource};
use indicatif::{ProgressBar, ProgressStyle};

/// A model as it was downloaded: the same keys a worker's `[[models]]` entry has.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A diffusers model folder (e.g. models/flowfarm-tiny), or a single file
    /// (transformer and VAE, with or without its text encoders).
    #[arg(long = "model", value_name = "PATH")]
    path: PathBuf,
    #[command(flatten)]
    parts: SingleFileParts,
    /// A diffusers folder's weight variant: `fp16` reads `*.fp16.safetensors`.
    #[arg(long)]
    variant: Option<String>,
}

/// Where a single file's companions are.
#[derive(Args, Clone)]
pub struct SingleFileParts {
    /// For a single file: a diffusers folder of the same architecture, for the
    /// tokenizers and configs a single file does not carry and for any part
    /// the file leaves out.
    #[arg(long)]
    support: Option<PathBuf>,
    /// For a single file without encoders inside (SD3.5 style): the CLIP-L
    /// weights file (transformers names).
    #[arg(long, requires = "clip_g")]
    clip_l: Option<PathBuf>,
    /// The CLIP-G weights file, with --clip-l.
    #[arg(long, requires = "clip_l")]
    clip_g: Option<PathBuf>,
    /// The T5-XXL weights file (F16 or float8 e4m3fn), with --clip-l and
    /// --clip-g (leave out for CLIP-only).
    #[arg(long, requires = "clip_l")]
    t5: Option<PathBuf>,
}

impl SingleFileParts {
    fn source(self, path: &std::path::Path, variant: Option<String>) -> ModelSource {
        ModelSource { path: path.to_owned(), support: self.support, clip_l: self.clip_l, clip_g: self.clip_g, t5: self.t5, variant }
    }
}

impl ModelArgs {
    pub(crate) fn source(&self) -> ModelSource {
        self.parts.clone().source(&self.path, self.variant.clone())
    }
}

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Show a model's form, variant, parts, parameters and memory per dtype.
    Inspect(ModelArgs),
    /// Check a model before serving it: every file present, shards complete,
    /// every tensor's shape and dtype as the detected variant expects,
    /// tokenizers and configs readable. Exit code 1 when anything is wrong.
    Verify(ModelArgs),
    /// The memory each device needs for the model in each parallel mode
    /// (from its configs: the weights need not be here), and the fastest
    /// mode that fits. Exit code 1 when nothing fits.
    Plan(Box<crate::plan::PlanArgs>),
    /// Render one image locally.
    // Boxed: the render flags dwarf every other command's.
    Render(Box<RenderArgs>),
    /// Score a model on held-out captions of the scene grammar (`flowfarm
    /// train`'s data): each render read back by an analytic detector.
    Score(Box<crate::score::ScoreArgs>),
    /// Convert between a diffusers model folder and one SD3-style single
    /// file (transformer, VAE decoder, text encoders).
    Convert {
        /// A diffusers model folder (to single-file) or a single file (to diffusers).
        path: PathBuf,
        /// To single-file: the folder's weight variant (`fp16`).
        #[arg(long)]
        variant: Option<String>,
        #[arg(long, value_enum)]
        to: ConvertTo,
        /// The file or folder to write; must not exist.
        out: PathBuf,
        /// To diffusers: where the single file's configs, tokenizers,
        /// scheduler and separate encoder files are.
        #[command(flatten)]
        parts: SingleFileParts,
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
    #[command(flatten)]
    model: ModelArgs,
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
    /// How the VAE decodes: `whole` (as diffusers' pipeline does), `tiled`
    /// (less memory, blended seams), or `auto` (whole unless it would not fit
    /// in the memory available).
    #[arg(long, default_value = "auto", value_parser = parse_vae_tiling)]
    vae_tiling: VaeTiling,
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
    /// Several devices instead of --device, with --parallel: `cpu:0,cpu:1`
    /// (the cores split between them) or `cuda:0,cuda:1`.
    #[arg(long, value_delimiter = ',', requires = "parallel")]
    devices: Vec<String>,
    /// How --devices share a render: `cfg` (two devices), the conditional
    /// half of every step on the first and the unconditional half on the
    /// second, at once; `pipeline` (two or more), the transformer's blocks
    /// split into a contiguous range per device, activations handed on.
    /// Either gives the same image as one device.
    #[arg(long, value_parser = ["cfg", "pipeline"], requires = "devices")]
    parallel: Option<String>,
    /// Where the text encoders run, when not on the (first) device: `cpu`
    /// or `cuda:N` (T5-XXL on a card or the host of its own).
    #[arg(long)]
    encoders: Option<String>,
    /// Precision of the weights and activations: `f32`, `f16` or `bf16`.
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long)]
    out: PathBuf,
}

pub fn run(command: ModelCommand) -> Result<()> {
    match command {
        ModelCommand::Inspect(args) => inspect(&args.source()),
        ModelCommand::Verify(args) => verify(&args.source()),
        ModelCommand::Render(args) => render(&args),
        ModelCommand::Plan(args) => crate::plan::run(&args),
        ModelCommand::Score(args) => crate::score::run(&args),
        ModelCommand::Convert { path, variant, to, out, parts } => {
            if out.exists() {
                bail!("{} exists; choose another output path or remove it", out.display());
            }
            let done = match to {
                ConvertTo::SingleFile => {
                    flowfarm_engine::convert::diffusers_to_single_file(&ModelSource { variant, ..ModelSource::at(&path) }, &out)
                }
                ConvertTo::Diffusers => {
                    if parts.support.is_none() {
                        bail!("--to diffusers needs --support DIR: a diffusers folder of the same architecture for the configs and tokenizers a single file does not carry");
                    }
                    flowfarm_engine::convert::single_file_to_diffusers(&parts.source(&path, None), &out)
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

fn inspect(source: &ModelSource) -> Result<()> {
    let path = &source.path;
    let layout = source.resolve().with_context(|| format!("opening {}", path.display()))?;
    let checkpoint = Checkpoint::from_component(&layout.transformer)?;
    let config = checkpoint.config()?;
    println!("path: {}", path.display());
    println!("form: {}", layout.form);
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
    let report = examine(&layout);
    println!();
    println!("{:<12} {:>15} {:<22} {:>12} {:>12} {:>12}", "part", "parameters", "on disk", "F32", "F16", "BF16");
    let mut total = [0u64; 4];
    for c in &report.components {
        let on_disk: Vec<String> = c.dtypes_on_disk().into_iter().map(|(dtype, n)| format!("{dtype} {}", human_count(n))).collect();
        let at = [c.parameters(), c.bytes_at(DType::F32), c.bytes_at(DType::F16), c.bytes_at(DType::BF16)];
        for (t, a) in total.iter_mut().zip(at) {
            *t += a;
        }
        println!(
            "{:<12} {:>15} {:<22} {:>12} {:>12} {:>12}",
            c.part.as_str(),
            group_digits(at[0]),
            on_disk.join(", "),
            human_bytes(at[1]),
            human_bytes(at[2]),
            human_bytes(at[3])
        );
    }
    if layout.t5.is_none() {
        println!("{:<12} absent (CLIP-only)", "t5");
    }
    println!(
        "{:<12} {:>15} {:<22} {:>12} {:>12} {:>12}",
        "total",
        group_digits(total[0]),
        "",
        human_bytes(total[1]),
        human_bytes(total[2]),
        human_bytes(total[3])
    );
    match report.identity {
        Some(id) => println!("\nmodel hash: {} ({id})", id.short()),
        None => println!("\nproblems (run `flowfarm model verify` for all of them): {}", report.problems().join("; ")),
    }
    Ok(())
}

fn verify(source: &ModelSource) -> Result<()> {
    let path = &source.path;
    let layout = match source.resolve() {
        Ok(layout) => layout,
        Err(e) => {
            println!("{}: BROKEN", path.display());
            println!("  {e}");
            std::process::exit(1);
        }
    };
    let report = examine(&layout);
    println!("{} ({})", path.display(), report.form);
    for c in &report.components {
        let verdict = if c.problems.is_empty() { "ok" } else { "BROKEN" };
        println!("  {:<12} {verdict}: {} tensors in {} file(s)", c.part.as_str(), c.tensors.len(), c.files.len());
        for p in &c.problems {
            println!("    - {p}");
        }
    }
    if layout.t5.is_none() {
        println!("  {:<12} absent: the model renders CLIP-only", "t5");
    }
    if !report.unused.is_empty() {
        let shown: Vec<&str> = report.unused.iter().take(5).map(String::as_str).collect();
        let more = report.unused.len().saturating_sub(shown.len());
        let more = if more > 0 { format!(" and {more} more") } else { String::new() };
        println!("  extra: {} stored tensors no part uses ({}{more})", report.unused.len(), shown.join(", "));
    }
    match report.identity {
        Some(id) if report.is_sound() => {
            println!("ok: model hash {} ({id})", id.short());
            Ok(())
        }
        _ => {
            println!("BROKEN: {} problem(s)", report.problems().len());
            std::process::exit(1);
        }
    }
}

fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub(crate) fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

pub(crate) fn human_bytes(n: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    match n as f64 {
        b if b >= GIB => format!("{:.2} GiB", b / GIB),
        b if b >= MIB => format!("{:.1} MiB", b / MIB),
        b => format!("{:.1} KiB", b / 1024.0),
    }
}

/// The devices of a multi-device render, and the threads of each (CPU
/// devices listed together split the cores; a GPU's work is on the card).
fn open_devices(names: &[String]) -> Result<Vec<(Device, Option<rayon::ThreadPool>)>> {
    let opened = names.iter().map(|name| open_device(name).with_context(|| format!("--devices: {name}"))).collect::<Result<Vec<_>>>()?;
    let cpus = opened.iter().filter(|d| d.is_cpu()).count();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    opened
        .into_iter()
        .map(|device| {
            let threads = if device.is_cpu() && cpus > 1 {
                Some(rayon::ThreadPoolBuilder::new().num_threads((cores / cpus).max(1)).build()?)
            } else {
                None
            };
            Ok((device, threads))
        })
        .collect()
}

fn render(args: &RenderArgs) -> Result<()> {
    let dtype = parse_dtype(&args.dtype).context("--dtype")?;
    let source = args.model.source();
    let mut devices = match (args.parallel.as_deref(), args.devices.len()) {
        (None, _) => vec![(open_device(&args.device).context("--device")?, None)],
        (Some("cfg"), 2) | (Some("pipeline"), 2..) => open_devices(&args.devices)?,
        (Some("cfg"), n) => bail!("--parallel cfg takes exactly two --devices, got {n}"),
        (Some(_), n) => bail!("--parallel pipeline takes two or more --devices, got {n}"),
    };
    let device = devices[0].0.clone();
    let loading = Loading {
        encoders: args.encoders.as_deref().map(|name| open_device(name).context("--encoders")).transpose()?,
        t5: !args.clip_only,
        ..Loading::on(&device, dtype, args.t5_length)
    };
    let loaded = |what: &str| format!("loading model {}{what}", source.path.display());
    let (pipeline, stages) = if args.parallel.as_deref() == Some("pipeline") {
        let (pipeline, stages) =
            Pipeline::load_staged(&source, &loading, std::mem::take(&mut devices)).with_context(|| loaded(" across --devices"))?;
        (pipeline, Some(stages))
    } else {
        (Pipeline::load_with(&source, &loading).with_context(|| loaded(""))?, None)
    };
    if !args.clip_only && !pipeline.encoders.has_t5() {
        bail!("{} has no T5 encoder; pass --clip-only, or --t5 FILE", source.path.display());
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
        None => pipeline.scheduler_shift.unwrap_or(3.0),
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
        vae: args.vae_tiling,
    };
    let partner = match args.parallel.as_deref() {
        Some("cfg") => {
            let (on, threads) = devices.pop().context("--devices")?;
            let model = Pipeline::load_transformer(&source, dtype, &on)
                .with_context(|| format!("loading the transformer on {}", args.devices[1]))?;
            Some((model, devices.pop().and_then(|(_, threads)| threads), threads))
        }
        _ => None,
    };
    let split = match (&partner, &stages) {
        (Some((model, first, second)), _) => Split::Cfg { threads: first.as_ref(), uncond: Replica { model, threads: second.as_ref() } },
        (None, Some(stages)) => Split::Blocks(stages),
        (None, None) => Split::One,
    };
    let rendered = pipeline.render_on(&request, split, &mut |step, _| {
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
        model: model_name(&source.path),
        model_hash: Some(pipeline.identity.short()),
        width: rendered.width as u32,
        height: rendered.height as u32,
        steps: args.steps,
        guidance: args.guidance,
        seed: args.seed,
        shift,
        sampler: "euler-flow-matching".into(),
        text_encoders: if args.clip_only { "clip-only" } else { "all" }.into(),
        vae_decode: Some(rendered.decoding.as_str().into()),
    };
    let png = encode(rendered.width as u32, rendered.height as u32, &rendered.rgb, &parameters)?;
    write_atomically(&args.out, |tmp| Ok(std::fs::write(tmp, &png)?))?;
    println!("wrote {} ({}×{})", args.out.display(), rendered.width, rendered.height);
    Ok(())
}

fn parse_vae_tiling(text: &str) -> Result<VaeTiling, String> {
    VaeTiling::parse(text)
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
