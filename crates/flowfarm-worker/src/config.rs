//! The worker's TOML configuration, with environment overrides.
//!
//! Every key can be set from the environment: `FLOWFARM_WORKER__` then the
//! key's path upper-cased with `__` between parts (`FLOWFARM_WORKER__CAPACITY`,
//! `FLOWFARM_WORKER__MODELS__0__PATH`; see `flowfarm-config`). The token is
//! a secret: `FLOWFARM_TOKEN` or `token_file`, never the file; the short
//! names documented on some keys (`FLOWFARM_SERVER`, …) apply last.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Everything a worker needs. Every key has a default except `[[models]]`;
/// see `config/worker.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Name shown in `farmctl workers list`; default `{hostname}-{pid}`.
    pub name: Option<String>,
    /// The coordinator's gRPC address. Env: `FLOWFARM_SERVER`.
    pub coordinator: String,
    /// File holding a `worker` token. Env `FLOWFARM_TOKEN` (the token
    /// itself) takes precedence.
    pub token_file: Option<PathBuf>,
    /// The token, from `FLOWFARM_TOKEN` or `token_file` (never from the TOML).
    #[serde(skip)]
    pub token: String,
    /// PEM CA certificate(s) the coordinator's certificate must chain to,
    /// for an `https://` coordinator; absent: the system's roots.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for a coordinator that binds workers
    /// to certificates (its DNS name must be this worker's token name).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Redis holding the work streams (`rediss://` for TLS). Env: `FLOWFARM_REDIS_URL`.
    pub redis_url: String,
    /// PEM CA certificate(s) a `rediss://` server's certificate must chain
    /// to; absent: the system's roots.
    pub redis_ca_file: Option<PathBuf>,
    /// Folder of the results store (the coordinator's `results.dir`).
    /// Env: `FLOWFARM_RESULTS_DIR`.
    pub results_dir: PathBuf,
    /// An S3-compatible bucket instead of the folder: `s3://bucket[/prefix]`,
    /// the coordinator's `results.url`; endpoint and credentials from the
    /// `AWS_*` variables. Env: `FLOWFARM_RESULTS_URL`.
    pub results_url: Option<String>,
    /// Renders at once on each device (or CFG pair); each render is a
    /// batch of up to `max_batch` jobs.
    pub capacity: u32,
    /// Jobs of one model, size and text-encoder set sampled together in one
    /// render, each with its own prompt, seed, shift, guidance and step
    /// count; a job's image is the same alone or in a batch (see
    /// docs/architecture.md). 1: one job per render.
    pub max_batch: u32,
    /// Where the models run: `cpu`, `cuda` or `cuda:N` (CUDA needs a build
    /// with `--features cuda`). Env: `FLOWFARM_DEVICE`.
    pub device: String,
    /// Several devices (`["cuda:0", "cuda:1"]`, or `["cpu:0", "cpu:1"]`, each
    /// CPU device with its own share of the cores), used instead of
    /// `device`; or `"all"`, every GPU the driver shows (a CUDA build).
    #[serde(default, skip_serializing_if = "DeviceList::is_empty")]
    pub devices: DeviceList,
    /// How `devices` share a model's work, unless its `[[models]]` entry
    /// says otherwise (all give the same image as one device):
    /// - `replicate`: the model on each device, `capacity` jobs each;
    /// - `cfg`: devices pair up in order; each pair renders one job at a
    ///   time, the conditional half of every step on the first and the
    ///   unconditional half on the second, at once (about half the latency);
    /// - `pipeline`: the transformer's blocks split into a contiguous range
    ///   per device (a model larger than one card runs), `capacity` jobs per
    ///   device in flight through them.
    pub parallel: String,
    /// Precision of weights and activations: `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// On SIGTERM or a drain, how long running jobs may take to finish;
    /// what is left then is failed as retryable, so it is requeued at once.
    pub drain_timeout_seconds: f64,
    /// T5 tokens per prompt.
    pub t5_max_length: usize,
    /// Size of the text-embedding cache (L1) in bytes.
    pub embedding_cache_bytes: usize,
    /// How the VAE decodes a job that does not say (`tile_vae` unset):
    /// `auto` whole, as the reference pipeline does, unless the whole image
    /// would not fit in the memory available (then in tiles); `whole`;
    /// `tiled` (less memory, blended seams). Each PNG records which was used.
    pub vae_tiling: String,
    /// Where Prometheus /metrics is served; absent: not served.
    /// Env: `FLOWFARM_METRICS_LISTEN`.
    pub metrics_listen: Option<SocketAddr>,
    /// Where spans go besides the log (`[tracing]`).
    pub tracing: flowfarm_config::TracingConfig,
    /// The models this worker loads and serves.
    pub models: Vec<ModelEntry>,
}

