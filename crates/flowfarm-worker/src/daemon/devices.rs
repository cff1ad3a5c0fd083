//! The devices a worker renders on (`devices` in its config, or the one
//! `device`), and each model's units on them: what renders one of its jobs.
//! Each model spreads over the devices as its `parallel` mode says:
//! - `replicate`: a unit per device, the whole model on it, `capacity` slots;
//! - `cfg`: a unit per pair of devices (`cpu:0+cpu:1`), `capacity` slots,
//!   every render split across both, one at a time;
//! - `pipeline`: one unit over every device, the transformer's blocks split
//!   among them, `capacity` × devices renders in flight.
//!
//! CPU devices listed together (`cpu:0`, `cpu:1`) split the cores: each
//! renders on a thread pool of its own. A claimed job goes to its model's
//! unit with the most free slots.
//!
//! Invariant: a slot is taken only under a permit of the worker's semaphore,
//! which has as many permits as the model with the most slots has slots, so
//! such a model always finds a free one; a model with fewer (CFG pairs
//! beside replicas) may wait for its unit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::Device as Opened;
use flowfarm_engine::cache::EmbeddingCache;
use flowfarm_engine::device::{device_info, device_name, every_gpu, open_device, parse_dtype};
use flowfarm_engine::pipeline::Loading;
use flowfarm_proto::v1 as pb;

use crate::config::{mode_fits, mode_slots, ModelEntry, Parallel, WorkerConfig};
use crate::metrics::WorkerMetrics;
use crate::render::JobRenderer;
use crate::WorkerError;

/// One device, and what its heartbeats report.
pub(super) struct Device {
    /// The name it is registered and reported under (`cpu:1`, `cuda:0 NVIDIA H200`).
    pub(super) label: String,
    memory_bytes: u64,
    /// A CPU device's own threads, when several CPU devices share the cores,
    /// and the lock that gives them to one render at a time: a render waiting
    /// in a rayon join would otherwise pick up another job's whole render.
    pool: Option<(rayon::ThreadPool, Mutex<()>)>,
    busy: AtomicI64,
    images: AtomicU64,
    busy_micros: AtomicU64,
}

impl Device {
    /// What heartbeats report of it.
    fn state(&self) -> pb::Device {
        pb::Device {
            name: self.label.clone(),
            memory_bytes: self.memory_bytes,
            busy_slots: self.busy.load(Ordering::SeqCst).max(0) as u32,
            images_done: self.images.load(Ordering::SeqCst),
            busy_seconds: self.busy_micros.load(Ordering::SeqCst) as f64 / 1e6,
        }
    }
}

/// One model on one device, a pair or all of them.
pub(super) struct Unit {
    /// Indices into [`Devices::list`].
    devices: Vec<usize>,
    pub(super) renderer: Arc<JobRenderer>,
}

/// A model's units and their free slots.
pub(super) struct ModelUnits {
    pub(super) units: Vec<Unit>,
    free: Mutex<Vec<i64>>,
    /// How the model spreads over the devices, and where its encoders run
    /// (`same`, or a device's name), as registered.
    parallel: Parallel,
    encoders: String,
}

impl ModelUnits {
    /// Any unit's renderer: all hold the same weights.
    pub(super) fn renderer(&self) -> &Arc<JobRenderer> {
        &self.units[0].renderer
    }
}

/// A slot taken for one render (a batch of jobs): its model's unit.
#[derive(Debug, Clone, Copy)]
pub(super) struct Slot {
    unit: usize,
}

/// Every device of the worker, and every model's units on them.
pub(super) struct Devices {
    pub(super) list: Vec<Device>,
    pub(super) models: HashMap<String, ModelUnits>,
    /// The worker's slots: the most any model has.
    pub(super) slots: u32,
}

impl Devices {
    /// Takes a slot of `model` on its unit with the most free ones (the
    /// first of equals); None for a model this worker does not serve.
    pub(super) fn take(&self, model: &str) -> Option<Slot> {
        let units = self.models.get(model)?;
        let mut free = super::lock(&units.free);
        let (unit, _) = free.iter().enumerate().max_by_key(|(i, n)| (**n, std::cmp::Reverse(*i)))?;
        free[unit] -= 1;
        for &d in &units.units[unit].devices {
            self.list[d].busy.fetch_add(1, Ordering::SeqCst);
        }
        Some(Slot { unit })
    }

