//! The models a farm serves, as the coordinator's config lists them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::shift;

/// Architecture family of a model; the engine builds the matching MM-DiT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Variant {
    #[serde(rename = "sd3-medium")]
    Sd3Medium,
    #[serde(rename = "sd3.5-medium")]
    Sd35Medium,
    #[serde(rename = "sd3.5-large")]
    Sd35Large,
}

/// Which text encoders condition an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TextEncoderSet {
    /// CLIP-L, CLIP-G and T5-XXL.
    #[serde(rename = "all")]
    All,
    /// CLIP-L and CLIP-G; T5's embedding is replaced by zeros.
    #[serde(rename = "clip-only")]
    ClipOnly,
}

impl TextEncoderSet {
    pub fn as_str(self) -> &'static str {
        match self {
            TextEncoderSet::All => "all",
            TextEncoderSet::ClipOnly => "clip-only",
        }
    }

    /// Parses `all` or `clip-only`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "all" => Some(TextEncoderSet::All),
            "clip-only" => Some(TextEncoderSet::ClipOnly),
            _ => None,
        }
    }
}

/// How a model's timestep shift α is chosen when a job gives none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "lowercase", deny_unknown_fields)]
pub enum ShiftPolicy {
    /// The same α at every size (SD3 uses 3.0).
    Fixed { alpha: f64 },
    /// α = alpha_ref · sqrt(pixels / (ref_width · ref_height)).
    Resolution { alpha_ref: f64, ref_width: u32, ref_height: u32 },
    /// diffusers' dynamic shifting: mu linear in image tokens, α = e^mu.
    Dynamic { base_shift: f64, max_shift: f64, base_image_seq_len: u64, max_image_seq_len: u64 },
}

/// Pixels per image token side: VAE downsampling 8 × patch size 2.
pub const PIXELS_PER_TOKEN_SIDE: u32 = 16;

impl ShiftPolicy {
    /// α for an image of `width` × `height` pixels.
    pub fn alpha_for(&self, width: u32, height: u32) -> f64 {
        let pixels = u64::from(width) * u64::from(height);
        match *self {
            ShiftPolicy::Fixed { alpha } => alpha,
            ShiftPolicy::Resolution { alpha_ref, ref_width, ref_height } => {
                shift::resolution_alpha(alpha_ref, u64::from(ref_width) * u64::from(ref_height), pixels)
            }
            ShiftPolicy::Dynamic { base_shift, max_shift, base_image_seq_len, max_image_seq_len } => {
                let tokens = u64::from(width / PIXELS_PER_TOKEN_SIDE) * u64::from(height / PIXELS_PER_TOKEN_SIDE);
                shift::dynamic_alpha(base_shift, max_shift, base_image_seq_len, max_image_seq_len, tokens)
            }
        }
    }

    fn check(&self) -> Result<(), String> {
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("{name} must be a positive finite number, got {v}"))
            }
        };
        match *self {
            ShiftPolicy::Fixed { alpha } => positive("alpha", alpha),
            ShiftPolicy::Resolution { alpha_ref, ref_width, ref_height } => {
                positive("alpha_ref", alpha_ref)?;
                if ref_width == 0 || ref_height == 0 {
                    return Err("ref_width and ref_height must be positive".into());
                }
                Ok(())
            }
            ShiftPolicy::Dynamic { base_shift, max_shift, base_image_seq_len, max_image_seq_len } => {
                if !(base_shift.is_finite() && max_shift.is_finite()) {
                    return Err("base_shift and max_shift must be finite".into());
                }
                if base_image_seq_len >= max_image_seq_len {
                    return Err("base_image_seq_len must be below max_image_seq_len".into());
                }
                Ok(())
            }
        }
    }
}

fn default_text_encoder_sets() -> Vec<TextEncoderSet> {
    vec![TextEncoderSet::All, TextEncoderSet::ClipOnly]
}

/// One model the farm serves (`[[models]]` in the coordinator's config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Name jobs use to ask for it.
    pub name: String,
    pub variant: Variant,
    /// Steps when a job gives none.
    pub default_steps: u32,
    /// Guidance scale when a job gives none.
    pub default_guidance: f32,
    /// Size when a job gives none, in pixels.
    pub default_width: u32,
    pub default_height: u32,
    /// Largest width or height in pixels: the position-embedding grid's limit
    /// (pos_embed_max_size × 16 for SD3-class models).
    pub max_side_px: u32,
    pub shift: ShiftPolicy,
    /// Sets jobs may ask for; the first is the default.
    #[serde(default = "default_text_encoder_sets")]
    pub text_encoder_sets: Vec<TextEncoderSet>,
}

/// A config that cannot serve: duplicate names, impossible defaults.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("models[{index}] ({name}): {reason}")]
pub struct RegistryError {
    pub index: usize,
    pub name: String,
    pub reason: String,
}

