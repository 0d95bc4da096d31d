//! One emulated microVM ([`Microvm`]): the image's command as a fresh process
//! tree in a fresh folder, bound to a loopback address of its own, driven
//! through its lifecycle hooks, and ended (by `TerminateMicrovm`, by its
//! maximum duration, or by itself) with everything it started.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::proxy::{self, Forwarder};
use super::routes::{epoch_seconds, RunMicrovmRequest};
use super::tokens::AuthTokens;
use super::Image;
use crate::emulator::environment::ENVIRONMENT_MARKER;
use crate::emulator::output_tail::OutputTail;
use crate::os;
use crate::protocol::microvm::{
    hook_path, BIND_IP_VAR, DEFAULT_HOOKS_PORT, DEFAULT_LOG_PORT, HOOKS_PORT_VAR, LOG_PORT_VAR,
};

/// Port of the lifecycle hooks inside a microVM.
pub const HOOKS_PORT: u16 = DEFAULT_HOOKS_PORT;
/// Port of the application (the agent's log) inside a microVM.
pub const APPLICATION_PORT: u16 = DEFAULT_LOG_PORT;
/// How long an image has to answer `ready` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two `ready` probes.
const READY_POLL: Duration = Duration::from_millis(25);
/// How long the `run` hook may take to answer (it answers at once by contract).
const RUN_HOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the `terminate` hook is given before the tree is killed.
const TERMINATE_HOOK_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes of the process's output kept, to say why a microVM died.
const OUTPUT_TAIL: usize = 2048;
/// Longest `stateReason` the model allows.
const MAX_REASON: usize = 2048;

/// The `MicrovmState` enum of the model, as far as the emulator goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MicrovmState {
    /// Started, not yet through `ready` and `run`.
    Pending,
    /// Through `run`: the endpoint serves.
    Running,
    /// Being ended.
    Terminating,
    /// Gone, with everything it started.
    Terminated,
}

impl MicrovmState {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            MicrovmState::Pending => "PENDING",
            MicrovmState::Running => "RUNNING",
            MicrovmState::Terminating => "TERMINATING",
            MicrovmState::Terminated => "TERMINATED",
        }
    }
}

struct Status {
    state: MicrovmState,
    reason: Option<String>,
    terminated_at: Option<SystemTime>,
}

/// What [`Microvm::spawn`] needs.
pub struct Spec {
    /// The microVM id.
    pub id: String,
    /// Order of creation, for listings.
    pub seq: u64,
    /// The image it runs.
    pub image: Arc<Image>,
    /// The image version reported.
    pub image_version: String,
    /// The request, to echo the settings it carried.
    pub request: RunMicrovmRequest,
    /// `maximumDurationInSeconds`.
    pub maximum_duration: u32,
    /// Folder under which the microVM gets its own.
    pub base: PathBuf,
    /// `AWS_REGION` inside.
    pub region: String,
    /// Client that calls the hooks.
    pub hooks: Hooks,
    /// Client that forwards the endpoint's requests.
    pub forwarder: Forwarder,
    /// Break every proxied response off after this many bytes (fault injection).
    pub cut_responses_after: Option<u64>,
}

/// A microVM; [`Microvm::terminate`] ends it, `exited` fires once it is gone.
pub struct Microvm {
    /// The microVM id.
    pub id: String,
    /// Order of creation, for listings.
    pub seq: u64,
    /// The image it runs.
    pub image: Arc<Image>,
    /// The image version reported.
    pub image_version: String,
    /// Its own loopback address, where its servers bind.
    pub bind_ip: Ipv4Addr,
    /// `http://127.0.0.1:PORT` of its proxy.
    pub endpoint: String,
    /// Fires once the process tree is gone and the state is `TERMINATED`.
    pub exited: CancellationToken,
    /// The endpoint's live auth tokens.
    pub tokens: Mutex<AuthTokens>,
    request: RunMicrovmRequest,
    maximum_duration: u32,
    started_at: SystemTime,
    status: Mutex<Status>,
    /// Fires when termination begins, whatever its cause.
    stop: CancellationToken,
    output: OutputTail,
}

