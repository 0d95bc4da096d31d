//! Auth tokens of a microVM's endpoint ([`AuthTokens`]): which ports a token
//! opens and until when, and the proxy's decision for one request.

use std::time::{Duration, Instant};

use serde_json::Value;

/// Header that carries the token, as `CreateMicrovmAuthToken` names it.
pub const AUTH_HEADER: &str = "X-aws-proxy-auth";
/// Header that picks the microVM's port.
pub const PORT_HEADER: &str = "x-aws-proxy-port";
/// Prefix of every header meant for the proxy, none of which reaches the microVM.
pub const PROXY_HEADER_PREFIX: &str = "x-aws-proxy-";
/// Port a request goes to without `X-aws-proxy-port`.
pub const DEFAULT_PORT: u16 = 8080;
/// Longest a token may live, in minutes.
pub const MAX_EXPIRATION_MINUTES: i64 = 60;

/// One member of `allowedPorts`: the `PortSpecification` union.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    /// `{"port": N}`.
    Port(u16),
    /// `{"range": {"startPort": A, "endPort": B}}`, both ends included.
    Range(u16, u16),
    /// `{"allPorts": {}}`.
    All,
}

impl PortSpec {
    /// Reads one union member; the message says what is wrong.
    pub fn parse(value: &Value) -> Result<Self, String> {
        let object = value
            .as_object()
            .ok_or("a port specification must be an object")?;
        let mut members = object.iter().filter(|(_, v)| !v.is_null());
        let (Some((key, member)), None) = (members.next(), members.next()) else {
            return Err(
                "a port specification must set exactly one of port, range and allPorts".into(),
            );
        };
        match key.as_str() {
            "port" => port_number(member, "port").map(PortSpec::Port),
            "range" => {
                let start = port_number(&member["startPort"], "range.startPort")?;
                let end = port_number(&member["endPort"], "range.endPort")?;
                if start > end {
                    return Err(format!(
                        "range.startPort {start} is greater than range.endPort {end}"
                    ));
                }
                Ok(PortSpec::Range(start, end))
            }
            "allPorts" if member.is_object() => Ok(PortSpec::All),
            other => Err(format!("unknown port specification member {other}")),
        }
    }

    /// Whether this specification opens `port`.
    pub fn allows(&self, port: u16) -> bool {
        match *self {
            PortSpec::Port(p) => p == port,
            PortSpec::Range(start, end) => (start..=end).contains(&port),
            PortSpec::All => true,
        }
    }
}

fn port_number(value: &Value, what: &str) -> Result<u16, String> {
    value
        .as_u64()
        .and_then(|n| u16::try_from(n).ok())
        .filter(|&n| n >= 1)
        .ok_or_else(|| format!("{what} must be a port number from 1 to 65535"))
}

/// Why the proxy refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// No token, or one that is unknown or expired (401).
    #[error("missing, unknown or expired {AUTH_HEADER} token")]
    Unauthorized,
    /// `X-aws-proxy-port` is not a port number (400).
    #[error("{PORT_HEADER} {0:?} is not a port number")]
    BadPort(String),
    /// The token does not open the requested port (403).
    #[error("the token does not allow port {0}")]
    PortNotAllowed(u16),
}

struct AuthToken {
    value: String,
    expires: Instant,
    ports: Vec<PortSpec>,
}

/// The live tokens of one microVM.
#[derive(Default)]
pub struct AuthTokens {
    tokens: Vec<AuthToken>,
}

impl AuthTokens {
    /// Issues a token valid for `lifetime` on `ports`; returns its value.
    pub fn issue(&mut self, lifetime: Duration, ports: Vec<PortSpec>) -> String {
        let now = Instant::now();
        self.tokens.retain(|t| t.expires > now);
        let value = format!(
            "mvmtok-{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        self.tokens.push(AuthToken {
            value: value.clone(),
            expires: now + lifetime,
            ports,
        });
        value
    }

    /// The port a request with these proxy headers may reach, or why not.
    pub fn authorize(&self, token: Option<&str>, port: Option<&str>) -> Result<u16, Denial> {
        let now = Instant::now();
        let token = token
            .and_then(|v| self.tokens.iter().find(|t| t.value == v))
            .filter(|t| t.expires > now)
            .ok_or(Denial::Unauthorized)?;
        let port = match port.map(str::trim) {
            None => DEFAULT_PORT,
            Some(raw) => raw
                .parse::<u16>()
                .ok()
                .filter(|&p| p >= 1)
                .ok_or_else(|| Denial::BadPort(raw.to_string()))?,
        };
        if token.ports.iter().any(|spec| spec.allows(port)) {
            Ok(port)
        } else {
            Err(Denial::PortNotAllowed(port))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_form_of_the_port_union_parses() {
        assert_eq!(
            PortSpec::parse(&json!({"port": 8080})),
            Ok(PortSpec::Port(8080))
        );
        assert_eq!(
            PortSpec::parse(&json!({"range": {"startPort": 9000, "endPort": 9010}})),
            Ok(PortSpec::Range(9000, 9010))
        );
        assert_eq!(PortSpec::parse(&json!({"allPorts": {}})), Ok(PortSpec::All));
    }

    #[test]
    fn malformed_port_specifications_are_refused() {
        for bad in [
            json!({}),
            json!({"port": 0}),
            json!({"port": 65536}),
            json!({"port": 80, "allPorts": {}}),
            json!({"range": {"startPort": 9, "endPort": 8}}),
            json!({"range": {"startPort": 9}}),
            json!({"everything": {}}),
            json!(8080),
        ] {
            assert!(PortSpec::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_token_opens_only_its_ports_until_it_expires() {
        let mut tokens = AuthTokens::default();
        let t = tokens.issue(Duration::from_secs(60), vec![PortSpec::Port(8080)]);
        assert_eq!(tokens.authorize(Some(&t), None), Ok(8080));
        assert_eq!(tokens.authorize(Some(&t), Some("8080")), Ok(8080));
        assert_eq!(
            tokens.authorize(Some(&t), Some("9000")),
            Err(Denial::PortNotAllowed(9000))
        );
        assert_eq!(
            tokens.authorize(Some(&t), Some("http")),
            Err(Denial::BadPort("http".into()))
        );
        assert_eq!(
            tokens.authorize(Some("nope"), None),
            Err(Denial::Unauthorized)
        );
        assert_eq!(tokens.authorize(None, None), Err(Denial::Unauthorized));

        let expired = tokens.issue(Duration::ZERO, vec![PortSpec::All]);
        assert_eq!(
            tokens.authorize(Some(&expired), None),
            Err(Denial::Unauthorized)
        );
    }

    #[test]
    fn ranges_and_all_ports_open_what_they_say() {
        let mut tokens = AuthTokens::default();
        let range = tokens.issue(Duration::from_secs(60), vec![PortSpec::Range(9000, 9001)]);
        assert_eq!(tokens.authorize(Some(&range), Some("9001")), Ok(9001));
        assert_eq!(
            tokens.authorize(Some(&range), None),
            Err(Denial::PortNotAllowed(8080))
        );
        let all = tokens.issue(Duration::from_secs(60), vec![PortSpec::All]);
        assert_eq!(tokens.authorize(Some(&all), Some("1")), Ok(1));
    }
}
