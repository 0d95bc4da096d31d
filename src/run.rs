//! One `mvm-shard run`, stage by stage: plan (what each shard gets), connect
//! (the backend, and the local emulator with `--local`), list (with
//! `--runner`: the tests, then their split by learned duration), dispatch
//! (with the reporter consuming its events), report (the merged JUnit and the
//! summary), learn (with `--runner`: the tests' durations).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::artifacts::{ArtifactError, CacheArg, Channel, PackedArchive};
use crate::backend::lambda::LambdaConfigError;
use crate::backend::{
    Backend, InvokeError, LambdaBackend, LambdaOptions, MicrovmBackend, MicrovmOptions, Released,
};
use crate::cli::{RunArgs, SourceFrom};
use crate::dispatch::{
    self, DispatchOptions, RunEvent, RunSummary, ShardJob, ShardRecord, ShardStatus,
};
use crate::emulator::{
    EmulatorConfig, FunctionConfig, MicrovmImageConfig, RunningEmulator, DEFAULT_FUNCTION,
};
use crate::github::TarballLinks;
use crate::lambda_fit;
use crate::local_env::LocalEnvironment;
use crate::plan::{self, human_bytes, Placement, PlanError, RunSpec, Share};
use crate::protocol::{OutputStream, ShardId, SourceSpec};
use crate::replay::{RecordedPlan, ReplayError};
use crate::report::github::GithubFiles;
use crate::report::junit::{GoModule, TestReport};
use crate::report::{GithubReporter, Reporter, TerminalReporter};
use crate::runner::timings::{TimingsError, TimingsFile};
use crate::runner::{
    Adapter, LogScanner, Results, RunnerError, RunnerKind, Timings, JEST_REPORT_PATH,
};
use crate::shutdown::{Shutdown, Signal};
use crate::source::{SourceArchive, SourceError};

