//! Turning what the user asked for into one typed [`ShardRequest`] per
//! selected shard: shard selection, `{index}`/`{count}` substitution,
//! environment, overlay, and where the source travels. Every decision about
//! what a shard gets is made here; the requests are encoded only by the
//! backend that sends them.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;

use crate::dispatch::ShardJob;
use crate::protocol::{
    CacheSpec, RequestError, ShardId, ShardRequest, SourceSpec, MAX_REQUEST_BYTES, PROTOCOL_VERSION,
};

/// A problem with the user's input, found before anything ran (exit 2).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// `--shards 0` or too many.
    #[error("--shards must be between 1 and 10000 (got {0})")]
    ShardCount(u32),
    /// `--max-parallel 0`.
    #[error("--max-parallel must be at least 1")]
    MaxParallel,
    /// `--only` names something that is not a shard.
    #[error("--only {given:?}: {problem}; shards are numbered 1 to {count}")]
    Only {
        /// What was given.
        given: String,
        /// What is wrong with it.
        problem: String,
        /// The shard count.
        count: u32,
    },
    /// `--env NAME` of a variable that is not set here.
    #[error("--env {0}: {0} is not set in this environment; set it, or pass --env {0}=VALUE")]
    EnvUnset(String),
    /// `--mask NAME` of a variable not passed with `--env`.
    #[error("--mask {0}: {0} is not passed to the shards; add --env {0} (or --env {0}=VALUE), or drop --mask {0}")]
    MaskNotForwarded(String),
    /// `--env` with a bad name.
    #[error("--env {0:?}: not a valid environment variable name (letters, digits and _, not starting with a digit)")]
    EnvName(String),
    /// The request does not fit.
    #[error("{0}")]
    Request(#[from] RequestError),
    /// The `{tests_file}` file could not be made.
    #[error("cannot make the {{tests_file}} file: {0}")]
    TestsFile(String),
    /// The `--include` files are too large for a request.
    #[error("the files given with --include are {size} compressed, but a request may carry at most about 4.5 MB (Lambda's 6 MB payload, base64 included): pass --artifacts s3://BUCKET/PREFIX (or set MVM_SHARD_ARTIFACTS) so they travel through S3, or use --local")]
    IncludeTooLarge {
        /// Their archive's size, human-readable.
        size: String,
    },
    /// The source is too large to travel inside the request.
    #[error("the source archive is {size} compressed, but a request may carry at most {limit} (Lambda's 6 MB payload limit, base64 included); pass --artifacts s3://BUCKET/PREFIX (or set MVM_SHARD_ARTIFACTS) so it travels through S3, ship less with --source DIR or .gitignore, or use --local")]
    SourceTooLarge {
        /// Archive size, human-readable.
        size: String,
        /// The budget, human-readable.
        limit: String,
    },
}

/// What to run, as the user asked for it.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Total number of shards the suite is split into.
    pub shards: u32,
    /// The subset to run (`--only`), 1-based; `None` runs all.
    pub only: Option<Vec<u32>>,
    /// The command template.
    pub command: Vec<String>,
    /// Resolved extra environment.
    pub env: BTreeMap<String, String>,
    /// Per-shard timeout.
    pub timeout: Duration,
    /// Where the command runs, relative to the source root.
    pub workdir: String,
    /// Globs of files each shard sends back (JUnit reports).
    pub collect: Vec<String>,
    /// Archives laid over the source (`--include`), inline or behind links.
    pub overlays: Vec<SourceSpec>,
    /// Dependency caches (`--cache`) with their links.
    pub caches: Vec<CacheSpec>,
    /// With `--runner`: each shard's tests (`{tests}`), by shard index - 1.
    pub shares: Option<Vec<Share>>,
    /// With `--runner`: which runner, for what `{tests}` becomes.
    pub runner: Option<crate::runner::RunnerKind>,
}

/// One shard's part of a listed suite.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Share {
    /// The test ids it runs, sorted.
    pub tests: Vec<String>,
    /// How long they are expected to take, in seconds.
    pub expected: f64,
}

