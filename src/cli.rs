//! The command line: `run`, `agent`, `emulate` and `doctor` parse here and
//! hand over to the library ([`crate::run`] drives a run).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::backend::{LambdaBackend, LambdaOptions};
use crate::emulator::{EmulatorConfig, FunctionConfig, MicrovmImageConfig};
pub use crate::run::RunError;
use crate::shutdown::Shutdown;

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
    Run(Box<RunArgs>),
    /// The in-VM agent: the bootstrap of the Lambda image (a Lambda custom
    /// runtime), or with --microvm the MicroVM image's application. Hidden
    /// from the list, since only images start it; `mvm-shard agent --help`
    /// still documents it.
    #[command(hide = true)]
    Agent(AgentArgs),
    /// Serve a local Lambda emulator on loopback (no Docker, no AWS).
    Emulate(Box<EmulateArgs>),
    /// Check a deployment: credentials, region, the function, its configuration, a real round trip.
    Doctor(DoctorArgs),
    /// Take into a timings file what another job of the same workflow run
    /// learned (the GitHub Action's matrix jobs, before saving the cache).
    /// Hidden: only the action calls it.
    #[command(hide = true)]
    MergeTimings(MergeTimingsArgs),
}

/// `mvm-shard merge-timings`.
#[derive(Debug, Args)]
pub struct MergeTimingsArgs {
    /// This job's timings file (`--timings`), updated in place.
    #[arg(value_name = "INTO")]
    pub into: PathBuf,
    /// Another job's file of the same workflow run; missing is nothing to add.
    #[arg(value_name = "FROM")]
    pub from: PathBuf,
}

