//! The framed byte stream a shard sends back: output, heartbeats, one final result.
//!
//! Layout: a 5-byte preamble `MVMS` + version, then frames of
//! `kind u8 | length u32 BE | payload`. Frames may be split across transport
//! chunks at any byte; [`FrameCodec`] reassembles them and bounds every length.
//!
//! The bodies of output and file frames are one zstd stream per shard
//! stream, flushed at every frame: a frame decodes as soon as it arrives, and
//! a line that repeats earlier ones (a test log) compresses against them,
//! however small the frame. A frame under [`COMPRESS_FROM`] bytes goes raw.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};
use zstd::stream::raw::{Decoder as ZstdDecoder, Encoder as ZstdEncoder, Operation};
use zstd::zstd_safe::{CParameter, DParameter, InBuffer, OutBuffer};

use super::shard::{version_advice, ShardResult, PROTOCOL_VERSION};

const MAGIC: &[u8; 4] = b"MVMS";
const PREAMBLE_LEN: usize = MAGIC.len() + 1;
const HEADER_LEN: usize = 5;
/// Largest payload of one frame, compressed or not; larger output is split.
pub const MAX_FRAME_PAYLOAD: usize = 1024 * 1024;
/// Bodies at least this big go through the shard's zstd stream.
const COMPRESS_FROM: usize = 16;
/// zstd level a stream starts at: fast, as the agent compresses while the
/// command runs; the agent moves it ([`FrameCodec::set_level`]).
const ZSTD_LEVEL: i32 = 1;
/// Window of the zstd stream (2^17 = 128 KiB): what a decoder of one shard
/// holds in memory, and how far back a repeated line is found.
const ZSTD_WINDOW_LOG: u32 = 17;

const KIND_OUTPUT: u8 = 1;
const KIND_HEARTBEAT: u8 = 2;
const KIND_RESULT: u8 = 3;
const KIND_FILE: u8 = 4;
/// Longest path a file frame carries.
pub const MAX_FILE_PATH: usize = 4096;
const ENCODING_RAW: u8 = 0;
/// A piece of the stream's zstd stream, flushed at the frame's end.
const ENCODING_ZSTD_STREAM: u8 = 2;

/// Which of the command's output streams a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputStream {
    /// The command's standard output.
    Stdout,
    /// The command's standard error.
    Stderr,
}

/// One message of the shard stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A chunk of the command's output, exactly as written.
    Output {
        /// Where it was written.
        stream: OutputStream,
        /// The bytes, at most [`MAX_FRAME_PAYLOAD`].
        data: Bytes,
    },
    /// A piece of a file the command wrote that the request asked for;
    /// consecutive pieces with the same path make up one file.
    File {
        /// Path relative to the working directory.
        path: String,
        /// The bytes of this piece.
        data: Bytes,
    },
    /// Sent during silence so that no transport gives the stream up as stalled.
    Heartbeat,
    /// The final frame; nothing follows it.
    Result(ShardResult),
}

/// Why a shard stream could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream does not start with the mvm-shard preamble.
    #[error("stream is not an mvm-shard frame stream (starts with {0:?})")]
    NotAFrameStream(Vec<u8>),
    /// The peer speaks another protocol version.
    #[error(
        "the agent answered with protocol version {0}, this invoker speaks {PROTOCOL_VERSION}; {advice}",
        advice = version_advice(PROTOCOL_VERSION, u16::from(*.0))
    )]
    Version(u8),
    /// A frame declares a payload over the bound.
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_PAYLOAD}-byte bound")]
    TooLarge(usize),
    /// A frame's content is not valid.
    #[error("invalid frame: {0}")]
    Invalid(String),
    /// Reading the transport failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Encodes and decodes the shard stream; one codec per stream, since the
