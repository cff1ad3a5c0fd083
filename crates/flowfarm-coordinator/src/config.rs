//! The coordinator's TOML configuration, with environment overrides.
//!
//! Every key can be set from the environment: `FLOWFARM_` then the key's
//! path upper-cased with `__` between parts (`FLOWFARM_LEASES__LEASE_SECONDS`,
//! see `flowfarm-config`). Secrets (the database and Redis passwords) come
//! only from the environment or from files named by `*_file` keys; the short
//! names documented on some keys (`FLOWFARM_LISTEN`, …) apply last.

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
    #[serde(default)]
    pub status: StatusConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub tracing: flowfarm_config::TracingConfig,
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
    /// TLS for the gRPC API; absent: plaintext.
    pub tls: Option<crate::tls::TlsConfig>,
    /// Serve plaintext on an address other machines can reach. Off, a
    /// non-loopback `listen` needs `[server.tls]`.
    pub allow_plaintext: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { listen: SocketAddr::from(([127, 0, 0, 1], 7070)), shutdown_grace_seconds: 10.0, tls: None, allow_plaintext: false }
    }
}

impl ServerConfig {
    /// Refuses to serve plaintext where other machines can reach it, unless
    /// asked to: checked by `flowfarm coordinator` before it listens (other
    /// commands read the same config and serve nothing).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] saying which keys to set.
    pub fn check_exposure(&self) -> Result<(), ConfigError> {
        if self.tls.is_none() && !self.listen.ip().is_loopback() && !self.allow_plaintext {
            return Err(ConfigError::Invalid(format!(
                "server.listen {} is reachable from other machines and server.tls is not set: configure [server.tls] \
                 (cert_file, key_file), or set server.allow_plaintext = true (FLOWFARM_SERVER__ALLOW_PLAINTEXT=true) \
                 to serve plaintext on purpose",
                self.listen
            )));
        }
        Ok(())
    }

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
    /// The password, if `url` has none: a secret, so only from
    /// `FLOWFARM_DATABASE__PASSWORD`, never from the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// A file holding the password (a mounted secret), read at start.
    pub password_file: Option<PathBuf>,
}

impl DatabaseConfig {
    /// The URL to connect with: `url` with the password from `password` or
    /// `password_file` filled in.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] if the password file cannot be read or the URL does not parse.
    pub fn connect_url(&self) -> Result<String, ConfigError> {
        with_password(&self.url, "database", self.password.as_deref(), self.password_file.as_deref())
    }
}

/// `url` with the password from `password` or the file filled in.
fn with_password(url: &str, section: &str, password: Option<&str>, file: Option<&Path>) -> Result<String, ConfigError> {
    let password = match (password, file) {
        (Some(p), _) => p.to_owned(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .map_err(|e| ConfigError::Invalid(format!("{section}.password_file: cannot read {}: {e}", file.display())))?
            .trim_end_matches(['\n', '\r'])
            .to_owned(),
        (None, None) => return Ok(url.to_owned()),
    };
    let mut parsed = url::Url::parse(url).map_err(|e| ConfigError::Invalid(format!("{section}: `{url}` is not a URL ({e})")))?;
    parsed.set_password(Some(&password)).map_err(|()| ConfigError::Invalid(format!("{section}: `{url}` cannot carry a password")))?;
    Ok(parsed.to_string())
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres://postgres@127.0.0.1:5432/flowfarm".into(),
            max_connections: 16,
            password: None,
            password_file: None,
        }
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
    /// The Redis password, if `redis_url` has none: only from
    /// `FLOWFARM_QUEUE__REDIS_PASSWORD`, never from the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_password: Option<String>,
    /// A file holding the Redis password, read at start.
    pub redis_password_file: Option<PathBuf>,
    /// PEM CA certificate(s) a `rediss://` server's certificate must chain
    /// to; absent: the system's roots.
    pub redis_ca_file: Option<PathBuf>,
    /// The work queue lives in this process (`flowfarm dev`): Redis is not
    /// used, so health does not ask it. Set by code, never by a file.
    #[serde(skip)]
    pub in_process: bool,
}

impl QueueConfig {
    /// Where the work streams are (the URL with its password).
    pub fn redis_target(&self) -> flowfarm_queue::RedisTarget {
        flowfarm_queue::RedisTarget { url: self.redis_url.clone(), ca_file: self.redis_ca_file.clone() }
    }

