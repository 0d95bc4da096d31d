//! End to end through the real aws-sdk-lambdamicrovms client, the emulator's
//! MicroVMs and the agent's MicroVM mode.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use mvm_shard::dispatch::ShardStatus;
use mvm_shard::emulator::MicrovmFaults;

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn microvm_shards_pass_fail_and_time_out_and_none_is_left_running() {
    let emu = microvm_emulator(MicrovmFaults::default()).await;
    let backend = microvm_backend(&emu.endpoint).await;
    let requests = vec![
        request("echo fine", 1, 3, MINUTE),
        request("echo broken; exit 5", 2, 3, MINUTE),
        request("echo slow; sleep 300", 3, 3, Duration::from_secs(2)),
    ];
    let done = run(backend, requests, 3).await;
    let statuses: Vec<&ShardStatus> = done.summary.records.iter().map(|r| &r.status).collect();
    assert_eq!(
        statuses,
        [
            &ShardStatus::Passed,
            &ShardStatus::Failed {
                exit_code: Some(5),
                signal: None
            },
            &ShardStatus::TimedOut
        ]
    );
    assert_eq!(
        (done.stdout_of(1), done.stdout_of(2), done.stdout_of(3)),
        ("fine\n".into(), "broken\n".into(), "slow\n".into())
    );
    assert!(
        done.summary.records[0]
            .result
            .as_ref()
            .unwrap()
            .fresh_environment
    );
    let states = microvm_states(&emu.endpoint).await;
    assert_eq!(states.len(), 3);
    assert!(states.iter().all(|s| s == "TERMINATED"), "{states:?}");
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_log_broken_off_again_and_again_arrives_whole_and_once() {
    // The endpoint cuts every response after 50 kB: the backend must resume
    // from the last byte each time, losing and repeating nothing.
    let emu = microvm_emulator(MicrovmFaults {
        cut_responses_after: Some(50_000),
        ..Default::default()
    })
    .await;
    let backend = microvm_backend(&emu.endpoint).await;
    // Random digits compress poorly, so the wire carries several cuts' worth.
    let mut req = request(
        "od -An -tu4 -N600000 -v /dev/urandom | tee expected.txt; cp expected.txt \"$OUT\"; echo \"${#BIG}\"",
        1,
        1,
        MINUTE,
    );
    let expected = tempfile::NamedTempFile::new().unwrap();
    req.env
        .insert("OUT".into(), expected.path().display().to_string());
    // Over the 16 KiB run-hook payload: the request goes through the log port.
    req.env.insert("BIG".into(), "x".repeat(20_000));
    let done = run(backend, vec![req], 1).await;
    assert_eq!(
        done.summary.records[0].status,
        ShardStatus::Passed,
        "{:?}",
        done.summary.records[0]
    );
    let mut want = std::fs::read(expected.path()).unwrap();
    want.extend_from_slice(b"20000\n");
    assert!(want.len() > 500_000);
    assert!(
        done.stdout[&1] == want,
        "output differs: {} bytes, want {}",
        done.stdout[&1].len(),
        want.len()
    );
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_expired_token_is_renewed_and_the_log_goes_on() {
    // Tokens live one second and every response breaks after 300 bytes, so
    // reconnections after the first second meet an expired token.
    let emu = microvm_emulator(MicrovmFaults {
        token_lifetime: Some(Duration::from_secs(1)),
        cut_responses_after: Some(300),
        ..Default::default()
    })
    .await;
    let backend = microvm_backend(&emu.endpoint).await;
    let script = "i=0; while [ $i -lt 30 ]; do i=$((i+1)); echo \"line $i of a shard that takes three seconds\"; sleep 0.1; done";
    let done = run(backend, vec![request(script, 1, 1, MINUTE)], 1).await;
    assert_eq!(
        done.summary.records[0].status,
        ShardStatus::Passed,
        "{:?}",
        done.summary.records[0]
    );
    let lines: Vec<String> = done.stdout_of(1).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 30);
    assert_eq!(lines[29], "line 30 of a shard that takes three seconds");
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_invoker_stopped_with_sigterm_leaves_no_microvm_running() {
    let (mut emulator, endpoint) = start_emulate();
    let dir = tempfile::tempdir().unwrap();
    let mut invoker = Command::new(binary())
        .args([
            "run",
            "--microvm-image",
            "mvm-shard",
            "--endpoint-url",
            &endpoint,
            "--region",
            "us-east-1",
        ])
        .args(["--shards", "2", "--", "sh", "-c", "echo started; sleep 300"])
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = invoker.stdout.take().unwrap();
    let started = tokio::task::spawn_blocking(move || {
        let mut seen = 0;
        let mut lines = BufReader::new(stdout).lines();
        while seen < 2 {
            match lines.next() {
                Some(Ok(line)) if line.ends_with("] started") => seen += 1,
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        seen
    })
    .await
    .unwrap();
    assert_eq!(started, 2, "both shards should have started");
    assert_eq!(microvm_states(&endpoint).await, vec!["RUNNING", "RUNNING"]);

    sigterm(&invoker);
    let status = tokio::task::spawn_blocking(move || invoker.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(3), "unfinished shards count as not run");
    let states = microvm_states(&endpoint).await;
    assert!(states.iter().all(|s| s == "TERMINATED"), "{states:?}");

    sigterm(&emulator);
    assert!(emulator.wait().unwrap().success());
}

/// The summary table without its duration column.
fn summary_rows(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|l| l.starts_with("1/2 ") || l.starts_with("2/2 ") || l.contains(" shards: "))
        .map(|l| {
            l.split_whitespace()
                .filter(|w| !w.ends_with('s') || w.contains(':'))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

#[tokio::test]
async fn the_same_command_and_summary_work_on_every_backend() {
    let (mut emulator, endpoint) = start_emulate();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data.txt"), "shipped\n").unwrap();
    let command = [
        "--shards",
        "2",
        "--",
        "sh",
        "-c",
        "cat data.txt; test {index} = 1",
    ];
    let mut outputs = Vec::new();
    for target in [
        vec!["--local"],
        vec![
            "--function",
            "mvm-shard",
            "--endpoint-url",
            &endpoint,
            "--region",
            "us-east-1",
        ],
        vec![
            "--microvm-image",
            "mvm-shard",
            "--endpoint-url",
            &endpoint,
            "--region",
            "us-east-1",
        ],
    ] {
        let out = Command::new(binary())
            .arg("run")
            .args(&target)
            .args(command)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(1), "{target:?}: {stdout}");
        assert_eq!(
            stdout.matches("] shipped").count(),
            2,
            "{target:?}: {stdout}"
        );
        outputs.push(summary_rows(&stdout));
    }
    assert_eq!(outputs[0].len(), 3, "{:?}", outputs[0]);
    assert_eq!(outputs[0], outputs[1]);
    assert_eq!(outputs[0], outputs[2]);
    sigterm(&emulator);
    assert!(emulator.wait().unwrap().success());
}

#[tokio::test]
async fn a_microvm_whose_run_hook_refuses_is_not_run_with_the_reason_and_not_retried() {
    // RunMicrovm answers PENDING; the backend must wait for the microVM to
    // settle and read why it ended, not take PENDING for a start.
    let emu = start_emulator(mvm_shard::emulator::EmulatorConfig {
        functions: Vec::new(),
        region: "us-east-1".into(),
        microvm_images: vec![refusing_image("img")],
        microvm_faults: MicrovmFaults::default(),
        throttle_streams: false,
        lambda_faults: Default::default(),
    })
    .await;
    let backend = microvm_backend(&emu.endpoint).await;
    let done = run(
        backend,
        vec![request("echo never", 1, 1, Duration::from_secs(30))],
        1,
    )
    .await;
    let record = &done.summary.records[0];
    match &record.status {
        ShardStatus::InfraFailed { reason } => {
            assert!(reason.contains("run hook answered 400"), "{reason}");
            // Seen on its way down or once down: either is an end.
            assert!(
                reason.contains("TERMINATING") || reason.contains("TERMINATED"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(record.attempts, 1, "a refused request is not retried");
    // TERMINATING settles into TERMINATED; nothing may stay up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut states = microvm_states(&emu.endpoint).await;
    while states != ["TERMINATED"] && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        states = microvm_states(&emu.endpoint).await;
    }
    assert_eq!(states, vec!["TERMINATED"], "nothing is left running");
    emu.shutdown().await.unwrap();
}
