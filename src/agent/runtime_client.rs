//! A small Lambda Runtime API client that streams raw response chunks.
//!
//! The `lambda_runtime` crate prefixes streamed bodies with an HTTP-integration
//! prelude that SDK callers would receive as data, and writes late errors into
//! the body; this client sends exactly our frames and reports late errors in
//! the trailers the Runtime API defines.

use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::protocol::runtime_api as api;

type Body = BoxBody<Bytes, Infallible>;

/// Why talking to the Runtime API failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// `AWS_LAMBDA_RUNTIME_API` is not set: we are not inside Lambda.
    #[error("AWS_LAMBDA_RUNTIME_API is not set: `mvm-shard agent` is the bootstrap of a Lambda image and runs only under Lambda or `mvm-shard emulate`")]
    NotInLambda,
    /// The HTTP exchange failed.
    #[error("runtime API request to {path} failed: {message}")]
    Transport {
        /// The route.
        path: String,
        /// The cause.
        message: String,
    },
    /// The Runtime API answered with an unexpected status.
    #[error("runtime API answered {status} to {path}: {body}")]
    Status {
        /// The route.
        path: String,
        /// The status.
        status: StatusCode,
        /// Its body, for the log.
        body: String,
    },
    /// The next-invocation answer lacked a required header.
    #[error("runtime API invocation lacks header {0}")]
    MissingHeader(&'static str),
}

/// One invocation handed to the runtime.
#[derive(Debug)]
pub struct Invocation {
    /// Lambda's request id, used in the response route.
    pub request_id: String,
    /// When Lambda will end the invocation.
    pub deadline: SystemTime,
    /// The raw request payload.
    pub payload: Bytes,
}

/// A client bound to one Runtime API address.
#[derive(Clone)]
pub struct RuntimeClient {
    base: String,
    http: Client<HttpConnector, Body>,
}

/// The sending half of a streamed response.
pub struct ResponseStream {
    tx: mpsc::Sender<http_body::Frame<Bytes>>,
}

impl ResponseStream {
    /// Sends one chunk; fails when the Runtime API stopped reading.
    pub async fn send(&self, chunk: Bytes) -> Result<(), ResponseClosed> {
        self.tx
            .send(http_body::Frame::data(chunk))
            .await
            .map_err(|_| ResponseClosed)
    }

    /// Ends the stream with an error in the trailers, after data was sent.
    pub async fn fail(self, error_type: &str, message: &str) {
        let mut trailers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(error_type) {
            trailers.insert(api::ERROR_TYPE, v);
        }
        let body = base64::engine::general_purpose::STANDARD.encode(
            serde_json::json!({ "errorType": error_type, "errorMessage": message }).to_string(),
        );
        if let Ok(v) = HeaderValue::from_str(&body) {
            trailers.insert(api::ERROR_BODY, v);
        }
        let _ = self.tx.send(http_body::Frame::trailers(trailers)).await;
    }
}

/// The Runtime API went away while we were streaming.
#[derive(Debug, thiserror::Error)]
#[error("the runtime API closed the response stream")]
pub struct ResponseClosed;

impl RuntimeClient {
    /// A client for the address Lambda puts in `AWS_LAMBDA_RUNTIME_API`.
    pub fn from_env() -> Result<Self, RuntimeError> {
        let addr =
            std::env::var("AWS_LAMBDA_RUNTIME_API").map_err(|_| RuntimeError::NotInLambda)?;
        Ok(Self::new(&addr))
    }

    /// A client for `host:port`.
    pub fn new(addr: &str) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(300))
            .build(connector);
        RuntimeClient {
            base: format!("http://{addr}"),
            http,
        }
    }

    /// Waits for the next invocation (no timeout: Lambda freezes us meanwhile).
    pub async fn next(&self) -> Result<Invocation, RuntimeError> {
        let req = self.request(Method::GET, api::NEXT, full(Bytes::new()));
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| transport(api::NEXT, e))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| transport(api::NEXT, e))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(RuntimeError::Status {
                path: api::NEXT.into(),
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        let header = |name: &'static str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .ok_or(RuntimeError::MissingHeader(name))
        };
        let request_id = header(api::REQUEST_ID)?;
        let deadline_ms: u64 = header(api::DEADLINE_MS)?
            .parse()
            .map_err(|_| RuntimeError::MissingHeader(api::DEADLINE_MS))?;
        Ok(Invocation {
            request_id,
            deadline: UNIX_EPOCH + Duration::from_millis(deadline_ms),
            payload: body,
        })
    }

    /// Starts a streamed response. Chunks sent on the returned stream go out as
    /// they come; the future resolves once the Runtime API acknowledged the body.
    pub fn stream_response(
        &self,
        request_id: &str,
    ) -> (
        ResponseStream,
        impl std::future::Future<Output = Result<(), RuntimeError>> + Send + 'static,
    ) {
        let (tx, rx) = mpsc::channel(16);
        let body = BodyExt::boxed(StreamBody::new(
            ReceiverStream::new(rx).map(Ok::<_, Infallible>),
        ));
        let path = api::response_path(request_id);
        let mut req = self.request(Method::POST, &path, body);
        let headers = req.headers_mut();
        headers.insert(api::RESPONSE_MODE, HeaderValue::from_static(api::STREAMING));
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert(
            http::header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(
            http::header::TRAILER,
            HeaderValue::from_str(&format!("{}, {}", api::ERROR_TYPE, api::ERROR_BODY))
                .expect("static header names are valid"),
        );
        let http = self.http.clone();
        let done = async move { expect_accepted(&path, http.request(req).await).await };
        (ResponseStream { tx }, done)
    }

    /// Reports an invocation error before any response was sent.
    pub async fn post_error(
        &self,
        request_id: &str,
        error_type: &str,
        message: &str,
    ) -> Result<(), RuntimeError> {
        let path = api::error_path(request_id);
        self.post_error_to(path, error_type, message).await
    }

    /// Reports that initialisation failed; Lambda then resets the environment.
    pub async fn init_error(&self, error_type: &str, message: &str) -> Result<(), RuntimeError> {
        self.post_error_to(api::INIT_ERROR.to_string(), error_type, message)
            .await
    }

    async fn post_error_to(
        &self,
        path: String,
        error_type: &str,
        message: &str,
    ) -> Result<(), RuntimeError> {
        let body = serde_json::json!({
            "errorMessage": message,
            "errorType": error_type,
            "stackTrace": [],
        });
        let mut req = self.request(Method::POST, &path, full(Bytes::from(body.to_string())));
        if let Ok(v) = HeaderValue::from_str(error_type) {
            req.headers_mut().insert(api::ERROR_TYPE, v);
        }
        expect_accepted(&path, self.http.request(req).await).await
    }

    fn request(&self, method: Method, path: &str, body: Body) -> Request<Body> {
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = format!("{}{}", self.base, path)
            .parse()
            .expect("runtime API address forms a valid URI");
        req
    }
}

async fn expect_accepted(
    path: &str,
    resp: Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>,
) -> Result<(), RuntimeError> {
    let resp = resp.map_err(|e| transport(path, e))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Err(RuntimeError::Status {
        path: path.to_string(),
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).boxed()
}

fn transport(path: &str, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Transport {
        path: path.to_string(),
        message: e.to_string(),
    }
}
