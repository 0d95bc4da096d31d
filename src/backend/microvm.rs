//! The Lambda MicroVMs backend: one snapshot-booted microVM per shard,
//! through the real aws-sdk-lambdamicrovms client. The shard's framed log is
//! read from the agent's log port through the microVM's authenticated
//! endpoint, resuming from the last byte on a broken connection, and every
//! microVM started is terminated, whatever happens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_lambdamicrovms::error::SdkError;
use aws_sdk_lambdamicrovms::operation::run_microvm::builders::RunMicrovmFluentBuilder;
use aws_sdk_lambdamicrovms::types::{MicrovmState, PortSpecification};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};

use super::{
    Backend, InvokeError, InvokeErrorKind, LambdaConfigError, Released, ShardInvocation,
    ShardStream, StreamError,
};
use crate::protocol::microvm::{
    RunPayload, RunPayloadError, DEFAULT_LOG_PORT, LOG_PATH, SHARD_PATH,
};
use crate::protocol::ShardId;

/// The agent's log port inside the microVM.
const LOG_PORT: i32 = DEFAULT_LOG_PORT as i32;
/// Auth tokens are asked for this long (the service allows up to 60 minutes).
const TOKEN_MINUTES: i32 = 60;
/// A token older than this is renewed before the next request.
const TOKEN_RENEW_AFTER: Duration = Duration::from_secs(45 * 60);
/// Time past the shard's own timeout before the service ends the microVM.
const DURATION_MARGIN_S: u64 = 300;
/// Longest a microVM may live.
const MAX_DURATION_S: u64 = 28_800;
/// Longest wait for a microVM to turn RUNNING after `RunMicrovm` answered.
const START_LIMIT: Duration = Duration::from_secs(300);
/// Longest pause between two `GetMicrovm` polls while it starts.
const START_POLL_MAX: Duration = Duration::from_secs(2);
/// Reconnections in a row, without a byte received, before the log counts as lost.
const MAX_RECONNECTS: u32 = 8;

/// How to reach Lambda MicroVMs.
#[derive(Debug, Clone, Default)]
pub struct MicrovmOptions {
    /// Image ARN or name.
    pub image: String,
    /// Image version; the latest when absent.
    pub image_version: Option<String>,
    /// Role the microVM runs with.
    pub execution_role_arn: Option<String>,
    /// Another endpoint than AWS's (the emulator).
    pub endpoint_url: Option<String>,
    /// Region; otherwise from the environment and profile.
    pub region: Option<String>,
    /// Fixed placeholder credentials, for the local emulator.
    pub local_credentials: bool,
}

/// Runs shards in Lambda MicroVMs.
pub struct MicrovmBackend {
    client: aws_sdk_lambdamicrovms::Client,
    http: reqwest::Client,
    options: MicrovmOptions,
    /// Every microVM this backend may have started and not yet terminated.
    tracked: Arc<Mutex<Tracked>>,
}

/// The microVMs a run is answerable for, from the moment `RunMicrovm` is
/// sent: a call whose answer never came (interrupted, or its response
/// lost) may still have started one.
#[derive(Default)]
struct Tracked {
    /// Started and not yet terminated: microVM id to its shard.
    running: HashMap<String, ShardId>,
    /// Sent and unanswered: client token to its shard and the very call,
    /// which repeated with the same token names the microVM it started
    /// (or starts one, to be terminated at once) instead of a second one.
    starting: HashMap<String, (ShardId, RunMicrovmFluentBuilder)>,
}

impl Tracked {
    fn lock(tracked: &Mutex<Tracked>) -> std::sync::MutexGuard<'_, Tracked> {
        // The maps stay consistent whatever panicked while holding them.
        tracked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl MicrovmBackend {
    /// Loads credentials and region and checks them now.
    pub async fn connect(options: MicrovmOptions) -> Result<Self, LambdaConfigError> {
        let shared = super::load_aws_config(
            options.endpoint_url.as_deref(),
            options.region.as_deref(),
            options.local_credentials,
        )
        .await?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| LambdaConfigError::Http(e.to_string()))?;
        Ok(MicrovmBackend {
            client: aws_sdk_lambdamicrovms::Client::new(&shared),
            http,
            options,
            tracked: Arc::default(),
        })
    }

