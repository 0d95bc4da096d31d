//! A local Lambda on loopback, with no Docker: `mvm-shard emulate`.
//!
//! [`Emulator`] serves the Invoke API (buffered and response-streaming) on one
//! listener. Each function is a command started as a fresh process in a fresh
//! folder with the variables Lambda sets, speaking the Runtime API on a port of
//! its own; warm environments are reused as Lambda does, never across tenant ids.
//! The same listener serves the Lambda MicroVMs control plane, whose microVMs
//! are commands too ([`MicrovmImageConfig`]).

mod environment;
mod errors;
mod eventstream;
mod faults;
mod in_process;
mod invoke;
mod microvms;
mod output_tail;
mod runtime;
mod stale;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use environment::Environment;
pub use errors::ApiError;
pub use eventstream::InvokeComplete;
pub use faults::{FaultCounts, FaultKind, LambdaFaults};
pub use microvms::{MicrovmFaults, MicrovmImageConfig, DEFAULT_MICROVM_IMAGE};

/// Name of the function `emulate` hosts when none is given.
pub const DEFAULT_FUNCTION: &str = "mvm-shard";
/// Idle environments kept per function; the oldest beyond this are stopped.
const MAX_IDLE_PER_FUNCTION: usize = 16;

/// One emulated function.
#[derive(Debug, Clone)]
pub struct FunctionConfig {
    /// The function name callers use.
    pub name: String,
    /// argv of the bootstrap, started in a fresh folder per environment.
    pub command: Vec<String>,
    /// `_HANDLER`, for runtimes that want one.
    pub handler: String,
    /// Invocation timeout (Lambda's maximum is 900 s).
    pub timeout: Duration,
    /// `AWS_LAMBDA_FUNCTION_MEMORY_SIZE`.
    pub memory_mb: u32,
    /// Reported `EphemeralStorage.Size`, in MB.
    pub ephemeral_storage_mb: u32,
    /// Tenant isolation mode `PER_TENANT`: a tenant id is required and
    /// environments are never shared between tenant ids.
    pub tenant_isolation: bool,
    /// Concurrent environments before invocations are throttled (429).
    pub max_concurrency: usize,
    /// Extra environment variables of the function.
    pub env: Vec<(String, String)>,
    /// Answer every invocation with `AccessDeniedException`, as Lambda does
    /// for a caller without `lambda:InvokeFunction` on the function (its
    /// configuration stays readable), to test how clients tell it.
    pub deny_invoke: bool,
    /// Keep environments warm for the next invocation of the same tenant, as
    /// Lambda does. `run --local` turns it off: each attempt there has a
    /// tenant id of its own, so a warm environment could never be reused.
    pub keep_warm: bool,
}

impl FunctionConfig {
    /// A function with Lambda's defaults for our deployment: 900 s, 10,240 MB.
    pub fn new(name: impl Into<String>, command: Vec<String>) -> Self {
        FunctionConfig {
            name: name.into(),
            command,
            handler: "bootstrap".into(),
            timeout: Duration::from_secs(900),
            memory_mb: 10_240,
            ephemeral_storage_mb: 10_240,
            tenant_isolation: false,
            max_concurrency: 1000,
            env: Vec::new(),
            deny_invoke: false,
            keep_warm: true,
        }
    }

    /// The function `mvm-shard emulate` hosts by default: this binary's agent,
    /// tenant-isolated as our deployment template sets it up.
    pub fn default_agent() -> std::io::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut f = FunctionConfig::new(
            DEFAULT_FUNCTION,
            vec![exe.display().to_string(), "agent".into()],
        );
        f.tenant_isolation = true;
        Ok(f)
    }
}

/// Everything the emulator hosts.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// The functions, by name.
    pub functions: Vec<FunctionConfig>,
    /// Region reported to functions and in ARNs.
    pub region: String,
    /// The MicroVM images, by name.
    pub microvm_images: Vec<MicrovmImageConfig>,
    /// Faults injected into MicroVM endpoints and tokens, for testing clients.
    pub microvm_faults: MicrovmFaults,
    /// Pace streamed responses past 6 MB at 2 MB/s, as Lambda does (off by
    /// default, so local runs of chatty suites are not slowed).
    pub throttle_streams: bool,
    /// Faults injected into Invoke calls at random, for soaks (none by default).
    pub lambda_faults: LambdaFaults,
}

