//! Where each part of a model is, in any form the weights are published in.
//!
//! A user names a model the way it was downloaded ([`ModelSource`]): a
//! diffusers folder (components sharded or not, with `variant` files or
//! not), or a single file with its text encoders inside, beside it as
//! separate files (SD3.5), or not at all (then from a diffusers `support`
//! folder, as diffusers takes missing parts from the model's repository).
//! [`ModelSource::resolve`] turns that into one [`ComponentFiles`] per part,
//! so every loader, `model verify` and the weights' identity read the same
//! tensors whatever the form.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::pipeline::{SINGLE_FILE_CLIP_G, SINGLE_FILE_CLIP_L, SINGLE_FILE_T5};
use crate::weights::TensorFiles;
use crate::EngineError;

/// A model as the user names it: the flags of `flowfarm model render` and
/// the keys of a worker's `[[models]]` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelSource {
    /// A diffusers model folder, or a single file (transformer and VAE, maybe encoders).
    pub path: PathBuf,
    /// For a single file: a diffusers folder of the same architecture, for the
    /// tokenizers and configs a single file does not carry, and for any part
    /// the file and the encoder files below leave out.
    pub support: Option<PathBuf>,
    /// SD3.5-style separate CLIP-L weights (transformers names), with `clip_g`.
    pub clip_l: Option<PathBuf>,
    pub clip_g: Option<PathBuf>,
    /// Separate T5-XXL weights (F16 or float8 e4m3fn); with separate CLIP
    /// files and no T5 file the model is CLIP-only.
    pub t5: Option<PathBuf>,
    /// A diffusers folder's weight variant (`fp16` reads `*.fp16.safetensors`).
    pub variant: Option<String>,
}

/// The parts of an SD3-class model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    Transformer,
    Vae,
    ClipL,
    ClipG,
    T5,
}

impl Part {
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Transformer => "transformer",
            Part::Vae => "vae",
            Part::ClipL => "clip_l",
            Part::ClipG => "clip_g",
            Part::T5 => "t5",
        }
    }
}

/// Where one part's tensors are.
#[derive(Debug, Clone)]
pub struct ComponentFiles {
    pub part: Part,
    pub files: Arc<TensorFiles>,
    /// The shard index the files were listed by.
    pub index: Option<PathBuf>,
    /// Name prefix of the part inside its files (`text_encoders.clip_l.transformer.`).
    pub prefix: String,
    /// A diffusers `config.json`; None where the config is read off the weights.
    pub config: Option<PathBuf>,
    /// The encoder's tokenizer folder.
    pub tokenizer: Option<PathBuf>,
    /// The diffusers variant its files are (`fp16`); None for plain files.
    pub variant: Option<String>,
}

/// A resolved model: every part found, every file opened.
#[derive(Debug, Clone)]
pub struct ModelLayout {
    /// In words, for `model inspect` and errors.
    pub form: String,
    pub transformer: ComponentFiles,
    pub vae: ComponentFiles,
    pub clip_l: ComponentFiles,
    pub clip_g: ComponentFiles,
    /// None: the model is CLIP-only.
    pub t5: Option<ComponentFiles>,
    pub scheduler_config: Option<PathBuf>,
}

impl ModelLayout {
    pub fn components(&self) -> Vec<&ComponentFiles> {
        let mut parts = vec![&self.transformer, &self.vae, &self.clip_l, &self.clip_g];
        parts.extend(&self.t5);
        parts
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::checkpoint(path, reason)
}

/// The weight files of a diffusers component folder: `{stem}.safetensors`,
/// or the shards its index lists; with a variant, `{stem}.{variant}.safetensors`
/// or `{stem}.safetensors.index.{variant}.json`, as diffusers names them.
pub fn folder_weights(dir: &Path, stem: &str, variant: Option<&str>) -> Result<(Vec<PathBuf>, Option<PathBuf>), EngineError> {
    if !dir.is_dir() {
        return Err(bad(dir, "missing folder"));
    }
    let (single, index) = match variant {
        Some(v) => (format!("{stem}.{v}.safetensors"), format!("{stem}.safetensors.index.{v}.json")),
        None => (format!("{stem}.safetensors"), format!("{stem}.safetensors.index.json")),
    };
    let index = dir.join(index);
    if index.is_file() {
        return Ok((shards_of(&index)?, Some(index)));
    }
    if dir.join(&single).is_file() {
        return Ok((vec![dir.join(single)], None));
    }
    let others: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| EngineError::io(dir, e))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(stem) && (n.ends_with(".safetensors") || n.ends_with(".json")))
        .collect();
    let hint = match (variant, others.iter().find_map(|n| variant_of(n, stem))) {
        (None, Some(v)) => format!("; it has `{v}` variant files: set variant = \"{v}\" (--variant {v})"),
        (Some(_), _) if !others.is_empty() => format!("; it has {}", others.join(", ")),
        _ => String::new(),
    };
    Err(bad(dir, format!("no {single} and no sharded {}{hint}", index.file_name().unwrap_or_default().to_string_lossy())))
}

