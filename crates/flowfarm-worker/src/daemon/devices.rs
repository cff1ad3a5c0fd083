//! The devices a worker renders on (`devices` in its config, or the one
//! `device`): every model is loaded on each (replicas), each device has
//! `capacity` slots, and a claimed job goes to the device with the most free
//! slots. CPU devices listed together (`cpu:0`, `cpu:1`) split the cores:
//! each renders on a thread pool of its own. With `parallel = "cfg"` the
//! devices pair up and each pair is one such unit (`cpu:0+cpu:1`), every
//! render split across both.
//!
//! Invariant: a slot is taken only under a permit of the worker's semaphore
//! (`capacity` × devices permits), so a device with a free slot exists
//! whenever one is taken.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use flowfarm_engine::cache::EmbeddingCache;
use flowfarm_engine::device::{device_info, device_name, open_device, parse_dtype};
use flowfarm_proto::v1 as pb;

use crate::config::WorkerConfig;
use crate::metrics::WorkerMetrics;
use crate::render::JobRenderer;
use crate::WorkerError;

/// One device and the models loaded on it.
pub(super) struct Device {
    /// The name it is registered and reported under (`cpu:1`, `cuda:0 NVIDIA H200`).
    pub(super) label: String,
    memory_bytes: u64,
    pub(super) renderers: HashMap<String, Arc<JobRenderer>>,
    /// A CPU device's own threads, when several CPU devices share the cores,
    /// and the lock that gives them to one render at a time: a render waiting
    /// in a rayon join would otherwise pick up another job's whole render.
    pool: Option<(rayon::ThreadPool, Mutex<()>)>,
    busy: AtomicI64,
    images: AtomicU64,
    busy_micros: AtomicU64,
}

impl Device {
    /// Runs `render` on this device's threads (the caller's, for a device
    /// without a pool of its own).
    pub(super) fn run<T: Send>(&self, render: impl FnOnce() -> T + Send) -> T {
        match &self.pool {
            Some((pool, one_at_a_time)) => {
                let _turn = super::lock(one_at_a_time);
                pool.install(render)
            }
            None => render(),
        }
    }

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

/// Every device of the worker, and their free slots.
pub(super) struct Devices {
    pub(super) list: Vec<Device>,
    free: Mutex<Vec<u32>>,
}

impl Devices {
    /// Slots on all devices together.
    pub(super) fn slots(&self, capacity: u32) -> u32 {
        capacity * self.list.len() as u32
    }

    /// Takes a slot on the device with the most free ones (the first of
    /// equals); returns its index.
    pub(super) fn take(&self) -> usize {
        let mut free = super::lock(&self.free);
        let (index, _) = free.iter().enumerate().max_by_key(|(i, n)| (**n, std::cmp::Reverse(*i))).unwrap_or((0, &0));
        free[index] = free[index].saturating_sub(1);
        self.list[index].busy.fetch_add(1, Ordering::SeqCst);
        index
    }

    /// Gives the slot taken on device `index` back, counting a rendered
    /// image of `seconds` when there is one.
    pub(super) fn give(&self, index: usize, rendered: Option<f64>) {
        let device = &self.list[index];
        device.busy.fetch_sub(1, Ordering::SeqCst);
        if let Some(seconds) = rendered {
            device.images.fetch_add(1, Ordering::SeqCst);
            device.busy_micros.fetch_add((seconds * 1e6) as u64, Ordering::SeqCst);
        }
        super::lock(&self.free)[index] += 1;
    }

    /// Every device as heartbeats report them.
    pub(super) fn states(&self) -> Vec<pb::Device> {
        self.list.iter().map(Device::state).collect()
    }