/// preamble is written and checked once and the zstd stream runs through it.
#[derive(Default)]
pub struct FrameCodec {
    preamble_done: bool,
    /// Made at the first compressed body: a shard that prints nothing costs nothing.
    compressor: Option<ZstdEncoder<'static>>,
    decompressor: Option<ZstdDecoder<'static>>,
    /// Reused for every compressed body.
    scratch: Vec<u8>,
    /// The level the next compressed body is to use, when it changes
    /// ([`FrameCodec::set_level`]).
    new_level: Option<i32>,
    /// Size of the last body decompressed: the next one (of a burst) is
    /// likely as big, and is decompressed into that much room at once.
    last_body: usize,
}

impl std::fmt::Debug for FrameCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameCodec")
            .field("preamble_done", &self.preamble_done)
            .field("compressing", &self.compressor.is_some())
            .field("decompressing", &self.decompressor.is_some())
            .finish()
    }
}

impl FrameCodec {
    /// A codec at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Compresses the bodies to come at zstd `level` (the stream starts at
    /// level 1). A zstd frame keeps the level it started with, so the frame
    /// under way ends at the next body and a new one starts: decoders read
    /// the frames one after the other, as any zstd stream, and need not know.
    pub fn set_level(&mut self, level: i32) {
        self.new_level = Some(level);
    }

    /// The body of an output or file frame: through the zstd stream, flushed,
    /// unless it is too small to gain anything.
    fn encode_body<'a>(
        &'a mut self,
        data: &'a [u8],
    ) -> Result<(u8, std::borrow::Cow<'a, [u8]>), FrameError> {
        if data.len() < COMPRESS_FROM {
            return Ok((ENCODING_RAW, data.into()));
        }
        let new_level = self.new_level.take();
        let out = &mut self.scratch;
        out.clear();
        if out.capacity() > 4 * MAX_FRAME_PAYLOAD {
            *out = Vec::new();
        }
        out.reserve(zstd::zstd_safe::compress_bound(data.len()) + 64);
        let compressor = match (&mut self.compressor, new_level) {
            (Some(c), None) => c,
            (Some(c), Some(level)) => {
                // End the frame under way; the next one starts at `level`.
                loop {
                    grow(out);
                    let len = out.len();
                    let mut piece = OutBuffer::around_pos(out, len);
                    if c.finish(&mut piece, false)? == 0 {
                        break;
                    }
                }
                c.set_parameter(CParameter::CompressionLevel(level))?;
                c
            }
            (None, level) => {
                let mut c = ZstdEncoder::new(level.unwrap_or(ZSTD_LEVEL))?;
                c.set_parameter(CParameter::WindowLog(ZSTD_WINDOW_LOG))?;
                self.compressor.insert(c)
            }
        };
        let mut input = InBuffer::around(data);
        while input.pos() < data.len() {
            grow(out);
            let len = out.len();
            let mut piece = OutBuffer::around_pos(out, len);
            compressor.run(&mut input, &mut piece)?;
        }
        loop {
            grow(out);
            let len = out.len();
            let mut piece = OutBuffer::around_pos(out, len);
            if compressor.flush(&mut piece)? == 0 {
                break;
            }
        }
        Ok((ENCODING_ZSTD_STREAM, self.scratch.as_slice().into()))
    }

    fn decode_body(&mut self, encoding: u8, payload: Bytes) -> Result<Bytes, FrameError> {
        match encoding {
            ENCODING_RAW => Ok(payload),
            ENCODING_ZSTD_STREAM => {
                let decompressor = match &mut self.decompressor {
                    Some(d) => d,
                    None => {
                        let mut d = ZstdDecoder::new()?;
                        // A window over ours is a foreign stream, and a memory bomb.
                        d.set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG))?;
                        self.decompressor.insert(d)
                    }
                };
                let bad =
                    |e: std::io::Error| FrameError::Invalid(format!("bad compressed data: {e}"));
                // Room for a whole frame from the start: log lines often
                // compress 50-fold or more, and growing from the payload's
                // size copied each frame's output about once more. A burst's
                // frames are alike, so the last one's size is the guess.
                let room = (payload.len() * 4).max(self.last_body + 1);
                let mut out: Vec<u8> = Vec::with_capacity(room.clamp(64 * 1024, MAX_FRAME_PAYLOAD));
                let mut input = InBuffer::around(&payload);
                loop {
                    if out.len() == out.capacity() {
                        if out.len() >= MAX_FRAME_PAYLOAD {
                            return Err(FrameError::TooLarge(out.len() + 1));
                        }
                        out.reserve_exact(out.len().clamp(4096, MAX_FRAME_PAYLOAD - out.len()));
                    }
                    let len = out.len();
                    let mut piece = OutBuffer::around_pos(&mut out, len);
                    decompressor.run(&mut input, &mut piece).map_err(bad)?;
                    let room_left = piece.pos() < piece.capacity();
                    if input.pos() == payload.len() && room_left {
                        self.last_body = out.len();
                        return Ok(Bytes::from(out));
                    }
                }
            }
            other => Err(FrameError::Invalid(format!("unknown encoding {other}"))),
        }
    }
}