    /// Checks, with one read of the image, that the endpoint answers, the
    /// credentials are accepted and the image exists, before any microVM
    /// starts. A caller that may run microVMs but not read the image is let
    /// through: the first run will tell.
    pub async fn preflight(&self) -> Result<(), InvokeError> {
        let Err(e) = self
            .client
            .get_microvm_image()
            .image_identifier(&self.options.image)
            .send()
            .await
        else {
            return Ok(());
        };
        let region = self.client.config().region().map(|r| r.to_string());
        super::errors::preflight(&e, &target(&self.options, region.as_deref()))
    }

    /// The client token of one attempt, so a retried call never starts a second microVM.
    pub fn client_token(invocation: &ShardInvocation) -> String {
        format!(
            "mvm-{}-s{}-a{}",
            invocation.run_id, invocation.shard.index, invocation.attempt
        )
    }

    async fn start(&self, invocation: &ShardInvocation) -> Result<ShardStream, InvokeError> {
        let request = &invocation.request;
        let max_duration =
            (request.timeout_ms / 1000 + DURATION_MARGIN_S).min(MAX_DURATION_S) as i32;
        // A request too large for the run hook goes to the agent's log port instead.
        let (hook_payload, post_request) = match RunPayload::Inline(request.clone()).encode() {
            Ok(payload) => (payload, None),
            Err(RunPayloadError::TooLarge { .. }) => (
                RunPayload::ViaLogPort
                    .encode()
                    .map_err(|e| fatal(e.to_string()))?,
                Some(Bytes::from(
                    request.encode().map_err(|e| fatal(e.to_string()))?,
                )),
            ),
            Err(e) => return Err(fatal(e.to_string())),
        };
        let hook_payload = String::from_utf8(hook_payload).map_err(|e| fatal(e.to_string()))?;
        let mut run = self
            .client
            .run_microvm()
            .image_identifier(&self.options.image)
            .run_hook_payload(hook_payload)
            .maximum_duration_in_seconds(max_duration)
            .client_token(Self::client_token(invocation));
        if let Some(v) = &self.options.image_version {
            run = run.image_version(v);
        }
        if let Some(role) = &self.options.execution_role_arn {
            run = run.execution_role_arn(role);
        }
        let token = Self::client_token(invocation);
        // Recorded before sending: if this future is dropped (an interrupted
        // run) while the call is out, shutdown still finds its microVM.
        Tracked::lock(&self.tracked)
            .starting
            .insert(token.clone(), (invocation.shard, run.clone()));
        let vm = match run.send().await {
            Ok(vm) => vm,
            Err(e) => {
                // A service's answer means nothing started; anything else (a
                // timeout, a dropped connection) may hide a started microVM,
                // left for shutdown to find by its token.
                if matches!(e, SdkError::ServiceError(_)) {
                    Tracked::lock(&self.tracked).starting.remove(&token);
                }
                let region = self.client.config().region().map(|r| r.to_string());
                return Err(classify(e, &self.options, region.as_deref()));
            }
        };
        let id = vm.microvm_id;
        {
            let mut tracked = Tracked::lock(&self.tracked);
            tracked.starting.remove(&token);
            tracked.running.insert(id.clone(), invocation.shard);
        }
        let endpoint = match vm.state {
            MicrovmState::Running => vm.endpoint,
            _ => match self.until_running(&id).await {
                Ok(endpoint) => endpoint,
                Err(e) => {
                    let _ = self.terminate(&id).await;
                    return Err(e);
                }
            },
        };
        let endpoint = if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
            endpoint.trim_end_matches('/').to_string()
        } else {
            format!("https://{}", endpoint.trim_end_matches('/'))
        };
        let mut log = LogReader {
            client: self.client.clone(),
            http: self.http.clone(),
            id: id.clone(),
            endpoint,
            token: None,
            offset: 0,
            failures: 0,
            body: None,
        };
        if let Some(payload) = post_request {
            if let Err(e) = log.post_request(payload).await {
                let _ = self.terminate(&id).await;
                return Err(InvokeError {
                    kind: InvokeErrorKind::Transient,
                    message: e,
                });
            }
        }
        let terminator = Terminator {
            client: self.client.clone(),
            tracked: self.tracked.clone(),
            id,
        };
        let stream = futures::stream::unfold(Some((log, terminator)), |state| async move {
            let (mut log, terminator) = state?;
            match log.next_chunk().await {
                Ok(Some(chunk)) => Some((Ok(chunk), Some((log, terminator)))),
                Ok(None) => {
                    let _ = terminator.terminate().await;
                    None
                }
                Err(e) => {
                    let _ = terminator.terminate().await;
                    Some((Err(StreamError::Transport(e)), None))
                }
            }
        });
        Ok(Box::pin(stream))
    }

    /// Waits until microVM `id` is RUNNING, as a client of the service must
    /// (`RunMicrovm` answers PENDING): `GetMicrovm` with backoff, bounded by
    /// [`START_LIMIT`]; its endpoint then.
    async fn until_running(&self, id: &str) -> Result<String, InvokeError> {
        let deadline = Instant::now() + START_LIMIT;
        let mut pause = Duration::from_millis(25);
        loop {
            match self
                .client
                .get_microvm()
                .microvm_identifier(id)
                .send()
                .await
            {
                Ok(vm) => match vm.state() {
                    MicrovmState::Running => return Ok(vm.endpoint().to_string()),
                    MicrovmState::Pending => {}
                    state => {
                        let reason = vm.state_reason().unwrap_or("no reason given");
                        // The image refused this very request: another microVM would too.
                        let kind = if reason.contains("run hook answered 4") {
                            InvokeErrorKind::Fatal
                        } else {
                            InvokeErrorKind::Transient
                        };
                        return Err(InvokeError {
                            kind,
                            message: format!(
                                "microVM {id} did not start: it is {} ({reason})",
                                state.as_str()
                            ),
                        });
                    }
                },
                Err(e) if matches!(e, SdkError::ServiceError(_)) => {
                    let region = self.client.config().region().map(|r| r.to_string());
                    let e = super::errors::classify(
                        &e,
                        &target(&self.options, region.as_deref()),
                        &["ThrottlingException"],
                        &["InternalServerException"],
                        false,
                    );
                    if matches!(e.kind, InvokeErrorKind::Fatal | InvokeErrorKind::Config) {
                        return Err(e);
                    }
                }
                // A dropped connection: ask again.
                Err(_) => {}
            }
            if Instant::now() + pause > deadline {
                return Err(InvokeError {
                    kind: InvokeErrorKind::Transient,
                    message: format!(
                        "microVM {id} was not RUNNING within {} s",
                        START_LIMIT.as_secs()
                    ),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(START_POLL_MAX);
        }
    }

    async fn terminate(&self, id: &str) -> Result<(), EndError> {
        Terminator {
            client: self.client.clone(),
            tracked: self.tracked.clone(),
            id: id.to_string(),
        }
        .terminate()
        .await
    }

    /// The microVM a `RunMicrovm` left unanswered started, asked again with
    /// the same client token; `None` when the service says it started none.
    async fn recover(
        &self,
        token: &str,
        call: RunMicrovmFluentBuilder,
    ) -> Result<Option<String>, EndError> {
        let mut last = String::new();
        for attempt in 0..3u32 {
            match call.clone().send().await {
                Ok(vm) => {
                    Tracked::lock(&self.tracked).starting.remove(token);
                    return Ok(Some(vm.microvm_id));
                }
                Err(SdkError::ServiceError(e))
                    if !e.err().is_throttling_exception()
                        && !e.err().is_internal_server_exception() =>
                {
                    // Refused outright (the request itself is wrong): nothing runs.
                    Tracked::lock(&self.tracked).starting.remove(token);
                    return Ok(None);
                }
                Err(e) => {
                    last = super::errors::causes(&e);
                    tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
                }
            }
        }
        Err(EndError::Recover {
            token: token.to_string(),
            message: last,
        })
    }

    /// Terminates what is tracked: microVMs known by id, and those of calls
    /// still unanswered, found by their client token first.
    async fn release(&self) -> Released {
        let (running, starting): (Vec<(String, ShardId)>, Vec<_>) = {
            let tracked = Tracked::lock(&self.tracked);
            (
                tracked
                    .running
                    .iter()
                    .map(|(id, s)| (id.clone(), *s))
                    .collect(),
                tracked
                    .starting
                    .iter()
                    .map(|(token, (s, call))| (token.clone(), *s, call.clone()))
                    .collect(),
            )
        };
        // Every microVM at once: a cancelled CI job gives seconds, not minutes.
        let known = running.into_iter().map(|(id, shard)| {
            async move { (shard, self.terminate(&id).await.map(|()| Some(id))) }.boxed()
        });
        let found = starting.into_iter().map(|(token, shard, call)| {
            async move {
                let end = match self.recover(&token, call).await {
                    Ok(Some(id)) => self.terminate(&id).await.map(|()| Some(id)),
                    other => other,
                };
                (shard, end)
            }
            .boxed()
        });
        let ends = futures::future::join_all(known.chain(found)).await;
        let mut released = Released::default();
        for (shard, end) in ends {
            match end {
                Ok(Some(id)) => released.terminated.push(format!("{id} (shard {shard})")),
                Ok(None) => {}
                Err(e) => released.failed.push(format!("shard {shard}: {e}")),
            }
        }
        released.terminated.sort();
        released
    }
}

impl Backend for MicrovmBackend {
    fn invoke<'a>(
        &'a self,
        invocation: &'a ShardInvocation,
    ) -> BoxFuture<'a, Result<ShardStream, InvokeError>> {
        self.start(invocation).boxed()
    }

    fn shutdown(&self) -> BoxFuture<'_, Released> {
        self.release().boxed()
    }

    fn interrupted(&self) -> &'static str {
        "its microVM is terminated"
    }

    fn unfinished(&self) -> Vec<String> {
        let tracked = Tracked::lock(&self.tracked);
        let mut left: Vec<String> = tracked
            .running
            .iter()
            .map(|(id, shard)| format!("{id} (shard {shard})"))
            .chain(tracked.starting.iter().map(|(token, (shard, _))| {
                format!("the microVM of client token {token} (shard {shard})")
            }))
            .collect();
        left.sort();
        left
    }
}

