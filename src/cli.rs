//! The command line: `run`, `agent` and `emulate`, and the glue from parsed
//! arguments to plan, backend, dispatch and report.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use clap::{ArgGroup, Args, Parser, Subcommand};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backend::lambda::LambdaConfigError;
use crate::backend::{
    Backend, LambdaBackend, LambdaOptions, MicrovmBackend, MicrovmOptions, Released,
};
use crate::dispatch::{self, DispatchOptions};
use crate::emulator::{
    EmulatorConfig, FunctionConfig, MicrovmImageConfig, RunningEmulator, DEFAULT_FUNCTION,
};
use crate::local_env::LocalEnvironment;
use crate::plan::{self, human_bytes, PlanError, RunSpec};
use crate::protocol::SourceSpec;
use crate::report::github::GithubFiles;
use crate::report::junit::TestReport;
use crate::report::{GithubReporter, Reporter, TerminalReporter};
use crate::shutdown::{Shutdown, Signal};
use crate::source::{ArchiveServer, SourceError};

/// Shown after `mvm-shard --help` and `mvm-shard run --help`.
const EXAMPLES_AND_EXIT_CODES: &str = "\
Examples:
  mvm-shard run --local --shards 4 -- sh -c 'echo shard {index} of {count}'
  mvm-shard run --function mvm-shard --region eu-west-1 --shards 32 -- \\
      cargo nextest run --partition count:{index}/{count}
  mvm-shard run --microvm-image my-image --shards 8 --timeout 2h -- make test-{index}
  mvm-shard emulate --listen 127.0.0.1:9001

Exit status:
  0  every selected shard passed
  1  a shard's command failed or timed out
  2  bad usage or configuration, found before anything ran (the message says what to do)
  3  a shard could not run or its result never arrived (wins over 1: the results are incomplete)";

/// mvm-shard: run each test shard in its own fresh microVM on AWS Lambda.
#[derive(Debug, Parser)]
#[command(name = "mvm-shard", version, about, after_help = EXAMPLES_AND_EXIT_CODES)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Split a command into shards and run each in a fresh environment.
    Run(RunArgs),
    /// The in-VM agent: the bootstrap of the Lambda image (a Lambda custom
    /// runtime), or with --microvm the MicroVM image's application. Hidden
    /// from the list, since only images start it; `mvm-shard agent --help`
    /// still documents it.
    #[command(hide = true)]
    Agent(AgentArgs),
    /// Serve a local Lambda emulator on loopback (no Docker, no AWS).
    Emulate(EmulateArgs),
    /// Check a deployment: credentials, region, the function, its configuration, a real round trip.
    Doctor(DoctorArgs),
}

/// `mvm-shard agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Serve one shard in a Lambda MicroVM (lifecycle hooks and the log over
    /// HTTP) instead of acting as a Lambda custom runtime.
    #[arg(long)]
    pub microvm: bool,
}

/// `mvm-shard doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The Lambda function (name or ARN) to check.
    #[arg(
        long,
        env = "MVM_SHARD_FUNCTION",
        value_name = "NAME",
        default_value = "mvm-shard"
    )]
    pub function: String,
    /// Call another endpoint than AWS's (for example `mvm-shard emulate`).
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// AWS region (default: from the environment or profile).
    #[arg(long)]
    pub region: Option<String>,
    /// The function is meant to run without tenant isolation.
    #[arg(long)]
    pub no_tenant_isolation: bool,
}

/// `mvm-shard doctor`: returns the exit status (0 healthy, 1 problems, 2 no configuration).
pub async fn doctor(args: DoctorArgs) -> i32 {
    let backend = LambdaBackend::connect(LambdaOptions {
        function: args.function,
        endpoint_url: args.endpoint_url,
        region: args.region,
        tenant_isolation: !args.no_tenant_isolation,
        local_credentials: false,
    })
    .await;
    match backend {
        Ok(backend) => crate::doctor::print(
            &crate::doctor::diagnose(&backend, !args.no_tenant_isolation).await,
        ),
        Err(e) => {
            println!("PROBLEM  credentials and region: {e}");
            2
        }
    }
}