/// Splits `tests` (with their `expected` seconds) into `shards` parts:
/// longest first, each into the part with the least expected time so far
/// (fewest tests, then lowest index, on ties). Deterministic for the same
/// inputs; no part is empty while there are at least as many tests as parts.
pub fn balance(tests: &[String], expected: &[f64], shards: u32) -> Vec<Share> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    // Whole microseconds: exact, ordered comparisons, the same on every machine.
    let micros = |s: f64| (s.max(0.0) * 1e6).round() as u64;
    let mut order: Vec<usize> = (0..tests.len()).collect();
    order.sort_by(|&a, &b| {
        micros(expected[b])
            .cmp(&micros(expected[a]))
            .then_with(|| tests[a].cmp(&tests[b]))
    });
    let mut shares = vec![Share::default(); shards as usize];
    let mut loads: BinaryHeap<Reverse<(u64, usize, usize)>> =
        (0..shards as usize).map(|i| Reverse((0, 0, i))).collect();
    for i in order {
        let Some(Reverse((load, count, shard))) = loads.pop() else {
            break;
        };
        shares[shard].tests.push(tests[i].clone());
        shares[shard].expected += expected[i];
        loads.push(Reverse((
            load.saturating_add(micros(expected[i])),
            count + 1,
            shard,
        )));
    }
    for share in &mut shares {
        share.tests.sort();
    }
    shares
}

/// Parses `--only`: a comma-separated list of shard numbers and ranges (`1,3,5-7`).
pub fn parse_only(given: &str, count: u32) -> Result<Vec<u32>, PlanError> {
    let err = |problem: String| PlanError::Only {
        given: given.to_string(),
        problem,
        count,
    };
    let mut picked = Vec::new();
    for part in given.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(err("an empty item".into()));
        }
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let num = |s: &str| {
            s.parse::<u32>()
                .map_err(|_| err(format!("{s:?} is not a shard number")))
        };
        let (lo, hi) = (num(lo)?, num(hi)?);
        if lo == 0 || hi > count || lo > hi {
            return Err(err(format!("{part} is out of range")));
        }
        picked.extend(lo..=hi);
    }
    picked.sort_unstable();
    picked.dedup();
    Ok(picked)
}

/// Resolves `--env NAME` (from `lookup`) and `--env NAME=VALUE`.
pub fn resolve_env(
    args: &[String],
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, String>, PlanError> {
    let mut env = BTreeMap::new();
    for arg in args {
        let (name, value) = match arg.split_once('=') {
            Some((name, value)) => (name, value.to_string()),
            None => (
                arg.as_str(),
                lookup(arg).ok_or_else(|| PlanError::EnvUnset(arg.clone()))?,
            ),
        };
        if !crate::protocol::is_env_name(name) {
            return Err(PlanError::EnvName(name.to_string()));
        }
        env.insert(name.to_string(), value);
    }
    Ok(env)
}

/// Replaces `{index}` and `{count}` in one argument.
pub fn substitute(arg: &str, shard: ShardId) -> String {
    arg.replace("{index}", &shard.index.to_string())
        .replace("{count}", &shard.count.to_string())
}

/// Room a request needs besides the source archive.
fn request_overhead(spec: &RunSpec, run_id: &str) -> Result<usize, PlanError> {
    let probe = request(
        spec,
        run_id,
        ShardId {
            index: spec.shards,
            count: spec.shards,
        },
        SourceSpec::Empty,
    )?;
    Ok(probe.encode()?.len() + 64)
}

/// The largest archive that still fits inline next to the rest of the request.
pub fn inline_budget(spec: &RunSpec, run_id: &str) -> Result<usize, PlanError> {
    let overhead = request_overhead(spec, run_id)?;
    Ok(MAX_REQUEST_BYTES.saturating_sub(overhead) / 4 * 3)
}

/// The `--include` files' archive as a request carries it (base64), if it fits.
pub fn overlay(archive: &[u8]) -> Result<SourceSpec, PlanError> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(archive);
    if encoded.len() > MAX_REQUEST_BYTES - 64 * 1024 {
        return Err(PlanError::IncludeTooLarge {
            size: human_bytes(archive.len() as u64),
        });
    }
    Ok(SourceSpec::Inline { archive: encoded })
}