/// A model to load: the name the farm knows it by, and where its weights
/// are, with the keys `flowfarm model render` has flags for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub name: String,
    /// A diffusers model folder, or a single file (transformer and VAE, with
    /// or without its text encoders).
    pub path: PathBuf,
    /// For a single file: a diffusers folder of the same architecture, for
    /// the tokenizers and configs a single file does not carry and any part
    /// it leaves out.
    #[serde(default)]
    pub support: Option<PathBuf>,
    /// SD3.5-style separate encoder files beside a single file: CLIP-L and
    /// CLIP-G together, T5-XXL (F16 or float8) optional.
    #[serde(default)]
    pub clip_l: Option<PathBuf>,
    #[serde(default)]
    pub clip_g: Option<PathBuf>,
    #[serde(default)]
    pub t5: Option<PathBuf>,
    /// A diffusers folder's weight variant (`fp16` reads `*.fp16.safetensors`).
    #[serde(default)]
    pub variant: Option<String>,
    /// This model's `parallel` mode; absent: the worker's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<String>,
    /// Where its text encoders run: `same` (the device of the transformer,
    /// or of its first stage), `cpu`, or `cuda:N` (T5-XXL on a card of
    /// its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoders: Option<String>,
    /// `all`, or `clip-only`: T5 is never loaded. Encoder sets are per
    /// worker, so the worker then takes CLIP-only jobs only, of every model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoders: Option<String>,
}

/// `devices`: names, or `"all"`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DeviceList {
    #[default]
    #[serde(skip)]
    Unset,
    Named(Vec<String>),
    /// `"all"`; any other text is refused by [`WorkerConfig::check`].
    Every(String),
}

impl DeviceList {
    fn is_empty(&self) -> bool {
        match self {
            DeviceList::Unset => true,
            DeviceList::Named(names) => names.is_empty(),
            DeviceList::Every(_) => false,
        }
    }
}

/// How one model's work is spread over a worker's devices (`parallel`).
pub use flowfarm_engine::plan::Mode as Parallel;

/// Jobs one model in `mode` takes at once on `devices` devices with
/// `capacity` each: every device's `capacity` (replicas, or jobs in flight
/// through a pipeline), or one pair's for CFG pairs.
pub fn mode_slots(mode: Parallel, capacity: u32, devices: usize) -> u32 {
    match mode {
        Parallel::Replicate | Parallel::Pipeline => capacity * devices as u32,
        Parallel::Cfg => capacity * (devices / 2) as u32,
    }
}

