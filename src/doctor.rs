//! `mvm-shard doctor`: checks a deployment from the user's machine or
//! workflow (credentials, region, the function and its configuration, a real
//! no-op shard round trip with cold and warm latency) and says what to fix.

use std::time::{Duration, Instant};

use crate::backend::errors::classify;

use crate::backend::{Backend, LambdaBackend, ShardInvocation};
use crate::dispatch::{self, status_of, ShardStatus};
use crate::protocol::{ShardId, ShardRequest};

/// Memory below one full vCPU (Lambda gives one per 1,769 MB).
const MIN_MEMORY_MB: i32 = 1769;
/// What the deployment template sets: 6 vCPU.
const RECOMMENDED_MEMORY_MB: i32 = 10_240;
/// Below this, typical test shards run out of time.
const MIN_TIMEOUT_S: i32 = 300;

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Fine.
    Ok,
    /// Works, but not as recommended.
    Warning,
    /// Shards will not run (well) until this is fixed.
    Problem,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Check {
    /// Verdict.
    pub verdict: Verdict,
    /// What was checked.
    pub name: &'static str,
    /// What was found, and what to do.
    pub detail: String,
}

fn check(verdict: Verdict, name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        verdict,
        name,
        detail: detail.into(),
    }
}

/// Runs every check against the function behind `backend`.
pub async fn diagnose(backend: &LambdaBackend, tenant_isolation: bool) -> Vec<Check> {
    let mut checks = vec![check(Verdict::Ok, "credentials and region", "resolved")];
    let config = match backend
        .client()
        .get_function_configuration()
        .function_name(backend.function())
        .send()
        .await
    {
        Ok(config) => config,
        Err(e) => {
            let error = classify(&e, &backend.target(), &[], &[], true);
            checks.push(check(Verdict::Problem, "function", error.message));
            return checks;
        }
    };
    checks.push(check(
        Verdict::Ok,
        "function",
        format!(
            "{} ({})",
            config.function_arn().unwrap_or(backend.function()),
            config
                .state()
                .map_or("unknown state".to_string(), |s| s.as_str().to_string())
        ),
    ));
    let memory = config.memory_size().unwrap_or(0);
    checks.push(match memory {
        m if m < MIN_MEMORY_MB => check(
            Verdict::Problem,
            "memory",
            format!("{m} MB gives shards less than one vCPU: set MemorySize to {RECOMMENDED_MEMORY_MB} (6 vCPU), as the template does"),
        ),
        m if m < RECOMMENDED_MEMORY_MB => check(
            Verdict::Warning,
            "memory",
            format!("{m} MB ({:.1} vCPU); {RECOMMENDED_MEMORY_MB} MB gives 6 vCPU", m as f64 / 1769.0),
        ),
        m => check(Verdict::Ok, "memory", format!("{m} MB (6 vCPU)")),
    });
    let timeout = config.timeout().unwrap_or(0);
    checks.push(if timeout < MIN_TIMEOUT_S {
        check(
            Verdict::Warning,
            "timeout",
            format!("{timeout} s: shards are cut at the function's timeout; set Timeout to 900"),
        )
    } else {
        check(Verdict::Ok, "timeout", format!("{timeout} s"))
    });
    let isolated = config.tenancy_config().is_some();
    checks.push(match (isolated, tenant_isolation) {
        (true, true) => check(Verdict::Ok, "tenant isolation", "PER_TENANT: every shard gets an environment of its own"),
        (false, false) => check(
            Verdict::Warning,
            "tenant isolation",
            "off: Lambda may reuse an environment for a later shard (the agent wipes it, but it is not fresh); the template turns it on",
        ),
        (true, false) => check(
            Verdict::Problem,
            "tenant isolation",
            "the function requires a tenant id: drop --no-tenant-isolation",
        ),
        (false, true) => check(
            Verdict::Problem,
            "tenant isolation",
            "the function is not in tenant isolation mode, so calls with a tenant id fail: redeploy with the template, or pass --no-tenant-isolation",
        ),
    });
    if checks
        .iter()
        .any(|c| c.verdict == Verdict::Problem && c.name == "tenant isolation")
    {
        return checks;
    }
    checks.push(round_trip(backend).await);
    checks
}

/// Two no-op shards in one tenant's environment: the first cold, the second warm.
async fn round_trip(backend: &LambdaBackend) -> Check {
    let request = ShardRequest::new(
        "doctor",
        ShardId { index: 1, count: 1 },
        vec!["true".into()],
        60_000,
    );
    let invocation = ShardInvocation {
        shard: request.shard,
        attempt: 1,
        run_id: format!("doctor-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        request,
    };
    let mut latencies = Vec::new();
    for _ in 0..2 {
        let started = Instant::now();
        let stream = match backend.invoke(&invocation).await {
            Ok(stream) => stream,
            Err(e) => {
                return check(
                    Verdict::Problem,
                    "no-op shard",
                    format!("the invocation failed: {e}"),
                )
            }
        };
        let (events, mut drain) = dispatch::event_channel();
        let drained = tokio::spawn(async move { while drain.recv().await.is_some() {} });
        let received = dispatch::consume(invocation.shard, stream, &events).await;
        drop(events);
        let _ = drained.await;
        match status_of(received.result.as_ref(), received.failure.clone()) {
            ShardStatus::Passed => latencies.push(started.elapsed()),
            ShardStatus::InfraFailed { reason } if reason.contains("not an mvm-shard frame stream") => {
                return check(
                    Verdict::Problem,
                    "streaming",
                    "the function does not answer with a streamed mvm-shard log: its image's bootstrap must be `mvm-shard agent` (lambda-image/Dockerfile)",
                )
            }
            other => return check(Verdict::Problem, "no-op shard", format!("did not pass: {}", other.describe())),
        }
    }
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    check(
        Verdict::Ok,
        "no-op shard",
        format!(
            "streamed and passed: cold {}, warm {}",
            ms(latencies[0]),
            ms(latencies[1])
        ),
    )
}

/// Prints the report; returns the exit status (0 healthy, 1 a problem found).
pub fn print(checks: &[Check]) -> i32 {
    for c in checks {
        let mark = match c.verdict {
            Verdict::Ok => "ok     ",
            Verdict::Warning => "warning",
            Verdict::Problem => "PROBLEM",
        };
        println!("{mark}  {}: {}", c.name, c.detail);
    }
    let problems = checks
        .iter()
        .filter(|c| c.verdict == Verdict::Problem)
        .count();
    if problems == 0 {
        println!("healthy: the function is ready to run shards");
        0
    } else {
        println!("{problems} problem(s) found: fix them and run `mvm-shard doctor` again");
        1
    }
}
