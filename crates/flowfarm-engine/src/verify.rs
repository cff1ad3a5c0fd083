//! Checking a model before anything renders with it: every part built "dry"
//! (each tensor looked up, its shape and dtype checked, nothing loaded), the
//! tokenizers and configs read, shard indexes held against their shards.
//! The same pass gives `model inspect` its sizes and the model its
//! [`WeightsIdentity`].
//!
//! Invariant: what [`examine`] checks is what loading asks for: the VAE and
//! the encoders are built by their own loaders over a recording backend; the
//! transformer's list is `MmDitConfig::weight_shapes`, the names and shapes
//! `MmDit::load` asks for (a unit test of the engine holds the two together).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};

use crate::checkpoint::Transform;
use crate::identity::{component_identity, model_identity, WeightsIdentity};
use crate::source::{index_weight_map, ComponentFiles, ModelLayout, Part};
use crate::tokenize::{PromptTokenizer, CLIP_MAX_LENGTH};
use crate::weights::{is_weight_dtype, DryRun, Requested, TensorInfo};
use crate::{Checkpoint, EngineError};

/// What one part needs and what is wrong with it.
#[derive(Debug, Clone)]
pub struct ComponentReport {
    pub part: Part,
    pub files: Vec<PathBuf>,
    /// Every tensor the part loads, with what is stored.
    pub tensors: Vec<(Requested, TensorInfo)>,
    pub problems: Vec<String>,
    /// None when the part has problems.
    pub identity: Option<WeightsIdentity>,
}

impl ComponentReport {
    /// Parameters the part loads, counted in the model's own shapes (a fused
    /// qkv stored once is q, k and v, each counted once).
    pub fn parameters(&self) -> u64 {
        self.tensors.iter().map(|(r, _)| r.shape.iter().product::<usize>() as u64).sum()
    }

    /// Parameters per storage dtype.
    pub fn dtypes_on_disk(&self) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for (r, info) in &self.tensors {
            *out.entry(info.dtype.as_str()).or_default() += r.shape.iter().product::<usize>() as u64;
        }
        out
    }

    /// Bytes the loaded weights take in `dtype`.
    pub fn bytes_at(&self, dtype: DType) -> u64 {
        self.parameters() * dtype.size_in_bytes() as u64
    }
}

/// The whole model's verdict.
#[derive(Debug, Clone)]
pub struct ModelReport {
    pub form: String,
    pub components: Vec<ComponentReport>,
    /// Stored tensors no part asked for (a VAE encoder, say): not an error.
    pub unused: Vec<String>,
    /// None unless every part is sound.
    pub identity: Option<WeightsIdentity>,
}

impl ModelReport {
    /// Every problem, each prefixed with its part.
    pub fn problems(&self) -> Vec<String> {
        self.components.iter().flat_map(|c| c.problems.iter().map(move |p| format!("{}: {p}", c.part.as_str()))).collect()
    }

    pub fn is_sound(&self) -> bool {
        self.components.iter().all(|c| c.problems.is_empty())
    }

    pub fn component(&self, part: Part) -> Option<&ComponentReport> {
        self.components.iter().find(|c| c.part == part)
    }

    /// Ok when sound; otherwise an error listing the problems.
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] naming every problem found.
    pub fn ensure_sound(&self, model: &std::path::Path) -> Result<WeightsIdentity, EngineError> {
        match self.identity {
            Some(id) if self.is_sound() => Ok(id),
            _ => Err(EngineError::checkpoint(model, self.problems().join("; "))),
        }
    }
}

/// Shards an index lists against what they hold.
fn index_problems(c: &ComponentFiles) -> Vec<String> {
    let Some(index) = &c.index else { return Vec::new() };
    let map = match index_weight_map(index) {
        Ok(map) => map,
        Err(e) => return vec![e.to_string()],
    };
    let mut problems = Vec::new();
    for (name, shard) in map {
        match c.files.file_of(&name) {
            None => problems.push(format!("{} lists `{name}` in {shard}, which does not hold it", index.display())),
            Some(file) if file.file_name().is_some_and(|f| f.to_string_lossy() != shard) => {
                problems.push(format!("{} lists `{name}` in {shard}, but {} holds it", index.display(), file.display()))
            }
            Some(_) => {}
        }
    }
    problems
}

/// "Scaled" float8 files (ComfyUI's `*_fp8_scaled`) store a scale beside
/// each weight; read without it the weights are wrong by that factor.
fn scaled_float8(c: &ComponentFiles) -> Option<String> {
    let name =
        c.files.names().filter(|n| n.starts_with(c.prefix.as_str())).find(|n| n.ends_with(".scale_weight") || n.ends_with("scaled_fp8"))?;
    Some(format!(
        "`{name}`: scaled float8 weights (a scale per tensor) are not supported; use the unscaled file (e.g. t5xxl_fp8_e4m3fn.safetensors) or F16"
    ))
}