/// Why a microVM the run answers for may still be running.
#[derive(Debug, thiserror::Error)]
enum EndError {
    /// `TerminateMicrovm` kept failing.
    #[error("cannot terminate microVM {id}: {message}")]
    Terminate { id: String, message: String },
    /// Repeating an unanswered `RunMicrovm` kept failing.
    #[error("cannot learn which microVM client token {token} started: {message}")]
    Recover { token: String, message: String },
}

/// Ends one microVM and forgets it once it is ended.
struct Terminator {
    client: aws_sdk_lambdamicrovms::Client,
    tracked: Arc<Mutex<Tracked>>,
    id: String,
}

impl Terminator {
    async fn terminate(&self) -> Result<(), EndError> {
        let mut last = String::new();
        for attempt in 0..3u32 {
            match self
                .client
                .terminate_microvm()
                .microvm_identifier(&self.id)
                .send()
                .await
            {
                Ok(_) => {
                    Tracked::lock(&self.tracked).running.remove(&self.id);
                    return Ok(());
                }
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|s| s.is_resource_not_found_exception()) =>
                {
                    Tracked::lock(&self.tracked).running.remove(&self.id);
                    return Ok(());
                }
                Err(e) => {
                    last = super::errors::causes(&e);
                    tracing::warn!(microvm = %self.id, error = %last, "terminating failed");
                    tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                }
            }
        }
        // Still tracked: shutdown tries again and names it if it fails there too.
        Err(EndError::Terminate {
            id: self.id.clone(),
            message: last,
        })
    }
}

