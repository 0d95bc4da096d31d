//! The shard request (one invocation's payload) and the shard result (its final frame).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of the request and frame formats; bumped on any incompatible change.
/// 2: output and file frames are one zstd stream per shard, flushed per frame.
pub const PROTOCOL_VERSION: u16 = 2;

/// Which of the two binaries to update when the invoker speaks protocol
/// `invoker` and the agent `agent`: the older one.
pub fn version_advice(invoker: u16, agent: u16) -> &'static str {
    if invoker > agent {
        "the agent is older than the invoker: rebuild the function's or MicroVM's image \
         (lambda-image/) with the invoker's mvm-shard release"
    } else {
        "the invoker is older than the agent: update the mvm-shard that runs `run` \
         (the action's `version` input) to the release the image was built with"
    }
}

/// Lambda's synchronous request payload limit (6 MB), which every request must fit.
pub const MAX_REQUEST_BYTES: usize = 6 * 1024 * 1024;

const MAX_RUN_ID: usize = 128;
const MAX_ARGS: usize = 4096;
const MAX_ARG_BYTES: usize = 128 * 1024;
/// What to do when a runner's selected tests overflow the command line.
const TESTS_FILE_HINT: &str =
    " (with --runner, pass long test lists through {tests_file} instead of {tests})";
const MAX_ENV_VARS: usize = 1024;
const MAX_ENV_NAME: usize = 256;
const MAX_ENV_VALUE: usize = 128 * 1024;
const MAX_SHARDS: u32 = 10_000;
const MAX_WORKDIR: usize = 4096;
const MAX_URL: usize = 8192;
const MAX_COLLECT_PATTERNS: usize = 32;
const MAX_OVERLAYS: usize = 64;
const MAX_CACHES: usize = 16;
/// Eight hours: the longest any backend (Lambda MicroVMs) lets a shard live.
const MAX_TIMEOUT_MS: u64 = 8 * 3600 * 1000;

/// Which shard of how many; `index` is 1-based, as users count shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ShardId {
    /// 1-based position of this shard.
    pub index: u32,
    /// How many shards the run was split into.
    pub count: u32,
}

impl std::fmt::Display for ShardId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Where the shard's source tree comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceSpec {
    /// Run in an empty directory.
    Empty,
    /// A zstd-compressed tar archive, base64-encoded, inside the request.
    Inline {
        /// base64 of the tar.zst bytes.
        archive: String,
    },
    /// An archive the agent downloads from a short-lived link (never a
    /// long-lived credential).
    Url {
        /// HTTP(S) link to the archive.
        url: String,
        /// How the archive is compressed.
        #[serde(default)]
        format: ArchiveFormat,
        /// Leading path components to drop (GitHub tarballs have one top folder).
        #[serde(default)]
        strip_components: u8,
        /// Hex SHA-256 the downloaded archive must have (content-addressed
        /// artifacts); the agent refuses anything else.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
    },
}

/// Compression of a source archive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArchiveFormat {
    /// tar + zstd, what the invoker packs.
    #[default]
    TarZst,
    /// tar + gzip, what GitHub serves.
    TarGz,
}

/// Everything one invocation needs to run one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRequest {
    /// Must equal [`PROTOCOL_VERSION`].
    pub version: u16,
    /// Identifies the whole run, for logs and tenant ids.
    pub run_id: String,
    /// Which shard this is.
    pub shard: ShardId,
    /// argv of the command, with `{index}` and `{count}` already replaced.
    pub command: Vec<String>,
    /// Extra environment for the command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Wall-clock limit for the command, in milliseconds.
    pub timeout_ms: u64,
    /// Working directory relative to the source root.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workdir: String,
    /// The source tree to run in.
    pub source: SourceSpec,
    /// Globs, relative to the working directory, of files to send back after
    /// the command has ended (JUnit reports, for one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub collect: Vec<String>,
    /// Archives laid over the source in order, inline or behind a link
    /// (paths relative to the source root): build outputs prepared where the
    /// invoker runs (`--include`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlays: Vec<SourceSpec>,
    /// Dependency folders restored before the command and saved after it
    /// passed (`--cache`); an accelerator only, never a reason to fail.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caches: Vec<CacheSpec>,
}

