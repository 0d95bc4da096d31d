//! Backends: where a shard runs. Each turns one encoded
//! [`ShardRequest`](crate::protocol::ShardRequest) into the shard's framed
//! byte stream; decoding and accounting are shared in [`crate::dispatch`].

pub mod lambda;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::protocol::ShardId;

pub use lambda::{LambdaBackend, LambdaOptions};

/// One attempt at running one shard.
#[derive(Debug, Clone)]
pub struct ShardInvocation {
    /// Which shard.
    pub shard: ShardId,
    /// 1-based attempt number; each attempt gets a new tenant id.
    pub attempt: u32,
    /// The run this shard belongs to.
    pub run_id: String,
    /// The encoded request.
    pub payload: Bytes,
}

/// The shard's response: chunks of the frame stream, in order.
pub type ShardStream = BoxStream<'static, Result<Bytes, StreamError>>;

/// The seam every backend implements.
pub trait Backend: Send + Sync {
    /// Starts the shard; resolves once the backend accepted it.
    fn invoke<'a>(
        &'a self,
        invocation: &'a ShardInvocation,
    ) -> BoxFuture<'a, Result<ShardStream, InvokeError>>;
}

/// How a failed start should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvokeErrorKind {
    /// The service refused for capacity (429): retry later.
    Throttled,
    /// A passing failure (5xx, connection): retry.
    Transient,
    /// Retrying will not help (missing function, denied, bad request).
    Fatal,
}

/// A shard that could not be started.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct InvokeError {
    /// Retry or not.
    pub kind: InvokeErrorKind,
    /// What the service said.
    pub message: String,
}

/// A shard stream that broke after it started.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StreamError {
    /// The function itself failed (`InvokeComplete.ErrorCode`).
    #[error("function error {code}: {details}")]
    Function {
        /// Lambda's error type, e.g. `Runtime.ExitError`.
        code: String,
        /// Its details.
        details: String,
    },
    /// The connection or the stream's encoding failed.
    #[error("response stream failed: {0}")]
    Transport(String),
}
