//! Running one shard inside the agent: fresh workspace, source, the command in
//! its own process group, live output, deadline, and nothing left behind.

use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::mpsc;

use super::hint;
use super::workspace::{self, Workspace};
use crate::os;
use crate::protocol::{
    ArchiveFormat, Frame, Outcome, OutputStream, ShardRequest, ShardResult, SourceSpec,
};

/// Time the agent keeps before Lambda's own deadline to stop the command and
/// still deliver the result.
const DEADLINE_MARGIN: Duration = Duration::from_secs(3);
/// How long a timed-out or terminated command gets between SIGTERM and SIGKILL.
pub(crate) const TERM_GRACE: Duration = Duration::from_secs(2);
/// How long processes the command left behind get between SIGTERM and SIGKILL.
const STRAGGLER_GRACE: Duration = Duration::from_millis(500);
/// Most output read at once: a command printing fast is read, framed and
/// compressed in large pieces (fewer reads, wakeups and zstd flushes, and
/// zstd compresses a large piece faster); a quiet one's lines come as written.
pub(crate) const READ_CHUNK: usize = 256 * 1024;
/// Reads at least this big are handed on as they are; smaller ones are copied
/// out, so that a line does not hold a whole read buffer.
const HAND_ON_FROM: usize = 16 * 1024;
/// Size asked for the command's stdout or stderr pipe once a read finds it
/// full: a command printing fast goes on writing while the agent compresses
/// what it read. Quiet pipes keep the default size, which counts less
/// against the user's pipe pages with a thousand shards in flight.
const PIPE_BYTES: usize = 1024 * 1024;
/// Most bytes of collected files one shard sends back.
const MAX_COLLECT_BYTES: usize = 64 * 1024 * 1024;
/// Size of one file frame's piece.
const FILE_PIECE: usize = 512 * 1024;

/// Variables of the agent's environment the command must never see: the
/// function's own credentials and the Runtime API it could hijack.
const WITHHELD_ENV: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_LAMBDA_RUNTIME_API",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_PROFILE",
    "_X_AMZN_TRACE_ID",
    "MVM_SHARD_SCRATCH",
    workspace::SANDBOX_MARKER,
];

/// What the agent remembers across invocations of one environment.
#[derive(Debug)]
pub struct EnvironmentState {
    /// Invocations this agent process has served.
    pub invocations: u64,
    /// The folder the agent owns and wipes.
    pub scratch: std::path::PathBuf,
}

/// Frames go out through this; a pump turns them into the response body.
pub type FrameSender = mpsc::Sender<Frame>;

/// Runs one validated request to its result. Never fails: every problem
/// becomes an [`Outcome`].
pub async fn run(
    req: &ShardRequest,
    invocation_deadline: SystemTime,
    state: &mut EnvironmentState,
    frames: &FrameSender,
) -> ShardResult {
    let setup_started = Instant::now();
    let leftovers = workspace::sweep(&state.scratch).await;
    let fresh = state.invocations == 0 && leftovers.is_empty();
    state.invocations += 1;
    let mut result = ShardResult::not_run(Outcome::SetupFailed {
        reason: String::new(),
    });
    result.fresh_environment = fresh;
    result.resources = Some(super::resources::of_this_environment());
    result.stale_paths_removed = leftovers.paths;
    result.stale_processes_killed = leftovers.processes;

    let ws = match Workspace::create(&state.scratch) {
        Ok(ws) => ws,
        Err(e) => {
            result.outcome = setup_failed(format!(
                "cannot create workspace in {}: {e}",
                state.scratch.display()
            ));
            return result;
        }
    };
    let mut prepared = fetch_source(&req.source, &ws, "source").await;
    for overlay in &req.overlays {
        if prepared.is_err() {
            break;
        }
        prepared = fetch_source(overlay, &ws, "overlay")
            .await
            .map_err(|e| e.context("cannot lay the included files over the source"));
    }
    if let Err(refused) = prepared {
        result.outcome = refused.into_outcome();
        result.setup_ms = elapsed_ms(setup_started);
        ws.remove().await;
        return result;
    }
    let workdir = ws.src.join(&req.workdir);
    // The archive may have made the working directory a symbolic link (to
    // /proc/self, say): the command must not start, nor files be collected, there.
    if let Ok(real) = workdir.canonicalize() {
        if !real.starts_with(&ws.src) {
            result.outcome = Outcome::Rejected {
                reason: format!(
                    "the working directory {:?} leads outside the source (a symbolic link): refused",
                    req.workdir
                ),
            };
            result.setup_ms = elapsed_ms(setup_started);
            ws.remove().await;
            return result;
        }
    }
    super::cache::restore(&req.caches, &ws, &workdir, frames).await;
    result.setup_ms = elapsed_ms(setup_started);

    let (timeout, limit_ms) = effective_timeout(req.timeout_ms, invocation_deadline);
    let started = Instant::now();
    match run_command(req, &ws, &state.scratch, timeout, frames).await {
        Ok((outcome, stragglers)) => {
            result.outcome = match outcome {
                CommandEnd::TimedOut => Outcome::TimedOut { limit_ms },
                CommandEnd::Exited(o) => o,
            };
            result.stragglers_killed = stragglers;
        }
        Err(reason) => result.outcome = setup_failed(reason),
    }
    result.duration_ms = elapsed_ms(started);
    if result.outcome == (Outcome::Exited { code: 0 }) {
        super::cache::save(&req.caches, &ws, &workdir, frames).await;
    }
    if !req.collect.is_empty() {
        result.files_skipped = send_files(&ws.src, &req.workdir, &req.collect, frames).await;
    }
    ws.remove().await;
    result
}

