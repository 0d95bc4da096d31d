//! Fetching a source archive from a short-lived link into the workspace.

use std::path::Path;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;

/// Largest archive the agent downloads (Lambda's /tmp is at most 10 GB).
const MAX_ARCHIVE_BYTES: u64 = 8 * 1024 * 1024 * 1024;

/// Streams `url` into `file`; the error text says what failed, for the shard's result.
pub async fn to_file(url: &str, file: &Path) -> Result<(), String> {
    // The link may carry a token in its query: never repeat it in a message.
    let shown = url.split('?').next().unwrap_or(url);
    let resp = reqwest::get(url).await.map_err(|e| {
        format!(
            "cannot download the source from {shown}: {}",
            e.without_url()
        )
    })?;
    if !resp.status().is_success() {
        return Err(format!(
            "downloading the source from {shown} answered {} (links expire within minutes)",
            resp.status()
        ));
    }
    let mut out = tokio::fs::File::create(file)
        .await
        .map_err(|e| format!("cannot create {}: {e}", file.display()))?;
    let mut body = resp.bytes_stream();
    let mut total = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            format!(
                "source download from {shown} broke off: {}",
                e.without_url()
            )
        })?;
        total += chunk.len() as u64;
        if total > MAX_ARCHIVE_BYTES {
            return Err(format!(
                "source archive at {shown} is over {MAX_ARCHIVE_BYTES} bytes"
            ));
        }
        out.write_all(&chunk)
            .await
            .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    }
    out.flush().await.map_err(|e| e.to_string())?;
    Ok(())
}