/// Why `run` stopped before it could report shards.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad input (exit 2).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Bad AWS configuration (exit 2).
    #[error(transparent)]
    Config(#[from] LambdaConfigError),
    /// The source could not be packed (exit 2).
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The artifact store refused or failed (exit 2 when it is configuration).
    #[error(transparent)]
    Artifacts(#[from] ArtifactError),
    /// The runner is misconfigured or its listing failed (exit 2).
    #[error(transparent)]
    Runner(#[from] RunnerError),
    /// The timings file cannot be read (exit 2).
    #[error(transparent)]
    Timings(#[from] TimingsError),
    /// The plan to replay cannot be used (exit 2).
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// The tests could not be listed for a reason of the backend (exit 3).
    #[error("listing the tests: {0}")]
    ListingNotRun(String),
    /// The GitHub source is misconfigured (exit 2).
    #[error("--source-from github: {0}")]
    Github(String),
    /// The service answered a configuration mistake before any shard
    /// started (exit 2).
    #[error(transparent)]
    Invoke(#[from] InvokeError),
    /// The run stopped at a configuration mistake a shard's start was
    /// answered with (exit 2); no shard started after it.
    #[error("{error} (the run stopped there: {})", not_run(summary))]
    Stopped {
        /// The mistake.
        error: InvokeError,
        /// What had happened by then.
        summary: Box<RunSummary>,
    },
    /// Something local failed (exit 3).
    #[error("{0}")]
    Local(String),
}

/// `3 of 4 shards did not run, 1 passed`.
fn not_run(summary: &RunSummary) -> String {
    let passed = summary.count(|s| *s == ShardStatus::Passed);
    let not_run = summary.count(|s| matches!(s, ShardStatus::InfraFailed { .. }));
    let mut said = format!(
        "{not_run} of {} did not run",
        crate::report::plural(summary.records.len(), "shard")
    );
    if passed > 0 {
        said.push_str(&format!(", {passed} passed"));
    }
    let other = summary.records.len() - passed - not_run;
    if other > 0 {
        let were = if other == 1 { "was" } else { "were" };
        said.push_str(&format!(", {other} failed or {were} interrupted"));
    }
    said
}

impl RunError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Local(_) | RunError::ListingNotRun(_) => 3,
            RunError::Artifacts(e) if !e.is_config() => 3,
            _ => 2,
        }
    }

    /// What had happened when the run stopped, if any shard was dispatched.
    pub fn summary(&self) -> Option<&RunSummary> {
        match self {
            RunError::Stopped { summary, .. } => Some(summary),
            _ => None,
        }
    }
}

/// Shards in flight at once: `--max-parallel`, else 64 on Lambda and the CPU count locally.
fn max_parallel(args: &RunArgs) -> usize {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    args.max_parallel
        .unwrap_or(if args.local { cpus.max(2) } else { 64 })
}

/// `mvm-shard run`: returns the exit status (0, 1 or 3).
pub async fn run(args: RunArgs) -> Result<i32, RunError> {
    let mut planned = plan_run(&args).await?;
    let max_parallel = max_parallel(&args);
    let target = connect(&args, &planned.archive.root, max_parallel).await?;
    let outcome = run_on(&args, &mut planned, &target, max_parallel).await;
    if !matches!(outcome, Ok(RunOn::Ran { .. })) {
        // The listing may have started something; nothing may outlive the run.
        tell_released(&target.backend.shutdown().await, None);
    }
    if let Some(emulator) = target.emulator {
        let _ = emulator.shutdown().await;
    }
    planned.channel.shutdown().await;
    let (summary, left_running, failed_fast, code_floor) = match outcome? {
        RunOn::Planned => return Ok(0),
        RunOn::Ran {
            summary,
            left_running,
            failed_fast,
            code_floor,
        } => (summary, left_running, failed_fast, code_floor),
    };
    if let Some(error) = summary.stopped_by.clone() {
        // Told once, by the caller, with what had happened by then.
        return Err(RunError::Stopped {
            error,
            summary: Box::new(summary),
        });
    }
    let code = match failed_fast {
        // Stopped on purpose after a failure: the run failed, nothing broke.
        Some(_) if summary.count(|s| matches!(s, ShardStatus::InfraFailed { .. })) == 0 => 1,
        _ => summary.exit_code(),
    };
    let code = code.max(code_floor);
    Ok(if left_running { code.max(3) } else { code })
}

/// How the stages that need the backend ended.
enum RunOn {
    /// `--plan-only`: the plan was written, no shard ran.
    Planned,
    /// The shards ran.
    Ran {
        /// Every shard's record.
        summary: RunSummary,
        /// Something may still be running.
        left_running: bool,
        /// The shard `--fail-fast` stopped the run at.
        failed_fast: Option<ShardId>,
        /// The least exit status (1 with `--no-flaky` and a flaky test).
        code_floor: i32,
    },
}

/// The stages that need the backend: list and plan the tests (with
/// `--runner`), dispatch and report, learn.
async fn run_on(
    args: &RunArgs,
    planned: &mut PlannedRun,
    target: &Target,
    max_parallel: usize,
) -> Result<RunOn, RunError> {
    // From here on SIGINT and SIGTERM no longer end the process by
    // themselves: the listing, like the shards, is stopped and released.
    let shutdown = Shutdown::from_os()
        .map_err(|e| RunError::Local(format!("cannot handle SIGINT and SIGTERM: {e}")))?;
    let shares = match (&planned.suite, &planned.replayed) {
        (Some(suite), Some(replayed)) => {
            // The plan's tests are the listing it was made from.
            let tests = replayed.tests();
            if let Ok(mut log) = suite.log.lock() {
                log.expect(&tests);
            }
            Some((tests, planned.spec.shares.clone().unwrap_or_default()))
        }
        (Some(suite), None) => {
            let tests = list_tests(args, planned, suite, target, &shutdown).await?;
            let shares = plan_suite(args, planned, &tests)?;
            Some((tests, shares))
        }
        (None, _) => None,
    };
    if let Some(path) = &args.plan_only {
        publish_plan(args, planned, path)?;
        return Ok(RunOn::Planned);
    }
    if let (Some(replayed), Some(path)) = (&planned.replayed, &args.replay_plan) {
        eprintln!(
            "mvm-shard: replaying plan {} ({})",
            replayed.run_id,
            path.display()
        );
    }
    let source = match &planned.github {
        // Nothing was packed here: each shard fetches the commit itself.
        Some(_) => {
            let var = |name: &str| std::env::var(name).unwrap_or_default();
            let sha = var("GITHUB_SHA");
            let short = sha.get(..7).unwrap_or(&sha);
            format!(
                "{}@{short} (a GitHub tarball each shard fetches)",
                var("GITHUB_REPOSITORY")
            )
        }
        None => format!(
            "{} ({}, {})",
            planned.archive.root.display(),
            crate::report::plural(planned.archive.entries, "file"),
            human_bytes(planned.archive.size()),
        ),
    };
    let source: String = std::iter::once(source)
        .chain(planned.notes.iter().cloned())
        .collect::<Vec<_>>()
        .join("; ");
    eprintln!(
        "mvm-shard: run {}: {} of {} on {}, source {source}",
        planned.run_id,
        planned.jobs.len(),
        crate::report::plural(planned.spec.shards as usize, "shard"),
        match (&args.microvm_image, &args.function) {
            _ if args.local => "the local emulator".to_string(),
            (Some(image), _) => format!("MicroVMs of image {image}"),
            (None, function) => format!("function {}", function.as_deref().unwrap_or("")),
        },
    );
    if let (Some(shares), Some(only)) = (&planned.spec.shares, &planned.spec.only) {
        for index in only {
            if shares
                .get(*index as usize - 1)
                .is_some_and(|s| s.tests.is_empty())
            {
                eprintln!(
                    "mvm-shard: shard {index}/{} has no tests (fewer tests than shards): nothing to run",
                    planned.spec.shards
                );
            }
        }
    }
    let jobs = std::mem::take(&mut planned.jobs);
    let dispatched =
        dispatch_and_report(args, planned, jobs, target, max_parallel, shutdown).await?;
    let summary = dispatched.summary;
    let learnable = summary.stopped_by.is_none();
    if let (Some(suite), Some((tests, shares)), true) = (&mut planned.suite, &shares, learnable) {
        tell_balance(shares, &dispatched.first);
        suite.learn(tests, shares, &summary);
    }
    let mut code_floor = 0;
    if args.no_flaky && dispatched.flaky > 0 {
        eprintln!(
            "mvm-shard: --no-flaky: {} failed, then passed on a rerun: the run fails",
            crate::report::plural(dispatched.flaky, "flaky test")
        );
        code_floor = 1;
    }
    Ok(RunOn::Ran {
        summary,
        left_running: dispatched.left_running,
        failed_fast: dispatched.failed_fast,
        code_floor,
    })
}

/// What the plan stage produced: the jobs, and what must live while they run.
struct PlannedRun {
    run_id: String,
    /// One per selected shard (with `--runner`, once the tests are
    /// listed), taken out when dispatched.
    jobs: Vec<ShardJob>,
    /// The runner's adapter (`--runner`, or the replayed plan's), which
    /// tells the failed tests to rerun from its report.
    runner: Option<Adapter>,
    /// What each shard gets, but the tests.
    spec: RunSpec,
    /// Where the source travels.
    source: SourceSpec,
    /// With `--runner`: how to list the tests and what was learned of them.
    suite: Option<Suite>,
    /// The packed source (for the banner; empty with `--source-from github`).
    archive: SourceArchive,
    /// Where archives too large for a request travel (the S3 store, or
    /// loopback with `--local`); serves them until the run ends.
    channel: Channel,
    /// The `--include` archive, kept while the channel may serve it.
    _include: Option<PackedArchive>,
    /// What the channel did, for the banner (`includes 1.0 MiB uploaded…`).
    notes: Vec<String>,
    /// Hands out a fresh tarball link per attempt (`--source-from github`).
    github: Option<Arc<TarballLinks>>,
    /// Links already handed out, for masking.
    links_to_mask: Vec<String>,
    /// The commit the tests are listed at, when known.
    commit: Option<String>,
    /// With `--replay-plan`: the plan replayed.
    replayed: Option<RecordedPlan>,
}

/// Checks the input, packs the source and the overlay, and plans the jobs.
async fn plan_run(args: &RunArgs) -> Result<PlannedRun, RunError> {
    let replay = match &args.replay_plan {
        Some(path) => {
            let plan = RecordedPlan::load(path)?;
            // The command comes from the plan, unless the plan could not keep it.
            if plan.masked && args.command.is_empty() {
                return Err(ReplayError::MaskedCommand { path: path.clone() }.into());
            }
            Some(plan)
        }
        None => None,
    };
    let shards = replay.as_ref().map_or(args.shard_count(), |p| p.shards);
    if shards == 0 || shards > 10_000 {
        return Err(PlanError::ShardCount(shards).into());
    }
    if args.max_parallel == Some(0) {
        return Err(PlanError::MaxParallel.into());
    }
    let only = args
        .only
        .as_deref()
        .map(|o| plan::parse_only(o, shards))
        .transpose()?;
    let env = plan::resolve_env(&args.env, |name| std::env::var(name).ok())?;
    if let Some(name) = args.mask.iter().find(|name| !env.contains_key(*name)) {
        return Err(PlanError::MaskNotForwarded(name.clone()).into());
    }
    let mut links_to_mask = Vec::new();
    let github = match args.source_from {
        SourceFrom::Github => {
            let links = github_links()?;
            // Fail before anything runs when GitHub refuses; the link is cached for the first shards.
            let first = dispatch::SourceResolver::resolve(&links)
                .await
                .map_err(RunError::Github)?;
            links_to_mask.extend(first.secret);
            Some(Arc::new(links))
        }
        SourceFrom::Tree => None,
    };
    let source_dir = match &args.source {
        Some(dir) => dir.clone(),
        None => std::env::current_dir().map_err(|e| RunError::Local(e.to_string()))?,
    };
    // The commit the tests are listed at: a plan made at one is replayed at it only.
    let commit = match &github {
        Some(_) => std::env::var("GITHUB_SHA").ok().filter(|s| !s.is_empty()),
        None => crate::source::git_rev_parse(&source_dir, &["--verify", "--quiet", "HEAD"])
            .map(|p| p.display().to_string()),
    };
    if let (Some(plan), Some(path)) = (&replay, &args.replay_plan) {
        check_replay(args, plan, path, &env, commit.as_deref())?;
    }
    let archive = match &github {
        // The commit's tree comes from GitHub; only the working directory is needed here.
        Some(_) => SourceArchive::nothing(&source_dir),
        None => {
            // Only a request bounds the source (the exact budget is checked
            // below); the artifact channel takes any size the disk holds.
            let limit = if has_channel(args) {
                u64::MAX
            } else {
                (crate::protocol::MAX_REQUEST_BYTES / 4 * 3) as u64
            };
            // What a previous run wrote here is not the project's source.
            let outputs = vec![
                args.report.clone(),
                crate::replay::next_to_report(&args.report),
            ];
            tokio::task::spawn_blocking(move || {
                crate::source::pack_within(&source_dir, limit, &outputs)
            })
            .await
            .map_err(|e| RunError::Local(e.to_string()))?
            .map_err(|e| match e {
                SourceError::TooLarge { limit } => RunError::Plan(PlanError::SourceTooLarge {
                    size: format!("over {}", human_bytes(limit)),
                    limit: human_bytes(limit),
                }),
                other => other.into(),
            })?
        }
    };
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let mut spec = RunSpec {
        shards,
        only,
        command: replay
            .as_ref()
            .filter(|p| !p.masked)
            .map_or_else(|| args.command.clone(), |p| p.command.clone()),
        env,
        timeout: args.timeout,
        workdir: archive.workdir.clone(),
        collect: args.junit.clone(),
        overlays: Vec::new(),
        caches: Vec::new(),
        shares: None,
        runner: args.runner,
    };
    let mut replayed_runner = None;
    let mut suite = None;
    if let Some(replay) = &replay {
        // Exactly what the plan gave each shard, without listing; learned
        // with --timings, as from the timings the plan was made with.
        if let Some(kind) = replay.runner_kind() {
            let adapter = Adapter::new(
                kind,
                Some(replay.list_command.clone().unwrap_or_default()),
                None,
            )?;
            ask_for_junit(&mut spec, &adapter);
            spec.runner = Some(kind);
            if let Some(path) = &args.timings {
                let planning = Timings {
                    tests: replay.planned_with.clone().unwrap_or_default(),
                    ..Timings::default()
                };
                let log = LogScanner::new(kind);
                suite = Some(Suite {
                    log: Arc::new(std::sync::Mutex::new(log)),
                    adapter: adapter.clone(),
                    timings_file: open_timings(path)?.1,
                    planning,
                    workflow_run: workflow_run(),
                    planned_with: replay.planned_with.clone(),
                });
            }
            replayed_runner = Some(adapter);
        }
        spec.shares = replay.shares();
    }
    let suite = match (args.runner, &replay) {
        (_, Some(_)) => suite,
        (Some(kind), None) => {
            crate::runner::check_command(&args.command)?;
            let adapter = Adapter::new(kind, args.list_command.clone(), args.files.as_deref())?;
            if args.only.is_some() {
                eprintln!(
                    "mvm-shard: note: --only with --runner lists and plans in this run alone; \
                     separate runs share the tests out exactly only when they list the same \
                     tests and plan with the same timings. To make sure, plan once with \
                     --plan-only FILE and run each share with --replay-plan FILE --only K"
                );
            }
            let timings_path = args
                .timings
                .clone()
                .or_else(|| crate::runner::timings::default_path(&archive.root));
            let (timings, timings_file) = match &timings_path {
                Some(path) => open_timings(path)?,
                None => (Timings::default(), None),
            };
            let workflow_run = workflow_run();
            let planning = timings.for_run(workflow_run.as_deref());
            Some(Suite {
                log: Arc::new(std::sync::Mutex::new(LogScanner::new(kind))),
                adapter,
                timings_file,
                planning,
                workflow_run,
                planned_with: None,
            })
        }
        (None, None) => None,
    };
    let cwd = std::env::current_dir().map_err(|e| RunError::Local(e.to_string()))?;
    let channel = Channel::open(
        args.artifacts.as_deref(),
        args.local,
        crate::artifacts::local_cache_dir(&cwd),
        args.region.clone(),
        link_lifetime(args),
    )
    .await?;
    let mut notes = Vec::new();
    spec.caches = caches(args, &cwd, &channel, &mut links_to_mask, &mut notes).await?;
    let mut include = None;
    if !args.include.is_empty() {
        let (cwd, paths) = (cwd.clone(), args.include.clone());
        let extra = tokio::task::spawn_blocking(move || crate::source::pack_extra(&cwd, &paths))
            .await
            .map_err(|e| RunError::Local(e.to_string()))??;
        let packed = extra
            .packed
            .ok_or_else(|| RunError::Local("--include packed nothing".into()))?;
        let overlay = match channel.publish(&packed).await? {
            Some(published) => {
                links_to_mask.extend(published.secrets);
                notes.push(format!(
                    "includes {} {}",
                    human_bytes(packed.size),
                    published.note
                ));
                published.spec
            }
            None => plan::overlay(&packed.read().map_err(SourceError::from)?)?,
        };
        spec.overlays.push(overlay);
        if args.local && args.artifacts.is_none() {
            if let Some(concern) = lambda_fit::includes(packed.size) {
                eprintln!("mvm-shard: warning: {concern}");
            }
        }
        include = Some(packed);
    }
    if args.local {
        let size = archive.size();
        // Through a store, a source of any size reaches Lambda too.
        let budget = match args.artifacts {
            Some(_) => u64::MAX,
            None => plan::inline_budget(&spec, &run_id)? as u64,
        };
        let root = &archive.root;
        for concern in lambda_fit::concerns(&spec.command, &spec.env, &cwd, root, size, budget) {
            eprintln!("mvm-shard: warning: {concern}");
        }
    }
    let placement = plan::place_source(
        &spec,
        &run_id,
        archive.size(),
        github.is_some(),
        !matches!(channel, Channel::Inline),
    )?;
    let source = match (placement, &archive.packed) {
        (Placement::Inline, Some(packed)) => {
            plan::inline(&packed.read().map_err(SourceError::from)?)
        }
        (Placement::Channel, Some(packed)) => match channel.publish(packed).await? {
            Some(published) => {
                links_to_mask.extend(published.secrets);
                notes.push(format!("source {}", published.note));
                published.spec
            }
            None => return Err(RunError::Local("the artifact channel took nothing".into())),
        },
        _ => SourceSpec::Empty,
    };
    let jobs = match (&suite, &replay) {
        // The tests are listed where they run, once the backend is connected.
        (Some(_), None) => Vec::new(),
        _ => plan::jobs(&spec, &run_id, &source)?,
    };
    let runner = suite
        .as_ref()
        .map(|s| s.adapter.clone())
        .or(replayed_runner);
    let planned = PlannedRun {
        run_id,
        jobs,
        runner,
        spec,
        source,
        suite,
        archive,
        channel,
        _include: include,
        notes,
        github,
        links_to_mask,
        commit,
        replayed: replay,
    };
    if planned.suite.is_none() && planned.replayed.is_none() && args.plan_only.is_none() {
        record_plan(args, &planned);
    }
    Ok(planned)
}

/// `GITHUB_RUN_ID`, in a workflow.
fn workflow_run() -> Option<String> {
    std::env::var("GITHUB_RUN_ID")
        .ok()
        .filter(|r| !r.is_empty())
}

/// Refuses (exit 2) a replay whose own inputs differ from what its plan was
/// made from: the command, the shard count, the runner and its listing, the
/// source's commit.
fn check_replay(
    args: &RunArgs,
    plan: &RecordedPlan,
    path: &std::path::Path,
    env: &BTreeMap<String, String>,
    commit: Option<&str>,
) -> Result<(), RunError> {
    let secrets: Vec<&str> = args
        .mask
        .iter()
        .filter_map(|name| env.get(name))
        .map(String::as_str)
        .collect();
    let listing = match args.runner {
        Some(kind) => Some(Adapter::new(
            kind,
            args.list_command.clone(),
            args.files.as_deref(),
        )?),
        None => None,
    };
    let given = crate::replay::ReplayInputs {
        command: RecordedPlan::masked_command(&args.command, &secrets),
        shards: args.shards,
        runner: args.runner,
        list_command: listing.as_ref().map(|a| a.list_command.as_str()),
        commit,
    };
    // Without a runner nothing says which tests ran, so there is nothing to
    // learn: `--timings` would be dropped silently (as without --runner).
    let what = plan.differs(&given).or_else(|| {
        (plan.runner.is_none() && args.timings.is_some()).then(|| {
            "it was made without --runner, so there are no test durations to learn (--timings)"
                .to_string()
        })
    });
    match what {
        Some(what) => Err(ReplayError::Differs {
            path: path.to_path_buf(),
            what,
        }
        .into()),
        None => Ok(()),
    }
}

/// True when archives too large for a request have another way to the
/// shards: the S3 store (`--artifacts`), or loopback (`--local`).
fn has_channel(args: &RunArgs) -> bool {
    args.local || args.artifacts.as_deref().is_some_and(|a| !a.is_empty())
}

/// How long presigned links live: an hour, plus the shard timeout for every
/// wave of `--max-parallel` shards and one more (a retried wave).
fn link_lifetime(args: &RunArgs) -> Duration {
    // All N shards bound the selected ones (`--only`) from above.
    let waves = (args.shard_count() as usize).div_ceil(max_parallel(args)) as u32 + 1;
    Duration::from_secs(3600) + args.timeout.saturating_mul(waves)
}

/// The `--cache` folders with their links. A cache only speeds a run up: a
/// store that fails here or a key file that cannot be read is said and
/// skipped; a malformed `--cache` is exit 2.
async fn caches(
    args: &RunArgs,
    cwd: &std::path::Path,
    channel: &Channel,
    links_to_mask: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> Result<Vec<crate::protocol::CacheSpec>, RunError> {
    // What runs the shards is part of every key: a folder built for one image may not fit another.
    let identity = match (&args.microvm_image, &args.function) {
        _ if args.local => "local".to_string(),
        (Some(image), _) => format!(
            "microvm:{image}:{}",
            args.image_version.as_deref().unwrap_or("")
        ),
        (None, function) => format!("function:{}", function.as_deref().unwrap_or("")),
    };
    let mut specs = Vec::new();
    for given in &args.caches {
        let cache = CacheArg::parse(given)?;
        // A key file that cannot be read (not generated yet, a typo) leaves
        // the run uncached, never failed: said here, and the run goes on.
        let key = match cache.key(cwd, &identity) {
            Ok(key) => key,
            Err(e) => {
                eprintln!("mvm-shard: cache {} not used: {e}", cache.path);
                continue;
            }
        };
        match channel.cache(&key).await {
            Ok(links) => {
                links_to_mask.extend(links.secrets);
                let state = if links.restore.is_some() {
                    "found"
                } else {
                    "to be saved"
                };
                notes.push(format!("cache {} {state}", cache.path));
                specs.push(crate::protocol::CacheSpec {
                    path: cache.path,
                    restore: links.restore,
                    save: links.save,
                });
            }
            Err(ArtifactError::Cache { problem, .. }) => {
                return Err(ArtifactError::Cache {
                    given: given.clone(),
                    problem,
                }
                .into())
            }
            Err(e) => eprintln!("mvm-shard: cache {} not used: {e}", cache.path),
        }
    }
    Ok(specs)
}

/// Where the shards run: the backend, and the emulator behind it with `--local`.
struct Target {
    backend: Arc<dyn Backend>,
    emulator: Option<RunningEmulator>,
}

/// Starts the local emulator (with `--local`) and connects the backend.
async fn connect(
    args: &RunArgs,
    source_root: &std::path::Path,
    max_parallel: usize,
) -> Result<Target, RunError> {
    let mut emulator = None;
    let options = if args.local {
        let mut function =
            FunctionConfig::default_agent().map_err(|e| RunError::Local(e.to_string()))?;
        function.max_concurrency = max_parallel;
        // Every attempt has a tenant id of its own: nothing could reuse a warm one.
        function.keep_warm = false;
        let inherited = LocalEnvironment::from_host(source_root, |n| std::env::var(n).ok());
        for entry in &inherited.dropped_path {
            eprintln!(
                "mvm-shard: note: PATH entry {entry} is not passed to local shards \
                 (inside the source or the active virtualenv; shards have neither)"
            );
        }
        function.env = inherited.vars;
        let image =
            MicrovmImageConfig::default_agent().map_err(|e| RunError::Local(e.to_string()))?;
        let running = RunningEmulator::start(EmulatorConfig {
            functions: vec![function],
            region: "us-east-1".into(),
            microvm_images: vec![image],
            microvm_faults: Default::default(),
            throttle_streams: false,
            lambda_faults: Default::default(),
        })
        .await
        .map_err(|e| RunError::Local(format!("cannot start the local emulator: {e}")))?;
        let options = LambdaOptions {
            function: DEFAULT_FUNCTION.into(),
            endpoint_url: Some(running.endpoint.clone()),
            region: None,
            tenant_isolation: true,
            local_credentials: true,
            http_client: Some(running.sdk_http_client()),
        };
        emulator = Some(running);
        options
    } else {
        LambdaOptions {
            function: args.function.clone().unwrap_or_default(),
            endpoint_url: args.endpoint_url.clone(),
            region: args.region.clone(),
            tenant_isolation: !args.no_tenant_isolation,
            local_credentials: false,
            http_client: None,
        }
    };
    // One cheap read first, so a configuration mistake stops the run before any shard starts.
    let backend: Result<Arc<dyn Backend>, RunError> = match &args.microvm_image {
        Some(image) => match MicrovmBackend::connect(MicrovmOptions {
            image: image.clone(),
            image_version: args.image_version.clone(),
            execution_role_arn: args.execution_role_arn.clone(),
            endpoint_url: args.endpoint_url.clone(),
            region: args.region.clone(),
            local_credentials: false,
        })
        .await
        {
            Ok(backend) => match backend.preflight().await {
                Ok(()) => Ok(Arc::new(backend) as Arc<dyn Backend>),
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        },
        None => match LambdaBackend::connect(options).await {
            Ok(backend) => match backend.preflight().await {
                Ok(()) => Ok(Arc::new(backend) as Arc<dyn Backend>),
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        },
    };
    match backend {
        Ok(backend) => Ok(Target { backend, emulator }),
        Err(e) => {
            if let Some(emulator) = emulator {
                let _ = emulator.shutdown().await;
            }
            Err(e)
        }
    }
}

/// How the dispatch stage ended.
struct Dispatched {
    /// Every shard's record, reruns folded in.
    summary: RunSummary,
    /// Every shard's first attempt, before any rerun (expected against actual).
    first: Vec<ShardRecord>,
    /// Something may still be running.
    left_running: bool,
    /// The shard `--fail-fast` stopped the run at.
    failed_fast: Option<ShardId>,
    /// Tests (or shards without a report) that passed only on a rerun.
    flaky: usize,
}

/// Runs the jobs with the reporter consuming the events, reruns what did
/// not pass (`--retries`), releases what the backend holds, then writes the
/// merged JUnit report and the summary.
async fn dispatch_and_report(
    args: &RunArgs,
    planned: &PlannedRun,
    jobs: Vec<ShardJob>,
    target: &Target,
    max_parallel: usize,
    shutdown: Shutdown,
) -> Result<Dispatched, RunError> {
    let cancel = CancellationToken::new();
    let signals = tokio::spawn(escalate(
        shutdown.clone(),
        cancel.clone(),
        target.backend.clone(),
    ));
    let (tx, rx) = dispatch::event_channel();
    let fail_fast = args.fail_fast.then(|| cancel.clone());
    let reporter = tokio::spawn(consume_events(
        reporter(args, planned, jobs.len()),
        rx,
        fail_fast,
    ));
    let dispatch_options = DispatchOptions {
        max_parallel,
        source: planned
            .github
            .clone()
            .map(|g| g as Arc<dyn dispatch::SourceResolver>),
        ..DispatchOptions::default()
    };
    let mut summary = dispatch_reading_log(
        target,
        &planned.run_id,
        jobs,
        &dispatch_options,
        &tx,
        cancel.clone(),
        planned.suite.as_ref(),
    )
    .await;
    if planned.runner.as_ref().map(|r| r.kind) == Some(RunnerKind::Jest) {
        jest_reports_to_junit(&mut summary, &planned.spec.workdir);
    }
    let first = summary.records.clone();
    let reran = rerun_failed(
        args,
        planned,
        target,
        &dispatch_options,
        summary,
        &tx,
        &cancel,
    )
    .await;
    drop(tx);
    // Whatever happened, nothing the run started may outlive it (MicroVMs cost money).
    let released = target.backend.shutdown().await;
    signals.abort();
    let left_running = tell_released(&released, shutdown.last());
    let (mut reporter, failed_fast) = reporter.await.map_err(|e| RunError::Local(e.to_string()))?;
    let mut summary = reran?;
    if summary.stopped_by.is_some() {
        return Ok(Dispatched {
            summary,
            first,
            left_running,
            failed_fast: None,
            flaky: 0,
        });
    }
    // Shards whose command failed at first and passed in the end (one
    // that could not run at first, then passed, failed no test).
    let passed_on_rerun: Vec<ShardId> = summary
        .records
        .iter()
        .zip(&first)
        .filter(|(last, first)| {
            last.status == ShardStatus::Passed
                && matches!(
                    first.status,
                    ShardStatus::Failed { .. } | ShardStatus::TimedOut
                )
        })
        .map(|(last, _)| last.shard)
        .collect();
    if args.no_flaky {
        // Flakiness fails the run: such a shard keeps its first failure.
        for (last, first) in summary.records.iter_mut().zip(&first) {
            if passed_on_rerun.contains(&last.shard) {
                last.status = first.status.clone();
            }
        }
    }
    let mut tests = TestReport::from_summary(&summary);
    for shard in &passed_on_rerun {
        if tests.flaky.iter().any(|f| f.shard == *shard) {
            continue;
        }
        let earlier = first.iter().find(|r| r.shard == *shard);
        tests.flaky.push(crate::report::junit::TestFailure {
            shard: *shard,
            name: "the whole shard".into(),
            file: None,
            line: None,
            message: earlier.map_or_else(String::new, |r| r.status.describe()),
        });
    }
    if let Some(module) = GoModule::find(&planned.archive.root, &planned.spec.workdir) {
        tests.place_go_files(&module);
    }
    tests.place_in_workdir(&planned.archive.root, &planned.spec.workdir);
    if let Some(merged) = &tests.merged {
        let written = std::fs::File::create(&args.report)
            .map_err(|e| e.to_string())
            .and_then(|f| merged.serialize(f).map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!(
                "mvm-shard: cannot write the merged JUnit report {}: {e}",
                args.report.display()
            );
        }
    } else if !args.junit.is_empty() {
        eprintln!(
            "mvm-shard: no shard sent back a JUnit report matching {}",
            args.junit.join(", ")
        );
    }
    if let Some(shares) = &planned.spec.shares {
        let expected = summary
            .records
            .iter()
            .filter_map(|r| {
                let share = shares.get(r.shard.index as usize - 1)?;
                let expected = Duration::try_from_secs_f64(share.expected).unwrap_or_default();
                Some((r.shard, expected))
            })
            .collect();
        reporter.expect(&expected);
    }
    let _ = reporter.finish(&summary, &tests);
    if let Some(shard) = failed_fast {
        let stopped = summary.count(|s| matches!(s, ShardStatus::Interrupted { .. }));
        let were = if stopped == 1 { "was" } else { "were" };
        eprintln!(
            "mvm-shard: --fail-fast: shard {shard} failed, so the rest stopped: {} never started or {were} interrupted",
            crate::report::plural(stopped, "shard"),
        );
    }
    let flaky = tests.flaky.len();
    Ok(Dispatched {
        summary,
        first,
        left_running,
        failed_fast,
        flaky,
    })
}

/// `--retries`: reruns what did not pass, round after round, each round in
/// new fresh environments (a run id of its own gives every attempt a new
/// tenant id or microVM), until everything passed, the reruns are used up,
/// or the run was stopped. Each rerun is folded into its shard's record.
async fn rerun_failed(
    args: &RunArgs,
    planned: &PlannedRun,
    target: &Target,
    options: &DispatchOptions,
    mut summary: RunSummary,
    tx: &dispatch::EventSender,
    cancel: &CancellationToken,
) -> Result<RunSummary, RunError> {
    let adapter = planned.runner.as_ref();
    // What each shard's last attempt ran, with --runner.
    let mut ran: BTreeMap<u32, Vec<String>> = planned
        .spec
        .shares
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, share)| (i as u32 + 1, share.tests.clone()))
        .collect();
    for round in 1..=args.retries {
        if summary.stopped_by.is_some() || cancel.is_cancelled() {
            break;
        }
        let mut jobs = Vec::new();
        for record in &summary.records {
            let last = ran.get(&record.shard.index).map(Vec::as_slice);
            // What the runner said of each test: its report, and its log with a listed suite.
            let said = match &planned.suite {
                Some(suite) => Some(suite.results(record)),
                None => adapter.map(|a| a.report_results(&record.files)),
            };
            let Some(rerun) = crate::retry::rerun_of(record, last, said.as_ref()) else {
                continue;
            };
            let _ = tx
                .send(RunEvent::Rerunning {
                    shard: record.shard,
                    round,
                    of: args.retries,
                    what: rerun.describe(),
                })
                .await;
            jobs.push(plan::rerun_job(
                &planned.spec,
                &planned.run_id,
                &planned.source,
                record.shard,
                rerun.tests(),
            )?);
            if let Some(tests) = rerun.tests() {
                ran.insert(record.shard.index, tests.to_vec());
            }
        }
        if jobs.is_empty() {
            break;
        }
        let run_id = format!("{}-r{round}", planned.run_id);
        let mut again = dispatch_reading_log(
            target,
            &run_id,
            jobs,
            options,
            tx,
            cancel.clone(),
            planned.suite.as_ref(),
        )
        .await;
        if planned.runner.as_ref().map(|r| r.kind) == Some(RunnerKind::Jest) {
            jest_reports_to_junit(&mut again, &planned.spec.workdir);
        }
        for rerun in again.records {
            if let Some(slot) = summary.records.iter_mut().find(|r| r.shard == rerun.shard) {
                *slot = crate::retry::fold(slot.clone(), rerun);
            }
        }
        if again.stopped_by.is_some() {
            summary.stopped_by = again.stopped_by;
            break;
        }
    }
    Ok(summary)
}

/// Size asked for the invoker's stdout when it is a pipe (Linux's default is 64 KiB).
const STDOUT_PIPE_BYTES: usize = 1024 * 1024;

/// The reporter for where the run is shown: GitHub Actions (with the
/// secrets masked), a terminal with a progress bar, or plain output.
fn reporter(args: &RunArgs, planned: &PlannedRun, shards: usize) -> Box<dyn Reporter> {
    // A long log piped on (`| tee`, `| grep`) goes out in fewer, larger
    // writes, with fewer wakeups of its reader; a terminal or a file is left as it is.
    crate::os::grow_pipe(&std::io::stdout(), STDOUT_PIPE_BYTES);
    if std::env::var("GITHUB_ACTIONS").as_deref() == Ok("true") {
        let mut files = GithubFiles::from_env();
        if !args.junit.is_empty() {
            files.report = Some(args.report.clone());
            files.junit = args.junit.clone();
        }
        let mut github = GithubReporter::new(std::io::stdout(), files);
        let links = planned.links_to_mask.iter().map(String::as_str);
        let named = args
            .mask
            .iter()
            .filter_map(|name| planned.spec.env.get(name));
        for value in named.map(String::as_str).chain(links) {
            let _ = github.mask(value);
        }
        Box::new(github)
    } else {
        use std::io::IsTerminal;
        let options = crate::report::terminal::TerminalOptions {
            palette: crate::report::color::Palette::new(
                args.color.enabled(std::io::stdout().is_terminal()),
            ),
            output: args
                .output
                .unwrap_or(crate::report::terminal::OutputMode::default_for(shards)),
            timeout: Some(args.timeout),
        };
        let terminal = TerminalReporter::new(crate::os::RawStdout).with_options(options);
        if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
            // Cleared however the run ends (a stopped run has no summary to draw it away).
            let bar = indicatif::ProgressBar::new(shards as u64)
                .with_finish(indicatif::ProgressFinish::AndClear);
            bar.enable_steady_tick(Duration::from_millis(200));
            Box::new(terminal.with_progress(bar))
        } else {
            Box::new(terminal)
        }
    }
}

/// Hands every event to the reporter until the dispatcher is done.
/// With `fail_fast`, cancels the run at the first shard that failed or
/// timed out, and returns which one that was.
async fn consume_events(
    mut reporter: Box<dyn Reporter>,
    mut rx: mpsc::Receiver<RunEvent>,
    fail_fast: Option<CancellationToken>,
) -> (Box<dyn Reporter>, Option<ShardId>) {
    let mut failed_first = None;
    let mut broken = false;
    while let Some(event) = rx.recv().await {
        if let (Some(cancel), RunEvent::Finished(record), None) = (&fail_fast, &event, failed_first)
        {
            if matches!(
                record.status,
                ShardStatus::Failed { .. } | ShardStatus::TimedOut
            ) {
                failed_first = Some(record.shard);
                cancel.cancel();
            }
        }
        // A reporter that cannot write any more still lets fail-fast see the events.
        if !broken && reporter.handle(&event).is_err() {
            broken = true;
        }
        // Buffered output goes out whenever no event is waiting.
        if !broken && rx.is_empty() && reporter.flush().is_err() {
            broken = true;
        }
    }
    (reporter, failed_first)
}

/// [`dispatch::dispatch`], with the events read on their way to the
/// reporter for the runner's log lines (the runners whose log says each
/// test's end): returns once every event of these shards was read, so that
/// what the log said is complete when the run decides what to rerun.
async fn dispatch_reading_log(
    target: &Target,
    run_id: &str,
    jobs: Vec<ShardJob>,
    options: &DispatchOptions,
    tx: &dispatch::EventSender,
    cancel: CancellationToken,
    suite: Option<&Suite>,
) -> RunSummary {
    let backend = target.backend.clone();
    let Some(log) = suite
        .filter(|s| s.adapter.reads_log())
        .map(|s| s.log.clone())
    else {
        return dispatch::dispatch(backend, run_id, jobs, options, tx.clone(), cancel).await;
    };
    let (inner, mut events) = dispatch::event_channel();
    let out = tx.clone();
    let forward = tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let RunEvent::Output {
                shard,
                stream,
                data,
            } = &event
            {
                if let Ok(mut log) = log.lock() {
                    log.feed(*shard, *stream, data);
                }
            }
            // A reporter that is gone still lets the log be read to the end.
            let _ = out.send(event).await;
        }
    });
    // Every sender is gone once dispatch returns (it spawns nothing), so the forwarder ends.
    let summary = dispatch::dispatch(backend, run_id, jobs, options, inner, cancel).await;
    let _ = forward.await;
    summary
}