/// Sends back the files matching `patterns` under `workdir` (relative to the
/// source folder `src`), in pieces, up to [`MAX_COLLECT_BYTES`]; returns the
/// paths that did not fit.
async fn send_files(
    src: &std::path::Path,
    workdir: &str,
    patterns: &[String],
    frames: &FrameSender,
) -> Vec<String> {
    let found = {
        let (src, workdir) = (src.to_path_buf(), workdir.to_string());
        let patterns = patterns.to_vec();
        tokio::task::spawn_blocking(move || matching_files(&src, &workdir, &patterns))
            .await
            .unwrap_or_default()
    };
    let mut budget = MAX_COLLECT_BYTES;
    let mut skipped = Vec::new();
    for (rel, path) in found {
        let Ok(data) = tokio::fs::read(&path).await else {
            continue;
        };
        if data.len() > budget {
            skipped.push(rel);
            continue;
        }
        budget -= data.len();
        let data = Bytes::from(data);
        let mut offset = 0;
        loop {
            let end = (offset + FILE_PIECE).min(data.len());
            let piece = Frame::File {
                path: rel.clone(),
                data: data.slice(offset..end),
            };
            if frames.send(piece).await.is_err() {
                return skipped;
            }
            offset = end;
            if offset >= data.len() {
                break;
            }
        }
    }
    skipped
}

/// Regular files under `workdir` (relative to `src`) matching any glob, as
/// (relative, absolute), never outside `src`: `src` is the canonical path the
/// agent made before the command ran, and every match is resolved (symbolic
/// links, a working directory the command replaced by a link) and must stay
/// under it. The function's own `/proc/self/environ` is one link away.
fn matching_files(
    src: &std::path::Path,
    workdir: &str,
    patterns: &[String],
) -> Vec<(String, std::path::PathBuf)> {
    let base = src.join(workdir);
    let mut found = std::collections::BTreeMap::new();
    for pattern in patterns {
        let full = base.join(pattern);
        let Ok(paths) = glob::glob(&full.to_string_lossy()) else {
            continue;
        };
        for path in paths.flatten() {
            let Ok(real) = path.canonicalize() else {
                continue;
            };
            if !real.starts_with(src) || !real.is_file() {
                continue;
            }
            if let Ok(rel) = path.strip_prefix(&base) {
                found.insert(rel.to_string_lossy().into_owned(), real);
            }
        }
    }
    found.into_iter().collect()
}

