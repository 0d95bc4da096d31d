//! The control plane's error answers, in the REST-JSON shape
//! aws-sdk-lambdamicrovms (and botocore) parse: the code in
//! `x-amzn-errortype`, `message` and the resource in the body.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};

/// An error answer of the Lambda MicroVMs API.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct MicrovmApiError {
    /// HTTP status, as the service model gives it for `code`.
    pub status: StatusCode,
    /// The modeled error shape, sent as `x-amzn-errortype`.
    pub code: &'static str,
    /// The message.
    pub message: String,
    /// `resourceType` and `resourceId`, for the shapes that carry them.
    pub resource: Option<(&'static str, String)>,
}

impl MicrovmApiError {
    /// 400 `ValidationException`: the request breaks a constraint of the model.
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "ValidationException", message)
    }

    /// 404 `ResourceNotFoundException`.
    pub fn not_found(resource_type: &'static str, id: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            format!("{resource_type} {id} not found"),
        );
        e.resource = Some((resource_type, id.to_string()));
        e
    }

    /// 409 `ConflictException`: the resource is not in a state that allows the call.
    pub fn conflict(resource_type: &'static str, id: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::CONFLICT, "ConflictException", message);
        e.resource = Some((resource_type, id.to_string()));
        e
    }

    /// 500 `InternalServerException`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerException",
            message,
        )
    }

    /// An operation of the service that the emulator does not offer, as a
    /// modeled error so that every SDK surfaces it cleanly.
    pub fn unsupported(operation: &str) -> Self {
        Self::validation(format!(
            "the mvm-shard emulator does not support {operation}"
        ))
    }

    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        MicrovmApiError {
            status,
            code,
            message: message.into(),
            resource: None,
        }
    }
}

impl IntoResponse for MicrovmApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "message": self.message });
        if let Some((kind, id)) = &self.resource {
            body["resourceType"] = (*kind).into();
            body["resourceId"] = id.as_str().into();
        }
        let mut resp = (self.status, axum::Json(body)).into_response();
        let h = resp.headers_mut();
        h.insert("x-amzn-errortype", HeaderValue::from_static(self.code));
        super::routes::request_id(h);
        resp
    }
}
