//! Fanning shards out through a [`Backend`] and accounting for every one.
//!
//! [`dispatch`] runs the shards with a bound on how many are in flight,
//! retries starts that were throttled, decodes each shard's frame stream, and
//! emits [`RunEvent`]s; it never prints. A shard whose final result never
//! arrived is an infrastructure failure, never a pass.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, InvokeError, InvokeErrorKind, ShardInvocation, ShardStream};
use crate::protocol::{
    Frame, FrameCodec, Outcome, OutputStream, ShardId, ShardRequest, ShardResult, SourceSpec,
};

/// What happened during a run, in the order it happened.
#[derive(Debug, Clone)]
pub enum RunEvent {
    /// An attempt at a shard was sent.
    Started {
        /// Which shard.
        shard: ShardId,
        /// 1-based attempt.
        attempt: u32,
    },
    /// A chunk of a shard's output.
    Output {
        /// Which shard.
        shard: ShardId,
        /// stdout or stderr.
        stream: OutputStream,
        /// The bytes.
        data: Bytes,
    },
    /// An attempt could not start and will be retried.
    Retrying {
        /// Which shard.
        shard: ShardId,
        /// The attempt that comes next.
        next_attempt: u32,
        /// How long until then.
        delay: Duration,
        /// Why the last one failed.
        reason: String,
    },
    /// A shard that did not pass runs again in a new fresh environment
    /// (`--retries`); its next [`RunEvent::Finished`] replaces the last.
    Rerunning {
        /// Which shard.
        shard: ShardId,
        /// 1-based rerun.
        round: u32,
        /// Reruns allowed (`--retries`).
        of: u32,
        /// What it reruns, in words: `2 failed tests`, `the whole shard`.
        what: String,
    },
    /// A shard is done, one way or another.
    Finished(ShardRecord),
    /// A value that must not appear in logs from now on (a fresh source link).
    Secret(String),
}

/// Where [`dispatch`] sends its events: a bounded channel, so that a
/// reporter that falls behind slows the shards' streams down (down to TCP)
/// instead of letting their output pile up in memory.
pub type EventSender = mpsc::Sender<RunEvent>;

/// Events in flight between [`dispatch`] and the reporter. An output event
/// holds at most one frame (1 MiB, 64 KiB as the agent coalesces), so this
/// bounds what waits for the reporter to a few MiB whatever the log size.
pub const EVENTS_IN_FLIGHT: usize = 64;

/// The channel [`dispatch`] and [`consume`] send their events through.
pub fn event_channel() -> (EventSender, mpsc::Receiver<RunEvent>) {
    mpsc::channel(EVENTS_IN_FLIGHT)
}

/// A source decided at dispatch time, such as a tarball link that expires
/// within minutes and must be fresh for every attempt.
pub trait SourceResolver: Send + Sync {
    /// The source for the next attempt.
    fn resolve(&self) -> BoxFuture<'_, Result<ResolvedSource, String>>;
}

/// What a [`SourceResolver`] hands out.
#[derive(Debug, Clone)]
pub struct ResolvedSource {
    /// The source to put in the request.
    pub spec: SourceSpec,
    /// A new secret in it (the link), to mask.
    pub secret: Option<String>,
}

/// How a shard ended, from the run's point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardStatus {
    /// The command exited 0.
    Passed,
    /// The command exited non-zero or was killed by a signal.
    Failed {
        /// Its exit code, if it exited.
        exit_code: Option<i32>,
        /// The signal that killed it, if one did.
        signal: Option<i32>,
    },
    /// The command ran out of time.
    TimedOut,
    /// The shard could not run, or its result never arrived.
    InfraFailed {
        /// What went wrong.
        reason: String,
    },
    /// The run was interrupted (SIGINT, SIGTERM) before the shard's result
    /// arrived: its result is unknown.
    Interrupted {
        /// What became of it: never started, its microVM terminated, or
        /// its function possibly still running.
        detail: String,
    },
}