fn setup_failed(reason: String) -> Outcome {
    Outcome::SetupFailed { reason }
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

/// The shard's own timeout or Lambda's deadline less a margin, whichever is first.
fn effective_timeout(timeout_ms: u64, invocation_deadline: SystemTime) -> (Duration, u64) {
    let shard = Duration::from_millis(timeout_ms);
    let lambda = invocation_deadline
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .saturating_sub(DEADLINE_MARGIN);
    if lambda < shard {
        (lambda, lambda.as_millis() as u64)
    } else {
        (shard, timeout_ms)
    }
}

/// Why the workspace could not be prepared: a hostile archive is the
/// request's fault (rejected), anything else is the set-up's.
#[derive(Debug)]
enum PrepareError {
    /// An archive tried to reach outside the workspace.
    Refused(String),
    /// The source could not be fetched or unpacked.
    Failed(String),
}

impl PrepareError {
    fn unpacking(context: &str, e: crate::source::SourceError) -> Self {
        match e {
            crate::source::SourceError::Escapes { .. } => {
                PrepareError::Refused(format!("{context}: {e}"))
            }
            e => PrepareError::Failed(format!("{context}: {e}")),
        }
    }

    fn context(self, context: &str) -> Self {
        match self {
            PrepareError::Refused(r) => PrepareError::Refused(format!("{context}: {r}")),
            PrepareError::Failed(r) => PrepareError::Failed(format!("{context}: {r}")),
        }
    }

    fn into_outcome(self) -> Outcome {
        match self {
            PrepareError::Refused(reason) => Outcome::Rejected { reason },
            PrepareError::Failed(reason) => setup_failed(reason),
        }
    }
}

/// Unpacks a base64 tar.zst carried in the request into `dest`.
async fn unpack_inline(archive: &str, dest: &std::path::Path) -> Result<(), PrepareError> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(archive)
        .map_err(|e| PrepareError::Failed(format!("inline archive is not valid base64: {e}")))?;
    let dest = dest.to_path_buf();
    tokio::task::spawn_blocking(move || {
        crate::source::unpack(&bytes[..], ArchiveFormat::TarZst, &dest, 0)
    })
    .await
    .map_err(|e| PrepareError::Failed(format!("unpacking panicked: {e}")))?
    .map(|_| ())
    .map_err(|e| PrepareError::unpacking("cannot unpack the source", e))
}

/// Puts `source` into the workspace's source folder; `what` names it in errors.
async fn fetch_source(source: &SourceSpec, ws: &Workspace, what: &str) -> Result<(), PrepareError> {
    let dest = ws.src.clone();
    match source {
        SourceSpec::Empty => Ok(()),
        SourceSpec::Inline { archive } => unpack_inline(archive, &dest).await,
        SourceSpec::Url {
            url,
            format,
            strip_components,
            sha256,
        } => {
            let file = ws.dir.join(format!("{what}.archive"));
            super::download::to_file(url, &file, sha256.as_deref())
                .await
                .map_err(PrepareError::Failed)?;
            let (format, strip) = (*format, *strip_components);
            let result = tokio::task::spawn_blocking(move || {
                let n = std::fs::File::open(&file)
                    .map_err(crate::source::SourceError::from)
                    .and_then(|f| {
                        crate::source::unpack(std::io::BufReader::new(f), format, &dest, strip)
                    });
                let _ = std::fs::remove_file(&file);
                n
            })
            .await
            .map_err(|e| PrepareError::Failed(format!("unpacking the {what} panicked: {e}")))?;
            result.map(|_| ()).map_err(|e| {
                PrepareError::unpacking(
                    &format!("cannot unpack the {what} downloaded from its link"),
                    e,
                )
            })
        }
    }
}

enum CommandEnd {
    Exited(Outcome),
    TimedOut,
}

