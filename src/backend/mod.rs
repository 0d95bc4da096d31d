//! Backends: where a shard runs. Each encodes one
//! [`ShardRequest`] in its own wire form and turns it into the shard's framed
//! byte stream; decoding and accounting are shared in [`crate::dispatch`].

pub mod errors;
pub mod lambda;
pub mod microvm;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::protocol::{ShardId, ShardRequest};

pub use lambda::{LambdaBackend, LambdaOptions};
pub use microvm::{MicrovmBackend, MicrovmOptions};

/// One attempt at running one shard.
#[derive(Debug, Clone)]
pub struct ShardInvocation {
    /// Which shard.
    pub shard: ShardId,
    /// 1-based attempt number; each attempt gets a new tenant id.
    pub attempt: u32,
    /// The run this shard belongs to.
    pub run_id: String,
    /// The request, encoded only by the backend (the edge), in its own wire form.
    pub request: ShardRequest,
}

/// The shard's response: chunks of the frame stream, in order.
pub type ShardStream = BoxStream<'static, Result<Bytes, StreamError>>;

/// The seam every backend implements.
pub trait Backend: Send + Sync {
    /// Starts the shard; resolves once the backend accepted it.
    fn invoke<'a>(
        &'a self,
        invocation: &'a ShardInvocation,
    ) -> BoxFuture<'a, Result<ShardStream, InvokeError>>;

    /// Releases everything the backend still holds (MicroVMs that must not
    /// outlive the run, started or still being started); called once at the
    /// end, after an interruption too. Says what it ended, for the summary.
    fn shutdown(&self) -> BoxFuture<'_, Released> {
        Box::pin(async { Released::default() })
    }

    /// What becomes of a shard interrupted while it ran here, in words that
    /// follow "interrupted; " in the summary.
    fn interrupted(&self) -> &'static str {
        "its result never arrived"
    }

    /// What may still be running now (named for the user), should the
    /// invoker have to give up before [`Backend::shutdown`] is through.
    fn unfinished(&self) -> Vec<String> {
        Vec::new()
    }
}

/// What [`Backend::shutdown`] found still out there and did about it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Released {
    /// What it ended, each named with its shard (`mvm-… (shard 2/3)`).
    pub terminated: Vec<String>,
    /// What it could not end, with why: these may still be running.
    pub failed: Vec<String>,
}

/// Why an AWS client could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum LambdaConfigError {
    /// No region anywhere.
    #[error("no AWS region is configured: pass --region or set AWS_REGION")]
    NoRegion,
    /// No usable credentials.
    #[error("no AWS credentials found: configure them as for the AWS CLI (environment variables, a profile, SSO, or a role such as the workflow's configure-aws-credentials step)")]
    NoCredentials,
    /// The function's ARN names another region than the one configured.
    #[error("function {function} is in region {arn_region}, but the region is {region}: pass --region {arn_region}")]
    RegionMismatch {
        /// The function's ARN.
        function: String,
        /// The region in the ARN.
        arn_region: String,
        /// The region configured.
        region: String,
    },
    /// The HTTP client could not be set up.
    #[error("cannot set up the HTTP client: {0}")]
    Http(String),
}

/// Loads region and credentials as the AWS CLI does (or fixed placeholders
/// for the local emulator) and checks both now, so that a configuration
/// problem is reported before anything runs.
pub async fn load_aws_config(
    endpoint_url: Option<&str>,
    region: Option<&str>,
    local_credentials: bool,
) -> Result<aws_config::SdkConfig, LambdaConfigError> {
    use aws_credential_types::provider::ProvideCredentials;
    use aws_sdk_lambda::config::{Credentials, Region};
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    if local_credentials {
        loader = loader
            .credentials_provider(Credentials::new(
                "local",
                "local",
                None,
                None,
                "mvm-shard-local",
            ))
            .region(Region::new("us-east-1"));
    }
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_string()));
    }
    let shared = loader.load().await;
    if shared.region().is_none() {
        return Err(LambdaConfigError::NoRegion);
    }
    let provider = shared
        .credentials_provider()
        .ok_or(LambdaConfigError::NoCredentials)?;
    // The provider chain's own error is not shown: a malformed profile's
    // complaint may quote the file, keys included.
    provider
        .provide_credentials()
        .await
        .map_err(|_| LambdaConfigError::NoCredentials)?;
    Ok(shared)
}

/// How a failed start should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvokeErrorKind {
    /// The service refused for capacity (429): retry later.
    Throttled,
    /// A passing failure (5xx, connection): retry.
    Transient,
    /// Retrying will not help this shard (a request the backend cannot use).
    Fatal,
    /// The configuration is wrong (missing function, denied, bad
    /// credentials, unreachable endpoint): no shard can run, so the run stops
    /// at the first such answer (exit 2).
    Config,
}

/// A shard that could not be started.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct InvokeError {
    /// Retry or not.
    pub kind: InvokeErrorKind,
    /// What the service said.
    pub message: String,
}

/// A shard stream that broke after it started.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StreamError {
    /// The function itself failed (`InvokeComplete.ErrorCode`).
    #[error("function error {code}: {details}")]
    Function {
        /// Lambda's error type, e.g. `Runtime.ExitError`.
        code: String,
        /// Its details.
        details: String,
    },
    /// The connection or the stream's encoding failed.
    #[error("response stream failed: {0}")]
    Transport(String),
}