/// jest's `--json` reports, sent back by the shards, as JUnit (for the
/// merged report, the failures' places and the tests' durations), with each
/// test file named by its path relative to the working directory `workdir`.
fn jest_reports_to_junit(summary: &mut RunSummary, workdir: &str) {
    let prefix = format!("{}/", workdir.trim_end_matches('/'));
    let relative = |name: &str| {
        let in_source = crate::report::junit::workspace_relative(name).unwrap_or(name.to_string());
        match in_source.strip_prefix(&prefix) {
            Some(rest) if !workdir.is_empty() => rest.to_string(),
            _ => in_source,
        }
    };
    for record in &mut summary.records {
        for file in record
            .files
            .iter_mut()
            .filter(|f| f.path == JEST_REPORT_PATH)
        {
            let Ok(report) = crate::runner::results::jest_to_junit(&file.data, relative) else {
                // Left as it is: the report says it is not JUnit.
                continue;
            };
            let mut xml = Vec::new();
            if report.serialize(&mut xml).is_ok() {
                file.data = xml.into();
            }
        }
    }
}

/// The timings a run plans with, and the file to learn into (`None` for a
/// newer version's); what made the file unusable is said once.
fn open_timings(path: &std::path::Path) -> Result<(Timings, Option<TimingsFile>), RunError> {
    let opened = TimingsFile::open(path)?;
    if let Some(note) = &opened.note {
        eprintln!("mvm-shard: warning: {note}");
    }
    Ok((opened.timings, opened.file))
}

