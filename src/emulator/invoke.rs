//! The Invoke API routes: `Invoke` (buffered) and `InvokeWithResponseStream`
//! (event-stream), both driving one environment through its Runtime API; the
//! MicroVMs control plane is merged in beside them.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use super::environment::Environment;
use super::eventstream::{self, InvokeComplete};
use super::faults::{Fault, FaultInjector, FaultKind};
use super::runtime::{PendingInvocation, RuntimeReply, StreamPiece};
use super::{ApiError, Emulator, Function, Lease};
use crate::protocol::MAX_REQUEST_BYTES;

/// Lambda's cap on a streamed response.
const MAX_STREAMED_RESPONSE: usize = 200 * 1024 * 1024;
/// Streamed bytes Lambda sends at full speed before it paces the rest.
const UNTHROTTLED_BYTES: usize = 6_000_000;
/// Lambda's pace past [`UNTHROTTLED_BYTES`], in bytes per second.
const THROTTLED_RATE: f64 = 2_000_000.0;

/// The Invoke API routes.
pub fn router(emulator: Emulator) -> Router {
    Router::new()
        .route("/2015-03-31/functions/", get(list_functions))
        .route("/2015-03-31/functions", get(list_functions))
        .route("/2015-03-31/functions/{name}", get(get_function))
        .route(
            "/2015-03-31/functions/{name}/configuration",
            get(get_function_configuration),
        )
        .route("/2015-03-31/functions/{name}/invocations", post(invoke))
        .route(
            "/2021-11-15/functions/{name}/response-streaming-invocations",
            post(invoke_with_response_stream),
        )
        .merge(super::microvms::router())
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                [("x-amzn-errortype", "UnknownOperationException")],
                "{\"message\":\"the mvm-shard emulator does not serve this operation\"}",
            )
        })
        // We check the 6 MB limit ourselves, to answer as Lambda does.
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES * 2))
        .with_state(emulator)
}

/// What an invocation produced, in order: data, then exactly one `Done`.
enum InvokeEvent {
    Data(Bytes),
    /// Boxed: a channel's buffer is sized by its largest message, and one
    /// channel is open per invocation in flight.
    Done(Box<(InvokeComplete, Option<Bytes>)>),
}

struct Call {
    function: Arc<Function>,
    tenant: Option<String>,
    invocation_type: String,
    log_tail: bool,
    client_context: Option<String>,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

/// Checks everything Lambda checks before it runs anything.
fn prepare(
    emulator: &Emulator,
    name: &str,
    headers: &HeaderMap,
    payload_len: usize,
) -> Result<Call, ApiError> {
    let function = lookup(emulator, name)?;
    if function.config.deny_invoke {
        return Err(ApiError::access_denied(
            &emulator.function_arn(&function.config.name),
            "lambda:InvokeFunction",
        ));
    }
    if payload_len > MAX_REQUEST_BYTES {
        return Err(ApiError::too_large(payload_len, MAX_REQUEST_BYTES));
    }
    let tenant = header(headers, "x-amz-tenant-id").map(str::to_owned);
    match (function.config.tenant_isolation, &tenant) {
        (true, None) => {
            return Err(ApiError::invalid_parameter(
                "The invoked function is enabled with tenancy configuration. Add a valid tenant ID in your request and try again.",
            ))
        }
        (false, Some(_)) => {
            return Err(ApiError::invalid_parameter(
                "The invoked function is not enabled with tenancy configuration. Remove the tenant ID from your request and try again.",
            ))
        }
        _ => {}
    }
    Ok(Call {
        function: function.clone(),
        tenant,
        invocation_type: header(headers, "x-amz-invocation-type")
            .unwrap_or("RequestResponse")
            .to_string(),
        log_tail: header(headers, "x-amz-log-type") == Some("Tail"),
        client_context: header(headers, "x-amz-client-context").map(str::to_owned),
    })
}

/// The `FunctionConfiguration` document Lambda returns for a function.
fn configuration(emulator: &Emulator, function: &Function) -> serde_json::Value {
    let c = &function.config;
    let mut doc = serde_json::json!({
        "FunctionName": c.name,
        "FunctionArn": emulator.function_arn(&c.name),
        "PackageType": "Image",
        "MemorySize": c.memory_mb,
        "Timeout": c.timeout.as_secs(),
        "EphemeralStorage": { "Size": c.ephemeral_storage_mb },
        "Architectures": [std::env::consts::ARCH.replace("aarch64", "arm64")],
        "Version": "$LATEST",
        "State": "Active",
        "LastUpdateStatus": "Successful",
        "Handler": c.handler,
    });
    if c.tenant_isolation {
        doc["TenancyConfig"] = serde_json::json!({ "TenantIsolationMode": "PER_TENANT" });
    }
    doc
}

fn lookup<'a>(emulator: &'a Emulator, raw: &str) -> Result<&'a Arc<Function>, ApiError> {
    let name = function_name(raw);
    emulator.state.functions.get(name).ok_or_else(|| {
        ApiError::not_found(format!(
            "Function not found: {}",
            emulator.function_arn(name)
        ))
    })
}