impl ShardStatus {
    /// What happened, in words: `exited with code 1`, `could not run: …`.
    pub fn describe(&self) -> String {
        match self {
            ShardStatus::Passed => "passed".into(),
            ShardStatus::Failed {
                exit_code: Some(c), ..
            } => format!("exited with code {c}"),
            ShardStatus::Failed {
                signal: Some(s), ..
            } => format!("killed by signal {s}"),
            ShardStatus::Failed { .. } => "failed".into(),
            ShardStatus::TimedOut => "ran out of time".into(),
            ShardStatus::InfraFailed { reason } => format!("could not run: {reason}"),
            ShardStatus::Interrupted { detail } => format!("interrupted; {detail}"),
        }
    }

    /// Short label for tables.
    pub fn label(&self) -> &'static str {
        match self {
            ShardStatus::Passed => "passed",
            ShardStatus::Failed { .. } => "FAILED",
            ShardStatus::TimedOut => "TIMED OUT",
            ShardStatus::InfraFailed { .. } => "NOT RUN",
            ShardStatus::Interrupted { .. } => "INTERRUPTED",
        }
    }
}

/// Everything known about one finished shard.
#[derive(Debug, Clone)]
pub struct ShardRecord {
    /// Which shard.
    pub shard: ShardId,
    /// How it ended.
    pub status: ShardStatus,
    /// Wall time from the first attempt to the end, as the invoker saw it.
    pub duration: Duration,
    /// Attempts made.
    pub attempts: u32,
    /// The agent's final result, when it arrived.
    pub result: Option<ShardResult>,
    /// Files the shard sent back (`collect`), in the order they came.
    pub files: Vec<CollectedFile>,
}

/// A file a shard sent back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectedFile {
    /// Path relative to the shard's working directory.
    pub path: String,
    /// Its content.
    pub data: Bytes,
}

/// The outcome of a whole run.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// One record per selected shard, by index.
    pub records: Vec<ShardRecord>,
    /// The configuration mistake the run stopped at (a missing function, a
    /// denied call): the shards that had not ended by then did not run
    /// because of it, and their records say so without repeating it.
    pub stopped_by: Option<InvokeError>,
}

impl RunSummary {
    /// The process exit status: 0 all passed, 1 a command failed or timed
    /// out, 3 a shard could not run or was interrupted (this wins: the
    /// results are incomplete), 2 the run stopped at a configuration mistake
    /// (this wins over all).
    pub fn exit_code(&self) -> i32 {
        let incomplete = |s: &ShardStatus| {
            matches!(
                s,
                ShardStatus::InfraFailed { .. } | ShardStatus::Interrupted { .. }
            )
        };
        if self.stopped_by.is_some() {
            2
        } else if self.count(incomplete) > 0 {
            3
        } else if self.count(|s| *s != ShardStatus::Passed) > 0 {
            1
        } else {
            0
        }
    }

    /// How many shards have a status matching `pred`.
    pub fn count(&self, pred: impl Fn(&ShardStatus) -> bool) -> usize {
        self.records.iter().filter(|r| pred(&r.status)).count()
    }
}

/// One shard to run.
#[derive(Debug, Clone)]
pub struct ShardJob {
    /// Which shard (also in the request; kept here for ordering and events).
    pub shard: ShardId,
    /// What the shard gets, as the plan decided it; the backend encodes it.
    pub request: ShardRequest,
}

/// Limits of a dispatch.
#[derive(Clone)]
pub struct DispatchOptions {
    /// Shards in flight at once.
    pub max_parallel: usize,
    /// Attempts per shard for starts that failed for a passing reason.
    pub max_attempts: u32,
    /// First retry delay; doubled each time, capped at [`MAX_BACKOFF`].
    pub backoff: Duration,
    /// Replaces each request's source at every attempt, when set.
    pub source: Option<Arc<dyn SourceResolver>>,
}

/// Longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(20);

impl Default for DispatchOptions {
    fn default() -> Self {
        DispatchOptions {
            max_parallel: 64,
            max_attempts: 6,
            backoff: Duration::from_millis(500),
            source: None,
        }
    }
}

/// Why a shard did not run after the run stopped at a configuration mistake.
pub const STOPPED_REASON: &str = "not run: the run stopped at a configuration error";

