//! The emulator's API handed to an AWS SDK client in the same process, with
//! no socket between them: how `run --local` reaches its own emulator.
//!
//! The SDK builds, signs and sends its requests and decodes the answers as it
//! does against Lambda; only the hop between its HTTP layer and the
//! emulator's routes is a function call instead of an HTTP/1.1 connection.
//! Each connection costs two hyper connections' buffers and tasks (the SDK's
//! and the emulator's end, about 50 KB together): with a thousand shards in
//! flight that hop was half of the invoker's memory. A separate
//! `mvm-shard emulate` is still reached over TCP.

use std::sync::Mutex;
use std::task::{Context, Poll};

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use axum::Router;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tower_service::Service;

/// An SDK HTTP client whose every request is answered by `router`.
pub fn http_client(router: Router) -> SharedHttpClient {
    SharedHttpClient::new(InProcess { router })
}

#[derive(Clone)]
struct InProcess {
    router: Router,
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InProcess")
    }
}

impl HttpClient for InProcess {
    fn http_connector(
        &self,
        _settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(self.clone())
    }
}

impl HttpConnector for InProcess {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let mut router = self.router.clone();
        HttpConnectorFuture::new(async move {
            let mut request = request
                .try_into_http1x()
                .map_err(|e| ConnectorError::user(e.into()))?;
            // What hyper's client would add: routes may read it.
            if let Some(authority) = request.uri().authority().cloned() {
                if let Ok(host) = http::HeaderValue::from_str(authority.as_str()) {
                    request
                        .headers_mut()
                        .entry(http::header::HOST)
                        .or_insert(host);
                }
            }
            // On a task of its own, as a server connection would be: starting
            // an environment must not wait for the caller's other work.
            let response = match tokio::spawn(router.call(request)).await {
                Ok(Ok(response)) => response,
                Ok(Err(never)) => match never {},
                Err(e) => return Err(ConnectorError::other(e.into(), None)),
            };
            let response = response.map(|body| SdkBody::from_body_1_x(SyncBody(Mutex::new(body))));
            response
                .try_into()
                .map_err(|e: aws_smithy_runtime_api::http::HttpError| {
                    ConnectorError::other(e.into(), None)
                })
        })
    }
}

/// An axum body made `Sync`, as the SDK's bodies must be: it is only ever
/// polled through `&mut`, so the lock is never contended.
struct SyncBody(Mutex<axum::body::Body>);

impl SyncBody {
    fn body(&mut self) -> &mut axum::body::Body {
        self.0.get_mut().unwrap_or_else(|p| p.into_inner())
    }
}

impl Body for SyncBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        std::pin::Pin::new(self.get_mut().body()).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.lock().is_ok_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.0.lock().map(|b| b.size_hint()).unwrap_or_default()
    }
}
