//! The emulator is Lambda to anyone: AWS clients that are not ours call it,
//! and Lambda runtimes that are not ours run under it.

mod common;

use std::process::Command;
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use mvm_shard::protocol::{Frame, FrameCodec, Outcome, OutputStream};
use tokio_util::codec::Decoder;

#[tokio::test]
async fn boto3_streams_a_shard_from_the_emulator() {
    let emu = emulator(vec![agent_function("shards", true)]).await;
    let payload = tempfile::NamedTempFile::new().unwrap();
    let req = request("echo from-boto3; exit 4", 1, 1, Duration::from_secs(60));
    std::fs::write(payload.path(), req.encode().unwrap()).unwrap();
    let endpoint = emu.endpoint.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(clients_dir().join("boto3_stream.py"))
            .args([
                &endpoint,
                "shards",
                payload.path().to_str().unwrap(),
                "boto3-tenant",
            ])
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "boto3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(out.stderr.trim_ascii()).unwrap();
    assert_eq!(meta["status"], 200);
    assert!(
        meta["complete"].is_object(),
        "no InvokeComplete event: {meta}"
    );

    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::from(&out.stdout[..]);
    let mut stdout = Vec::new();
    let mut result = None;
    while let Some(frame) = codec.decode(&mut buf).unwrap() {
        match frame {
            Frame::Output {
                stream: OutputStream::Stdout,
                data,
            } => stdout.extend_from_slice(&data),
            Frame::Result(r) => result = Some(r),
            _ => {}
        }
    }
    assert_eq!(stdout, b"from-boto3\n");
    assert_eq!(result.unwrap().outcome, Outcome::Exited { code: 4 });
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_official_python_runtime_client_runs_under_the_emulator() {
    let emu = emulator(vec![
        python_function("py", "python_handler.handle"),
        python_function("pyfail", "python_handler.fail"),
    ])
    .await;
    let client = sdk_client(&emu.endpoint).await;

    let out = client
        .invoke()
        .function_name("py")
        .payload(aws_sdk_lambda::primitives::Blob::new(
            br#"{"n": 1}"#.to_vec(),
        ))
        .send()
        .await
        .expect("invoke succeeds");
    assert_eq!(out.function_error(), None);
    let body: serde_json::Value = serde_json::from_slice(out.payload().unwrap().as_ref()).unwrap();
    assert_eq!(body["echo"]["n"], 1);
    assert_eq!(body["function"], "py");
    assert!(
        body["time_left_ms"].as_u64().unwrap() > 800_000,
        "deadline is not passed on: {body}"
    );

    // The warm environment serves a second call, streamed this time.
    let (bytes, error) = invoke_streamed(&client, "py", br#"{"n": 2}"#).await;
    assert_eq!(error, None);
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["echo"]["n"], 2);

    // A handler error comes back as Lambda reports function errors.
    let out = client
        .invoke()
        .function_name("pyfail")
        .log_type(aws_sdk_lambda::types::LogType::Tail)
        .payload(aws_sdk_lambda::primitives::Blob::new(b"{}".to_vec()))
        .send()
        .await
        .expect("a function error is still a 200");
    assert_eq!(out.function_error(), Some("Unhandled"));
    let body: serde_json::Value = serde_json::from_slice(out.payload().unwrap().as_ref()).unwrap();
    assert_eq!(body["errorType"], "ValueError");
    use base64::Engine as _;
    let log = base64::engine::general_purpose::STANDARD
        .decode(out.log_result().unwrap())
        .unwrap();
    assert!(String::from_utf8_lossy(&log).contains("START RequestId"));
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_aws_cli_invokes_a_function_on_the_emulator() {
    let emu = emulator(vec![python_function("py", "python_handler.handle")]).await;
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("out.json");
    let endpoint = emu.endpoint.clone();
    let out_path = out_file.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("aws")
            .args([
                "lambda",
                "invoke",
                "--endpoint-url",
                &endpoint,
                "--function-name",
                "py",
            ])
            .args(["--payload", r#"{"from": "cli"}"#])
            .arg(&out_path)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .output()
            .expect("the aws CLI runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "aws failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(meta["StatusCode"], 200);
    let body: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap();
    assert_eq!(body["echo"]["from"], "cli");
    emu.shutdown().await.unwrap();
}

/// An example binary of this package; `cargo test` builds the examples next
/// to the test binaries' `deps` folder.
fn example(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test`, which builds examples",
        path.display()
    );
    path
}

#[tokio::test]
async fn the_official_rust_runtime_client_runs_under_the_emulator() {
    let binary = example("rust_runtime_function");
    let emu = emulator(vec![mvm_shard::emulator::FunctionConfig::new(
        "rs",
        vec![binary.display().to_string()],
    )])
    .await;
    let client = sdk_client(&emu.endpoint).await;

    let out = client
        .invoke()
        .function_name("rs")
        .payload(aws_sdk_lambda::primitives::Blob::new(
            br#"{"n": 7}"#.to_vec(),
        ))
        .send()
        .await
        .expect("invoke succeeds");
    assert_eq!(out.function_error(), None);
    let body: serde_json::Value = serde_json::from_slice(out.payload().unwrap().as_ref()).unwrap();
    assert_eq!(body["echo"]["n"], 7);
    assert!(!body["request_id"].as_str().unwrap().is_empty());
    assert!(
        body["function_arn"]
            .as_str()
            .unwrap()
            .ends_with(":function:rs"),
        "{body}"
    );

    let out = client
        .invoke()
        .function_name("rs")
        .payload(aws_sdk_lambda::primitives::Blob::new(
            br#"{"fail": true}"#.to_vec(),
        ))
        .send()
        .await
        .expect("a function error is still a 200");
    assert_eq!(out.function_error(), Some("Unhandled"));
    let body = String::from_utf8_lossy(out.payload().unwrap().as_ref()).into_owned();
    assert!(body.contains("failing on request"), "{body}");

    // Streamed: a buffered runtime's answer arrives as chunks and a clean end.
    let (bytes, error) = invoke_streamed(&client, "rs", br#"{"n": 8}"#).await;
    assert_eq!(error, None);
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["echo"]["n"], 8);
    emu.shutdown().await.unwrap();
}

/// Calls InvokeWithResponseStream with our SDK client and returns the
/// payload chunks joined, and the `InvokeComplete` error code if any.
async fn invoke_streamed(
    client: &aws_sdk_lambda::Client,
    function: &str,
    payload: &[u8],
) -> (Vec<u8>, Option<String>) {
    use aws_sdk_lambda::types::InvokeWithResponseStreamResponseEvent as E;
    let mut streamed = client
        .invoke_with_response_stream()
        .function_name(function)
        .payload(aws_sdk_lambda::primitives::Blob::new(payload.to_vec()))
        .send()
        .await
        .expect("streaming invoke succeeds");
    let mut bytes = Vec::new();
    let mut complete = None;
    while let Some(event) = streamed.event_stream.recv().await.unwrap() {
        match event {
            E::PayloadChunk(c) => bytes.extend_from_slice(c.payload().unwrap().as_ref()),
            E::InvokeComplete(c) => complete = Some(c.error_code().map(str::to_owned)),
            _ => {}
        }
    }
    let error = complete.expect("the stream ends with InvokeComplete");
    (bytes, error)
}
