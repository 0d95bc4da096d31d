//! One emulated execution environment: a fresh process in a fresh folder with
//! the variables Lambda sets, its own Runtime API, and a log tail.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use super::output_tail::OutputTail;
use super::runtime::{self, PendingInvocation, RuntimeApi};
use super::FunctionConfig;
use crate::os;

/// Variable set in every environment's bootstrap, inherited by what it starts,
/// so that processes which escaped the tree are still found on destroy.
pub const ENVIRONMENT_MARKER: &str = crate::protocol::runtime_api::EMULATED_ENVIRONMENT;

/// Bytes of log kept for `LogResult` (Lambda returns the last 4 KB).
const LOG_TAIL: usize = 4096;

/// A running environment; dropping the last handle does not stop it, [`Environment::destroy`] does.
pub struct Environment {
    /// Short id, for logs.
    pub id: String,
    /// Hands invocations to the runtime's `next`; boxed, as a channel's
    /// first block holds 32 of its messages and one is open per environment.
    pub invocations: mpsc::Sender<Box<PendingInvocation>>,
    /// Fires once the runtime process has exited and its tree is gone.
    pub exited: CancellationToken,
    /// The Runtime API state, to read an init error.
    pub runtime: Arc<RuntimeApi>,
    log: OutputTail,
    kill: CancellationToken,
}

impl Environment {
    /// Starts `function`'s command with a new, empty /tmp under `base`, in
    /// `task` (the emulator's one empty, read-only `LAMBDA_TASK_ROOT`).
    pub async fn spawn(
        function: &FunctionConfig,
        region: &str,
        base: &std::path::Path,
        task: &std::path::Path,
    ) -> std::io::Result<Arc<Self>> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        // The environment's /tmp is the one folder it gets: each folder made
        // and removed costs a file-system inode allocation per shard, which
        // dominated the CPU of short shards on ext4.
        let tmp = base.join(format!("env-{id}"));
        std::fs::create_dir(&tmp)?;
        // As on Lambda, a function that drops privileges may write /tmp and nothing else.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))?;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let runtime_addr = listener.local_addr()?;
        let (invocations, rx) = mpsc::channel(1);
        let kill = CancellationToken::new();
        let exited = CancellationToken::new();
        let runtime = RuntimeApi::new(rx, kill.clone(), exited.clone());
        let server_stop = exited.clone();
        // Shared by the connections (see `Emulator::serve`).
        let router = axum::ServiceExt::<axum::extract::Request>::into_make_service(
            runtime::RuntimeService::new(runtime.clone()),
        );
        tokio::spawn(async move {
            use axum::serve::ListenerExt;
            let served = axum::serve(listener.tap_io(crate::net::no_delay), router)
                .with_graceful_shutdown(async move { server_stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "runtime API server failed");
            }
        });

        let (program, args) = function.command.split_first().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "function command is empty",
            )
        })?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(task)
            .env_clear()
            .envs(lambda_environment(
                function,
                region,
                &id,
                &runtime_addr.to_string(),
                task,
                &tmp,
            ))
            .envs(function.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let log = OutputTail::new(LOG_TAIL);
        log.follow(&mut child, &format!("{}/{id}", function.name));

        let watch_kill = kill.clone();
        let watch_exited = exited.clone();
        let env_id = id.clone();
        tokio::spawn(async move {
            let pid = child.id();
            tokio::select! {
                status = child.wait() => tracing::debug!(env = %env_id, ?status, "runtime exited"),
                () = watch_kill.cancelled() => {}
            }
            // Kill whatever the runtime left below it, then the runtime itself,
            // then anything that escaped the tree but still carries the marker.
            if let Some(pid) = pid {
                os::end_descendants(pid, Duration::ZERO, false).await;
            }
            let _ = child.start_kill();
            let _ = child.wait().await;
            let marker = env_id.clone();
            os::kill_marked_shared(ENVIRONMENT_MARKER, &marker).await;
            watch_exited.cancel();
            // A few removals at a time: a thousand environments ending together
            // would otherwise start hundreds of blocking threads at once.
            static REMOVALS: Semaphore = Semaphore::const_new(4);
            let _turn = REMOVALS.acquire().await;
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&tmp)).await;
        });

        Ok(Arc::new(Environment {
            id,
            invocations,
            exited,
            runtime,
            log,
            kill,
        }))
    }

    /// Kills the environment's process tree; `exited` fires when it is gone.
    pub fn destroy(&self) {
        self.kill.cancel();
    }

    /// Whether the runtime is still running.
    pub fn is_alive(&self) -> bool {
        !self.exited.is_cancelled() && !self.kill.is_cancelled()
    }

    /// Appends an emulator line (START, END, REPORT) to the log.
    pub fn log_line(&self, line: &str) {
        self.log.push(format!("{line}\n").as_bytes());
    }

    /// Clears the log tail at the start of an invocation.
    pub fn clear_log(&self) {
        self.log.clear();
    }

    /// The last 4 KB of log since [`Environment::clear_log`].
    pub fn log_tail(&self) -> Vec<u8> {
        self.log.snapshot()
    }
}

/// The variables Lambda sets for a bootstrap, with emulator values.
fn lambda_environment(
    function: &FunctionConfig,
    region: &str,
    env_id: &str,
    runtime_api: &str,
    task: &std::path::Path,
    tmp: &std::path::Path,
) -> Vec<(String, String)> {
    let host =
        |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
    let mut vars = vec![
        ("AWS_LAMBDA_RUNTIME_API", runtime_api.to_string()),
        ("AWS_LAMBDA_FUNCTION_NAME", function.name.clone()),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".into()),
        (
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
            function.memory_mb.to_string(),
        ),
        (
            "AWS_LAMBDA_LOG_GROUP_NAME",
            format!("/aws/lambda/{}", function.name),
        ),
        (
            "AWS_LAMBDA_LOG_STREAM_NAME",
            format!("emulated/[$LATEST]{env_id}"),
        ),
        ("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand".into()),
        ("AWS_REGION", region.to_string()),
        ("AWS_DEFAULT_REGION", region.to_string()),
        // Per-environment stand-ins for the execution role's credentials.
        (
            "AWS_ACCESS_KEY_ID",
            format!("ASIAEMULATOR{}", env_id.to_uppercase()),
        ),
        ("AWS_SECRET_ACCESS_KEY", format!("emulated-secret-{env_id}")),
        ("AWS_SESSION_TOKEN", format!("emulated-session-{env_id}")),
        ("_HANDLER", function.handler.clone()),
        ("LAMBDA_TASK_ROOT", task.display().to_string()),
        ("LAMBDA_RUNTIME_DIR", task.display().to_string()),
        ("TZ", ":UTC".into()),
        ("LANG", "en_US.UTF-8".into()),
        ("PATH", host("PATH", "/usr/local/bin:/usr/bin:/bin")),
        ("TMPDIR", tmp.display().to_string()),
        (ENVIRONMENT_MARKER, env_id.to_string()),
    ];
    if let Ok(ld) = std::env::var("LD_LIBRARY_PATH") {
        vars.push(("LD_LIBRARY_PATH", ld));
    }
    vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}