/// `mvm-shard run`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES_AND_EXIT_CODES)]
#[command(group(ArgGroup::new("target").required(true).args(["local", "function", "microvm_image"])))]
pub struct RunArgs {
    /// Run on an embedded local emulator, with no AWS at all.
    #[arg(long)]
    pub local: bool,
    /// The Lambda function (name or ARN) that runs the shards.
    #[arg(long, env = "MVM_SHARD_FUNCTION", value_name = "NAME")]
    pub function: Option<String>,
    /// Run each shard in a Lambda MicroVM started from this image (ARN or name).
    #[arg(long, value_name = "ARN")]
    pub microvm_image: Option<String>,
    /// Version of the MicroVM image (default: the latest).
    #[arg(long, value_name = "V", requires = "microvm_image")]
    pub image_version: Option<String>,
    /// Role the MicroVMs run with.
    #[arg(long, value_name = "ARN", requires = "microvm_image")]
    pub execution_role_arn: Option<String>,
    /// Call another endpoint than AWS's (for example `mvm-shard emulate`).
    #[arg(long, value_name = "URL", conflicts_with = "local")]
    pub endpoint_url: Option<String>,
    /// AWS region (default: from the environment or profile).
    #[arg(long, conflicts_with = "local")]
    pub region: Option<String>,
    /// How many shards to split the command into.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub shards: u32,
    /// Run only these shards of N (e.g. `1,3` or `2-4`), for matrix jobs.
    #[arg(long, value_name = "LIST")]
    pub only: Option<String>,
    /// Shards in flight at once (default: 64 on Lambda, the CPU count locally).
    #[arg(long, value_name = "K")]
    pub max_parallel: Option<usize>,
    /// Time limit of each shard (e.g. `90s`, `10m`).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Pass NAME from this environment, or set NAME=VALUE, in every shard.
    #[arg(long = "env", value_name = "NAME[=VALUE]")]
    pub env: Vec<String>,
    /// In GitHub Actions, mask the value of this `--env` variable in the log
    /// (repeatable). Values from `secrets.*` are masked by GitHub already;
    /// nothing else is masked unless named here.
    #[arg(long = "mask", value_name = "NAME")]
    pub mask: Vec<String>,
    /// Directory to ship (default: the git working tree of the current directory).
    #[arg(long, value_name = "DIR", conflicts_with = "source_from")]
    pub source: Option<PathBuf>,
    /// `tree`: ship the local tree (default). `github`: each VM fetches the
    /// workflow's commit (GITHUB_REPOSITORY at GITHUB_SHA) from a short-lived
    /// tarball link obtained with GITHUB_TOKEN, which never leaves this machine.
    #[arg(long, value_enum, default_value = "tree")]
    pub source_from: SourceFrom,
    /// The function does not use tenant isolation: send no tenant id.
    #[arg(long)]
    pub no_tenant_isolation: bool,
    /// A file or folder to lay over the source in every shard (repeatable),
    /// at its place relative to the repository root, ignored or not: build
    /// outputs prepared here, such as a `cargo nextest archive`.
    #[arg(long, value_name = "PATH")]
    pub include: Vec<PathBuf>,
    /// JUnit XML files each shard writes (glob, relative to its working
    /// directory; repeatable): sent back, annotated and merged.
    #[arg(long, value_name = "GLOB")]
    pub junit: Vec<String>,
    /// Where the merged JUnit report goes (with --junit).
    #[arg(long, value_name = "PATH", default_value = "mvm-shard-junit.xml")]
    pub report: PathBuf,
    /// The command each shard runs; `{index}` and `{count}` are replaced.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Where the shards' source comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceFrom {
    /// The local working tree (or `--source DIR`).
    Tree,
    /// The workflow's commit, as a GitHub tarball link.
    Github,
}