impl ModelEntry {
    /// Where the weights are, as the engine takes it.
    pub fn source(&self) -> flowfarm_engine::ModelSource {
        flowfarm_engine::ModelSource {
            path: self.path.clone(),
            support: self.support.clone(),
            clip_l: self.clip_l.clone(),
            clip_g: self.clip_g.clone(),
            t5: self.t5.clone(),
            variant: self.variant.clone(),
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            name: None,
            coordinator: "http://127.0.0.1:7070".into(),
            token_file: None,
            token: String::new(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            redis_url: "redis://127.0.0.1:6379/0".into(),
            redis_ca_file: None,
            results_dir: PathBuf::from("results"),
            results_url: None,
            capacity: 1,
            max_batch: 1,
            device: "cpu".into(),
            devices: DeviceList::Unset,
            parallel: "replicate".into(),
            dtype: "f32".into(),
            drain_timeout_seconds: 300.0,
            t5_max_length: flowfarm_engine::pipeline::DEFAULT_T5_LENGTH,
            embedding_cache_bytes: 256 << 20,
            vae_tiling: "auto".into(),
            metrics_listen: None,
            tracing: Default::default(),
            models: Vec::new(),
        }
    }
}

/// `FLOWFARM_WORKER__KEY`.
pub const ENV_RULE: flowfarm_config::EnvRule =
    flowfarm_config::EnvRule { prefix: "FLOWFARM_WORKER__", needs_separator: false, others: &[] };

/// Keys that hold secrets (the token is never a key).
pub const SECRETS: &[flowfarm_config::Secret] = &[flowfarm_config::Secret {
    key: "redis_url",
    instead: "leave the password out of the file: set FLOWFARM_WORKER__REDIS_URL (or FLOWFARM_REDIS_URL) with it",
    url: true,
}];

/// A worker config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WorkerConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Layer(#[from] flowfarm_config::ConfigError),
    #[error("environment variable {name}: {reason}")]
    Env { name: &'static str, reason: String },
    #[error("{0}")]
    Invalid(String),
}

impl WorkerConfig {
    /// Model `index`'s mode, which [`WorkerConfig::check`] accepted.
    pub fn parallel_of(&self, index: usize) -> Parallel {
        let text = self.models.get(index).and_then(|m| m.parallel.as_deref()).unwrap_or(&self.parallel);
        Parallel::parse(text).unwrap_or(Parallel::Replicate)
    }

    /// Renders the worker runs at once: the most any of its models runs
    /// ([`mode_slots`]) on `devices` devices.
    pub fn slots(&self, devices: usize) -> u32 {
        (0..self.models.len()).map(|i| mode_slots(self.parallel_of(i), self.capacity, devices)).max().unwrap_or(self.capacity)
    }

    /// Jobs the worker takes at once (what it registers as its capacity):
    /// a batch of `max_batch` in each of its [`WorkerConfig::slots`].
    pub fn jobs_at_once(&self, devices: usize) -> u32 {
        self.slots(devices) * self.max_batch
    }

    /// The devices to render on: `devices`, or `device` alone. `"all"` is
    /// resolved when the worker starts ([`flowfarm_engine::device::every_gpu`]);
    /// here it is the empty list.
    pub fn device_names(&self) -> Vec<String> {
        match &self.devices {
            DeviceList::Unset => vec![self.device.clone()],
            DeviceList::Named(names) if names.is_empty() => vec![self.device.clone()],
            DeviceList::Named(names) => names.clone(),
            DeviceList::Every(_) => Vec::new(),
        }
    }

    /// `vae_tiling`, which [`WorkerConfig::check`] accepted.
    pub fn vae_tiling(&self) -> flowfarm_engine::pipeline::VaeTiling {
        flowfarm_engine::pipeline::VaeTiling::parse(&self.vae_tiling).unwrap_or(flowfarm_engine::pipeline::VaeTiling::Auto)
    }

    /// Reads a TOML file, applies the environment, resolves the token and
    /// model paths (relative to the file's folder), and checks the result.
    ///
    /// # Errors
    /// [`WorkerConfigError`] naming the file, key or variable at fault.
    pub fn load(path: &Path) -> Result<Self, WorkerConfigError> {
        let mut config: WorkerConfig = flowfarm_config::load(path, std::env::vars(), &ENV_RULE, SECRETS)?;
        config.apply_env(|name| std::env::var(name).ok())?;
        if config.token.is_empty() {
            if let Some(file) = &config.token_file {
                config.token = std::fs::read_to_string(file)
                    .map_err(|source| WorkerConfigError::Read { path: file.clone(), source })?
                    .trim()
                    .to_owned();
            }
        }
        config.check()?;
        Ok(config)
    }

