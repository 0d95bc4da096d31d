//! End to end through the real aws-sdk-lambda client, the emulator and the agent.

mod common;

use std::time::Duration;

use common::*;
use mvm_shard::dispatch::ShardStatus;
use mvm_shard::protocol::{Frame, FrameCodec, Outcome};

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn passing_shards_stream_their_output_and_pass() {
    let emu = emulator(vec![agent_function("f", true)]).await;
    let backend = backend(&emu.endpoint, "f", true).await;
    let requests = (1..=3)
        .map(|i| {
            request(
                "echo \"shard $MVM_SHARD_INDEX of $MVM_SHARD_COUNT\"; echo err >&2",
                i,
                3,
                MINUTE,
            )
        })
        .collect();
    let done = run(backend, requests, 3).await;
    assert_eq!(done.summary.exit_code(), 0);
    for i in 1..=3 {
        assert_eq!(done.stdout_of(i), format!("shard {i} of 3\n"));
        assert_eq!(done.stderr[&i], b"err\n");
        let rec = &done.summary.records[i as usize - 1];
        assert_eq!(rec.status, ShardStatus::Passed);
        assert!(
            rec.result.as_ref().unwrap().fresh_environment,
            "tenant isolation gives fresh environments"
        );
    }
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_command_is_looked_up_in_its_own_path_and_a_script_without_shebang_runs_through_sh() {
    use std::os::unix::fs::PermissionsExt;
    let emu = emulator(vec![agent_function("f", true)]).await;
    let backend = backend(&emu.endpoint, "f", true).await;
    let tools = tempfile::tempdir().unwrap();
    let script = tools.path().join("no-shebang");
    std::fs::write(&script, "echo \"ran as $0 with $1\"\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut shard = request("", 1, 2, MINUTE);
    shard.command = vec!["no-shebang".into(), "an-argument".into()];
    shard.env.insert(
        "PATH".into(),
        format!("{}:/usr/bin:/bin", tools.path().display()),
    );
    // The name it was given stays its argv[0] ($0 of `sh -c` without arguments).
    let mut named = request("", 2, 2, MINUTE);
    named.command = vec!["sh".into(), "-c".into(), "echo $0".into()];
    let done = run(backend, vec![shard, named], 2).await;
    assert_eq!(done.summary.exit_code(), 0, "{:?}", done.stderr);
    // As execvp runs it: sh with the path it found.
    assert_eq!(
        done.stdout_of(1),
        format!("ran as {} with an-argument\n", script.display())
    );
    assert_eq!(done.stdout_of(2), "sh\n");
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_failing_shard_fails_with_its_exit_code() {
    let emu = emulator(vec![agent_function("f", true)]).await;
    let backend = backend(&emu.endpoint, "f", true).await;
    let requests = vec![
        request("exit 0", 1, 2, MINUTE),
        request("echo broken; exit 7", 2, 2, MINUTE),
    ];
    let done = run(backend, requests, 2).await;
    assert_eq!(done.summary.exit_code(), 1);
    assert_eq!(done.summary.records[0].status, ShardStatus::Passed);
    assert_eq!(
        done.summary.records[1].status,
        ShardStatus::Failed {
            exit_code: Some(7),
            signal: None
        }
    );
    assert_eq!(done.stdout_of(2), "broken\n");
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_shard_past_its_timeout_is_killed_with_everything_it_started() {
    let emu = emulator(vec![agent_function("f", true)]).await;
    let backend = backend(&emu.endpoint, "f", true).await;
    let pidfile = tempfile::NamedTempFile::new().unwrap();
    let script = format!(
        "echo before; (trap '' TERM; sleep 300) & echo $! > {}; sleep 300",
        pidfile.path().display()
    );
    let done = run(
        backend,
        vec![request(&script, 1, 1, Duration::from_secs(2))],
        1,
    )
    .await;
    assert_eq!(done.summary.records[0].status, ShardStatus::TimedOut);
    assert_eq!(done.summary.exit_code(), 1);
    assert_eq!(done.stdout_of(1), "before\n");
    let pid: u32 = std::fs::read_to_string(pidfile.path())
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        wait_gone(pid).await,
        "the TERM-ignoring child {pid} survived the timeout"
    );
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn shard_that_prints_nothing_for_longer_than_the_stalled_stream_grace_still_passes() {
    let emu = emulator(vec![agent_function("f", true)]).await;
    let backend = backend(&emu.endpoint, "f", true).await;
    // The SDK gives a silent response body up after 20 s; heartbeats keep it alive.
    let done = run(
        backend,
        vec![request("sleep 26; echo awake", 1, 1, MINUTE)],
        1,
    )
    .await;
    assert_eq!(
        done.summary.records[0].status,
        ShardStatus::Passed,
        "{:?}",
        done.summary.records[0]
    );
    assert_eq!(done.stdout_of(1), "awake\n");
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn tens_of_megabytes_of_output_arrive_whole_and_in_order() {
    let emu = emulator(vec![agent_function("f", true)]).await;
    let backend = backend(&emu.endpoint, "f", true).await;
    // 40 MB of numbered lines: compressible like real logs, and checkable.
    let script = "seq 1 5000000 | awk '{printf \"line %07d\\n\", $1}'";
    let done = run(backend, vec![request(script, 1, 1, MINUTE)], 1).await;
    assert_eq!(done.summary.records[0].status, ShardStatus::Passed);
    let out = &done.stdout[&1];
    assert_eq!(out.len(), 5_000_000 * 13);
    for (i, line) in out
        .split(|b| *b == b'\n')
        .take(5_000_000)
        .enumerate()
        .step_by(99_991)
    {
        assert_eq!(line, format!("line {:07}", i + 1).as_bytes());
    }
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_agent_killed_mid_stream_is_an_infrastructure_failure() {
    let emu = emulator(vec![agent_function("f", true)]).await;
    let backend = backend(&emu.endpoint, "f", true).await;
    // The command's parent is the agent.
    let done = run(
        backend,
        vec![request(
            "echo started; kill -9 $PPID; sleep 5",
            1,
            1,
            MINUTE,
        )],
        1,
    )
    .await;
    let rec = &done.summary.records[0];
    assert!(
        matches!(&rec.status, ShardStatus::InfraFailed { reason } if reason.contains("Runtime.ExitError")),
        "{rec:?}"
    );
    assert_eq!(done.summary.exit_code(), 3);
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_malformed_request_gets_a_clear_refusal_not_a_crash() {
    let emu = emulator(vec![agent_function("f", true)]).await;
    let client = sdk_client(&emu.endpoint).await;
    // What no planner would send: cut-off JSON, and a shard index past its count.
    let payloads: [&[u8]; 2] = [
        b"{\"version\":2,\"command\":",
        b"{\"version\":2,\"run_id\":\"r\",\"shard\":{\"index\":9,\"count\":2},\"command\":[\"true\"],\"timeout_ms\":1000,\"source\":{\"kind\":\"empty\"}}",
    ];
    for (i, payload) in payloads.into_iter().enumerate() {
        let result = final_result(&client, "f", &format!("malformed-{i}"), payload).await;
        assert!(
            matches!(result.outcome, Outcome::Rejected { .. }),
            "{result:?}"
        );
        let status = mvm_shard::dispatch::status_of(Some(&result), None);
        assert!(
            matches!(&status, ShardStatus::InfraFailed { reason } if reason.contains("refused")),
            "{status:?}"
        );
    }
    // The same environment-serving agent is still healthy afterwards.
    let backend = backend(&emu.endpoint, "f", true).await;
    let done = run(backend, vec![request("echo fine", 1, 1, MINUTE)], 1).await;
    assert_eq!(done.summary.exit_code(), 0);
    emu.shutdown().await.unwrap();
}

/// Sends `payload` as it is with the real SDK client and returns the agent's
/// final result frame (the agent still answers with one).
async fn final_result(
    client: &aws_sdk_lambda::Client,
    function: &str,
    tenant: &str,
    payload: &[u8],
) -> mvm_shard::protocol::ShardResult {
    use aws_sdk_lambda::types::InvokeWithResponseStreamResponseEvent as E;
    use tokio_util::codec::Decoder;
    let mut streamed = client
        .invoke_with_response_stream()
        .function_name(function)
        .tenant_id(tenant)
        .payload(aws_sdk_lambda::primitives::Blob::new(payload.to_vec()))
        .send()
        .await
        .expect("streaming invoke starts");
    let mut buf = bytes::BytesMut::new();
    while let Some(event) = streamed
        .event_stream
        .recv()
        .await
        .expect("stream is intact")
    {
        if let E::PayloadChunk(c) = event {
            buf.extend_from_slice(c.payload().expect("chunk has a payload").as_ref());
        }
    }
    let mut codec = FrameCodec::new();
    while let Some(frame) = codec.decode(&mut buf).expect("frames are well formed") {
        if let Frame::Result(result) = frame {
            return result;
        }
    }
    panic!("the stream ended without a final result");
}

#[tokio::test]
async fn a_daemon_the_command_leaves_behind_is_gone_afterwards() {
    let emu = emulator(vec![agent_function("f", true)]).await;
    let backend = backend(&emu.endpoint, "f", true).await;
    let pidfile = tempfile::NamedTempFile::new().unwrap();
    // setsid leaves the process group; the double fork leaves the parent chain.
    let script = format!(
        "setsid sh -c 'sleep 300 & echo $! > {}'; echo left-a-daemon",
        pidfile.path().display()
    );
    // The daemon holds the shard's stdout: should it survive, fail fast.
    let done = tokio::time::timeout(
        Duration::from_secs(30),
        run(backend, vec![request(&script, 1, 1, MINUTE)], 1),
    )
    .await
    .expect("the shard ends in time");
    assert_eq!(done.summary.records[0].status, ShardStatus::Passed);
    let pid: u32 = std::fs::read_to_string(pidfile.path())
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        !mvm_shard::os::is_alive(pid),
        "daemon {pid} outlived its shard"
    );
    assert!(
        done.summary.records[0]
            .result
            .as_ref()
            .unwrap()
            .stragglers_killed
            >= 1
    );
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_function_not_kept_warm_gives_every_invocation_a_fresh_environment() {
    let mut function = agent_function("f", false);
    function.keep_warm = false;
    let emu = emulator(vec![function]).await;
    let backend = backend(&emu.endpoint, "f", false).await;
    for _ in 0..2 {
        let done = run(backend.clone(), vec![request("echo $$", 1, 1, MINUTE)], 1).await;
        assert_eq!(done.summary.exit_code(), 0);
        let result = done.summary.records[0].result.clone().unwrap();
        assert!(result.fresh_environment, "an environment was kept warm");
    }
    emu.shutdown().await.unwrap();
}

/// The state letter of `/proc/<pid>/stat`, if the process still exists.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

#[tokio::test]
async fn a_daemon_killed_at_the_timeout_is_reaped_not_left_a_zombie() {
    // A warm environment: the agent lives on after the shard, so a zombie
    // child of it would stay.
    let emu = emulator(vec![agent_function("f", false)]).await;
    let backend = backend(&emu.endpoint, "f", false).await;
    let pidfile = tempfile::NamedTempFile::new().unwrap();
    let script = format!(
        "setsid sh -c 'sleep 300 & echo $! > {}'; sleep 300",
        pidfile.path().display()
    );
    let run = run(
        backend,
        vec![request(&script, 1, 1, Duration::from_secs(2))],
        1,
    );
    let done = tokio::time::timeout(MINUTE, run)
        .await
        .expect("the shard ended");
    assert_eq!(done.summary.records[0].status, ShardStatus::TimedOut);
    let pid: u32 = std::fs::read_to_string(pidfile.path())
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The agent kills and reaps before it sends the result.
    assert_eq!(
        process_state(pid),
        None,
        "daemon {pid} is still there (Z: an unreaped zombie of the agent)"
    );
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_second_invocation_in_a_reused_environment_finds_nothing_from_the_first() {
    // Without tenant isolation Lambda may reuse a warm environment; it does here.
    let emu = emulator(vec![agent_function("f", false)]).await;
    let backend = backend(&emu.endpoint, "f", false).await;
    let pidfile = tempfile::NamedTempFile::new().unwrap();
    let first = format!(
        "touch ../../left-in-scratch $TMPDIR/left-in-tmp $HOME/.left-in-home; \
         setsid sh -c 'sleep 300 & echo $! > {}'",
        pidfile.path().display()
    );
    let done = run(backend.clone(), vec![request(&first, 1, 1, MINUTE)], 1).await;
    assert_eq!(done.summary.exit_code(), 0);
    assert!(
        done.summary.records[0]
            .result
            .as_ref()
            .unwrap()
            .fresh_environment
    );

    let second = "ls -A ../.. | grep -v \"^$(basename $(dirname $PWD))$\"; ls -A $HOME; ls -A $TMPDIR; echo checked";
    let done = run(backend, vec![request(second, 1, 1, MINUTE)], 1).await;
    assert_eq!(done.summary.exit_code(), 0);
    assert_eq!(
        done.stdout_of(1),
        "checked\n",
        "the second shard saw leftovers"
    );
    let result = done.summary.records[0].result.clone().unwrap();
    assert!(
        !result.fresh_environment,
        "the environment was reused and must say so"
    );
    let pid: u32 = std::fs::read_to_string(pidfile.path())
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!mvm_shard::os::is_alive(pid));
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_command_never_sees_the_functions_credentials_or_runtime_api() {
    let emu = emulator(vec![agent_function("f", true)]).await;
    let backend = backend(&emu.endpoint, "f", true).await;
    let mut req = request("env", 1, 1, MINUTE);
    req.env.insert("MINE".into(), "visible".into());
    let done = run(backend, vec![req], 1).await;
    let env = done.stdout_of(1);
    assert!(env.contains("MINE=visible"));
    assert!(env.contains("MVM_SHARD_INDEX=1"));
    for withheld in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_LAMBDA_RUNTIME_API",
    ] {
        assert!(
            !env.contains(&format!("{withheld}=")),
            "{withheld} leaked:\n{env}"
        );
    }
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_tenant_isolated_function_refuses_calls_without_a_tenant_id() {
    let emu = emulator(vec![agent_function("f", true)]).await;
    let client = sdk_client(&emu.endpoint).await;
    let err = client
        .invoke_with_response_stream()
        .function_name("f")
        .payload(aws_sdk_lambda::primitives::Blob::new(b"{}".to_vec()))
        .send()
        .await
        .unwrap_err();
    let service = err.into_service_error();
    assert!(
        service.is_invalid_parameter_value_exception(),
        "{service:?}"
    );
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn throttled_starts_are_retried_until_capacity_frees() {
    let mut f = agent_function("f", true);
    f.max_concurrency = 1;
    let emu = emulator(vec![f]).await;
    let backend = backend(&emu.endpoint, "f", true).await;
    let requests = (1..=3)
        .map(|i| request("sleep 0.3", i, 3, MINUTE))
        .collect();
    let done = run(backend, requests, 3).await;
    assert_eq!(done.summary.exit_code(), 0, "{:?}", done.summary);
    assert!(
        done.summary.records.iter().any(|r| r.attempts > 1),
        "nobody was throttled"
    );
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_missing_function_is_an_infrastructure_failure_without_retries() {
    let emu = emulator(vec![agent_function("f", true)]).await;
    let backend = backend(&emu.endpoint, "nope", true).await;
    let done = run(backend, vec![request("true", 1, 1, MINUTE)], 1).await;
    let rec = &done.summary.records[0];
    assert_eq!(rec.attempts, 1);
    assert!(
        matches!(&rec.status, ShardStatus::InfraFailed { reason } if reason.contains("ResourceNotFound")),
        "{rec:?}"
    );
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn with_throttling_on_a_stream_past_6_mb_is_paced_like_lambda_and_arrives_whole() {
    let emu = start_emulator(mvm_shard::emulator::EmulatorConfig {
        functions: vec![agent_function("f", true)],
        region: "us-east-1".into(),
        microvm_images: Vec::new(),
        microvm_faults: Default::default(),
        throttle_streams: true,
        lambda_faults: Default::default(),
    })
    .await;
    let backend = backend(&emu.endpoint, "f", true).await;
    // Random bytes do not compress: about 9 MB cross the wire, 3 MB of them paced at 2 MB/s.
    let started = std::time::Instant::now();
    let done = run(
        backend,
        vec![request("head -c 9000000 /dev/urandom", 1, 1, MINUTE)],
        1,
    )
    .await;
    let took = started.elapsed();
    assert_eq!(done.summary.records[0].status, ShardStatus::Passed);
    assert_eq!(done.stdout[&1].len(), 9_000_000);
    assert!(
        took >= Duration::from_millis(1400),
        "3 MB past the first 6 MB took only {took:?}"
    );
    emu.shutdown().await.unwrap();
}