    /// The renderers of the first device: every device has the same models,
    /// with the same weights.
    pub(super) fn first(&self) -> &HashMap<String, Arc<JobRenderer>> {
        &self.list[0].renderers
    }
}

/// Opens every device of `config` and loads every model on each (on each
/// pair, with `parallel = "cfg"`: the pipeline on the first device, a
/// replica of the transformer on the second). CPU devices share one
/// embedding cache (their tensors live in host memory); each GPU gets a
/// cache of its own, on the card.
pub(super) async fn open(config: &WorkerConfig, cache: Arc<EmbeddingCache>, metrics: &WorkerMetrics) -> Result<Devices, WorkerError> {
    let names = config.device_names();
    let dtype = parse_dtype(&config.dtype).map_err(|e| WorkerError::Config(e.to_string()))?;
    let opened =
        names.iter().map(|name| open_device(name).map_err(|e| WorkerError::Config(e.to_string()))).collect::<Result<Vec<_>, _>>()?;
    let cfg = config.parallel == "cfg";
    // Each render unit: a device, or a CFG pair of devices.
    let units: Vec<(usize, Option<usize>)> =
        if cfg { (0..names.len()).step_by(2).map(|i| (i, Some(i + 1))).collect() } else { (0..names.len()).map(|i| (i, None)).collect() };
    let cpu_devices = opened.iter().filter(|d| d.is_cpu()).count();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let label_of = |i: usize| -> (String, u64) {
        let (info, memory) = device_info(&opened[i]);
        // A CPU device is known by the name the config gives it.
        let label = if opened[i].is_cpu() { names[i].trim().to_owned() } else { info };
        (label, memory.unwrap_or_else(|| if opened[i].is_cpu() { super::total_memory_bytes() } else { 0 }))
    };
    let mut list = Vec::with_capacity(units.len());
    for (index, &(first, second)) in units.iter().enumerate() {
        let device = opened[first].clone();
        let (mut label, mut memory_bytes) = label_of(first);
        if let Some(second) = second {
            let (other, memory) = label_of(second);
            label = format!("{label}+{other}");
            // Two CPU names of one host have one memory between them.
            if !(opened[first].is_cpu() && opened[second].is_cpu()) {
                memory_bytes += memory;
            }
        }
        // In CFG pairs the renderer holds the threads of both halves.
        let pool = if !cfg && device.is_cpu() && cpu_devices > 1 {
            let threads = (cores / cpu_devices).max(1);
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(move |i| format!("render-cpu{index}-{i}"))
                .build()
                .map_err(|e| WorkerError::Internal(format!("threads for {label}: {e}")))?;
            Some((pool, Mutex::new(())))
        } else {
            None
        };
        // Cached tensors live on the device that encoded them: CPU devices
        // share the worker's cache (the one its metrics show), a GPU has its
        // own, except the first when there is no CPU device.
        let first_gpu_alone = cpu_devices == 0 && index == 0;
        let cache =
            if device.is_cpu() || first_gpu_alone { cache.clone() } else { Arc::new(EmbeddingCache::new(config.embedding_cache_bytes)) };
        let mut renderers = HashMap::new();
        for entry in &config.models {
            let (source, t5, cache, on) = (entry.source(), config.t5_max_length, cache.clone(), device.clone());
            let partner = second.map(|i| opened[i].clone());
            let tiling = config.vae_tiling();
            let renderer = tokio::task::spawn_blocking(move || {
                let renderer = JobRenderer::open(&source, t5, cache, &on, dtype)?.with_vae_tiling(tiling);
                match partner {
                    Some(partner) => renderer.with_cfg_partner(&source, &partner, dtype),
                    None => Ok(renderer),
                }
            })
            .await
            .map_err(|e| WorkerError::Internal(e.to_string()))?
            .map_err(|source| WorkerError::Model { name: entry.name.clone(), source })?;
            tracing::info!(model = %entry.name, path = %entry.path.display(), t5 = renderer.has_t5(), hash = %renderer.model_hash(), device = %device_name(&device), %label, cfg, ?dtype, "model loaded");
            renderers.insert(entry.name.clone(), Arc::new(renderer));
        }
        metrics.add_device(&label, memory_bytes);
        list.push(Device {
            label,
            memory_bytes,
            renderers,
            pool,
            busy: AtomicI64::new(0),
            images: AtomicU64::new(0),
            busy_micros: AtomicU64::new(0),
        });
    }
    let free = Mutex::new(vec![config.capacity; list.len()]);
    Ok(Devices { list, free })
}
