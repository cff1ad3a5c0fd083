//! `flowfarm model plan`: the memory each device needs for a model in each
//! parallel mode, and the fastest mode that fits.

use anyhow::{bail, Context, Result};
use clap::Args;
use flowfarm_engine::device::{available_memory, device_info, open_device, parse_device, parse_dtype};
use flowfarm_engine::pipeline::DEFAULT_T5_LENGTH;
use flowfarm_engine::plan::{parse_size, plan, propose, EncoderPlace, Mode, ModelShapes, Plan, Workload, HEADROOM};

use crate::model::{human_bytes, human_count, ModelArgs};

#[derive(Args)]
pub struct PlanArgs {
    /// The model: a diffusers folder (its `config.json` files are enough: the
    /// weights need not be here), or a single file with its companions.
    #[command(flatten)]
    model: ModelArgs,
    /// The devices, each a memory size (`24GB`, `80GiB`) or a device of this
    /// machine (`cuda:0`: its memory; `cpu`: the memory available).
    #[arg(long, value_delimiter = ',', required = true)]
    devices: Vec<String>,
    /// Plan this mode only (`replicate`, `cfg` or `pipeline`); without it,
    /// every mode is tried and the fastest that fits is proposed.
    #[arg(long, value_parser = Mode::parse)]
    parallel: Option<Mode>,
    /// Where the text encoders go: `same` (the devices) or `cpu`; without
    /// it, the devices when they fit there, else the CPU.
    #[arg(long, value_parser = ["same", "cpu"])]
    encoders: Option<String>,
    /// Precision of the weights and activations: `f32`, `f16` or `bf16`.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// The largest job, in pixels (default: the model's native size, 1024 for SD3).
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Jobs at once per device (a worker's `capacity`).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// T5 tokens per prompt.
    #[arg(long, default_value_t = DEFAULT_T5_LENGTH)]
    t5_length: usize,
    /// The model serves CLIP-only jobs: T5 is never loaded.
    #[arg(long)]
    clip_only: bool,
}

/// A device's name and memory, from a size or from the device itself.
fn device_memory(index: usize, text: &str) -> Result<(String, u64)> {
    if parse_device(text).is_ok() {
        let device = open_device(text).with_context(|| format!("--devices: {text}"))?;
        let (name, total) = device_info(&device);
        let memory = if device.is_cpu() { available_memory(&device) } else { total };
        let memory = memory.with_context(|| format!("--devices: the memory of {text} cannot be read; give a size (24GB)"))?;
        return Ok((name, memory));
    }
    let bytes = parse_size(text).map_err(|e| anyhow::anyhow!("--devices: {e}"))?;
    Ok((format!("device {index}"), bytes))
}

pub fn run(args: &PlanArgs) -> Result<()> {
    let source = args.model.source();
    let configs = source.path.join("transformer").join("config.json");
    let shapes = if configs.is_file() {
        ModelShapes::from_config_folder(&source.path)
    } else {
        source.resolve().and_then(|layout| ModelShapes::of(&layout))
    }
    .with_context(|| format!("reading the configs of {}", source.path.display()))?;
    let shapes = if args.clip_only { shapes.without_t5() } else { shapes };
    let devices = args.devices.iter().enumerate().map(|(i, d)| device_memory(i, d)).collect::<Result<Vec<_>>>()?;
    let native = shapes.native_side();
    let work = Workload {
        width: args.width.unwrap_or(native),
        height: args.height.unwrap_or(native),
        batch: args.batch.max(1),
        t5_length: args.t5_length,
        dtype: parse_dtype(&args.dtype).context("--dtype")?,
    };
    if work.width == 0 || work.height == 0 {
        bail!("--width and --height must be positive");
    }
    println!(
        "model: transformer {} parameters ({} blocks), CLIP-L {}, CLIP-G {}, T5 {}, VAE decoder {}",
        human_count(shapes.transformer_parameters()),
        shapes.transformer.depth,
        human_count(shapes.clip_l),
        human_count(shapes.clip_g),
        shapes.t5.map_or_else(|| "not loaded".into(), human_count),
        human_count(shapes.vae)
    );
    println!(
        "workload: {}×{}, {} job(s) at once per device, {}, {} T5 tokens; {:.0}% headroom on every need",
        work.width,
        work.height,
        work.batch,
        args.dtype,
        work.t5_length,
        HEADROOM * 100.0
    );
    let place = |text: &str| if text == "cpu" { EncoderPlace::Cpu } else { EncoderPlace::Same };
    let chosen = match args.parallel {
        Some(mode) => {
            let places = match args.encoders.as_deref() {
                Some(text) => vec![place(text)],
                None => vec![EncoderPlace::Same, EncoderPlace::Cpu],
            };
            let plans = places
                .into_iter()
                .map(|p| plan(&shapes, &work, &devices, mode, p))
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("--parallel {} on {} device(s)", mode.as_str(), devices.len()))?;
            match plans.iter().find(|p| p.fits()) {
                Some(plan) => plan.clone(),
                None => refuse(&plans),
            }
        }
        None => {
            let tried = propose(&shapes, &work, &devices);
            match (tried, args.encoders.as_deref()) {
                (Ok(plan), None) => plan,
                (Ok(_), Some(text)) => {
                    // Propose among the plans with the encoders where asked.
                    let wanted = place(text);
                    let plans: Vec<Plan> = flowfarm_engine::plan::candidates(devices.len(), shapes.transformer.depth)
                        .into_iter()
                        .filter(|(_, p)| *p == wanted)
                        .filter_map(|(mode, p)| plan(&shapes, &work, &devices, mode, p).ok())
                        .collect();
                    match plans.iter().find(|p| p.fits()) {
                        Some(plan) => plan.clone(),
                        None => refuse(&plans),
                    }
                }
                (Err(tried), _) => refuse(&tried),
            }
        }
    };
    print_plan(&chosen, args.parallel.is_none());
    Ok(())
}