/// A listed suite: the runner's adapter and the learned timings.
struct Suite {
    adapter: Adapter,
    /// What the shards' logs said of each test (the runners that say it there).
    log: Arc<std::sync::Mutex<LogScanner>>,
    /// Where the timings are learned into; `None` outside a git repository
    /// without `--timings`, or when the file is a newer version's.
    timings_file: Option<TimingsFile>,
    /// What this run plans with (the same for every job of a workflow run).
    planning: Timings,
    /// `GITHUB_RUN_ID`, when in a workflow.
    workflow_run: Option<String>,
    /// With `--replay-plan`: the timings the plan was made with, which
    /// every job replaying it learns as from (`before`), so that the jobs'
    /// files merge.
    planned_with: Option<BTreeMap<String, f64>>,
}

impl Suite {
    /// What one shard's report or log said of each of its tests.
    fn results(&self, record: &dispatch::ShardRecord) -> Results {
        let mut results = self.adapter.report_results(&record.files);
        if let Ok(log) = self.log.lock() {
            if let Some(said) = log.results.get(&record.shard) {
                results.extend(said.iter().map(|(id, r)| (id.clone(), *r)));
            }
        }
        results
    }

    /// Learns the durations the shards reported and saves them.
    fn learn(&mut self, tests: &[String], shares: &[Share], summary: &RunSummary) {
        let mut observed = BTreeMap::new();
        let mut reported_by: BTreeMap<String, Vec<ShardId>> = BTreeMap::new();
        for record in &summary.records {
            let Some(result) = record
                .result
                .as_ref()
                .filter(|_| command_ran(&record.status))
            else {
                continue;
            };
            let results = self.results(record);
            for id in results.keys() {
                reported_by
                    .entry(id.clone())
                    .or_default()
                    .push(record.shard);
            }
            if !results.is_empty() {
                let durations = results
                    .into_iter()
                    .filter_map(|(id, r)| Some((id, r.duration?)));
                observed.extend(durations);
            } else if let Some(share) = shares.get(record.shard.index as usize - 1) {
                // No per-test report: the command's time, shared as expected.
                let took = Duration::from_millis(result.duration_ms);
                let expected = self.planning.expected(&share.tests);
                let total: f64 = expected.iter().sum();
                for (test, e) in share.tests.iter().zip(expected) {
                    // A share of the time, whatever the expectations were.
                    let part = Some(e / total)
                        .filter(|p| p.is_finite())
                        .map_or(0.0, |p| p.clamp(0.0, 1.0));
                    observed.insert(test.clone(), took.mul_f64(part));
                }
            }
        }
        tell_reported_twice(&reported_by);
        let Some(file) = &self.timings_file else {
            return;
        };
        // Into the file as it is now: another run may have saved since this one read it.
        let run = self.workflow_run.as_deref();
        let planned_with = self.planned_with.as_ref().filter(|_| run.is_some());
        match file.update(|latest| {
            latest.begin_update(run);
            if let Some(planned_with) = planned_with {
                latest.before = Some(planned_with.clone());
            }
            latest.learn(tests, &observed);
        }) {
            Ok(None) => {}
            Ok(Some(note)) => eprintln!("mvm-shard: warning: {note}"),
            Err(e) => eprintln!("mvm-shard: warning: cannot save the learned timings: {e}"),
        }
    }
}