/// Builds one part dry and reports on it.
fn examine_component(c: &ComponentFiles) -> ComponentReport {
    let dry = Arc::new(Mutex::new(DryRun::default()));
    let mut problems = index_problems(c);
    problems.extend(scaled_float8(c));
    let mut transforms: Vec<Transform> = Vec::new();
    let cpu = Device::Cpu;
    let built: Result<(), EngineError> = match c.part {
        Part::Transformer => (|| {
            let checkpoint = Checkpoint::from_component(c)?;
            let config = checkpoint.config()?;
            let mut d = dry.lock().unwrap_or_else(|p| p.into_inner());
            for (name, shape) in config.weight_shapes() {
                let Some((key, transform)) = checkpoint.source(&name) else {
                    d.problems.push(format!("`{name}` has no stored name in this layout"));
                    continue;
                };
                match c.files.info(&key) {
                    None => d.problems.push(format!("missing tensor `{key}`")),
                    Some(_) if crate::mmdit::WeightSource::shape(&checkpoint, &name).as_deref() != Some(shape.as_slice()) => {
                        let found = crate::mmdit::WeightSource::shape(&checkpoint, &name).unwrap_or_default();
                        d.problems.push(format!("tensor `{key}` gives {name} the shape {found:?}, expected {shape:?}"));
                    }
                    Some(info) => {
                        if !is_weight_dtype(info.dtype) {
                            d.problems.push(format!("tensor `{key}` is stored as {:?}, not a floating-point weight", info.dtype));
                        }
                        d.requested.push(Requested { name, key, shape });
                        transforms.push(transform);
                    }
                }
            }
            Ok(())
        })(),
        Part::Vae => crate::vae::Vae::from_component(c, DType::F32, &cpu, Some(dry.clone())).map(|_| ()),
        Part::ClipL | Part::ClipG => crate::clip::ClipTextEncoder::from_component(c, DType::F32, &cpu, Some(dry.clone())).map(|_| ()),
        Part::T5 => crate::t5::T5Encoder::from_component(c, DType::F32, &cpu, Some(dry.clone())).map(|_| ()),
    };
    let dry = std::mem::take(&mut *dry.lock().unwrap_or_else(|p| p.into_inner()));
    problems.extend(dry.problems);
    if let Err(e) = built {
        // The first line: candle appends a backtrace where RUST_BACKTRACE asks for one.
        let e = e.to_string().lines().next().unwrap_or_default().to_owned();
        // A loader that stopped at a problem the dry run already recorded says it again.
        if !problems.iter().any(|p| e.contains(p.as_str())) {
            problems.push(e);
        }
    }
    if let Some(dir) = &c.tokenizer {
        let length = if c.part == Part::T5 { 77 } else { CLIP_MAX_LENGTH };
        if let Err(e) = PromptTokenizer::open(dir, length) {
            problems.push(format!("tokenizer: {e}"));
        }
    }
    transforms.resize(dry.requested.len(), Transform::Same);
    let tensors: Vec<(Requested, TensorInfo)> =
        dry.requested.iter().filter_map(|r| Some((r.clone(), c.files.info(&r.key)?.clone()))).collect();
    let identity = if problems.is_empty() {
        let with_transforms: Vec<(Requested, Transform)> = dry.requested.into_iter().zip(transforms).collect();
        match component_identity(&c.files, &with_transforms) {
            Ok(id) => Some(id),
            Err(e) => {
                problems.push(format!("reading weights: {e}"));
                None
            }
        }
    } else {
        None
    };
    ComponentReport { part: c.part, files: c.files.paths().to_vec(), tensors, problems, identity }
}

/// A number from an encoder's config.json.
fn config_number(c: &ComponentFiles, key: &str) -> Option<usize> {
    let json: serde_json::Value = crate::read_json(c.config.as_deref()?, "a config").ok()?;
    json.get(key)?.as_u64().map(|n| n as usize)
}

