//! The soak: many shards through the real SDK and dispatcher while the
//! emulator injects random faults on its Lambda side (throttles, server
//! errors, agents killed mid-stream, dropped connections, function errors,
//! stalls), and the accounting checked: every shard ends in exactly one
//! state, none passes without its result frame, a shard that passes has
//! every numbered line once and in order, each refused start is retried or
//! given up, each mid-stream fault costs exactly one shard, and the
//! invoker's memory stays flat.
//!
//! `cargo test --test soak` runs a short version; the long one is ignored:
//! `SOAK_SHARDS=10000 cargo test --test soak -- --ignored --nocapture`.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{agent_function, backend, request, start_emulator};
use mvm_shard::dispatch::{self, DispatchOptions, RunEvent, ShardJob, ShardStatus};
use mvm_shard::emulator::{EmulatorConfig, FaultCounts, FaultKind, LambdaFaults};
use mvm_shard::protocol::{Outcome, OutputStream};
use tokio_util::sync::CancellationToken;

/// What to soak.
struct Soak {
    shards: u32,
    parallel: usize,
    /// Numbered lines each shard prints.
    lines: u32,
    faults: LambdaFaults,
}

/// What a soak found.
#[derive(Debug, Default)]
struct Report {
    passed: u64,
    /// Not run after a mid-stream fault (or anything else but give-ups).
    broken: u64,
    /// Not run because every start was refused.
    gave_up: u64,
    /// Any other status (the command always exits 0, so none is expected).
    other: Vec<String>,
    retries: u64,
    faults: FaultCounts,
    wall: Duration,
    /// Resident memory (kB) after 10 % and after 100 % of the shards.
    rss_early_kb: u64,
    rss_end_kb: u64,
    peak_rss_kb: u64,
}

/// A field of `/proc/self/status`, in kB.
fn proc_status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|l| {
                l.strip_prefix(field)?
                    .trim_start_matches(':')
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

/// Runs the soak and checks, shard by shard as they finish, that nothing
/// is lost; returns the tallies for the checks across shards.
async fn soak(soak: Soak) -> Report {
    let mut function = agent_function("soak", false);
    // Throttles come only from the injected faults.
    function.max_concurrency = soak.parallel * 4;
    let emu = start_emulator(EmulatorConfig {
        functions: vec![function],
        region: "us-east-1".into(),
        microvm_images: Vec::new(),
        microvm_faults: Default::default(),
        throttle_streams: false,
        lambda_faults: soak.faults,
    })
    .await;
    let backend = backend(&emu.endpoint, "soak", false).await;
    let script = format!(
        "i=1; while [ $i -le {n} ]; do echo \"line $i of shard $MVM_SHARD_INDEX\"; i=$((i+1)); done",
        n = soak.lines
    );
    let jobs: Vec<ShardJob> = (1..=soak.shards)
        .map(|index| {
            let request = request(&script, index, soak.shards, Duration::from_secs(120));
            ShardJob {
                shard: request.shard,
                request,
            }
        })
        .collect();
    let options = DispatchOptions {
        max_parallel: soak.parallel,
        backoff: Duration::from_millis(20),
        ..DispatchOptions::default()
    };
    let (tx, mut rx) = mvm_shard::dispatch::event_channel();
    let started = Instant::now();
    let shards = soak.shards;
    let lines = soak.lines;
    let checker = tokio::spawn(async move {
        let mut report = Report::default();
        let mut stdout: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
        let mut finished: BTreeMap<u32, u32> = BTreeMap::new();
        while let Some(event) = rx.recv().await {
            match event {
                RunEvent::Output {
                    shard,
                    stream: OutputStream::Stdout,
                    data,
                } => stdout
                    .entry(shard.index)
                    .or_default()
                    .extend_from_slice(&data),
                RunEvent::Retrying { .. } => report.retries += 1,
                RunEvent::Finished(record) => {
                    let index = record.shard.index;
                    *finished.entry(index).or_default() += 1;
                    let out = stdout.remove(&index).unwrap_or_default();
                    match &record.status {
                        ShardStatus::Passed => {
                            let result = record
                                .result
                                .as_ref()
                                .unwrap_or_else(|| panic!("shard {index} passed without a result"));
                            assert_eq!(result.outcome, Outcome::Exited { code: 0 });
                            let expected: String = (1..=lines)
                                .map(|i| format!("line {i} of shard {index}\n"))
                                .collect();
                            assert_eq!(
                                String::from_utf8_lossy(&out),
                                expected,
                                "shard {index} passed with lines lost or repeated"
                            );
                            report.passed += 1;
                        }
                        ShardStatus::InfraFailed { reason } if reason.starts_with("gave up") => {
                            report.gave_up += 1
                        }
                        ShardStatus::InfraFailed { .. } => report.broken += 1,
                        other => report.other.push(format!("{}: {other:?}", record.shard)),
                    }
                    let done = finished.len() as u64;
                    if done == (u64::from(shards) / 10).max(1) {
                        report.rss_early_kb = proc_status_kb("VmRSS");
                    }
                }
                _ => {}
            }
        }
        assert_eq!(finished.len() as u32, shards, "every shard finished");
        assert!(
            finished.values().all(|&n| n == 1),
            "a shard finished twice: {:?}",
            finished.iter().filter(|(_, &n)| n != 1).collect::<Vec<_>>()
        );
        report
    });
    let summary = dispatch::dispatch(
        backend,
        "soak",
        jobs,
        &options,
        tx,
        CancellationToken::new(),
    )
    .await;
    let mut report = checker.await.expect("the checker passes");
    report.wall = started.elapsed();
    report.rss_end_kb = proc_status_kb("VmRSS");
    report.peak_rss_kb = proc_status_kb("VmHWM");
    report.faults = emu.faults_fired();
    let indices: Vec<u32> = summary.records.iter().map(|r| r.shard.index).collect();
    assert_eq!(
        indices,
        (1..=shards).collect::<Vec<_>>(),
        "one record per shard"
    );
    emu.shutdown().await.expect("the emulator stops");
    report
}

/// The checks across shards: every fault is accounted for.
fn check(report: &Report) {
    let f = &report.faults;
    assert!(report.other.is_empty(), "{:?}", report.other);
    let refused = f.of(FaultKind::Throttle) + f.of(FaultKind::ServerError);
    assert_eq!(
        report.retries + report.gave_up,
        refused,
        "every refused start was retried or given up"
    );
    let fatal = f.of(FaultKind::KillAgent)
        + f.of(FaultKind::DropConnection)
        + f.of(FaultKind::FunctionError);
    // A stall past the SDK's grace breaks its stream; a shorter one does not.
    assert!(
        (fatal..=fatal + f.of(FaultKind::Stall)).contains(&report.broken),
        "each mid-stream fault costs exactly one shard: {report:?}"
    );
}

fn print(soak_shards: u32, report: &Report) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "soak: {soak_shards} shards on {cpus} CPUs in {:.1} s",
        report.wall.as_secs_f64()
    );
    for kind in FaultKind::ALL {
        println!("  fault {:<32} {}", kind.name(), report.faults.of(kind));
    }
    println!(
        "  outcomes: {} passed, {} not run after a mid-stream fault, {} gave up after refused starts ({} retries)",
        report.passed, report.broken, report.gave_up, report.retries
    );
    println!(
        "  invoker RSS: {} kB after 10 %, {} kB at the end, peak {} kB",
        report.rss_early_kb, report.rss_end_kb, report.peak_rss_kb
    );
}

