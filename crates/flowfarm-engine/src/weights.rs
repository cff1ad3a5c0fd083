//! One component's safetensors files read as one set of named tensors.
//!
//! Published weights come as one file, as shards listed by an index, or as a
//! part of a bigger file under a name prefix, and in F32, F16, BF16 or float8
//! (e4m3fn). [`TensorFiles`] hides which: a tensor is found by name in
//! whichever file holds it and upcast to the compute dtype on the way in
//! (float8 through F32 on the CPU, since not every device backend converts
//! it). [`FilesBackend`] puts it under candle's `VarBuilder`, either loading
//! or, for `model verify` and the weights' identity, only checking and
//! recording what the model code asks for ([`DryRun`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::EngineError;

/// Shape and storage dtype of a stored tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Storage dtypes a weight may have; anything else (integers, F64) is not a
/// published weight.
pub fn is_weight_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3)
}

/// Memory-mapped safetensors files, searched by tensor name.
pub struct TensorFiles {
    paths: Vec<PathBuf>,
    mapped: MmapedSafetensors,
    infos: HashMap<String, TensorInfo>,
    /// Which file each tensor is in (an index into `paths`).
    file_of: HashMap<String, usize>,
}

impl std::fmt::Debug for TensorFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorFiles").field("paths", &self.paths).field("tensors", &self.infos.len()).finish()
    }
}

impl TensorFiles {
    /// Maps `paths` and reads their headers. A file cut short (a download
    /// that stopped) is refused here: safetensors checks that the data is as
    /// long as the header says.
    ///
    /// # Errors
    /// [`EngineError::Checkpoint`] naming the file that is missing, unreadable or truncated.
    pub fn open(paths: &[PathBuf]) -> Result<Self, EngineError> {
        if paths.is_empty() {
            return Err(EngineError::Input("no weight files given".into()));
        }
        let mut infos = HashMap::new();
        let mut file_of = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            if !path.is_file() {
                return Err(EngineError::checkpoint(path, "missing"));
            }
            // SAFETY: mapped read-only; flowfarm never writes a weights file it has open.
            let one = unsafe { MmapedSafetensors::new(path) }
                .map_err(|e| EngineError::checkpoint(path, format!("not a complete safetensors file ({e}); download it again")))?;
            for (name, view) in one.tensors() {
                if let Some(&other) = file_of.get(&name) {
                    let other: &PathBuf = &paths[other];
                    return Err(EngineError::checkpoint(path, format!("`{name}` is also in {}: which copy is meant?", other.display())));
                }
                let dtype = DType::try_from(view.dtype()).map_err(|_| {
                    EngineError::checkpoint(path, format!("`{name}` has dtype {:?}, which flowfarm cannot read", view.dtype()))
                })?;
                infos.insert(name.clone(), TensorInfo { shape: view.shape().to_vec(), dtype });
                file_of.insert(name, i);
            }
        }
        // SAFETY: as above; the files were just read whole and are not written while mapped.
        let mapped = unsafe { MmapedSafetensors::multi(paths) }.map_err(|e| EngineError::checkpoint(&paths[0], e.to_string()))?;
        Ok(TensorFiles { paths: paths.to_vec(), mapped, infos, file_of })
    }

    /// One file.
    ///
    /// # Errors
    /// As [`TensorFiles::open`].
    pub fn open_one(path: &Path) -> Result<Self, EngineError> {
        Self::open(&[path.to_owned()])
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.infos.get(name)
    }

    /// The file holding `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.file_of.get(name).map(|&i| self.paths[i].as_path())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.infos.keys().map(String::as_str)
    }

    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.infos.keys().any(|k| k.starts_with(prefix))
    }

    /// Tensor `name` as stored, in `dtype`, on `device`.
    ///
    /// # Errors
    /// [`EngineError::MissingTensor`]; tensor errors.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor, EngineError> {
        let info = self.info(name).ok_or_else(|| EngineError::MissingTensor { key: name.to_owned() })?;
        if info.dtype == DType::F8E4M3 {
            // Upcast where every backend can: the CPU.
            let wide = self.mapped.load(name, &Device::Cpu)?.to_dtype(DType::F32)?;
            return Ok(wide.to_dtype(dtype)?.to_device(device)?);
        }
        Ok(self.mapped.load(name, device)?.to_dtype(dtype)?)
    }

    /// Elements of `name` at the flat positions `at` (row-major, as stored), as F32.
    ///
    /// # Errors
    /// [`EngineError::MissingTensor`]; a position past the end.
    pub fn values_at(&self, name: &str, at: &[usize]) -> Result<Vec<f32>, EngineError> {
        let info = self.info(name).ok_or_else(|| EngineError::MissingTensor { key: name.to_owned() })?;
        let view = self.mapped.get(name)?;
        let data = view.data();
        let size = info.dtype.size_in_bytes();
        let mut bytes = Vec::with_capacity(at.len() * size);
        for &i in at {
            let element = data
                .get(i * size..(i + 1) * size)
                .ok_or_else(|| EngineError::Input(format!("element {i} of `{name}` is past its end ({} elements)", info.elements())))?;
            bytes.extend_from_slice(element);
        }
        Ok(Tensor::from_raw_buffer(&bytes, info.dtype, &[at.len()], &Device::Cpu)?.to_dtype(DType::F32)?.to_vec1()?)
    }
}