impl Microvm {
    /// Starts the image's command in a new folder, with its proxy; the
    /// microVM is `PENDING` until [`Microvm::boot`] got it through `run`.
    pub async fn spawn(spec: Spec) -> std::io::Result<Arc<Self>> {
        let (program, args) = spec.image.config.command.split_first().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the command of image {} is empty", spec.image.config.name),
            )
        })?;
        let bind_ip = allocate_address()?;
        let dir = spec.base.join(&spec.id);
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp)?;
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        // AWS gives an HTTPS host name here; ours is a plain HTTP proxy on loopback.
        let endpoint = format!("http://{}", listener.local_addr()?);

        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(&dir)
            .env_clear()
            .envs(microvm_environment(
                &spec.id,
                bind_ip,
                &dir,
                &tmp,
                &spec.region,
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;

        let vm = Arc::new(Microvm {
            id: spec.id,
            seq: spec.seq,
            image: spec.image,
            image_version: spec.image_version,
            bind_ip,
            endpoint,
            exited: CancellationToken::new(),
            tokens: Mutex::new(AuthTokens::default()),
            request: spec.request,
            maximum_duration: spec.maximum_duration,
            started_at: SystemTime::now(),
            status: Mutex::new(Status {
                state: MicrovmState::Pending,
                reason: None,
                terminated_at: None,
            }),
            stop: CancellationToken::new(),
            output: OutputTail::new(OUTPUT_TAIL),
        });
        let readers = vm.output.follow(&mut child, &format!("microvm/{}", vm.id));
        tokio::spawn(proxy::serve(
            listener,
            vm.clone(),
            spec.forwarder,
            spec.cut_responses_after,
            vm.stop.clone(),
        ));
        tokio::spawn(lifecycle(vm.clone(), child, readers, dir, spec.hooks));
        Ok(vm)
    }

    /// Waits for `ready`, then hands `payload` to `run`. On failure the
    /// microVM is being terminated with the reason, which is returned.
    pub async fn boot(&self, hooks: &Hooks, payload: Bytes) -> Result<(), String> {
        let result = self.ready_then_run(hooks, payload).await;
        match &result {
            Ok(()) => {
                let mut status = self.status.lock().expect("lock poisoned");
                if status.state == MicrovmState::Pending {
                    status.state = MicrovmState::Running;
                }
            }
            Err(reason) => self.terminate(reason),
        }
        result
    }

    async fn ready_then_run(&self, hooks: &Hooks, payload: Bytes) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if self.stop.is_cancelled() {
                return Err(self
                    .reason()
                    .unwrap_or_else(|| "terminated while starting".into()));
            }
            let last = match hooks
                .call(self.bind_ip, "ready", Bytes::new(), READY_POLL * 40)
                .await
            {
                Ok((200, _)) => break,
                Ok((status, body)) => format!("{status} {body}"),
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "the ready hook did not answer 200 within {} s (last: {last})",
                    READY_TIMEOUT.as_secs()
                ));
            }
            tokio::select! {
                () = tokio::time::sleep(READY_POLL) => {}
                () = self.stop.cancelled() => {}
            }
        }
        match hooks
            .call(self.bind_ip, "run", payload, RUN_HOOK_TIMEOUT)
            .await
        {
            Ok((200, _)) => Ok(()),
            Ok((status, body)) => Err(format!("the run hook answered {status}: {body}")),
            Err(e) => Err(format!("the run hook failed: {e}")),
        }
    }

    /// Begins ending the microVM (once; the first reason stays).
    pub fn terminate(&self, reason: &str) {
        {
            let mut status = self.status.lock().expect("lock poisoned");
            if matches!(status.state, MicrovmState::Pending | MicrovmState::Running) {
                status.state = MicrovmState::Terminating;
                status.reason = Some(truncate(reason));
            }
        }
        self.stop.cancel();
    }

    /// The current state.
    pub fn state(&self) -> MicrovmState {
        self.status.lock().expect("lock poisoned").state
    }

    fn reason(&self) -> Option<String> {
        self.status.lock().expect("lock poisoned").reason.clone()
    }

    /// The `GetMicrovm` / `RunMicrovm` document.
    pub fn describe(&self) -> Value {
        let status = self.status.lock().expect("lock poisoned");
        let mut doc = json!({
            "microvmId": self.id,
            "state": status.state.as_str(),
            "endpoint": self.endpoint,
            "imageArn": self.image.arn,
            "imageVersion": self.image_version,
            "maximumDurationInSeconds": self.maximum_duration,
            "startedAt": epoch_seconds(self.started_at),
        });
        if let Some(at) = status.terminated_at {
            doc["terminatedAt"] = epoch_seconds(at).into();
        }
        if let Some(reason) = &status.reason {
            doc["stateReason"] = reason.as_str().into();
        }
        let r = &self.request;
        let echoed = [
            (
                "executionRoleArn",
                r.execution_role_arn.clone().map(Value::from),
            ),
            ("idlePolicy", r.idle_policy.clone()),
            (
                "kmsKeyIdentifier",
                r.kms_key_identifier.clone().map(Value::from),
            ),
            (
                "ingressNetworkConnectors",
                r.ingress_network_connectors.clone().map(Value::from),
            ),
            (
                "egressNetworkConnectors",
                r.egress_network_connectors.clone().map(Value::from),
            ),
        ];
        for (key, value) in echoed {
            if let Some(value) = value {
                doc[key] = value;
            }
        }
        doc
    }

    /// The `MicrovmItem` of `ListMicrovms`.
    pub fn summary(&self) -> Value {
        json!({
            "microvmId": self.id,
            "state": self.state().as_str(),
            "imageArn": self.image.arn,
            "imageVersion": self.image_version,
            "startedAt": epoch_seconds(self.started_at),
        })
    }

    fn output_tail(&self) -> String {
        String::from_utf8_lossy(&self.output.snapshot())
            .trim()
            .to_string()
    }
}

