//! The in-VM agent (`mvm-shard agent`): the bootstrap of the Lambda image.
//!
//! It is a Lambda custom runtime: for each invocation it takes a
//! [`ShardRequest`](crate::protocol::ShardRequest), runs it through
//! [`shard::run`] in a freshly wiped environment and streams
//! [`Frame`]s back as the response body, ending with the shard's result.
//! In [`microvm`] mode it serves one shard over HTTP instead, with the same
//! shard code and the same frame stream.

mod adapt;
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
use tokio::time::Instant;
use tokio_util::codec::Encoder;

use crate::protocol::{
    Frame, FrameCodec, FrameError, Outcome, OutputStream, ShardRequest, ShardResult,
};
use runtime_client::{Invocation, ResponseClosed, ResponseStream, RuntimeClient, RuntimeError};
use shard::EnvironmentState;

/// Longest silence on the response stream before a heartbeat goes out; well
/// under the SDK's 20-second stalled-stream grace.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// Frames are coalesced into response chunks of up to this size.
const MAX_CHUNK: usize = 256 * 1024;
/// Output is held back at most this long after its first unsent byte, so that
/// a command writing a line at a time goes out in a few frames, not one per
/// write (each frame costs ~110 bytes of headers on Lambda's stream).
pub const COALESCE_FOR: Duration = Duration::from_millis(100);
/// Output held back goes out as soon as this much has gathered.
const COALESCE_BYTES: usize = 64 * 1024;

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

/// Encodes frames into chunks for `sink`. Output is coalesced: held back
/// until [`COALESCE_BYTES`] have gathered or [`COALESCE_FOR`] has passed since
/// its first byte, and sent at once before any other frame (the result comes
/// right after the command exits), never reordered between stdout and stderr.
/// A heartbeat goes out whenever nothing else did for [`HEARTBEAT_EVERY`].
pub(crate) async fn pump_frames<S: ChunkSink>(
    mut rx: mpsc::Receiver<Frame>,
    mut sink: S,
) -> Result<(), PumpError<S::Error>> {
    let mut pump = Coalescer::default();
    let mut last_sent = Instant::now();
    let mut adapt = adapt::Adapt::default();
    let mut window = adapt::Window::default();
    let mut window_start = Instant::now();
    loop {
        let wake = match pump.held_since {
            Some(since) => since + COALESCE_FOR,
            None => last_sent + HEARTBEAT_EVERY,
        };
        let (mut next, mut closed) = tokio::select! {
            frame = rx.recv() => {
                let closed = frame.is_none();
                (frame, closed)
            }
            () = tokio::time::sleep_until(wake) => match pump.held_since {
                Some(_) => (None, false),
                None => (Some(Frame::Heartbeat), false),
            },
        };
        let mut encoded = Ok(());
        // Take in whatever is ready too, up to a chunk's worth.
        while let Some(frame) = next.take() {
            if let Frame::Output { data, .. } = &frame {
                window.bytes += data.len() as u64;
                if data.len() >= shard::READ_CHUNK {
                    window.full_read_bytes += data.len() as u64;
                }
            }
            encoded = pump.add(frame);
            if encoded.is_err() {
                break;
            }
            if pump.buf.len() < MAX_CHUNK {
                match rx.try_recv() {
                    Ok(frame) => next = Some(frame),
                    Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
                    Err(mpsc::error::TryRecvError::Empty) => {}
                }
            }
        }
        let due = pump
            .held_since
            .is_some_and(|since| since + COALESCE_FOR <= Instant::now());
        if encoded.is_ok() && (closed || due) {
            encoded = pump.release();
        }
        if let Err(e) = encoded {
            // Only a bug can make a frame unencodable; end the stream loudly.
            sink.abort(&e.to_string()).await;
            return Err(PumpError::Encode(e));
        }
        if !pump.buf.is_empty() {
            let sending = Instant::now();
            if let Err(e) = sink.send_chunk(pump.buf.split().freeze()).await {
                // Keep draining so the command's output readers never block.
                while rx.recv().await.is_some() {}
                return Err(PumpError::Sink(e));
            }
            last_sent = Instant::now();
            window.waited_on_sink += last_sent - sending;
        }
        window.elapsed = window_start.elapsed();
        if window.is_due() {
            if let Some(level) = adapt.next_level(&window) {
                tracing::debug!(level, "compression level");
                pump.codec.set_level(level);
            }
            window = adapt::Window::default();
            window_start = Instant::now();
        }
        if closed {
            return Ok(());
        }
    }
}

/// The encoding side of [`pump_frames`]: output held back, and the chunk
/// being filled.
#[derive(Default)]
struct Coalescer {
    codec: FrameCodec,
    buf: BytesMut,
    held: Option<(OutputStream, BytesMut)>,
    held_since: Option<Instant>,
}

impl Coalescer {
    /// Takes one frame: output is held back (what another stream held goes
    /// first, so the order stays), anything else releases it and follows.
    fn add(&mut self, frame: Frame) -> Result<(), FrameError> {
        match frame {
            Frame::Output { stream, data } => {
                if self.held.as_ref().is_some_and(|(s, _)| *s != stream) {
                    self.release()?;
                }
                if self.held.is_none() && data.len() >= COALESCE_BYTES {
                    // A frame's worth already: encoded as it is, not copied.
                    return self
                        .codec
                        .encode(Frame::Output { stream, data }, &mut self.buf);
                }
                let (_, pending) = self.held.get_or_insert_with(|| (stream, BytesMut::new()));
                pending.extend_from_slice(&data);
                self.held_since.get_or_insert_with(Instant::now);
                if pending.len() >= COALESCE_BYTES {
                    self.release()?;
                }
                Ok(())
            }
            other => {
                self.release()?;
                self.codec.encode(other, &mut self.buf)
            }
        }
    }