async fn get_function_configuration(
    State(emulator): State<Emulator>,
    Path(name): Path<String>,
) -> Response {
    match lookup(&emulator, &name) {
        Ok(function) => axum::Json(configuration(&emulator, function)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn get_function(State(emulator): State<Emulator>, Path(name): Path<String>) -> Response {
    match lookup(&emulator, &name) {
        Ok(function) => axum::Json(serde_json::json!({
            "Configuration": configuration(&emulator, function),
            "Code": { "RepositoryType": "ECR", "ImageUri": "emulated" },
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn list_functions(State(emulator): State<Emulator>) -> Response {
    let mut functions: Vec<serde_json::Value> = emulator
        .state
        .functions
        .values()
        .map(|f| configuration(&emulator, f))
        .collect();
    functions.sort_by(|a, b| a["FunctionName"].as_str().cmp(&b["FunctionName"].as_str()));
    axum::Json(serde_json::json!({ "Functions": functions })).into_response()
}

/// `my-fn`, `my-fn:alias`, `123456789012:function:my-fn` or a full ARN, to `my-fn`.
fn function_name(raw: &str) -> &str {
    let after = raw.rsplit_once("function:").map_or(raw, |(_, rest)| rest);
    after.split(':').next().unwrap_or(after)
}

/// What the part both Invoke routes share decided.
enum Begun {
    /// Answered already (an error, `DryRun`, `Event`).
    Answered(Response),
    /// Running: the invocation's events, its request id, and the byte of
    /// the response where its connection is to be dropped (a fault).
    Running(mpsc::Receiver<InvokeEvent>, String, Option<u64>),
}

/// Checks the call as Lambda does and starts it; `streaming` is for
/// `InvokeWithResponseStream`, which takes no `Event` invocations.
async fn begin(
    emulator: &Emulator,
    name: &str,
    headers: &HeaderMap,
    payload: Bytes,
    streaming: bool,
) -> Begun {
    emulator
        .state
        .invocations
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let call = match prepare(emulator, name, headers, payload.len()) {
        Ok(call) => call,
        Err(e) => return Begun::Answered(e.into_response()),
    };
    let event = match (call.invocation_type.as_str(), streaming) {
        ("DryRun", _) => return Begun::Answered(StatusCode::NO_CONTENT.into_response()),
        ("RequestResponse", _) => false,
        ("Event", false) => true,
        (other, _) => {
            let context = if streaming {
                " for response streaming"
            } else {
                ""
            };
            let e = ApiError::invalid_parameter(format!(
                "invocation type {other} is not supported{context}"
            ));
            return Begun::Answered(e.into_response());
        }
    };
    let injector = &emulator.state.faults;
    let (fault, drop_at) = match injector.draw() {
        Some(Fault::Refuse(kind)) => {
            injector.fired(kind);
            let e = match kind {
                FaultKind::Throttle => ApiError::throttled(),
                _ => ApiError::service("an injected fault: the service failed".into()),
            };
            return Begun::Answered(e.into_response());
        }
        Some(Fault::AtByte {
            kind: FaultKind::DropConnection,
            at,
        }) => (None, Some(at)),
        Some(Fault::AtByte { kind, at }) => (Some((kind, at)), None),
        None => (None, None),
    };
    match start(emulator, call, payload, fault).await {
        Err(e) => Begun::Answered(e.into_response()),
        Ok((rx, _)) if event => {
            // Nobody reads an asynchronous invocation's output.
            tokio::spawn(ReceiverStream::new(rx).for_each(|_| async {}));
            Begun::Answered(StatusCode::ACCEPTED.into_response())
        }
        Ok((rx, request_id)) => Begun::Running(rx, request_id, drop_at),
    }
}

async fn invoke(
    State(emulator): State<Emulator>,
    Path(name): Path<String>,
    headers: HeaderMap,
    payload: Bytes,
) -> Response {
    // A buffered answer has no stream whose connection could drop midway.
    let (mut rx, request_id) = match begin(&emulator, &name, &headers, payload, false).await {
        Begun::Answered(resp) => return resp,
        Begun::Running(rx, request_id, _) => (rx, request_id),
    };
    let mut body = BytesMut::new();
    let mut complete = InvokeComplete::default();
    let mut error_body = None;
    while let Some(event) = rx.recv().await {
        match event {
            InvokeEvent::Data(data) => body.extend_from_slice(&data),
            InvokeEvent::Done(done) => {
                (complete, error_body) = *done;
            }
        }
    }
    let mut resp = match (&complete.error_code, error_body) {
        (Some(_), Some(err)) => Response::new(Body::from(err)),
        (Some(code), None) => Response::new(Body::from(
            serde_json::json!({ "errorType": code, "errorMessage": complete.error_details })
                .to_string(),
        )),
        (None, _) => Response::new(Body::from(body.freeze())),
    };
    let h = resp.headers_mut();
    common_headers(h, &request_id);
    h.insert("content-type", HeaderValue::from_static("application/json"));
    if complete.error_code.is_some() {
        h.insert(
            "x-amz-function-error",
            HeaderValue::from_static("Unhandled"),
        );
    }
    if let Some(log) = complete
        .log_result
        .as_deref()
        .and_then(|l| HeaderValue::from_str(l).ok())
    {
        h.insert("x-amz-log-result", log);
    }
    resp
}

async fn invoke_with_response_stream(
    State(emulator): State<Emulator>,
    Path(name): Path<String>,
    headers: HeaderMap,
    payload: Bytes,
) -> Response {
    let (rx, request_id, drop_at) = match begin(&emulator, &name, &headers, payload, true).await {
        Begun::Answered(resp) => return resp,
        Begun::Running(rx, request_id, drop_at) => (rx, request_id, drop_at),
    };
    let faults = emulator.state.faults.clone();
    let events = ReceiverStream::new(rx)
        .scan(0u64, move |sent, event| {
            let items: Vec<Result<Bytes, std::io::Error>> = match event {
                InvokeEvent::Data(data) => {
                    let before = *sent;
                    *sent += data.len() as u64;
                    match drop_at {
                        Some(at) if (before..*sent).contains(&at) => {
                            // The connection drops here; the function goes on.
                            faults.fired(FaultKind::DropConnection);
                            let head = data.slice(..(at - before) as usize);
                            let mut items: Vec<_> = eventstream::payload_chunks(&head)
                                .into_iter()
                                .map(Ok)
                                .collect();
                            items.push(Err(std::io::Error::other(
                                "an injected fault: the connection dropped",
                            )));
                            return futures::future::ready(Some(items));
                        }
                        _ => eventstream::payload_chunks(&data)
                            .into_iter()
                            .map(Ok)
                            .collect(),
                    }
                }
                InvokeEvent::Done(done) => {
                    vec![Ok(eventstream::invoke_complete(&done.0))]
                }
            };
            futures::future::ready(Some(items))
        })
        .flat_map(futures::stream::iter)
        // Nothing after a dropped connection.
        .scan(false, |dropped, item| {
            if *dropped {
                return futures::future::ready(None);
            }
            *dropped = item.is_err();
            futures::future::ready(Some(item))
        });
    let mut resp = Response::new(Body::from_stream(events));
    let h = resp.headers_mut();
    common_headers(h, &request_id);
    h.insert(
        "content-type",
        HeaderValue::from_static("application/vnd.amazon.eventstream"),
    );
    resp
}

fn common_headers(h: &mut HeaderMap, request_id: &str) {
    if let Ok(id) = HeaderValue::from_str(request_id) {
        h.insert("x-amzn-requestid", id);
    }
    h.insert(
        "x-amz-executed-version",
        HeaderValue::from_static("$LATEST"),
    );
}

/// Checks out an environment and starts driving the invocation in a task of
/// its own, which goes on even if the caller disconnects, as on Lambda.
async fn start(
    emulator: &Emulator,
    call: Call,
    payload: Bytes,
    fault: Option<(FaultKind, u64)>,
) -> Result<(mpsc::Receiver<InvokeEvent>, String), ApiError> {
    let lease = emulator
        .acquire(&call.function, call.tenant.clone())
        .await?;
    let request_id = uuid::Uuid::new_v4().to_string();
    let (tx, rx) = mpsc::channel(16);
    let timeout = call.function.config.timeout;
    let (reply, reply_rx) = oneshot::channel();
    let pending = PendingInvocation {
        request_id: request_id.clone(),
        payload,
        deadline: SystemTime::now() + timeout,
        function_arn: emulator.function_arn(&call.function.config.name),
        client_context: call.client_context,
        reply,
    };
    let settings = Settings {
        timeout,
        log_tail: call.log_tail,
        throttle_streams: emulator.state.throttle_streams,
        fault,
        faults: emulator.state.faults.clone(),
    };
    tokio::spawn(drive(lease, pending, reply_rx, settings, tx));
    Ok((rx, request_id))
}

/// A failed invocation: Lambda's error type and the error document.
struct FunctionError {
    error_type: String,
    details: String,
    body: Option<Bytes>,
}

impl FunctionError {
    fn new(error_type: &str, details: String) -> Self {
        FunctionError {
            error_type: error_type.into(),
            details,
            body: None,
        }
    }

    fn from_runtime(error_type: String, body: Bytes) -> Self {
        FunctionError {
            error_type,
            details: String::from_utf8_lossy(&body).into_owned(),
            body: Some(body),
        }
    }
}

/// How one invocation is run.
#[derive(Debug, Clone)]
struct Settings {
    /// The function's timeout.
    timeout: Duration,
    /// Return the log tail (`X-Amz-Log-Type: Tail`).
    log_tail: bool,
    /// Pace streamed bytes past the first 6 MB as Lambda does.
    throttle_streams: bool,
    /// A fault to inject at a byte of the response (not a dropped
    /// connection, which the route injects).
    fault: Option<(FaultKind, u64)>,
    /// Where fired faults are counted.
    faults: Arc<FaultInjector>,
}

async fn drive(
    lease: Lease,
    pending: PendingInvocation,
    reply: oneshot::Receiver<RuntimeReply>,
    settings: Settings,
    tx: mpsc::Sender<InvokeEvent>,
) {
    let env = lease.env.clone();
    let request_id = pending.request_id.clone();
    tracing::debug!(env = %env.id, %request_id, "invocation starts");
    env.clear_log();
    env.log_line(&format!("START RequestId: {request_id} Version: $LATEST"));
    let started = Instant::now();
    let (result, reusable) = exchange(&env, pending, reply, &settings, &tx).await;
    env.log_line(&format!("END RequestId: {request_id}"));
    env.log_line(&format!(
        "REPORT RequestId: {request_id}\tDuration: {:.2} ms",
        started.elapsed().as_secs_f64() * 1000.0
    ));
    let log_result = settings
        .log_tail
        .then(|| base64::engine::general_purpose::STANDARD.encode(env.log_tail()));
    // Back in the pool before the caller hears the end, so a follow-up call can reuse it.
    lease.release(reusable);
    let (complete, body) = match result {
        Ok(()) => (
            InvokeComplete {
                log_result,
                ..Default::default()
            },
            None,
        ),
        Err(e) => (
            InvokeComplete {
                error_code: Some(e.error_type),
                error_details: Some(e.details),
                log_result,
            },
            e.body,
        ),
    };
    let _ = tx.send(InvokeEvent::Done(Box::new((complete, body)))).await;
}

/// Hands the invocation over and forwards the answer. Returns how it ended
/// and whether the environment may serve again.
async fn exchange(
    env: &Environment,
    pending: PendingInvocation,
    reply: oneshot::Receiver<RuntimeReply>,
    settings: &Settings,
    tx: &mpsc::Sender<InvokeEvent>,
) -> (Result<(), FunctionError>, bool) {
    let timeout = settings.timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let request_id = pending.request_id.clone();
    let timed_out = || {
        FunctionError::new(
            "Sandbox.Timedout",
            format!(
                "RequestId: {request_id} Error: Task timed out after {:.2} seconds",
                timeout.as_secs_f64()
            ),
        )
    };
    if env.invocations.send(Box::new(pending)).await.is_err() {
        return (Err(exit_error(env, &request_id)), false);
    }
    let reply = tokio::select! {
        r = reply => match r {
            Ok(r) => r,
            Err(_) => return (Err(exit_error(env, &request_id)), false),
        },
        () = env.exited.cancelled() => return (Err(exit_error(env, &request_id)), false),
        () = tokio::time::sleep_until(deadline) => return (Err(timed_out()), false),
    };
    let mut pieces = match reply {
        RuntimeReply::Buffered(body) => {
            let _ = tx.send(InvokeEvent::Data(body)).await;
            return (Ok(()), true);
        }
        RuntimeReply::Error { error_type, body } => {
            return (Err(FunctionError::from_runtime(error_type, body)), true)
        }
        RuntimeReply::Streaming(pieces) => pieces,
    };
    let mut total = 0usize;
    let mut paced_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            biased;
            piece = pieces.recv() => match piece {
                Some(StreamPiece::Data(mut data)) => {
                    let before = total;
                    total += data.len();
                    if let Some((kind, at)) = settings.fault {
                        let at = usize::try_from(at).unwrap_or(usize::MAX);
                        if (before..total).contains(&at) {
                            let head = data.split_to(at - before);
                            if !head.is_empty() {
                                let _ = tx.send(InvokeEvent::Data(head)).await;
                            }
                            settings.faults.fired(kind);
                            match kind {
                                FaultKind::KillAgent => {
                                    env.destroy();
                                    let _ = tokio::time::timeout(Duration::from_secs(10), env.exited.cancelled()).await;
                                    return (Err(exit_error(env, &request_id)), false);
                                }
                                FaultKind::FunctionError => {
                                    return (Err(FunctionError::new(
                                        "Function.InjectedFault",
                                        format!("RequestId: {request_id} Error: a fault injected at byte {at}"),
                                    )), false);
                                }
                                _ => {
                                    // A stall: nothing leaves for a while, then the rest does.
                                    let until = tokio::time::Instant::now() + settings.faults.config.stall_for;
                                    tokio::time::sleep_until(until.min(deadline)).await;
                                }
                            }
                        }
                    }
                    if total > MAX_STREAMED_RESPONSE {
                        return (Err(FunctionError::new(
                            "Function.ResponseSizeTooLarge",
                            format!("Response payload size exceeded maximum allowed payload size ({MAX_STREAMED_RESPONSE} bytes)."),
                        )), false);
                    }
                    if settings.throttle_streams && total > UNTHROTTLED_BYTES {
                        // Past the first 6 MB, bytes leave no faster than 2 MB/s.
                        let since = *paced_since.get_or_insert_with(tokio::time::Instant::now);
                        let due = Duration::from_secs_f64((total - UNTHROTTLED_BYTES) as f64 / THROTTLED_RATE);
                        tokio::time::sleep_until((since + due).min(deadline)).await;
                    }
                    // A caller that went away does not stop the function.
                    let _ = tx.send(InvokeEvent::Data(data)).await;
                }
                Some(StreamPiece::End) => return (Ok(()), true),
                Some(StreamPiece::Failed { error_type, body }) => {
                    return (Err(FunctionError::from_runtime(error_type, body)), true)
                }
                None => {
                    // The stream broke off without an end: did the runtime die?
                    let _ = tokio::time::timeout(Duration::from_secs(1), env.exited.cancelled()).await;
                    let error = if env.exited.is_cancelled() {
                        exit_error(env, &request_id)
                    } else {
                        FunctionError::new("Runtime.TruncatedResponse", "the runtime broke its response stream off".into())
                    };
                    return (Err(error), false);
                }
            },
            () = env.exited.cancelled() => return (Err(exit_error(env, &request_id)), false),
            () = tokio::time::sleep_until(deadline) => return (Err(timed_out()), false),
        }
    }
}

fn exit_error(env: &Environment, request_id: &str) -> FunctionError {
    if let Some((error_type, body)) = env
        .runtime
        .init_error
        .lock()
        .expect("lock poisoned")
        .clone()
    {
        return FunctionError::from_runtime(error_type, body.into());
    }
    FunctionError::new(
        "Runtime.ExitError",
        format!("RequestId: {request_id} Error: Runtime exited without providing a reason"),
    )
}

#[cfg(test)]
mod tests {
    use super::function_name;

    #[test]
    fn function_names_resolve_from_every_form() {
        for raw in [
            "my-fn",
            "my-fn:live",
            "123456789012:function:my-fn",
            "arn:aws:lambda:us-east-1:123456789012:function:my-fn:7",
        ] {
            assert_eq!(function_name(raw), "my-fn", "{raw}");
        }
    }
}