fn rates(seed: u64, stall: f64) -> LambdaFaults {
    LambdaFaults {
        seed,
        throttle: 0.05,
        server_error: 0.05,
        kill_agent: 0.05,
        drop_connection: 0.05,
        function_error: 0.05,
        stall,
        // Shards' streams are about this long, so most mid-stream faults fire.
        byte_range: 400,
        ..LambdaFaults::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_under_random_faults_loses_nothing() {
    let shards = 60;
    let report = tokio::time::timeout(
        Duration::from_secs(120),
        soak(Soak {
            shards,
            parallel: 8,
            lines: 20,
            // Short stalls only (the long ones outlast the SDK's 20 s grace):
            // the stream must go on after them with nothing lost.
            faults: LambdaFaults {
                stall_for: Duration::from_millis(300),
                ..rates(12, 0.05)
            },
        }),
    )
    .await
    .expect("the soak ends in time");
    print(shards, &report);
    check(&report);
    assert!(report.faults.total() > 0, "faults were injected");
    assert!(report.passed > 0, "shards passed");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "long: SOAK_SHARDS=10000 cargo test --test soak -- --ignored --nocapture"]
async fn a_long_soak_under_random_faults_loses_nothing_and_stays_flat() {
    let var = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let shards = var("SOAK_SHARDS", 10_000) as u32;
    let parallel = var("SOAK_PARALLEL", 32) as usize;
    let seed = var("SOAK_SEED", 1);
    let report = soak(Soak {
        shards,
        parallel,
        lines: 20,
        faults: rates(seed, 0.002),
    })
    .await;
    print(shards, &report);
    check(&report);
    // Flat: what the invoker holds does not grow with the shards run.
    assert!(
        report.rss_end_kb < report.rss_early_kb + 64 * 1024,
        "memory grew: {report:?}"
    );
}