/// Reads one microVM's log through its endpoint, resuming after breaks.
struct LogReader {
    client: aws_sdk_lambdamicrovms::Client,
    http: reqwest::Client,
    id: String,
    endpoint: String,
    token: Option<(Instant, HashMap<String, String>)>,
    offset: u64,
    failures: u32,
    body: Option<Body>,
}

/// An open log response body.
type Body = futures::stream::BoxStream<'static, reqwest::Result<Bytes>>;

impl LogReader {
    async fn headers(&mut self, renew: bool) -> Result<HashMap<String, String>, String> {
        if let Some((at, headers)) = &self.token {
            if !renew && at.elapsed() < TOKEN_RENEW_AFTER {
                return Ok(headers.clone());
            }
        }
        let token = self
            .client
            .create_microvm_auth_token()
            .microvm_identifier(&self.id)
            .expiration_in_minutes(TOKEN_MINUTES)
            .allowed_ports(PortSpecification::Port(LOG_PORT))
            .send()
            .await
            .map_err(|e| {
                format!(
                    "cannot get an auth token for microVM {}: {}",
                    self.id,
                    super::errors::causes(&e)
                )
            })?;
        let mut headers = token.auth_token;
        headers.insert("X-aws-proxy-port".into(), LOG_PORT.to_string());
        self.token = Some((Instant::now(), headers.clone()));
        Ok(headers)
    }