/// Where the shards' source tree travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Nowhere: each VM fetches the commit from GitHub with a link
    /// resolved at dispatch time.
    Github,
    /// Inside every request (base64).
    Inline,
    /// Too large for a request: through the artifact channel (the S3
    /// store, or loopback with `--local`).
    Channel,
}

/// Decides where a source archive of `size` bytes goes: from GitHub when
/// `from_github`; inline when it fits next to the rest of the request;
/// through the artifact channel when `has_channel`; otherwise it is too
/// large (exit 2).
pub fn place_source(
    spec: &RunSpec,
    run_id: &str,
    size: u64,
    from_github: bool,
    has_channel: bool,
) -> Result<Placement, PlanError> {
    if from_github {
        return Ok(Placement::Github);
    }
    let budget = inline_budget(spec, run_id)?;
    if size <= budget as u64 {
        Ok(Placement::Inline)
    } else if has_channel {
        Ok(Placement::Channel)
    } else {
        Err(PlanError::SourceTooLarge {
            size: human_bytes(size),
            limit: human_bytes(budget as u64),
        })
    }
}

/// An archive as a request carries it inside (base64).
pub fn inline(archive: &[u8]) -> SourceSpec {
    SourceSpec::Inline {
        archive: base64::engine::general_purpose::STANDARD.encode(archive),
    }
}

/// The job that lists the tests: shard 1 of 1 in a fresh environment with
/// the same source, environment and working directory, printing that
/// directory first (the root of the paths some runners print).
pub fn listing_job(
    spec: &RunSpec,
    run_id: &str,
    source: &SourceSpec,
    list_command: &str,
) -> Result<ShardJob, PlanError> {
    let listing = RunSpec {
        shards: 1,
        only: None,
        command: vec![
            "sh".into(),
            "-c".into(),
            format!("pwd && {{\n{list_command}\n}}"),
        ],
        collect: Vec::new(),
        shares: None,
        runner: None,
        ..spec.clone()
    };
    let shard = ShardId { index: 1, count: 1 };
    let request = request(&listing, run_id, shard, source.clone())?;
    request.encode()?;
    Ok(ShardJob { shard, request })
}

/// Builds the jobs: one request per selected shard, checked against the
/// bounds the agent enforces so that bad input stops the run before anything
/// starts.
pub fn jobs(spec: &RunSpec, run_id: &str, source: &SourceSpec) -> Result<Vec<ShardJob>, PlanError> {
    if spec.shards == 0 || spec.shards > 10_000 {
        return Err(PlanError::ShardCount(spec.shards));
    }
    let mut selected: Vec<u32> = match &spec.only {
        Some(only) => only.clone(),
        None => (1..=spec.shards).collect(),
    };
    if let Some(shares) = &spec.shares {
        // A part with no tests has nothing to run (fewer tests than shards).
        selected.retain(|i| !shares[*i as usize - 1].tests.is_empty());
        // The longest expected first, so late work evens out across slots.
        let expected = |i: &u32| shares[*i as usize - 1].expected;
        selected.sort_by(|a, b| expected(b).total_cmp(&expected(a)).then(a.cmp(b)));
    }
    selected
        .into_iter()
        .map(|index| {
            let shard = ShardId {
                index,
                count: spec.shards,
            };
            let request = request(spec, run_id, shard, source.clone())?;
            request.encode()?;
            Ok(ShardJob { shard, request })
        })
        .collect()
}

/// The job that runs `shard` again (`--retries`): with `tests`, only those
/// in `{tests}`; else the shard's command as first planned.
pub fn rerun_job(
    spec: &RunSpec,
    run_id: &str,
    source: &SourceSpec,
    shard: ShardId,
    tests: Option<&[String]>,
) -> Result<ShardJob, PlanError> {
    let request = match tests {
        Some(tests) => request_for(spec, run_id, shard, source.clone(), Some(tests))?,
        None => request(spec, run_id, shard, source.clone())?,
    };
    request.encode()?;
    Ok(ShardJob { shard, request })
}

