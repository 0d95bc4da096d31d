//! What a run costs on Lambda, estimated from what each shard's agent
//! reported of its environment ([`Resources`]) and how long it ran: memory ×
//! time for functions (GB-seconds), vCPU and memory over time for MicroVMs.
//! Dollar amounts are given only where AWS publishes a plain rate.

use crate::dispatch::RunSummary;
use crate::protocol::{Platform, Resources};

/// Lambda's published on-demand price per GB-second in us-east-1, first
/// pricing tier, for x86_64 functions.
pub const PRICE_PER_GB_SECOND_X86_64: f64 = 0.000_016_666_7;
/// The same for arm64 (Graviton) functions.
pub const PRICE_PER_GB_SECOND_ARM64: f64 = 0.000_013_333_4;
/// Lambda's published price per request in us-east-1 ($0.20 per million).
pub const PRICE_PER_REQUEST: f64 = 0.000_000_2;

/// The estimate for one run.
#[derive(Debug, Clone, PartialEq)]
pub struct CostEstimate {
    /// Functions or MicroVMs (from the first shard that reported).
    pub platform: Platform,
    /// The local emulator ran the shards: nothing was billed.
    pub emulated: bool,
    /// `x86_64` or `aarch64`.
    pub arch: String,
    /// Shards whose environment and duration are known.
    pub shards: usize,
    /// Shards that sent no result, so are not counted.
    pub unknown: usize,
    /// Memory × duration, summed over shards.
    pub gb_seconds: f64,
    /// vCPUs × duration, summed over shards (what MicroVMs are billed by).
    pub vcpu_seconds: f64,
}

/// Adds up what the shards that reported used: each shard's configured
/// memory (and vCPUs) times the time its agent spent on it (setup and
/// command). `None` when no shard reported its environment.
pub fn estimate(summary: &RunSummary) -> Option<CostEstimate> {
    let mut first: Option<&Resources> = None;
    let (mut shards, mut unknown) = (0, 0);
    let (mut gb_seconds, mut vcpu_seconds) = (0.0, 0.0);
    for record in &summary.records {
        let Some((result, resources)) = record
            .result
            .as_ref()
            .and_then(|r| r.resources.as_ref().map(|res| (r, res)))
        else {
            unknown += 1;
            continue;
        };
        first.get_or_insert(resources);
        shards += 1;
        let seconds = (result.setup_ms + result.duration_ms) as f64 / 1000.0;
        gb_seconds += f64::from(resources.memory_mb) / 1024.0 * seconds;
        vcpu_seconds += f64::from(resources.vcpus) * seconds;
    }
    let first = first?;
    Some(CostEstimate {
        platform: first.platform,
        emulated: first.emulated,
        arch: first.arch.clone(),
        shards,
        unknown,
        gb_seconds,
        vcpu_seconds,
    })
}

impl CostEstimate {
    /// The estimate in one line: the billed measure, and a price where AWS
    /// publishes one (naming the region and architecture it assumes).
    pub fn describe(&self) -> String {
        let not_counted = match self.unknown {
            0 => String::new(),
            n => format!(
                "; {} without a result not counted",
                super::plural(n, "shard")
            ),
        };
        let measure = match self.platform {
            Platform::LambdaFunction => {
                let (price, arch) = if self.arch == "aarch64" {
                    (PRICE_PER_GB_SECOND_ARM64, "arm64")
                } else {
                    (PRICE_PER_GB_SECOND_X86_64, "x86_64")
                };
                let dollars = self.gb_seconds * price + self.shards as f64 * PRICE_PER_REQUEST;
                format!(
                    "{:.1} GB-s over {} ≈ ${dollars:.4} at Lambda's {arch} list price in us-east-1 (${price} per GB-s, $0.20 per million requests)",
                    self.gb_seconds,
                    super::plural(self.shards, "shard"),
                )
            }
            Platform::Microvm => format!(
                "{:.1} vCPU-s and {:.1} GB-s of MicroVM time over {} (rates: the Lambda pricing page)",
                self.vcpu_seconds,
                self.gb_seconds,
                super::plural(self.shards, "shard"),
            ),
        };
        if self.emulated {
            format!("cost: nothing (local emulator); on Lambda: {measure}{not_counted}")
        } else {
            format!("cost: {measure}{not_counted}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::{ShardRecord, ShardStatus};
    use crate::protocol::{Outcome, ShardId, ShardResult};
    use std::time::Duration;

    fn record(index: u32, resources: Option<Resources>, ms: u64) -> ShardRecord {
        let mut result = ShardResult::not_run(Outcome::Exited { code: 0 });
        result.setup_ms = 100;
        result.duration_ms = ms - 100;
        result.resources = resources;
        ShardRecord {
            shard: ShardId { index, count: 3 },
            status: ShardStatus::Passed,
            duration: Duration::from_millis(ms + 50),
            attempts: 1,
            result: Some(result),
            files: Vec::new(),
        }
    }

    fn function(memory_mb: u32, arch: &str) -> Resources {
        Resources {
            platform: Platform::LambdaFunction,
            emulated: false,
            memory_mb,
            vcpus: 6,
            arch: arch.into(),
        }
    }

    #[test]
    fn functions_are_priced_per_gb_second_and_request() {
        let summary = RunSummary {
            stopped_by: None,
            records: vec![
                record(1, Some(function(10_240, "x86_64")), 180_000),
                record(2, Some(function(10_240, "x86_64")), 60_000),
                record(3, None, 1_000),
            ],
        };
        let cost = estimate(&summary).unwrap();
        assert_eq!((cost.shards, cost.unknown), (2, 1));
        assert!((cost.gb_seconds - 2_400.0).abs() < 1e-6, "{cost:?}");
        let line = cost.describe();
        // 2,400 GB-s × $0.0000166667 + 2 requests × $0.0000002 = $0.0400
        assert!(line.starts_with("cost: 2400.0 GB-s over 2 shards ≈ $0.0400 at Lambda's x86_64 list price in us-east-1"), "{line}");
        assert!(
            line.ends_with("; 1 shard without a result not counted"),
            "{line}"
        );
    }

    #[test]
    fn arm64_microvms_and_the_emulator_are_told_apart() {
        let arm = RunSummary {
            stopped_by: None,
            records: vec![record(1, Some(function(2_048, "aarch64")), 1_000)],
        };
        assert!(estimate(&arm)
            .unwrap()
            .describe()
            .contains("≈ $0.0000 at Lambda's arm64 list price"));
        let mut vm = function(32_768, "x86_64");
        vm.platform = Platform::Microvm;
        vm.vcpus = 16;
        vm.emulated = true;
        let line = estimate(&RunSummary {
            stopped_by: None,
            records: vec![record(1, Some(vm), 10_000)],
        })
        .unwrap()
        .describe();
        assert_eq!(line, "cost: nothing (local emulator); on Lambda: 160.0 vCPU-s and 320.0 GB-s of MicroVM time over 1 shard (rates: the Lambda pricing page)");
        assert_eq!(
            estimate(&RunSummary {
                stopped_by: None,
                records: vec![record(1, None, 1_000)]
            }),
            None
        );
    }
}