/// `mvm-shard merge-timings`: exit 0; 1 when the other job planned with
/// other timings (the jobs' shards may not have partitioned the tests); 2
/// when a file cannot be read or written. A file of a newer format version
/// (a newer mvm-shard's) is left as it is and nothing is merged, as `run`
/// leaves it: exit 0, said once.
pub fn merge_timings(args: &MergeTimingsArgs) -> i32 {
    use crate::runner::timings::{Merge, Timings, TimingsError};
    let merged = Timings::load(&args.into).and_then(|mut into| {
        let merge = into.merge_run(&Timings::load(&args.from)?);
        into.save(&args.into).map(|()| merge)
    });
    match merged {
        Err(e @ TimingsError::Newer { .. }) => {
            eprintln!("mvm-shard: warning: {e}: leaving both files as they are; nothing merged");
            0
        }
        Ok(Merge::Added(added)) => {
            eprintln!(
                "mvm-shard: took in the durations of {} another job of this workflow run learned",
                crate::report::plural(added, "test")
            );
            0
        }
        Ok(Merge::OtherRun) => 0,
        Ok(Merge::OtherSnapshot) => {
            let message =
                "the jobs of this workflow run did not all plan with the same learned timings \
                 (another run saved its cache while they were starting), so their shards may have \
                 run some tests twice and others not at all. Re-run all jobs: a re-run plans every \
                 job with the timings this run saved";
            if std::env::var_os("GITHUB_ACTIONS").is_some() {
                println!("::error title=mvm-shard::{message}");
            } else {
                eprintln!("error: {message}");
            }
            1
        }
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
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
        default_value = "mvm-shard",
        value_parser = non_empty
    )]
    pub function: String,
    /// Call another endpoint than AWS's (for example `mvm-shard emulate`).
    #[arg(long, value_name = "URL", value_parser = endpoint_url)]
    pub endpoint_url: Option<String>,
    /// AWS region (default: from the environment or profile).
    #[arg(long, value_parser = non_empty)]
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
        http_client: None,
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
// What knows the tests: --runner, or a replayed plan (which names its runner).
#[command(group(ArgGroup::new("tests_known").multiple(true).args(["runner", "replay_plan"])))]
pub struct RunArgs {
    /// Run on an embedded local emulator, with no AWS at all.
    #[arg(long)]
    pub local: bool,
    /// The Lambda function (name or ARN) that runs the shards.
    #[arg(long, env = "MVM_SHARD_FUNCTION", value_name = "NAME", value_parser = non_empty)]
    pub function: Option<String>,
    /// Run each shard in a Lambda MicroVM started from this image (ARN or name).
    #[arg(long, value_name = "ARN", value_parser = non_empty)]
    pub microvm_image: Option<String>,
    /// Version of the MicroVM image (default: the latest).
    #[arg(long, value_name = "V", value_parser = non_empty, requires = "microvm_image", conflicts_with_all = ["local", "function"])]
    pub image_version: Option<String>,
    /// Role the MicroVMs run with.
    #[arg(long, value_name = "ARN", value_parser = non_empty, requires = "microvm_image", conflicts_with_all = ["local", "function"])]
    pub execution_role_arn: Option<String>,
    /// Call another endpoint than AWS's (for example `mvm-shard emulate`).
    #[arg(long, value_name = "URL", conflicts_with = "local", value_parser = endpoint_url)]
    pub endpoint_url: Option<String>,
    /// AWS region (default: from the environment or profile).
    #[arg(long, conflicts_with = "local", value_parser = non_empty)]
    pub region: Option<String>,
    /// How many shards to split the command into [default: 1].
    #[arg(long, value_name = "N")]
    pub shards: Option<u32>,
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
    /// Colour: `auto` (on a terminal, unless NO_COLOR is set; CLICOLOR_FORCE
    /// forces it), `always` or `never`.
    #[arg(long, value_enum, default_value = "auto", value_name = "WHEN")]
    pub color: crate::report::color::ColorChoice,
    /// Whose output is shown as the run goes: `all`, `failed` (a shard that
    /// did not pass, whole, when it ends) or `none`. The end of every failure's
    /// output is repeated at the end either way. Default: `all` up to 24
    /// shards, `failed` past that.
    #[arg(long, value_enum, value_name = "WHICH")]
    pub output: Option<crate::report::terminal::OutputMode>,
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
    /// Where archives too large for a request travel: an S3 location
    /// (`s3://BUCKET/PREFIX`) the invoker uploads to, content-addressed;
    /// each shard downloads through a short-lived presigned link.
    #[arg(long, env = "MVM_SHARD_ARTIFACTS", value_name = "S3URL")]
    pub artifacts: Option<String>,
    /// A dependency folder restored in every shard from the artifact store
    /// (or, with --local, the repository's git directory), keyed by the
    /// hash of the key files (repeatable), e.g. `node_modules=package-lock.json`;
    /// on a miss the first shard that passes saves it.
    #[arg(long = "cache", value_name = "PATH=KEYFILES")]
    pub caches: Vec<String>,
    /// JUnit XML files each shard writes (glob, relative to its working
    /// directory; repeatable): sent back, annotated and merged.
    #[arg(long, value_name = "GLOB")]
    pub junit: Vec<String>,
    /// Where the merged JUnit report goes (with --junit).
    #[arg(long, value_name = "PATH", default_value = "mvm-shard-junit.xml")]
    pub report: PathBuf,
    /// Know the tests: list them with this runner's listing, split them into
    /// the shards by learned duration, and put each shard's tests in the
    /// command's `{tests}` (the command must contain it).
    #[arg(long, value_enum, value_name = "NAME")]
    pub runner: Option<crate::runner::RunnerKind>,
    /// The test files for `--runner files` (a glob relative to the working
    /// directory; `**` crosses folders).
    #[arg(long, value_name = "GLOB", requires = "runner")]
    pub files: Option<String>,
    /// List the tests with this shell command instead of the runner's own;
    /// its output must be in the runner's listing format (pytest's node ids,
    /// nextest's, jest's or vitest's JSON, Go import paths, file paths).
    /// A line that is not a test id is exit 2.
    #[arg(long, value_name = "CMD", requires = "runner")]
    pub list_command: Option<String>,
    /// List the tests on this machine, in the working directory, instead of
    /// in a fresh environment of the backend.
    #[arg(long, requires = "runner")]
    pub list_local: bool,
    /// Learned test durations, read to plan and updated after the run
    /// (default: mvm-shard/timings.json in the worktree's git directory;
    /// with --replay-plan, only updated, and only when given).
    #[arg(long, value_name = "PATH", requires = "tests_known")]
    pub timings: Option<PathBuf>,
    /// After the first shard that fails or times out, start no more shards
    /// and stop those in flight (they are reported as interrupted).
    #[arg(long)]
    pub fail_fast: bool,
    /// Rerun what failed up to N times, each time in a new fresh
    /// environment: with --runner, only the tests that did not pass (by the
    /// runner's report or log; the shard's whole part when it names no failed
    /// test); without, the whole
    /// shard. What passes on a rerun is flaky: reported, and the run passes
    /// unless --no-flaky is given.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub retries: u32,
    /// Fail the run when a test (or shard) passed only on a rerun.
    #[arg(long)]
    pub no_flaky: bool,
    /// Run again what a recorded plan gave the shards (with --only K, just
    /// shard K): the same tests, command and runner, without listing. Every
    /// run records its plan next to its report (`junit.xml` →
    /// `junit.plan.json`, with --runner or --junit) and in
    /// mvm-shard/plan.json in the worktree's git directory. A plan whose
    /// command held a --mask value has `***` there instead: give the command
    /// again after --.
    ///
    /// What is given besides (the command, --shards, --runner, --files,
    /// --list-command) must be what the plan was made from, and the source
    /// must be at the commit it was made at: else exit 2, saying what
    /// differs. With --timings, what the shards took is learned.
    #[arg(long, value_name = "FILE", conflicts_with = "list_local")]
    pub replay_plan: Option<PathBuf>,
    /// List the tests and plan the shards, write the plan to FILE, and run
    /// no shard: for matrix jobs (or separate runs) that each run one share
    /// of the same plan with --replay-plan FILE --only K.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["replay_plan", "only"])]
    pub plan_only: Option<PathBuf>,
    /// The command each shard runs; `{index}` and `{count}` are replaced.
    #[arg(
        last = true,
        required_unless_present = "replay_plan",
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
}

