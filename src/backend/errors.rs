//! Turning what an AWS SDK call returned into one readable line and a
//! decision: retry (throttled, 5xx, a dropped connection) or stop the run (a
//! configuration mistake: a missing function, a denied call, bad credentials,
//! an endpoint that cannot be reached).
//!
//! The SDK's own `Debug` and `DisplayErrorContext` renderings are never shown:
//! a request that could not be built carries the whole request (the source
//! archive and `--env` values), so only codes and service messages are used.

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use super::{InvokeError, InvokeErrorKind};

/// Longest piece of a service's message quoted in an error line.
const MAX_QUOTED: usize = 300;

/// What a call was about, to name it in messages.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// What it is, and the flag that names it: a function or a MicroVM image.
    pub kind: TargetKind,
    /// Its name or ARN, as the user gave it.
    pub name: &'a str,
    /// The region the client calls.
    pub region: Option<&'a str>,
    /// `--endpoint-url`, when one replaces AWS's.
    pub endpoint: Option<&'a str>,
}

/// The kinds of [`Target`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A Lambda function (`--function`).
    Function,
    /// A Lambda MicroVM image (`--microvm-image`).
    MicrovmImage,
}

impl Target<'_> {
    /// `function NAME in region R, account A`, as far as known.
    pub fn describe(&self) -> String {
        format!("{}{}", self.label(), self.place())
    }

    /// `function NAME`.
    fn label(&self) -> String {
        let what = match self.kind {
            TargetKind::Function => "function",
            TargetKind::MicrovmImage => "MicroVM image",
        };
        format!("{what} {}", self.name)
    }

    /// ` in region R, account A`, as far as known.
    fn place(&self) -> String {
        let mut place = match self.region {
            Some(region) => format!(" in region {region}"),
            None => String::new(),
        };
        if let Some(account) = arn_field(self.name, 4) {
            place.push_str(&format!(", account {account}"));
        }
        place
    }

    fn service(&self) -> String {
        match self.endpoint {
            Some(url) => url.to_string(),
            None => match (self.kind, self.region) {
                (TargetKind::Function, Some(r)) => format!("AWS Lambda in region {r}"),
                (TargetKind::MicrovmImage, Some(r)) => format!("Lambda MicroVMs in region {r}"),
                _ => "AWS".to_string(),
            },
        }
    }
}

/// Field `index` (0-based) of an ARN `arn:partition:service:region:account:...`.
pub fn arn_field(arn: &str, index: usize) -> Option<&str> {
    if !arn.starts_with("arn:") {
        return None;
    }
    arn.split(':').nth(index).filter(|f| !f.is_empty())
}

/// Whether a service error code means the caller's credentials were refused.
fn is_credentials_code(code: &str) -> bool {
    matches!(
        code,
        "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "SignatureDoesNotMatch"
            | "ExpiredTokenException"
            | "ExpiredToken"
            | "InvalidClientTokenId"
            | "IncompleteSignature"
            | "MissingAuthenticationToken"
            | "MissingAuthenticationTokenException"
    )
}

/// A service's message made fit for one line: control characters become
/// spaces, and a long one is cut.
pub fn one_line(message: &str) -> String {
    let flat: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.trim();
    match flat.char_indices().nth(MAX_QUOTED) {
        Some((cut, _)) => format!("{}…", &flat[..cut]),
        None => flat.to_string(),
    }
}

/// The `code: message` of a service error, or whichever is there.
fn quoted(code: Option<&str>, message: Option<&str>) -> String {
    match (code, message.map(one_line).filter(|m| !m.is_empty())) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.to_string(),
        (None, Some(m)) => m,
        (None, None) => "no error code".to_string(),
    }
}

/// A configuration error: stops the run (exit 2).
fn config(message: String) -> InvokeError {
    InvokeError {
        kind: InvokeErrorKind::Config,
        message,
    }
}