fn request(
    spec: &RunSpec,
    run_id: &str,
    shard: ShardId,
    source: SourceSpec,
) -> Result<ShardRequest, PlanError> {
    let tests = spec.shares.as_ref().map(|shares| {
        shares
            .get(shard.index as usize - 1)
            .map_or(&[][..], |s| &s.tests[..])
    });
    request_for(spec, run_id, shard, source, tests)
}

/// The request for `shard`, with `tests` in the command's `{tests}`, or in
/// the file `{tests_file}` names, laid over the source (with `--runner`).
fn request_for(
    spec: &RunSpec,
    run_id: &str,
    shard: ShardId,
    source: SourceSpec,
    tests: Option<&[String]>,
) -> Result<ShardRequest, PlanError> {
    // `{index}` and `{count}` are replaced in the template before the test
    // ids go in, so that an id containing them (`t/{index}.sh`) stays itself.
    let template: Vec<String> = spec.command.iter().map(|a| substitute(a, shard)).collect();
    let command = match tests {
        Some(tests) => {
            let words = match spec.runner {
                Some(kind) => {
                    let listed = spec.shares.iter().flatten().flat_map(|s| &s.tests);
                    kind.selection(tests, listed)
                }
                None => tests.to_vec(),
            };
            crate::runner::select(&template, &words)
        }
        None => template,
    };
    let mut overlays = spec.overlays.clone();
    if let (Some(tests), true) = (tests, crate::runner::uses_tests_file(&spec.command)) {
        let path = std::path::Path::new(&spec.workdir).join(crate::runner::TESTS_FILE);
        let archive = one_file_archive(&path, &crate::runner::tests_file(tests))
            .map_err(|e| PlanError::TestsFile(e.to_string()))?;
        overlays.push(inline(&archive));
    }
    Ok(ShardRequest {
        version: PROTOCOL_VERSION,
        run_id: run_id.to_string(),
        shard,
        command,
        env: spec.env.clone(),
        timeout_ms: spec.timeout.as_millis().min(u64::MAX as u128) as u64,
        workdir: spec.workdir.clone(),
        source,
        collect: spec.collect.clone(),
        overlays,
        caches: spec.caches.clone(),
    })
}

/// A tar.zst archive of one file, readable by everyone.
fn one_file_archive(path: &std::path::Path, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(zstd::Encoder::new(Vec::new(), 3)?);
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    builder.append_data(&mut header, path, data)?;
    builder.into_inner()?.finish()
}

