//! What every client of the API needs: the bearer token on each call, and a
//! channel to the coordinator over plaintext or TLS (optionally with a client
//! certificate, for coordinators that bind workers to certificates).
//! Shared by the worker, `farmctl` and the tests.

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

/// Adds `authorization: Bearer <token>` to every call (nothing without a token).
#[derive(Debug, Clone, Default)]
pub struct BearerToken(Option<AsciiMetadataValue>);

impl BearerToken {
    /// The interceptor for `token`.
    ///
    /// # Errors
    /// [`ClientError::Token`] if the token holds characters a header cannot carry.
    pub fn new(token: &str) -> Result<Self, ClientError> {
        let value = format!("Bearer {}", token.trim()).parse::<AsciiMetadataValue>().map_err(|_| ClientError::Token)?;
        Ok(BearerToken(Some(value)))
    }

    /// No token: calls go without one (and are refused as UNAUTHENTICATED).
    pub fn none() -> Self {
        BearerToken(None)
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// TLS settings of a client; all empty: the system's roots for `https://`.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// PEM CA certificates to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and its key, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name the server's certificate must carry, when the URL's host is not it.
    pub domain: Option<String>,
}

impl ClientTls {
    fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.cert_file.is_none() && self.key_file.is_none() && self.domain.is_none()
    }
}

/// A client setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("`{url}` is not a server URL (expected http://host:port, or https://host:port for TLS): {reason}")]
    Url { url: String, reason: String },
    #[error("TLS settings are given but `{0}` is plaintext; use https://")]
    TlsOnPlaintext(String),
    #[error("cannot read {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("a client certificate needs its key, and a key its certificate")]
    HalfIdentity,
    #[error("TLS: {0}")]
    Tls(String),
    #[error("the token holds characters a header cannot carry")]
    Token,
}

fn read(what: &'static str, path: &PathBuf) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::Read { what, path: path.clone(), source })
}

/// An endpoint for `url` (`http://` plaintext, `https://` TLS with `tls`),
/// with a 5 s connect timeout and TCP_NODELAY.
///
/// # Errors
/// [`ClientError`] naming the setting at fault.
pub fn endpoint(url: &str, tls: &ClientTls) -> Result<Endpoint, ClientError> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| ClientError::Url { url: url.to_owned(), reason: e.to_string() })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    match url.split_once("://").map(|(scheme, _)| scheme.to_ascii_lowercase()).as_deref() {
        Some("https") => {}
        Some("http") if tls.is_empty() => return Ok(endpoint),
        Some("http") => return Err(ClientError::TlsOnPlaintext(url.to_owned())),
        _ => return Err(ClientError::Url { url: url.to_owned(), reason: "the scheme must be http or https".into() }),
    }
    let mut config = ClientTlsConfig::new();
    config = match &tls.ca_file {
        Some(ca) => config.ca_certificate(Certificate::from_pem(read("the CA certificate", ca)?)),
        None => config.with_native_roots(),
    };
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            config = config.identity(Identity::from_pem(read("the client certificate", cert)?, read("the client key", key)?));
        }
        (None, None) => {}
        _ => return Err(ClientError::HalfIdentity),
    }
    if let Some(domain) = &tls.domain {
        config = config.domain_name(domain.clone());
    }
    endpoint.tls_config(config).map_err(|e| ClientError::Tls(e.to_string()))
}
