//! A microVM's endpoint: a proxy on `127.0.0.1` that lets through only
//! requests with a live auth token for a port the token opens, strips the
//! `x-aws-proxy-*` headers and forwards to the microVM's loopback address,
//! streaming both ways (a shard's log is one long response).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http::header::{HeaderMap, HeaderName};
use http::{StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::tokens::{Denial, AUTH_HEADER, PORT_HEADER, PROXY_HEADER_PREFIX};
use super::vm::Microvm;

/// The HTTP client that forwards to microVMs.
pub type Forwarder = Client<HttpConnector, Body>;

/// A forwarder that keeps no idle connection: a microVM's server may close
/// one at any time, and a microVM's address outlives nothing.
pub fn forwarder() -> Forwarder {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector)
}

/// Headers that describe one connection, not the message: never forwarded.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

#[derive(Clone)]
struct Proxy {
    vm: Arc<Microvm>,
    forwarder: Forwarder,
    cut_after: Option<u64>,
}

/// Serves `vm`'s endpoint on `listener` until `stop` fires; requests in
/// flight then end with the microVM's servers.
pub async fn serve(
    listener: TcpListener,
    vm: Arc<Microvm>,
    forwarder: Forwarder,
    cut_after: Option<u64>,
    stop: CancellationToken,
) {
    let id = vm.id.clone();
    let router = Router::new().fallback(forward).with_state(Proxy {
        vm,
        forwarder,
        cut_after,
    });
    use axum::serve::ListenerExt;
    let served = axum::serve(
        listener.tap_io(crate::net::no_delay),
        router.into_make_service(),
    )
    .with_graceful_shutdown(async move { stop.cancelled().await })
    .await;
    if let Err(e) = served {
        tracing::warn!(microvm = %id, error = %e, "microVM endpoint failed");
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn forward(State(proxy): State<Proxy>, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    let decision = proxy.vm.tokens.lock().expect("lock poisoned").authorize(
        header_str(&parts.headers, AUTH_HEADER),
        header_str(&parts.headers, PORT_HEADER),
    );
    let port = match decision {
        Ok(port) => port,
        Err(denial) => return refuse(&denial),
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    parts.uri = match Uri::try_from(format!("http://{}:{port}{path}", proxy.vm.bind_ip)) {
        Ok(uri) => uri,
        Err(e) => return answer(StatusCode::BAD_REQUEST, format!("bad request target: {e}")),
    };
    strip(&mut parts.headers);
    match proxy
        .forwarder
        .request(Request::from_parts(parts, body))
        .await
    {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            for name in HOP_BY_HOP {
                parts.headers.remove(name);
            }
            match proxy.cut_after {
                // Body::new passes each frame on as it arrives: nothing is buffered.
                None => Response::from_parts(parts, Body::new(body)),
                Some(limit) => Response::from_parts(parts, cut_after(body, limit)),
            }
        }
        Err(e) => answer(
            StatusCode::BAD_GATEWAY,
            format!("microVM {} did not answer on port {port}: {e}", proxy.vm.id),
        ),
    }
}

/// Passes `limit` bytes of `body` on, then breaks the response off as a
/// failing connection would (fault injection, for clients that must resume).
/// The bytes before the break reach the client: the server is given a turn
/// to flush them first (hyper drops what it has not written when a body
/// fails), so a reader that fell behind by more than `limit` still gets
/// `limit` bytes a connection, as over a real connection that breaks.
fn cut_after(body: hyper::body::Incoming, limit: u64) -> Body {
    use futures::StreamExt;
    use http_body_util::BodyExt;
    let mut sent = 0u64;
    let stream = body.into_data_stream().flat_map(move |chunk| {
        let (pieces, cut) = match chunk {
            Err(e) => (vec![Err(std::io::Error::other(e))], false),
            Ok(_) if sent >= limit => (vec![], true),
            Ok(chunk) => {
                let keep = (limit - sent).min(chunk.len() as u64) as usize;
                sent += keep as u64;
                // Broken off mid-chunk: an error, even if the log ends with this chunk.
                (vec![Ok(chunk.slice(..keep))], keep < chunk.len())
            }
        };
        let broken = futures::stream::iter(cut.then_some(())).then(|()| async {
            tokio::task::yield_now().await;
            Err(std::io::Error::other("connection cut by fault injection"))
        });
        futures::stream::iter(pieces).chain(broken)
    });
    Body::from_stream(stream)
}

/// Removes what only the proxy reads: the `x-aws-proxy-*` headers and the
/// hop-by-hop ones.
fn strip(headers: &mut HeaderMap) {
    let proxy_headers: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with(PROXY_HEADER_PREFIX))
        .cloned()
        .collect();
    for name in proxy_headers {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn refuse(denial: &Denial) -> Response {
    let status = match denial {
        Denial::Unauthorized => StatusCode::UNAUTHORIZED,
        Denial::BadPort(_) => StatusCode::BAD_REQUEST,
        Denial::PortNotAllowed(_) => StatusCode::FORBIDDEN,
    };
    answer(status, denial.to_string())
}

fn answer(status: StatusCode, message: String) -> Response {
    (
        status,
        axum::Json(serde_json::json!({ "message": message })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_and_hop_by_hop_headers_are_stripped_and_the_rest_kept() {
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("x-aws-proxy-auth", "t"),
            ("x-aws-proxy-port", "8080"),
            ("x-aws-proxy-anything", "x"),
            ("connection", "keep-alive"),
            ("x-custom", "kept"),
            ("content-length", "3"),
        ] {
            headers.insert(HeaderName::from_static(k), v.parse().unwrap());
        }
        strip(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "x-custom"]);
    }

    /// Serves `router` on a loopback port; its address.
    async fn serve_on_loopback(router: Router) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        addr
    }

    #[tokio::test]
    async fn a_cut_response_delivers_its_bytes_before_it_breaks() {
        // The upstream sends 1,000 bytes at once, as a log read by a reader
        // that fell behind does; cut after 300, the client gets those 300.
        let upstream = Router::new().fallback(|| async {
            let chunk: std::io::Result<bytes::Bytes> = Ok(vec![b'x'; 1000].into());
            Body::from_stream(futures::stream::iter([chunk]))
        });
        let upstream = serve_on_loopback(upstream).await;
        let cutting = Router::new().fallback(move || async move {
            let uri: Uri = format!("http://{upstream}/").parse().unwrap();
            let resp = forwarder().get(uri).await.unwrap();
            Response::new(cut_after(resp.into_body(), 300))
        });
        let cutting = serve_on_loopback(cutting).await;
        let mut resp = reqwest::get(format!("http://{cutting}/")).await.unwrap();
        let mut got = 0;
        let broke = loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => got += chunk.len(),
                Ok(None) => break false,
                Err(_) => break true,
            }
        };
        assert_eq!((got, broke), (300, true));
    }
}