/// Whether the parts fit each other: each can be sound alone and still not
/// go together (a transformer of another variant, encoders of another model).
fn mismatches(layout: &ModelLayout) -> Vec<String> {
    let mut problems = Vec::new();
    let Ok(config) = Checkpoint::from_component(&layout.transformer).and_then(|c| c.config()) else { return problems };
    let clip = |c: &ComponentFiles| (config_number(c, "hidden_size"), config_number(c, "projection_dim"));
    if let ((Some(l_width), Some(l_proj)), (Some(g_width), Some(g_proj))) = (clip(&layout.clip_l), clip(&layout.clip_g)) {
        if l_proj + g_proj != config.pooled_dim {
            problems.push(format!(
                "takes pooled text {} wide, but CLIP-L and CLIP-G project to {l_proj} + {g_proj}: the encoders are of another model",
                config.pooled_dim
            ));
        }
        if l_width + g_width > config.joint_attention_dim {
            problems.push(format!(
                "takes text {} wide, narrower than CLIP-L and CLIP-G side by side ({l_width} + {g_width})",
                config.joint_attention_dim
            ));
        }
    }
    if let Some(width) = layout.t5.as_ref().and_then(|t5| config_number(t5, "d_model")) {
        if width != config.joint_attention_dim {
            problems.push(format!("takes text {} wide, but T5 gives {width} (d_model)", config.joint_attention_dim));
        }
    }
    // The decoder's first convolution takes the latent: (C, latent channels, 3, 3) in either layout.
    let vae = &layout.vae;
    let conv_in = vae.files.names().find(|n| n.starts_with(vae.prefix.as_str()) && n.ends_with("decoder.conv_in.weight"));
    if let Some(channels) = conv_in.and_then(|n| vae.files.info(n)).and_then(|i| i.shape.get(1).copied()) {
        if channels != config.in_channels {
            problems.push(format!("takes {} latent channels, but the VAE has {channels}", config.in_channels));
        }
    }
    problems
}

/// Checks every part of `layout` without loading it.
pub fn examine(layout: &ModelLayout) -> ModelReport {
    let mut components: Vec<ComponentReport> = layout.components().into_iter().map(examine_component).collect();
    let mismatched = mismatches(layout);
    if !mismatched.is_empty() {
        if let Some(transformer) = components.iter_mut().find(|c| c.part == Part::Transformer) {
            transformer.problems.extend(mismatched);
            transformer.identity = None;
        }
    }
    let mut used: BTreeMap<PathBuf, BTreeSet<&str>> = BTreeMap::new();
    for (c, report) in layout.components().into_iter().zip(&components) {
        for (r, _) in &report.tensors {
            if let Some(file) = c.files.file_of(&r.key) {
                used.entry(file.to_owned()).or_default().insert(r.key.as_str());
            }
        }
    }
    let mut unused = BTreeSet::new();
    for c in layout.components() {
        for name in c.files.names() {
            let file = c.files.file_of(name).map(|f| f.to_owned()).unwrap_or_default();
            if !used.get(&file).is_some_and(|u| u.contains(name)) {
                unused.insert(name.to_owned());
            }
        }
    }
    let identity = components.iter().all(|c| c.identity.is_some()).then(|| {
        let t5 = components.iter().find(|c| c.part == Part::T5).and_then(|c| c.identity);
        let get = |part| components.iter().find(|c| c.part == part).and_then(|c| c.identity);
        model_identity(&[
            ("transformer", get(Part::Transformer)),
            ("vae", get(Part::Vae)),
            ("clip_l", get(Part::ClipL)),
            ("clip_g", get(Part::ClipG)),
            ("t5", t5),
        ])
    });
    ModelReport { form: layout.form.clone(), components, unused: unused.into_iter().collect(), identity }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};
    use std::sync::Mutex;

    use candle_core::{DType, Device, Tensor};

    use crate::mmdit::{MmDit, Variant, WeightSource};
    use crate::tiny::{random_weights, tiny_config};

    /// Random weights that note every name and shape the model asks for.
    struct Recording {
        weights: HashMap<String, Tensor>,
        asked: Mutex<BTreeSet<(String, Vec<usize>)>>,
    }

    impl WeightSource for Recording {
        fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor, crate::EngineError> {
            self.asked.lock().unwrap().insert((name.to_owned(), shape.to_vec()));
            let t = self.weights.get(name).ok_or_else(|| crate::EngineError::MissingTensor { key: name.to_owned() })?;
            Ok(t.to_dtype(dtype)?.to_device(device)?)
        }

        fn contains(&self, name: &str) -> bool {
            self.weights.contains_key(name)
        }

        fn shape(&self, name: &str) -> Option<Vec<usize>> {
            self.weights.get(name).map(|t| t.dims().to_vec())
        }
    }

    /// `examine` checks the transformer against `MmDitConfig::weight_shapes`: it must be
    /// exactly what `MmDit::load` asks for, in every variant.
    #[test]
    fn the_transformer_check_lists_what_loading_asks_for() {
        for variant in [Variant::Sd3Medium, Variant::Sd35Medium, Variant::Sd35Large] {
            let config = tiny_config(variant);
            let source = Recording { weights: random_weights(&config, 1).unwrap(), asked: Mutex::new(BTreeSet::new()) };
            MmDit::load(config.clone(), &source, DType::F32, &Device::Cpu).unwrap();
            let listed: BTreeSet<(String, Vec<usize>)> = config.weight_shapes().into_iter().collect();
            assert_eq!(source.asked.into_inner().unwrap(), listed, "{variant:?}");
        }
    }
}
