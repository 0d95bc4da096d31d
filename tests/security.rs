//! What a shard can and cannot reach, attacked from inside the shard and by
//! hostile requests, and the promises a mutation audit found unguarded: a
//! retry never reuses an environment, an idle environment never changes
//! tenant, daemons die without the marker, and a stream without a result is a
//! failure through the real dispatch path. Every test is bounded in time.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use common::*;
use mvm_shard::dispatch::{self, DispatchOptions, ShardJob, ShardStatus};
use mvm_shard::emulator::FunctionConfig;
use mvm_shard::protocol::{Frame, FrameCodec, Outcome, OutputStream, ShardRequest};
use tokio_util::codec::Encoder;
use tokio_util::sync::CancellationToken;

const MINUTE: Duration = Duration::from_secs(60);
/// Lambda runs functions as an unprivileged user; nobody (65534) stands in.
const UNPRIVILEGED: &str = "65534";

/// Runs `test`, failing it if it takes longer than `limit`.
async fn bounded<T>(limit: Duration, test: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, test)
        .await
        .expect("the test finished in time")
}

/// From inside a shard: every ancestor of the command up to pid 1, what of
/// its cmdline, environ, mem and fd can be read; and the command's own
/// environ and descriptors, to show that reading works at all.
const WALK: &str = r#"
echo "SELF $(tr '\0' '\n' < /proc/$$/environ | grep -c '^MVM_SHARD_INDEX=')"
ls -l /proc/self/fd | sed -n 's/.* \([0-9]*\) -> \(.*\)/OWNFD \1 \2/p'
p=$PPID
while [ "$p" -ge 1 ]; do
  echo "ANCESTOR $p $(tr '\0' ' ' < /proc/$p/cmdline)"
  tr '\0' '\n' < /proc/$p/environ 2>/dev/null | sed "s/^/ENV $p /"
  if (: < /proc/$p/mem) 2>/dev/null; then echo "MEM $p"; fi
  if ls /proc/$p/fd >/dev/null 2>&1; then echo "FDS $p"; fi
  p=$(sed 's/.*) //' /proc/$p/stat | cut -d' ' -f2)
done
echo WALKED
"#;

/// What the walk found: the pid of the first ancestor whose command line
/// contains `needle`, and whether anything of its insides could be read.
fn ancestor(walk: &str, needle: &str) -> u32 {
    walk.lines()
        .filter_map(|l| l.strip_prefix("ANCESTOR "))
        .find(|l| l.contains(needle))
        .and_then(|l| l.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no ancestor runs {needle:?}:\n{walk}"))
}

fn assert_closed(walk: &str, pid: u32, what: &str) {
    for prefix in ["ENV", "MEM", "FDS"] {
        assert!(
            !walk
                .lines()
                .any(|l| l == format!("{prefix} {pid}")
                    || l.starts_with(&format!("{prefix} {pid} "))),
            "the command read the {prefix} of {what} ({pid}):\n{walk}"
        );
    }
}

fn assert_no_secret(walk: &str, secrets: &[&str]) {
    assert!(
        walk.contains("SELF 1"),
        "the walk could not read at all:\n{walk}"
    );
    assert!(walk.contains("WALKED"), "the walk did not finish:\n{walk}");
    for secret in secrets {
        assert!(
            !walk.contains(secret),
            "{secret:?} reached the command:\n{walk}"
        );
    }
    // Beyond 0, 1 and 2 only `ls`'s own listing of its fd folder.
    let fds: Vec<&str> = walk
        .lines()
        .filter_map(|l| l.strip_prefix("OWNFD "))
        .collect();
    assert!(fds.len() >= 3, "{walk}");
    for fd in fds {
        let (number, target) = fd.split_once(' ').unwrap_or((fd, ""));
        assert!(
            matches!(number, "0" | "1" | "2")
                || (target.starts_with("/proc/") && target.ends_with("/fd")),
            "the command inherited descriptor {fd}:\n{walk}"
        );
    }
}

/// `setpriv` to the unprivileged user, started with descriptor 7 open on a
/// file and not close-on-exec, as a careless parent would leave it (`sh`
/// opens it, then execs: no wrapper stays above).
fn unprivileged(leaked: &std::path::Path) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "exec 7<\"$0\"; exec setpriv \"$@\""])
        .arg(leaked)
        .args([
            &format!("--reuid={UNPRIVILEGED}"),
            &format!("--regid={UNPRIVILEGED}"),
            "--clear-groups",
            "--",
        ]);
    cmd
}