/// Bytes, in the units people read (KiB, MiB).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_accepts_lists_and_ranges() {
        assert_eq!(parse_only("1,3", 4).unwrap(), vec![1, 3]);
        assert_eq!(parse_only("2-4,1,2", 4).unwrap(), vec![1, 2, 3, 4]);
    }

    #[test]
    fn only_refuses_what_is_not_a_shard() {
        for bad in ["5", "0", "1,,2", "a", "3-2", "1-9"] {
            let e = parse_only(bad, 4).unwrap_err();
            assert!(e.to_string().contains("1 to 4"), "{bad}: {e}");
        }
    }

    #[test]
    fn env_forwards_and_sets() {
        let env = resolve_env(&["A".into(), "B=x=y".into()], |n| {
            (n == "A").then(|| "from-here".into())
        })
        .unwrap();
        assert_eq!(env["A"], "from-here");
        assert_eq!(env["B"], "x=y");
        assert_eq!(
            resolve_env(&["MISSING".into()], |_| None),
            Err(PlanError::EnvUnset("MISSING".into()))
        );
        assert!(matches!(
            resolve_env(&["1X=2".into()], |_| None),
            Err(PlanError::EnvName(_))
        ));
    }

    #[test]
    fn placeholders_are_replaced_per_shard() {
        let spec = RunSpec {
            shards: 3,
            only: Some(vec![2]),
            command: vec!["echo".into(), "{index}/{count}".into()],
            env: BTreeMap::new(),
            timeout: Duration::from_secs(60),
            workdir: String::new(),
            collect: Vec::new(),
            overlays: Vec::new(),
            caches: Vec::new(),
            shares: None,
            runner: None,
        };
        let jobs = jobs(&spec, "run", &SourceSpec::Empty).unwrap();
        assert_eq!(jobs.len(), 1);
        let req = &jobs[0].request;
        assert_eq!(req.command, vec!["echo", "2/3"]);
        assert_eq!(req.shard, ShardId { index: 2, count: 3 });
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("t{i:03}")).collect()
    }

    #[test]
    fn balance_puts_the_longest_test_alone_and_evens_out_the_rest() {
        let tests = ids(41);
        let mut expected = vec![0.05; 41];
        expected[7] = 3.0;
        let shares = balance(&tests, &expected, 4);
        let longest = shares.iter().find(|s| s.tests.contains(&tests[7])).unwrap();
        assert_eq!(longest.tests.len(), 1, "the 3 s test runs alone");
        let others: Vec<f64> = shares
            .iter()
            .filter(|s| s.tests.len() > 1)
            .map(|s| s.expected)
            .collect();
        assert_eq!(others.len(), 3);
        for o in &others {
            assert!((o - 40.0 * 0.05 / 3.0).abs() < 0.051, "{others:?}");
        }
        // A partition: every test exactly once.
        let mut all: Vec<String> = shares.iter().flat_map(|s| s.tests.clone()).collect();
        all.sort();
        assert_eq!(all, tests);
        assert_eq!(balance(&tests, &expected, 4), shares, "deterministic");
    }

    #[test]
    fn balance_takes_absurd_durations_in_its_stride() {
        let shares = balance(&ids(4), &[1e308, 1e308, f64::MAX, -1.0], 2);
        let mut all: Vec<String> = shares.iter().flat_map(|s| s.tests.clone()).collect();
        all.sort();
        assert_eq!(all, ids(4));
    }

    #[test]
    fn balance_leaves_no_part_empty_while_tests_remain() {
        let shares = balance(&ids(3), &[0.0, 0.0, 5.0], 3);
        assert!(shares.iter().all(|s| s.tests.len() == 1), "{shares:?}");
        let shares = balance(&ids(2), &[1.0, 1.0], 3);
        assert_eq!(shares.iter().filter(|s| s.tests.is_empty()).count(), 1);
    }

    #[test]
    fn test_ids_that_look_like_placeholders_reach_the_command_unchanged() {
        let tests = vec![
            "t/{index}.sh".to_string(),
            "t/{count} {tests_file}".to_string(),
        ];
        let spec = RunSpec {
            shards: 1,
            only: None,
            command: vec![
                "run".into(),
                "{tests}".into(),
                "{index}/{count}: {tests}".into(),
            ],
            env: BTreeMap::new(),
            timeout: Duration::from_secs(60),
            workdir: String::new(),
            collect: Vec::new(),
            overlays: Vec::new(),
            caches: Vec::new(),
            shares: Some(balance(&tests, &[1.0, 1.0], 1)),
            runner: None,
        };
        let jobs = jobs(&spec, "run", &SourceSpec::Empty).unwrap();
        assert_eq!(
            jobs[0].request.command,
            vec![
                "run",
                "t/{count} {tests_file}",
                "t/{index}.sh",
                "1/1: 't/{count} {tests_file}' 't/{index}.sh'"
            ]
        );
    }

    #[test]
    fn runner_jobs_skip_empty_parts_and_start_with_the_longest() {
        let spec = RunSpec {
            shards: 3,
            only: None,
            command: vec!["pytest".into(), "{tests}".into()],
            env: BTreeMap::new(),
            timeout: Duration::from_secs(60),
            workdir: String::new(),
            collect: Vec::new(),
            overlays: Vec::new(),
            caches: Vec::new(),
            shares: Some(balance(&ids(2), &[1.0, 4.0], 3)),
            runner: None,
        };
        let jobs = jobs(&spec, "run", &SourceSpec::Empty).unwrap();
        let commands: Vec<_> = jobs.iter().map(|j| j.request.command.clone()).collect();
        assert_eq!(
            commands,
            vec![vec!["pytest", "t001"], vec!["pytest", "t000"]]
        );
    }
}