/// Says, once, which tests more than one shard's report or log named: the
/// command runs tests beyond its `{tests}`, so those ran more than once.
fn tell_reported_twice(reported_by: &BTreeMap<String, Vec<ShardId>>) {
    const SHOWN: usize = 5;
    let twice: Vec<String> = reported_by
        .iter()
        .filter(|(_, shards)| shards.len() > 1)
        .map(|(id, shards)| {
            let shards: Vec<String> = shards.iter().map(ShardId::to_string).collect();
            format!("{id} (shards {})", shards.join(", "))
        })
        .collect();
    if twice.is_empty() {
        return;
    }
    let more = match twice.len().saturating_sub(SHOWN) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    eprintln!(
        "mvm-shard: warning: {} reported by more than one shard: {}{more}; the command runs \
         tests beyond its {{tests}}, so these ran more than once",
        crate::report::plural(twice.len(), "test"),
        twice[..twice.len().min(SHOWN)].join(", "),
    );
}

/// Lists the tests: in a fresh environment of the backend, with the same
/// source, or here with `--list-local`. A stop request ends the listing
/// (exit 3).
async fn list_tests(
    args: &RunArgs,
    planned: &PlannedRun,
    suite: &Suite,
    target: &Target,
    shutdown: &Shutdown,
) -> Result<Vec<String>, RunError> {
    let command = &suite.adapter.list_command;
    let interrupted =
        |signal: Signal| RunError::ListingNotRun(format!("interrupted by {}", signal.name()));
    let too_long = || {
        RunError::from(RunnerError::ListingTooLong {
            command: command.clone(),
            limit: LISTING_LIMIT,
        })
    };
    let (ok, status, stdout, stderr) = if args.list_local {
        let dir = planned.archive.root.join(&planned.spec.workdir);
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!("pwd && {{\n{command}\n}}"))
            .current_dir(&dir)
            .envs(&planned.spec.env)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            // A group of its own: what the listing started ends with it.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| RunError::Local(format!("cannot run sh: {e}")))?;
        let group = child.id();
        let outcome = tokio::select! {
            done = tokio::time::timeout(planned.spec.timeout, listing_output(child)) => Ok(done),
            signal = shutdown.requested() => Err(signal),
        };
        if !matches!(outcome, Ok(Ok(Ok(_)))) {
            if let Some(group) = group {
                crate::os::signal_group(group, nix::sys::signal::Signal::SIGKILL);
            }
        }
        match outcome {
            Ok(Ok(Ok((status, stdout, stderr)))) => {
                (status.success(), status.to_string(), stdout, stderr)
            }
            Ok(Ok(Err(None))) => return Err(too_long()),
            Ok(Ok(Err(Some(e)))) => return Err(RunError::Local(format!("cannot run sh: {e}"))),
            Ok(Err(_)) => (false, "ran out of time".into(), Vec::new(), Vec::new()),
            Err(signal) => return Err(interrupted(signal)),
        }
    } else {
        let job = plan::listing_job(&planned.spec, &planned.run_id, &planned.source, command)?;
        let (tx, mut rx) = dispatch::event_channel();
        let cancel = CancellationToken::new();
        // The channel is bounded: collect the listing while it runs, up to
        // LISTING_LIMIT a stream (past it, the listing is stopped).
        let collected = tokio::spawn({
            let cancel = cancel.clone();
            async move {
                let (mut stdout, mut stderr, mut over) = (Vec::new(), Vec::new(), false);
                while let Some(event) = rx.recv().await {
                    let (kept, data) = match event {
                        RunEvent::Output {
                            stream: OutputStream::Stdout,
                            data,
                            ..
                        } => (&mut stdout, data),
                        RunEvent::Output { data, .. } => (&mut stderr, data),
                        _ => continue,
                    };
                    if over || kept.len() + data.len() > LISTING_LIMIT {
                        over = true;
                        cancel.cancel();
                    } else {
                        kept.extend_from_slice(&data);
                    }
                }
                (stdout, stderr, over)
            }
        });
        let options = DispatchOptions {
            max_parallel: 1,
            source: planned
                .github
                .clone()
                .map(|g| g as Arc<dyn dispatch::SourceResolver>),
            ..DispatchOptions::default()
        };
        let run_id = format!("{}-list", planned.run_id);
        let stop = tokio::spawn({
            let (shutdown, cancel) = (shutdown.clone(), cancel.clone());
            async move {
                shutdown.requested().await;
                cancel.cancel();
            }
        });
        let summary = dispatch::dispatch(
            target.backend.clone(),
            &run_id,
            vec![job],
            &options,
            tx,
            cancel,
        )
        .await;
        stop.abort();
        if let Some(signal) = shutdown.last() {
            return Err(interrupted(signal));
        }
        let (stdout, stderr, over) = collected
            .await
            .map_err(|e| RunError::Local(format!("the listing's collector failed: {e}")))?;
        if over {
            return Err(too_long());
        }
        let Some(record) = summary.records.first() else {
            return Err(RunError::ListingNotRun("no result".into()));
        };
        if !command_ran(&record.status) {
            return Err(RunError::ListingNotRun(record.status.describe()));
        }
        let ok = record.status == ShardStatus::Passed;
        (ok, record.status.describe(), stdout, stderr)
    };
    // The first line is the folder the listing ran in (`pwd`).
    let (root, listing) = match stdout.iter().position(|b| *b == b'\n') {
        Some(end) => (&stdout[..end], &stdout[end + 1..]),
        None => (&stdout[..], &[][..]),
    };
    let root = String::from_utf8_lossy(root);
    let output = || {
        last_part(&format!(
            "{}{}",
            String::from_utf8_lossy(listing),
            String::from_utf8_lossy(&stderr)
        ))
    };
    if !ok {
        return Err(RunnerError::ListingFailed {
            command: command.clone(),
            status,
            output: output(),
        }
        .into());
    }
    if listing.iter().all(u8::is_ascii_whitespace) && !stderr.is_empty() {
        return Err(RunnerError::NothingOnStdout {
            command: command.clone(),
            output: last_part(&String::from_utf8_lossy(&stderr)),
        }
        .into());
    }
    let tests = suite.adapter.parse_listing(listing, &root)?;
    if tests.is_empty() {
        let printed = output();
        return Err(RunnerError::NoTests {
            command: command.clone(),
            output: match printed.trim().is_empty() {
                true => "it printed nothing".to_string(),
                false => format!("its output:\n{printed}"),
            },
        }
        .into());
    }
    Ok(tests)
}

