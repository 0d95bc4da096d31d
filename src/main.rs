//! The `mvm-shard` binary: parse the command line, run the library, map the
//! outcome to the exit status (0 passed, 1 a shard failed, 2 bad usage or
//! configuration, 3 a shard could not run or its result never arrived).

use std::process::ExitCode;

use clap::Parser;
use mvm_shard::cli::{self, Cli, Command};

/// Whether this runs as a GitHub Actions step.
fn in_github_actions() -> bool {
    std::env::var("GITHUB_ACTIONS").as_deref() == Ok("true")
}

/// Tells a usage or configuration error (exit 2) in one line: on stderr, or
/// in GitHub Actions as an `::error` annotation with the step outputs written.
fn usage_error(message: &str, summary: Option<&mvm_shard::dispatch::RunSummary>) {
    if in_github_actions() {
        let files = mvm_shard::report::github::GithubFiles::from_env();
        let written = mvm_shard::report::github::usage_error(
            &mut std::io::stdout(),
            &files,
            message,
            summary,
        );
        if let Err(e) = written {
            eprintln!("error: {message} (and the step outputs could not be written: {e})");
        }
    } else {
        eprintln!("error: {message}");
    }
}

fn main() -> ExitCode {
    // Any process on the machine can read a command line, and with `run
    // --local` the shards run on this one: `--env NAME=VALUE` values leave
    // it, once copied for parsing. This needs /proc/self/mem, which closes below.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let has_env_value = args
        .iter()
        .any(|a| a.as_encoded_bytes().starts_with(b"--env"));
    let masked = if has_env_value {
        mvm_shard::os::rewrite_command_line(mask_env_values)
    } else {
        Ok(())
    };
    // Then, before any credential is read or any thread or child exists: the
    // agent's commands, and with `run --local` the shards, run as this same
    // user and must not read this process's environment or memory.
    let hidden = mvm_shard::os::hide_from_same_user()
        .and_then(|()| mvm_shard::os::close_inherited_descriptors_on_exec());
    if let Err(e) = hidden {
        eprintln!("error: cannot close this process to its children: {e}");
        return ExitCode::from(3);
    }
    if let Err(e) = masked {
        eprintln!("mvm-shard: warning: cannot hide --env values from the process list: {e}");
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() && in_github_actions() => {
            // clap's first line says what is wrong; the rest is usage help.
            let rendered = e.to_string();
            let first = rendered.lines().next().unwrap_or_default();
            usage_error(first.strip_prefix("error: ").unwrap_or(first), None);
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    let default_filter = match cli.command {
        Command::Agent(_) => "info",
        // A GitHub Actions re-run "with debug logging" sets RUNNER_DEBUG=1.
        // The credential chain warns of every provider it tried; the one-line
        // error that follows says what matters.
        _ if std::env::var("RUNNER_DEBUG").as_deref() == Ok("1") => {
            "warn,aws_config=error,mvm_shard=debug"
        }
        _ => "warn,aws_config=error",
    };
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        // No colour codes in a log file or a CI log.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    mvm_shard::os::limit_malloc_arenas();
    let runtime = match cli.command {
        // The Lambda agent runs one shard at a time: one thread is enough.
        // Its blocking threads end as soon as they are idle: an emulator
        // walking the agent's tree at teardown reads each thread's children,
        // and reaping a process whose threads were read that way cost the
        // kernel milliseconds (shrinking their /proc entries).
        Command::Agent(ref args) if !args.microvm => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_keep_alive(std::time::Duration::ZERO)
            .build(),
        _ => tokio::runtime::Runtime::new(),
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let code = match cli.command {
        Command::Run(args) => match runtime.block_on(cli::run(*args)) {
            Ok(code) => code,
            Err(e) if e.exit_code() == 2 => {
                usage_error(&e.to_string(), e.summary());
                2
            }
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
        Command::MergeTimings(args) => cli::merge_timings(&args),
        Command::Emulate(args) => match runtime.block_on(cli::emulate(*args)) {
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

/// Overwrites with `*` the value of every `--env NAME=VALUE` (or
/// `--env=NAME=VALUE`) before the `--` that starts the command, in a
/// NUL-separated command line, keeping its length.
fn mask_env_values(cmdline: &mut [u8]) {
    let mut value_follows = false;
    for arg in cmdline.split_mut(|b| *b == 0) {
        if arg == b"--" {
            break;
        }
        let skip = if value_follows {
            Some(0)
        } else {
            arg.strip_prefix(b"--env=").map(|_| b"--env=".len())
        };
        value_follows = arg == b"--env";
        if let Some(skip) = skip {
            if let Some(eq) = arg[skip..].iter().position(|b| *b == b'=') {
                arg[skip + eq + 1..].fill(b'*');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mask_env_values;

    #[test]
    fn env_values_are_masked_up_to_the_command() {
        let mut line =
            b"mvm-shard\0run\0--env\0A=secret\0--env=B=x=y\0--env\0PASSED\0--\0--env\0C=shown\0"
                .to_vec();
        mask_env_values(&mut line);
        assert_eq!(
            line,
            b"mvm-shard\0run\0--env\0A=******\0--env=B=***\0--env\0PASSED\0--\0--env\0C=shown\0"
                .to_vec()
        );
    }
}
