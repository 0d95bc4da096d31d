//! The `mvm-shard` binary: parse the command line, run the library, map the
//! outcome to the exit status (0 passed, 1 a shard failed, 2 bad usage or
//! configuration, 3 a shard could not run or its result never arrived).

use std::process::ExitCode;

use clap::Parser;
use mvm_shard::cli::{self, Cli, Command};

fn main() -> ExitCode {
    // First, before any credential is read or any thread or child exists:
    // the agent's commands, and with `run --local` the shards, run as this
    // same user and must not read this process's environment or memory.
    let hidden = mvm_shard::os::hide_from_same_user()
        .and_then(|()| mvm_shard::os::close_inherited_descriptors_on_exec());
    if let Err(e) = hidden {
        eprintln!("error: cannot close this process to its children: {e}");
        return ExitCode::from(3);
    }
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Agent(_) => "info",
        // A GitHub Actions re-run "with debug logging" sets RUNNER_DEBUG=1.
        _ if std::env::var("RUNNER_DEBUG").as_deref() == Ok("1") => "warn,mvm_shard=debug",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let code = match cli.command {
        Command::Run(args) => match runtime.block_on(cli::run(args)) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e}");
                e.exit_code()
            }
        },
        Command::Agent(args) if args.microvm => {
            match runtime.block_on(mvm_shard::agent::microvm::run()) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("error: {:#}", anyhow::Error::from(e));
                    1
                }
            }
        }
        Command::Agent(_) => match runtime.block_on(mvm_shard::agent::run()) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        },
        Command::Doctor(args) => runtime.block_on(cli::doctor(args)),
        Command::Emulate(args) => match runtime.block_on(cli::emulate(args)) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e:#}");
                2
            }
        },
    };
    // Detached tasks (idle connections) must not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    ExitCode::from(code as u8)
}