fn print_plan(plan: &Plan, proposed: bool) {
    let place = match plan.encoders {
        EncoderPlace::Same => "encoders on the first device",
        EncoderPlace::Cpu => "encoders on the CPU",
    };
    println!("\n{}: parallel = \"{}\", {place}", if proposed { "proposed (the fastest that fits)" } else { "plan" }, plan.mode.as_str());
    for d in &plan.devices {
        println!(
            "  {:<14} {:>11}  needs {:>11} (weights {}, activations {})  holds {}  {}",
            d.device,
            human_bytes(d.memory),
            human_bytes(d.need()),
            human_bytes(d.weights),
            human_bytes(d.activations),
            d.holds,
            if d.fits() { "fits" } else { "DOES NOT FIT" }
        );
    }
    if plan.host > 0 {
        println!("  host memory for the encoders: {}", human_bytes(plan.host));
    }
    let encoders = if plan.encoders == EncoderPlace::Cpu { "\n  encoders = \"cpu\"     # in the model's [[models]] entry" } else { "" };
    println!("\nworker config:\n  parallel = \"{}\"{encoders}", plan.mode.as_str());
}

/// Says why nothing fits, for each plan tried, and exits 1.
fn refuse(plans: &[Plan]) -> ! {
    eprintln!("no plan fits:");
    for p in plans {
        if let Some(d) = p.shortfall() {
            let place = if p.encoders == EncoderPlace::Cpu { "encoders on the CPU" } else { "encoders on the devices" };
            eprintln!(
                "  {} with {place}: {} needs {} (weights {}, activations {}, for {}) and has {}: {} short",
                p.mode.as_str(),
                d.device,
                human_bytes(d.need()),
                human_bytes(d.weights),
                human_bytes(d.activations),
                d.holds,
                human_bytes(d.memory),
                human_bytes(d.need() - d.memory)
            );
        }
    }
    eprintln!("give more or larger devices, a smaller --width/--height or --batch, --clip-only, or a smaller --dtype");
    std::process::exit(1);
}
