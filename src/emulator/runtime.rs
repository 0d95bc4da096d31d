//! The Runtime API one emulated environment serves to its runtime, on a
//! loopback port of its own (as `AWS_LAMBDA_RUNTIME_API` names it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::Router;
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::protocol::runtime_api as api;

/// Largest buffered response Lambda accepts from a runtime.
pub const MAX_BUFFERED_RESPONSE: usize = 6 * 1024 * 1024;

/// An invocation waiting for the runtime's `next`.
#[derive(Debug)]
pub struct PendingInvocation {
    /// Lambda request id.
    pub request_id: String,
    /// The caller's payload.
    pub payload: Bytes,
    /// Deadline handed to the runtime.
    pub deadline: SystemTime,
    /// ARN of the invoked function.
    pub function_arn: String,
    /// Base64 client context, when given.
    pub client_context: Option<String>,
    /// Where the runtime's answer goes.
    pub reply: oneshot::Sender<RuntimeReply>,
}

/// What the runtime answered to one invocation.
#[derive(Debug)]
pub enum RuntimeReply {
    /// A whole response body.
    Buffered(Bytes),
    /// A streamed response: pieces as they arrive.
    Streaming(mpsc::Receiver<StreamPiece>),
    /// An error reported through `/error`, or a buffered response over the limit.
    Error {
        /// `Lambda-Runtime-Function-Error-Type`.
        error_type: String,
        /// The error document.
        body: Bytes,
    },
}

/// One piece of a streamed response.
#[derive(Debug)]
pub enum StreamPiece {
    /// Body bytes.
    Data(Bytes),
    /// The body ended normally.
    End,
    /// The body ended with an error in its trailers.
    Failed {
        /// The error type trailer.
        error_type: String,
        /// The decoded error body trailer.
        body: Bytes,
    },
}

/// Shared state of one environment's Runtime API.
pub struct RuntimeApi {
    next: tokio::sync::Mutex<mpsc::Receiver<Box<PendingInvocation>>>,
    waiting: Mutex<HashMap<String, oneshot::Sender<RuntimeReply>>>,
    /// Set when the runtime posted `/init/error`.
    pub init_error: Mutex<Option<(String, String)>>,
    on_init_error: CancellationToken,
    shutdown: CancellationToken,
}

impl RuntimeApi {
    /// State fed by `invocations`; `on_init_error` is fired when init fails,
    /// and a `next` still waiting ends when `shutdown` fires.
    pub fn new(
        invocations: mpsc::Receiver<Box<PendingInvocation>>,
        on_init_error: CancellationToken,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(RuntimeApi {
            next: tokio::sync::Mutex::new(invocations),
            waiting: Mutex::new(HashMap::new()),
            init_error: Mutex::new(None),
            on_init_error,
            shutdown,
        })
    }

    fn take_waiting(&self, id: &str) -> Option<oneshot::Sender<RuntimeReply>> {
        self.waiting.lock().expect("lock poisoned").remove(id)
    }
}

/// The Runtime API of one environment: the routes every environment shares,
/// and this environment's state, handed to them as an extension.
#[derive(Clone)]
pub struct RuntimeService {
    routes: Router,
    state: Arc<RuntimeApi>,
}

impl RuntimeService {
    /// The Runtime API served for `state`. The route table is built once:
    /// a table per environment cost several KB with a thousand in flight.
    pub fn new(state: Arc<RuntimeApi>) -> Self {
        static ROUTES: std::sync::OnceLock<Router> = std::sync::OnceLock::new();
        let routes = ROUTES.get_or_init(|| {
            Router::new()
                .route(api::NEXT, get(next))
                .route(
                    "/2018-06-01/runtime/invocation/{id}/response",
                    post(response),
                )
                .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
                .route(api::INIT_ERROR, post(init_error))
        });
        RuntimeService {
            routes: routes.clone(),
            state,
        }
    }
}

impl tower_service::Service<Request> for RuntimeService {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = <Router as tower_service::Service<Request>>::Future;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        req.extensions_mut().insert(self.state.clone());
        tower_service::Service::call(&mut self.routes, req)
    }
}

