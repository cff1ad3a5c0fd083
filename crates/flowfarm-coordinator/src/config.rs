//! The coordinator's TOML configuration, with environment overrides.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flowfarm_core::{Limits, ModelConfig, ModelRegistry};
use serde::{Deserialize, Serialize};

/// Everything a coordinator needs to run. Every section and key has a
/// default except `[[models]]`; see `config/flowfarm.toml` for an example.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub leases: LeaseConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub results: ResultsConfig,
    #[serde(default)]
    pub queue: QueueConfig,
    #[serde(default)]
    pub retries: RetryConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The models this farm serves.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the gRPC server listens on. Env: `FLOWFARM_LISTEN`.
    pub listen: SocketAddr,
    /// On shutdown, how long running calls and open streams may go on
    /// before their connections are closed.
    pub shutdown_grace_seconds: f64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { listen: SocketAddr::from(([127, 0, 0, 1], 7070)), shutdown_grace_seconds: 10.0 }
    }
}

impl ServerConfig {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_grace_seconds)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Postgres URL. Env: `FLOWFARM_DATABASE_URL` (or `DATABASE_URL`).
    pub url: String,
    /// Pool size.
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig { url: "postgres://postgres@127.0.0.1:5432/flowfarm".into(), max_connections: 16 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaseConfig {
    /// Length of a job lease granted by StartJob and renewed by reports.
    pub lease_seconds: u32,
    /// How often workers are told to send heartbeats.
    pub heartbeat_interval_seconds: u32,
    /// A worker silent for longer is marked lost.
    pub worker_timeout_seconds: u32,
    /// How often the reaper looks for expired leases and silent workers.
    pub reaper_interval_seconds: f64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig { lease_seconds: 30, heartbeat_interval_seconds: 10, worker_timeout_seconds: 60, reaper_interval_seconds: 5.0 }
    }
}

