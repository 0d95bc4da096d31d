//! The MicroVM mode's replay log ([`ReplayLog`]): the shard's encoded frame
//! stream, kept whole so that any reader gets it from any byte offset, live,
//! as often as it reconnects.
//!
//! The bytes live in an unlinked temporary file in the scratch root, not in
//! memory. A shard's log can reach hundreds of megabytes; in memory that
//! would either compete with the tests for the microVM's RAM or need a bound
//! past which a reconnecting reader could no longer be served, while the
//! page cache already keeps the recent part that live readers ask for. The
//! file has no name, so the shard's sweep of the scratch root cannot remove
//! it, and the kernel frees it when the agent exits. If the disk fills up the
//! log stops growing and ends without a result frame, which readers report
//! as a lost result rather than a wrong one.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::watch;

use super::ChunkSink;

/// Most bytes one read of the log hands a reader at once.
const READ_CHUNK: u64 = 256 * 1024;

/// How far the log has been written, published to its readers.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    /// Bytes written and readable.
    len: u64,
    /// No byte will follow: the writer is gone.
    finished: bool,
}

/// An append-only byte log with one writer ([`LogWriter`]) and any number
/// of readers, each at its own offset.
#[derive(Debug)]
pub(crate) struct ReplayLog {
    file: Arc<File>,
    progress: watch::Sender<Progress>,
}

/// The offset asked for lies past the end of a finished log.
#[derive(Debug, thiserror::Error)]
#[error("offset {offset} is past the end of the finished log ({len} bytes)")]
pub(crate) struct PastEnd {
    /// The offset asked for.
    pub(crate) offset: u64,
    /// The log's final length.
    pub(crate) len: u64,
}

/// Appending to the log failed (the disk is full, for one).
#[derive(Debug, thiserror::Error)]
#[error("cannot append to the shard's log")]
pub(crate) struct LogWriteError(#[source] io::Error);

impl ReplayLog {
    /// An empty log backed by an unlinked file in `dir`, and its only writer.
    pub(crate) fn create(dir: &Path) -> io::Result<(Arc<ReplayLog>, LogWriter)> {
        let file = tempfile::tempfile_in(dir)?;
        let log = Arc::new(ReplayLog {
            file: Arc::new(file),
            progress: watch::Sender::new(Progress::default()),
        });
        let writer = LogWriter {
            log: log.clone(),
            len: 0,
        };
        Ok((log, writer))
    }

    /// Whether a reader starting at `offset` can never get a byte, because
    /// the log is finished and shorter.
    pub(crate) fn check_offset(&self, offset: u64) -> Result<(), PastEnd> {
        let progress = *self.progress.borrow();
        if progress.finished && offset > progress.len {
            return Err(PastEnd {
                offset,
                len: progress.len,
            });
        }
        Ok(())
    }

    /// Waits until the writer is gone and the log will not grow any more.
    pub(crate) async fn finished(&self) {
        let mut progress = self.progress.subscribe();
        // The sender lives as long as `self`, so this only ends on `finished`.
        let _ = progress.wait_for(|p| p.finished).await;
    }

    /// The log from byte `offset` on: what is there now, then every chunk as
    /// it is written; the stream ends once the log is finished and read to
    /// its end (at once, if `offset` is past the end of a finished log).
    pub(crate) fn read_from(
        self: Arc<Self>,
        offset: u64,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let progress = self.progress.subscribe();
        futures::stream::unfold(Some((self, progress, offset)), |cursor| async move {
            let (log, mut progress, offset) = cursor?;
            let now = match progress.wait_for(|p| p.len > offset || p.finished).await {
                Ok(p) => *p,
                Err(_) => return None,
            };
            if now.len <= offset {
                return None;
            }
            let len = (now.len - offset).min(READ_CHUNK);
            match log.read_at(offset, len).await {
                Ok(bytes) => Some((Ok(bytes), Some((log, progress, offset + len)))),
                // After a read error the stream ends; the reader reconnects.
                Err(e) => Some((Err(e), None)),
            }
        })
    }

    async fn read_at(&self, offset: u64, len: u64) -> io::Result<Bytes> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0; len as usize];
            file.read_exact_at(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(io::Error::other)?
    }
}

/// The only writer of a [`ReplayLog`]; the log is finished when it is
/// dropped, whether the shard ended or its task panicked, so that no reader
/// waits forever.
#[derive(Debug)]
pub(crate) struct LogWriter {
    log: Arc<ReplayLog>,
    len: u64,
}

impl LogWriter {
    /// Appends `chunk` and makes it visible to the readers.
    pub(crate) async fn append(&mut self, chunk: Bytes) -> Result<(), LogWriteError> {
        let file = self.log.file.clone();
        let at = self.len;
        let added = chunk.len() as u64;
        tokio::task::spawn_blocking(move || file.write_all_at(&chunk, at))
            .await
            .map_err(|e| LogWriteError(io::Error::other(e)))?
            .map_err(LogWriteError)?;
        self.len += added;
        let len = self.len;
        self.log.progress.send_modify(|p| p.len = len);
        Ok(())
    }
}

impl ChunkSink for LogWriter {
    type Error = LogWriteError;

    async fn send_chunk(&mut self, chunk: Bytes) -> Result<(), LogWriteError> {
        self.append(chunk).await
    }

    async fn abort(self, reason: &str) {
        // A log has no trailer for errors: it ends without a result frame,
        // which every reader reports as a lost result.
        tracing::error!(
            reason,
            "a frame could not be encoded; the shard's log ends here"
        );
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        self.log.progress.send_modify(|p| p.finished = true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    async fn read_all(log: &Arc<ReplayLog>, offset: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut stream = std::pin::pin!(log.clone().read_from(offset));
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.expect("log reads"));
        }
        out
    }

    #[tokio::test]
    async fn readers_get_every_byte_from_their_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut writer) = ReplayLog::create(dir.path()).unwrap();
        writer.append(Bytes::from_static(b"hello ")).await.unwrap();
        writer.append(Bytes::from_static(b"world")).await.unwrap();
        drop(writer);
        assert_eq!(read_all(&log, 0).await, b"hello world");
        assert_eq!(read_all(&log, 4).await, b"o world");
        assert_eq!(read_all(&log, 11).await, b"");
        assert!(log.check_offset(11).is_ok());
        assert!(log.check_offset(12).is_err());
    }

    #[tokio::test]
    async fn a_reader_ahead_of_the_writer_waits_for_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut writer) = ReplayLog::create(dir.path()).unwrap();
        assert!(
            log.check_offset(3).is_ok(),
            "an unfinished log may still grow"
        );
        let reader = tokio::spawn({
            let log = log.clone();
            async move { read_all(&log, 3).await }
        });
        writer.append(Bytes::from_static(b"ab")).await.unwrap();
        writer.append(Bytes::from_static(b"cdef")).await.unwrap();
        drop(writer);
        assert_eq!(reader.await.unwrap(), b"def");
        log.finished().await;
    }

    #[tokio::test]
    async fn sweeping_the_folder_does_not_touch_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut writer) = ReplayLog::create(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        writer.append(Bytes::from_static(b"kept")).await.unwrap();
        drop(writer);
        assert_eq!(read_all(&log, 0).await, b"kept");
    }
}