/// One tensor a model asked for: its name as the model code names it, where
/// it is stored, and the shape the model wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requested {
    pub name: String,
    pub key: String,
    pub shape: Vec<usize>,
}

/// What a dry load saw: every tensor asked for, and every problem (missing,
/// wrong shape, not a weight dtype), in the order met.
#[derive(Debug, Default)]
pub struct DryRun {
    pub requested: Vec<Requested>,
    pub problems: Vec<String>,
}

/// Maps a model's tensor name to the stored one (original LDM names).
type Rename = Box<dyn Fn(&str) -> String + Send + Sync>;

/// A `VarBuilder` backend over [`TensorFiles`]: names are prefixed (a
/// component inside a bigger file) and optionally renamed (original LDM
/// names), then loaded — or, with a [`DryRun`], checked and recorded, and
/// answered with zeros that take no memory (one element broadcast), so a
/// whole model can be "built" to see what it needs.
pub struct FilesBackend {
    files: Arc<TensorFiles>,
    prefix: String,
    rename: Option<Rename>,
    dry: Option<Arc<Mutex<DryRun>>>,
}

impl FilesBackend {
    pub fn new(files: Arc<TensorFiles>, prefix: &str) -> Self {
        FilesBackend { files, prefix: prefix.to_owned(), rename: None, dry: None }
    }

    pub fn renamed(mut self, rename: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        self.rename = Some(Box::new(rename));
        self
    }

    pub fn dry(mut self, record: Arc<Mutex<DryRun>>) -> Self {
        self.dry = Some(record);
        self
    }

    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn key(&self, name: &str) -> String {
        match &self.rename {
            Some(rename) => format!("{}{}", self.prefix, rename(name)),
            None => format!("{}{name}", self.prefix),
        }
    }

    fn record(&self, f: impl FnOnce(&mut DryRun)) {
        if let Some(dry) = &self.dry {
            f(&mut dry.lock().unwrap_or_else(|p| p.into_inner()));
        }
    }

    /// A stand-in for a weight in a dry run: one byte broadcast, so it takes
    /// no memory; where a loader reshapes it (a copy), a byte per element.
    fn placeholder(shape: &[usize], _dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::zeros((), DType::U8, device)?.broadcast_as(shape)
    }
}

impl SimpleBackend for FilesBackend {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let key = self.key(name);
        let Some(info) = self.files.info(&key) else {
            if self.dry.is_some() {
                self.record(|d| d.problems.push(format!("missing tensor `{key}` (shape {:?})", s.dims())));
                return Self::placeholder(s.dims(), dtype, dev);
            }
            return Err(candle_core::Error::CannotFindTensor { path: key });
        };
        if info.shape != s.dims() {
            if self.dry.is_some() {
                self.record(|d| d.problems.push(format!("tensor `{key}` has shape {:?}, expected {:?}", info.shape, s.dims())));
                return Self::placeholder(s.dims(), dtype, dev);
            }
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {key}"),
                expected: s,
                got: info.shape.clone().into(),
            });
        }
        if self.dry.is_some() {
            let requested = Requested { name: name.to_owned(), key: key.clone(), shape: s.dims().to_vec() };
            let bad_dtype = !is_weight_dtype(info.dtype);
            self.record(|d| {
                if bad_dtype {
                    d.problems.push(format!("tensor `{key}` is stored as {:?}, not a floating-point weight", info.dtype));
                }
                d.requested.push(requested);
            });
            return Self::placeholder(s.dims(), dtype, dev);
        }
        self.files.load(&key, dtype, dev).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let key = self.key(name);
        let Some(info) = self.files.info(&key) else {
            // The loader stops here; its error is the problem reported.
            return Err(candle_core::Error::CannotFindTensor { path: key });
        };
        if self.dry.is_some() {
            let requested = Requested { name: name.to_owned(), key: key.clone(), shape: info.shape.clone() };
            self.record(|d| d.requested.push(requested));
            return Self::placeholder(&info.shape, dtype, dev);
        }
        self.files.load(&key, dtype, dev).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.files.info(&self.key(name)).is_some()
    }
}
