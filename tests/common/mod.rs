//! Shared set-up for the integration tests: an emulator on loopback hosting
//! the real agent binary, and the real aws-sdk-lambda client pointed at it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use mvm_shard::backend::{Backend, LambdaBackend, LambdaOptions};
use mvm_shard::dispatch::{self, DispatchOptions, RunEvent, RunSummary, ShardJob};
use mvm_shard::emulator::{EmulatorConfig, FunctionConfig, RunningEmulator};
use mvm_shard::protocol::{OutputStream, ShardId, ShardRequest};
use tokio_util::sync::CancellationToken;

/// Path of the binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_mvm-shard")
}

/// A function whose bootstrap is our agent.
pub fn agent_function(name: &str, tenant_isolation: bool) -> FunctionConfig {
    let mut f = FunctionConfig::new(name, vec![binary().to_string(), "agent".into()]);
    f.tenant_isolation = tenant_isolation;
    f
}

/// Folder of the foreign clients and handlers the tests use.
pub fn clients_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// A function run by awslambdaric, the official Python runtime client.
pub fn python_function(name: &str, handler: &str) -> FunctionConfig {
    FunctionConfig::new(
        name,
        vec![
            "sh".into(),
            "-c".into(),
            format!(
                "cd '{}' && exec python3 -m awslambdaric {handler}",
                clients_dir().display()
            ),
        ],
    )
}

/// An emulator hosting `functions`.
pub async fn emulator(functions: Vec<FunctionConfig>) -> RunningEmulator {
    start_emulator(EmulatorConfig {
        functions,
        region: "us-east-1".into(),
        microvm_images: Vec::new(),
        microvm_faults: Default::default(),
        throttle_streams: false,
        lambda_faults: Default::default(),
    })
    .await
}

/// An emulator for `config`, on a free loopback port.
pub async fn start_emulator(config: EmulatorConfig) -> RunningEmulator {
    RunningEmulator::start(config)
        .await
        .expect("emulator starts")
}

/// The SDK settings of every test client: `endpoint`, a region, fixed credentials.
async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_sdk_lambda::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_lambda::config::Credentials::new(
            "k", "s", None, None, "test",
        ))
        .load()
        .await
}

/// The real SDK client for `endpoint`.
pub async fn sdk_client(endpoint: &str) -> aws_sdk_lambda::Client {
    aws_sdk_lambda::Client::new(&sdk_config(endpoint).await)
}

/// Our backend for `function` on `endpoint`.
pub async fn backend(endpoint: &str, function: &str, tenant_isolation: bool) -> Arc<dyn Backend> {
    Arc::new(
        LambdaBackend::connect(LambdaOptions {
            function: function.into(),
            endpoint_url: Some(endpoint.into()),
            region: Some("us-east-1".into()),
            tenant_isolation,
            local_credentials: true,
            http_client: None,
        })
        .await
        .expect("backend connects"),
    )
}

/// A request running `sh -c script` as shard `index` of `count`.
pub fn request(script: &str, index: u32, count: u32, timeout: Duration) -> ShardRequest {
    ShardRequest::new(
        "test",
        ShardId { index, count },
        vec!["sh".into(), "-c".into(), script.into()],
        timeout.as_millis() as u64,
    )
}

/// What a dispatch produced: the summary and each shard's stdout and stderr.
pub struct Finished {
    pub summary: RunSummary,
    pub stdout: BTreeMap<u32, Vec<u8>>,
    pub stderr: BTreeMap<u32, Vec<u8>>,
    pub events: Vec<RunEvent>,
}

impl Finished {
    pub fn stdout_of(&self, index: u32) -> String {
        String::from_utf8_lossy(self.stdout.get(&index).map(|v| &v[..]).unwrap_or(b"")).into_owned()
    }
}