/// Sorts a failed call: a service error by its code and HTTP status
/// (`throttled` codes and 429 are throttles, `transient` codes and 5xx are
/// passing failures, anything else is a configuration mistake); a connection
/// that broke or timed out is passing. A connection that could not be made at
/// all is passing too when `connect_is_config` is false (mid-run, a blip),
/// and a configuration mistake when it is true (the first call of a run).
pub fn classify<E>(
    error: &SdkError<E, HttpResponse>,
    target: &Target<'_>,
    throttled: &[&str],
    transient: &[&str],
    connect_is_config: bool,
) -> InvokeError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match error {
        SdkError::ServiceError(service) => {
            let err = service.err();
            let status = service.raw().status().as_u16();
            let code = err.code();
            let said = quoted(code, err.message());
            if status == 429 || code.is_some_and(|c| throttled.contains(&c)) {
                return InvokeError {
                    kind: InvokeErrorKind::Throttled,
                    message: format!("throttled ({said})"),
                };
            }
            if status >= 500 || code.is_some_and(|c| transient.contains(&c)) {
                return InvokeError {
                    kind: InvokeErrorKind::Transient,
                    message: format!("service error, HTTP {status} ({said})"),
                };
            }
            config(service_mistake(target, code, err.message(), &said))
        }
        SdkError::DispatchFailure(failure) => {
            let cause = failure
                .as_connector_error()
                .map(connector_cause)
                .unwrap_or_else(|| "the request could not be sent".to_string());
            let connect = failure.as_connector_error().is_some_and(never_connected);
            if connect && connect_is_config {
                let hint = match target.endpoint {
                    Some(_) => "check --endpoint-url and that the endpoint is serving",
                    None => "check --region and the network",
                };
                config(format!("cannot reach {}: {cause}: {hint}", target.service()))
            } else {
                InvokeError {
                    kind: InvokeErrorKind::Transient,
                    message: format!("connection to {} failed: {cause}", target.service()),
                }
            }
        }
        SdkError::TimeoutError(_) => InvokeError {
            kind: InvokeErrorKind::Transient,
            message: format!("no answer from {} in time", target.service()),
        },
        SdkError::ResponseError(_) => InvokeError {
            kind: InvokeErrorKind::Transient,
            message: format!("the answer of {} could not be read", target.service()),
        },
        // The cause of a request that could not be built holds the request
        // itself (body included): it is never shown.
        SdkError::ConstructionFailure(_) => config(format!(
            "cannot build a request to {}: check that --endpoint-url is a URL such as https://host or http://127.0.0.1:9001",
            target.service()
        )),
        _ => config(format!(
            "the call to {} failed in an unexpected way",
            target.service()
        )),
    }
}

/// What a failed preflight read (of the function or image, before any shard
/// starts) means for the run: a configuration mistake stops it, except a
/// denied read, since a caller may be allowed to invoke but not to read;
/// anything passing lets the run try.
pub fn preflight<E>(
    error: &SdkError<E, HttpResponse>,
    target: &Target<'_>,
) -> Result<(), InvokeError>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let denied = error
        .as_service_error()
        .and_then(|s| s.code())
        .is_some_and(|c| c.starts_with("AccessDenied"));
    let error = classify(error, target, &[], &[], true);
    match error.kind {
        InvokeErrorKind::Config if !denied => Err(error),
        _ => Ok(()),
    }
}

/// The one line for a service's answer that retrying will not change.
fn service_mistake(
    target: &Target<'_>,
    code: Option<&str>,
    message: Option<&str>,
    said: &str,
) -> String {
    let it = target.describe();
    let flag = match target.kind {
        TargetKind::Function => "--function",
        TargetKind::MicrovmImage => "--microvm-image",
    };
    let message = message.unwrap_or_default();
    match code.unwrap_or_default() {
        "ResourceNotFoundException" => format!(
            "{} not found{} ({said}): {}, or pass its name or ARN with {flag} and its region with --region",
            target.label(),
            target.place(),
            match target.kind {
                TargetKind::Function => "deploy lambda-image/template.yaml there",
                TargetKind::MicrovmImage => "create the image there",
            }
        ),
        "AccessDeniedException" | "AccessDenied" => format!(
            "{it}: the caller is not allowed to {} it ({said}): grant it {}, as the template's role for GitHub Actions has",
            match target.kind {
                TargetKind::Function => "invoke",
                TargetKind::MicrovmImage => "run",
            },
            match target.kind {
                TargetKind::Function => "lambda:InvokeFunction on the function",
                TargetKind::MicrovmImage => "the right to run microVMs of the image",
            }
        ),
        c if is_credentials_code(c) => format!(
            "AWS refused the credentials ({said}): refresh them (aws sso login, or the workflow's configure-aws-credentials step) and check that they are for the account of {it}"
        ),
        _ if message.contains("not enabled with tenancy configuration") => {
            tenancy_mistake(target, false)
        }
        _ if message.contains("enabled with tenancy configuration") => tenancy_mistake(target, true),
        _ => format!("{it} refused the request ({said})"),
    }
}

