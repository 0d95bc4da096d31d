//! Routes and headers of the Lambda Runtime API, written once for the agent's
//! client and the emulator's server.

/// Path prefix of every Runtime API route.
pub const PREFIX: &str = "/2018-06-01";
/// `GET`: blocks until the next invocation.
pub const NEXT: &str = "/2018-06-01/runtime/invocation/next";
/// `POST`: reports a failed initialisation.
pub const INIT_ERROR: &str = "/2018-06-01/runtime/init/error";

/// `POST` route for an invocation's response.
pub fn response_path(request_id: &str) -> String {
    format!("{PREFIX}/runtime/invocation/{request_id}/response")
}

/// `POST` route for an invocation's error.
pub fn error_path(request_id: &str) -> String {
    format!("{PREFIX}/runtime/invocation/{request_id}/error")
}

/// The invocation's request id.
pub const REQUEST_ID: &str = "lambda-runtime-aws-request-id";
/// Deadline of the invocation, epoch milliseconds.
pub const DEADLINE_MS: &str = "lambda-runtime-deadline-ms";
/// ARN of the invoked function.
pub const FUNCTION_ARN: &str = "lambda-runtime-invoked-function-arn";
/// X-Ray trace header.
pub const TRACE_ID: &str = "lambda-runtime-trace-id";
/// Client context (base64 JSON), when the caller passed one.
pub const CLIENT_CONTEXT: &str = "lambda-runtime-client-context";
/// Response mode; `streaming` makes the response a chunked stream.
pub const RESPONSE_MODE: &str = "lambda-runtime-function-response-mode";
/// The value of [`RESPONSE_MODE`] for streamed responses.
pub const STREAMING: &str = "streaming";
/// Error type, on `/error` and as a trailer of a streamed response.
pub const ERROR_TYPE: &str = "lambda-runtime-function-error-type";
/// Base64 error body, as a trailer of a streamed response.
pub const ERROR_BODY: &str = "lambda-runtime-function-error-body";

/// Variable the emulator sets in every environment it starts (functions and
/// microVMs): it marks their processes, and tells the agent it is not billed.
pub const EMULATED_ENVIRONMENT: &str = "MVM_SHARD_EMULATED_ENVIRONMENT";
/// Memory of the function, in MB, as Lambda sets it for the bootstrap.
pub const FUNCTION_MEMORY_SIZE: &str = "AWS_LAMBDA_FUNCTION_MEMORY_SIZE";