    /// Applies `FLOWFARM_SERVER`, `FLOWFARM_TOKEN`, `FLOWFARM_REDIS_URL`,
    /// `FLOWFARM_RESULTS_DIR`, `FLOWFARM_RESULTS_URL`, `FLOWFARM_DEVICE`, `FLOWFARM_WORKER_NAME` and
    /// `FLOWFARM_METRICS_LISTEN`, read through `var`.
    ///
    /// # Errors
    /// [`WorkerConfigError::Env`] for a metrics address that does not parse.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), WorkerConfigError> {
        if let Some(v) = var("FLOWFARM_SERVER") {
            self.coordinator = v;
        }
        if let Some(v) = var("FLOWFARM_TOKEN") {
            self.token = v.trim().to_owned();
        }
        if let Some(v) = var("FLOWFARM_REDIS_URL") {
            self.redis_url = v;
        }
        if let Some(v) = var("FLOWFARM_RESULTS_DIR") {
            self.results_dir = v.into();
        }
        if let Some(v) = var("FLOWFARM_RESULTS_URL") {
            self.results_url = Some(v).filter(|u| !u.is_empty());
        }
        if let Some(v) = var("FLOWFARM_DEVICE") {
            self.device = v;
        }
        if let Some(v) = var("FLOWFARM_WORKER_NAME") {
            self.name = Some(v);
        }
        if let Some(v) = var("FLOWFARM_METRICS_LISTEN") {
            self.metrics_listen = Some(v.parse().map_err(|e| WorkerConfigError::Env {
                name: "FLOWFARM_METRICS_LISTEN",
                reason: format!("`{v}` is not a socket address ({e})"),
            })?);
        }
        Ok(())
    }

    /// The configuration as TOML with its secrets masked (`flowfarm config print --worker`).
    ///
    /// # Errors
    /// [`WorkerConfigError::Invalid`] if a value cannot be shown as TOML.
    pub fn to_masked_toml(&self) -> Result<String, WorkerConfigError> {
        flowfarm_config::to_masked_toml(self, SECRETS).map_err(|e| WorkerConfigError::Invalid(format!("showing the config: {e}")))
    }