async fn next(Extension(rt): Extension<Arc<RuntimeApi>>) -> Response {
    let next = async { rt.next.lock().await.recv().await };
    let inv = tokio::select! {
        inv = next => inv,
        () = rt.shutdown.cancelled() => None,
    };
    let Some(inv) = inv.map(|boxed| *boxed) else {
        return (StatusCode::GONE, "environment is shutting down").into_response();
    };
    let deadline_ms = inv
        .deadline
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        .to_string();
    let trace = format!(
        "Root=1-{:08x}-{};Parent={};Sampled=0",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        &uuid::Uuid::new_v4().simple().to_string()[..24],
        &uuid::Uuid::new_v4().simple().to_string()[..16],
    );
    let mut resp = Response::new(Body::from(inv.payload));
    let headers = resp.headers_mut();
    let mut set = |name: &'static str, value: &str| {
        if let Ok(v) = http::HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    };
    set(api::REQUEST_ID, &inv.request_id);
    set(api::DEADLINE_MS, &deadline_ms);
    set(api::FUNCTION_ARN, &inv.function_arn);
    set(api::TRACE_ID, &trace);
    if let Some(cc) = &inv.client_context {
        set(api::CLIENT_CONTEXT, cc);
    }
    set("content-type", "application/json");
    rt.waiting
        .lock()
        .expect("lock poisoned")
        .insert(inv.request_id, inv.reply);
    resp
}

fn invalid_request_id(id: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(serde_json::json!({
            "errorMessage": format!("Invalid request ID: {id}"),
            "errorType": "InvalidRequestID",
        })),
    )
        .into_response()
}

fn accepted() -> Response {
    (
        StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({ "status": "OK" })),
    )
        .into_response()
}

async fn response(
    Extension(rt): Extension<Arc<RuntimeApi>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let Some(reply) = rt.take_waiting(&id) else {
        return invalid_request_id(&id);
    };
    let streaming = req
        .headers()
        .get(api::RESPONSE_MODE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(api::STREAMING.as_bytes()));
    let mut body = req.into_body();
    if !streaming {
        return match http_body_util::Limited::new(body, MAX_BUFFERED_RESPONSE)
            .collect()
            .await
        {
            Ok(collected) => {
                let _ = reply.send(RuntimeReply::Buffered(collected.to_bytes()));
                accepted()
            }
            Err(_) => {
                let _ = reply.send(RuntimeReply::Error {
                    error_type: "Function.ResponseSizeTooLarge".into(),
                    body: Bytes::from_static(b"{\"errorMessage\":\"Response payload size exceeded maximum allowed payload size (6291556 bytes).\",\"errorType\":\"Function.ResponseSizeTooLarge\"}"),
                });
                (StatusCode::PAYLOAD_TOO_LARGE, "response too large").into_response()
            }
        };
    }
    let (tx, rx) = mpsc::channel(16);
    if reply.send(RuntimeReply::Streaming(rx)).is_err() {
        return (StatusCode::GONE, "invocation is over").into_response();
    }
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        // A caller that went away does not stop Lambda from reading on.
                        let _ = tx.send(StreamPiece::Data(data)).await;
                        continue;
                    }
                    Err(frame) => frame,
                };
                if let Ok(trailers) = frame.into_trailers() {
                    if let Some(piece) = trailer_error(&trailers) {
                        let _ = tx.send(piece).await;
                        return accepted();
                    }
                }
            }
            Some(Err(e)) => {
                // The runtime broke the stream off: dropping `tx` without `End` says so.
                tracing::debug!(error = %e, "runtime response stream broke off");
                return (StatusCode::BAD_REQUEST, "response stream broke off").into_response();
            }
            None => {
                let _ = tx.send(StreamPiece::End).await;
                return accepted();
            }
        }
    }
}

fn trailer_error(trailers: &HeaderMap) -> Option<StreamPiece> {
    let error_type = trailers.get(api::ERROR_TYPE)?.to_str().ok()?.to_string();
    let body = trailers
        .get(api::ERROR_BODY)
        .and_then(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_bytes())
                .ok()
        })
        .unwrap_or_default();
    Some(StreamPiece::Failed {
        error_type,
        body: body.into(),
    })
}

async fn error(
    Extension(rt): Extension<Arc<RuntimeApi>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(reply) = rt.take_waiting(&id) else {
        return invalid_request_id(&id);
    };
    let error_type = error_type_of(&headers, &body);
    let _ = reply.send(RuntimeReply::Error { error_type, body });
    accepted()
}

async fn init_error(
    Extension(rt): Extension<Arc<RuntimeApi>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let error_type = error_type_of(&headers, &body);
    *rt.init_error.lock().expect("lock poisoned") =
        Some((error_type, String::from_utf8_lossy(&body).into_owned()));
    rt.on_init_error.cancel();
    accepted()
}

fn error_type_of(headers: &HeaderMap, body: &[u8]) -> String {
    headers
        .get(api::ERROR_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            serde_json::from_slice::<serde_json::Value>(body)
                .ok()?
                .get("errorType")?
                .as_str()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "Unhandled".into())
}