/// The line for a function whose tenant isolation is not what the run expects.
pub fn tenancy_mistake(target: &Target<'_>, function_isolated: bool) -> String {
    if function_isolated {
        format!(
            "{} uses tenant isolation: drop --no-tenant-isolation",
            target.describe()
        )
    } else {
        format!(
            "{} does not use tenant isolation: pass --no-tenant-isolation, or redeploy it with lambda-image/template.yaml",
            target.describe()
        )
    }
}

/// Whether a transport error happened before any connection was made
/// (refused, no such host), as opposed to a connection that broke.
fn never_connected(error: &aws_smithy_runtime_api::client::result::ConnectorError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(hyper) = e.downcast_ref::<hyper_util::client::legacy::Error>() {
            if hyper.is_connect() {
                return true;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable
            ) {
                return true;
            }
        }
        source = e.source();
    }
    false
}

/// An error and its causes in words, outermost first ("response stream
/// failed: connection closed before message completed"), with no Debug dump
/// of the SDK's types (which `DisplayErrorContext` appends).
pub fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut source = Some(error);
    while let Some(e) = source {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = e.source();
    }
    one_line(&parts.join(": "))
}

/// The innermost cause of a transport error, in words (an OS error or a
/// resolver's message; a transport error holds no request).
fn connector_cause(error: &aws_smithy_runtime_api::client::result::ConnectorError) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    let mut last = None;
    while let Some(e) = source {
        last = Some(e.to_string());
        source = e.source();
    }
    one_line(&last.unwrap_or_else(|| "connection failed".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_lambda::operation::invoke_with_response_stream::InvokeWithResponseStreamError;
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;

    const TARGET: Target<'static> = Target {
        kind: TargetKind::Function,
        name: "arn:aws:lambda:eu-west-1:123456789012:function:tests",
        region: Some("eu-west-1"),
        endpoint: None,
    };

    fn answer(status: u16, code: &str, message: &str) -> InvokeError {
        let err = InvokeWithResponseStreamError::generic(
            ErrorMetadata::builder().code(code).message(message).build(),
        );
        let raw = HttpResponse::new(
            StatusCode::try_from(status).expect("a valid status"),
            SdkBody::empty(),
        );
        classify(
            &SdkError::service_error(err, raw),
            &TARGET,
            &["TooManyRequestsException"],
            &["ServiceException"],
            true,
        )
    }

    #[test]
    fn only_throttles_and_server_errors_are_retried() {
        assert_eq!(
            answer(429, "TooManyRequestsException", "Rate Exceeded.").kind,
            InvokeErrorKind::Throttled
        );
        assert_eq!(
            answer(500, "ServiceException", "oops").kind,
            InvokeErrorKind::Transient
        );
        assert_eq!(
            answer(502, "SomethingNewException", "oops").kind,
            InvokeErrorKind::Transient
        );
        for (status, code) in [
            (404, "ResourceNotFoundException"),
            (403, "AccessDeniedException"),
            (403, "ExpiredTokenException"),
            (403, "UnrecognizedClientException"),
            (400, "InvalidParameterValueException"),
            (409, "SomethingElseException"),
        ] {
            assert_eq!(
                answer(status, code, "no").kind,
                InvokeErrorKind::Config,
                "{code}"
            );
        }
    }

    #[test]
    fn messages_name_the_function_region_and_account_and_say_what_to_do() {
        let missing = answer(404, "ResourceNotFoundException", "Function not found").message;
        assert!(missing.starts_with("function arn:aws:lambda:eu-west-1:123456789012:function:tests not found in region eu-west-1, account 123456789012 (ResourceNotFoundException: Function not found)"), "{missing}");
        assert!(missing.contains("--region"), "{missing}");
        let denied = answer(403, "AccessDeniedException", "User: x is not authorized").message;
        assert!(denied.contains("lambda:InvokeFunction"), "{denied}");
        let expired = answer(
            403,
            "ExpiredTokenException",
            "The security token included in the request is expired",
        )
        .message;
        assert!(
            expired.starts_with("AWS refused the credentials (ExpiredTokenException: The security token included in the request is expired)"),
            "{expired}"
        );
        let multi = answer(400, "X", "line one\nline two").message;
        assert!(!multi.contains('\n'), "{multi}");
    }

    #[test]
    fn causes_are_words_outermost_first_without_debug_dumps() {
        let inner = std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        );
        let outer = StreamFailure(inner);
        assert_eq!(
            causes(&outer),
            "response stream failed: connection reset by peer"
        );
    }

    #[derive(Debug)]
    struct StreamFailure(std::io::Error);

    impl std::fmt::Display for StreamFailure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("response stream failed")
        }
    }

    impl std::error::Error for StreamFailure {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
