//! Dependency caches inside a shard: each folder is restored before the
//! command and saved after it passed, through presigned links. A cache only
//! speeds things up: whatever goes wrong with one is said on the shard's
//! stderr and otherwise ignored.

use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::shard::FrameSender;
use super::workspace::Workspace;
use crate::protocol::{ArchiveFormat, CacheSpec, Frame, OutputStream};

/// Where `cache` lives in this shard.
fn folder(cache: &CacheSpec, ws: &Workspace, workdir: &Path) -> PathBuf {
    match cache.path.strip_prefix("~/") {
        Some(rel) => ws.home.join(rel),
        None => workdir.join(&cache.path),
    }
}

async fn say(frames: &FrameSender, line: String) {
    let _ = frames
        .send(Frame::Output {
            stream: OutputStream::Stderr,
            data: Bytes::from(format!("mvm-shard: {line}\n")),
        })
        .await;
}

/// Restores every cache the store has; a broken one is removed and ignored.
pub async fn restore(caches: &[CacheSpec], ws: &Workspace, workdir: &Path, frames: &FrameSender) {
    for (i, cache) in caches.iter().enumerate() {
        let Some(url) = &cache.restore else {
            continue;
        };
        let dest = folder(cache, ws, workdir);
        let file = ws.dir.join(format!("cache-{i}.archive"));
        let restored = fetch(url, &file, &dest).await;
        let _ = tokio::fs::remove_file(&file).await;
        match restored {
            Ok(entries) => {
                say(
                    frames,
                    format!(
                        "cache {} restored ({})",
                        cache.path,
                        crate::report::plural(entries, "file")
                    ),
                )
                .await
            }
            Err(reason) => {
                let _ = tokio::fs::remove_dir_all(&dest).await;
                say(
                    frames,
                    format!(
                        "cache {} ignored (it will be rebuilt): {reason}",
                        cache.path
                    ),
                )
                .await;
            }
        }
    }
}

async fn fetch(url: &str, file: &Path, dest: &Path) -> Result<usize, String> {
    super::download::to_file(url, file, None).await?;
    let (file, dest) = (file.to_path_buf(), dest.to_path_buf());
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dest).map_err(|e| e.to_string())?;
        let reader =
            std::io::BufReader::new(std::fs::File::open(&file).map_err(|e| e.to_string())?);
        crate::source::unpack(reader, ArchiveFormat::TarZst, &dest, 0).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Saves every cache the store lacks (after the command passed); the first
/// shard to finish its upload wins, later ones are refused by the store.
pub async fn save(caches: &[CacheSpec], ws: &Workspace, workdir: &Path, frames: &FrameSender) {
    for cache in caches {
        let Some(url) = &cache.save else {
            continue;
        };
        let dir = folder(cache, ws, workdir);
        // The command may have made the folder a link out of its workspace
        // (to /proc/self, say): only a real folder inside it is saved.
        if !dir
            .canonicalize()
            .is_ok_and(|real| real.starts_with(&ws.dir))
            && dir.exists()
        {
            say(
                frames,
                format!(
                    "cache {} not saved: it leads outside the shard's workspace",
                    cache.path
                ),
            )
            .await;
            continue;
        }
        if !dir.is_dir() {
            say(
                frames,
                format!(
                    "cache {} not saved: the command did not make it",
                    cache.path
                ),
            )
            .await;
            continue;
        }
        let line = match upload(url, dir).await {
            Ok(true) => format!("cache {} saved", cache.path),
            Ok(false) => format!("cache {} already saved by another shard", cache.path),
            Err(reason) => format!("cache {} not saved: {reason}", cache.path),
        };
        say(frames, line).await;
    }
}

/// PUTs the folder packed; false when another upload got there first.
async fn upload(url: &str, dir: PathBuf) -> Result<bool, String> {
    let packed = tokio::task::spawn_blocking(move || crate::source::pack_tree(&dir))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let file = tokio::fs::File::open(packed.path())
        .await
        .map_err(|e| e.to_string())?;
    let body =
        reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024));
    let shown = url.split('?').next().unwrap_or(url);
    let response = reqwest::Client::new()
        .put(url)
        .header(reqwest::header::CONTENT_LENGTH, packed.size)
        // Only the first upload of a key wins.
        .header(reqwest::header::IF_NONE_MATCH, "*")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("upload to {shown} failed: {}", e.without_url()))?;
    match response.status() {
        s if s.is_success() => Ok(true),
        reqwest::StatusCode::PRECONDITION_FAILED | reqwest::StatusCode::CONFLICT => Ok(false),
        s => Err(format!("upload to {shown} answered {s}")),
    }
}
