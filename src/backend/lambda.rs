//! The Lambda functions backend: `InvokeWithResponseStream` through the real
//! aws-sdk-lambda client, one tenant id per shard and attempt.

use aws_sdk_lambda::error::{DisplayErrorContext, SdkError};
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::InvokeWithResponseStreamResponseEvent as Event;
use aws_smithy_types::retry::RetryConfig;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;

pub use super::LambdaConfigError;
use super::{Backend, InvokeError, ShardInvocation, ShardStream, StreamError};

/// How to reach the function.
#[derive(Debug, Clone, Default)]
pub struct LambdaOptions {
    /// Function name or ARN.
    pub function: String,
    /// Another endpoint than AWS's (the emulator, a VPC endpoint).
    pub endpoint_url: Option<String>,
    /// Region; otherwise from the environment and profile.
    pub region: Option<String>,
    /// Send a tenant id per shard and attempt (functions in `PER_TENANT` mode).
    pub tenant_isolation: bool,
    /// Fixed placeholder credentials, for the local emulator.
    pub local_credentials: bool,
}

/// Runs shards as invocations of one Lambda function.
pub struct LambdaBackend {
    client: aws_sdk_lambda::Client,
    function: String,
    tenant_isolation: bool,
}

impl LambdaBackend {
    /// Loads credentials and region as the AWS CLI does and checks both now,
    /// so that a configuration problem is reported before anything runs.
    pub async fn connect(options: LambdaOptions) -> Result<Self, LambdaConfigError> {
        let shared = super::load_aws_config(
            options.endpoint_url.as_deref(),
            options.region.as_deref(),
            options.local_credentials,
        )
        .await?;
        // Retries are ours: each attempt must carry a new tenant id.
        let config = aws_sdk_lambda::config::Builder::from(&shared)
            .retry_config(RetryConfig::disabled())
            .build();
        Ok(LambdaBackend {
            client: aws_sdk_lambda::Client::from_conf(config),
            function: options.function,
            tenant_isolation: options.tenant_isolation,
        })
    }

    /// The SDK client, for control-plane calls (`mvm-shard doctor`).
    pub fn client(&self) -> &aws_sdk_lambda::Client {
        &self.client
    }

    /// The function this backend invokes.
    pub fn function(&self) -> &str {
        &self.function
    }

    /// The tenant id of one attempt: unique per run, shard and attempt, so no
    /// shard ever lands in an environment another one used.
    pub fn tenant_id(invocation: &ShardInvocation) -> String {
        format!(
            "mvm-{}-s{}-a{}",
            invocation.run_id, invocation.shard.index, invocation.attempt
        )
    }
}

impl Backend for LambdaBackend {
    /// An invocation cannot be cancelled: dropping the stream leaves the
    /// function running in its environment until it ends or times out.
    fn interrupted(&self) -> &'static str {
        "the function may still be running until its timeout"
    }

    fn invoke<'a>(
        &'a self,
        invocation: &'a ShardInvocation,
    ) -> BoxFuture<'a, Result<ShardStream, InvokeError>> {
        async move {
            let payload = invocation.request.encode().map_err(|e| InvokeError {
                kind: super::InvokeErrorKind::Fatal,
                message: e.to_string(),
            })?;
            let mut request = self
                .client
                .invoke_with_response_stream()
                .function_name(&self.function)
                .payload(Blob::new(payload));
            if self.tenant_isolation {
                request = request.tenant_id(Self::tenant_id(invocation));
            }
            let output = request.send().await.map_err(classify)?;
            let events = output.event_stream;
            let stream = futures::stream::unfold(Some(events), |events| async move {
                let mut events = events?;
                loop {
                    return match events.recv().await {
                        Ok(Some(Event::PayloadChunk(update))) => {
                            let Some(blob) = update.payload else { continue };
                            Some((Ok(Bytes::from(blob.into_inner())), Some(events)))
                        }
                        Ok(Some(Event::InvokeComplete(complete))) => match complete.error_code {
                            Some(code) => Some((
                                Err(StreamError::Function {
                                    code,
                                    details: complete.error_details.unwrap_or_default(),
                                }),
                                None,
                            )),
                            None => None,
                        },
                        Ok(Some(_)) => continue,
                        Ok(None) => None,
                        Err(e) => Some((
                            Err(StreamError::Transport(DisplayErrorContext(&e).to_string())),
                            None,
                        )),
                    };
                }
            });
            Ok(Box::pin(stream) as ShardStream)
        }
        .boxed()
    }
}

/// Lambda's error codes for a start that may work later.
fn classify<R: std::fmt::Debug>(
    error: SdkError<
        aws_sdk_lambda::operation::invoke_with_response_stream::InvokeWithResponseStreamError,
        R,
    >,
) -> InvokeError {
    super::classify_sdk_error(
        &error,
        &["TooManyRequestsException", "EC2ThrottledException"],
        &[
            "ServiceException",
            "ResourceNotReadyException",
            "EC2UnexpectedException",
            "ENILimitReachedException",
        ],
    )
}
