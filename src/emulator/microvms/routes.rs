//! The Lambda MicroVMs control plane: the REST-JSON routes under
//! `/2025-09-09/` with the paths, members, status codes and error codes of
//! aws-sdk-lambdamicrovms, and the checks the service model states.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::errors::MicrovmApiError;
use super::tokens::{PortSpec, AUTH_HEADER, MAX_EXPIRATION_MINUTES};
use super::vm::MicrovmState;
use crate::emulator::Emulator;

/// Largest `runHookPayload`, in bytes (the contract's and the API
/// documentation's 16,384).
pub const MAX_RUN_HOOK_PAYLOAD: usize = 16 * 1024;
/// Longest `maximumDurationInSeconds`: 8 hours; also the default.
pub const MAX_DURATION_SECONDS: i64 = 28_800;
/// Largest page of `ListMicrovms`.
const MAX_LIST_RESULTS: usize = 50;

/// The body of `RunMicrovm`. Settings the emulator does not act on (roles,
/// network connectors, logging, idle policy) are accepted and echoed back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunMicrovmRequest {
    /// Image name or ARN.
    pub image_identifier: Option<String>,
    /// Image version.
    pub image_version: Option<String>,
    /// Idempotency token.
    pub client_token: Option<String>,
    /// Body of the `run` hook.
    pub run_hook_payload: Option<String>,
    /// Lifetime limit.
    pub maximum_duration_in_seconds: Option<i64>,
    /// Role of the microVM.
    pub execution_role_arn: Option<String>,
    /// Auto-suspend settings (not enforced).
    pub idle_policy: Option<Value>,
    /// Log destination (not used).
    pub logging: Option<Value>,
    /// Encryption key (not used).
    pub kms_key_identifier: Option<String>,
    /// Network connectors (not used).
    pub ingress_network_connectors: Option<Vec<String>>,
    /// Network connectors (not used).
    pub egress_network_connectors: Option<Vec<String>>,
}