/// Runs `requests` through `backend` with the real dispatcher.
pub async fn run(
    backend: Arc<dyn Backend>,
    requests: Vec<ShardRequest>,
    max_parallel: usize,
) -> Finished {
    let jobs = requests
        .into_iter()
        .map(|request| ShardJob {
            shard: request.shard,
            request,
        })
        .collect();
    let (tx, mut rx) = dispatch::event_channel();
    // The channel is bounded: collect while the shards run.
    let collected = tokio::spawn(async move {
        let mut events = Vec::new();
        while let Some(event) = rx.recv().await {
            events.push(event);
        }
        events
    });
    let options = DispatchOptions {
        max_parallel,
        ..DispatchOptions::default()
    };
    let run_id = format!("t{}", uuid::Uuid::new_v4().simple());
    let summary = dispatch::dispatch(
        backend,
        &run_id,
        jobs,
        &options,
        tx,
        CancellationToken::new(),
    )
    .await;
    let mut finished = Finished {
        summary,
        stdout: BTreeMap::new(),
        stderr: BTreeMap::new(),
        events: Vec::new(),
    };
    for event in collected.await.expect("the event collector panicked") {
        if let RunEvent::Output {
            shard,
            stream,
            data,
        } = &event
        {
            let map = match stream {
                OutputStream::Stdout => &mut finished.stdout,
                OutputStream::Stderr => &mut finished.stderr,
            };
            map.entry(shard.index).or_default().extend_from_slice(data);
        }
        finished.events.push(event);
    }
    finished
}