    fn with_headers(
        builder: reqwest::RequestBuilder,
        headers: &HashMap<String, String>,
    ) -> reqwest::RequestBuilder {
        headers
            .iter()
            .fold(builder, |b, (k, v)| b.header(k.as_str(), v.as_str()))
    }

    async fn post_request(&mut self, payload: Bytes) -> Result<(), String> {
        let headers = self.headers(false).await?;
        let url = format!("{}{SHARD_PATH}", self.endpoint);
        let resp = Self::with_headers(self.http.post(&url), &headers)
            .body(payload)
            .send()
            .await
            .map_err(|e| format!("cannot hand the request to microVM {}: {e}", self.id))?;
        if resp.status() != reqwest::StatusCode::ACCEPTED {
            return Err(format!(
                "microVM {} refused the request: {} {}",
                self.id,
                resp.status(),
                resp.text().await.unwrap_or_default()
            ));
        }
        Ok(())
    }

    /// Opens `GET /log?offset=N`, renewing the token once when it was
    /// refused; `None` when the log is complete before `N` (416).
    async fn open(&mut self) -> Result<Option<Body>, String> {
        let mut renew = false;
        loop {
            let headers = self.headers(renew).await?;
            let url = format!("{}{LOG_PATH}?offset={}", self.endpoint, self.offset);
            let resp = Self::with_headers(self.http.get(&url), &headers)
                .send()
                .await
                .map_err(|e| {
                    format!(
                        "cannot reach microVM {}: {}",
                        self.id,
                        super::errors::causes(&e)
                    )
                })?;
            match resp.status() {
                s if s.is_success() => return Ok(Some(resp.bytes_stream().boxed())),
                reqwest::StatusCode::RANGE_NOT_SATISFIABLE => return Ok(None),
                reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN if !renew => {
                    renew = true
                }
                s => {
                    return Err(format!(
                        "microVM {} answered {s} for its log: {}",
                        self.id,
                        resp.text().await.unwrap_or_default()
                    ))
                }
            }
        }
    }
}

impl LogReader {
    /// The next chunk of the log; `None` once the agent ended the stream.
    /// A broken connection is reopened from the last byte received.
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            let body = match &mut self.body {
                Some(body) => body,
                None => match self.open().await {
                    Ok(Some(body)) => self.body.insert(body),
                    Ok(None) => return Ok(None),
                    Err(e) => {
                        self.backoff(e).await?;
                        continue;
                    }
                },
            };
            match body.next().await {
                Some(Ok(chunk)) if chunk.is_empty() => {}
                Some(Ok(chunk)) => {
                    self.offset += chunk.len() as u64;
                    self.failures = 0;
                    return Ok(Some(chunk));
                }
                Some(Err(e)) => {
                    self.body = None;
                    let e = format!(
                        "the log of microVM {} broke off at byte {}: {}",
                        self.id,
                        self.offset,
                        super::errors::causes(&e)
                    );
                    self.backoff(e).await?;
                }
                None => return Ok(None),
            }
        }
    }

    /// Waits before the next reconnection, or gives up with `error`.
    async fn backoff(&mut self, error: String) -> Result<(), String> {
        self.failures += 1;
        if self.failures > MAX_RECONNECTS {
            return Err(error);
        }
        tracing::debug!(microvm = %self.id, %error, attempt = self.failures, "reconnecting to the log");
        let delay = Duration::from_millis(100u64 << self.failures.min(6));
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

fn fatal(message: String) -> InvokeError {
    InvokeError {
        kind: InvokeErrorKind::Fatal,
        message,
    }
}

/// The image as messages name it.
fn target<'a>(options: &'a MicrovmOptions, region: Option<&'a str>) -> super::errors::Target<'a> {
    super::errors::Target {
        kind: super::errors::TargetKind::MicrovmImage,
        name: &options.image,
        region,
        endpoint: options.endpoint_url.as_deref(),
    }
}

/// Lambda MicroVMs' error codes for a start that may work later.
fn classify(
    error: SdkError<
        aws_sdk_lambdamicrovms::operation::run_microvm::RunMicrovmError,
        aws_smithy_runtime_api::client::orchestrator::HttpResponse,
    >,
    options: &MicrovmOptions,
    region: Option<&str>,
) -> InvokeError {
    super::errors::classify(
        &error,
        &target(options, region),
        &[
            "ThrottlingException",
            "InsufficientCapacityException",
            "ServiceQuotaExceededException",
        ],
        &["InternalServerException", "ConflictException"],
        false,
    )
}