impl RunMicrovmRequest {
    /// Checks the model's constraints; returns the maximum duration in seconds.
    pub fn validate(&self) -> Result<u32, MicrovmApiError> {
        let image = self.image_identifier.as_deref().unwrap_or_default();
        if image.is_empty() || image.len() > 256 {
            return Err(MicrovmApiError::validation(
                "imageIdentifier is required and at most 256 characters long",
            ));
        }
        if let Some(version) = &self.image_version {
            if version.is_empty() || version.len() > 2048 || version.contains(char::is_whitespace) {
                return Err(MicrovmApiError::validation(
                    "imageVersion must be 1 to 2048 characters without whitespace",
                ));
            }
        }
        if let Some(token) = &self.client_token {
            if token.is_empty() || token.len() > 128 {
                return Err(MicrovmApiError::validation(
                    "clientToken must be 1 to 128 characters long",
                ));
            }
        }
        let payload = self.run_hook_payload.as_deref().map_or(0, str::len);
        if payload > MAX_RUN_HOOK_PAYLOAD {
            return Err(MicrovmApiError::validation(format!(
                "runHookPayload is {payload} bytes; at most {MAX_RUN_HOOK_PAYLOAD} are allowed"
            )));
        }
        let duration = self
            .maximum_duration_in_seconds
            .unwrap_or(MAX_DURATION_SECONDS);
        if !(1..=MAX_DURATION_SECONDS).contains(&duration) {
            return Err(MicrovmApiError::validation(format!(
                "maximumDurationInSeconds must be from 1 to {MAX_DURATION_SECONDS} (got {duration})"
            )));
        }
        Ok(duration as u32)
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateAuthTokenRequest {
    expiration_in_minutes: Option<i64>,
    allowed_ports: Option<Vec<Value>>,
}

/// The control plane routes, merged into the emulator's router.
pub fn router() -> Router<Emulator> {
    const ROOT: &str = "/2025-09-09";
    Router::new()
        .route(
            &format!("{ROOT}/microvms"),
            post(run_microvm).get(list_microvms),
        )
        .route(
            &format!("{ROOT}/microvms/{{id}}"),
            get(get_microvm).delete(terminate_microvm),
        )
        .route(
            &format!("{ROOT}/microvms/{{id}}/auth-token"),
            post(create_auth_token),
        )
        .route(
            &format!("{ROOT}/microvms/{{id}}/shell-auth-token"),
            post(|| unsupported("CreateMicrovmShellAuthToken")),
        )
        .route(
            &format!("{ROOT}/microvms/{{id}}/suspend"),
            post(|| unsupported("SuspendMicrovm")),
        )
        .route(
            &format!("{ROOT}/microvms/{{id}}/resume"),
            post(|| unsupported("ResumeMicrovm")),
        )
        .route(
            &format!("{ROOT}/microvm-images"),
            get(list_images).post(|| unsupported("CreateMicrovmImage")),
        )
        .route(
            &format!("{ROOT}/microvm-images/{{id}}"),
            get(get_image)
                .put(|| unsupported("UpdateMicrovmImage"))
                .delete(|| unsupported("DeleteMicrovmImage")),
        )
        .route(
            &format!("{ROOT}/microvm-images/{{id}}/versions"),
            axum::routing::any(|| unsupported("microVM image versions")),
        )
        .route(
            &format!("{ROOT}/microvm-images/{{id}}/versions/{{*rest}}"),
            axum::routing::any(|| unsupported("microVM image versions and builds")),
        )
        .route(
            &format!("{ROOT}/managed-microvm-images"),
            axum::routing::any(|| unsupported("managed microVM images")),
        )
        .route(
            &format!("{ROOT}/managed-microvm-images/{{*rest}}"),
            axum::routing::any(|| unsupported("managed microVM images")),
        )
}

async fn unsupported(operation: &'static str) -> MicrovmApiError {
    MicrovmApiError::unsupported(operation)
}

/// Sets a fresh `x-amzn-requestid`, which every AWS answer carries.
pub fn request_id(headers: &mut HeaderMap) {
    if let Ok(id) = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()) {
        headers.insert("x-amzn-requestid", id);
    }
}

/// A timestamp as the REST-JSON protocol sends it: epoch seconds, to the millisecond.
pub fn epoch_seconds(at: SystemTime) -> f64 {
    let millis = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    millis as f64 / 1000.0
}

fn ok(body: Value) -> Response {
    let mut resp = axum::Json(body).into_response();
    request_id(resp.headers_mut());
    resp
}

/// A JSON body, where an empty one reads as `{}`; a malformed one is a
/// `ValidationException`, as the service answers.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, MicrovmApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| MicrovmApiError::validation(format!("malformed request body: {e}")))
}

async fn run_microvm(
    State(emulator): State<Emulator>,
    body: Bytes,
) -> Result<Response, MicrovmApiError> {
    let request: RunMicrovmRequest = parse(&body)?;
    let vm = emulator.state.microvms.run(request).await?;
    Ok(ok(vm.describe()))
}

async fn get_microvm(
    State(emulator): State<Emulator>,
    Path(id): Path<String>,
) -> Result<Response, MicrovmApiError> {
    Ok(ok(emulator.state.microvms.get(&id)?.describe()))
}

async fn terminate_microvm(
    State(emulator): State<Emulator>,
    Path(id): Path<String>,
) -> Result<Response, MicrovmApiError> {
    emulator.state.microvms.terminate(&id).await?;
    Ok(ok(json!({})))
}

async fn list_microvms(
    State(emulator): State<Emulator>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, MicrovmApiError> {
    let Query(query) = query.map_err(|e| MicrovmApiError::validation(e.body_text()))?;
    let max = match query.get("maxResults") {
        None => MAX_LIST_RESULTS,
        Some(raw) => raw
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIST_RESULTS).contains(n))
            .ok_or_else(|| {
                MicrovmApiError::validation(format!(
                    "maxResults must be from 1 to {MAX_LIST_RESULTS}"
                ))
            })?,
    };
    let start = match query.get("nextToken") {
        None => 0,
        Some(raw) => raw
            .parse::<usize>()
            .map_err(|_| MicrovmApiError::validation(format!("invalid nextToken {raw:?}")))?,
    };
    let microvms = &emulator.state.microvms;
    let image = match query.get("imageIdentifier") {
        Some(identifier) => Some(microvms.image(identifier)?),
        None => None,
    };
    let version = query.get("imageVersion");
    let mut all = microvms.all();
    all.retain(|vm| {
        image.as_ref().is_none_or(|i| i.arn == vm.image.arn)
            && version.is_none_or(|v| *v == vm.image_version)
    });
    let items: Vec<Value> = all
        .iter()
        .skip(start)
        .take(max)
        .map(|vm| vm.summary())
        .collect();
    let mut body = json!({ "items": items });
    if start + max < all.len() {
        body["nextToken"] = (start + max).to_string().into();
    }
    Ok(ok(body))
}