    /// Gives back a slot of `model` after a render of `seconds` that made
    /// `images` images, counted on each of the unit's devices when it made any.
    pub(super) fn give(&self, model: &str, slot: Slot, images: u64, seconds: f64) {
        let Some(units) = self.models.get(model) else { return };
        for &d in &units.units[slot.unit].devices {
            let device = &self.list[d];
            device.busy.fetch_sub(1, Ordering::SeqCst);
            if images > 0 {
                device.images.fetch_add(images, Ordering::SeqCst);
                device.busy_micros.fetch_add((seconds * 1e6) as u64, Ordering::SeqCst);
            }
        }
        super::lock(&units.free)[slot.unit] += 1;
    }

    /// The renderer of `model`'s unit `slot`.
    pub(super) fn renderer(&self, model: &str, slot: Slot) -> Option<Arc<JobRenderer>> {
        Some(self.models.get(model)?.units.get(slot.unit)?.renderer.clone())
    }

    /// The devices of `model`'s unit `slot`, as they are reported.
    pub(super) fn labels(&self, model: &str, slot: Slot) -> Vec<String> {
        let unit = self.models.get(model).and_then(|m| m.units.get(slot.unit));
        unit.map(|u| u.devices.iter().map(|&d| self.list[d].label.clone()).collect()).unwrap_or_default()
    }

    /// Runs `render` for `model`'s unit `slot` on its device's threads: a
    /// replica's CPU device with threads of its own lends them to one
    /// render at a time; pairs and pipelines bring their own.
    pub(super) fn run<T: Send>(&self, model: &str, slot: Slot, render: impl FnOnce() -> T + Send) -> T {
        let unit = self.models.get(model).and_then(|m| m.units.get(slot.unit));
        match unit.map(|u| u.devices.as_slice()) {
            Some(&[only]) => match &self.list[only].pool {
                Some((pool, one_at_a_time)) => {
                    let _turn = super::lock(one_at_a_time);
                    pool.install(render)
                }
                None => render(),
            },
            _ => render(),
        }
    }

    /// How each model is served, as registration reports it.
    pub(super) fn placements(&self, max_batch: u32) -> std::collections::BTreeMap<String, pb::ModelPlacement> {
        self.models
            .iter()
            .map(|(name, m)| {
                let units = m.units.iter().map(|u| u.devices.iter().map(|&d| self.list[d].label.as_str()).collect::<Vec<_>>().join("+"));
                let placement = pb::ModelPlacement {
                    parallel: m.parallel.as_str().into(),
                    units: units.collect(),
                    encoders: m.encoders.clone(),
                    max_batch,
                };
                (name.clone(), placement)
            })
            .collect()
    }

    /// Every device as heartbeats report them.
    pub(super) fn states(&self) -> Vec<pb::Device> {
        self.list.iter().map(Device::state).collect()
    }
}