async fn run_command(
    req: &ShardRequest,
    ws: &Workspace,
    scratch: &std::path::Path,
    timeout: Duration,
    frames: &FrameSender,
) -> Result<(CommandEnd, u32), String> {
    let workdir = ws.src.join(&req.workdir);
    if !workdir.is_dir() {
        return Err(format!(
            "working directory {:?} is not in the source",
            req.workdir
        ));
    }
    let path = req
        .env
        .get("PATH")
        .map(std::ffi::OsString::from)
        .or_else(|| std::env::var_os("PATH"));
    let found = path
        .as_deref()
        .and_then(|path| program_in_path(&req.command[0], path));
    let spawned = match command(req, ws, &workdir, scratch, found.as_deref()).spawn() {
        // A script without `#!` runs through sh when looked up by name (execvp
        // does that), not when spawned by its path.
        Err(e)
            if found.is_some() && e.raw_os_error() == Some(nix::errno::Errno::ENOEXEC as i32) =>
        {
            command(req, ws, &workdir, scratch, None).spawn()
        }
        spawned => spawned,
    };
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => return not_started(req, &e, frames).await,
    };
    let pgid = child.id();
    let readers = [
        tokio::spawn(forward_output(
            child.stdout.take(),
            OutputStream::Stdout,
            frames.clone(),
        )),
        tokio::spawn(forward_output(
            child.stderr.take(),
            OutputStream::Stderr,
            frames.clone(),
        )),
    ];

    let me = std::process::id();
    let end = tokio::select! {
        status = child.wait() => CommandEnd::Exited(outcome_of(status.map_err(|e| e.to_string())?)),
        () = tokio::time::sleep(timeout) => {
            if let Some(pgid) = pgid {
                os::signal_group(pgid, nix::sys::signal::Signal::SIGTERM);
            }
            // Also everything that left the group; the command itself is awaited below.
            os::end_descendants(me, TERM_GRACE, false).await;
            let _ = child.wait().await;
            CommandEnd::TimedOut
        }
    };
    let mut stragglers = os::end_descendants(me, STRAGGLER_GRACE, true).await;
    if !os::is_subreaper() {
        // Without a subreaper, a daemon's orphans leave our tree; the marker
        // finds them. As a subreaper, everything the command started is below us.
        let marker = scratch.display().to_string();
        stragglers += os::kill_marked_shared(workspace::SANDBOX_MARKER, &marker).await;
    }
    let mut stderr_tail = Vec::new();
    for mut reader in readers {
        // With every writer gone the pipes are at EOF; the bound guards against
        // a descriptor held by a process outside our tree. Past it the reader
        // is stopped: it holds a frame sender, and the stream (so the shard)
        // would not end while it reads on.
        match tokio::time::timeout(Duration::from_secs(5), &mut reader).await {
            Ok(Ok((OutputStream::Stderr, tail))) => stderr_tail = tail,
            Ok(_) => {}
            Err(_) => reader.abort(),
        }
    }
    if let CommandEnd::Exited(Outcome::Exited { code }) = &end {
        if let Some(hint) = hint::for_failure(*code, &stderr_tail) {
            let data = Bytes::from(format!("{hint}\n"));
            let _ = frames
                .send(Frame::Output {
                    stream: OutputStream::Stderr,
                    data,
                })
                .await;
        }
    }
    Ok((end, stragglers))
}

/// The shard's command, by the path [`program_in_path`] found, or by name.
fn command(
    req: &ShardRequest,
    ws: &Workspace,
    workdir: &std::path::Path,
    scratch: &std::path::Path,
    found: Option<&std::path::Path>,
) -> Command {
    let mut cmd = match found {
        Some(program) => {
            let mut cmd = Command::new(program);
            cmd.arg0(&req.command[0]);
            cmd
        }
        None => Command::new(&req.command[0]),
    };
    cmd.args(&req.command[1..])
        .current_dir(workdir)
        .env_clear()
        .envs(
            std::env::vars_os()
                .filter(|(k, _)| !k.to_str().is_some_and(|k| WITHHELD_ENV.contains(&k))),
        )
        .envs(&req.env)
        .env("MVM_SHARD_INDEX", req.shard.index.to_string())
        .env("MVM_SHARD_COUNT", req.shard.count.to_string())
        .env("MVM_SHARD_RUN_ID", &req.run_id)
        .env(workspace::SANDBOX_MARKER, scratch)
        .env("TMPDIR", &ws.tmp)
        .env("HOME", &ws.home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    cmd
}

/// Where `program` is in `path` (the command's own `PATH`), as execvp would
/// find it, when that is certain: only absolute folders before it, and an
/// executable file there. By its path the command is started with
/// `posix_spawn` (no copy of the agent's memory map); by a bare name Rust
/// forks the agent, as the lookup must use the child's `PATH`: that fork, the
/// copies on write after it and the copy's teardown at `exec` were about 4 %
/// of all CPU with a thousand shards in flight.
fn program_in_path(program: &str, path: &std::ffi::OsStr) -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    if program.is_empty() || program.contains('/') {
        return None;
    }
    for dir in path.as_bytes().split(|b| *b == b':') {
        let dir = std::path::Path::new(std::ffi::OsStr::from_bytes(dir));
        if !dir.is_absolute() {
            // Empty or relative: looked up from the command's folder.
            return None;
        }
        let candidate = dir.join(program);
        let executable = nix::unistd::access(&candidate, nix::unistd::AccessFlags::X_OK).is_ok();
        if executable && candidate.is_file() {
            return Some(candidate);
        }
    }
    None
}