impl LeaseConfig {
    pub fn lease(&self) -> Duration {
        Duration::from_secs(u64::from(self.lease_seconds))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResultsConfig {
    /// Folder of the local results store; result keys are paths below it.
    /// Env: `FLOWFARM_RESULTS_DIR`.
    pub dir: PathBuf,
    /// An S3-compatible bucket instead of the folder: `s3://bucket[/prefix]`,
    /// endpoint and credentials from the `AWS_*` variables. Env: `FLOWFARM_RESULTS_URL`.
    pub url: Option<String>,
    /// How often objects no success recorded (a worker killed between its
    /// upload and its report, a purged job) are removed, once 10 minutes
    /// old; 0 turns the sweep off.
    pub sweep_interval_seconds: f64,
}

impl Default for ResultsConfig {
    fn default() -> Self {
        ResultsConfig { dir: PathBuf::from("results"), url: None, sweep_interval_seconds: 300.0 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Redis holding the work streams. Env: `FLOWFARM_REDIS_URL`.
    pub redis_url: String,
    /// Jobs dispatched beyond the fleet's free slots, per active worker, so
    /// that a worker finds its next job waiting. The rest stays queued in
    /// Postgres, where priorities, pauses and cancels act on it.
    pub lookahead_per_worker: u32,
    /// How often the dispatcher looks for work when nothing wakes it
    /// (submissions and finished jobs on this coordinator wake it at once).
    pub dispatch_interval_seconds: f64,
    /// A job dispatched but not started for this long is dispatched again
    /// (its message may be lost); stream messages unacknowledged for this
    /// long are swept.
    pub redispatch_after_seconds: f64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            redis_url: "redis://127.0.0.1:6379/0".into(),
            lookahead_per_worker: 2,
            dispatch_interval_seconds: 0.5,
            redispatch_after_seconds: 30.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// A retried job waits base · 2^(n−1) seconds after its n-th failed
    /// attempt (times a random factor in [0.5, 1]) …
    pub backoff_base_seconds: f64,
    /// … and never more than this.
    pub backoff_max_seconds: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig { backoff_base_seconds: 2.0, backoff_max_seconds: 120.0 }
    }
}

impl RetryConfig {
    pub fn backoff(&self) -> flowfarm_store::RetryBackoff {
        flowfarm_store::RetryBackoff {
            base: Duration::from_secs_f64(self.backoff_base_seconds),
            max: Duration::from_secs_f64(self.backoff_max_seconds),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where Prometheus /metrics is served (plain HTTP); absent: not served.
    /// Env: `FLOWFARM_METRICS_LISTEN`.
    pub listen: Option<SocketAddr>,
}

/// A config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("environment variable {name}: {reason}")]
    Env { name: &'static str, reason: String },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML file, then applies environment overrides, then checks it.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, key or variable at fault.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let mut config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
        config.apply_env(|name| std::env::var(name).ok())?;
        config.check()?;
        Ok(config)
    }

    /// Applies `FLOWFARM_LISTEN`, `FLOWFARM_DATABASE_URL` (else `DATABASE_URL`),
    /// `FLOWFARM_RESULTS_DIR`, `FLOWFARM_REDIS_URL` and
    /// `FLOWFARM_METRICS_LISTEN`, read through `var`.
    ///
    /// # Errors
    /// [`ConfigError::Env`] for a listen address that does not parse.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(listen) = var("FLOWFARM_LISTEN") {
            self.server.listen = listen
                .parse()
                .map_err(|e| ConfigError::Env { name: "FLOWFARM_LISTEN", reason: format!("`{listen}` is not a socket address ({e})") })?;
        }
        if let Some(url) = var("FLOWFARM_DATABASE_URL").or_else(|| var("DATABASE_URL")) {
            self.database.url = url;
        }
        if let Some(dir) = var("FLOWFARM_RESULTS_DIR") {
            self.results.dir = dir.into();
        }
        if let Some(url) = var("FLOWFARM_RESULTS_URL") {
            self.results.url = Some(url).filter(|u| !u.is_empty());
        }
        if let Some(url) = var("FLOWFARM_REDIS_URL") {
            self.queue.redis_url = url;
        }
        if let Some(listen) = var("FLOWFARM_METRICS_LISTEN") {
            self.metrics.listen = Some(listen.parse().map_err(|e| ConfigError::Env {
                name: "FLOWFARM_METRICS_LISTEN",
                reason: format!("`{listen}` is not a socket address ({e})"),
            })?);
        }
        Ok(())
    }

    /// Checks what serde cannot: the registry, lease timings, limits.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] saying which key is wrong.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.registry()?;
        let sweep = self.results.sweep_interval_seconds;
        if !(sweep.is_finite() && (sweep == 0.0 || (1.0..=86_400.0).contains(&sweep))) {
            return Err(ConfigError::Invalid(format!("results.sweep_interval_seconds: {sweep} must be 0 (off) or between 1 and 86400")));
        }
        if self.models.is_empty() {
            return Err(ConfigError::Invalid("models: at least one [[models]] entry is needed".into()));
        }
        let l = &self.leases;
        if l.lease_seconds == 0 || l.heartbeat_interval_seconds == 0 {
            return Err(ConfigError::Invalid("leases: lease_seconds and heartbeat_interval_seconds must be positive".into()));
        }
        if l.heartbeat_interval_seconds >= l.lease_seconds {
            return Err(ConfigError::Invalid(format!(
                "leases.heartbeat_interval_seconds ({}) must be shorter than leases.lease_seconds ({}), or leases expire between heartbeats",
                l.heartbeat_interval_seconds, l.lease_seconds
            )));
        }
        if !(l.reaper_interval_seconds.is_finite() && l.reaper_interval_seconds > 0.0) {
            return Err(ConfigError::Invalid("leases.reaper_interval_seconds must be positive".into()));
        }
        let limits = &self.limits;
        if limits.max_batch_jobs == 0 || limits.max_steps == 0 || limits.max_attempts == 0 {
            return Err(ConfigError::Invalid("limits: max_batch_jobs, max_steps and max_attempts must be positive".into()));
        }
        let guidance_range_ok =
            limits.min_guidance.is_finite() && limits.max_guidance.is_finite() && limits.min_guidance <= limits.max_guidance;
        if !guidance_range_ok {
            return Err(ConfigError::Invalid("limits.min_guidance and max_guidance must be finite, min ≤ max".into()));
        }
        let grace = self.server.shutdown_grace_seconds;
        if !(grace.is_finite() && (0.0..=3600.0).contains(&grace)) {
            return Err(ConfigError::Invalid("server.shutdown_grace_seconds must be within 0..=3600".into()));
        }
        let q = &self.queue;
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(q.dispatch_interval_seconds) || !positive(q.redispatch_after_seconds) {
            return Err(ConfigError::Invalid("queue.dispatch_interval_seconds and queue.redispatch_after_seconds must be positive".into()));
        }
        let r = &self.retries;
        let ok = r.backoff_base_seconds.is_finite()
            && r.backoff_base_seconds >= 0.0
            && r.backoff_max_seconds.is_finite()
            && r.backoff_max_seconds >= r.backoff_base_seconds;
        if !ok {
            return Err(ConfigError::Invalid("retries: need 0 ≤ backoff_base_seconds ≤ backoff_max_seconds".into()));
        }
        if self.database.max_connections == 0 {
            return Err(ConfigError::Invalid("database.max_connections must be positive".into()));
        }
        Ok(())
    }

    /// The model registry built from `[[models]]`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the model at fault.
    pub fn registry(&self) -> Result<ModelRegistry, ConfigError> {
        ModelRegistry::new(self.models.clone()).map_err(|e| ConfigError::Invalid(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../config/flowfarm.toml");

    #[test]
    fn example_config_is_valid() {
        let config: Config = toml::from_str(EXAMPLE).expect("example parses");
        config.check().expect("example is valid");
        assert!(config.registry().unwrap().get("sd3-medium").is_some());
    }

    #[test]
    fn env_overrides_apply() {
        let mut config: Config = toml::from_str(EXAMPLE).unwrap();
        config
            .apply_env(|name| match name {
                "FLOWFARM_LISTEN" => Some("0.0.0.0:9000".into()),
                "DATABASE_URL" => Some("postgres://x@y/z".into()),
                _ => None,
            })
            .unwrap();
        assert_eq!(config.server.listen.port(), 9000);
        assert_eq!(config.database.url, "postgres://x@y/z");
        let err = config.apply_env(|name| (name == "FLOWFARM_LISTEN").then(|| "nope".into())).unwrap_err();
        assert!(err.to_string().contains("FLOWFARM_LISTEN"));
    }

    #[test]
    fn bad_configs_say_which_key() {
        let mut config: Config = toml::from_str(EXAMPLE).unwrap();
        config.leases.heartbeat_interval_seconds = 60;
        assert!(config.check().unwrap_err().to_string().contains("heartbeat_interval_seconds"));
        let unknown = format!("{EXAMPLE}\n[server2]\nx = 1\n");
        assert!(toml::from_str::<Config>(&unknown).unwrap_err().to_string().contains("server2"));
    }
}
