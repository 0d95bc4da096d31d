//! Prints the invoker's per-shard overhead on no-op shards and the end-to-end
//! log throughput of one shard printing a large output, through the real SDK,
//! the emulator and the agent. A benchmark that prints figures, not a test.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mvm_shard::backend::{Backend, LambdaBackend, LambdaOptions};
use mvm_shard::dispatch::{self, DispatchOptions, RunEvent, ShardJob};
use mvm_shard::emulator::{EmulatorConfig, FunctionConfig, RunningEmulator};
use mvm_shard::protocol::{ShardId, ShardRequest};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn function(name: &str, tenant_isolation: bool) -> FunctionConfig {
    let mut f = FunctionConfig::new(
        name,
        vec![env!("CARGO_BIN_EXE_mvm-shard").into(), "agent".into()],
    );
    f.tenant_isolation = tenant_isolation;
    f
}

fn job(script: &str, index: u32, count: u32) -> ShardJob {
    let request = ShardRequest::new(
        "bench",
        ShardId { index, count },
        vec!["sh".into(), "-c".into(), script.into()],
        600_000,
    );
    ShardJob {
        shard: request.shard,
        request,
    }
}

async fn backend(endpoint: &str, name: &str, tenant_isolation: bool) -> Arc<dyn Backend> {
    Arc::new(
        LambdaBackend::connect(LambdaOptions {
            function: name.into(),
            endpoint_url: Some(endpoint.into()),
            region: Some("us-east-1".into()),
            tenant_isolation,
            local_credentials: true,
        })
        .await
        .unwrap(),
    )
}

/// Runs `jobs` and returns (wall time, output bytes received, exit code).
async fn timed(
    backend: Arc<dyn Backend>,
    jobs: Vec<ShardJob>,
    max_parallel: usize,
) -> (Duration, u64, i32) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let counter = tokio::spawn(async move {
        let mut bytes = 0u64;
        while let Some(event) = rx.recv().await {
            if let RunEvent::Output { data, .. } = event {
                bytes += data.len() as u64;
            }
        }
        bytes
    });
    let options = DispatchOptions {
        max_parallel,
        ..DispatchOptions::default()
    };
    let start = Instant::now();
    let summary = dispatch::dispatch(
        backend,
        "bench",
        jobs,
        &options,
        tx,
        CancellationToken::new(),
    )
    .await;
    let wall = start.elapsed();
    (wall, counter.await.unwrap(), summary.exit_code())
}

#[tokio::main]
async fn main() {
    let emu = RunningEmulator::start(EmulatorConfig {
        functions: vec![function("cold", true), function("warm", false)],
        region: "us-east-1".into(),
        microvm_images: Vec::new(),
        microvm_faults: Default::default(),
        throttle_streams: false,
        lambda_faults: Default::default(),
    })
    .await
    .unwrap();

    const SHARDS: u32 = 40;
    for (name, isolated, label) in [
        (
            "cold",
            true,
            "cold environment per shard (tenant isolation)",
        ),
        ("warm", false, "warm environment reused"),
    ] {
        let backend = backend(&emu.endpoint, name, isolated).await;
        // One warm-up round, not measured.
        timed(backend.clone(), vec![job("true", 1, 1)], 1).await;
        let jobs = (1..=SHARDS).map(|i| job("true", i, SHARDS)).collect();
        let (wall, _, code) = timed(backend, jobs, 1).await;
        assert_eq!(code, 0);
        println!(
            "per-shard overhead, no-op shards one at a time, {label}: {:.1} ms",
            wall.as_secs_f64() * 1000.0 / SHARDS as f64
        );
    }

    let backend = backend(&emu.endpoint, "warm", false).await;
    for (label, script, expected) in [
        (
            "log-like lines (compressible)",
            "yes 'test foo::bar::baz ... ok (0.01s) some typical log line 0123456789' | head -c 200000000",
            200_000_000u64,
        ),
        (
            "base64 of random bytes (barely compressible)",
            "head -c 75000000 /dev/urandom | base64 -w 100",
            101_000_000,
        ),
    ] {
        let (wall, bytes, code) = timed(backend.clone(), vec![job(script, 1, 1)], 1).await;
        assert_eq!(code, 0);
        assert!(bytes >= expected, "received {bytes} of {expected}");
        println!(
            "log throughput, one shard, {label}: {:.0} MB in {:.2} s = {:.0} MB/s",
            bytes as f64 / 1e6,
            wall.as_secs_f64(),
            bytes as f64 / 1e6 / wall.as_secs_f64()
        );
    }
    emu.shutdown().await.unwrap();
}