struct Function {
    config: Arc<FunctionConfig>,
    idle: Mutex<VecDeque<(Option<String>, Arc<Environment>)>>,
    busy: AtomicUsize,
}

struct EmulatorState {
    throttle_streams: bool,
    faults: Arc<faults::FaultInjector>,
    functions: HashMap<String, Arc<Function>>,
    region: String,
    base_dir: tempfile::TempDir,
    /// `LAMBDA_TASK_ROOT` and working folder of every environment: empty and
    /// read-only (a function that drops privileges cannot write it).
    task_root: std::path::PathBuf,
    all: Mutex<Vec<Arc<Environment>>>,
    microvms: Arc<microvms::Microvms>,
    /// Invoke calls received, answered or refused.
    invocations: AtomicUsize,
}

/// A Lambda emulator; see the module docs.
#[derive(Clone)]
pub struct Emulator {
    state: Arc<EmulatorState>,
}

impl Emulator {
    /// An emulator for `config`; environments live in a temporary folder.
    pub fn new(config: EmulatorConfig) -> std::io::Result<Self> {
        let functions = config
            .functions
            .into_iter()
            .map(|f| {
                let function = Function {
                    config: Arc::new(f),
                    idle: Mutex::new(VecDeque::new()),
                    busy: AtomicUsize::new(0),
                };
                (function.config.name.clone(), Arc::new(function))
            })
            .collect();
        let base_dir = tempfile::Builder::new().prefix(stale::PREFIX).tempdir()?;
        stale::claim(base_dir.path())?;
        // Folders of emulators killed outright (SIGKILL) go now.
        stale::sweep(base_dir.path());
        // Runtimes that drop privileges must still reach their environment's /tmp.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(base_dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let task_root = base_dir.path().join("task");
        std::fs::create_dir(&task_root)?;
        std::fs::set_permissions(&task_root, std::fs::Permissions::from_mode(0o555))?;
        let microvms = microvms::Microvms::new(
            config.microvm_images,
            &config.region,
            base_dir.path().join("microvms"),
            config.microvm_faults,
        )?;
        Ok(Emulator {
            state: Arc::new(EmulatorState {
                functions,
                throttle_streams: config.throttle_streams,
                faults: Arc::new(faults::FaultInjector::new(config.lambda_faults)),
                region: config.region,
                microvms: Arc::new(microvms),
                base_dir,
                task_root,
                all: Mutex::new(Vec::new()),
                invocations: AtomicUsize::new(0),
            }),
        })
    }

    /// How many Invoke calls (either route) reached the emulator, whatever
    /// the answer: a test's way to see that nothing was invoked.
    pub fn invocations(&self) -> usize {
        self.state.invocations.load(Ordering::SeqCst)
    }

    /// Serves on `listener` until `shutdown` resolves, then stops every
    /// environment and microVM.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let stopping = CancellationToken::new();
        let router = invoke::router(self.clone());
        use axum::serve::ListenerExt;
        // As a make-service every connection shares the one router; served as
        // a `Router`, axum rebuilds its route table for each connection.
        let server = axum::serve(
            listener.tap_io(crate::net::no_delay),
            router.into_make_service(),
        )
        .with_graceful_shutdown({
            let stopping = stopping.clone();
            async move { stopping.cancelled().await }
        });
        let state = self.state.clone();
        let watcher = tokio::spawn(async move {
            shutdown.await;
            // Ending the environments first ends every stream still open.
            destroy_all(&state).await;
            stopping.cancel();
        });
        let served = server.await;
        watcher.abort();
        destroy_all(&self.state).await;
        served
    }

    async fn acquire(
        &self,
        function: &Arc<Function>,
        tenant: Option<String>,
    ) -> Result<Lease, ApiError> {
        {
            let mut idle = function.idle.lock().expect("lock poisoned");
            idle.retain(|(_, env)| env.is_alive());
            if let Some(pos) = idle.iter().position(|(t, _)| *t == tenant) {
                let (_, env) = idle.remove(pos).expect("position is in range");
                function.busy.fetch_add(1, Ordering::SeqCst);
                return Ok(Lease::new(function.clone(), tenant, env));
            }
        }
        if function.busy.fetch_add(1, Ordering::SeqCst) >= function.config.max_concurrency {
            function.busy.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::throttled());
        }
        match Environment::spawn(
            &function.config,
            &self.state.region,
            self.state.base_dir.path(),
            &self.state.task_root,
        )
        .await
        {
            Ok(env) => {
                let mut all = self.state.all.lock().expect("lock poisoned");
                all.retain(|e| e.is_alive());
                all.push(env.clone());
                Ok(Lease::new(function.clone(), tenant, env))
            }
            Err(e) => {
                function.busy.fetch_sub(1, Ordering::SeqCst);
                Err(ApiError::service(format!(
                    "cannot start an environment for {}: {e}",
                    function.config.name
                )))
            }
        }
    }

    fn function_arn(&self, name: &str) -> String {
        format!(
            "arn:aws:lambda:{}:000000000000:function:{name}",
            self.state.region
        )
    }
}