/// One dependency cache of a shard: where the folder goes and the links to
/// fetch or save it (presigned: the shard holds no credential).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheSpec {
    /// The folder, relative to the working directory, or `~/…` for one
    /// under the shard's HOME.
    pub path: String,
    /// A link to the saved folder (tar.zst), when the store has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<String>,
    /// A link to PUT the folder to after the command passed, when the store
    /// has none yet; the first upload wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save: Option<String>,
}

/// Why a request was refused before anything ran.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The payload exceeds [`MAX_REQUEST_BYTES`].
    #[error("request is {size} bytes, over the {MAX_REQUEST_BYTES}-byte limit")]
    TooLarge {
        /// Size of the payload.
        size: usize,
    },
    /// The payload is not a valid request document.
    #[error("request is not a valid shard request: {0}")]
    Malformed(String),
    /// The request speaks another protocol version.
    #[error(
        "request uses protocol version {0}, this agent speaks {PROTOCOL_VERSION}; {advice}",
        advice = version_advice(*.0, PROTOCOL_VERSION)
    )]
    Version(u16),
    /// A field is out of its bounds.
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl ShardRequest {
    /// A request with just the essentials: no extra environment, no source,
    /// nothing collected, run in the source root.
    pub fn new(
        run_id: impl Into<String>,
        shard: ShardId,
        command: Vec<String>,
        timeout_ms: u64,
    ) -> Self {
        ShardRequest {
            version: PROTOCOL_VERSION,
            run_id: run_id.into(),
            shard,
            command,
            env: BTreeMap::new(),
            timeout_ms,
            workdir: String::new(),
            source: SourceSpec::Empty,
            collect: Vec::new(),
            overlays: Vec::new(),
            caches: Vec::new(),
        }
    }

    /// Serialises the request, checking it against the same bounds the agent enforces.
    pub fn encode(&self) -> Result<Vec<u8>, RequestError> {
        self.validate()?;
        let bytes = serde_json::to_vec(self).map_err(|e| RequestError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge { size: bytes.len() });
        }
        Ok(bytes)
    }

    /// Parses and validates a payload; never panics on hostile input.
    pub fn decode(payload: &[u8]) -> Result<Self, RequestError> {
        if payload.len() > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge {
                size: payload.len(),
            });
        }
        #[derive(Deserialize)]
        struct Versioned {
            version: u16,
        }
        let versioned: Versioned =
            serde_json::from_slice(payload).map_err(|e| RequestError::Malformed(e.to_string()))?;
        if versioned.version != PROTOCOL_VERSION {
            return Err(RequestError::Version(versioned.version));
        }
        let request: ShardRequest =
            serde_json::from_slice(payload).map_err(|e| RequestError::Malformed(e.to_string()))?;
        request.validate()?;
        Ok(request)
    }

    fn validate(&self) -> Result<(), RequestError> {
        let invalid = |msg: String| Err(RequestError::Invalid(msg));
        if self.version != PROTOCOL_VERSION {
            return Err(RequestError::Version(self.version));
        }
        if self.run_id.is_empty() || self.run_id.len() > MAX_RUN_ID {
            return invalid(format!("run_id must be 1 to {MAX_RUN_ID} bytes"));
        }
        let ShardId { index, count } = self.shard;
        if count == 0 || count > MAX_SHARDS || index == 0 || index > count {
            return invalid(format!(
                "shard {index} of {count} is out of range (1 <= index <= count <= {MAX_SHARDS})"
            ));
        }
        if self.command.is_empty() || self.command[0].is_empty() {
            return invalid("command is empty".into());
        }
        if self.command.len() > MAX_ARGS {
            return invalid(format!(
                "command has over {MAX_ARGS} arguments{TESTS_FILE_HINT}"
            ));
        }
        if let Some(arg) = self
            .command
            .iter()
            .find(|a| a.len() > MAX_ARG_BYTES || a.contains('\0'))
        {
            return invalid(format!(
                "argument starting {:?} is over {MAX_ARG_BYTES} bytes or contains NUL{TESTS_FILE_HINT}",
                arg.chars().take(20).collect::<String>()
            ));
        }
        if self.env.len() > MAX_ENV_VARS {
            return invalid(format!("over {MAX_ENV_VARS} environment variables"));
        }
        for (name, value) in &self.env {
            if !is_env_name(name) || name.len() > MAX_ENV_NAME {
                return invalid(format!("{name:?} is not a valid environment variable name"));
            }
            if value.len() > MAX_ENV_VALUE || value.contains('\0') {
                return invalid(format!(
                    "value of {name} is over {MAX_ENV_VALUE} bytes or contains NUL"
                ));
            }
        }
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT_MS {
            return invalid(format!("timeout must be 1 ms to {MAX_TIMEOUT_MS} ms"));
        }
        if self.workdir.len() > MAX_WORKDIR
            || std::path::Path::new(&self.workdir)
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return invalid(format!(
                "workdir {:?} must be a relative path inside the source",
                self.workdir
            ));
        }
        if self.collect.len() > MAX_COLLECT_PATTERNS
            || self.collect.iter().any(|p| {
                p.is_empty()
                    || p.len() > MAX_WORKDIR
                    || p.starts_with('/')
                    || p.split('/').any(|c| c == "..")
            })
        {
            return invalid(format!(
                "collect takes at most {MAX_COLLECT_PATTERNS} relative globs that stay inside the working directory"
            ));
        }
        if self.overlays.len() > MAX_OVERLAYS {
            return invalid(format!("over {MAX_OVERLAYS} overlays"));
        }
        for source in std::iter::once(&self.source).chain(&self.overlays) {
            source.validate()?;
        }
        if self.caches.len() > MAX_CACHES {
            return invalid(format!("over {MAX_CACHES} caches"));
        }
        for cache in &self.caches {
            let rel = cache.path.strip_prefix("~/").unwrap_or(&cache.path);
            if rel.is_empty()
                || rel.len() > MAX_WORKDIR
                || std::path::Path::new(rel)
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return invalid(format!(
                    "cache path {:?} must be a relative path (or ~/…) that stays inside",
                    cache.path
                ));
            }
            let links = cache.restore.iter().chain(&cache.save);
            if links.into_iter().any(|u| {
                u.len() > MAX_URL || !(u.starts_with("http://") || u.starts_with("https://"))
            }) {
                return invalid("cache links must be http(s) URLs".into());
            }
        }
        Ok(())
    }
}

