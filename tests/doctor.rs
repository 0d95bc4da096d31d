//! `mvm-shard doctor` against the emulator: a healthy deployment, and the
//! misconfigurations it must name.

mod common;

use common::*;
use mvm_shard::emulator::FunctionConfig;

async fn doctor(functions: Vec<FunctionConfig>, name: &str) -> (i32, String) {
    let emu = emulator(functions).await;
    let endpoint = emu.endpoint.clone();
    let name = name.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(binary())
            .args([
                "doctor",
                "--function",
                &name,
                "--endpoint-url",
                &endpoint,
                "--region",
                "us-east-1",
            ])
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    emu.shutdown().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn a_healthy_function_passes_with_cold_and_warm_latency() {
    let (code, out) = doctor(vec![agent_function("mvm-shard", true)], "mvm-shard").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("healthy"), "{out}");
    assert!(out.contains("ok       memory: 10240 MB"), "{out}");
    assert!(out.contains("PER_TENANT"), "{out}");
    assert!(out.contains("cold ") && out.contains("warm "), "{out}");
}

#[tokio::test]
async fn too_little_memory_is_a_problem() {
    let mut f = agent_function("small", true);
    f.memory_mb = 512;
    let (code, out) = doctor(vec![f], "small").await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("PROBLEM  memory: 512 MB"), "{out}");
    assert!(out.contains("set MemorySize to 10240"), "{out}");
}

#[tokio::test]
async fn a_function_that_does_not_stream_our_log_is_named() {
    let mut f = python_function("buffered", "python_handler.handle");
    f.tenant_isolation = true;
    let (code, out) = doctor(vec![f], "buffered").await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("PROBLEM  streaming"), "{out}");
    assert!(out.contains("mvm-shard agent"), "{out}");
}

#[tokio::test]
async fn a_missing_function_is_named() {
    let (code, out) = doctor(vec![agent_function("mvm-shard", true)], "elsewhere").await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("PROBLEM  function: function elsewhere not found in region us-east-1"),
        "{out}"
    );
    assert!(!out.contains("ServiceError"), "{out}");
}

#[tokio::test]
async fn a_function_without_tenant_isolation_is_a_problem_unless_expected() {
    let (code, out) = doctor(vec![agent_function("shared", false)], "shared").await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("--no-tenant-isolation"), "{out}");
}