/// `mvm-shard emulate` as an unprivileged user, with fake credentials of its own.
fn unprivileged_emulate(
    env: &[(&str, &str)],
    leaked: &std::path::Path,
) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut emulate = unprivileged(leaked)
        .args([binary(), "emulate", "--listen", "127.0.0.1:0"])
        .current_dir("/")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("setpriv starts the emulator");
    let mut line = String::new();
    BufReader::new(emulate.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (emulate, line.trim().to_string())
}

#[tokio::test]
async fn a_shard_reads_no_credential_and_no_runtime_api_from_any_ancestor() {
    const HOST_SECRET: &str = "HostSecretOfTheEmulator0xC0FFEE";
    const HOST_KEY: &str = "AKIAHOSTKEYOFEMULATOR";
    const HOST_TOKEN: &str = "ghp_HostTokenOfTheEmulatorDEADBEEF";
    let leaked = tempfile::NamedTempFile::new().unwrap();
    let (mut emulate, endpoint) = unprivileged_emulate(
        &[
            ("AWS_ACCESS_KEY_ID", HOST_KEY),
            ("AWS_SECRET_ACCESS_KEY", HOST_SECRET),
            ("GITHUB_TOKEN", HOST_TOKEN),
        ],
        leaked.path(),
    );
    let done = bounded(MINUTE, async {
        let backend = backend(&endpoint, mvm_shard::emulator::DEFAULT_FUNCTION, true).await;
        run(backend, vec![request(WALK, 1, 1, MINUTE)], 1).await
    })
    .await;
    sigterm(&emulate);
    let _ = emulate.wait();
    assert_eq!(done.summary.exit_code(), 0, "{:?}", done.summary);
    let walk = done.stdout_of(1);
    // The agent's environment holds the function's stand-in credentials
    // (ASIAEMULATOR…, emulated-secret-…, emulated-session-…) and the Runtime API.
    assert_no_secret(
        &walk,
        &[
            HOST_SECRET,
            HOST_KEY,
            HOST_TOKEN,
            "ASIAEMULATOR",
            "emulated-secret-",
            "emulated-session-",
            "AWS_LAMBDA_RUNTIME_API",
        ],
    );
    assert_closed(&walk, ancestor(&walk, " agent"), "the agent");
    assert_closed(&walk, ancestor(&walk, " emulate "), "the emulator");
}

#[test]
fn a_local_shard_reads_nothing_of_the_invokers_environment() {
    const TOKEN: &str = "ghp_InvokerTokenThatMustStayHome1234";
    const SECRET: &str = "InvokerSecretAccessKeyThatMustStayHome";
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.path().join("data.txt"), "payload\n").unwrap();
    // setpriv execs the invoker: no wrapper above it holds its command line.
    let leaked = tempfile::NamedTempFile::new().unwrap();
    let invoker = unprivileged(leaked.path())
        .args([
            binary(),
            "run",
            "--local",
            "--env",
            "ON_THE_COMMAND_LINE=InlineValueThatMustStayHome",
            "--",
            "sh",
            "-c",
            WALK,
        ])
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir.path())
        .env("GITHUB_TOKEN", TOKEN)
        .env("AWS_ACCESS_KEY_ID", "AKIAINVOKERKEYSTAYHOME")
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the invoker runs");
    let pid = invoker.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(invoker.wait_with_output()));
    let Ok(out) = rx.recv_timeout(Duration::from_secs(120)) else {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        panic!("the local run did not finish in time");
    };
    let out = out.expect("the invoker's output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let walk: String = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("[1/1] "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_no_secret(
        &walk,
        &[
            TOKEN,
            SECRET,
            "AKIAINVOKERKEYSTAYHOME",
            "InlineValueThatMustStayHome",
            "emulated-secret-",
            "AWS_LAMBDA_RUNTIME_API",
        ],
    );
    assert_closed(&walk, ancestor(&walk, " agent"), "the agent");
    assert_closed(&walk, ancestor(&walk, " run --local "), "the invoker");
    for secret in [TOKEN, SECRET] {
        assert!(!stderr.contains(secret), "{stderr}");
    }
}

/// A tar.zst of a symbolic link to `outside` and a file written through it.
fn archive_through_symlink(outside: &std::path::Path) -> String {
    let mut builder = tar::Builder::new(Vec::new());
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    link.set_mode(0o777);
    builder
        .append_link(&mut link, "lnk", outside)
        .expect("a link entry");
    let mut file = tar::Header::new_gnu();
    file.set_size(7);
    file.set_mode(0o644);
    builder
        .append_data(&mut file, "lnk/planted", &b"planted"[..])
        .expect("a file entry");
    let tar = builder.into_inner().unwrap();
    base64::engine::general_purpose::STANDARD.encode(zstd::encode_all(&tar[..], 3).unwrap())
}

