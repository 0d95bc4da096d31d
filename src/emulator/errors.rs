//! Lambda's error answers, in the REST-JSON shape every AWS SDK parses.

use axum::response::{IntoResponse, Response};
use http::StatusCode;

/// An error answer of the Invoke API.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// AWS error code, sent as `x-amzn-ErrorType`.
    pub code: &'static str,
    /// The message.
    pub message: String,
    /// Extra `Reason` field (throttles).
    pub reason: Option<&'static str>,
}

impl ApiError {
    /// 404 `ResourceNotFoundException`.
    pub fn not_found(message: String) -> Self {
        Self::new(StatusCode::NOT_FOUND, "ResourceNotFoundException", message)
    }

    /// 400 `InvalidParameterValueException`.
    pub fn invalid_parameter(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValueException",
            message.into(),
        )
    }

    /// 413 `RequestTooLargeException`.
    pub fn too_large(size: usize, limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLargeException",
            format!("Request must be smaller than {limit} bytes for the InvokeFunction operation (got {size})"),
        )
    }

    /// 403 `AccessDeniedException`, worded as IAM words it.
    pub fn access_denied(resource_arn: &str, action: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "AccessDeniedException",
            format!("User: arn:aws:sts::000000000000:assumed-role/emulated/session is not authorized to perform: {action} on resource: {resource_arn} because no identity-based policy allows the {action} action"),
        )
    }

    /// 429 `TooManyRequestsException`.
    pub fn throttled() -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequestsException",
            "Rate Exceeded.".into(),
        );
        e.reason = Some("ConcurrentInvocationLimitExceeded");
        e
    }

    /// 500 `ServiceException`.
    pub fn service(message: String) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ServiceException",
            message,
        )
    }

    fn new(status: StatusCode, code: &'static str, message: String) -> Self {
        ApiError {
            status,
            code,
            message,
            reason: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "Type": "User", "message": self.message });
        if let Some(reason) = self.reason {
            body["Reason"] = reason.into();
        }
        let mut resp = (self.status, axum::Json(body)).into_response();
        resp.headers_mut().insert(
            "x-amzn-errortype",
            http::HeaderValue::from_static(self.code),
        );
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert("retry-after", http::HeaderValue::from_static("1"));
        }
        resp
    }
}
