//! Connecting to the coordinator, and plain messages for what goes wrong.

use anyhow::{anyhow, Result};
use flowfarm_proto::client::{endpoint, BearerToken, ClientError, ClientTls};
use flowfarm_proto::v1::admin_service_client::AdminServiceClient;
use flowfarm_proto::v1::render_service_client::RenderServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

pub type Render = RenderServiceClient<InterceptedService<Channel, BearerToken>>;
pub type Admin = AdminServiceClient<InterceptedService<Channel, BearerToken>>;

/// A connection to one coordinator.
pub struct Farm {
    pub server: String,
    channel: Channel,
    token: BearerToken,
}

const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

impl Farm {
    /// Connects to `server` (`http://host:port`, or `https://host:port` with `tls`).
    ///
    /// # Errors
    /// A malformed URL, token or TLS setting, or a coordinator that cannot be reached.
    pub async fn connect(server: &str, token: Option<&str>, tls: &ClientTls) -> Result<Farm> {
        let endpoint = endpoint(server, tls).map_err(|e| match e {
            ClientError::Token | ClientError::HalfIdentity | ClientError::TlsOnPlaintext(_) => anyhow!("{e} (--ca, --cert, --key)"),
            e => anyhow!("{e} (--server / FLOWFARM_SERVER, --ca / FLOWFARM_CA)"),
        })?;
        let channel = endpoint.connect().await.map_err(|e| {
            let mut cause = String::new();
            let mut source: Option<&dyn std::error::Error> = Some(&e);
            while let Some(err) = source {
                cause = err.to_string();
                source = err.source();
            }
            let hint = if server.starts_with("https://") {
                "is it running, and does --ca / FLOWFARM_CA hold the CA of its certificate?"
            } else {
                "is it running? If it serves TLS, use https:// and --ca"
            };
            anyhow!("cannot reach the coordinator at {server}: {cause}; {hint} (set --server or FLOWFARM_SERVER)")
        })?;
        let token = match token {
            Some(t) => BearerToken::new(t)
                .map_err(|_| anyhow!("the token holds characters a header cannot carry; check --token / FLOWFARM_TOKEN"))?,
            None => BearerToken::none(),
        };
        Ok(Farm { server: server.to_owned(), channel, token })
    }

    pub fn render(&self) -> Render {
        RenderServiceClient::with_interceptor(self.channel.clone(), self.token.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn admin(&self) -> Admin {
        AdminServiceClient::with_interceptor(self.channel.clone(), self.token.clone())
    }

    /// Turns a gRPC status into a message that says what to do.
    pub fn explain(&self, status: Status) -> anyhow::Error {
        let msg = status.message();
        match status.code() {
            Code::Unauthenticated => anyhow!(
                "the coordinator refused the token: {msg}\n  set --token or FLOWFARM_TOKEN (create one with `flowfarm token create --role submit`)"
            ),
            Code::PermissionDenied => anyhow!("not allowed: {msg}"),
            Code::InvalidArgument => anyhow!("invalid request: {msg}"),
            Code::NotFound => anyhow!("not found: {msg}"),
            Code::AlreadyExists => anyhow!("conflict: {msg}"),
            Code::FailedPrecondition => anyhow!("refused: {msg}"),
            Code::ResourceExhausted => anyhow!("over quota: {msg}\n  ask an admin to raise the token's quota (`farmctl tokens create` sets quotas)"),
            Code::Unavailable => anyhow!(
                "the coordinator at {} is unavailable: {msg}; is it running? (set --server or FLOWFARM_SERVER)",
                self.server
            ),
            Code::Unimplemented => anyhow!("the coordinator does not implement this yet: {msg}"),
            // The connection broke below gRPC: most often plaintext spoken to a
            // TLS server. (farmctl cancels nothing itself, so CANCELLED is that too.)
            Code::Cancelled => anyhow!(
                "cannot reach the coordinator at {}: the connection was closed ({msg}); if it serves TLS, use https:// and --ca (set --server or FLOWFARM_SERVER)",
                self.server
            ),
            Code::Internal | Code::Unknown if msg.contains("h2 protocol error") || msg.contains("transport error") => anyhow!(
                "cannot reach the coordinator at {}: {msg}; if it serves TLS, use https:// and --ca (set --server or FLOWFARM_SERVER)",
                self.server
            ),
            code => anyhow!("the coordinator failed ({code:?}): {msg}"),
        }
    }
}