    /// Checks what serde cannot.
    ///
    /// # Errors
    /// [`WorkerConfigError::Invalid`] saying which key is wrong and what to do.
    pub fn check(&self) -> Result<(), WorkerConfigError> {
        let invalid = |m: String| Err(WorkerConfigError::Invalid(m));
        if self.models.is_empty() {
            return invalid("models: at least one [[models]] entry (name, path) is needed".into());
        }
        if flowfarm_engine::device::parse_dtype(&self.dtype).is_err() {
            return invalid(format!("dtype: `{}` is not `f32`, `f16` or `bf16`", self.dtype));
        }
        if let Err(e) = flowfarm_engine::pipeline::VaeTiling::parse(&self.vae_tiling) {
            return invalid(format!("vae_tiling: {e}"));
        }
        if flowfarm_engine::device::parse_device(&self.device).is_err() {
            return invalid(format!("device: `{}` is not `cpu`, `cpu:N`, `cuda` or `cuda:N`", self.device));
        }
        use flowfarm_engine::device::{parse_device, DeviceSpec};
        let names = match &self.devices {
            DeviceList::Every(all) if all == "all" => None,
            DeviceList::Every(other) => return invalid(format!("devices: `{other}` is neither a list of devices nor \"all\"")),
            _ => Some(self.device_names()),
        };
        for (i, name) in names.iter().flatten().enumerate() {
            let Ok(spec) = parse_device(name) else {
                return invalid(format!("devices[{i}]: `{name}` is not `cpu`, `cpu:N`, `cuda` or `cuda:N`"));
            };
            // `cuda` and `cuda:0` are one GPU; CPU devices are told apart by name.
            let same = |other: &String| match (spec, parse_device(other)) {
                (DeviceSpec::Cuda(a), Ok(DeviceSpec::Cuda(b))) => a == b,
                _ => other.trim() == name.trim(),
            };
            if names.iter().flatten().take(i).any(same) {
                return invalid(format!("devices[{i}]: `{name}` is listed twice"));
            }
        }
        if let Err(e) = Parallel::parse(&self.parallel) {
            return invalid(format!("parallel: {e}"));
        }
        for (i, m) in self.models.iter().enumerate() {
            let key = |k: &str| if m.parallel.is_some() && k == "parallel" { format!("models[{i}].parallel") } else { k.to_owned() };
            let mode = match Parallel::parse(m.parallel.as_deref().unwrap_or(&self.parallel)) {
                Ok(mode) => mode,
                Err(e) => return invalid(format!("{}: {e}", key("parallel"))),
            };
            // With "all", the count is known at start; the worker checks it then.
            if let Some(names) = &names {
                if let Err(e) = mode_fits(mode, names.len()) {
                    return invalid(format!("{} = \"{}\": {e}", key("parallel"), mode.as_str()));
                }
            }
            if let Some(encoders) = &m.encoders {
                if encoders != "same" && parse_device(encoders).is_err() {
                    return invalid(format!("models[{i}].encoders: `{encoders}` is not `same`, `cpu` or `cuda:N`"));
                }
            }
            if let Some(set) = &m.text_encoders {
                if set != "all" && set != "clip-only" {
                    return invalid(format!("models[{i}].text_encoders: `{set}` is not `all` or `clip-only`"));
                }
            }
        }
        if !(1..=16).contains(&self.max_batch) {
            return invalid(format!("max_batch {} is outside 1..=16", self.max_batch));
        }
        // The coordinator takes at most 64 jobs at once per worker.
        if let Some(names) = &names {
            let jobs = u64::from(self.slots(names.len())) * u64::from(self.max_batch);
            if jobs > 64 {
                return invalid(format!(
                    "capacity {} on each of {} devices, in batches of max_batch {}, is {jobs} jobs at once, more than the 64 a worker may have; lower capacity or max_batch, or list fewer devices",
                    self.capacity,
                    names.len(),
                    self.max_batch
                ));
            }
        }
        for (i, m) in self.models.iter().enumerate() {
            if m.name.trim().is_empty() {
                return invalid(format!("models[{i}].name must not be empty"));
            }
            if m.path.is_file() {
                if !m.support.as_ref().is_some_and(|s| s.is_dir()) {
                    return invalid(format!(
                        "models[{i}].support: {} is a single file; name a diffusers folder of the same architecture for its tokenizers and configs",
                        m.path.display()
                    ));
                }
            } else if !m.path.is_dir() {
                return invalid(format!("models[{i}].path: {} is neither a model folder nor a single file", m.path.display()));
            }
        }
        if !(1..=64).contains(&self.capacity) {
            return invalid(format!("capacity {} is outside 1..=64", self.capacity));
        }
        if !(self.drain_timeout_seconds.is_finite() && self.drain_timeout_seconds >= 0.0) {
            return invalid("drain_timeout_seconds must be a non-negative number".into());
        }
        if self.token.is_empty() {
            return invalid(
                "no worker token: set FLOWFARM_TOKEN or token_file (create one with `flowfarm token create --role worker`)".into(),
            );
        }
        Ok(())
    }

    /// Where the work streams are.
    pub fn redis_target(&self) -> flowfarm_queue::RedisTarget {
        flowfarm_queue::RedisTarget { url: self.redis_url.clone(), ca_file: self.redis_ca_file.clone() }
    }

    /// How the worker's channel to the coordinator is secured.
    pub fn client_tls(&self) -> flowfarm_proto::client::ClientTls {
        flowfarm_proto::client::ClientTls {
            ca_file: self.tls_ca_file.clone(),
            cert_file: self.tls_cert_file.clone(),
            key_file: self.tls_key_file.clone(),
            domain: None,
        }
    }

    /// The configured name, or `{hostname}-{pid}`.
    pub fn worker_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()))
    }
}

/// Whether `mode` can use `devices` devices; a message saying what to list.
///
/// # Errors
/// The message.
pub fn mode_fits(mode: Parallel, devices: usize) -> Result<(), String> {
    match mode {
        Parallel::Replicate => Ok(()),
        Parallel::Cfg if devices >= 2 && devices.is_multiple_of(2) => Ok(()),
        Parallel::Cfg => Err(format!("CFG pairs the devices up; there are {devices}: list an even number, at least 2")),
        Parallel::Pipeline if devices >= 2 => Ok(()),
        Parallel::Pipeline => Err(format!("a block pipeline needs at least 2 devices; there are {devices}")),
    }
}