/// Waits (bounded) until `pid` is gone; true if it went.
pub async fn wait_gone(pid: u32) -> bool {
    for _ in 0..200 {
        if !mvm_shard::os::is_alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// Runs the binary with `args` in `dir`; returns (exit code, stdout, stderr).
pub fn cli(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An emulator hosting the image `img`, whose microVMs run our agent's MicroVM mode.
pub async fn microvm_emulator(faults: mvm_shard::emulator::MicrovmFaults) -> RunningEmulator {
    start_emulator(EmulatorConfig {
        functions: Vec::new(),
        region: "us-east-1".into(),
        microvm_images: vec![mvm_shard::emulator::MicrovmImageConfig::new(
            "img",
            vec![binary().into(), "agent".into(), "--microvm".into()],
        )],
        microvm_faults: faults,
        throttle_streams: false,
        lambda_faults: Default::default(),
    })
    .await
}

/// Our MicroVMs backend for image `img` on `endpoint`.
pub async fn microvm_backend(endpoint: &str) -> Arc<mvm_shard::backend::MicrovmBackend> {
    Arc::new(
        mvm_shard::backend::MicrovmBackend::connect(mvm_shard::backend::MicrovmOptions {
            image: "img".into(),
            endpoint_url: Some(endpoint.into()),
            region: Some("us-east-1".into()),
            local_credentials: true,
            ..Default::default()
        })
        .await
        .expect("backend connects"),
    )
}

/// The real MicroVMs SDK client for `endpoint`.
pub async fn microvms_client(endpoint: &str) -> aws_sdk_lambdamicrovms::Client {
    aws_sdk_lambdamicrovms::Client::new(&sdk_config(endpoint).await)
}

/// States of every microVM the emulator knows.
pub async fn microvm_states(endpoint: &str) -> Vec<String> {
    let client = microvms_client(endpoint).await;
    let list = client.list_microvms().send().await.expect("list works");
    list.items()
        .iter()
        .map(|i| i.state().as_str().to_string())
        .collect()
}

/// Starts `mvm-shard emulate` on a free loopback port; returns the process and
/// the endpoint URL it printed.
pub fn start_emulate() -> (std::process::Child, String) {
    start_emulate_with(&[])
}

/// [`start_emulate`] with more arguments (functions, faults...).
pub fn start_emulate_with(args: &[&str]) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut emulator = Command::new(binary())
        .args(["emulate", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(emulator.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (emulator, line.trim().to_string())
}

/// Sends SIGTERM, the polite stop every long-running part honours.
pub fn sigterm(child: &std::process::Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

/// An image whose `ready` hook answers 200 and whose `run` hook refuses
/// every payload with 400 `no such request here`.
pub fn refusing_image(name: &str) -> mvm_shard::emulator::MicrovmImageConfig {
    let script = concat!(
        "import http.server, os\n",
        "class H(http.server.BaseHTTPRequestHandler):\n",
        "    def log_message(self, *args): pass\n",
        "    def do_POST(self):\n",
        "        code = 400 if self.path.endswith('/run') else 200\n",
        "        self.send_response(code); self.end_headers()\n",
        "        self.wfile.write(b'no such request here')\n",
        "addr = (os.environ['MVM_SHARD_BIND_IP'], int(os.environ['MVM_SHARD_HOOKS_PORT']))\n",
        "http.server.HTTPServer(addr, H).serve_forever()\n",
    );
    mvm_shard::emulator::MicrovmImageConfig::new(
        name,
        vec!["python3".into(), "-c".into(), script.into()],
    )
}

/// Runs the binary with `args` in `dir` as a user with no AWS or GitHub
/// setting of this process (a fresh HOME, no AWS_*, GITHUB_* or MVM_SHARD_*
/// variable) plus `env`, killed if it outlives `limit`; returns (exit code,
/// stdout, stderr).
pub async fn cli_isolated(
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
    limit: Duration,
) -> (i32, String, String) {
    let home = tempfile::tempdir().expect("a temporary HOME");
    let mut command = tokio::process::Command::new(binary());
    command
        .args(args)
        .current_dir(dir)
        .env("HOME", home.path())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .kill_on_drop(true);
    for (name, _) in std::env::vars() {
        if ["AWS_", "GITHUB_", "MVM_SHARD_", "RUNNER_"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    let out = tokio::time::timeout(limit, command.output())
        .await
        .expect("the binary ends in time")
        .expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `git commit -q` with an identity of its own (the machine may have none).
pub const GIT_COMMIT: [&str; 6] = [
    "-c",
    "user.name=t",
    "-c",
    "user.email=t@t.invalid",
    "commit",
    "-q",
];

/// Runs `git -C dir ARGS`, failing the test if git fails.
pub fn git(dir: &std::path::Path, args: &[&str]) {
    let ok = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
        .status
        .success();
    assert!(ok, "git {args:?}");
}

/// The AWS secret key the tests give the invoker for moto: it must never
/// reach a shard or a log.
pub const MOTO_SECRET_KEY: &str = "invoker-secret-key-5f2c";

/// moto's standalone S3 server (a real third-party implementation, with
/// presigned URLs) on a free loopback port. It stops when dropped, and in
/// any case when this test process ends: it exits when its stdin closes.
pub struct Moto {
    child: std::process::Child,
    /// Its URL, for `AWS_ENDPOINT_URL_S3`.
    pub endpoint: String,
    /// The request lines it logged (`"GET /bucket/key?query HTTP/1.1" 200 -`).
    requests: Arc<(std::sync::Mutex<Vec<String>>, std::sync::Condvar)>,
}

impl Moto {
    /// A moto of this test's own.
    pub fn start() -> Moto {
        use std::io::{BufRead, BufReader};
        use std::process::Stdio;
        let script = concat!(
            "import os, sys, threading\n",
            "threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()\n",
            "from moto.server import main\n",
            "main(sys.argv[1:])\n",
        );
        let mut child = Command::new("python3")
            .args(["-u", "-c", script, "-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 with moto[server] is installed (.ci/run installs it)");
        let stderr = child.stderr.take().expect("moto's stderr is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let requests = Arc::new((std::sync::Mutex::new(Vec::new()), std::sync::Condvar::new()));
        let logged = requests.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("http://127.0.0.1:") {
                    let _ = tx.send(line[at..].trim().to_string());
                } else if let Some((_, request)) = line.split_once("] \"") {
                    if let Ok(mut lines) = logged.0.lock() {
                        lines.push(request.to_string());
                        logged.1.notify_all();
                    }
                }
            }
        });
        let endpoint = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("moto says where it listens");
        Moto {
            child,
            endpoint,
            requests,
        }
    }

    /// One moto for every test of this file that asks (each in buckets of
    /// its own): it ends with the test process.
    pub fn shared() -> &'static Moto {
        static SHARED: std::sync::OnceLock<Moto> = std::sync::OnceLock::new();
        SHARED.get_or_init(Moto::start)
    }

    /// The requests it served for `bucket`, as logged (method, path and
    /// query, presigned links included, status), once one of them contains
    /// `needle` (moto logs a request after answering it); panics after 30 s.
    pub fn requests_once(&self, bucket: &str, needle: &str) -> Vec<String> {
        let path = format!(" /{bucket}/");
        let for_bucket = |lines: &[String]| -> Vec<String> {
            lines
                .iter()
                .filter(|r| r.contains(&path))
                .cloned()
                .collect()
        };
        let (lines, logged) = &*self.requests;
        let lines = lines.lock().expect("the log reader never panics");
        let (lines, waited) = logged
            .wait_timeout_while(lines, Duration::from_secs(30), |lines| {
                !for_bucket(lines).iter().any(|r| r.contains(needle))
            })
            .expect("the log reader never panics");
        let found = for_bucket(&lines);
        assert!(
            !waited.timed_out(),
            "moto never logged {needle}: {found:#?}"
        );
        found
    }

    /// The real S3 client, pointed at this server.
    pub fn client(&self) -> aws_sdk_s3::Client {
        let config = aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "testing",
                MOTO_SECRET_KEY,
                None,
                None,
                "test",
            ))
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    /// Creates `bucket`; returns a client.
    pub async fn bucket(&self, bucket: &str) -> aws_sdk_s3::Client {
        let client = self.client();
        client
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .expect("moto creates the bucket");
        client
    }

    /// Environment for the invoker: the SDK finds moto through its own setting.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL_S3", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", MOTO_SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mvm-shard emulate` on a free loopback port, hosting the `mvm-shard`
/// function (this binary's agent); stopped with SIGTERM when dropped.
pub struct Emulate {
    child: std::process::Child,
    /// Its URL, for `--endpoint-url` or `AWS_ENDPOINT_URL_LAMBDA`.
    pub endpoint: String,
}

impl Emulate {
    /// Starts it and waits until it says where it listens.
    pub fn start() -> Emulate {
        Emulate::start_with(&[])
    }

    /// Starts it with more arguments.
    pub fn start_with(args: &[&str]) -> Emulate {
        let (child, endpoint) = start_emulate_with(args);
        Emulate { child, endpoint }
    }
}

impl Drop for Emulate {
    fn drop(&mut self) {
        // SIGTERM lets it end its functions' environments; SIGKILL after 30 s.
        sigterm(&self.child);
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let (done, watchdog) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                watchdog.recv_timeout(Duration::from_secs(30))
            {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        });
        let _ = self.child.wait();
        let _ = done.send(());
    }
}

/// Runs `cmd` (stdin closed, its output collected) in a process group of
/// its own, as a user's shell would; after `limit` the whole group is
/// killed and the test fails, naming `what`.
pub async fn output_within(
    mut cmd: tokio::process::Command,
    limit: Duration,
    what: &str,
) -> std::process::Output {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd.spawn().unwrap();
    let pgid = child.id().unwrap();
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("{what} took longer than {limit:?}");
        }
    }
}

/// Waits for `child` with `wait4`, which also gives its own peak memory and
/// CPU time (not its children's), killing it first if it runs past `limit`.
/// Returns its exit code (-1 when a signal ended it) and its usage.
pub fn wait4_within(child: &std::process::Child, limit: Duration) -> (i32, libc::rusage) {
    let (done, watchdog) = std::sync::mpsc::channel::<()>();
    let pid = child.id();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = watchdog.recv_timeout(limit) {
            // SAFETY: signalling our own child, not yet reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    });
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, which std has not reaped.
    let waited = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid as i32, "wait4 failed");
    let _ = done.send(());
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    (code, usage)
}

/// What a finished command said: its exit code (-1 when a signal ended it)
/// and its output, shown whole when an assertion about it fails.
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Ran {
    fn from(out: std::process::Output) -> Self {
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n{}\n{}", self.code, self.stdout, self.stderr)
    }
}
