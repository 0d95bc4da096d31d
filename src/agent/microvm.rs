//! The agent's MicroVM mode (`mvm-shard agent --microvm`): the lifecycle
//! hooks and the shard's log, served over HTTP as `docs/microvm-protocol.md`
//! describes; [`serve`] is the entry point, [`RunPayload`] the run hook's body.
//!
//! One shard per agent: the `run` hook (or `POST /shard` after it) starts it
//! through [`shard::run`], the same code a Lambda invocation goes through,
//! and its frames, heartbeats included, are pumped into a [`ReplayLog`] that
//! `GET /log?offset=N` serves from any offset, as often as readers reconnect.
//!
//! Every microVM resumes the same snapshot of a warm agent, so nothing unique
//! is made before `run`: the replay log is created at `run`, workspace names
//! come from `uuid::Uuid::new_v4`, which asks the OS (getrandom) on each call
//! rather than a userspace generator seeded once, and the environment state
//! (invocation count, leftovers) is examined by the shard's own sweep. Before
//! `run` the agent holds only its configuration: the scratch path and the
//! bound sockets.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use futures::StreamExt;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Mutex};

use super::replay_log::{LogWriter, ReplayLog};
use super::shard::{self, EnvironmentState};
use super::{pump_frames, workspace};
use crate::os;
pub use crate::protocol::microvm::*;
use crate::protocol::{Frame, Outcome, ShardId, ShardRequest, ShardResult, MAX_REQUEST_BYTES};

/// How long a no-op validation shard may take.
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(30);
/// A microVM has no invocation deadline: the control plane's maximum
/// duration ends it, so the shard's own timeout (at most 8 h) governs.
const NO_PLATFORM_DEADLINE: Duration = Duration::from_secs(24 * 3600);
/// How long `terminate` waits for the killed shard's result to reach the log.
const RESULT_AFTER_TERMINATE: Duration = Duration::from_secs(10);

/// Why the MicroVM agent could not serve.
#[derive(Debug, thiserror::Error)]
pub enum MicrovmError {
    /// A configuration variable does not parse.
    #[error("{name}={value:?} is not a valid {expected}")]
    Config {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// What it should be.
        expected: &'static str,
    },
    /// A server could not bind its address.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A server stopped accepting connections.
    #[error("the {server} server failed")]
    Serve {
        /// Which server (`hooks` or `log`).
        server: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// `mvm-shard agent --microvm`: binds both servers from the environment and
/// serves until SIGTERM or SIGINT.
pub async fn run() -> Result<(), MicrovmError> {
    if let Err(e) = os::become_subreaper() {
        tracing::warn!(error = %e, "cannot become a child subreaper; daemons that call setsid may survive");
    }
    let ip = env_value(BIND_IP_VAR, DEFAULT_BIND_IP, "IP address")?;
    let hooks_port = env_value(HOOKS_PORT_VAR, DEFAULT_HOOKS_PORT, "port")?;
    let log_port = env_value(LOG_PORT_VAR, DEFAULT_LOG_PORT, "port")?;
    let hooks = bind(SocketAddr::new(ip, hooks_port)).await?;
    let log = bind(SocketAddr::new(ip, log_port)).await?;
    serve(hooks, log, workspace::scratch_root(), termination_signal()).await
}

fn env_value<T: std::str::FromStr>(
    name: &'static str,
    default: T,
    expected: &'static str,
) -> Result<T, MicrovmError> {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value.parse().map_err(|_| MicrovmError::Config {
            name,
            value,
            expected,
        }),
        _ => Ok(default),
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, MicrovmError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MicrovmError::Bind { addr, source })
}

async fn termination_signal() {
    match crate::shutdown::Shutdown::from_os() {
        Ok(shutdown) => {
            shutdown.requested().await;
        }
        // Without handlers the default action still ends the process.
        Err(_) => std::future::pending().await,
    }
}

/// Serves the lifecycle hooks on `hooks` and the shard's log on `log`, with
/// `scratch` as the folder shards run in, until `shutdown` resolves; then
/// ends whatever the shard left running.
pub async fn serve(
    hooks: TcpListener,
    log: TcpListener,
    scratch: PathBuf,
    shutdown: impl Future<Output = ()>,
) -> Result<(), MicrovmError> {
    if let Err(e) = std::fs::create_dir_all(&scratch) {
        // `ready` keeps answering 503 with the reason; the image is then unusable.
        tracing::error!(scratch = %scratch.display(), error = %e, "cannot create the scratch folder");
    }
    let agent = Arc::new(Agent {
        environment: Mutex::new(EnvironmentState {
            invocations: 0,
            scratch: scratch.clone(),
        }),
        scratch,
        phase: Mutex::new(Phase::Idle),
        log: watch::Sender::new(None),
    });
    let hooks = axum::serve(
        hooks.tap_io(crate::net::no_delay),
        hook_routes(agent.clone()),
    );
    let log = axum::serve(log.tap_io(crate::net::no_delay), log_routes(agent));
    let ended = tokio::select! {
        served = hooks => served.map_err(|source| MicrovmError::Serve { server: "hooks", source }),
        served = log => served.map_err(|source| MicrovmError::Serve { server: "log", source }),
        () = shutdown => Ok(()),
    };
    // Nothing the shard started may outlive the agent.
    os::end_descendants(std::process::id(), shard::TERM_GRACE, true).await;
    ended
}

/// What the agent shares between its hooks, its log port and its shard.
struct Agent {
    /// The folder shards run in.
    scratch: PathBuf,
    /// Where the one shard of this microVM stands.
    phase: Mutex<Phase>,
    /// Held by whoever runs a shard: shards sweep the scratch root and kill
    /// every process below the agent, so two must never overlap.
    environment: Mutex<EnvironmentState>,
    /// The shard's log, once it started; `GET /log` waits for it.
    log: watch::Sender<Option<Arc<ReplayLog>>>,
}

/// Where the one shard of this microVM stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No `run` hook yet.
    Idle,
    /// `run` asked for the request on the log port.
    AwaitingRequest,
    /// The shard started (or was rejected); its log exists.
    Started,
    /// `terminate` came: no shard may start any more.
    Terminated,
}