/// Makes room for the next piece of compressed output.
fn grow(out: &mut Vec<u8>) {
    if out.capacity() - out.len() < 1024 {
        out.reserve(64 * 1024);
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if !self.preamble_done {
            let seen = src.len().min(PREAMBLE_LEN);
            if src[..seen.min(MAGIC.len())] != MAGIC[..seen.min(MAGIC.len())] {
                return Err(FrameError::NotAFrameStream(src[..seen].to_vec()));
            }
            if src.len() < PREAMBLE_LEN {
                return Ok(None);
            }
            if src[MAGIC.len()] != PROTOCOL_VERSION as u8 {
                return Err(FrameError::Version(src[MAGIC.len()]));
            }
            src.advance(PREAMBLE_LEN);
            self.preamble_done = true;
        }
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind = src[0];
        let len = u32::from_be_bytes([src[1], src[2], src[3], src[4]]) as usize;
        if len > MAX_FRAME_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        if src.len() < HEADER_LEN + len {
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let payload = src.split_to(len).freeze();
        self.decode_payload(kind, payload).map(Some)
    }
}

impl FrameCodec {
    fn decode_payload(&mut self, kind: u8, mut payload: Bytes) -> Result<Frame, FrameError> {
        match kind {
            KIND_OUTPUT => {
                if payload.len() < 2 {
                    return Err(FrameError::Invalid("output frame too short".into()));
                }
                let stream = match payload.get_u8() {
                    1 => OutputStream::Stdout,
                    2 => OutputStream::Stderr,
                    other => return Err(FrameError::Invalid(format!("unknown stream {other}"))),
                };
                let encoding = payload.get_u8();
                Ok(Frame::Output {
                    stream,
                    data: self.decode_body(encoding, payload)?,
                })
            }
            KIND_FILE => {
                if payload.len() < 2 {
                    return Err(FrameError::Invalid("file frame too short".into()));
                }
                let len = payload.get_u16() as usize;
                if len > MAX_FILE_PATH || payload.len() < len + 1 {
                    return Err(FrameError::Invalid(
                        "file frame path is out of bounds".into(),
                    ));
                }
                let path = String::from_utf8(payload.split_to(len).to_vec())
                    .map_err(|_| FrameError::Invalid("file path is not UTF-8".into()))?;
                let encoding = payload.get_u8();
                Ok(Frame::File {
                    path,
                    data: self.decode_body(encoding, payload)?,
                })
            }
            KIND_HEARTBEAT => Ok(Frame::Heartbeat),
            KIND_RESULT => serde_json::from_slice(&payload)
                .map(Frame::Result)
                .map_err(|e| FrameError::Invalid(format!("bad result: {e}"))),
            other => Err(FrameError::Invalid(format!("unknown frame kind {other}"))),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        if !self.preamble_done {
            dst.put_slice(MAGIC);
            dst.put_u8(PROTOCOL_VERSION as u8);
            self.preamble_done = true;
        }
        match frame {
            Frame::Output { stream, data } => {
                if data.len() > MAX_FRAME_PAYLOAD - 2 {
                    return Err(FrameError::TooLarge(data.len()));
                }
                let (encoding, body) = self.encode_body(&data)?;
                if body.len() + 2 > MAX_FRAME_PAYLOAD {
                    return Err(FrameError::TooLarge(body.len() + 2));
                }
                put_header(dst, KIND_OUTPUT, body.len() + 2);
                dst.put_u8(match stream {
                    OutputStream::Stdout => 1,
                    OutputStream::Stderr => 2,
                });
                dst.put_u8(encoding);
                dst.put_slice(&body);
            }
            Frame::File { path, data } => {
                if path.len() > MAX_FILE_PATH || data.len() + path.len() > MAX_FRAME_PAYLOAD - 3 {
                    return Err(FrameError::TooLarge(data.len() + path.len()));
                }
                let (encoding, body) = self.encode_body(&data)?;
                if 2 + path.len() + 1 + body.len() > MAX_FRAME_PAYLOAD {
                    return Err(FrameError::TooLarge(body.len() + path.len()));
                }
                put_header(dst, KIND_FILE, 2 + path.len() + 1 + body.len());
                dst.put_u16(path.len() as u16);
                dst.put_slice(path.as_bytes());
                dst.put_u8(encoding);
                dst.put_slice(&body);
            }
            Frame::Heartbeat => put_header(dst, KIND_HEARTBEAT, 0),
            Frame::Result(result) => {
                let json =
                    serde_json::to_vec(&result).map_err(|e| FrameError::Invalid(e.to_string()))?;
                if json.len() > MAX_FRAME_PAYLOAD {
                    return Err(FrameError::TooLarge(json.len()));
                }
                put_header(dst, KIND_RESULT, json.len());
                dst.put_slice(&json);
            }
        }
        Ok(())
    }
}

fn put_header(dst: &mut BytesMut, kind: u8, len: usize) {
    dst.reserve(HEADER_LEN + len);
    dst.put_u8(kind);
    dst.put_u32(len as u32);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Outcome;

    fn frames() -> Vec<Frame> {
        vec![
            Frame::Output {
                stream: OutputStream::Stdout,
                data: Bytes::from_static(b"hello\n"),
            },
            Frame::Heartbeat,
            Frame::File {
                path: "target/junit.xml".into(),
                data: Bytes::from(vec![b'<'; 5000]),
            },
            Frame::Output {
                stream: OutputStream::Stderr,
                data: Bytes::from(vec![b'x'; 100_000]),
            },
            Frame::Result(ShardResult::not_run(Outcome::Exited { code: 3 })),
        ]
    }

    fn encode_all(frames: &[Frame]) -> BytesMut {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        for f in frames {
            codec.encode(f.clone(), &mut buf).unwrap();
        }
        buf
    }

    /// Decodes `wire` fed to one codec `chunk` bytes at a time; every byte
    /// must belong to a frame.
    fn decode_in_chunks(wire: &[u8], chunk: usize) -> Vec<Frame> {
        let mut codec = FrameCodec::new();
        let (mut buf, mut out) = (BytesMut::new(), Vec::new());
        for piece in wire.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                out.push(f);
            }
        }
        assert!(buf.is_empty(), "{} bytes left over", buf.len());
        out
    }

    /// Bytes of output the frames carry.
    fn output_bytes(frames: &[Frame]) -> usize {
        frames
            .iter()
            .map(|f| match f {
                Frame::Output { data, .. } => data.len(),
                _ => 0,
            })
            .sum()
    }

    #[test]
    fn frames_survive_any_chunk_boundary() {
        let encoded = encode_all(&frames());
        for chunk in [1, 2, 3, 7, 64, 4096] {
            assert_eq!(
                decode_in_chunks(&encoded, chunk),
                frames(),
                "chunk size {chunk}"
            );
        }
    }

    #[test]
    fn compressible_output_is_compressed_on_the_wire() {
        let encoded = encode_all(&frames()[3..4]);
        assert!(encoded.len() < 10_000, "{} bytes", encoded.len());
    }

    #[test]
    fn foreign_streams_and_oversized_frames_are_errors() {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::from(&b"{\"statusCode\":200}"[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::NotAFrameStream(_))
        ));

        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::from(&b"MVMS\x02\x01\xff\xff\xff\xff"[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::TooLarge(_))
        ));

        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::from(&b"MVMS\x07"[..]);
        let newer = codec.decode(&mut buf).unwrap_err();
        assert!(matches!(newer, FrameError::Version(7)));
        assert!(
            newer
                .to_string()
                .contains("update the mvm-shard that runs `run`"),
            "{newer}"
        );

        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::from(&b"MVMS\x01"[..]);
        let older = codec.decode(&mut buf).unwrap_err();
        assert!(
            older
                .to_string()
                .contains("rebuild the function's or MicroVM's image"),
            "{older}"
        );
    }

    #[test]
    fn small_frames_of_a_repetitive_log_compress_against_each_other() {
        let lines: Vec<Frame> = (0..1000)
            .map(|i| Frame::Output {
                stream: OutputStream::Stdout,
                data: Bytes::from(format!("tests/test_api.py::test_endpoint_{i} PASSED\n")),
            })
            .collect();
        let log = output_bytes(&lines);
        // Even one frame per line (no coalescing) is smaller than the log.
        let encoded = encode_all(&lines);
        assert!(encoded.len() < log, "{} bytes for {log}", encoded.len());
        assert_eq!(decode_in_chunks(&encoded, encoded.len()), lines);
    }

    #[test]
    fn a_stream_whose_level_changes_decodes_to_the_same_bytes_at_any_chunk_boundary() {
        let mut codec = FrameCodec::new();
        let mut wire = BytesMut::new();
        let mut sent = Vec::new();
        for (i, level) in [1, 1, -5, -5, 6, 3, 1, -1].into_iter().enumerate() {
            codec.set_level(level);
            let data: Vec<u8> = (0..2000 + i * 1500)
                .flat_map(|n| format!("line {n} of piece {i} at level {level}\n").into_bytes())
                .collect();
            let frame = Frame::Output {
                stream: OutputStream::Stdout,
                data: Bytes::from(data),
            };
            codec.encode(frame.clone(), &mut wire).unwrap();
            sent.push(frame);
        }
        sent.push(Frame::Heartbeat);
        codec.encode(Frame::Heartbeat, &mut wire).unwrap();
        let log = output_bytes(&sent);
        assert!(wire.len() * 5 < log, "{} bytes for {log}", wire.len());
        for chunk in [1, 7, 4096, wire.len()] {
            assert_eq!(decode_in_chunks(&wire, chunk), sent, "chunk size {chunk}");
        }
    }

    #[test]
    fn a_frame_that_inflates_past_the_bound_is_refused() {
        let mut zstd = ZstdEncoder::new(1).unwrap();
        zstd.set_parameter(CParameter::WindowLog(ZSTD_WINDOW_LOG))
            .unwrap();
        let zeros = vec![0u8; 2 * MAX_FRAME_PAYLOAD];
        let mut body = Vec::with_capacity(MAX_FRAME_PAYLOAD);
        let mut input = InBuffer::around(&zeros);
        while input.pos() < zeros.len() {
            let len = body.len();
            zstd.run(&mut input, &mut OutBuffer::around_pos(&mut body, len))
                .unwrap();
        }
        let len = body.len();
        while zstd
            .flush(&mut OutBuffer::around_pos(&mut body, len))
            .unwrap()
            != 0
        {}
        let mut stream = BytesMut::from(&b"MVMS\x02"[..]);
        stream.put_u8(KIND_OUTPUT);
        stream.put_u32(body.len() as u32 + 2);
        stream.put_u8(1);
        stream.put_u8(ENCODING_ZSTD_STREAM);
        stream.put_slice(&body);
        let mut codec = FrameCodec::new();
        assert!(matches!(
            codec.decode(&mut stream),
            Err(FrameError::TooLarge(_))
        ));
    }
}