/// The most a listing may print on each of stdout and stderr: far more than
/// any suite's ids (100,000 ids of 200 bytes are 20 MB), far less than
/// would take the invoker's memory.
const LISTING_LIMIT: usize = 64 << 20;

/// What `--list-local`'s listing printed and how it ended; `Err(None)` once
/// it printed more than [`LISTING_LIMIT`] on one stream.
async fn listing_output(
    mut child: tokio::process::Child,
) -> Result<(std::process::ExitStatus, Vec<u8>, Vec<u8>), Option<std::io::Error>> {
    async fn capped(
        stream: Option<impl tokio::io::AsyncRead + Unpin>,
    ) -> Result<Vec<u8>, Option<std::io::Error>> {
        use tokio::io::AsyncReadExt;
        let mut kept = Vec::new();
        if let Some(stream) = stream {
            stream
                .take(LISTING_LIMIT as u64 + 1)
                .read_to_end(&mut kept)
                .await?;
        }
        if kept.len() > LISTING_LIMIT {
            return Err(None);
        }
        Ok(kept)
    }
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let (stdout, stderr, status) = tokio::try_join!(capped(stdout), capped(stderr), async {
        child.wait().await.map_err(Some)
    })?;
    Ok((status, stdout, stderr))
}

/// The end of a listing's output, as much as is worth showing in an error.
fn last_part(output: &str) -> String {
    const SHOWN: usize = 16 << 10;
    if output.len() <= SHOWN {
        return output.to_string();
    }
    let mut start = output.len() - SHOWN;
    while !output.is_char_boundary(start) {
        start += 1;
    }
    let rest = &output[start..];
    let rest = rest
        .split_once('\n')
        .map_or(rest, |(_, whole_lines)| whole_lines);
    format!(
        "(the first {} left out)\n{rest}",
        human_bytes((output.len() - rest.len()) as u64)
    )
}