/// `mvm-shard emulate`.
#[derive(Debug, Args)]
pub struct EmulateArgs {
    /// Address to serve the Invoke API on.
    #[arg(long, default_value = "127.0.0.1:9001")]
    pub listen: SocketAddr,
    /// A function to host: its bootstrap command, run with `sh -c` (repeatable).
    /// Without any, hosts `mvm-shard`, whose bootstrap is this binary's agent.
    /// `exec` the runtime: a shell that stays keeps the function's credentials
    /// in an environment everything below it can read.
    #[arg(long = "function", value_name = "NAME=COMMAND")]
    pub functions: Vec<String>,
    /// Put these functions in tenant isolation mode (repeatable). The default
    /// `mvm-shard` function always is, as the deployment template sets it up.
    #[arg(long = "tenant-isolated", value_name = "NAME")]
    pub tenant_isolated: Vec<String>,
    /// Invocation timeout of every function.
    #[arg(long, default_value = "900s", value_parser = humantime::parse_duration)]
    pub function_timeout: Duration,
    /// Memory size reported to functions, in MB.
    #[arg(long, default_value_t = 10_240)]
    pub memory: u32,
    /// Environments per function before invocations are throttled (429).
    #[arg(long, default_value_t = 1000)]
    pub max_concurrency: usize,
    /// Region reported to functions.
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
    /// A MicroVM image to host: its application's command, run with `sh -c`
    /// in each microVM (repeatable). Without any, hosts `mvm-shard`, this
    /// binary's `agent --microvm`.
    #[arg(long = "microvm-image", value_name = "NAME=COMMAND")]
    pub microvm_images: Vec<String>,
    /// Pace streamed responses as Lambda does: the first 6 MB at full speed,
    /// then at most 2 MB/s.
    #[arg(long)]
    pub throttle_streams: bool,
    /// Fault injection: MicroVM auth tokens live this long, whatever was asked
    /// (to test that clients renew them).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub fault_token_lifetime: Option<Duration>,
    /// Fault injection: every response through a MicroVM endpoint breaks off
    /// after this many bytes (to test that clients resume).
    #[arg(long, value_name = "BYTES")]
    pub fault_cut_responses_after: Option<u64>,
    /// Fault injection: the first answer to each `RunMicrovm` client token is
    /// held back this long while the microVM starts anyway (a slow or lost
    /// response), to test that clients still find and terminate it.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub fault_hold_run_answers: Option<Duration>,
}

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
    /// The GitHub source is misconfigured (exit 2).
    #[error("--source-from github: {0}")]
    Github(String),
    /// Something local failed (exit 3).
    #[error("{0}")]
    Local(String),
}

impl RunError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Local(_) => 3,
            _ => 2,
        }
    }
}