/// A command that cannot be started is the user's test failing to start, as
/// in a shell: 127 when it is not found, 126 when it cannot be executed, with
/// the reason (and the PATH it was looked up in) in the shard's output. Any
/// other spawn failure is the agent's.
async fn not_started(
    req: &ShardRequest,
    e: &std::io::Error,
    frames: &FrameSender,
) -> Result<(CommandEnd, u32), String> {
    let program = &req.command[0];
    let (code, what) = match e.kind() {
        std::io::ErrorKind::NotFound => (127, "command not found"),
        std::io::ErrorKind::PermissionDenied => (126, "permission denied"),
        _ if e.raw_os_error() == Some(nix::errno::Errno::ENOEXEC as i32) => {
            (126, "cannot execute: not a program this system can run")
        }
        _ => return Err(format!("cannot start {program:?}: {e}")),
    };
    let path = req
        .env
        .get("PATH")
        .cloned()
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_default();
    let mut line = format!("mvm-shard: {program}: {what} (PATH={path})\n");
    if let Some(hint) = hint::for_failure(code, format!("{program}: {what}").as_bytes()) {
        line.push_str(&format!("{hint}\n"));
    }
    let _ = frames
        .send(Frame::Output {
            stream: OutputStream::Stderr,
            data: Bytes::from(line),
        })
        .await;
    Ok((CommandEnd::Exited(Outcome::Exited { code }), 0))
}

fn outcome_of(status: std::process::ExitStatus) -> Outcome {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => Outcome::Exited { code },
        (None, Some(signal)) => Outcome::Signaled { signal },
        (None, None) => Outcome::Exited { code: -1 },
    }
}

/// Forwards a pipe as output frames; returns the stream and its last
/// [`hint::STDERR_TAIL`] bytes, where a missing tool is named.
async fn forward_output(
    pipe: Option<impl AsyncRead + std::os::fd::AsRawFd + Unpin>,
    stream: OutputStream,
    frames: FrameSender,
) -> (OutputStream, Vec<u8>) {
    let mut tail = Vec::new();
    let Some(mut pipe) = pipe else {
        return (stream, tail);
    };
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut pipe_size = os::pipe_size(&pipe).unwrap_or(PIPE_BYTES);
    loop {
        buf.clear();
        buf.reserve(READ_CHUNK);
        match pipe.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return (stream, tail),
            Ok(n) => {
                if n >= pipe_size && pipe_size < PIPE_BYTES {
                    // The read emptied a full pipe: the command prints fast.
                    pipe_size = os::grow_pipe(&pipe, PIPE_BYTES).unwrap_or(PIPE_BYTES);
                }
                tail.extend_from_slice(&buf[n.saturating_sub(hint::STDERR_TAIL)..n]);
                let excess = tail.len().saturating_sub(hint::STDERR_TAIL);
                tail.drain(..excess);
                let data = if n >= HAND_ON_FROM {
                    buf.split().freeze()
                } else {
                    Bytes::copy_from_slice(&buf)
                };
                if frames.send(Frame::Output { stream, data }).await.is_err() {
                    return (stream, tail);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_is_found_in_path_only_where_execvp_surely_finds_it() {
        use std::os::unix::fs::PermissionsExt;
        let plain = tempfile::tempdir().unwrap();
        let tools = tempfile::tempdir().unwrap();
        std::fs::write(plain.path().join("tool"), "#!/bin/sh\n").unwrap();
        std::fs::create_dir(tools.path().join("dir")).unwrap();
        std::fs::write(tools.path().join("tool"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            tools.path().join("tool"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let path = |dirs: &[&str]| std::ffi::OsString::from(dirs.join(":"));
        let (plain, tools) = (
            plain.path().to_str().unwrap(),
            tools.path().to_str().unwrap(),
        );
        // Not executable in the first folder: execvp goes on to the next.
        assert_eq!(
            program_in_path("tool", &path(&[plain, tools])),
            Some(std::path::Path::new(tools).join("tool"))
        );
        // A folder is no program; a relative or empty entry is looked up from
        // the command's own folder, so it is left to execvp.
        assert_eq!(program_in_path("dir", &path(&[tools])), None);
        assert_eq!(program_in_path("tool", &path(&["bin", tools])), None);
        assert_eq!(program_in_path("tool", &path(&["", tools])), None);
        assert_eq!(program_in_path("./tool", &path(&[tools])), None);
        assert_eq!(program_in_path("missing", &path(&[plain, tools])), None);
    }

    #[test]
    fn lambda_deadline_wins_when_it_comes_first() {
        let soon = SystemTime::now() + Duration::from_secs(10);
        let (d, limit) = effective_timeout(60_000, soon);
        assert!(
            d <= Duration::from_secs(7) && d > Duration::from_secs(5),
            "{d:?}"
        );
        assert_eq!(limit, d.as_millis() as u64);
        let late = SystemTime::now() + Duration::from_secs(900);
        assert_eq!(
            effective_timeout(60_000, late),
            (Duration::from_secs(60), 60_000)
        );
    }
}