async fn create_auth_token(
    State(emulator): State<Emulator>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, MicrovmApiError> {
    let request: CreateAuthTokenRequest = parse(&body)?;
    let minutes = request
        .expiration_in_minutes
        .ok_or_else(|| MicrovmApiError::validation("expirationInMinutes is required"))?;
    if !(1..=MAX_EXPIRATION_MINUTES).contains(&minutes) {
        return Err(MicrovmApiError::validation(format!(
            "expirationInMinutes must be from 1 to {MAX_EXPIRATION_MINUTES} (got {minutes})"
        )));
    }
    let ports = request
        .allowed_ports
        .filter(|p| !p.is_empty())
        .ok_or_else(|| MicrovmApiError::validation("allowedPorts needs at least one member"))?
        .iter()
        .map(PortSpec::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| MicrovmApiError::validation(format!("allowedPorts: {e}")))?;
    let vm = emulator.state.microvms.get(&id)?;
    if !matches!(vm.state(), MicrovmState::Pending | MicrovmState::Running) {
        return Err(MicrovmApiError::conflict(
            "Microvm",
            &vm.id,
            format!("microVM {} is {}", vm.id, vm.state().as_str()),
        ));
    }
    let lifetime = emulator
        .state
        .microvms
        .faults
        .token_lifetime
        .unwrap_or(std::time::Duration::from_secs(minutes as u64 * 60));
    let token = vm
        .tokens
        .lock()
        .expect("lock poisoned")
        .issue(lifetime, ports);
    Ok(ok(json!({ "authToken": { AUTH_HEADER: token } })))
}

async fn list_images(
    State(emulator): State<Emulator>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, MicrovmApiError> {
    let Query(query) = query.map_err(|e| MicrovmApiError::validation(e.body_text()))?;
    let microvms = &emulator.state.microvms;
    let filter = query.get("nameFilter").map(String::as_str).unwrap_or("");
    let items: Vec<Value> = microvms
        .images()
        .iter()
        .filter(|i| i.config.name.contains(filter))
        .map(|i| microvms.describe_image(i))
        .collect();
    Ok(ok(json!({ "items": items })))
}

async fn get_image(
    State(emulator): State<Emulator>,
    Path(id): Path<String>,
) -> Result<Response, MicrovmApiError> {
    let microvms = &emulator.state.microvms;
    let image = microvms.image(&id)?;
    Ok(ok(microvms.describe_image(&image)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(payload: usize, duration: Option<i64>) -> RunMicrovmRequest {
        RunMicrovmRequest {
            image_identifier: Some("img".into()),
            run_hook_payload: Some("x".repeat(payload)),
            maximum_duration_in_seconds: duration,
            ..Default::default()
        }
    }

    #[test]
    fn the_run_hook_payload_may_be_16_kib_and_no_more() {
        assert!(request(MAX_RUN_HOOK_PAYLOAD, None).validate().is_ok());
        let e = request(MAX_RUN_HOOK_PAYLOAD + 1, None)
            .validate()
            .unwrap_err();
        assert_eq!(e.code, "ValidationException");
    }

    #[test]
    fn the_maximum_duration_is_from_1_s_to_8_h_and_defaults_to_8_h() {
        assert_eq!(request(0, None).validate().unwrap(), 28_800);
        assert_eq!(request(0, Some(1)).validate().unwrap(), 1);
        for bad in [0, -5, 28_801] {
            assert!(request(0, Some(bad)).validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn an_image_identifier_is_required() {
        let mut r = request(0, None);
        r.image_identifier = None;
        assert!(r.validate().is_err());
    }

    #[test]
    fn an_empty_body_reads_as_an_empty_object_and_garbage_is_a_validation_error() {
        let empty: RunMicrovmRequest = parse(b"").unwrap();
        assert_eq!(empty, RunMicrovmRequest::default());
        assert_eq!(
            parse::<RunMicrovmRequest>(b"{nope").unwrap_err().code,
            "ValidationException"
        );
    }
}
