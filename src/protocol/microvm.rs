//! The Lambda MicroVMs wire shapes between the invoker, the emulator and the
//! agent's MicroVM mode (`docs/microvm-protocol.md`): the hook and log routes,
//! the ports and the run-hook payload [`RunPayload`].

use std::net::{IpAddr, Ipv4Addr};

use serde::Deserialize;

use super::{RequestError, ShardRequest, PROTOCOL_VERSION};

/// Variable naming the address both servers bind.
pub const BIND_IP_VAR: &str = "MVM_SHARD_BIND_IP";
/// Variable naming the lifecycle hooks' port.
pub const HOOKS_PORT_VAR: &str = "MVM_SHARD_HOOKS_PORT";
/// Variable naming the log port.
pub const LOG_PORT_VAR: &str = "MVM_SHARD_LOG_PORT";
/// Address both servers bind when [`BIND_IP_VAR`] is unset.
pub const DEFAULT_BIND_IP: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
/// Port the lifecycle hooks are served on when [`HOOKS_PORT_VAR`] is unset.
pub const DEFAULT_HOOKS_PORT: u16 = 9000;
/// Port the shard's log is served on when [`LOG_PORT_VAR`] is unset.
pub const DEFAULT_LOG_PORT: u16 = 8080;
/// Where the lifecycle hooks live; each is `POST {HOOKS_PREFIX}/{name}`.
pub const HOOKS_PREFIX: &str = "/aws/lambda-microvms/runtime/v1";
/// Log-port route that takes the request when the payload could not carry it.
pub const SHARD_PATH: &str = "/shard";
/// Log-port route that streams the shard's frames from `?offset=N`.
pub const LOG_PATH: &str = "/log";
/// Largest run-hook payload.
pub const MAX_RUN_PAYLOAD: usize = 16 * 1024;

/// The path of the lifecycle hook `name` (`ready`, `run`, ...).
pub fn hook_path(name: &str) -> String {
    format!("{HOOKS_PREFIX}/{name}")
}

/// The body of the `run` hook: the request itself, or word that it comes
/// as `POST /shard` on the log port because it is too large for the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "one per microVM start, moved rather than copied"
)]
pub enum RunPayload {
    /// The request is in the payload.
    Inline(ShardRequest),
    /// The request comes as `POST /shard` on the log port.
    ViaLogPort,
}

/// Why a run-hook payload was refused.
#[derive(Debug, thiserror::Error)]
pub enum RunPayloadError {
    /// The payload exceeds [`MAX_RUN_PAYLOAD`]; send the request on the log port.
    #[error("run-hook payload is {size} bytes, over the {MAX_RUN_PAYLOAD}-byte limit")]
    TooLarge {
        /// Size of the payload.
        size: usize,
    },
    /// The payload is not a run-hook document.
    #[error("run-hook payload is not valid: {0}")]
    Malformed(String),
    /// The payload speaks another protocol version.
    #[error(
        "run-hook payload uses protocol version {0}, this agent speaks {PROTOCOL_VERSION}; {advice}",
        advice = super::shard::version_advice(*.0, PROTOCOL_VERSION)
    )]
    Version(u16),
    /// The payload is well formed but the request in it is not.
    #[error(transparent)]
    Request(#[from] RequestError),
}

impl RunPayload {
    /// Serialises the payload; a request that does not fit is
    /// [`RunPayloadError::TooLarge`], and goes through the log port instead.
    pub fn encode(&self) -> Result<Vec<u8>, RunPayloadError> {
        let bytes = match self {
            RunPayload::Inline(request) => {
                let request = request.encode()?;
                let mut bytes =
                    format!("{{\"version\":{PROTOCOL_VERSION},\"request\":").into_bytes();
                bytes.extend_from_slice(&request);
                bytes.push(b'}');
                bytes
            }
            RunPayload::ViaLogPort => {
                format!("{{\"version\":{PROTOCOL_VERSION},\"request_via_log_port\":true}}")
                    .into_bytes()
            }
        };
        if bytes.len() > MAX_RUN_PAYLOAD {
            return Err(RunPayloadError::TooLarge { size: bytes.len() });
        }
        Ok(bytes)
    }

    /// Parses and validates a payload, the request in it included.
    pub fn decode(payload: &[u8]) -> Result<Self, RunPayloadError> {
        if payload.len() > MAX_RUN_PAYLOAD {
            return Err(RunPayloadError::TooLarge {
                size: payload.len(),
            });
        }
        #[derive(Deserialize)]
        struct Envelope {
            version: u16,
            #[serde(default)]
            request: Option<serde_json::Value>,
            #[serde(default)]
            request_via_log_port: bool,
        }
        let envelope: Envelope = serde_json::from_slice(payload)
            .map_err(|e| RunPayloadError::Malformed(e.to_string()))?;
        if envelope.version != PROTOCOL_VERSION {
            return Err(RunPayloadError::Version(envelope.version));
        }
        match (envelope.request, envelope.request_via_log_port) {
            (Some(request), false) => {
                let bytes = serde_json::to_vec(&request)
                    .map_err(|e| RunPayloadError::Malformed(e.to_string()))?;
                Ok(RunPayload::Inline(ShardRequest::decode(&bytes)?))
            }
            (None, true) => Ok(RunPayload::ViaLogPort),
            (Some(_), true) => Err(RunPayloadError::Malformed(
                "it has both a request and request_via_log_port".into(),
            )),
            (None, false) => Err(RunPayloadError::Malformed(
                "it has neither a request nor request_via_log_port".into(),
            )),
        }
    }
}