async fn destroy_all(state: &EmulatorState) {
    let envs: Vec<Arc<Environment>> = state.all.lock().expect("lock poisoned").drain(..).collect();
    for env in &envs {
        env.destroy();
    }
    let environments_gone = async {
        for env in &envs {
            let _ = tokio::time::timeout(Duration::from_secs(10), env.exited.cancelled()).await;
        }
    };
    tokio::join!(environments_gone, state.microvms.terminate_all());
}

/// An environment checked out for one invocation; back to the pool or destroyed on release.
struct Lease {
    function: Arc<Function>,
    tenant: Option<String>,
    env: Arc<Environment>,
    released: bool,
}

impl Lease {
    fn new(function: Arc<Function>, tenant: Option<String>, env: Arc<Environment>) -> Self {
        Lease {
            function,
            tenant,
            env,
            released: false,
        }
    }

    /// Returns the environment to the warm pool, or destroys it when it is not reusable.
    fn release(mut self, reusable: bool) {
        self.released = true;
        self.function.busy.fetch_sub(1, Ordering::SeqCst);
        if !(reusable && self.function.config.keep_warm && self.env.is_alive()) {
            self.env.destroy();
            return;
        }
        let mut idle = self.function.idle.lock().expect("lock poisoned");
        idle.push_back((self.tenant.take(), self.env.clone()));
        while idle.len() > MAX_IDLE_PER_FUNCTION {
            if let Some((_, old)) = idle.pop_front() {
                old.destroy();
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.released {
            self.function.busy.fetch_sub(1, Ordering::SeqCst);
            self.env.destroy();
        }
    }
}

/// An emulator serving on a loopback port in this process, for `run --local` and tests.
pub struct RunningEmulator {
    /// `http://127.0.0.1:PORT`, for `--endpoint-url`.
    pub endpoint: String,
    emulator: Emulator,
    /// The routes the listener serves, for [`RunningEmulator::sdk_http_client`].
    router: axum::Router,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningEmulator {
    /// Binds `127.0.0.1:0` and serves `config` there.
    pub async fn start(config: EmulatorConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let emulator = Emulator::new(config)?;
        let router = invoke::router(emulator.clone());
        let stop = CancellationToken::new();
        let signal = stop.clone();
        let task = tokio::spawn(
            emulator
                .clone()
                .serve(listener, async move { signal.cancelled().await }),
        );
        Ok(RunningEmulator {
            endpoint,
            emulator,
            router,
            stop,
            task,
        })
    }

    /// An SDK HTTP client that reaches this emulator without a socket (see
    /// `in_process`); requests still name [`RunningEmulator::endpoint`].
    pub fn sdk_http_client(&self) -> aws_smithy_runtime_api::client::http::SharedHttpClient {
        in_process::http_client(self.router.clone())
    }

    /// How many Invoke calls reached it; see [`Emulator::invocations`].
    pub fn invocations(&self) -> usize {
        self.emulator.invocations()
    }

    /// The injected faults that took effect so far, by kind.
    pub fn faults_fired(&self) -> FaultCounts {
        self.emulator.state.faults.counts()
    }

    /// Stops every environment, every microVM and the server.
    pub async fn shutdown(self) -> std::io::Result<()> {
        self.stop.cancel();
        self.task.await.map_err(std::io::Error::other)?
    }
}
