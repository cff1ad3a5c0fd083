//! TLS for the gRPC server: rustls with the certificate and key from files,
//! reloaded on SIGHUP without dropping a connection, and optional client
//! certificates (mutual TLS) that bind a worker to its token.
//!
//! Why our own acceptor rather than tonic's `ServerTlsConfig`: tonic builds
//! its rustls config once, so a renewed certificate (cert-manager, ACME)
//! would need a restart. Here every new connection takes the config current
//! at its handshake; connections already open keep theirs.
//!
//! Invariant: with `require_worker_certificates`, every WorkerService call
//! comes over a connection whose client certificate chains to
//! `client_ca_file` and names the caller's token (as a DNS name).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::TaskTracker;
use tonic::Status;

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `[server.tls]`: absent, the server speaks plaintext.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, the server's certificate first.
    pub cert_file: PathBuf,
    /// PEM private key of the certificate (a file, so never in the config).
    pub key_file: PathBuf,
    /// PEM CA certificates client certificates must chain to; empty: clients
    /// are not asked for certificates.
    pub client_ca_file: PathBuf,
    /// Workers must present a client certificate from `client_ca_file`
    /// whose DNS name (subjectAltName) is their token's name.
    pub require_worker_certificates: bool,
}

impl TlsConfig {
    /// Checks the keys that belong together.
    ///
    /// # Errors
    /// The key at fault, in words.
    pub fn check(&self) -> Result<(), String> {
        if self.cert_file.as_os_str().is_empty() || self.key_file.as_os_str().is_empty() {
            return Err("server.tls: cert_file and key_file are both needed".into());
        }
        if self.require_worker_certificates && self.client_ca_file.as_os_str().is_empty() {
            return Err(
                "server.tls.require_worker_certificates needs server.tls.client_ca_file (the CA of the workers' certificates)".into()
            );
        }
        Ok(())
    }
}

/// A TLS setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("server.tls: cannot read {what} from {path}: {reason}")]
    Read { what: &'static str, path: PathBuf, reason: String },
    #[error("server.tls: {0}")]
    Rustls(String),
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_error = |reason: String| TlsError::Read { what, path: path.to_owned(), reason };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_error(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(read_error("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// The crypto every TLS config of flowfarm uses.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn build(settings: &TlsConfig) -> Result<ServerConfig, TlsError> {
    let certs = read_certs("the certificate chain (cert_file)", &settings.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&settings.key_file).map_err(|e| TlsError::Read {
        what: "the private key (key_file)",
        path: settings.key_file.clone(),
        reason: e.to_string(),
    })?;
    let provider = crypto_provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = if settings.client_ca_file.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for ca in read_certs("the client CA (client_ca_file)", &settings.client_ca_file)? {
            roots.add(ca).map_err(|e| TlsError::Rustls(format!("client_ca_file: {e}")))?;
        }
        // Certificates are checked when presented; whether one is required
        // is the service's decision (workers with mTLS on, not farmctl users).
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Rustls(format!("client_ca_file: {e}")))?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| TlsError::Rustls(format!("cert_file and key_file: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The server's TLS settings, reloadable.
#[derive(Debug)]
pub struct ServerTls {
    settings: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    /// Reads the certificate, key and client CA.
    ///
    /// # Errors
    /// [`TlsError`] naming the file that cannot be used.
    pub fn load(settings: &TlsConfig) -> Result<Arc<ServerTls>, TlsError> {
        settings.check().map_err(TlsError::Rustls)?;
        let config = build(settings)?;
        Ok(Arc::new(ServerTls { settings: settings.clone(), current: RwLock::new(Arc::new(config)) }))
    }

    /// Reads the files again; new connections use them, open ones keep
    /// theirs. On error the previous settings stay.
    ///
    /// # Errors
    /// [`TlsError`] naming the file that cannot be used.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = build(&self.settings)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        Ok(())
    }

    pub fn requires_worker_certificates(&self) -> bool {
        self.settings.require_worker_certificates
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// The TLS connections of `listener`, each handshaken on its own task
    /// (on `tasks`) so a slow client holds up nobody; ends when the server
    /// drops it.
    pub(crate) fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
        tasks: &TaskTracker,
    ) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let handshakes = tasks.clone();
        tasks.spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            // Out of file descriptors and the like: wait, then go on.
                            tracing::warn!(error = %e, "accepting a connection failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    () = tx.closed() => return,
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = self.acceptor();
                let tx = tx.clone();
                handshakes.spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake refused"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// Reloads `tls` on every SIGHUP until `stopped` resolves. Without TLS the
/// signal is only logged: a reload signal must never stop the coordinator.
pub async fn reload_on_sighup(tls: Option<Arc<ServerTls>>, stopped: impl std::future::Future<Output = ()>) {
    #[cfg(unix)]
    {
        let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS files are not reloaded");
                return;
            }
        };
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                _ = hangups.recv() => match tls.as_ref().map(|t| t.reload()) {
                    Some(Ok(())) => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
                    Some(Err(e)) => tracing::error!(error = %e, "SIGHUP: TLS files not reloaded; the previous ones stay in use"),
                    None => tracing::info!("SIGHUP: nothing to reload (no server.tls)"),
                },
                () = &mut stopped => return,
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tls;
        stopped.await;
    }
}

/// Checks the client certificate of a worker's connection against its
/// token's name: the certificate (already verified against the client CA in
/// the handshake) must be valid for that name as a DNS name.
///
/// # Errors
/// UNAUTHENTICATED without a certificate or with one for another name.
pub fn check_worker_certificate(peer_certs: Option<&[CertificateDer<'static>]>, token_name: &str) -> Result<(), Status> {
    let leaf = peer_certs.and_then(|c| c.first()).ok_or_else(|| {
        Status::unauthenticated(
            "this coordinator requires workers to present a client certificate (worker config tls_cert_file and tls_key_file)",
        )
    })?;
    let name = ServerName::try_from(token_name).map_err(|_| {
        Status::unauthenticated(format!(
            "token name `{token_name}` is not a DNS name, so no certificate can be bound to it; use a token named like a host"
        ))
    })?;
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
    cert.verify_is_valid_for_subject_name(&name).map_err(|_| {
        Status::unauthenticated(format!(
            "the client certificate is not issued to `{token_name}`; a worker's certificate must name its token (subjectAltName DNS)"
        ))
    })
}
