//! Scoring a model on captions of the scene grammar: render each prompt as
//! a user would (the engine's pipeline, a seed per prompt), read the image
//! back with the analytic detector, and count what it drew right.

use candle_core::Device;
use flowfarm_engine::noise::initial_latent;
use flowfarm_engine::pipeline::{Pipeline, RenderRequest, VaeTiling};
use flowfarm_scenes::{detect, score, Scene, Score};

use crate::TrainError;

/// How each image is rendered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rendering {
    pub width: usize,
    pub height: usize,
    pub steps: u32,
    pub guidance: f32,
    pub shift: f64,
    /// Prompt i renders from noise seed `seed + i`.
    pub seed: u64,
}

/// One prompt's image and how it scored.
#[derive(Debug, Clone)]
pub struct Scored {
    pub prompt: String,
    pub score: Score,
    /// RGB8 rows.
    pub rgb: Vec<u8>,
}

/// The shares of images whose objects (colour and shape of every one),
/// positions and background were right.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Accuracy {
    pub images: usize,
    pub objects: f64,
    pub positions: f64,
    pub background: f64,
}

impl Accuracy {
    pub fn of(scored: &[Scored]) -> Accuracy {
        let n = scored.len().max(1) as f64;
        let share = |f: &dyn Fn(&Score) -> bool| scored.iter().filter(|s| f(&s.score)).count() as f64 / n;
        Accuracy {
            images: scored.len(),
            objects: share(&|s| s.objects),
            positions: share(&|s| s.positions),
            background: share(&|s| s.background),
        }
    }
}

/// Renders and scores each prompt (captions of the grammar).
///
/// # Errors
/// [`TrainError::Invalid`] for a prompt outside the grammar; the engine's
/// render errors.
pub fn score_prompts(pipeline: &Pipeline, prompts: &[String], how: &Rendering, device: &Device) -> Result<Vec<Scored>, TrainError> {
    let f = pipeline.vae.scale_factor();
    let shape = [1, pipeline.vae.latent_channels(), how.height / f, how.width / f];
    prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            let scene =
                Scene::parse(prompt).ok_or_else(|| TrainError::Invalid(format!("`{prompt}` is not a caption of the scene grammar")))?;
            let request = RenderRequest {
                prompt: prompt.clone(),
                negative_prompt: String::new(),
                initial_latent: initial_latent(how.seed + i as u64, &shape, device)?,
                steps: how.steps,
                guidance: how.guidance,
                shift: how.shift,
                use_t5: true,
                vae: VaeTiling::Whole,
            };
            let rendered = pipeline.render(&request, &mut |_, _| true)?;
            let found = detect(&rendered.rgb, rendered.width, rendered.height).map_err(|e| TrainError::Invalid(e.to_string()))?;
            Ok(Scored { prompt: prompt.clone(), score: score(&scene, &found), rgb: rendered.rgb })
        })
        .collect()
}