/// Splits the listed tests into the shards by learned duration, asks the
/// runner for its per-test report, and plans the jobs.
fn plan_suite(
    args: &RunArgs,
    planned: &mut PlannedRun,
    tests: &[String],
) -> Result<Vec<Share>, RunError> {
    let Some(suite) = &planned.suite else {
        return Ok(Vec::new());
    };
    let expected = suite.planning.expected(tests);
    let shares = plan::balance(tests, &expected, planned.spec.shards);
    if let Ok(mut log) = suite.log.lock() {
        log.expect(tests);
    }
    ask_for_junit(&mut planned.spec, &suite.adapter);
    planned.spec.shares = Some(shares.clone());
    planned.jobs = plan::jobs(&planned.spec, &planned.run_id, &planned.source)?;
    let recorded = match &args.plan_only {
        Some(_) => None,
        None => record_plan(args, planned),
    };
    if let Some(path) = recorded {
        eprintln!(
            "mvm-shard: plan recorded in {} (run a shard's tests again with --replay-plan {0} --only K)",
            path.display()
        );
    }
    eprintln!(
        "mvm-shard: {} listed, {} with learned durations",
        crate::report::plural(tests.len(), "test"),
        tests
            .iter()
            .filter(|t| suite.planning.tests.contains_key(*t))
            .count()
    );
    Ok(shares)
}

