//! What a job asks for, how it is checked, and what is stored.
//!
//! A [`JobRequest`] is what a submitter sends: most fields optional. Checking
//! it against [`Limits`] and the [`ModelRegistry`] yields a [`ResolvedJob`] with
//! every value fixed (seed and shift included), so the image can be rendered
//! again, or [`FieldError`]s that name the offending field by its path in the
//! request (`jobs[17].width: 1000 is not a multiple of 16`).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::registry::{ModelConfig, ModelRegistry, TextEncoderSet};

/// Largest seed accepted: seeds are stored as signed 64-bit integers.
pub const MAX_SEED: u64 = i64::MAX as u64;
/// Priorities run from -PRIORITY_LIMIT to PRIORITY_LIMIT.
pub const PRIORITY_LIMIT: i32 = 1000;
/// Largest explicit shift α accepted.
pub const MAX_SHIFT: f64 = 100.0;
/// Attempts when a job gives none.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Label count, key and value limits.
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_KEY_CHARS: usize = 63;
pub const MAX_LABEL_VALUE_CHARS: usize = 256;
/// Idempotency keys are at most this long.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 128;

/// Farm-wide limits on what a batch may ask for (`[limits]` in the config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Jobs in one batch, after grid expansion.
    pub max_batch_jobs: u32,
    /// Characters in a prompt or negative prompt.
    pub max_prompt_chars: usize,
    /// Sampling steps.
    pub max_steps: u32,
    /// Guidance scale range, inclusive.
    pub min_guidance: f32,
    pub max_guidance: f32,
    /// Attempts a job may ask for.
    pub max_attempts: u32,
    /// Smallest width or height, in pixels.
    pub min_side_px: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_batch_jobs: 100_000,
            max_prompt_chars: 2000,
            max_steps: 200,
            min_guidance: 0.0,
            max_guidance: 30.0,
            max_attempts: 10,
            min_side_px: 64,
        }
    }
}

/// One field that failed validation: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field in the request, e.g. `jobs[17].width` or `grid.sizes[0].height`.
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Everything wrong with a request; never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    /// The first error, and how many more there are.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.split_first() {
            None => f.write_str("invalid request"),
            Some((first, [])) => write!(f, "{first}"),
            Some((first, rest)) => write!(f, "{first} (and {} more errors)", rest.len()),
        }
    }
}

/// A job as submitted: `None` means "the model's default" (or, for the
/// seed, "pick one").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    pub model: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub steps: Option<u32>,
    pub guidance: Option<f32>,
    pub seed: Option<u64>,
    pub shift: Option<f64>,
    pub text_encoders: Option<TextEncoderSet>,
    pub priority: i32,
    pub max_attempts: Option<u32>,
    pub labels: BTreeMap<String, String>,
    /// See [`ResolvedJob::tile_vae`].
    #[serde(default)]
    pub tile_vae: Option<bool>,
}

/// A batch given as prompts × seeds × sizes around a shared base.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GridRequest {
    /// Must leave prompt and seed unset, and the size too when `sizes` is given.
    pub base: JobRequest,
    pub prompts: Vec<String>,
    /// Empty: one job per (prompt, size) with a picked seed.
    pub seeds: Vec<u64>,
    /// (width, height) pairs; empty: the base's size.
    pub sizes: Vec<(u32, u32)>,
}

/// A job with every value fixed: what is stored and rendered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedJob {
    pub model: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance: f32,
    pub seed: u64,
    /// Timestep shift α.
    pub shift: f64,
    pub text_encoders: TextEncoderSet,
    pub priority: i32,
    pub max_attempts: u32,
    pub labels: BTreeMap<String, String>,
    /// How the VAE decodes the image: `Some(true)` in overlapping tiles (less
    /// memory; the seams blend, but pixels differ from a whole decode),
    /// `Some(false)` whole, as the reference pipeline does; `None`: the
    /// worker decides (whole, unless its config says to tile or the whole
    /// image would not fit in the memory it has).
    #[serde(default)]
    pub tile_vae: Option<bool>,
}

