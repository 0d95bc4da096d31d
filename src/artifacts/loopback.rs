//! Serving archives to the agents of a local run over loopback, streamed
//! from their files: no size limit but the disk.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::{ArtifactError, CacheLinks, PackedArchive};

/// What a name on the server stands for.
#[derive(Debug, Clone)]
enum Entry {
    /// A file to GET.
    File(PathBuf),
    /// Where one PUT may create a file (a cache to save); later ones get 412.
    Upload(PathBuf),
}

type Served = Arc<Mutex<HashMap<String, Entry>>>;

/// A loopback HTTP server handing out archives under unguessable paths.
pub struct LoopbackServer {
    base: String,
    cache_dir: Option<PathBuf>,
    served: Served,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl LoopbackServer {
    /// Binds `127.0.0.1:0`; nothing is served until [`LoopbackServer::serve`].
    /// Caches are kept in `cache_dir`, when there is one.
    pub async fn start(cache_dir: Option<PathBuf>) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let served = Served::default();
        let router = axum::Router::new()
            .route(
                "/artifacts/{name}",
                axum::routing::get(download).put(upload),
            )
            .with_state(served.clone());
        let stop = tokio_util::sync::CancellationToken::new();
        let signal = stop.clone();
        let task = tokio::spawn(async move {
            use axum::serve::ListenerExt;
            axum::serve(
                listener.tap_io(crate::net::no_delay),
                router.into_make_service(),
            )
            .with_graceful_shutdown(async move { signal.cancelled().await })
            .await
        });
        Ok(LoopbackServer {
            base,
            cache_dir,
            served,
            stop,
            task,
        })
    }

    /// Serves `archive` (which must outlive the run) and returns its link.
    pub fn serve(&self, archive: &PackedArchive) -> String {
        self.add(Entry::File(archive.path().to_path_buf()))
    }

    fn add(&self, entry: Entry) -> String {
        let name = format!("{}.tar.zst", uuid::Uuid::new_v4().simple());
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), entry);
        format!("{}/artifacts/{name}", self.base)
    }

    /// A GET link when the cache `key` was saved in the cache folder, else a PUT link to save it.
    pub async fn cache(&self, key: &str) -> Result<CacheLinks, ArtifactError> {
        let Some(dir) = &self.cache_dir else {
            return Err(ArtifactError::Config {
                location: "local cache".into(),
                message: "local caches live in the repository's git directory, and this is no git repository".into(),
            });
        };
        tokio::fs::create_dir_all(dir).await?;
        let file = dir.join(format!("{key}.tar.zst"));
        Ok(if tokio::fs::try_exists(&file).await? {
            CacheLinks {
                restore: Some(self.add(Entry::File(file))),
                ..CacheLinks::default()
            }
        } else {
            CacheLinks {
                save: Some(self.add(Entry::Upload(file))),
                ..CacheLinks::default()
            }
        })
    }

    /// Stops serving.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn download(State(served): State<Served>, Path(name): Path<String>) -> Response {
    let path = served
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&name)
        .cloned();
    let Some(Entry::File(path)) = path else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match tokio::fs::File::open(&path).await {
        Ok(file) => {
            let len = file.metadata().await.map(|m| m.len()).ok();
            let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
                file,
                64 * 1024,
            ));
            let mut response = body.into_response();
            if let Some(len) = len {
                response
                    .headers_mut()
                    .insert(axum::http::header::CONTENT_LENGTH, len.into());
            }
            response
        }
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Writes the body next to the destination, then links it into place: the
/// first complete upload wins, and no reader ever sees half a file.
async fn upload(
    State(served): State<Served>,
    Path(name): Path<String>,
    body: axum::body::Body,
) -> Response {
    let entry = served
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&name)
        .cloned();
    let Some(Entry::Upload(dest)) = entry else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let partial = dest.with_extension(format!("part-{}", uuid::Uuid::new_v4().simple()));
    let written = write_body(&partial, body).await;
    let placed = match written {
        Ok(()) => match tokio::fs::hard_link(&partial, &dest).await {
            Ok(()) => StatusCode::OK,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                StatusCode::PRECONDITION_FAILED
            }
            Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
        },
        Err(_) => StatusCode::BAD_REQUEST,
    };
    let _ = tokio::fs::remove_file(&partial).await;
    placed.into_response()
}

async fn write_body(path: &std::path::Path, body: axum::body::Body) -> std::io::Result<()> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    let mut out = tokio::fs::File::create(path).await?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        out.write_all(&chunk.map_err(std::io::Error::other)?)
            .await?;
    }
    out.flush().await
}
