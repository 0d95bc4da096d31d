//! Interrupting the invoker at the worst moments, through the real CLI
//! against `mvm-shard emulate`: whatever the moment of the signal, no
//! microVM is left running, and the summary says what was interrupted and
//! what was terminated.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{binary, microvms_client};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// No test here may wait longer than this on a process.
const BOUND: Duration = Duration::from_secs(90);

/// `mvm-shard emulate` with `extra` flags; the process and its endpoint.
async fn emulate(extra: &[&str]) -> (Child, String) {
    let mut emulator = Command::new(binary())
        .args(["emulate", "--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("emulator starts");
    let mut lines = BufReader::new(emulator.stdout.take().expect("piped")).lines();
    let endpoint = tokio::time::timeout(BOUND, lines.next_line())
        .await
        .expect("the emulator prints its endpoint in time")
        .expect("stdout readable")
        .expect("an endpoint line");
    (emulator, endpoint.trim().to_string())
}

/// `mvm-shard run` against `endpoint` with `target` (backend flags), running
/// `command` in `shards` shards, stdout and stderr piped; with the folder it
/// runs in, to keep until it ends.
fn invoker(
    endpoint: &str,
    target: &[&str],
    shards: u32,
    command: &[&str],
) -> (Child, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let shards = shards.to_string();
    let mut args = vec!["run"];
    args.extend(target);
    args.extend(["--endpoint-url", endpoint, "--region", "us-east-1"]);
    args.extend(["--shards", &shards, "--"]);
    args.extend(command);
    let child = spawn_invoker(
        dir.path(),
        &args,
        &[
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
        ],
    );
    (child, dir)
}

/// `mvm-shard ARGS` in `dir` with `env` added, outside GitHub mode, stdout
/// and stderr piped, killed if the test drops it.
fn spawn_invoker(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(binary())
        .args(args)
        .envs(env.iter().copied())
        .env_remove("GITHUB_ACTIONS")
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("invoker starts")
}

/// Stops `mvm-shard emulate` as a user would (SIGTERM: it ends every
/// microVM it still runs) and waits for it, bounded.
async fn stop(mut emulator: Child) {
    signal(&emulator, Signal::SIGTERM);
    let status = tokio::time::timeout(BOUND, emulator.wait())
        .await
        .expect("the emulator stops in time")
        .expect("the emulator can be waited for");
    assert!(status.success(), "{status:?}");
}

fn signal(child: &Child, signal: Signal) {
    let pid = child.id().expect("still running") as i32;
    kill(Pid::from_raw(pid), signal).expect("signal delivered");
}

/// Waits (bounded) for the invoker to exit; its status, stdout and stderr.
async fn finish(child: Child) -> (Option<i32>, String, String) {
    let out = tokio::time::timeout(BOUND, child.wait_with_output())
        .await
        .expect("the invoker exits in time")
        .expect("the invoker can be waited for");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The state of every microVM the emulator knows, through the real SDK.
async fn states(endpoint: &str) -> Vec<String> {
    let client = microvms_client(endpoint).await;
    let list = client.list_microvms().send().await.expect("ListMicrovms");
    list.items()
        .iter()
        .map(|i| i.state().as_str().to_string())
        .collect()
}

/// Polls ListMicrovms (bounded) until `n` microVMs exist.
async fn until_microvms(endpoint: &str, n: usize) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let now = states(endpoint).await;
        if now.len() >= n {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} microVM(s) after {BOUND:?}",
            now.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads the invoker's stdout (bounded) until `n` lines end with `suffix`;
/// hands the reader back so the rest can still be collected.
async fn until_lines(child: &mut Child, n: usize, suffix: &str) -> Vec<String> {
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    let mut matching = 0;
    while matching < n {
        let line = tokio::time::timeout(BOUND, lines.next_line())
            .await
            .expect("the shards print in time")
            .expect("stdout readable")
            .unwrap_or_else(|| panic!("stdout ended; saw {seen:?}"));
        if line.ends_with(suffix) {
            matching += 1;
        }
        seen.push(line);
    }
    // Keep draining, so the invoker never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    seen
}

#[tokio::test]
async fn sigint_while_run_microvm_is_in_flight_terminates_every_microvm() {
    // Every first RunMicrovm answer is held back for a minute while the
    // microVMs start: the invoker is interrupted with all three calls out.
    let (emulator, endpoint) = emulate(&["--fault-hold-run-answers", "60s"]).await;
    let (run, _dir) = invoker(
        &endpoint,
        &["--microvm-image", "mvm-shard"],
        3,
        &["sleep", "60"],
    );
    until_microvms(&endpoint, 3).await;
    signal(&run, Signal::SIGINT);
    let (code, stdout, stderr) = finish(run).await;

    assert_eq!(code, Some(3), "an interrupted run is incomplete\n{stderr}");
    let states = states(&endpoint).await;
    assert_eq!(states, vec!["TERMINATED"; 3], "{stderr}");
    assert!(
        stderr.contains("terminated 3 microVM(s)"),
        "the summary names what was terminated: {stderr}"
    );
    assert!(stdout.contains("3 interrupted"), "{stdout}");
    stop(emulator).await;
}

#[tokio::test]
async fn sigint_then_sigterm_at_once_while_streaming_still_terminates_every_microvm() {
    let (emulator, endpoint) = emulate(&[]).await;
    let (mut run, _dir) = invoker(
        &endpoint,
        &["--microvm-image", "mvm-shard"],
        2,
        &["sh", "-c", "echo started; sleep 300"],
    );
    until_lines(&mut run, 2, "] started").await;
    assert_eq!(states(&endpoint).await, vec!["RUNNING"; 2]);
    // What a cancelled workflow sends: SIGINT, then SIGTERM.
    signal(&run, Signal::SIGINT);
    signal(&run, Signal::SIGTERM);
    let (code, _, stderr) = finish(run).await;

    assert_eq!(code, Some(3), "{stderr}");
    assert_eq!(states(&endpoint).await, vec!["TERMINATED"; 2], "{stderr}");
    assert!(stderr.contains("terminated 2 microVM(s)"), "{stderr}");
    stop(emulator).await;
}

#[tokio::test]
async fn an_interrupted_function_shard_is_said_to_maybe_still_run() {
    let (emulator, endpoint) = emulate(&[]).await;
    let (mut run, _dir) = invoker(
        &endpoint,
        &["--function", "mvm-shard"],
        1,
        &["sh", "-c", "echo started; sleep 300"],
    );
    let stdout = run.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = tokio::time::timeout(BOUND, lines.next_line())
            .await
            .expect("the shard prints in time")
            .expect("stdout readable")
            .expect("the shard starts");
        if line.ends_with("] started") {
            break;
        }
    }
    signal(&run, Signal::SIGINT);
    let rest = rest_of(&mut lines).await;
    let (code, _, stderr) = finish(run).await;
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        rest.contains(
            "INTERRUPTED (interrupted; the function may still be running until its timeout)"
        ),
        "{rest}"
    );
    assert!(!rest.contains("could not run:"), "{rest}");
    stop(emulator).await;
}

/// Reads `lines` (bounded) until one contains `needle`.
async fn until_line<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
    needle: &str,
) -> String {
    loop {
        let line = tokio::time::timeout(BOUND, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no line with {needle:?} in time"))
            .expect("readable")
            .unwrap_or_else(|| panic!("ended before a line with {needle:?}"));
        if line.contains(needle) {
            return line;
        }
    }
}

#[tokio::test]
async fn a_third_signal_abandons_termination_and_names_what_may_still_run() {
    // An image whose `terminate` hook takes its time: TerminateMicrovm is
    // still out when the third signal comes.
    let script = concat!(
        "import http.server, os, time\n",
        "class H(http.server.BaseHTTPRequestHandler):\n",
        "    def log_message(self, *args): pass\n",
        "    def do_POST(self):\n",
        "        if self.path.endswith('/terminate'): time.sleep(30)\n",
        "        self.send_response(200); self.end_headers()\n",
        "addr = (os.environ['MVM_SHARD_BIND_IP'], int(os.environ['MVM_SHARD_HOOKS_PORT']))\n",
        "http.server.ThreadingHTTPServer(addr, H).serve_forever()\n",
    );
    let image = format!("slow-end=exec python3 -c \"{script}\"");
    let (emulator, endpoint) = emulate(&["--microvm-image", &image]).await;
    let (mut run, _dir) = invoker(&endpoint, &["--microvm-image", "slow-end"], 1, &["true"]);
    eventually_running(&endpoint).await;
    let mut stderr = BufReader::new(run.stderr.take().expect("piped")).lines();
    signal(&run, Signal::SIGINT);
    until_line(&mut stderr, "SIGINT received: stopping").await;
    signal(&run, Signal::SIGTERM);
    until_line(&mut stderr, "SIGTERM received: still ending").await;
    signal(&run, Signal::SIGINT);
    let abandoned = until_line(&mut stderr, "SIGINT received: abandoning").await;
    let (code, _, _) = finish(run).await;

    assert_eq!(code, Some(130));
    let client = microvms_client(&endpoint).await;
    let list = client.list_microvms().send().await.expect("ListMicrovms");
    let id = list.items()[0].microvm_id();
    assert!(
        abandoned.contains("MAY STILL BE RUNNING") && abandoned.contains(id),
        "the microVM left is named: {abandoned}"
    );
    stop(emulator).await;
}

/// Polls ListMicrovms (bounded) until one microVM is RUNNING.
async fn eventually_running(endpoint: &str) {
    let deadline = tokio::time::Instant::now() + BOUND;
    while states(endpoint).await != vec!["RUNNING"] {
        assert!(tokio::time::Instant::now() < deadline, "no RUNNING microVM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sigint_while_the_tests_are_listed_terminates_the_listing_microvm() {
    // The listing runs in a microVM of its own before any shard: a signal
    // then must end it too, not kill the invoker and leave it running.
    let (emulator, endpoint) = emulate(&[]).await;
    let (run, _dir) = invoker(
        &endpoint,
        &[
            "--microvm-image",
            "mvm-shard",
            "--runner",
            "pytest",
            "--list-command",
            "sleep 60",
        ],
        2,
        &["pytest", "{tests}"],
    );
    eventually_running(&endpoint).await;
    signal(&run, Signal::SIGINT);
    let (code, _, stderr) = finish(run).await;

    assert_eq!(code, Some(3), "an interrupted run is incomplete\n{stderr}");
    assert_eq!(states(&endpoint).await, vec!["TERMINATED"], "{stderr}");
    assert!(stderr.contains("interrupted by SIGINT"), "{stderr}");
    stop(emulator).await;
}

#[tokio::test]
async fn sigint_while_the_tests_are_listed_here_ends_the_listing_and_its_children() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("listing.pid");
    let listing = format!("sleep 60 & echo $! > {}; wait", pid_file.display());
    let run = spawn_invoker(
        dir.path(),
        &[
            "run",
            "--local",
            "--source",
            ".",
            "--runner",
            "pytest",
            "--list-local",
            "--list-command",
            &listing,
            "--",
            "pytest",
            "{tests}",
        ],
        &[],
    );
    let sleeper = pid_in(&pid_file, "the listing never started").await;
    signal(&run, Signal::SIGINT);
    let (code, _, stderr) = finish(run).await;

    assert_eq!(code, Some(3), "an interrupted run is incomplete\n{stderr}");
    assert!(stderr.contains("interrupted by SIGINT"), "{stderr}");
    assert!(
        common::wait_gone(sleeper).await,
        "the listing's child {sleeper} outlived the run"
    );
}

/// With `--local` the run's own emulator ends every environment with the
/// run: an interrupted shard is said to have ended, and nothing it started
/// outlives the invoker.
#[tokio::test]
async fn an_interrupted_local_shard_ends_with_the_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("shard.pid");
    std::fs::write(dir.path().join("x"), "").expect("source file");
    let script = format!("echo $$ > {}; exec sleep 300", pid_file.display());
    let mut run = spawn_invoker(
        dir.path(),
        &[
            "run", "--local", "--source", ".", "--shards", "1", "--", "sh", "-c", &script,
        ],
        &[],
    );
    let sleeper = pid_in(&pid_file, "the shard never started").await;
    let stdout = run.stdout.take().expect("piped");
    signal(&run, Signal::SIGINT);
    let mut lines = BufReader::new(stdout).lines();
    let rest = rest_of(&mut lines).await;
    let (code, _, stderr) = finish(run).await;
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        rest.contains("INTERRUPTED (interrupted; ended with the local emulator)"),
        "{rest}"
    );
    assert!(!rest.contains("may still be running"), "{rest}");
    assert!(
        common::wait_gone(sleeper).await,
        "the shard's process {sleeper} outlived the run"
    );
}

/// The process id a script wrote to `file`, waited for (bounded): a
/// process the test then expects gone.
async fn pid_in(file: &std::path::Path, never: &str) -> u32 {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        if let Some(pid) = std::fs::read_to_string(file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return pid;
        }
        assert!(tokio::time::Instant::now() < deadline, "{never}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The rest of the invoker's stdout, line by line, until it closes (bounded).
async fn rest_of<R: tokio::io::AsyncBufRead + Unpin>(lines: &mut tokio::io::Lines<R>) -> String {
    let mut rest = String::new();
    while let Some(line) = tokio::time::timeout(BOUND, lines.next_line())
        .await
        .expect("the invoker ends in time")
        .expect("stdout readable")
    {
        rest.push_str(&line);
        rest.push('\n');
    }
    rest
}