/// Checks labels: count, key syntax, value length.
pub fn check_labels(path: &str, labels: &BTreeMap<String, String>, errors: &mut Vec<FieldError>) {
    if labels.len() > MAX_LABELS {
        errors.push(FieldError::new(path, format!("{} labels, more than the limit of {MAX_LABELS}", labels.len())));
    }
    for (key, value) in labels {
        let key_ok = !key.is_empty()
            && key.chars().count() <= MAX_LABEL_KEY_CHARS
            && key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-/".contains(c));
        if !key_ok {
            errors.push(FieldError::new(
                format!("{path}[{key:?}]"),
                format!("label keys are 1 to {MAX_LABEL_KEY_CHARS} characters of a-z, 0-9, '_', '.', '-', '/'"),
            ));
        }
        if value.chars().count() > MAX_LABEL_VALUE_CHARS || value.contains('\0') {
            errors.push(FieldError::new(
                format!("{path}[{key:?}]"),
                format!("label values are at most {MAX_LABEL_VALUE_CHARS} characters, without NUL"),
            ));
        }
    }
}

/// Checks an idempotency key: at most 128 characters, printable.
pub fn check_idempotency_key(key: &str) -> Result<(), FieldError> {
    if key.chars().count() > MAX_IDEMPOTENCY_KEY_CHARS {
        return Err(FieldError::new("idempotency_key", format!("longer than {MAX_IDEMPOTENCY_KEY_CHARS} characters")));
    }
    if key.chars().any(char::is_control) {
        return Err(FieldError::new("idempotency_key", "must not contain control characters"));
    }
    Ok(())
}

fn check_text(path: &str, text: &str, required: bool, limits: &Limits, errors: &mut Vec<FieldError>) {
    if required && text.trim().is_empty() {
        errors.push(FieldError::new(path, "must not be empty"));
    }
    let chars = text.chars().count();
    if chars > limits.max_prompt_chars {
        errors.push(FieldError::new(path, format!("{chars} characters, more than the limit of {}", limits.max_prompt_chars)));
    }
    if text.contains('\0') {
        errors.push(FieldError::new(path, "must not contain NUL characters"));
    }
}

fn check_side(path: &str, side: u32, model: &ModelConfig, limits: &Limits, errors: &mut Vec<FieldError>) {
    if !side.is_multiple_of(16) {
        errors.push(FieldError::new(path, format!("{side} is not a multiple of 16")));
    } else if side < limits.min_side_px {
        errors.push(FieldError::new(path, format!("{side} is below the minimum of {}", limits.min_side_px)));
    } else if side > model.max_side_px {
        errors.push(FieldError::new(path, format!("{side} exceeds model {}'s limit of {} pixels", model.name, model.max_side_px)));
    }
}

fn lookup_model<'r>(path: &str, name: &str, registry: &'r ModelRegistry, errors: &mut Vec<FieldError>) -> Option<&'r ModelConfig> {
    if name.is_empty() {
        errors.push(FieldError::new(format!("{path}.model"), "required"));
        return None;
    }
    let model = registry.get(name);
    if model.is_none() {
        let served: Vec<&str> = registry.names().collect();
        errors.push(FieldError::new(format!("{path}.model"), format!("unknown model `{name}` (served: {})", served.join(", "))));
    }
    model
}