/// The models a farm serves, by name.
#[derive(Debug, Clone, Default)]
pub struct ModelRegistry {
    models: BTreeMap<String, ModelConfig>,
}

impl ModelRegistry {
    /// Checks every model and indexes them by name.
    ///
    /// # Errors
    /// [`RegistryError`] for an empty or duplicate name, a default size that is
    /// not a multiple of 16 or exceeds `max_side_px`, zero default steps, an
    /// invalid shift policy, or no text-encoder set.
    pub fn new(models: Vec<ModelConfig>) -> Result<Self, RegistryError> {
        let mut by_name = BTreeMap::new();
        for (index, model) in models.into_iter().enumerate() {
            let fail = |reason: String| RegistryError { index, name: model.name.clone(), reason };
            if model.name.trim().is_empty() {
                return Err(fail("name must not be empty".into()));
            }
            if model.name.contains(':') || model.name.chars().any(char::is_whitespace) {
                // `:` separates a model's work lanes in Redis (`{model}:clip-only`).
                return Err(fail("name must not contain `:` or white space".into()));
            }
            for (what, side) in [("default_width", model.default_width), ("default_height", model.default_height)] {
                if side == 0 || side % 16 != 0 || side > model.max_side_px {
                    return Err(fail(format!(
                        "{what} {side} must be a positive multiple of 16 no larger than max_side_px {}",
                        model.max_side_px
                    )));
                }
            }
            if model.default_steps == 0 {
                return Err(fail("default_steps must be at least 1".into()));
            }
            if !model.default_guidance.is_finite() {
                return Err(fail("default_guidance must be finite".into()));
            }
            if model.text_encoder_sets.is_empty() {
                return Err(fail("text_encoder_sets must name at least one set".into()));
            }
            model.shift.check().map_err(|reason| fail(format!("shift: {reason}")))?;
            if by_name.contains_key(&model.name) {
                return Err(fail("duplicate model name".into()));
            }
            by_name.insert(model.name.clone(), model);
        }
        Ok(ModelRegistry { models: by_name })
    }

    /// The model of that name, if served.
    pub fn get(&self, name: &str) -> Option<&ModelConfig> {
        self.models.get(name)
    }

    /// Names of all served models, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sd3() -> ModelConfig {
        ModelConfig {
            name: "sd3-medium".into(),
            variant: Variant::Sd3Medium,
            default_steps: 28,
            default_guidance: 7.0,
            default_width: 1024,
            default_height: 1024,
            max_side_px: 3072,
            shift: ShiftPolicy::Fixed { alpha: 3.0 },
            text_encoder_sets: default_text_encoder_sets(),
        }
    }

    #[test]
    fn policies_resolve_alpha() {
        let fixed = ShiftPolicy::Fixed { alpha: 3.0 };
        assert_eq!(fixed.alpha_for(512, 768), 3.0);
        let res = ShiftPolicy::Resolution { alpha_ref: 3.0, ref_width: 1024, ref_height: 1024 };
        assert_eq!(res.alpha_for(1024, 1024), 3.0);
        assert!((res.alpha_for(2048, 2048) - 6.0).abs() < 1e-12);
        let dynamic = ShiftPolicy::Dynamic { base_shift: 0.5, max_shift: 1.15, base_image_seq_len: 256, max_image_seq_len: 4096 };
        // 1024² is 64×64 = 4096 tokens: the maximum shift.
        assert!((dynamic.alpha_for(1024, 1024) - 1.15f64.exp()).abs() < 1e-12);
    }

    #[test]
    fn registry_refuses_bad_models() {
        assert!(ModelRegistry::new(vec![sd3()]).is_ok());
        let err = ModelRegistry::new(vec![sd3(), sd3()]).unwrap_err();
        assert_eq!(err.index, 1);
        assert!(err.reason.contains("duplicate"));
        let mut odd = sd3();
        odd.default_width = 1000;
        assert!(ModelRegistry::new(vec![odd]).unwrap_err().reason.contains("default_width"));
        let mut bad_shift = sd3();
        bad_shift.shift = ShiftPolicy::Fixed { alpha: -1.0 };
        assert!(ModelRegistry::new(vec![bad_shift]).unwrap_err().reason.contains("alpha"));
    }

    #[test]
    fn model_config_reads_from_toml() {
        let text = r#"
            name = "sd35"
            variant = "sd3.5-large"
            default_steps = 40
            default_guidance = 4.5
            default_width = 1024
            default_height = 1024
            max_side_px = 2048
            shift = { policy = "resolution", alpha_ref = 3.0, ref_width = 1024, ref_height = 1024 }
            text_encoder_sets = ["clip-only"]
        "#;
        let model: ModelConfig = toml::from_str(text).unwrap();
        assert_eq!(model.variant, Variant::Sd35Large);
        assert_eq!(model.text_encoder_sets, vec![TextEncoderSet::ClipOnly]);
        assert!(toml::from_str::<ModelConfig>(&text.replace("resolution", "sometimes")).is_err());
    }
}