/// Ends the microVM when asked, when its maximum duration passes, or when
/// its process exits; then kills everything it started.
async fn lifecycle(
    vm: Arc<Microvm>,
    mut child: Child,
    readers: Vec<tokio::task::JoinHandle<()>>,
    dir: PathBuf,
    hooks: Hooks,
) {
    let pid = child.id();
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(u64::from(vm.maximum_duration));
    let exited_by_itself = tokio::select! {
        status = child.wait() => {
            // Let the output drain, to say why it ended.
            let _ = tokio::time::timeout(
                Duration::from_millis(500),
                futures::future::join_all(readers),
            )
            .await;
            let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
            let tail = vm.output_tail();
            let last = tail.lines().last().unwrap_or_default();
            vm.terminate(&if last.is_empty() {
                format!("the microVM's process exited ({status})")
            } else {
                format!("the microVM's process exited ({status}): {last}")
            });
            true
        }
        () = vm.stop.cancelled() => false,
        () = tokio::time::sleep_until(deadline) => {
            vm.terminate(&format!(
                "the maximum duration of {} s passed",
                vm.maximum_duration
            ));
            false
        }
    };
    tracing::debug!(microvm = %vm.id, reason = ?vm.reason(), "microVM terminating");
    if !exited_by_itself {
        // As the platform does, let the image end its work before the kill.
        let _ = hooks
            .call(
                vm.bind_ip,
                "terminate",
                Bytes::new(),
                TERMINATE_HOOK_TIMEOUT,
            )
            .await;
    }
    if let Some(pid) = pid {
        os::end_descendants(pid, Duration::ZERO, false).await;
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
    let marker = vm.id.clone();
    os::kill_marked_shared(ENVIRONMENT_MARKER, &marker).await;
    {
        let mut status = vm.status.lock().expect("lock poisoned");
        status.state = MicrovmState::Terminated;
        status.terminated_at = Some(SystemTime::now());
    }
    vm.exited.cancel();
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await;
}

fn truncate(reason: &str) -> String {
    let reason = reason.trim();
    if reason.len() <= MAX_REASON {
        return reason.to_string();
    }
    let mut end = MAX_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

/// The variables a microVM's application sees: the contract's bind address
/// and ports, its folder, and the marker that finds its escaped processes.
fn microvm_environment(
    id: &str,
    bind_ip: Ipv4Addr,
    dir: &std::path::Path,
    tmp: &std::path::Path,
    region: &str,
) -> Vec<(String, String)> {
    let mut vars = vec![
        (BIND_IP_VAR, bind_ip.to_string()),
        (HOOKS_PORT_VAR, HOOKS_PORT.to_string()),
        (LOG_PORT_VAR, APPLICATION_PORT.to_string()),
        ("HOME", dir.display().to_string()),
        ("TMPDIR", tmp.display().to_string()),
        ("AWS_REGION", region.to_string()),
        ("AWS_DEFAULT_REGION", region.to_string()),
        ("LANG", "C.UTF-8".into()),
        (
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        ),
        (ENVIRONMENT_MARKER, id.to_string()),
    ];
    if let Ok(ld) = std::env::var("LD_LIBRARY_PATH") {
        vars.push(("LD_LIBRARY_PATH", ld));
    }
    vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Addresses 127.77.x.y, x in 0..=255 and y in 1..=254.
const ADDRESSES: u32 = 256 * 254;

/// A loopback address no other microVM of this process uses. Every emulator
/// of the process draws from one counter, from a random start so that
/// emulators in other processes seldom meet; an address whose ports are
/// taken anyway is skipped.
fn allocate_address() -> std::io::Result<Ipv4Addr> {
    static START: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start =
        *START.get_or_init(|| (uuid::Uuid::new_v4().as_u128() % u128::from(ADDRESSES)) as u32);
    for _ in 0..64 {
        let n = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % ADDRESSES;
        let ip = Ipv4Addr::new(127, 77, (n / 254) as u8, (n % 254 + 1) as u8);
        let free = [HOOKS_PORT, APPLICATION_PORT]
            .iter()
            .all(|&port| std::net::TcpListener::bind((ip, port)).is_ok());
        if free {
            return Ok(ip);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free 127.77.x.y address for a microVM",
    ))
}

/// Calls the lifecycle hooks of microVMs.
#[derive(Clone)]
pub struct Hooks {
    http: reqwest::Client,
}

impl Hooks {
    /// A client that never goes through a proxy and never reuses a
    /// connection (a hook server may close it at any time).
    pub fn new() -> std::io::Result<Self> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .map_err(std::io::Error::other)?;
        Ok(Hooks { http })
    }

    /// `POST /aws/lambda-microvms/runtime/v1/{hook}`: the status and body.
    pub async fn call(
        &self,
        ip: Ipv4Addr,
        hook: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(u16, String), reqwest::Error> {
        let url = format!("http://{ip}:{HOOKS_PORT}{}", hook_path(hook));
        let resp = self
            .http
            .post(url)
            .body(body)
            .timeout(timeout)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        Ok((status, text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_distinct_loopback_addresses_in_127_77() {
        let a = allocate_address().unwrap();
        let b = allocate_address().unwrap();
        assert_ne!(a, b);
        for ip in [a, b] {
            assert_eq!(ip.octets()[..2], [127, 77]);
            assert!((1..=254).contains(&ip.octets()[3]));
        }
    }

    #[test]
    fn reasons_are_cut_to_the_model_limit_on_a_char_boundary() {
        let long = "é".repeat(MAX_REASON);
        let cut = truncate(&long);
        assert!(cut.len() <= MAX_REASON);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
