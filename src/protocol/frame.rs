//! The framed byte stream a shard sends back: output, heartbeats, one final result.
//!
//! Layout: a 5-byte preamble `MVMS` + version, then frames of
//! `kind u8 | length u32 BE | payload`. Frames may be split across transport
//! chunks at any byte; [`FrameCodec`] reassembles them and bounds every length.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::shard::{ShardResult, PROTOCOL_VERSION};

const MAGIC: &[u8; 4] = b"MVMS";
const PREAMBLE_LEN: usize = MAGIC.len() + 1;
const HEADER_LEN: usize = 5;
/// Largest payload of one frame, compressed or not; larger output is split.
pub const MAX_FRAME_PAYLOAD: usize = 1024 * 1024;
/// Output chunks at least this big are zstd-compressed when that makes them smaller.
const COMPRESS_FROM: usize = 512;

const KIND_OUTPUT: u8 = 1;
const KIND_HEARTBEAT: u8 = 2;
const KIND_RESULT: u8 = 3;
const KIND_FILE: u8 = 4;
/// Longest path a file frame carries.
pub const MAX_FILE_PATH: usize = 4096;
const ENCODING_RAW: u8 = 0;
const ENCODING_ZSTD: u8 = 1;

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
    #[error("stream uses protocol version {0}, expected {PROTOCOL_VERSION}")]
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
/// preamble is written and checked once.
#[derive(Debug, Default)]
pub struct FrameCodec {
    preamble_done: bool,
}

impl FrameCodec {
    /// A codec at the start of a stream.
    pub fn new() -> Self {
        Self::default()
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
        decode_payload(kind, payload).map(Some)
    }
}

fn decode_payload(kind: u8, mut payload: Bytes) -> Result<Frame, FrameError> {
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
                data: decode_body(encoding, payload)?,
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
                data: decode_body(encoding, payload)?,
            })
        }
        KIND_HEARTBEAT => Ok(Frame::Heartbeat),
        KIND_RESULT => serde_json::from_slice(&payload)
            .map(Frame::Result)
            .map_err(|e| FrameError::Invalid(format!("bad result: {e}"))),
        other => Err(FrameError::Invalid(format!("unknown frame kind {other}"))),
    }
}

fn decode_body(encoding: u8, payload: Bytes) -> Result<Bytes, FrameError> {
    match encoding {
        ENCODING_RAW => Ok(payload),
        ENCODING_ZSTD => zstd::bulk::decompress(&payload, MAX_FRAME_PAYLOAD)
            .map(Bytes::from)
            .map_err(|e| FrameError::Invalid(format!("bad compressed data: {e}"))),
        other => Err(FrameError::Invalid(format!("unknown encoding {other}"))),
    }
}

/// The body of an output or file frame: zstd when that is smaller.
fn encode_body(data: &[u8]) -> (u8, std::borrow::Cow<'_, [u8]>) {
    let compressed = (data.len() >= COMPRESS_FROM)
        .then(|| zstd::bulk::compress(data, 1).ok())
        .flatten()
        .filter(|c| c.len() < data.len());
    match compressed {
        Some(c) => (ENCODING_ZSTD, c.into()),
        None => (ENCODING_RAW, data.into()),
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
                let (encoding, body) = encode_body(&data);
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
                let (encoding, body) = encode_body(&data);
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

    #[test]
    fn frames_survive_any_chunk_boundary() {
        let encoded = encode_all(&frames());
        for chunk in [1, 2, 3, 7, 64, 4096] {
            let mut codec = FrameCodec::new();
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for piece in encoded.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(f) = codec.decode(&mut buf).unwrap() {
                    out.push(f);
                }
            }
            assert_eq!(out, frames(), "chunk size {chunk}");
            assert!(buf.is_empty());
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
        let mut buf = BytesMut::from(&b"MVMS\x01\x01\xff\xff\xff\xff"[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::TooLarge(_))
        ));

        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::from(&b"MVMS\x07"[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::Version(7))
        ));
    }
}