/// Runs every job and returns one record per job. `cancel` stops new
/// dispatches and abandons the shards in flight, which then count as
/// interrupted; the caller then has the backend release what they hold.
/// The first configuration mistake a backend reports stops the run too, and
/// is the summary's [`RunSummary::stopped_by`]: no shard starts after it, the
/// shards it ended count as not run, and they get no [`RunEvent::Finished`]
/// of their own (the mistake is told once, by the caller).
pub async fn dispatch(
    backend: Arc<dyn Backend>,
    run_id: &str,
    jobs: Vec<ShardJob>,
    options: &DispatchOptions,
    events: EventSender,
    cancel: CancellationToken,
) -> RunSummary {
    // Cancelled by the caller, or by the first configuration mistake.
    let stop = cancel.child_token();
    let stopped_by: std::sync::Mutex<Option<InvokeError>> = std::sync::Mutex::new(None);
    let stopped = || stopped_by.lock().map(|s| s.is_some()).unwrap_or(true);
    let mut records: Vec<ShardRecord> = futures::stream::iter(jobs)
        .map(|job| {
            let backend = backend.clone();
            let events = events.clone();
            let cancel = cancel.clone();
            let stop = stop.clone();
            let stopped_by = &stopped_by;
            async move {
                let started = Instant::now();
                let interrupted = |detail: &str| {
                    let status = ShardStatus::Interrupted {
                        detail: detail.into(),
                    };
                    Ok((status, 0, Received::default()))
                };
                let not_run = || {
                    let status = ShardStatus::InfraFailed {
                        reason: STOPPED_REASON.into(),
                    };
                    Ok((status, 0, Received::default()))
                };
                let outcome = if stopped() {
                    not_run()
                } else if cancel.is_cancelled() {
                    interrupted("it never started")
                } else {
                    let run = run_shard(&*backend, run_id, &job, options, &events);
                    tokio::select! {
                        // A shard whose result is in is not interrupted.
                        biased;
                        done = run => done,
                        () = stop.cancelled() => if stopped() {
                            not_run()
                        } else {
                            interrupted(backend.interrupted())
                        },
                    }
                };
                let (status, attempts, received) = match outcome {
                    Ok(done) => done,
                    Err(mistake) => {
                        let reason = mistake.message.clone();
                        if let Ok(mut first) = stopped_by.lock() {
                            first.get_or_insert(mistake);
                        }
                        stop.cancel();
                        (ShardStatus::InfraFailed { reason }, 1, Received::default())
                    }
                };
                let record = ShardRecord {
                    shard: job.shard,
                    status,
                    duration: started.elapsed(),
                    attempts,
                    result: received.result,
                    files: received.files,
                };
                // After a configuration mistake the caller tells it once.
                if !stopped() {
                    let _ = events.send(RunEvent::Finished(record.clone())).await;
                }
                record
            }
        })
        .buffer_unordered(options.max_parallel.max(1))
        .collect()
        .await;
    records.sort_by_key(|r| r.shard.index);
    let stopped_by = stopped_by.into_inner().unwrap_or_else(|e| e.into_inner());
    RunSummary {
        records,
        stopped_by,
    }
}