impl SourceSpec {
    fn validate(&self) -> Result<(), RequestError> {
        let SourceSpec::Url { url, sha256, .. } = self else {
            return Ok(());
        };
        if url.len() > MAX_URL || !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(RequestError::Invalid(
                "source url must be an http(s) URL".into(),
            ));
        }
        if let Some(hash) = sha256 {
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(RequestError::Invalid("sha256 must be 64 hex digits".into()));
            }
        }
        Ok(())
    }
}

/// Whether `name` can be an environment variable name in a POSIX shell.
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// How the shard's command ended, as the agent saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// The command exited with this code.
    Exited {
        /// Exit status.
        code: i32,
    },
    /// The command was killed by a signal it did not get from us.
    Signaled {
        /// Signal number.
        signal: i32,
    },
    /// The command ran past its deadline and was killed.
    TimedOut {
        /// The limit that was hit, in milliseconds.
        limit_ms: u64,
    },
    /// The request was refused; nothing ran.
    Rejected {
        /// What was wrong with it.
        reason: String,
    },
    /// The agent could not set the shard up (source, workspace, spawn).
    SetupFailed {
        /// What went wrong.
        reason: String,
    },
}

/// The mandatory final frame of every shard stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardResult {
    /// How the command ended.
    pub outcome: Outcome,
    /// Time the command itself ran, in milliseconds.
    pub duration_ms: u64,
    /// Time spent preparing the workspace and source, in milliseconds.
    pub setup_ms: u64,
    /// True when nothing had run in this environment before this shard.
    pub fresh_environment: bool,
    /// Files and folders a previous invocation left that the agent removed first.
    #[serde(default)]
    pub stale_paths_removed: u32,
    /// Processes a previous invocation left that the agent killed first.
    #[serde(default)]
    pub stale_processes_killed: u32,
    /// Processes this shard's command left behind that the agent killed.
    #[serde(default)]
    pub stragglers_killed: u32,
    /// Files matching `collect` that were not sent back (over the size budget).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files_skipped: Vec<String>,
    /// What the environment had, for the run's cost estimate (absent from
    /// older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
}