    /// `redis_url` with the password filled in (`rediss://` for TLS).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] if the password file cannot be read.
    pub fn connect_url(&self) -> Result<String, ConfigError> {
        with_password(&self.redis_url, "queue.redis", self.redis_password.as_deref(), self.redis_password_file.as_deref())
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            redis_url: "redis://127.0.0.1:6379/0".into(),
            lookahead_per_worker: 2,
            dispatch_interval_seconds: 0.5,
            redispatch_after_seconds: 30.0,
            redis_password: None,
            redis_password_file: None,
            redis_ca_file: None,
            in_process: false,
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

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StatusConfig {
    /// Where the status page is served (HTTPS with `[server.tls]`, plain
    /// HTTP without); absent: not served. Env: `FLOWFARM_STATUS__LISTEN`.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// When the farm has no live admin token at start, the coordinator makes
    /// one (named `admin`) and writes its secret here, readable by the
    /// owner only. Empty: none is made (create one with `flowfarm token create`).
    pub admin_token_file: PathBuf,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { admin_token_file: PathBuf::from("flowfarm-admin.token") }
    }
}

/// `FLOWFARM_SECTION__KEY`; `FLOWFARM_WORKER__…` is the worker's.
pub const ENV_RULE: flowfarm_config::EnvRule = flowfarm_config::EnvRule { prefix: "FLOWFARM_", needs_separator: true, others: &["WORKER"] };

/// Keys that hold secrets.
pub const SECRETS: &[flowfarm_config::Secret] = &[
    flowfarm_config::Secret { key: "database.password", instead: "set FLOWFARM_DATABASE__PASSWORD or database.password_file", url: false },
    flowfarm_config::Secret {
        key: "database.url",
        instead: "leave the password out of the URL and set FLOWFARM_DATABASE__PASSWORD or database.password_file",
        url: true,
    },
    flowfarm_config::Secret {
        key: "queue.redis_password",
        instead: "set FLOWFARM_QUEUE__REDIS_PASSWORD or queue.redis_password_file",
        url: false,
    },
    flowfarm_config::Secret {
        key: "queue.redis_url",
        instead: "leave the password out of the URL and set FLOWFARM_QUEUE__REDIS_PASSWORD or queue.redis_password_file",
        url: true,
    },
];

/// A config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Layer(#[from] flowfarm_config::ConfigError),
    #[error("environment variable {name}: {reason}")]
    Env { name: &'static str, reason: String },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Refuses to serve the API or the status page in plaintext where other
    /// machines can reach them, unless asked to: checked by `flowfarm
    /// coordinator` before it listens (other commands read the same config
    /// and serve nothing).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] saying which keys to set.
    pub fn check_exposure(&self) -> Result<(), ConfigError> {
        self.server.check_exposure()?;
        match self.status.listen {
            Some(addr) if self.server.tls.is_none() && !addr.ip().is_loopback() && !self.server.allow_plaintext => {
                Err(ConfigError::Invalid(format!(
                    "status.listen {addr} is reachable from other machines and server.tls is not set: the status page \
                     takes tokens, so configure [server.tls] (cert_file, key_file), or set server.allow_plaintext = true \
                     (FLOWFARM_SERVER__ALLOW_PLAINTEXT=true) to serve plaintext on purpose"
                )))
            }
            _ => Ok(()),
        }
    }

    /// Reads a TOML file, then applies the environment (every key by the
    /// `FLOWFARM_SECTION__KEY` rule, then the short names), fills in the
    /// passwords, then checks it.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, key or variable at fault.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = flowfarm_config::load(path, std::env::vars(), &ENV_RULE, SECRETS)?;
        config.apply_env(|name| std::env::var(name).ok())?;
        // The URLs used from here on carry their passwords (shown masked).
        config.database.url = config.database.connect_url()?;
        config.queue.redis_url = config.queue.connect_url()?;
        config.check()?;
        Ok(config)
    }