async fn run_shard(
    backend: &dyn Backend,
    run_id: &str,
    job: &ShardJob,
    options: &DispatchOptions,
    events: &EventSender,
) -> Result<(ShardStatus, u32, Received), InvokeError> {
    let mut attempt = 1;
    loop {
        let request = match &options.source {
            None => job.request.clone(),
            Some(resolver) => match with_resolved_source(&job.request, &**resolver, events).await {
                Ok(request) => request,
                Err(reason) => {
                    let reason = format!("cannot get the shard's source: {reason}");
                    return Ok((
                        ShardStatus::InfraFailed { reason },
                        attempt,
                        Received::default(),
                    ));
                }
            },
        };
        let invocation = ShardInvocation {
            shard: job.shard,
            attempt,
            run_id: run_id.to_string(),
            request,
        };
        let _ = events
            .send(RunEvent::Started {
                shard: job.shard,
                attempt,
            })
            .await;
        match backend.invoke(&invocation).await {
            Ok(stream) => {
                let received = consume(job.shard, stream, events).await;
                let status = status_of(received.result.as_ref(), received.failure.clone());
                return Ok((status, attempt, received));
            }
            Err(error) if error.kind == InvokeErrorKind::Config => return Err(error),
            Err(error) => match retry_delay(&error, attempt, options) {
                Some(delay) => {
                    let _ = events
                        .send(RunEvent::Retrying {
                            shard: job.shard,
                            next_attempt: attempt + 1,
                            delay,
                            reason: error.message.clone(),
                        })
                        .await;
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                None => {
                    let reason = match error.kind {
                        InvokeErrorKind::Fatal => error.message,
                        _ => format!(
                            "gave up after {}: {}",
                            crate::report::plural(attempt as usize, "attempt"),
                            error.message
                        ),
                    };
                    return Ok((
                        ShardStatus::InfraFailed { reason },
                        attempt,
                        Received::default(),
                    ));
                }
            },
        }
    }
}

/// The job's request with the source the resolver hands out now.
async fn with_resolved_source(
    request: &ShardRequest,
    resolver: &dyn SourceResolver,
    events: &EventSender,
) -> Result<ShardRequest, String> {
    let resolved = resolver.resolve().await?;
    if let Some(secret) = resolved.secret {
        let _ = events.send(RunEvent::Secret(secret)).await;
    }
    Ok(ShardRequest {
        source: resolved.spec,
        ..request.clone()
    })
}

/// Whether to retry a failed start, and after how long: exponential backoff
/// with jitter for throttles and passing failures, never for fatal ones.
pub fn retry_delay(
    error: &InvokeError,
    attempt: u32,
    options: &DispatchOptions,
) -> Option<Duration> {
    if matches!(error.kind, InvokeErrorKind::Fatal | InvokeErrorKind::Config)
        || attempt >= options.max_attempts
    {
        return None;
    }
    let exp = options
        .backoff
        .saturating_mul(1 << (attempt - 1).min(16))
        .min(MAX_BACKOFF);
    // Full jitter in the upper half, so retries of many shards spread out.
    let jitter = rand_fraction();
    Some(exp / 2 + exp.mul_f64(jitter / 2.0))
}

fn rand_fraction() -> f64 {
    (uuid::Uuid::new_v4().as_u128() % 1_000_000) as f64 / 1_000_000.0
}

/// What a shard's stream delivered besides output.
#[derive(Debug, Default)]
pub struct Received {
    /// The final result, if it arrived.
    pub result: Option<ShardResult>,
    /// Files sent back.
    pub files: Vec<CollectedFile>,
    /// Why the stream broke, if it did.
    pub failure: Option<String>,
}

/// Decodes a shard's stream, forwarding output as it arrives.
pub async fn consume(shard: ShardId, mut stream: ShardStream, events: &EventSender) -> Received {
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::new();
    let mut result = None;
    let mut failure = None;
    let mut files: Vec<(String, BytesMut)> = Vec::new();
    'stream: while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => {
                if result.is_some() {
                    continue;
                }
                buf.extend_from_slice(&bytes);
                loop {
                    match codec.decode(&mut buf) {
                        Ok(Some(Frame::Output { stream, data })) => {
                            // Waits while the reporter is behind: a slow stdout
                            // slows the stream instead of piling the log up here.
                            let _ = events
                                .send(RunEvent::Output {
                                    shard,
                                    stream,
                                    data,
                                })
                                .await;
                        }
                        Ok(Some(Frame::Heartbeat)) => {}
                        Ok(Some(Frame::File { path, data })) => match files.last_mut() {
                            Some((last, content)) if *last == path => {
                                content.extend_from_slice(&data)
                            }
                            _ => files.push((path, BytesMut::from(&data[..]))),
                        },
                        Ok(Some(Frame::Result(r))) => {
                            result = Some(r);
                            break;
                        }
                        Ok(None) => break,
                        Err(e) => {
                            failure = Some(format!("the shard's stream is corrupt: {e}"));
                            break 'stream;
                        }
                    }
                }
            }
            Err(e) => {
                failure = Some(e.to_string());
                break;
            }
        }
    }
    let files = files
        .into_iter()
        .map(|(path, data)| CollectedFile {
            path,
            data: data.freeze(),
        })
        .collect();
    Received {
        result,
        files,
        failure,
    }
}