#[tokio::test]
async fn a_hostile_source_or_overlay_is_rejected_and_writes_nothing_outside() {
    let outside = tempfile::tempdir().unwrap();
    let emu = emulator(vec![agent_function("f", true)]).await;
    let backend = backend(&emu.endpoint, "f", true).await;
    let mut as_source = request("echo ran", 1, 2, MINUTE);
    as_source.source = mvm_shard::protocol::SourceSpec::Inline {
        archive: archive_through_symlink(outside.path()),
    };
    let mut as_overlay = request("echo ran", 2, 2, MINUTE);
    as_overlay.overlays = vec![mvm_shard::protocol::SourceSpec::Inline {
        archive: archive_through_symlink(outside.path()),
    }];
    let done = bounded(MINUTE, run(backend, vec![as_source, as_overlay], 2)).await;
    for rec in &done.summary.records {
        let outcome = &rec.result.as_ref().expect("a result").outcome;
        assert!(
            matches!(outcome, Outcome::Rejected { reason } if reason.contains("lnk/planted") && reason.contains("symbolic link")),
            "{outcome:?}"
        );
        assert!(
            matches!(&rec.status, ShardStatus::InfraFailed { reason } if reason.contains("refused")),
            "{:?}",
            rec.status
        );
        assert_eq!(done.stdout_of(rec.shard.index), "", "the command ran");
    }
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    emu.shutdown().await.unwrap();
}

/// A proxy in front of the emulator that lets the first invocation run to its
/// end in its environment, then answers it with a 500 ServiceException (a
/// start the invoker must retry); later calls pass through. It records the
/// tenant id of every call.
struct FailFirst {
    upstream: String,
    tenants: Mutex<Vec<String>>,
    failed_once: AtomicBool,
    client: reqwest::Client,
}

async fn fail_first(
    axum::extract::State(proxy): axum::extract::State<Arc<FailFirst>>,
    req: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return http::StatusCode::BAD_REQUEST.into_response();
    };
    if let Some(tenant) = parts.headers.get("x-amz-tenant-id") {
        let tenant = String::from_utf8_lossy(tenant.as_bytes()).into_owned();
        proxy.tenants.lock().expect("lock").push(tenant);
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut upstream = proxy
        .client
        .request(parts.method, format!("{}{path}", proxy.upstream))
        .body(body);
    for (name, value) in &parts.headers {
        if name != http::header::HOST && name != http::header::CONTENT_LENGTH {
            upstream = upstream.header(name, value);
        }
    }
    let Ok(answer) = upstream.send().await else {
        return http::StatusCode::BAD_GATEWAY.into_response();
    };
    if !proxy.failed_once.swap(true, Ordering::SeqCst) {
        // The shard ran to its end in an environment that is now idle.
        let _ = answer.bytes().await;
        return (
            http::StatusCode::INTERNAL_SERVER_ERROR,
            [("x-amzn-errortype", "ServiceException")],
            r#"{"Type":"Service","message":"injected after the shard ran"}"#,
        )
            .into_response();
    }
    let mut response = axum::response::Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        response = response.header(name, value);
    }
    response
        .body(axum::body::Body::from_stream(answer.bytes_stream()))
        .unwrap_or_else(|_| http::StatusCode::BAD_GATEWAY.into_response())
}