/// Asks the runner for its per-test report, where the adapter knows how
/// (pytest through the environment; jest and vitest through `{tests}`).
fn ask_for_junit(spec: &mut RunSpec, adapter: &Adapter) {
    if let Some((name, value)) = adapter.junit_env() {
        let value = match spec.env.get(&name) {
            Some(theirs) => format!("{theirs} {value}"),
            None => value,
        };
        spec.env.insert(name, value);
    }
    if let Some(path) = adapter.report_file() {
        spec.collect.push(path.into());
    }
}

/// The run's plan as recorded for `--replay-plan`, with what it was made from.
fn recorded_plan(args: &RunArgs, planned: &PlannedRun) -> RecordedPlan {
    let spec = &planned.spec;
    let secrets: Vec<&str> = args
        .mask
        .iter()
        .filter_map(|name| spec.env.get(name))
        .map(String::as_str)
        .collect();
    let mut plan = RecordedPlan::new(
        &planned.run_id,
        spec.shards,
        &spec.command,
        &secrets,
        args.runner,
        spec.shares.as_deref(),
    );
    plan.commit = planned.commit.clone();
    if let Some(suite) = &planned.suite {
        plan.list_command = Some(suite.adapter.list_command.clone());
        plan.planned_with = Some(suite.planning.tests.clone());
    }
    plan
}

/// `--plan-only FILE`: writes the plan there, for `--replay-plan FILE --only K`.
fn publish_plan(
    args: &RunArgs,
    planned: &PlannedRun,
    path: &std::path::Path,
) -> Result<(), RunError> {
    let plan = recorded_plan(args, planned);
    plan.save(path).map_err(|e| {
        RunError::Local(format!("cannot write the plan to {}: {e}", path.display()))
    })?;
    eprintln!(
        "mvm-shard: plan {} of {} written to {} (run shard K with --replay-plan {2} --only K)",
        plan.run_id,
        crate::report::plural(plan.shards as usize, "shard"),
        path.display()
    );
    Ok(())
}

/// Records the run's plan for `--replay-plan`: next to the report (with
/// `--runner` or `--junit`) and in the worktree's git directory. Returns
/// the path next to the report, or else the other, when it was written.
fn record_plan(args: &RunArgs, planned: &PlannedRun) -> Option<std::path::PathBuf> {
    let plan = recorded_plan(args, planned);
    let mut paths = Vec::new();
    if args.runner.is_some() || !args.junit.is_empty() {
        paths.push(crate::replay::next_to_report(&args.report));
    }
    paths.extend(crate::replay::default_path(&planned.archive.root));
    let mut written = None;
    for path in paths {
        match plan.save(&path) {
            Ok(()) => {
                written.get_or_insert(path);
            }
            Err(e) => eprintln!(
                "mvm-shard: warning: cannot record the plan in {}: {e}",
                path.display()
            ),
        }
    }
    written
}

/// Whether the shard's command ran to an end (its output and reports count).
fn command_ran(status: &ShardStatus) -> bool {
    matches!(
        status,
        ShardStatus::Passed | ShardStatus::Failed { .. } | ShardStatus::TimedOut
    )
}

/// Shows each shard's expected and actual duration (the command's time, and
/// the wall time with start-up as this side saw it).
fn tell_balance(shares: &[Share], records: &[ShardRecord]) {
    for record in records {
        let Some(share) = shares.get(record.shard.index as usize - 1) else {
            continue;
        };
        let took = record.result.as_ref().map_or("-".to_string(), |r| {
            format!("{:.2}s", r.duration_ms as f64 / 1000.0)
        });
        eprintln!(
            "mvm-shard: shard {}: {}, expected {:.2}s, took {took} (wall {:.2}s)",
            record.shard,
            crate::report::plural(share.tests.len(), "test"),
            share.expected,
            record.duration.as_secs_f64(),
        );
    }
}

/// Says what an interruption or the end of the run had to end; true when
/// something may still be running.
fn tell_released(released: &Released, signal: Option<Signal>) -> bool {
    if let Some(signal) = signal {
        eprintln!(
            "mvm-shard: interrupted by {}; shards without a result are reported as interrupted",
            signal.name()
        );
    }
    if !released.terminated.is_empty() {
        eprintln!(
            "mvm-shard: terminated {} microVM(s): {}",
            released.terminated.len(),
            released.terminated.join(", ")
        );
    }
    if !released.failed.is_empty() {
        eprintln!(
            "mvm-shard: MAY STILL BE RUNNING (terminate by hand): {}",
            released.failed.join("; ")
        );
    }
    !released.failed.is_empty()
}

/// Tarball links for the workflow's commit, from the variables GitHub Actions sets.
fn github_links() -> Result<TarballLinks, RunError> {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let api = std::env::var("GITHUB_API_URL").unwrap_or_else(|_| "https://api.github.com".into());
    TarballLinks::new(
        &api,
        &var("GITHUB_TOKEN"),
        &var("GITHUB_REPOSITORY"),
        &var("GITHUB_SHA"),
    )
    .map_err(|e| RunError::Github(e.to_string()))
}

/// How the invoker answers stop requests. First SIGINT or SIGTERM: stop
/// dispatching; the shards in flight are interrupted and what they hold is
/// released (every microVM terminated, those still being started found by
/// their client token). Second (a cancelled workflow sends SIGINT, then
/// SIGTERM): nothing is skipped, termination goes on. Third: exit 130 at once,
/// naming what may still be running.
async fn escalate(shutdown: Shutdown, cancel: CancellationToken, backend: Arc<dyn Backend>) {
    let first = shutdown.requested().await;
    eprintln!(
        "mvm-shard: {} received: stopping the shards and ending what they run",
        first.name()
    );
    cancel.cancel();
    let second = shutdown.requests(2).await;
    eprintln!(
        "mvm-shard: {} received: still ending what the shards run (a third signal abandons it)",
        second.name()
    );
    let third = shutdown.requests(3).await;
    let left = backend.unfinished();
    if left.is_empty() {
        eprintln!("mvm-shard: {} received: exiting", third.name());
    } else {
        eprintln!(
            "mvm-shard: {} received: abandoning; MAY STILL BE RUNNING (terminate by hand): {}",
            third.name(),
            left.join(", ")
        );
    }
    std::process::exit(130);
}