    /// The configuration as TOML with its secrets masked (`flowfarm config print`).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] if a value cannot be shown as TOML.
    pub fn to_masked_toml(&self) -> Result<String, ConfigError> {
        flowfarm_config::to_masked_toml(self, SECRETS).map_err(|e| ConfigError::Invalid(format!("showing the config: {e}")))
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
        if let Some(tls) = &self.server.tls {
            tls.check().map_err(ConfigError::Invalid)?;
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

    /// Every key, set from the environment by the rule to a value other
    /// than the file's, takes that value; none is left out.
    #[test]
    fn every_key_can_be_set_from_the_environment() {
        let mut wanted: Config = toml::from_str(EXAMPLE).unwrap();
        // Values unlike the file's, so that a variable that is ignored shows.
        wanted.server.listen = "0.0.0.0:9999".parse().unwrap();
        wanted.server.shutdown_grace_seconds = 3.5;
        wanted.server.allow_plaintext = true;
        wanted.server.tls = Some(crate::tls::TlsConfig {
            cert_file: "/tls/crt".into(),
            key_file: "/tls/key".into(),
            client_ca_file: "/tls/ca".into(),
            require_worker_certificates: true,
        });
        wanted.database.url = "postgres://u@db:5432/farm".into();
        wanted.database.password_file = Some("/secrets/db".into());
        wanted.leases.lease_seconds = 45;
        wanted.limits.max_steps = 77;
        wanted.results.url = Some("s3://bucket/prefix".into());
        wanted.queue.redis_url = "rediss://redis:6380/1".into();
        wanted.queue.redis_ca_file = Some("/tls/redis-ca".into());
        wanted.metrics.listen = Some("0.0.0.0:9100".parse().unwrap());
        wanted.auth.admin_token_file = "/var/lib/flowfarm/admin.token".into();
        wanted.models[0].default_steps = 12;
        wanted.tracing.otlp_endpoint = Some("http://collector:4317".into());
        wanted.tracing.service_name = Some("farm-a".into());
        let env = flowfarm_config::env_for_every_key(&wanted, &ENV_RULE).unwrap();
        assert!(env.iter().any(|(k, _)| k == "FLOWFARM_LEASES__LEASE_SECONDS"), "{env:?}");
        assert!(env.iter().any(|(k, _)| k == "FLOWFARM_SERVER__TLS__REQUIRE_WORKER_CERTIFICATES"), "{env:?}");
        assert!(env.iter().any(|(k, _)| k == "FLOWFARM_MODELS__0__DEFAULT_STEPS"), "{env:?}");
        let loaded: Config = flowfarm_config::from_str(EXAMPLE, Path::new("flowfarm.toml"), env, &ENV_RULE, SECRETS).unwrap();
        assert_eq!(toml::to_string(&loaded).unwrap(), toml::to_string(&wanted).unwrap());
    }

    #[test]
    fn secrets_stay_out_of_the_file_and_out_of_what_is_shown() {
        let with_password = EXAMPLE.replace("postgres://postgres@127.0.0.1", "postgres://postgres:hunter2@127.0.0.1");
        let err = flowfarm_config::from_str::<Config>(&with_password, Path::new("f.toml"), [], &ENV_RULE, SECRETS).unwrap_err();
        assert!(err.to_string().contains("database.url") && err.to_string().contains("FLOWFARM_DATABASE__PASSWORD"), "{err}");
        let env = [("FLOWFARM_DATABASE__PASSWORD".to_owned(), "hunter2".to_owned())];
        let mut config: Config = flowfarm_config::from_str(EXAMPLE, Path::new("f.toml"), env, &ENV_RULE, SECRETS).unwrap();
        config.database.url = config.database.connect_url().unwrap();
        assert_eq!(config.database.url, "postgres://postgres:hunter2@127.0.0.1:5432/flowfarm");
        let shown = config.to_masked_toml().unwrap();
        assert!(!shown.contains("hunter2") && shown.contains("postgres://postgres:***@127.0.0.1"), "{shown}");
    }

    #[test]
    fn plaintext_off_the_loopback_must_be_asked_for() {
        let mut config: Config = toml::from_str(EXAMPLE).unwrap();
        config.server.listen = "0.0.0.0:7070".parse().unwrap();
        config.check().expect("other commands than `coordinator` may read it");
        let err = config.server.check_exposure().unwrap_err().to_string();
        assert!(err.contains("server.tls") && err.contains("allow_plaintext"), "{err}");
        config.server.allow_plaintext = true;
        config.server.check_exposure().unwrap();
        config.server.allow_plaintext = false;
        config.server.listen = "127.0.0.1:7070".parse().unwrap();
        config.check_exposure().unwrap();
        config.status.listen = Some("0.0.0.0:8080".parse().unwrap());
        let err = config.check_exposure().unwrap_err().to_string();
        assert!(err.contains("status.listen") && err.contains("allow_plaintext"), "{err}");
        config.server.tls = Some(crate::tls::TlsConfig { cert_file: "c".into(), key_file: "k".into(), ..Default::default() });
        config.check_exposure().expect("the status page is served over the server's TLS");
        config.server.tls = Some(crate::tls::TlsConfig { cert_file: "c".into(), ..Default::default() });
        assert!(config.check().unwrap_err().to_string().contains("key_file"));
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