/// `mvm-shard run`: returns the exit status (0, 1 or 3).
pub async fn run(args: RunArgs) -> Result<i32, RunError> {
    if args.shards == 0 || args.shards > 10_000 {
        return Err(PlanError::ShardCount(args.shards).into());
    }
    if args.max_parallel == Some(0) {
        return Err(PlanError::MaxParallel.into());
    }
    let only = args
        .only
        .as_deref()
        .map(|o| plan::parse_only(o, args.shards))
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
    let archive = match &github {
        // The commit's tree comes from GitHub; only the working directory is needed here.
        Some(_) => crate::source::SourceArchive::nothing(&source_dir),
        None => tokio::task::spawn_blocking(move || crate::source::pack(&source_dir))
            .await
            .map_err(|e| RunError::Local(e.to_string()))??,
    };
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let mut spec = RunSpec {
        shards: args.shards,
        only,
        command: args.command.clone(),
        env,
        timeout: args.timeout,
        workdir: archive.workdir.clone(),
        collect: args.junit.clone(),
        overlay: None,
    };

    if !args.include.is_empty() {
        let cwd = std::env::current_dir().map_err(|e| RunError::Local(e.to_string()))?;
        let include = args.include.clone();
        let extra = tokio::task::spawn_blocking(move || crate::source::pack_extra(&cwd, &include))
            .await
            .map_err(|e| RunError::Local(e.to_string()))??;
        let encoded = base64::engine::general_purpose::STANDARD.encode(&extra.bytes);
        if encoded.len() > crate::protocol::MAX_REQUEST_BYTES - 64 * 1024 {
            return Err(PlanError::IncludeTooLarge {
                size: human_bytes(extra.bytes.len() as u64),
            }
            .into());
        }
        spec.overlay = Some(encoded);
    }
    let budget = plan::inline_budget(&spec, &run_id)?;
    let mut archive_server = None;
    let source = if github.is_some() {
        SourceSpec::Empty
    } else if archive.bytes.len() <= budget {
        SourceSpec::Inline {
            archive: base64::engine::general_purpose::STANDARD.encode(&archive.bytes),
        }
    } else if args.local {
        let server = ArchiveServer::start(archive.bytes.clone().into())
            .await
            .map_err(|e| RunError::Local(format!("cannot serve the source archive: {e}")))?;
        let url = server.url.clone();
        archive_server = Some(server);
        SourceSpec::Url {
            url,
            format: crate::protocol::ArchiveFormat::TarZst,
            strip_components: 0,
        }
    } else {
        return Err(PlanError::SourceTooLarge {
            size: human_bytes(archive.bytes.len() as u64),
            limit: human_bytes(budget as u64),
        }
        .into());
    };
    let jobs = plan::jobs(&spec, &run_id, &source)?;

    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let max_parallel = args
        .max_parallel
        .unwrap_or(if args.local { cpus.max(2) } else { 64 });
    let mut emulator = None;
    let options = if args.local {
        let mut function =
            FunctionConfig::default_agent().map_err(|e| RunError::Local(e.to_string()))?;
        function.max_concurrency = max_parallel;
        let inherited = LocalEnvironment::from_host(&archive.root, |n| std::env::var(n).ok());
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
        })
        .await
        .map_err(|e| RunError::Local(format!("cannot start the local emulator: {e}")))?;
        let options = LambdaOptions {
            function: DEFAULT_FUNCTION.into(),
            endpoint_url: Some(running.endpoint.clone()),
            region: None,
            tenant_isolation: true,
            local_credentials: true,
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
        }
    };
    let backend: Arc<dyn Backend> = match &args.microvm_image {
        Some(image) => Arc::new(
            MicrovmBackend::connect(MicrovmOptions {
                image: image.clone(),
                image_version: args.image_version.clone(),
                execution_role_arn: args.execution_role_arn.clone(),
                endpoint_url: args.endpoint_url.clone(),
                region: args.region.clone(),
                local_credentials: false,
            })
            .await?,
        ),
        None => Arc::new(LambdaBackend::connect(options).await?),
    };

    eprintln!(
        "mvm-shard: run {run_id}: {} of {} shards on {}, source {} ({} files, {})",
        jobs.len(),
        args.shards,
        match (&args.microvm_image, &args.function) {
            _ if args.local => "the local emulator".to_string(),
            (Some(image), _) => format!("MicroVMs of image {image}"),
            (None, function) => format!("function {}", function.as_deref().unwrap_or("")),
        },
        archive.root.display(),
        archive.entries,
        human_bytes(archive.bytes.len() as u64),
    );

    let shutdown = Shutdown::from_os()
        .map_err(|e| RunError::Local(format!("cannot handle SIGINT and SIGTERM: {e}")))?;
    let cancel = CancellationToken::new();
    let signals = tokio::spawn(escalate(shutdown.clone(), cancel.clone(), backend.clone()));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut reporter: Box<dyn Reporter> =
        if std::env::var("GITHUB_ACTIONS").as_deref() == Ok("true") {
            let mut files = GithubFiles::from_env();
            if !args.junit.is_empty() {
                files.report = Some(args.report.clone());
                files.junit = args.junit.clone();
            }
            let mut github = GithubReporter::new(std::io::stdout(), files);
            let links = links_to_mask.iter().map(String::as_str);
            let named = args.mask.iter().filter_map(|name| spec.env.get(name));
            for value in named.map(String::as_str).chain(links) {
                let _ = github.mask(value);
            }
            Box::new(github)
        } else {
            let terminal = TerminalReporter::new(std::io::stdout());
            use std::io::IsTerminal;
            if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
                let bar = indicatif::ProgressBar::new(jobs.len() as u64);
                bar.enable_steady_tick(Duration::from_millis(200));
                Box::new(terminal.with_progress(bar))
            } else {
                Box::new(terminal)
            }
        };
    let reporter = tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            if reporter.handle(&event).is_err() {
                break;
            }
        }
        reporter
    });
    let dispatch_options = DispatchOptions {
        max_parallel,
        source: github.map(|g| g as Arc<dyn dispatch::SourceResolver>),
        ..DispatchOptions::default()
    };
    let summary = dispatch::dispatch(
        backend.clone(),
        &run_id,
        jobs,
        &dispatch_options,
        tx,
        cancel,
    )
    .await;
    // Whatever happened, nothing the run started may outlive it (MicroVMs cost money).
    let released = backend.shutdown().await;
    signals.abort();
    let left_running = tell_released(&released, shutdown.last());
    let mut reporter = reporter.await.map_err(|e| RunError::Local(e.to_string()))?;
    let tests = TestReport::from_summary(&summary);
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
    let _ = reporter.finish(&summary, &tests);
    if let Some(emulator) = emulator {
        let _ = emulator.shutdown().await;
    }
    if let Some(server) = archive_server {
        server.shutdown().await;
    }
    Ok(if left_running {
        summary.exit_code().max(3)
    } else {
        summary.exit_code()
    })
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
fn github_links() -> Result<crate::github::TarballLinks, RunError> {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let api = std::env::var("GITHUB_API_URL").unwrap_or_else(|_| "https://api.github.com".into());
    crate::github::TarballLinks::new(
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

/// `mvm-shard emulate`: serves until SIGINT or SIGTERM.
pub async fn emulate(args: EmulateArgs) -> anyhow::Result<()> {
    let mut functions = Vec::new();
    for spec in &args.functions {
        let (name, command) = spec
            .split_once('=')
            .filter(|(n, c)| !n.is_empty() && !c.is_empty())
            .ok_or_else(|| anyhow::anyhow!("--function {spec:?}: expected NAME=COMMAND"))?;
        let mut f = FunctionConfig::new(name, vec!["/bin/sh".into(), "-c".into(), command.into()]);
        f.tenant_isolation = args.tenant_isolated.iter().any(|n| n == name);
        functions.push(f);
    }
    if functions.is_empty() {
        functions.push(FunctionConfig::default_agent()?);
    }
    for f in &mut functions {
        f.timeout = args.function_timeout;
        f.memory_mb = args.memory;
        f.max_concurrency = args.max_concurrency;
    }
    let mut microvm_images = Vec::new();
    for spec in &args.microvm_images {
        let (name, command) = spec
            .split_once('=')
            .filter(|(n, c)| !n.is_empty() && !c.is_empty())
            .ok_or_else(|| anyhow::anyhow!("--microvm-image {spec:?}: expected NAME=COMMAND"))?;
        microvm_images.push(MicrovmImageConfig::new(
            name,
            vec!["/bin/sh".into(), "-c".into(), command.into()],
        ));
    }
    if microvm_images.is_empty() {
        microvm_images.push(MicrovmImageConfig::default_agent()?);
    }
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let names: Vec<&str> = functions.iter().map(|f| f.name.as_str()).collect();
    let images: Vec<&str> = microvm_images.iter().map(|i| i.name.as_str()).collect();
    eprintln!(
        "mvm-shard emulator: functions {}; microVM images {}",
        names.join(", "),
        images.join(", ")
    );
    println!("{endpoint}");
    use std::io::Write;
    std::io::stdout().flush()?;
    let emulator = crate::emulator::Emulator::new(EmulatorConfig {
        functions,
        region: args.region,
        microvm_images,
        microvm_faults: crate::emulator::MicrovmFaults {
            token_lifetime: args.fault_token_lifetime,
            cut_responses_after: args.fault_cut_responses_after,
            hold_run_answers: args.fault_hold_run_answers,
        },
        throttle_streams: args.throttle_streams,
    })?;
    let shutdown = Shutdown::from_os()?;
    emulator
        .serve(listener, async move {
            shutdown.requested().await;
        })
        .await?;
    Ok(())
}