impl RunArgs {
    /// `--shards`, 1 when not given.
    pub fn shard_count(&self) -> u32 {
        self.shards.unwrap_or(1)
    }
}

/// A value that must not be empty (`--function ""` is a mistake, not a default).
fn non_empty(value: &str) -> Result<String, String> {
    if value.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(value.to_string())
    }
}

/// An endpoint URL the AWS SDK can call: `http://` or `https://` and a host.
fn endpoint_url(value: &str) -> Result<String, String> {
    let uri: http::Uri = value
        .parse()
        .map_err(|e| format!("not a URL ({e}); expected e.g. http://127.0.0.1:9001"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(host)) if !host.is_empty() => Ok(value.to_string()),
        (Some("http" | "https"), _) => Err("the URL has no host".into()),
        _ => Err(format!(
            "the URL needs a scheme: http://{value} or https://{value}"
        )),
    }
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
    /// Answer invocations of this function with AccessDeniedException, as
    /// Lambda does for a caller without lambda:InvokeFunction (repeatable; to
    /// test how clients tell it).
    #[arg(long = "deny-invoke", value_name = "NAME")]
    pub deny_invoke: Vec<String>,
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
    /// Fault injection: seed of the random faults below, to replay a run.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub fault_seed: u64,
    /// Fault injection: share of Invoke calls answered 429.
    #[arg(long, value_name = "RATE", default_value_t = 0.0, value_parser = fault_rate)]
    pub fault_throttle: f64,
    /// Fault injection: share of Invoke calls answered 500.
    #[arg(long, value_name = "RATE", default_value_t = 0.0, value_parser = fault_rate)]
    pub fault_server_error: f64,
    /// Fault injection: share of invocations whose agent is killed at a random byte of its stream.
    #[arg(long, value_name = "RATE", default_value_t = 0.0, value_parser = fault_rate)]
    pub fault_kill_agent: f64,
    /// Fault injection: share of streams whose connection is dropped at a random byte.
    #[arg(long, value_name = "RATE", default_value_t = 0.0, value_parser = fault_rate)]
    pub fault_drop_connection: f64,
    /// Fault injection: share of streams that end at a random byte with a function error.
    #[arg(long, value_name = "RATE", default_value_t = 0.0, value_parser = fault_rate)]
    pub fault_function_error: f64,
    /// Fault injection: share of streams that stall at a random byte for --fault-stall-for.
    #[arg(long, value_name = "RATE", default_value_t = 0.0, value_parser = fault_rate)]
    pub fault_stall: f64,
    /// Fault injection: how long a stalled stream stalls (past the SDK's 20 s grace by default).
    #[arg(long, value_name = "DURATION", default_value = "25s", value_parser = humantime::parse_duration)]
    pub fault_stall_for: Duration,
    /// Fault injection: the random byte of a mid-stream fault is drawn below this.
    #[arg(long, value_name = "BYTES", default_value_t = 4096)]
    pub fault_byte_range: u64,
}

impl EmulateArgs {
    /// The Lambda-side faults these flags ask for.
    pub fn lambda_faults(&self) -> crate::emulator::LambdaFaults {
        crate::emulator::LambdaFaults {
            seed: self.fault_seed,
            throttle: self.fault_throttle,
            server_error: self.fault_server_error,
            kill_agent: self.fault_kill_agent,
            drop_connection: self.fault_drop_connection,
            function_error: self.fault_function_error,
            stall: self.fault_stall,
            stall_for: self.fault_stall_for,
            byte_range: self.fault_byte_range,
        }
    }
}

/// A fault rate: a share of calls, from 0 to 1.
fn fault_rate(raw: &str) -> Result<f64, String> {
    match raw.parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err(format!("{raw:?} is not a rate from 0 to 1")),
    }
}

/// `mvm-shard run`: returns the exit status (0, 1 or 3).
pub async fn run(args: RunArgs) -> Result<i32, RunError> {
    crate::run::run(args).await
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
        f.deny_invoke = args.deny_invoke.contains(&f.name);
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
    let lambda_faults = args.lambda_faults();
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
        lambda_faults,
    })?;
    let shutdown = Shutdown::from_os()?;
    emulator
        .serve(listener, async move {
            shutdown.requested().await;
        })
        .await?;
    Ok(())
}