#[tokio::test]
async fn a_retry_after_the_shard_reached_an_environment_gets_a_new_tenant_and_a_fresh_environment()
{
    let emu = emulator(vec![agent_function("f", true)]).await;
    let proxy = Arc::new(FailFirst {
        upstream: emu.endpoint.clone(),
        tenants: Mutex::new(Vec::new()),
        failed_once: AtomicBool::new(false),
        client: reqwest::Client::new(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_endpoint = format!("http://{}", listener.local_addr().unwrap());
    let router = axum::Router::new()
        .fallback(fail_first)
        .with_state(proxy.clone());
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let backend = backend(&proxy_endpoint, "f", true).await;
    let done = bounded(
        MINUTE,
        run(backend, vec![request("echo second try", 1, 1, MINUTE)], 1),
    )
    .await;
    server.abort();
    let rec = &done.summary.records[0];
    assert_eq!(rec.status, ShardStatus::Passed, "{rec:?}");
    assert_eq!(rec.attempts, 2, "the injected failure was not retried");
    let tenants = proxy.tenants.lock().unwrap().clone();
    assert_eq!(tenants.len(), 2, "{tenants:?}");
    assert_ne!(tenants[0], tenants[1], "a retry reused the tenant id");
    assert!(
        rec.result.as_ref().unwrap().fresh_environment,
        "the retry landed in the environment the first attempt used"
    );
    emu.shutdown().await.unwrap();
}

/// Dispatches one shard under a chosen run id (so a chosen tenant id).
async fn dispatch_as(
    backend: Arc<dyn mvm_shard::backend::Backend>,
    run_id: &str,
    req: &ShardRequest,
) -> dispatch::ShardRecord {
    let (tx, rx) = dispatch::event_channel();
    drop(rx);
    let jobs = vec![ShardJob {
        shard: req.shard,
        request: req.clone(),
    }];
    let summary = dispatch::dispatch(
        backend,
        run_id,
        jobs,
        &DispatchOptions::default(),
        tx,
        CancellationToken::new(),
    )
    .await;
    summary.records[0].clone()
}

#[tokio::test]
async fn an_idle_environment_serves_only_the_tenant_id_it_served() {
    let emu = emulator(vec![agent_function("f", true)]).await;
    let backend = backend(&emu.endpoint, "f", true).await;
    // One at a time, so an idle environment is always there to be wrongly reused.
    let requests = (1..=3)
        .map(|i| request("echo $AWS_LAMBDA_LOG_STREAM_NAME", i, 3, MINUTE))
        .collect();
    let done = bounded(MINUTE, run(backend.clone(), requests, 1)).await;
    assert_eq!(done.summary.exit_code(), 0);
    let mut environments = BTreeSet::new();
    for rec in &done.summary.records {
        assert!(
            rec.result.as_ref().unwrap().fresh_environment,
            "shard {} got a used environment",
            rec.shard
        );
        environments.insert(done.stdout_of(rec.shard.index));
    }
    assert_eq!(environments.len(), 3, "{environments:?}");

    // The same tenant id may come back to its own idle environment.
    let req = request("echo again", 1, 1, MINUTE);
    let first = bounded(MINUTE, dispatch_as(backend.clone(), "same", &req)).await;
    let second = bounded(MINUTE, dispatch_as(backend, "same", &req)).await;
    assert!(first.result.unwrap().fresh_environment);
    assert!(
        !second.result.unwrap().fresh_environment,
        "the same tenant id did not get its warm environment back"
    );
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_daemon_that_drops_the_marker_and_double_forks_still_dies_with_its_shard() {
    let emu = emulator(vec![agent_function("f", true)]).await;
    let backend = backend(&emu.endpoint, "f", true).await;
    let pidfile = tempfile::NamedTempFile::new().unwrap();
    // No marker variable at all, its own session, reparented by a double fork;
    // it keeps the shard's stdout open, as careless daemons do.
    let script = format!(
        "setsid env -u MVM_SHARD_SANDBOX -u MVM_SHARD_EMULATED_ENVIRONMENT \
         sh -c 'sleep 300 & echo $! > {}'; echo left-a-daemon",
        pidfile.path().display()
    );
    let done = bounded(
        Duration::from_secs(30),
        run(backend, vec![request(&script, 1, 1, MINUTE)], 1),
    )
    .await;
    let pid: u32 = std::fs::read_to_string(pidfile.path())
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let survived = mvm_shard::os::is_alive(pid);
    if survived {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(!survived, "daemon {pid} outlived its shard");
    assert_eq!(done.summary.records[0].status, ShardStatus::Passed);
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_stream_that_ends_cleanly_without_a_result_is_a_failure_to_run() {
    // A function that answers with a valid preamble and output, then ends the
    // response normally and exits 0: everything but the result frame.
    let mut stream = BytesMut::new();
    let mut codec = FrameCodec::new();
    codec
        .encode(
            Frame::Output {
                stream: OutputStream::Stdout,
                data: Bytes::from_static(b"partial output\n"),
            },
            &mut stream,
        )
        .unwrap();
    codec.encode(Frame::Heartbeat, &mut stream).unwrap();
    let body = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(body.path(), &stream).unwrap();
    let bootstrap = r#"
import os, sys, urllib.request
api = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2018-06-01/runtime/invocation/"
with urllib.request.urlopen(api + "next") as invocation:
    request_id = invocation.headers["Lambda-Runtime-Aws-Request-Id"]
    invocation.read()
with open(sys.argv[1], "rb") as body:
    answer = urllib.request.Request(
        api + request_id + "/response",
        data=body.read(),
        method="POST",
        headers={"Lambda-Runtime-Function-Response-Mode": "streaming"},
    )
urllib.request.urlopen(answer).read()
"#;
    let emu = emulator(vec![FunctionConfig::new(
        "no-result",
        vec![
            "python3".into(),
            "-c".into(),
            bootstrap.into(),
            body.path().display().to_string(),
        ],
    )])
    .await;
    let backend = backend(&emu.endpoint, "no-result", false).await;
    let done = bounded(MINUTE, run(backend, vec![request("true", 1, 1, MINUTE)], 1)).await;
    let rec = &done.summary.records[0];
    assert_eq!(done.stdout_of(1), "partial output\n", "{rec:?}");
    assert!(
        matches!(&rec.status, ShardStatus::InfraFailed { reason } if reason.contains("without a final result")),
        "{rec:?}"
    );
    assert_eq!(done.summary.exit_code(), 3);
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn output_held_open_outside_the_tree_does_not_hold_the_shard_back() {
    let emu = emulator(vec![agent_function("f", true)]).await;
    let backend = backend(&emu.endpoint, "f", true).await;
    let dir = tempfile::tempdir().unwrap();
    let (pid_fifo, go_fifo) = (dir.path().join("pid"), dir.path().join("go"));
    for fifo in [&pid_fifo, &go_fifo] {
        nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    }
    let script = format!(
        "echo $$ > {}; read go < {}; echo done",
        pid_fifo.display(),
        go_fifo.display()
    );
    let shard = tokio::spawn(run(backend, vec![request(&script, 1, 1, MINUTE)], 1));
    // This test process, outside the agent's tree, takes a hold of the
    // command's stdout, then lets the command end.
    let held = tokio::task::spawn_blocking(move || {
        let pid = std::fs::read_to_string(&pid_fifo).unwrap();
        let held = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/{}/fd/1", pid.trim()))
            .unwrap();
        std::fs::write(&go_fifo, "go\n").unwrap();
        held
    });
    let held = bounded(MINUTE, held).await.unwrap();
    let done = bounded(Duration::from_secs(30), shard).await.unwrap();
    drop(held);
    assert_eq!(done.summary.records[0].status, ShardStatus::Passed);
    assert_eq!(done.stdout_of(1), "done\n");
    emu.shutdown().await.unwrap();
}

/// A tar.zst holding only `w`, a symbolic link to `/proc/self`.
fn archive_with_proc_link() -> String {
    let mut builder = tar::Builder::new(Vec::new());
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    link.set_mode(0o777);
    builder
        .append_link(&mut link, "w", "/proc/self")
        .expect("a link entry");
    let tar = builder.into_inner().unwrap();
    base64::engine::general_purpose::STANDARD.encode(zstd::encode_all(&tar[..], 3).unwrap())
}

#[tokio::test]
async fn collected_files_never_come_from_outside_the_source_through_links() {
    let emu = emulator(vec![agent_function("f", true)]).await;
    let backend = backend(&emu.endpoint, "f", true).await;
    // 1. The request makes its working directory a link to the agent's /proc entry.
    let mut through_workdir = request("echo ran", 1, 3, MINUTE);
    through_workdir.source = mvm_shard::protocol::SourceSpec::Inline {
        archive: archive_with_proc_link(),
    };
    through_workdir.workdir = "w".into();
    through_workdir.collect = vec!["environ".into()];
    // 2. The command links to the agent (its parent) and asks for what is behind.
    let mut through_link = request("ln -s /proc/$PPID agent", 2, 3, MINUTE);
    through_link.collect = vec!["agent/environ".into(), "*/environ".into()];
    // 3. The command replaces its own folder by a link to the agent.
    let swap = r#"here=$PWD; cd / && mv "$here" "$here.gone" && ln -s /proc/$PPID "$here""#;
    let mut swapped = request(swap, 3, 3, MINUTE);
    swapped.collect = vec!["environ".into()];
    let done = bounded(
        MINUTE,
        run(backend, vec![through_workdir, through_link, swapped], 3),
    )
    .await;
    for rec in &done.summary.records {
        let sent: Vec<&str> = rec.files.iter().map(|f| f.path.as_str()).collect();
        assert!(sent.is_empty(), "shard {} sent back {sent:?}", rec.shard);
        for file in &rec.files {
            let text = String::from_utf8_lossy(&file.data);
            assert!(!text.contains("emulated-secret-"), "{text}");
        }
    }
    let first = &done.summary.records[0];
    let outcome = &first.result.as_ref().expect("a result").outcome;
    assert!(
        matches!(outcome, Outcome::Rejected { reason } if reason.contains("leads outside the source")),
        "{outcome:?}"
    );
    assert_eq!(done.stdout_of(1), "", "the command must not start there");
    emu.shutdown().await.unwrap();
}
