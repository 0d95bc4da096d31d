//! The shard protocol: what one invocation carries in and what streams back out.
//!
//! [`ShardRequest`] is the JSON payload of one invocation; the response is a
//! byte stream of [`Frame`]s encoded by [`FrameCodec`]. Both are versioned and
//! bounded, so the agent and the invoker can reject what they do not
//! understand instead of guessing. [`runtime_api`] names the Lambda Runtime API
//! routes and headers once, for the agent's client and the emulator's server.

mod frame;
pub mod microvm;
pub mod runtime_api;
mod shard;

pub use frame::{Frame, FrameCodec, FrameError, OutputStream, MAX_FRAME_PAYLOAD};
pub use shard::{
    is_env_name, ArchiveFormat, CacheSpec, Outcome, Platform, RequestError, Resources, ShardId,
    ShardRequest, ShardResult, SourceSpec, MAX_REQUEST_BYTES, PROTOCOL_VERSION,
};