    /// Encodes the output held back, if any, as one frame.
    fn release(&mut self) -> Result<(), FrameError> {
        self.held_since = None;
        match self.held.take() {
            Some((stream, data)) => self.codec.encode(
                Frame::Output {
                    stream,
                    data: data.freeze(),
                },
                &mut self.buf,
            ),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::codec::Decoder;

    /// Collects what the pump sends, with the (paused) time it was sent.
    struct Collect(mpsc::UnboundedSender<(Instant, Bytes)>);

    impl ChunkSink for Collect {
        type Error = std::convert::Infallible;

        fn send_chunk(
            &mut self,
            chunk: Bytes,
        ) -> impl Future<Output = Result<(), Self::Error>> + Send {
            let _ = self.0.send((Instant::now(), chunk));
            std::future::ready(Ok(()))
        }

        fn abort(self, _reason: &str) -> impl Future<Output = ()> + Send {
            std::future::ready(())
        }
    }

    /// The chunks a test pump sent, and the pump.
    type Sent = mpsc::UnboundedReceiver<(Instant, Bytes)>;
    type Pump = tokio::task::JoinHandle<Result<(), PumpError<std::convert::Infallible>>>;

    fn start() -> (mpsc::Sender<Frame>, Sent, Pump) {
        let (frames, rx) = mpsc::channel(64);
        let (chunks, sent) = mpsc::unbounded_channel();
        (frames, sent, tokio::spawn(pump_frames(rx, Collect(chunks))))
    }

    fn out(stream: OutputStream, data: &str) -> Frame {
        Frame::Output {
            stream,
            data: Bytes::copy_from_slice(data.as_bytes()),
        }
    }

    fn decode(chunks: &[(Instant, Bytes)]) -> Vec<Frame> {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for (_, chunk) in chunks {
            buf.extend_from_slice(chunk);
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                frames.push(frame);
            }
        }
        frames
    }

    async fn all(mut sent: Sent) -> Vec<(Instant, Bytes)> {
        let mut chunks = Vec::new();
        while let Some(c) = sent.recv().await {
            chunks.push(c);
        }
        chunks
    }

    /// A pytest -v log: a line per test, written one at a time.
    fn pytest_lines() -> Vec<String> {
        (0..10_000)
            .map(|i| {
                format!(
                    "tests/test_module_{}.py::test_case_{i} PASSED{:>20}\n",
                    i / 100,
                    format!("[{:>3}%]", i / 100)
                )
            })
            .collect()
    }

    #[test]
    fn a_log_written_a_line_at_a_time_is_five_times_smaller_on_the_wire() {
        // A line a millisecond: each coalescing window gathers about a hundred.
        let per_window = COALESCE_FOR.as_millis() as usize;
        let mut pump = Coalescer::default();
        let (mut log, mut wire, mut chunks) = (Vec::new(), 0, Vec::new());
        for (i, line) in pytest_lines().iter().enumerate() {
            log.extend_from_slice(line.as_bytes());
            pump.add(out(OutputStream::Stdout, line)).unwrap();
            if (i + 1) % per_window == 0 {
                pump.release().unwrap();
                let chunk = pump.buf.split().freeze();
                // Lambda's event stream adds about 110 bytes of headers to every chunk.
                wire += chunk.len() + 110;
                chunks.push((Instant::now(), chunk));
            }
        }
        let shown: Vec<u8> = decode(&chunks)
            .into_iter()
            .flat_map(|f| match f {
                Frame::Output { data, .. } => data.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(shown, log, "the log arrives whole and in order");
        assert!(
            wire * 5 <= log.len(),
            "{wire} bytes on the wire for a {}-byte log",
            log.len()
        );
    }

    #[tokio::test]
    async fn a_lone_line_is_not_held_back_for_company_that_never_comes() {
        let (frames, mut sent, _pump) = start();
        frames
            .send(out(OutputStream::Stdout, "a lone line\n"))
            .await
            .unwrap();
        let chunk = tokio::time::timeout(Duration::from_secs(10), sent.recv())
            .await
            .expect("held output went out")
            .unwrap();
        assert_eq!(
            decode(&[chunk]),
            vec![out(OutputStream::Stdout, "a lone line\n")]
        );
        assert!(COALESCE_FOR <= Duration::from_millis(250));
    }

    #[tokio::test]
    async fn the_result_releases_held_output_first_and_streams_keep_their_order() {
        let (frames, sent, pump) = start();
        for frame in [
            out(OutputStream::Stdout, "out 1\n"),
            out(OutputStream::Stdout, "out 2\n"),
            out(OutputStream::Stderr, "err 1\n"),
            out(OutputStream::Stdout, "out 3\n"),
            Frame::Result(ShardResult::not_run(Outcome::Exited { code: 0 })),
        ] {
            frames.send(frame).await.unwrap();
        }
        drop(frames);
        pump.await.unwrap().unwrap();
        let mut out_bytes = Vec::new();
        let mut order = Vec::new();
        for frame in decode(&all(sent).await) {
            match frame {
                Frame::Output { stream, data } => {
                    if order.last() != Some(&Some(stream)) {
                        order.push(Some(stream));
                    }
                    out_bytes.extend_from_slice(&data);
                }
                Frame::Result(_) => order.push(None),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(out_bytes, b"out 1\nout 2\nerr 1\nout 3\n");
        assert_eq!(
            order,
            [
                Some(OutputStream::Stdout),
                Some(OutputStream::Stderr),
                Some(OutputStream::Stdout),
                None
            ]
        );
    }
}