/// `fp16` of `model.fp16.safetensors`, `model.fp16-00001-of-00002.safetensors`
/// or `model.safetensors.index.fp16.json`.
fn variant_of(file: &str, stem: &str) -> Option<String> {
    let rest = file.strip_prefix(stem)?.strip_prefix('.')?;
    if let Some(v) = rest.strip_prefix("safetensors.index.").and_then(|r| r.strip_suffix(".json")) {
        return Some(v.to_owned());
    }
    let v = rest.strip_suffix(".safetensors")?;
    let v = v.split_once('-').map_or(v, |(v, _)| v);
    (!v.is_empty() && !v.contains('.')).then(|| v.to_owned())
}

/// The shard files a `*.safetensors.index.json` lists, each of which must exist.
fn shards_of(index: &Path) -> Result<Vec<PathBuf>, EngineError> {
    let json: serde_json::Value = crate::read_json(index, "a shard index")?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad(index, "no weight_map"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<PathBuf> = map.values().filter_map(|v| v.as_str()).map(|f| dir.join(f)).collect();
    shards.sort();
    shards.dedup();
    if let Some(missing) = shards.iter().find(|s| !s.is_file()) {
        return Err(bad(index, format!("lists shard {}, which is missing: download it again", missing.display())));
    }
    if shards.is_empty() {
        return Err(bad(index, "lists no shards"));
    }
    Ok(shards)
}

/// The weight map of a shard index: tensor name → shard file name.
pub fn index_weight_map(index: &Path) -> Result<Vec<(String, String)>, EngineError> {
    let json: serde_json::Value = crate::read_json(index, "a shard index")?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad(index, "no weight_map"))?;
    Ok(map.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
}

fn component(part: Part, files: Arc<TensorFiles>, index: Option<PathBuf>, prefix: &str) -> ComponentFiles {
    ComponentFiles { part, files, index, prefix: prefix.to_owned(), config: None, tokenizer: None, variant: None }
}

/// A diffusers component folder `dir/{folder}`: its weights named `stem`
/// (whole or sharded) and its config.json. With a variant, a part that has
/// no files of that variant takes its plain files, as diffusers does.
pub(crate) fn folder_component(
    part: Part,
    dir: &Path,
    folder: &str,
    stem: &str,
    variant: Option<&str>,
) -> Result<ComponentFiles, EngineError> {
    let sub = dir.join(folder);
    let (files, index, used) = match variant {
        Some(v) => match folder_weights(&sub, stem, Some(v)) {
            Ok((files, index)) => (files, index, Some(v.to_owned())),
            Err(variant_missing) => match folder_weights(&sub, stem, None) {
                Ok((files, index)) => (files, index, None),
                Err(_) => return Err(variant_missing),
            },
        },
        None => {
            let (files, index) = folder_weights(&sub, stem, None)?;
            (files, index, None)
        }
    };
    let config = sub.join("config.json");
    if !config.is_file() {
        return Err(bad(&sub, "no config.json"));
    }
    Ok(ComponentFiles { config: Some(config), variant: used, ..component(part, Arc::new(TensorFiles::open(&files)?), index, "") })
}

/// Whether `dir/{folder}` holds weights named `stem` (not only a config).
fn has_weights(dir: &Path, folder: &str, stem: &str, variant: Option<&str>) -> bool {
    let sub = dir.join(folder);
    folder_weights(&sub, stem, variant).is_ok() || folder_weights(&sub, stem, None).is_ok()
}

/// An encoder's config and tokenizer from a diffusers folder.
fn with_support(mut c: ComponentFiles, support: &Path, n: &str) -> Result<ComponentFiles, EngineError> {
    let config = support.join(format!("text_encoder{n}")).join("config.json");
    if !config.is_file() {
        return Err(bad(support, format!("no text_encoder{n}/config.json for the {} weights", c.part.as_str())));
    }
    c.config = Some(config);
    c.tokenizer = Some(support.join(format!("tokenizer{n}")));
    Ok(c)
}

impl ComponentFiles {
    /// One part's own folder (`config.json` and weights named `stem`, whole
    /// or sharded), outside any model folder.
    ///
    /// # Errors
    /// As [`folder_weights`]; a missing config.json.
    pub fn folder(part: Part, dir: &Path, stem: &str) -> Result<Self, EngineError> {
        folder_component(part, dir, "", stem, None)
    }

    /// One file holding a part under its own names (a single file's VAE).
    ///
    /// # Errors
    /// As [`TensorFiles::open`].
    pub fn file(part: Part, file: &Path) -> Result<Self, EngineError> {
        Ok(component(part, Arc::new(TensorFiles::open_one(file)?), None, ""))
    }
}

impl ModelSource {
    /// A diffusers folder or single file with nothing else named.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        ModelSource { path: path.into(), ..ModelSource::default() }
    }

    /// Finds every part and opens its files.
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] naming the file or folder that is missing,
    /// incomplete or not what it should be, and what to do.
    pub fn resolve(&self) -> Result<ModelLayout, EngineError> {
        if self.clip_l.is_some() != self.clip_g.is_some() {
            return Err(EngineError::Input("clip_l and clip_g go together: give both encoder files or neither".into()));
        }
        if self.t5.is_some() && self.clip_l.is_none() {
            return Err(EngineError::Input("t5 goes with clip_l and clip_g (SD3.5-style separate encoder files)".into()));
        }
        if let Some(v) = &self.variant {
            if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(EngineError::Input(format!("variant `{v}` must be a name like `fp16`")));
            }
        }
        if self.path.is_dir() {
            self.resolve_folder()
        } else if self.path.is_file() {
            self.resolve_single_file()
        } else {
            Err(bad(&self.path, "no such file or folder"))
        }
    }

    fn resolve_folder(&self) -> Result<ModelLayout, EngineError> {
        let dir = &self.path;
        if self.clip_l.is_some() {
            return Err(bad(dir, "clip_l, clip_g and t5 go with a single file; this is a diffusers folder, which has its encoders"));
        }
        if self.support.is_some() {
            return Err(bad(dir, "support goes with a single file; a diffusers folder carries its own configs and tokenizers"));
        }
        let v = self.variant.as_deref();
        let encoder = |part, n: &str| -> Result<ComponentFiles, EngineError> {
            let mut c = folder_component(part, dir, &format!("text_encoder{n}"), "model", v)?;
            c.tokenizer = Some(dir.join(format!("tokenizer{n}")));
            Ok(c)
        };
        let t5 = if dir.join("text_encoder_3").is_dir() { Some(encoder(Part::T5, "_3")?) } else { None };
        let layout = ModelLayout {
            form: match v {
                Some(v) => format!("diffusers folder, variant {v}"),
                None => "diffusers folder".into(),
            },
            transformer: folder_component(Part::Transformer, dir, "transformer", "diffusion_pytorch_model", v)?,
            vae: folder_component(Part::Vae, dir, "vae", "diffusion_pytorch_model", v)?,
            clip_l: encoder(Part::ClipL, "")?,
            clip_g: encoder(Part::ClipG, "_2")?,
            t5,
            scheduler_config: Some(dir.join("scheduler/scheduler_config.json")).filter(|p| p.is_file()),
        };
        if let Some(v) = v {
            if layout.components().iter().all(|c| c.variant.is_none()) {
                return Err(bad(dir, format!("no part has `{v}` variant files (*.{v}.safetensors); leave variant out or name one it has")));
            }
        }
        Ok(layout)
    }

    fn resolve_single_file(&self) -> Result<ModelLayout, EngineError> {
        let file = &self.path;
        let Some(support) = self.support.as_deref() else {
            return Err(bad(
                file,
                "a single file carries no tokenizers or encoder configs: pass --support DIR (a worker's `support` key), a diffusers folder of the same architecture",
            ));
        };
        if !support.is_dir() {
            return Err(bad(support, "support must be a diffusers model folder"));
        }
        let v = self.variant.as_deref();
        let main = Arc::new(TensorFiles::open_one(file)?);
        let mut form = vec!["single file".to_owned()];
        let vae = if main.has_prefix("first_stage_model.decoder.") || main.has_prefix("decoder.up.") {
            component(Part::Vae, main.clone(), None, "")
        } else {
            form.push("VAE from support".into());
            folder_component(Part::Vae, support, "vae", "diffusion_pytorch_model", v)?
        };
        let separate = |part, path: &Path, n| with_support(component(part, Arc::new(TensorFiles::open_one(path)?), None, ""), support, n);
        let from_support = |part, n: &str| -> Result<ComponentFiles, EngineError> {
            let mut c = folder_component(part, support, &format!("text_encoder{n}"), "model", v)?;
            c.tokenizer = Some(support.join(format!("tokenizer{n}")));
            Ok(c)
        };
        let inside = |part, prefix: &str, n| with_support(component(part, main.clone(), None, prefix), support, n);
        let (clip_l, clip_g) =
            match (&self.clip_l, &self.clip_g) {
                (Some(l), Some(g)) => {
                    form.push("separate encoder files".into());
                    (separate(Part::ClipL, l, "")?, separate(Part::ClipG, g, "_2")?)
                }
                _ if main.has_prefix(SINGLE_FILE_CLIP_L) && main.has_prefix(SINGLE_FILE_CLIP_G) => {
                    form.push("CLIP inside".into());
                    (inside(Part::ClipL, SINGLE_FILE_CLIP_L, "")?, inside(Part::ClipG, SINGLE_FILE_CLIP_G, "_2")?)
                }
                _ if has_weights(support, "text_encoder", "model", v) && has_weights(support, "text_encoder_2", "model", v) => {
                    form.push("CLIP from support".into());
                    (from_support(Part::ClipL, "")?, from_support(Part::ClipG, "_2")?)
                }
                _ => return Err(bad(
                    file,
                    "no CLIP encoders: none inside (text_encoders.clip_l.*), none given (clip_l, clip_g) and none in the support folder",
                )),
            };
        let t5 = if let Some(t5) = &self.t5 {
            form.push("T5 file".into());
            Some(separate(Part::T5, t5, "_3")?)
        } else if main.has_prefix(SINGLE_FILE_T5) {
            form.push("T5 inside".into());
            Some(inside(Part::T5, SINGLE_FILE_T5, "_3")?)
        } else if self.clip_l.is_none() && has_weights(support, "text_encoder_3", "model", v) {
            form.push("T5 from support".into());
            Some(from_support(Part::T5, "_3")?)
        } else {
            form.push("no T5".into());
            None
        };
        Ok(ModelLayout {
            form: form.join(", "),
            transformer: component(Part::Transformer, main, None, ""),
            vae,
            clip_l,
            clip_g,
            t5,
            scheduler_config: Some(support.join("scheduler/scheduler_config.json")).filter(|p| p.is_file()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::variant_of;

    #[test]
    fn variants_are_read_off_file_names() {
        assert_eq!(variant_of("model.fp16.safetensors", "model").as_deref(), Some("fp16"));
        assert_eq!(variant_of("model.fp16-00001-of-00002.safetensors", "model").as_deref(), Some("fp16"));
        assert_eq!(variant_of("model.safetensors.index.fp16.json", "model").as_deref(), Some("fp16"));
        assert_eq!(variant_of("model.safetensors", "model"), None);
        assert_eq!(variant_of("model-00001-of-00002.safetensors", "model"), None);
        assert_eq!(variant_of("model.safetensors.index.json", "model"), None);
    }
}
