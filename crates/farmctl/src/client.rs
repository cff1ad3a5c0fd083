//! Connecting to the coordinator, and plain messages for what goes wrong.

use anyhow::{anyhow, Context, Result};
use flowfarm_proto::v1::admin_service_client::AdminServiceClient;
use flowfarm_proto::v1::render_service_client::RenderServiceClient;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerToken(Option<AsciiMetadataValue>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

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
    /// Connects to `server` (`http://host:port`).
    ///
    /// # Errors
    /// A malformed URL or token, or a coordinator that cannot be reached.
    pub async fn connect(server: &str, token: Option<&str>) -> Result<Farm> {
        let endpoint = Endpoint::from_shared(server.to_owned())
            .with_context(|| format!("`{server}` is not a server URL (expected http://host:port)"))?
            .connect_timeout(std::time::Duration::from_secs(5));
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| anyhow!("cannot reach the coordinator at {server}: {e}; is it running? (set --server or FLOWFARM_SERVER)"))?;
        let token = match token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse::<AsciiMetadataValue>()
                    .map_err(|_| anyhow!("the token holds characters a header cannot carry; check --token / FLOWFARM_TOKEN"))?,
            ),
            None => None,
        };
        Ok(Farm { server: server.to_owned(), channel, token: BearerToken(token) })
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
            Code::Unavailable => anyhow!(
                "the coordinator at {} is unavailable: {msg}; is it running? (set --server or FLOWFARM_SERVER)",
                self.server
            ),
            Code::Unimplemented => anyhow!("the coordinator does not implement this yet: {msg}"),
            code => anyhow!("the coordinator failed ({code:?}): {msg}"),
        }
    }
}