/// Opens every device of `config` and loads every model on them as its
/// mode says. Embedding caches follow the encoders: CPU encoders share the
/// worker's cache (their tensors live in host memory); each GPU's encoders
/// get a cache of their own, on the card (the first GPU's is the worker's
/// when no CPU device encodes).
pub(super) async fn open(config: &WorkerConfig, cache: Arc<EmbeddingCache>, metrics: &WorkerMetrics) -> Result<Devices, WorkerError> {
    let config_error = |e: flowfarm_engine::EngineError| WorkerError::Config(e.to_string());
    let names = match config.device_names() {
        names if names.is_empty() => every_gpu().map_err(|e| WorkerError::Config(format!("devices: {e}")))?,
        names => names,
    };
    let dtype = parse_dtype(&config.dtype).map_err(config_error)?;
    let opened = names.iter().map(|name| open_device(name).map_err(config_error)).collect::<Result<Vec<_>, _>>()?;
    let cpu_devices = opened.iter().filter(|d| d.is_cpu()).count();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = |label: &str, index: usize| -> Result<Option<rayon::ThreadPool>, WorkerError> {
        if !opened[index].is_cpu() || cpu_devices < 2 {
            return Ok(None);
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads((cores / cpu_devices).max(1))
            .thread_name(move |i| format!("render-cpu{index}-{i}"))
            .build()
            .map_err(|e| WorkerError::Internal(format!("threads for {label}: {e}")))?;
        Ok(Some(pool))
    };
    let mut list = Vec::with_capacity(opened.len());
    for (index, device) in opened.iter().enumerate() {
        let (info, memory) = device_info(device);
        // A CPU device is known by the name the config gives it.
        let label = if device.is_cpu() { names[index].trim().to_owned() } else { info };
        let memory_bytes = memory.unwrap_or_else(|| if device.is_cpu() { super::total_memory_bytes() } else { 0 });
        let pool = threads(&label, index)?.map(|pool| (pool, Mutex::new(())));
        metrics.add_device(&label, memory_bytes);
        list.push(Device { label, memory_bytes, pool, busy: AtomicI64::new(0), images: AtomicU64::new(0), busy_micros: AtomicU64::new(0) });
    }
    let cpu_encodes = cpu_devices > 0 || config.models.iter().any(|m| m.encoders.as_deref() == Some("cpu"));
    let mut caches = EncoderCaches { worker: cache, cpu_encodes, gpus: HashMap::new(), bytes: config.embedding_cache_bytes };
    let mut models = HashMap::new();
    for (m, entry) in config.models.iter().enumerate() {
        let mode = config.parallel_of(m);
        let key = if entry.parallel.is_some() { format!("models[{m}].parallel") } else { "parallel".into() };
        mode_fits(mode, opened.len()).map_err(|e| WorkerError::Config(format!("{key} = \"{}\": {e}", mode.as_str())))?;
        let encoders = match entry.encoders.as_deref() {
            None | Some("same") => None,
            Some(name) => Some(open_device(name).map_err(|e| WorkerError::Config(format!("models[{m}].encoders: {e}")))?),
        };
        check_fits(config, m, mode, &opened, &list, cpu_devices)?;
        // Each unit: its devices, in order.
        let groups: Vec<Vec<usize>> = match mode {
            Parallel::Replicate => (0..opened.len()).map(|i| vec![i]).collect(),
            Parallel::Cfg => (0..opened.len()).step_by(2).map(|i| vec![i, i + 1]).collect(),
            Parallel::Pipeline => vec![(0..opened.len()).collect()],
        };
        let mut units = Vec::with_capacity(groups.len());
        for devices in groups {
            let first = opened[devices[0]].clone();
            let loading = Loading {
                encoders: encoders.clone(),
                t5: entry.text_encoders.as_deref() != Some("clip-only"),
                ..Loading::on(&first, dtype, config.t5_max_length)
            };
            let cache = caches.for_encoders(loading.encoders.as_ref().unwrap_or(&first));
            let stages = match mode {
                Parallel::Pipeline => Some(
                    devices
                        .iter()
                        .map(|&d| Ok((opened[d].clone(), threads(&list[d].label, d)?)))
                        .collect::<Result<Vec<_>, WorkerError>>()?,
                ),
                _ => None,
            };
            let partner = (mode == Parallel::Cfg).then(|| opened[devices[1]].clone());
            let renderer = load(entry, loading, cache, stages, partner, config).await?;
            let label = devices.iter().map(|&d| list[d].label.as_str()).collect::<Vec<_>>().join("+");
            tracing::info!(
                model = %entry.name, path = %entry.path.display(), t5 = renderer.has_t5(), hash = %renderer.model_hash(),
                device = %device_name(&first), %label, parallel = mode.as_str(), stages = ?renderer.stage_blocks(), ?dtype, "model loaded"
            );
            units.push(Unit { devices, renderer: Arc::new(renderer) });
        }
        let per_unit = i64::from(mode_slots(mode, config.capacity, opened.len())) / units.len() as i64;
        let free = Mutex::new(vec![per_unit; units.len()]);
        let placed = entry.encoders.clone().unwrap_or_else(|| "same".into());
        models.insert(entry.name.clone(), ModelUnits { units, free, parallel: mode, encoders: placed });
    }
    Ok(Devices { list, models, slots: config.slots(opened.len()) })
}

/// Refuses a model that the memory planner says does not fit its devices
/// in its mode, at the model's native size with `capacity` × `max_batch` jobs at once
/// ([`flowfarm_engine::plan`]): GPUs by their total memory (their free
/// memory is not read yet), CPU devices by an equal share of the memory
/// the host has available. A model whose configs cannot be read is not
/// checked (it is loaded, and fails there if it must).
fn check_fits(config: &WorkerConfig, m: usize, mode: Parallel, opened: &[Opened], list: &[Device], cpus: usize) -> Result<(), WorkerError> {
    use flowfarm_engine::plan::{plan, EncoderPlace, ModelShapes, Workload};
    let entry = &config.models[m];
    // A folder's configs are read even where its weights are missing (the
    // load then says what is missing): a model too large is refused first.
    let shapes = entry.source().resolve().and_then(|layout| ModelShapes::of(&layout));
    let shapes = match shapes.or_else(|e| if entry.path.is_dir() { ModelShapes::from_config_folder(&entry.path) } else { Err(e) }) {
        Ok(shapes) if entry.text_encoders.as_deref() == Some("clip-only") => shapes.without_t5(),
        Ok(shapes) => shapes,
        Err(e) => {
            tracing::warn!(model = %entry.name, error = %e, "memory not planned: the model's configs cannot be read");
            return Ok(());
        }
    };
    let host = opened.iter().find(|d| d.is_cpu()).and_then(flowfarm_engine::device::available_memory);
    let memory = |i: usize| -> u64 {
        match &opened[i] {
            d if d.is_cpu() => host.map_or(u64::MAX, |free| free / cpus.max(1) as u64),
            _ => list[i].memory_bytes,
        }
    };
    let devices: Vec<(String, u64)> = (0..opened.len()).map(|i| (list[i].label.clone(), memory(i))).collect();
    let side = shapes.native_side();
    let work = Workload {
        width: side,
        height: side,
        batch: (config.capacity * config.max_batch.max(1)) as usize,
        t5_length: config.t5_max_length,
        dtype: parse_dtype(&config.dtype).map_err(|e| WorkerError::Config(e.to_string()))?,
    };
    let place = match entry.encoders.as_deref() {
        Some("cpu") => EncoderPlace::Cpu,
        _ => EncoderPlace::Same,
    };
    let planned = plan(&shapes, &work, &devices, mode, place).map_err(|e| WorkerError::Config(format!("models[{m}]: {e}")))?;
    match planned.shortfall() {
        None => Ok(()),
        Some(short) => Err(WorkerError::Config(format!(
            "models[{m}] ({}) does not fit: in parallel = \"{}\" {} needs {} MiB (weights {} MiB, activations {} MiB at {side}×{side}, {} at once) and has {} MiB; run `flowfarm model plan` for a mode that fits",
            entry.name,
            mode.as_str(),
            short.device,
            short.need() >> 20,
            short.weights >> 20,
            short.activations >> 20,
            config.capacity * config.max_batch.max(1),
            short.memory >> 20
        ))),
    }
}

/// Loads one unit's renderer on a blocking thread.
async fn load(
    entry: &ModelEntry,
    loading: Loading,
    cache: Arc<EmbeddingCache>,
    stages: Option<Vec<(Opened, Option<rayon::ThreadPool>)>>,
    partner: Option<Opened>,
    config: &WorkerConfig,
) -> Result<JobRenderer, WorkerError> {
    let (source, tiling, dtype) = (entry.source(), config.vae_tiling(), loading.dtype);
    tokio::task::spawn_blocking(move || {
        let renderer = match stages {
            Some(stages) => JobRenderer::open_staged(&source, &loading, cache, stages)?,
            None => JobRenderer::open(&source, &loading, cache)?,
        }
        .with_vae_tiling(tiling);
        match partner {
            Some(partner) => renderer.with_cfg_partner(&source, &partner, dtype),
            None => Ok(renderer),
        }
    })
    .await
    .map_err(|e| WorkerError::Internal(e.to_string()))?
    .map_err(|source| WorkerError::Model { name: entry.name.clone(), source })
}

/// The embedding cache for encoders on each device.
struct EncoderCaches {
    worker: Arc<EmbeddingCache>,
    /// Whether some device is the CPU (whose encoders use the worker's cache).
    cpu_encodes: bool,
    gpus: HashMap<String, Arc<EmbeddingCache>>,
    bytes: usize,
}

impl EncoderCaches {
    fn for_encoders(&mut self, device: &Opened) -> Arc<EmbeddingCache> {
        if device.is_cpu() {
            return self.worker.clone();
        }
        let first_gpu = !self.cpu_encodes && self.gpus.is_empty();
        let worker = self.worker.clone();
        let bytes = self.bytes;
        self.gpus
            .entry(device_name(device))
            .or_insert_with(|| if first_gpu { worker } else { Arc::new(EmbeddingCache::new(bytes)) })
            .clone()
    }
}
