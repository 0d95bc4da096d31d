//! The in-VM agent (`mvm-shard agent`): the bootstrap of the Lambda image.
//!
//! It is a Lambda custom runtime: for each invocation it takes a
//! [`ShardRequest`](crate::protocol::ShardRequest), runs it through
//! [`shard::run`] in a freshly wiped environment and streams
//! [`Frame`]s back as the response body, ending with the shard's result.
//! In [`microvm`] mode it serves one shard over HTTP instead, with the same
//! shard code and the same frame stream.

mod cache;
mod download;
mod hint;
pub mod microvm;
mod replay_log;
mod resources;
pub mod runtime_client;
pub mod shard;
pub mod workspace;

use std::future::Future;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio_util::codec::Encoder;

use crate::protocol::{Frame, FrameCodec, FrameError, Outcome, ShardRequest, ShardResult};
use runtime_client::{Invocation, ResponseClosed, ResponseStream, RuntimeClient, RuntimeError};
use shard::EnvironmentState;

/// Longest silence on the response stream before a heartbeat goes out; well
/// under the SDK's 20-second stalled-stream grace.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// Frames are coalesced into response chunks of up to this size.
const MAX_CHUNK: usize = 256 * 1024;

/// Serves invocations until the Runtime API goes away.
pub async fn run() -> Result<(), RuntimeError> {
    if let Err(e) = crate::os::become_subreaper() {
        tracing::warn!(error = %e, "cannot become a child subreaper; daemons that call setsid may survive");
    }
    let client = RuntimeClient::from_env()?;
    let mut state = EnvironmentState {
        invocations: 0,
        scratch: workspace::scratch_root(),
    };
    if let Err(e) = std::fs::create_dir_all(&state.scratch) {
        let message = format!(
            "cannot create scratch folder {}: {e}",
            state.scratch.display()
        );
        client
            .init_error("Runtime.ScratchUnavailable", &message)
            .await?;
        return Ok(());
    }
    loop {
        let invocation = client.next().await?;
        handle(&client, &mut state, invocation).await;
    }
}

async fn handle(client: &RuntimeClient, state: &mut EnvironmentState, invocation: Invocation) {
    let Invocation {
        request_id,
        deadline,
        payload,
    } = invocation;
    let (stream, acknowledged) = client.stream_response(&request_id);
    let acknowledged = tokio::spawn(acknowledged);
    let (frames, rx) = mpsc::channel(64);
    let pump = tokio::spawn(pump_frames(rx, stream));

    let result = match ShardRequest::decode(&payload) {
        Ok(request) => {
            tracing::info!(run = %request.run_id, shard = %request.shard, "running shard");
            shard::run(&request, deadline, state, &frames).await
        }
        Err(e) => ShardResult::not_run(Outcome::Rejected {
            reason: e.to_string(),
        }),
    };
    let _ = frames.send(Frame::Result(result)).await;
    drop(frames);
    match pump.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "response stream failed"),
        Err(e) => tracing::error!(error = %e, "frame pump panicked"),
    }
    match acknowledged.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "runtime API did not accept the response"),
        Err(e) => tracing::error!(error = %e, "response task panicked"),
    }
}

/// Where the frame pump writes the encoded stream: the Lambda response body,
/// or the MicroVM mode's replay log.
pub(crate) trait ChunkSink {
    /// Why the sink stopped taking chunks.
    type Error: std::error::Error + 'static;

    /// Writes one chunk of the encoded stream.
    fn send_chunk(&mut self, chunk: Bytes) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Ends the stream loudly after a frame could not be encoded.
    fn abort(self, reason: &str) -> impl Future<Output = ()> + Send;
}

impl ChunkSink for ResponseStream {
    type Error = ResponseClosed;

    fn send_chunk(
        &mut self,
        chunk: Bytes,
    ) -> impl Future<Output = Result<(), ResponseClosed>> + Send {
        self.send(chunk)
    }

    fn abort(self, reason: &str) -> impl Future<Output = ()> + Send {
        self.fail("Runtime.FrameError", reason)
    }
}

/// Why the frame pump stopped before the frame channel closed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PumpError<E: std::error::Error + 'static> {
    /// A frame could not be encoded; only a bug does that.
    #[error(transparent)]
    Encode(FrameError),
    /// The sink stopped taking chunks.
    #[error(transparent)]
    Sink(E),
}

/// Encodes frames into chunks for `sink`, coalescing what is ready and
/// sending a heartbeat whenever nothing else went out for [`HEARTBEAT_EVERY`].
pub(crate) async fn pump_frames<S: ChunkSink>(
    mut rx: mpsc::Receiver<Frame>,
    mut sink: S,
) -> Result<(), PumpError<S::Error>> {
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(HEARTBEAT_EVERY, rx.recv()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(()),
            Err(_) => Frame::Heartbeat,
        };
        let mut next = Some(frame);
        while let Some(frame) = next.take() {
            if let Err(e) = codec.encode(frame, &mut buf) {
                // Only a bug can make a frame unencodable; end the stream loudly.
                sink.abort(&e.to_string()).await;
                return Err(PumpError::Encode(e));
            }
            if buf.len() < MAX_CHUNK {
                next = rx.try_recv().ok();
            }
        }
        if let Err(e) = sink.send_chunk(buf.split().freeze()).await {
            // Keep draining so the command's output readers never block.
            while rx.recv().await.is_some() {}
            return Err(PumpError::Sink(e));
        }
    }
}
