//! `flowfarm model score`: how well a model draws the scene grammar's
//! held-out captions, read back by the analytic detector, with a contact
//! sheet of its first renders.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use flowfarm_engine::device::open_device;
use flowfarm_engine::pipeline::{Pipeline, DEFAULT_T5_LENGTH};
use flowfarm_engine::png_output::{encode, RenderParameters};
use flowfarm_scenes::{Dataset, Split};
use flowfarm_train::evaluate::{score_prompts, Accuracy, Rendering};

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// A model folder (`flowfarm train` writes one).
    #[arg(long)]
    model: PathBuf,
    /// Held-out captions to render (never trained on; the grammar holds 671).
    #[arg(long, default_value_t = 100)]
    prompts: usize,
    #[arg(long, default_value_t = 64)]
    width: usize,
    #[arg(long, default_value_t = 64)]
    height: usize,
    #[arg(long, default_value_t = 28)]
    steps: u32,
    #[arg(long, default_value_t = 5.0)]
    guidance: f32,
    /// Default: the model's scheduler's.
    #[arg(long)]
    shift: Option<f64>,
    /// Prompt i renders from noise seed `seed + i`; the prompts' order comes from it too.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write a contact sheet of the first 16 renders here (PNG).
    #[arg(long)]
    sheet: Option<PathBuf>,
    #[arg(long, default_value_t = DEFAULT_T5_LENGTH)]
    t5_length: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(args: &ScoreArgs) -> Result<()> {
    if args.prompts == 0 {
        bail!("--prompts must be at least 1");
    }
    let held = Dataset::new(args.seed, args.width, args.height, Split::HeldOut).context("--width and --height")?;
    let available = held.scenes().count();
    if args.prompts > available {
        bail!("--prompts {}: the grammar holds {available} held-out captions", args.prompts);
    }
    let device = open_device(&args.device)?;
    let pipeline =
        Pipeline::open(&args.model, args.t5_length, DType::F32, &device).with_context(|| format!("loading {}", args.model.display()))?;
    let how = Rendering {
        width: args.width,
        height: args.height,
        steps: args.steps,
        guidance: args.guidance,
        shift: args.shift.or(pipeline.scheduler_shift).unwrap_or(1.0),
        seed: args.seed,
    };
    let prompts = held.prompts(args.prompts);
    let scored = score_prompts(&pipeline, &prompts, &how, &device)?;
    let accuracy = Accuracy::of(&scored);
    println!(
        "{} held-out prompts at {}x{}, {} steps, guidance {}, shift {}: objects right {:.1} %, positions right {:.1} %, background right {:.1} %",
        accuracy.images,
        args.width,
        args.height,
        args.steps,
        args.guidance,
        how.shift,
        100.0 * accuracy.objects,
        100.0 * accuracy.positions,
        100.0 * accuracy.background
    );
    if let Some(path) = &args.sheet {
        let pngs = scored
            .iter()
            .take(16)
            .enumerate()
            .map(|(i, s)| {
                let parameters = RenderParameters {
                    prompt: s.prompt.clone(),
                    negative_prompt: String::new(),
                    model: args.model.display().to_string(),
                    model_hash: Some(pipeline.identity.short()),
                    width: args.width as u32,
                    height: args.height as u32,
                    steps: args.steps,
                    guidance: args.guidance,
                    seed: args.seed + i as u64,
                    shift: how.shift,
                    sampler: "euler-flow-matching".into(),
                    text_encoders: "all".into(),
                    vae_decode: Some("whole".into()),
                };
                encode(args.width as u32, args.height as u32, &s.rgb, &parameters)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let sheet = flowfarm_sheet::compose(&pngs, args.width.max(args.height) as u32)?;
        std::fs::write(path, sheet).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {} ({} renders)", path.display(), pngs.len());
    }
    Ok(())
}
