//! The Lambda functions backend: `InvokeWithResponseStream` through the real
//! aws-sdk-lambda client, one tenant id per shard and attempt.

use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::InvokeWithResponseStreamResponseEvent as Event;
use aws_smithy_types::retry::RetryConfig;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;

use super::errors::{arn_field, classify, preflight, tenancy_mistake, Target, TargetKind};
pub use super::LambdaConfigError;
use super::{Backend, InvokeError, InvokeErrorKind, ShardInvocation, ShardStream, StreamError};

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
    /// Fixed placeholder credentials, for the run's own local emulator
    /// (`--local`, which also ends every environment with the run).
    pub local_credentials: bool,
    /// The HTTP client to send with instead of the SDK's own: the run's
    /// in-process emulator with `--local`.
    pub http_client: Option<aws_smithy_runtime_api::client::http::SharedHttpClient>,
}

/// Runs shards as invocations of one Lambda function.
pub struct LambdaBackend {
    client: aws_sdk_lambda::Client,
    function: String,
    tenant_isolation: bool,
    region: Option<String>,
    endpoint: Option<String>,
    /// Talks to the run's own in-process emulator (`--local`), which ends
    /// every environment when the run ends: nothing outlives an interruption.
    embedded: bool,
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
        let region = shared.region().map(|r| r.to_string());
        if let (Some(arn_region), Some(region)) = (arn_field(&options.function, 3), &region) {
            if arn_region != region {
                return Err(LambdaConfigError::RegionMismatch {
                    arn_region: arn_region.to_string(),
                    function: options.function.clone(),
                    region: region.clone(),
                });
            }
        }
        // Retries are ours: each attempt must carry a new tenant id.
        let mut config =
            aws_sdk_lambda::config::Builder::from(&shared).retry_config(RetryConfig::disabled());
        if let Some(client) = options.http_client {
            config = config.http_client(client);
        }
        let config = config.build();
        Ok(LambdaBackend {
            client: aws_sdk_lambda::Client::from_conf(config),
            function: options.function,
            tenant_isolation: options.tenant_isolation,
            region,
            endpoint: options.endpoint_url,
            embedded: options.local_credentials,
        })
    }

    /// The function as messages name it.
    pub fn target(&self) -> Target<'_> {
        Target {
            kind: TargetKind::Function,
            name: &self.function,
            region: self.region.as_deref(),
            endpoint: self.endpoint.as_deref(),
        }
    }

    /// Checks, with one read of the function's configuration, that the
    /// endpoint answers, the credentials are accepted, the function exists
    /// and its tenant isolation matches ours: a mistake is found before any
    /// shard starts. A caller that may invoke the function but not read it
    /// (a role of its own) is let through: the first invocation will tell.
    pub async fn preflight(&self) -> Result<(), InvokeError> {
        let config = match self
            .client
            .get_function_configuration()
            .function_name(&self.function)
            .send()
            .await
        {
            Ok(config) => config,
            Err(e) => return preflight(&e, &self.target()),
        };
        let isolated = config.tenancy_config().is_some();
        if isolated == self.tenant_isolation {
            return Ok(());
        }
        Err(InvokeError {
            kind: InvokeErrorKind::Config,
            message: tenancy_mistake(&self.target(), isolated),
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
    /// function running in its environment until it ends or times out (on
    /// AWS; the run's own emulator of `--local` ends it with the run).
    fn interrupted(&self) -> &'static str {
        if self.embedded {
            "ended with the local emulator"
        } else {
            "the function may still be running until its timeout"
        }
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
            let output = request.send().await.map_err(|e| {
                classify(
                    &e,
                    &self.target(),
                    &["TooManyRequestsException", "EC2ThrottledException"],
                    &[
                        "ServiceException",
                        "ResourceNotReadyException",
                        "EC2UnexpectedException",
                        "ENILimitReachedException",
                    ],
                    false,
                )
            })?;
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
                        Err(e) => {
                            Some((Err(StreamError::Transport(super::errors::causes(&e))), None))
                        }
                    };
                }
            });
            Ok(Box::pin(stream) as ShardStream)
        }
        .boxed()
    }
}