/// This machine's name, as the kernel knows it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> WorkerConfig {
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/flowfarm-tiny");
        WorkerConfig {
            token: "t".into(),
            models: vec![ModelEntry { name: "flowfarm-tiny".into(), path: model, ..ModelEntry::default() }],
            ..WorkerConfig::default()
        }
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../../config/worker.toml");
        let config: WorkerConfig = toml::from_str(text).expect("example parses");
        assert_eq!(config.models[0].name, "flowfarm-tiny");
    }

    /// Every key, set from the environment by the rule to a value other
    /// than the file's, takes that value.
    #[test]
    fn every_key_can_be_set_from_the_environment() {
        let text = include_str!("../../../config/worker.toml");
        let mut wanted: WorkerConfig = toml::from_str(text).unwrap();
        wanted.name = Some("gpu-7".into());
        wanted.coordinator = "https://farm:7070".into();
        wanted.token_file = Some("/secrets/token".into());
        wanted.tls_ca_file = Some("/tls/ca".into());
        wanted.tls_cert_file = Some("/tls/crt".into());
        wanted.tls_key_file = Some("/tls/key".into());
        wanted.redis_url = "rediss://redis:6380/0".into();
        wanted.redis_ca_file = Some("/tls/redis-ca".into());
        wanted.results_url = Some("s3://b/p".into());
        wanted.capacity = 3;
        wanted.max_batch = 4;
        wanted.device = "cuda:1".into();
        wanted.drain_timeout_seconds = 12.5;
        wanted.metrics_listen = Some("0.0.0.0:9101".parse().unwrap());
        wanted.models[0].variant = Some("fp16".into());
        wanted.tracing.otlp_endpoint = Some("http://collector:4317".into());
        let env = flowfarm_config::env_for_every_key(&wanted, &ENV_RULE).unwrap();
        assert!(env.iter().any(|(k, _)| k == "FLOWFARM_WORKER__CAPACITY"), "{env:?}");
        assert!(env.iter().any(|(k, _)| k == "FLOWFARM_WORKER__MODELS__0__VARIANT"), "{env:?}");
        let loaded: WorkerConfig = flowfarm_config::from_str(text, Path::new("worker.toml"), env, &ENV_RULE, SECRETS).unwrap();
        assert_eq!(toml::to_string(&loaded).unwrap(), toml::to_string(&wanted).unwrap());
    }

    #[test]
    fn bad_configs_say_what_to_do() {
        base().check().unwrap();
        let mut c = base();
        c.token.clear();
        assert!(c.check().unwrap_err().to_string().contains("FLOWFARM_TOKEN"));
        let mut c = base();
        c.capacity = 0;
        assert!(c.check().unwrap_err().to_string().contains("capacity"));
        let mut c = base();
        c.max_batch = 0;
        assert!(c.check().unwrap_err().to_string().contains("max_batch 0 is outside 1..=16"));
        c.max_batch = 8;
        c.capacity = 9;
        assert!(c.check().unwrap_err().to_string().contains("in batches of max_batch 8, is 72 jobs at once"));
        c.capacity = 8;
        c.check().unwrap();
        assert_eq!((c.slots(1), c.jobs_at_once(1)), (8, 64));
        let mut c = base();
        c.models[0].path = "/nonexistent".into();
        assert!(c.check().unwrap_err().to_string().contains("models[0].path"));
        let mut c = base();
        c.device = "gpu0".into();
        assert!(c.check().unwrap_err().to_string().contains("device: `gpu0` is not `cpu`, `cpu:N`, `cuda` or `cuda:N`"));
        let mut c = base();
        let named = |names: &[&str]| DeviceList::Named(names.iter().map(|n| n.to_string()).collect());
        c.devices = named(&["cpu:0", "cpu:1"]);
        c.check().unwrap();
        assert_eq!(c.device_names(), vec!["cpu:0", "cpu:1"]);
        c.devices = named(&["cpu:0", "cpu:1", "cpu:0"]);
        assert!(c.check().unwrap_err().to_string().contains("devices[2]: `cpu:0` is listed twice"));
        c.devices = named(&["cpu:0", "tpu"]);
        assert!(c.check().unwrap_err().to_string().contains("devices[1]: `tpu` is not"));
        c.devices = named(&["cuda", "cuda:0"]);
        assert!(c.check().unwrap_err().to_string().contains("devices[1]: `cuda:0` is listed twice"), "one GPU, two names");
        c.devices = named(&["cpu:0", "cpu:1"]);
        c.capacity = 40;
        assert!(c.check().unwrap_err().to_string().contains("is 80 jobs at once, more than the 64"));
        c.parallel = "cfg".into();
        c.check().unwrap();
        assert_eq!(c.slots(2), 40, "a pair renders as one");
        c.devices = named(&["cpu:0", "cpu:1", "cpu:2"]);
        c.capacity = 2;
        assert!(c.check().unwrap_err().to_string().contains("there are 3: list an even number"));
        c.parallel = "pipeline".into();
        c.check().unwrap();
        assert_eq!(c.slots(3), 6, "capacity jobs in flight per stage");
        c.devices = named(&["cpu:0"]);
        assert!(c.check().unwrap_err().to_string().contains("parallel = \"pipeline\": a block pipeline needs at least 2 devices"));
        c.parallel = "ring".into();
        assert!(c.check().unwrap_err().to_string().contains("parallel: `ring` is not `replicate`, `cfg` or `pipeline`"));
        // One model's own mode, encoder placement and encoder set.
        let mut c = base();
        c.devices = named(&["cpu:0", "cpu:1"]);
        c.models[0].parallel = Some("pipeline".into());
        c.models.push(ModelEntry { name: "second".into(), ..c.models[0].clone() });
        c.models[1].parallel = Some("cfg".into());
        c.check().unwrap();
        assert_eq!((c.parallel_of(0), c.parallel_of(1)), (Parallel::Pipeline, Parallel::Cfg));
        assert_eq!(c.slots(2), 2, "the largest model's share");
        c.models[1].parallel = Some("rings".into());
        assert!(c.check().unwrap_err().to_string().contains("models[1].parallel: `rings` is not"));
        c.models[1].parallel = None;
        c.models[1].encoders = Some("gpu".into());
        assert!(c.check().unwrap_err().to_string().contains("models[1].encoders: `gpu` is not `same`, `cpu` or `cuda:N`"));
        c.models[1].encoders = Some("cpu".into());
        c.models[1].text_encoders = Some("t5-only".into());
        assert!(c.check().unwrap_err().to_string().contains("models[1].text_encoders: `t5-only` is not `all` or `clip-only`"));
        c.models[1].text_encoders = Some("clip-only".into());
        c.check().unwrap();
        // "all" is a list resolved at start; other words are refused.
        let all: WorkerConfig = toml::from_str("devices = \"all\"\n[[models]]\nname = \"m\"\npath = \".\"\n").unwrap();
        assert_eq!(all.devices, DeviceList::Every("all".into()));
        let list: WorkerConfig = toml::from_str("devices = [\"cuda:0\"]\n[[models]]\nname = \"m\"\npath = \".\"\n").unwrap();
        assert_eq!(list.devices, named(&["cuda:0"]));
        let mut c = base();
        c.devices = DeviceList::Every("every".into());
        assert!(c.check().unwrap_err().to_string().contains("devices: `every` is neither a list of devices nor \"all\""));
        c.devices = DeviceList::Every("all".into());
        c.check().unwrap();
        assert_eq!(base().device_names(), vec!["cpu"], "without `devices`, the one `device`");
        let mut c = base();
        c.dtype = "f64".into();
        assert!(c.check().unwrap_err().to_string().contains("dtype: `f64` is not `f32`, `f16` or `bf16`"));
        let mut c = base();
        c.apply_env(|n| (n == "FLOWFARM_DEVICE").then(|| "cuda:1".into())).unwrap();
        assert_eq!(c.device, "cuda:1");
        c.check().unwrap();
        let mut c = base();
        let err = c.apply_env(|n| (n == "FLOWFARM_METRICS_LISTEN").then(|| "nope".into())).unwrap_err();
        assert!(err.to_string().contains("FLOWFARM_METRICS_LISTEN"));
    }
}