impl JobRequest {
    /// Checks every field and fixes every default. `path` prefixes field
    /// names in errors (`jobs[3]`); `pick_seed` supplies a seed (at most
    /// [`MAX_SEED`]) when the request has none.
    ///
    /// # Errors
    /// Every [`FieldError`] found, in field order.
    pub fn resolve(
        &self,
        path: &str,
        registry: &ModelRegistry,
        limits: &Limits,
        pick_seed: &mut dyn FnMut() -> u64,
    ) -> Result<ResolvedJob, Vec<FieldError>> {
        let mut errors = Vec::new();
        let model = lookup_model(path, &self.model, registry, &mut errors);
        check_text(&format!("{path}.prompt"), &self.prompt, true, limits, &mut errors);
        check_text(&format!("{path}.negative_prompt"), &self.negative_prompt, false, limits, &mut errors);

        if let Some(steps) = self.steps {
            if steps == 0 || steps > limits.max_steps {
                errors.push(FieldError::new(format!("{path}.steps"), format!("{steps} is outside 1..={}", limits.max_steps)));
            }
        }
        if let Some(g) = self.guidance {
            if !g.is_finite() {
                errors.push(FieldError::new(format!("{path}.guidance_scale"), format!("{g} is not a finite number")));
            } else if g < limits.min_guidance || g > limits.max_guidance {
                errors.push(FieldError::new(
                    format!("{path}.guidance_scale"),
                    format!("{g} is outside [{}, {}]", limits.min_guidance, limits.max_guidance),
                ));
            }
        }
        if let Some(seed) = self.seed {
            if seed > MAX_SEED {
                errors.push(FieldError::new(format!("{path}.seed"), format!("{seed} is above the maximum of 2^63 - 1")));
            }
        }
        if let Some(shift) = self.shift {
            if !shift.is_finite() || shift <= 0.0 || shift > MAX_SHIFT {
                errors.push(FieldError::new(format!("{path}.shift"), format!("{shift} is outside (0, {MAX_SHIFT}]")));
            }
        }
        if !(-PRIORITY_LIMIT..=PRIORITY_LIMIT).contains(&self.priority) {
            errors.push(FieldError::new(
                format!("{path}.priority"),
                format!("{} is outside {}..={PRIORITY_LIMIT}", self.priority, -PRIORITY_LIMIT),
            ));
        }
        if let Some(attempts) = self.max_attempts {
            if attempts == 0 || attempts > limits.max_attempts {
                errors.push(FieldError::new(format!("{path}.max_attempts"), format!("{attempts} is outside 1..={}", limits.max_attempts)));
            }
        }
        check_labels(&format!("{path}.labels"), &self.labels, &mut errors);

        let Some(model) = model else { return Err(errors) };
        let width = self.width.unwrap_or(model.default_width);
        let height = self.height.unwrap_or(model.default_height);
        check_side(&format!("{path}.width"), width, model, limits, &mut errors);
        check_side(&format!("{path}.height"), height, model, limits, &mut errors);
        let text_encoders = self.text_encoders.unwrap_or(model.text_encoder_sets[0]);
        if !model.text_encoder_sets.contains(&text_encoders) {
            errors.push(FieldError::new(
                format!("{path}.text_encoders"),
                format!("model {} does not allow `{}`", model.name, text_encoders.as_str()),
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(ResolvedJob {
            model: model.name.clone(),
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width,
            height,
            steps: self.steps.unwrap_or(model.default_steps),
            guidance: self.guidance.unwrap_or(model.default_guidance),
            seed: self.seed.unwrap_or_else(|| pick_seed().min(MAX_SEED)),
            shift: self.shift.unwrap_or_else(|| model.shift.alpha_for(width, height)),
            text_encoders,
            priority: self.priority,
            max_attempts: self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
            labels: self.labels.clone(),
            tile_vae: self.tile_vae,
        })
    }
}

/// Checks a list of jobs and resolves them, or names every bad field.
///
/// # Errors
/// An empty list, more than `limits.max_batch_jobs`, or any job's field errors
/// (paths `jobs[i].field`).
pub fn resolve_jobs(
    jobs: &[JobRequest],
    registry: &ModelRegistry,
    limits: &Limits,
    pick_seed: &mut dyn FnMut() -> u64,
) -> Result<Vec<ResolvedJob>, ValidationErrors> {
    if jobs.is_empty() {
        return Err(ValidationErrors(vec![FieldError::new("jobs", "a batch needs at least one job (or a grid)")]));
    }
    if jobs.len() > limits.max_batch_jobs as usize {
        return Err(ValidationErrors(vec![FieldError::new(
            "jobs",
            format!("{} jobs, more than the limit of {}", jobs.len(), limits.max_batch_jobs),
        )]));
    }
    let mut errors = Vec::new();
    let mut resolved = Vec::with_capacity(jobs.len());
    for (i, job) in jobs.iter().enumerate() {
        match job.resolve(&format!("jobs[{i}]"), registry, limits, pick_seed) {
            Ok(job) => resolved.push(job),
            Err(mut errs) => errors.append(&mut errs),
        }
    }
    if errors.is_empty() {
        Ok(resolved)
    } else {
        Err(ValidationErrors(errors))
    }
}

impl GridRequest {
    /// Number of jobs the grid expands to (saturating).
    pub fn job_count(&self) -> u64 {
        (self.prompts.len() as u64).saturating_mul(self.seeds.len().max(1) as u64).saturating_mul(self.sizes.len().max(1) as u64)
    }

    /// Checks the grid and expands it, prompts outermost, then seeds, then sizes.
    ///
    /// # Errors
    /// An empty prompt list, an expansion over `limits.max_batch_jobs`, fields
    /// of the base that the grid owns, and every field error, with paths
    /// `grid.prompts[i]`, `grid.sizes[i].width`, `grid.base.steps`, ….
    pub fn resolve(
        &self,
        registry: &ModelRegistry,
        limits: &Limits,
        pick_seed: &mut dyn FnMut() -> u64,
    ) -> Result<Vec<ResolvedJob>, ValidationErrors> {
        let fail = |path: &str, msg: String| Err(ValidationErrors(vec![FieldError::new(path, msg)]));
        if self.prompts.is_empty() {
            return fail("grid.prompts", "a grid needs at least one prompt".into());
        }
        let count = self.job_count();
        if count > u64::from(limits.max_batch_jobs) {
            return fail("grid", format!("expands to {count} jobs, more than the limit of {}", limits.max_batch_jobs));
        }
        let mut errors = Vec::new();
        if !self.base.prompt.is_empty() {
            errors.push(FieldError::new("grid.base.prompt", "must be empty: a grid's prompts go in grid.prompts"));
        }
        if self.base.seed.is_some() {
            errors.push(FieldError::new("grid.base.seed", "must be unset: a grid's seeds go in grid.seeds"));
        }
        if !self.sizes.is_empty() && (self.base.width.is_some() || self.base.height.is_some()) {
            errors.push(FieldError::new("grid.base.width", "must be unset when grid.sizes is given"));
        }
        for (i, prompt) in self.prompts.iter().enumerate() {
            check_text(&format!("grid.prompts[{i}]"), prompt, true, limits, &mut errors);
        }
        for (i, seed) in self.seeds.iter().enumerate() {
            if *seed > MAX_SEED {
                errors.push(FieldError::new(format!("grid.seeds[{i}]"), format!("{seed} is above the maximum of 2^63 - 1")));
            }
        }
        let model = lookup_model("grid.base", &self.base.model, registry, &mut errors);
        if let Some(model) = model {
            for (i, &(w, h)) in self.sizes.iter().enumerate() {
                check_side(&format!("grid.sizes[{i}].width"), w, model, limits, &mut errors);
                check_side(&format!("grid.sizes[{i}].height"), h, model, limits, &mut errors);
            }
        }
        // The base carries the shared fields; check them once, with the first
        // prompt standing in, so a bad base field is reported once, not per job.
        let mut probe = self.base.clone();
        probe.prompt = self.prompts[0].clone();
        if let Some(&(w, h)) = self.sizes.first() {
            (probe.width, probe.height) = (Some(w), Some(h));
        }
        if let Err(errs) = probe.resolve("grid.base", registry, limits, &mut || 0) {
            // Prompt and size problems were reported above under their own paths.
            errors.extend(
                errs.into_iter().filter(|e| {
                    !matches!(e.path.as_str(), "grid.base.prompt" | "grid.base.width" | "grid.base.height" | "grid.base.model")
                }),
            );
        }
        if !errors.is_empty() {
            return Err(ValidationErrors(errors));
        }

        let seeds: Vec<Option<u64>> = if self.seeds.is_empty() { vec![None] } else { self.seeds.iter().copied().map(Some).collect() };
        let sizes: Vec<(Option<u32>, Option<u32>)> = if self.sizes.is_empty() {
            vec![(self.base.width, self.base.height)]
        } else {
            self.sizes.iter().map(|&(w, h)| (Some(w), Some(h))).collect()
        };
        let mut jobs = Vec::with_capacity(count as usize);
        for prompt in &self.prompts {
            for &seed in &seeds {
                for &(width, height) in &sizes {
                    let job = JobRequest { prompt: prompt.clone(), seed, width, height, ..self.base.clone() };
                    let resolved = job.resolve("grid", registry, limits, pick_seed).map_err(ValidationErrors)?;
                    jobs.push(resolved);
                }
            }
        }
        Ok(jobs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{ShiftPolicy, Variant};

    fn registry() -> ModelRegistry {
        ModelRegistry::new(vec![ModelConfig {
            name: "sd3".into(),
            variant: Variant::Sd3Medium,
            default_steps: 28,
            default_guidance: 7.0,
            default_width: 1024,
            default_height: 1024,
            max_side_px: 2048,
            shift: ShiftPolicy::Resolution { alpha_ref: 3.0, ref_width: 1024, ref_height: 1024 },
            text_encoder_sets: vec![TextEncoderSet::All, TextEncoderSet::ClipOnly],
        }])
        .unwrap()
    }

    fn job() -> JobRequest {
        JobRequest { model: "sd3".into(), prompt: "a lighthouse at dusk".into(), ..Default::default() }
    }

    fn resolve_one(job: &JobRequest) -> Result<ResolvedJob, Vec<FieldError>> {
        job.resolve("jobs[0]", &registry(), &Limits::default(), &mut || 42)
    }

    #[test]
    fn defaults_come_from_the_model_and_the_seed_is_picked() {
        let r = resolve_one(&job()).unwrap();
        assert_eq!((r.width, r.height, r.steps, r.guidance, r.seed), (1024, 1024, 28, 7.0, 42));
        assert_eq!(r.shift, 3.0);
        assert_eq!(r.text_encoders, TextEncoderSet::All);
        assert_eq!(r.max_attempts, DEFAULT_MAX_ATTEMPTS);
    }

    #[test]
    fn shift_follows_the_resolution_policy_unless_given() {
        let big = JobRequest { width: Some(2048), height: Some(2048), ..job() };
        assert!((resolve_one(&big).unwrap().shift - 6.0).abs() < 1e-12);
        let explicit = JobRequest { shift: Some(1.5), ..big };
        assert_eq!(resolve_one(&explicit).unwrap().shift, 1.5);
    }

    #[test]
    fn errors_name_the_field_path() {
        let bad = JobRequest { width: Some(1000), steps: Some(0), guidance: Some(f32::NAN), ..job() };
        let errs = resolve_one(&bad).unwrap_err();
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert!(text.contains(&"jobs[0].width: 1000 is not a multiple of 16".to_string()), "{text:?}");
        assert!(text.iter().any(|e| e.starts_with("jobs[0].steps: 0 is outside")), "{text:?}");
        assert!(text.iter().any(|e| e.starts_with("jobs[0].guidance_scale: NaN")), "{text:?}");
    }

    #[test]
    fn unknown_model_lists_the_served_ones() {
        let errs = resolve_one(&JobRequest { model: "sdxl".into(), ..job() }).unwrap_err();
        assert_eq!(errs[0].to_string(), "jobs[0].model: unknown model `sdxl` (served: sd3)");
    }

    #[test]
    fn grid_expands_prompts_seeds_sizes_in_order() {
        let grid = GridRequest {
            base: JobRequest { model: "sd3".into(), ..Default::default() },
            prompts: vec!["a".into(), "b".into()],
            seeds: vec![1, 2, 3],
            sizes: vec![(512, 512), (1024, 768)],
        };
        let jobs = grid.resolve(&registry(), &Limits::default(), &mut || 0).unwrap();
        assert_eq!(jobs.len(), 12);
        assert_eq!((jobs[0].prompt.as_str(), jobs[0].seed, jobs[0].width), ("a", 1, 512));
        assert_eq!((jobs[1].prompt.as_str(), jobs[1].seed, jobs[1].width), ("a", 1, 1024));
        assert_eq!((jobs[2].seed, jobs[11].prompt.as_str(), jobs[11].seed), (2, "b", 3));
    }

    #[test]
    fn grid_errors_point_into_the_grid() {
        let registry = registry();
        let limits = Limits { max_batch_jobs: 10, ..Limits::default() };
        let base = JobRequest { model: "sd3".into(), ..Default::default() };
        let empty = GridRequest { base: base.clone(), ..Default::default() };
        assert_eq!(empty.resolve(&registry, &limits, &mut || 0).unwrap_err().0[0].path, "grid.prompts");
        let huge = GridRequest { base: base.clone(), prompts: vec!["p".into(); 4], seeds: vec![1, 2, 3], ..Default::default() };
        assert_eq!(huge.resolve(&registry, &limits, &mut || 0).unwrap_err().0[0].path, "grid");
        let bad_size = GridRequest { base: base.clone(), prompts: vec!["p".into()], sizes: vec![(512, 500)], ..Default::default() };
        let errs = bad_size.resolve(&registry, &limits, &mut || 0).unwrap_err();
        assert_eq!(errs.to_string(), "grid.sizes[0].height: 500 is not a multiple of 16");
        let bad_base = GridRequest { base: JobRequest { steps: Some(500), ..base }, prompts: vec!["p".into(); 3], ..Default::default() };
        let errs = bad_base.resolve(&registry, &limits, &mut || 0).unwrap_err();
        assert_eq!(errs.0.len(), 1, "reported once, not per job: {errs:?}");
        assert_eq!(errs.0[0].path, "grid.base.steps");
    }

    #[test]
    fn labels_are_checked() {
        let mut labels = BTreeMap::new();
        labels.insert("Team".to_string(), "x".to_string());
        let errs = resolve_one(&JobRequest { labels, ..job() }).unwrap_err();
        assert_eq!(errs[0].path, "jobs[0].labels[\"Team\"]");
    }

    #[test]
    fn validation_errors_display_the_first_and_count_the_rest() {
        let errs = ValidationErrors(vec![FieldError::new("a", "x"), FieldError::new("b", "y"), FieldError::new("c", "z")]);
        assert_eq!(errs.to_string(), "a: x (and 2 more errors)");
    }
}