type Answer = (StatusCode, String);

fn answer(status: StatusCode, message: impl Into<String>) -> Answer {
    (status, message.into())
}

fn hook_routes(agent: Arc<Agent>) -> Router {
    Router::new()
        .route(&hook_path("ready"), post(ready))
        .route(&hook_path("validate"), post(validate))
        .route(&hook_path("run"), post(run_hook))
        .route(&hook_path("resume"), post(acknowledge))
        .route(&hook_path("suspend"), post(acknowledge))
        .route(&hook_path("terminate"), post(terminate))
        .with_state(agent)
}

fn log_routes(agent: Arc<Agent>) -> Router {
    Router::new()
        .route(SHARD_PATH, post(post_shard))
        .route(LOG_PATH, get(get_log))
        .with_state(agent)
}

/// Both servers are bound before either serves, so only the scratch folder
/// is left to check.
async fn ready(State(agent): State<Arc<Agent>>) -> Answer {
    match std::fs::metadata(&agent.scratch) {
        Ok(m) if m.is_dir() => answer(StatusCode::OK, "ready"),
        _ => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the scratch folder {} does not exist",
                agent.scratch.display()
            ),
        ),
    }
}

async fn acknowledge() -> StatusCode {
    StatusCode::OK
}

/// Runs a no-op shard through the same code as a real one.
async fn validate(State(agent): State<Arc<Agent>>) -> Answer {
    let Ok(_exclusive) = agent.environment.try_lock() else {
        return answer(
            StatusCode::CONFLICT,
            "a shard is running; validating now would disturb it",
        );
    };
    // A state of its own: the real shard, after the snapshot, must still
    // report the fresh environment it gets.
    let mut state = EnvironmentState {
        invocations: 0,
        scratch: agent.scratch.clone(),
    };
    let request = ShardRequest::new(
        "validate",
        ShardId { index: 1, count: 1 },
        vec!["true".into()],
        VALIDATE_TIMEOUT.as_millis() as u64,
    );
    let (frames, mut rx) = mpsc::channel(64);
    let run = async move {
        let deadline = SystemTime::now() + NO_PLATFORM_DEADLINE;
        shard::run(&request, deadline, &mut state, &frames).await
    };
    let drain = async move { while rx.recv().await.is_some() {} };
    let (result, ()) = tokio::join!(run, drain);
    match result.outcome {
        Outcome::Exited { code: 0 } => answer(StatusCode::OK, "validated"),
        outcome => answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "the no-op shard did not pass: {}",
                serde_json::to_string(&outcome).unwrap_or_else(|_| format!("{outcome:?}"))
            ),
        ),
    }
}

