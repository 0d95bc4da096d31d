//! Fetching an archive from a short-lived link into the workspace, streamed
//! to disk and checked against the hash the request names.

use std::path::Path;

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Largest archive the agent downloads (Lambda's /tmp is at most 10 GB).
const MAX_ARCHIVE_BYTES: u64 = 8 * 1024 * 1024 * 1024;

/// Streams `url` into `file`; when `sha256` is given the bytes must hash to
/// it. The error text says what failed, for the shard's result.
pub async fn to_file(url: &str, file: &Path, sha256: Option<&str>) -> Result<(), String> {
    // The link may carry a token in its query: never repeat it in a message.
    let shown = url.split('?').next().unwrap_or(url);
    let resp = reqwest::get(url).await.map_err(|e| {
        format!(
            "cannot download the archive from {shown}: {}",
            e.without_url()
        )
    })?;
    if !resp.status().is_success() {
        return Err(format!(
            "downloading the archive from {shown} answered {} (links expire)",
            resp.status()
        ));
    }
    let mut out = tokio::io::BufWriter::with_capacity(
        256 * 1024,
        tokio::fs::File::create(file)
            .await
            .map_err(|e| format!("cannot create {}: {e}", file.display()))?,
    );
    let mut hasher = Sha256::new();
    let mut body = resp.bytes_stream();
    let mut total = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            format!(
                "archive download from {shown} broke off: {}",
                e.without_url()
            )
        })?;
        total += chunk.len() as u64;
        if total > MAX_ARCHIVE_BYTES {
            return Err(format!(
                "archive at {shown} is over {MAX_ARCHIVE_BYTES} bytes"
            ));
        }
        hasher.update(&chunk);
        out.write_all(&chunk)
            .await
            .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    }
    out.flush().await.map_err(|e| e.to_string())?;
    if let Some(expected) = sha256 {
        let got = crate::artifacts::hex(&hasher.finalize());
        if !got.eq_ignore_ascii_case(expected) {
            return Err(format!(
                "the archive from {shown} has SHA-256 {got}, not the {expected} the invoker packed ({total} bytes arrived)"
            ));
        }
    }
    Ok(())
}