/// The pure decision from what arrived to the shard's status.
pub fn status_of(result: Option<&ShardResult>, failure: Option<String>) -> ShardStatus {
    let Some(result) = result else {
        let reason =
            failure.unwrap_or_else(|| "the shard's stream ended without a final result".into());
        return ShardStatus::InfraFailed {
            reason: format!("{reason} (no final result arrived)"),
        };
    };
    match &result.outcome {
        Outcome::Exited { code: 0 } => ShardStatus::Passed,
        Outcome::Exited { code } => ShardStatus::Failed {
            exit_code: Some(*code),
            signal: None,
        },
        Outcome::Signaled { signal } => ShardStatus::Failed {
            exit_code: None,
            signal: Some(*signal),
        },
        Outcome::TimedOut { .. } => ShardStatus::TimedOut,
        Outcome::Rejected { reason } => ShardStatus::InfraFailed {
            reason: format!("the agent refused the request: {reason}"),
        },
        Outcome::SetupFailed { reason } => ShardStatus::InfraFailed {
            reason: format!("the shard could not be set up: {reason}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(outcome: Outcome) -> ShardResult {
        ShardResult::not_run(outcome)
    }

    #[test]
    fn a_missing_result_is_never_a_pass() {
        assert!(matches!(
            status_of(None, None),
            ShardStatus::InfraFailed { .. }
        ));
        let s = status_of(None, Some("function error Runtime.ExitError: boom".into()));
        assert!(
            matches!(s, ShardStatus::InfraFailed { reason } if reason.contains("Runtime.ExitError"))
        );
    }

    #[test]
    fn outcomes_map_to_statuses() {
        assert_eq!(
            status_of(Some(&result(Outcome::Exited { code: 0 })), None),
            ShardStatus::Passed
        );
        assert_eq!(
            status_of(Some(&result(Outcome::Exited { code: 2 })), None),
            ShardStatus::Failed {
                exit_code: Some(2),
                signal: None
            }
        );
        assert_eq!(
            status_of(Some(&result(Outcome::TimedOut { limit_ms: 5 })), None),
            ShardStatus::TimedOut
        );
        assert!(matches!(
            status_of(
                Some(&result(Outcome::Rejected { reason: "x".into() })),
                None
            ),
            ShardStatus::InfraFailed { .. }
        ));
    }

    #[test]
    fn infra_failures_outrank_test_failures_in_the_exit_code() {
        let rec = |status| ShardRecord {
            shard: ShardId { index: 1, count: 1 },
            status,
            duration: Duration::ZERO,
            attempts: 1,
            result: None,
            files: Vec::new(),
        };
        let summary = |statuses: Vec<ShardStatus>| RunSummary {
            records: statuses.into_iter().map(rec).collect(),
            stopped_by: None,
        };
        assert_eq!(summary(vec![ShardStatus::Passed]).exit_code(), 0);
        assert_eq!(
            summary(vec![ShardStatus::Passed, ShardStatus::TimedOut]).exit_code(),
            1
        );
        assert_eq!(
            summary(vec![
                ShardStatus::TimedOut,
                ShardStatus::InfraFailed { reason: "x".into() }
            ])
            .exit_code(),
            3
        );
    }

    #[test]
    fn throttles_back_off_and_fatal_errors_do_not_retry() {
        let options = DispatchOptions::default();
        let throttled = InvokeError {
            kind: InvokeErrorKind::Throttled,
            message: "429".into(),
        };
        let d1 = retry_delay(&throttled, 1, &options).unwrap();
        assert!(d1 >= options.backoff / 2 && d1 <= options.backoff);
        let d5 = retry_delay(&throttled, 5, &options).unwrap();
        assert!(d5 >= options.backoff * 8, "{d5:?}");
        assert_eq!(
            retry_delay(&throttled, options.max_attempts, &options),
            None
        );
        let fatal = InvokeError {
            kind: InvokeErrorKind::Fatal,
            message: "404".into(),
        };
        assert_eq!(retry_delay(&fatal, 1, &options), None);
    }
}
