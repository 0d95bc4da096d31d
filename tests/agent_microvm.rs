//! `mvm-shard agent --microvm` as a microVM's control plane sees it: the real
//! binary on loopback, its lifecycle hooks and its log port driven over HTTP.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use mvm_shard::agent::microvm::{hook_path, RunPayload, LOG_PATH, SHARD_PATH};
use mvm_shard::protocol::{Frame, FrameCodec, Outcome, OutputStream, ShardResult};
use reqwest::StatusCode;
use tokio_util::codec::Decoder;

/// Longest any single exchange with the agent may take in these tests.
const PATIENCE: Duration = Duration::from_secs(60);

/// A running agent in its own scratch folder, stopped (SIGTERM, then wait)
/// when dropped.
struct Agent {
    child: Child,
    hooks: String,
    log: String,
    http: reqwest::Client,
    _scratch: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl Agent {
    /// Starts the agent and waits (bounded) until `ready` answers 200.
    async fn start() -> Agent {
        let scratch = tempfile::tempdir().expect("scratch folder");
        let (hooks_port, log_port) = (free_port(), free_port());
        let child = std::process::Command::new(common::binary())
            .args(["agent", "--microvm"])
            .env("MVM_SHARD_BIND_IP", "127.0.0.1")
            .env("MVM_SHARD_HOOKS_PORT", hooks_port.to_string())
            .env("MVM_SHARD_LOG_PORT", log_port.to_string())
            .env("TMPDIR", scratch.path())
            .env_remove("MVM_SHARD_SCRATCH")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("agent starts");
        let agent = Agent {
            child,
            hooks: format!("http://127.0.0.1:{hooks_port}"),
            log: format!("http://127.0.0.1:{log_port}"),
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("HTTP client"),
            _scratch: scratch,
        };
        for _ in 0..500 {
            if let Ok(resp) = agent.http.post(agent.hook_url("ready")).send().await {
                assert_eq!(resp.status(), StatusCode::OK, "ready");
                return agent;
            }
            // Not listening yet: poll again, bounded.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the agent never became ready");
    }

    fn hook_url(&self, name: &str) -> String {
        format!("{}{}", self.hooks, hook_path(name))
    }

    async fn hook(&self, name: &str, body: Vec<u8>) -> (StatusCode, String) {
        let resp = tokio::time::timeout(
            PATIENCE,
            self.http.post(self.hook_url(name)).body(body).send(),
        )
        .await
        .expect("hook answers in time")
        .expect("hook answers");
        let status = resp.status();
        (status, resp.text().await.unwrap_or_default())
    }

    async fn run(&self, payload: RunPayload) -> (StatusCode, String) {
        self.hook("run", payload.encode().expect("payload encodes"))
            .await
    }

    async fn post_shard(&self, body: Vec<u8>) -> (StatusCode, String) {
        let resp = self
            .http
            .post(format!("{}{SHARD_PATH}", self.log))
            .body(body)
            .send()
            .await
            .expect("log port answers");
        let status = resp.status();
        (status, resp.text().await.unwrap_or_default())
    }

    async fn log_from(&self, offset: u64) -> reqwest::Response {
        self.http
            .get(format!("{}{LOG_PATH}?offset={offset}", self.log))
            .send()
            .await
            .expect("log port answers")
    }

    /// The log from `offset` to its end.
    async fn read_log(&self, offset: u64) -> Vec<u8> {
        let resp = self.log_from(offset).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let body = tokio::time::timeout(PATIENCE, resp.bytes())
            .await
            .expect("the log ends in time")
            .expect("the log reads");
        body.to_vec()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        for _ in 0..1000 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every frame of a complete log, which must decode to its last byte.
fn frames(log: &[u8]) -> Vec<Frame> {
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::from(log);
    let mut frames = Vec::new();
    while let Some(frame) = codec.decode(&mut buf).expect("the log decodes") {
        frames.push(frame);
    }
    assert!(buf.is_empty(), "{} bytes after the last frame", buf.len());
    frames
}

fn stdout_of(frames: &[Frame]) -> String {
    let mut out = Vec::new();
    for frame in frames {
        if let Frame::Output {
            stream: OutputStream::Stdout,
            data,
        } = frame
        {
            out.extend_from_slice(data);
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn result_of(frames: &[Frame]) -> &ShardResult {
    match frames.last() {
        Some(Frame::Result(result)) => result,
        other => panic!("the log does not end with a result but {other:?}"),
    }
}

const FIVE_LINES_THEN_3: &str = "for i in 1 2 3 4 5; do echo line $i; sleep 0.25; done; exit 3";
const FIVE_LINES: &str = "line 1\nline 2\nline 3\nline 4\nline 5\n";

fn slow_request() -> RunPayload {
    RunPayload::Inline(common::request(
        FIVE_LINES_THEN_3,
        1,
        1,
        Duration::from_secs(60),
    ))
}

#[tokio::test]
async fn validated_agent_runs_a_shard_whose_output_and_result_stream_from_the_log() {
    let agent = Agent::start().await;
    assert_eq!(agent.hook("validate", Vec::new()).await.0, StatusCode::OK);
    for hook in ["suspend", "resume"] {
        assert_eq!(agent.hook(hook, Vec::new()).await.0, StatusCode::OK);
    }
    assert_eq!(agent.run(slow_request()).await.0, StatusCode::OK);

    let frames = frames(&agent.read_log(0).await);
    assert_eq!(stdout_of(&frames), FIVE_LINES);
    let result = result_of(&frames);
    assert_eq!(result.outcome, Outcome::Exited { code: 3 });
    assert!(
        result.fresh_environment,
        "validation must not make the real shard's environment look reused"
    );
}

#[tokio::test]
async fn a_reader_that_reconnects_from_its_offset_gets_every_byte_once() {
    let agent = Agent::start().await;
    assert_eq!(agent.run(slow_request()).await.0, StatusCode::OK);

    // Read the first chunk while the shard is still printing, then drop the connection.
    let mut first = agent.log_from(0).await.bytes_stream();
    let received = tokio::time::timeout(PATIENCE, first.next())
        .await
        .expect("the first bytes come in time")
        .expect("the log has bytes")
        .expect("the log reads")
        .to_vec();
    drop(first);
    let rest = agent.read_log(received.len() as u64).await;

    let full = agent.read_log(0).await;
    assert!(
        received.len() < full.len(),
        "the first connection was meant to end mid-way"
    );
    assert_eq!([received, rest].concat(), full);
    // Any offset resumes exactly, even inside the preamble or a frame.
    for offset in [3, full.len() / 2, full.len() - 1, full.len()] {
        assert_eq!(agent.read_log(offset as u64).await, full[offset..]);
    }
    assert_eq!(
        result_of(&frames(&full)).outcome,
        Outcome::Exited { code: 3 }
    );
}

#[tokio::test]
async fn an_offset_past_the_end_of_a_finished_log_is_416() {
    let agent = Agent::start().await;
    let request = common::request("echo done", 1, 1, Duration::from_secs(30));
    assert_eq!(
        agent.run(RunPayload::Inline(request)).await.0,
        StatusCode::OK
    );
    let full = agent.read_log(0).await;
    let resp = agent.log_from(full.len() as u64 + 1).await;
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
}

#[tokio::test]
async fn a_request_sent_on_the_log_port_runs_and_a_reader_waiting_before_it_gets_the_log() {
    let agent = Agent::start().await;
    assert_eq!(agent.run(RunPayload::ViaLogPort).await.0, StatusCode::OK);
    // The reader connects before the shard exists; its response waits.
    let early = agent.log_from(0).await;
    assert_eq!(early.status(), StatusCode::OK);

    let request = common::request("echo via the log port", 1, 1, Duration::from_secs(30));
    let body = request.encode().expect("request encodes");
    assert_eq!(agent.post_shard(body.clone()).await.0, StatusCode::ACCEPTED);
    assert_eq!(agent.post_shard(body).await.0, StatusCode::CONFLICT);

    let log = tokio::time::timeout(PATIENCE, early.bytes())
        .await
        .expect("the log ends in time")
        .expect("the log reads");
    let frames = frames(&log);
    assert_eq!(stdout_of(&frames), "via the log port\n");
    assert_eq!(result_of(&frames).outcome, Outcome::Exited { code: 0 });
}

#[tokio::test]
async fn an_empty_run_payload_means_the_request_comes_on_the_log_port() {
    // RunMicrovm without runHookPayload, as the API allows, calls `run` with nothing.
    let agent = Agent::start().await;
    assert_eq!(agent.hook("run", Vec::new()).await.0, StatusCode::OK);
    let request = common::request("echo after an empty payload", 1, 1, Duration::from_secs(30));
    let body = request.encode().expect("request encodes");
    assert_eq!(agent.post_shard(body).await.0, StatusCode::ACCEPTED);
    let frames = frames(&agent.read_log(0).await);
    assert_eq!(stdout_of(&frames), "after an empty payload\n");
    assert_eq!(result_of(&frames).outcome, Outcome::Exited { code: 0 });
}

#[tokio::test]
async fn an_invalid_request_on_the_log_port_is_400_and_ends_the_log_rejected() {
    let agent = Agent::start().await;
    assert_eq!(agent.run(RunPayload::ViaLogPort).await.0, StatusCode::OK);
    let (status, reason) = agent.post_shard(br#"{"version":2}"#.to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(reason.contains("not a valid shard request"), "{reason}");
    let frames = frames(&agent.read_log(0).await);
    assert!(
        matches!(&result_of(&frames).outcome, Outcome::Rejected { reason: r } if *r == reason),
        "{frames:?}"
    );
}

#[tokio::test]
async fn a_malformed_run_payload_is_400_and_a_second_run_is_409() {
    let agent = Agent::start().await;
    let (status, reason) = agent.hook("run", b"{\"version\":2}".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(reason.contains("neither a request"), "{reason}");
    assert_eq!(
        agent.hook("run", b"not json".to_vec()).await.0,
        StatusCode::BAD_REQUEST
    );

    let request = common::request("true", 1, 1, Duration::from_secs(30));
    assert_eq!(
        agent.run(RunPayload::Inline(request.clone())).await.0,
        StatusCode::OK
    );
    assert_eq!(
        agent.run(RunPayload::Inline(request)).await.0,
        StatusCode::CONFLICT
    );
    assert_eq!(
        result_of(&frames(&agent.read_log(0).await)).outcome,
        Outcome::Exited { code: 0 }
    );
}

/// Waits (bounded) for the shard to write its background process's pid.
async fn pid_in(file: &Path) -> u32 {
    for _ in 0..1000 {
        if let Ok(text) = std::fs::read_to_string(file) {
            if let Ok(pid) = text.trim().parse() {
                return pid;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the shard never wrote {}", file.display());
}

#[tokio::test]
async fn terminate_ends_the_running_shard_and_everything_it_started() {
    let agent = Agent::start().await;
    let outside = tempfile::tempdir().expect("a folder outside the scratch root");
    let pid_file = outside.path().join("sleep.pid");
    let mut request = common::request(
        "sleep 300 & echo $! > \"$PID_FILE\"; wait",
        1,
        1,
        Duration::from_secs(600),
    );
    request
        .env
        .insert("PID_FILE".into(), pid_file.display().to_string());
    assert_eq!(
        agent.run(RunPayload::Inline(request)).await.0,
        StatusCode::OK
    );
    let pid = pid_in(&pid_file).await;
    assert!(mvm_shard::os::is_alive(pid));

    assert_eq!(agent.hook("terminate", Vec::new()).await.0, StatusCode::OK);
    assert!(
        common::wait_gone(pid).await,
        "the shard's sleep survived terminate"
    );
    let frames = frames(&agent.read_log(0).await);
    assert_eq!(result_of(&frames).outcome, Outcome::Signaled { signal: 15 });
}