async fn run_hook(State(agent): State<Arc<Agent>>, body: Body) -> Answer {
    let payload = match axum::body::to_bytes(body, MAX_RUN_PAYLOAD).await {
        Ok(payload) => payload,
        Err(e) => {
            return answer(
                StatusCode::BAD_REQUEST,
                format!("cannot read the run-hook payload (at most {MAX_RUN_PAYLOAD} bytes): {e}"),
            )
        }
    };
    // A caller of RunMicrovm that sends no payload (the API allows it)
    // hands the request over the endpoint instead.
    let decoded = if payload.iter().all(u8::is_ascii_whitespace) {
        Ok(RunPayload::ViaLogPort)
    } else {
        RunPayload::decode(&payload)
    };
    if let Err(
        e @ (RunPayloadError::TooLarge { .. }
        | RunPayloadError::Malformed(_)
        | RunPayloadError::Version(_)),
    ) = &decoded
    {
        return answer(StatusCode::BAD_REQUEST, e.to_string());
    }
    let mut phase = agent.phase.lock().await;
    if *phase != Phase::Idle {
        return answer(
            StatusCode::CONFLICT,
            "this microVM already got its run hook",
        );
    }
    match decoded {
        Ok(RunPayload::ViaLogPort) => {
            *phase = Phase::AwaitingRequest;
            answer(StatusCode::OK, "waiting for POST /shard on the log port")
        }
        Ok(RunPayload::Inline(request)) => match start_shard(&agent, &mut phase, Ok(request)) {
            Ok(()) => answer(StatusCode::OK, "started"),
            Err(e) => e,
        },
        // As on Lambda, a refused request still ends with a result in the log.
        Err(e) => {
            let reason = e.to_string();
            match start_shard(&agent, &mut phase, Err(reason.clone())) {
                Ok(()) => answer(StatusCode::BAD_REQUEST, reason),
                Err(e) => e,
            }
        }
    }
}

async fn post_shard(State(agent): State<Arc<Agent>>, body: Body) -> Answer {
    let request = match axum::body::to_bytes(body, MAX_REQUEST_BYTES).await {
        Ok(bytes) => ShardRequest::decode(&bytes).map_err(|e| e.to_string()),
        Err(e) => Err(format!(
            "cannot read the request (at most {MAX_REQUEST_BYTES} bytes): {e}"
        )),
    };
    let mut phase = agent.phase.lock().await;
    match *phase {
        Phase::AwaitingRequest => {}
        Phase::Idle => {
            return answer(
                StatusCode::CONFLICT,
                "no run hook asked for the request on this port",
            )
        }
        Phase::Started => return answer(StatusCode::CONFLICT, "the shard already started"),
        Phase::Terminated => return answer(StatusCode::CONFLICT, "the microVM is terminating"),
    }
    let rejected = request.as_ref().err().cloned();
    if let Err(e) = start_shard(&agent, &mut phase, request) {
        return e;
    }
    match rejected {
        None => answer(StatusCode::ACCEPTED, "started"),
        Some(reason) => answer(StatusCode::BAD_REQUEST, reason),
    }
}

/// Creates the shard's log and runs the shard (or its rejection) in the
/// background; `phase` is held so that only one shard ever starts.
fn start_shard(
    agent: &Arc<Agent>,
    phase: &mut Phase,
    request: Result<ShardRequest, String>,
) -> Result<(), Answer> {
    let (log, writer) = ReplayLog::create(&agent.scratch).map_err(|e| {
        answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "cannot create the shard's log in {}: {e}",
                agent.scratch.display()
            ),
        )
    })?;
    *phase = Phase::Started;
    agent.log.send_replace(Some(log));
    supervise("shard", run_shard(agent.clone(), request, writer));
    Ok(())
}

/// Runs `task` in the background and logs it if it panics. A panicking
/// shard task still ends its log: the writer is dropped on the way out.
fn supervise(what: &'static str, task: impl Future<Output = ()> + Send + 'static) {
    let handle = tokio::spawn(task);
    tokio::spawn(async move {
        if let Err(e) = handle.await {
            tracing::error!(task = what, error = %e, "background task failed");
        }
    });
}