/// The size of the environment a shard ran in, as the agent saw it: what
/// Lambda bills by (memory × duration for functions, vCPU and memory for
/// MicroVMs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// A Lambda function or a Lambda MicroVM.
    pub platform: Platform,
    /// The local emulator stood in for it: nothing is billed.
    #[serde(default)]
    pub emulated: bool,
    /// Memory: the function's configured size, or the microVM's total.
    pub memory_mb: u32,
    /// CPUs the command could use.
    pub vcpus: u32,
    /// `x86_64` or `aarch64`: Lambda prices the two differently.
    pub arch: String,
}

/// Where a shard ran, for pricing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    /// A Lambda function (billed per GB-second).
    LambdaFunction,
    /// A Lambda MicroVM (billed per vCPU and memory over time).
    Microvm,
}

impl ShardResult {
    /// A result for a shard that never got to run its command.
    pub fn not_run(outcome: Outcome) -> Self {
        ShardResult {
            outcome,
            duration_ms: 0,
            setup_ms: 0,
            fresh_environment: false,
            stale_paths_removed: 0,
            stale_processes_killed: 0,
            stragglers_killed: 0,
            files_skipped: Vec::new(),
            resources: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> ShardRequest {
        ShardRequest::new(
            "run",
            ShardId { index: 1, count: 2 },
            vec!["true".into()],
            1000,
        )
    }

    #[test]
    fn request_round_trips() {
        let req = request();
        assert_eq!(ShardRequest::decode(&req.encode().unwrap()).unwrap(), req);
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for payload in [
            &b""[..],
            b"{",
            b"null",
            b"[]",
            b"\xff\xfe",
            b"{\"version\":2}",
        ] {
            assert!(matches!(
                ShardRequest::decode(payload),
                Err(RequestError::Malformed(_))
            ));
        }
    }

    #[test]
    fn other_versions_are_refused() {
        let mut req = request();
        req.version = 9;
        let bytes = serde_json::to_vec(&req).unwrap();
        assert_eq!(ShardRequest::decode(&bytes), Err(RequestError::Version(9)));
    }

    #[test]
    fn out_of_bounds_fields_are_invalid() {
        let mut cases = Vec::new();
        let mut r = request();
        r.shard = ShardId { index: 3, count: 2 };
        cases.push(r);
        let mut r = request();
        r.command.clear();
        cases.push(r);
        let mut r = request();
        r.env.insert("1BAD".into(), "x".into());
        cases.push(r);
        let mut r = request();
        r.timeout_ms = 0;
        cases.push(r);
        let mut r = request();
        r.workdir = "../escape".into();
        cases.push(r);
        let mut r = request();
        r.collect = vec!["../../etc/passwd".into()];
        cases.push(r);
        let mut r = request();
        r.caches = vec![CacheSpec {
            path: "~/../../etc".into(),
            restore: None,
            save: None,
        }];
        cases.push(r);
        let mut r = request();
        r.overlays = vec![SourceSpec::Url {
            url: "file:///etc/passwd".into(),
            format: ArchiveFormat::TarZst,
            strip_components: 0,
            sha256: None,
        }];
        cases.push(r);
        let mut r = request();
        r.overlays = vec![SourceSpec::Url {
            url: "http://127.0.0.1/a".into(),
            format: ArchiveFormat::TarZst,
            strip_components: 0,
            sha256: Some("not-a-hash".into()),
        }];
        cases.push(r);
        for r in cases {
            let bytes = serde_json::to_vec(&r).unwrap();
            assert!(
                matches!(ShardRequest::decode(&bytes), Err(RequestError::Invalid(_))),
                "{r:?}"
            );
        }
    }

    #[test]
    fn oversized_payload_is_refused() {
        let big = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert!(matches!(
            ShardRequest::decode(&big),
            Err(RequestError::TooLarge { .. })
        ));
    }
}