async fn run_shard(agent: Arc<Agent>, request: Result<ShardRequest, String>, log: LogWriter) {
    let (frames, rx) = mpsc::channel(64);
    let pump = tokio::spawn(pump_frames(rx, log));
    let result = match request {
        Ok(request) => {
            tracing::info!(run = %request.run_id, shard = %request.shard, "running shard");
            let mut state = agent.environment.lock().await;
            let deadline = SystemTime::now() + NO_PLATFORM_DEADLINE;
            shard::run(&request, deadline, &mut state, &frames).await
        }
        Err(reason) => ShardResult::not_run(Outcome::Rejected { reason }),
    };
    let _ = frames.send(Frame::Result(result)).await;
    drop(frames);
    match pump.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "shard log failed"),
        Err(e) => tracing::error!(error = %e, "frame pump panicked"),
    }
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    #[serde(default)]
    offset: u64,
}

/// Streams the log from the offset on, live; before the shard starts the
/// body simply waits for it.
async fn get_log(State(agent): State<Arc<Agent>>, Query(query): Query<LogQuery>) -> Response {
    let offset = query.offset;
    let mut logs = agent.log.subscribe();
    let current = logs.borrow_and_update().clone();
    if let Some(log) = current {
        if let Err(e) = log.check_offset(offset) {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{}", e.len))],
                e.to_string(),
            )
                .into_response();
        }
    }
    let body = futures::stream::once(async move {
        // The sender lives in `agent`, which every handler keeps alive.
        let log = match logs.wait_for(Option::is_some).await {
            Ok(log) => (*log).clone(),
            Err(_) => None,
        };
        log.map(|log| log.read_from(offset))
    })
    .filter_map(futures::future::ready)
    .flatten();
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(body),
    )
        .into_response()
}

/// Ends the shard's command and everything it started, then gives its
/// result a moment to reach the log.
async fn terminate(State(agent): State<Arc<Agent>>) -> StatusCode {
    *agent.phase.lock().await = Phase::Terminated;
    let me = std::process::id();
    // Not reaping: the shard awaits its own command's status.
    os::end_descendants(me, shard::TERM_GRACE, false).await;
    let log = agent.log.borrow().clone();
    if let Some(log) = log {
        if tokio::time::timeout(RESULT_AFTER_TERMINATE, log.finished())
            .await
            .is_err()
        {
            // The shard was still setting up and started its command after the sweep.
            os::end_descendants(me, Duration::ZERO, false).await;
        }
    }
    StatusCode::OK
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> ShardRequest {
        ShardRequest::new(
            "run",
            ShardId { index: 1, count: 1 },
            vec!["true".into()],
            1000,
        )
    }

    #[test]
    fn payloads_round_trip() {
        for payload in [RunPayload::Inline(request()), RunPayload::ViaLogPort] {
            let bytes = payload.encode().unwrap();
            assert_eq!(RunPayload::decode(&bytes).unwrap(), payload);
        }
        assert_eq!(
            RunPayload::ViaLogPort.encode().unwrap(),
            br#"{"version":2,"request_via_log_port":true}"#
        );
    }

    #[test]
    fn requests_too_large_for_the_payload_say_so() {
        let mut big = request();
        big.env.insert("BIG".into(), "x".repeat(MAX_RUN_PAYLOAD));
        assert!(matches!(
            RunPayload::Inline(big).encode(),
            Err(RunPayloadError::TooLarge { .. })
        ));
    }

    #[test]
    fn malformed_payloads_are_told_from_invalid_requests() {
        for payload in [
            &b"{"[..],
            br#"{"version":2}"#,
            br#"{"version":2,"request_via_log_port":true,"request":{}}"#,
        ] {
            assert!(
                matches!(
                    RunPayload::decode(payload),
                    Err(RunPayloadError::Malformed(_))
                ),
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
        assert!(matches!(
            RunPayload::decode(br#"{"version":3,"request_via_log_port":true}"#),
            Err(RunPayloadError::Version(3))
        ));
        assert!(matches!(
            RunPayload::decode(br#"{"version":2,"request":{"version":2}}"#),
            Err(RunPayloadError::Request(_))
        ));
    }
}
