//! The terminal renderer: each shard's output line by line with a shard
//! prefix as it arrives, then a summary table and the failed tests.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::color::Palette;
use super::junit::TestReport;
use super::Reporter;
use crate::dispatch::{RunEvent, RunSummary, ShardStatus};
use crate::protocol::{OutputStream, ShardId};

/// A line longer than this is shown in pieces rather than held back (a
/// shard that prints megabytes without a newline must not fill memory).
const MAX_HELD_LINE: usize = 16 * 1024 * 1024;
/// Output is written in pieces of about this size while it streams.
const WRITE_BUFFER: usize = 64 * 1024;
/// The end of each shard's output kept to repeat at the end of the run if
/// the shard does not pass (dropped when it passes).
const TAIL_BYTES: usize = 32 * 1024;
/// What a line repeated at the end of the run starts with, in place of its shard's prefix.
const REPEATED: &str = "  │ ";
/// Up to this many selected shards, their output is shown live by default:
/// about a screen of shards. Past it only failures are shown, as a long run
/// of passing logs buries the failures a reader is looking for.
pub const LIVE_OUTPUT_UP_TO: usize = 24;

/// `--output`: whose output is shown while the run goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputMode {
    /// Every shard's output, live.
    All,
    /// Only the output of shards that did not pass, whole, when they end.
    Failed,
    /// None; the end of each failure's output is still repeated at the end.
    None,
}

impl OutputMode {
    /// The default for a run of `shards` selected shards: `all` up to
    /// [`LIVE_OUTPUT_UP_TO`], `failed` past it.
    pub fn default_for(shards: usize) -> Self {
        if shards <= LIVE_OUTPUT_UP_TO {
            OutputMode::All
        } else {
            OutputMode::Failed
        }
    }
}

/// How a run is shown on a terminal or in a plain log.
#[derive(Debug, Clone, Copy)]
pub struct TerminalOptions {
    /// Colours, or none.
    pub palette: Palette,
    /// Whose output is shown live.
    pub output: OutputMode,
    /// Each shard's time limit, named when a shard runs out of it.
    pub timeout: Option<Duration>,
}

impl Default for TerminalOptions {
    fn default() -> Self {
        TerminalOptions {
            palette: Palette::new(false),
            output: OutputMode::All,
            timeout: None,
        }
    }
}

/// Writes shard output with `[i/n] ` prefixes, whole lines at a time, so
/// lines of concurrent shards never interleave mid-line. Output is buffered
/// and written out when the buffer fills, when a shard ends, and whenever
/// the reporter is idle ([`Reporter::flush`]), never a `write` per line.
pub struct TerminalReporter<W: Write> {
    out: BufWriter<W>,
    partial: HashMap<(ShardId, OutputStream), Held>,
    progress: Option<ProgressBar>,
    not_passed: usize,
    /// How each shard that ended last ended (a rerun replaces it).
    ended: HashMap<ShardId, ShardStatus>,
    /// Each shard's expected duration, when the tests were planned.
    expected: std::collections::BTreeMap<ShardId, Duration>,
    options: TerminalOptions,
    /// Per shard: the end of its output, and with `--output failed` all of
    /// it, spilled to a temporary file until the shard ends.
    logs: HashMap<ShardId, ShardLog>,
    /// Ends of the output of shards that did not pass, for the end of the run.
    failed_tails: Vec<(ShardId, String, Vec<u8>)>,
    /// Shards in flight and since when, for the progress line.
    running: Arc<Mutex<HashMap<ShardId, Instant>>>,
    started: Instant,
}

/// What is kept of one shard's output while it runs.
#[derive(Default)]
struct ShardLog {
    tail: Vec<u8>,
    spill: Option<BufWriter<File>>,
}

/// Where a shard's prefixed lines go: the terminal (with `--output all`) and
/// the spill file (with `--output failed`).
struct Sinks<'a, W: Write> {
    out: Option<&'a mut BufWriter<W>>,
    spill: Option<&'a mut BufWriter<File>>,
}

impl<W: Write> Write for Sinks<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if let Some(out) = self.out.as_mut() {
            out.write_all(buf)?;
        }
        if let Some(spill) = self.spill.as_mut() {
            spill.write_all(buf)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Appends the end of `lines` (whole lines, without prefixes) to a shard's
/// tail, which keeps its last `TAIL_BYTES` or a little more.
fn keep_tail(tail: &mut Vec<u8>, lines: &[u8]) {
    tail.extend_from_slice(&lines[lines.len().saturating_sub(TAIL_BYTES)..]);
    if tail.len() > 2 * TAIL_BYTES {
        let cut = tail.len() - TAIL_BYTES;
        tail.drain(..cut);
    }
}

/// A shard stream's prefix and the start of a line still waiting for its end.
#[derive(Default)]
struct Held {
    prefix: Vec<u8>,
    line: Vec<u8>,
}

impl<W: Write> TerminalReporter<W> {
    /// A reporter writing to `out`.
    pub fn new(out: W) -> Self {
        TerminalReporter {
            out: BufWriter::with_capacity(WRITE_BUFFER, out),
            partial: HashMap::new(),
            progress: None,
            not_passed: 0,
            ended: HashMap::new(),
            expected: Default::default(),
            options: TerminalOptions::default(),
            logs: HashMap::new(),
            failed_tails: Vec::new(),
            running: Arc::default(),
            started: Instant::now(),
        }
    }

    /// Shows the run with these options (colour, whose output, time limit).
    pub fn with_options(mut self, options: TerminalOptions) -> Self {
        self.options = options;
        self
    }

    /// Adds a progress line below the output (for a terminal): shards done,
    /// how many did not pass, time so far, and the shards still running with
    /// how long each has run (the longest first). Output is printed above it.
    pub fn with_progress(mut self, bar: ProgressBar) -> Self {
        let running = self.running.clone();
        let style = ProgressStyle::with_template(
            "{spinner} {elapsed_precise} {pos}/{len} {shards} done{msg}{running}",
        )
        .map(|style| {
            style
                .with_key(
                    "shards",
                    |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = w.write_str(if state.len() == Some(1) {
                            "shard"
                        } else {
                            "shards"
                        });
                    },
                )
                .with_key(
                    "running",
                    move |_: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        if let Ok(running) = running.lock() {
                            let _ = w.write_str(&running_list(&running, Instant::now()));
                        }
                    },
                )
        });
        if let Ok(style) = style {
            bar.set_style(style);
        }
        self.progress = Some(bar);
        self
    }

    /// Shows one event.
    pub fn handle(&mut self, event: &RunEvent) -> std::io::Result<()> {
        match event {
            RunEvent::Started { shard, .. } => {
                if let Ok(mut running) = self.running.lock() {
                    running.entry(*shard).or_insert_with(Instant::now);
                }
                Ok(())
            }
            RunEvent::Secret(_) => Ok(()),
            RunEvent::Output {
                shard,
                stream,
                data,
            } => {
                let held = self
                    .partial
                    .entry((*shard, *stream))
                    .or_insert_with(|| Held {
                        prefix: format!("[{shard}] ").into_bytes(),
                        line: Vec::new(),
                    });
                let log = self.logs.entry(*shard).or_default();
                if self.options.output == OutputMode::Failed && log.spill.is_none() {
                    log.spill = Some(BufWriter::new(tempfile::tempfile()?));
                }
                let mut sinks = Sinks {
                    out: (self.options.output == OutputMode::All).then_some(&mut self.out),
                    spill: log.spill.as_mut(),
                };
                write_lines(&mut sinks, &mut log.tail, held, data)
            }
            RunEvent::Retrying {
                shard,
                next_attempt,
                delay,
                reason,
            } => writeln!(
                self.out,
                "[{shard}] could not start ({reason}); attempt {next_attempt} in {}",
                secs(*delay)
            ),
            RunEvent::Rerunning {
                shard,
                round,
                of,
                what,
            } => writeln!(self.out, "[{shard}] {}", rerun_line(*round, *of, what)),
            RunEvent::Finished(record) => {
                if let Ok(mut running) = self.running.lock() {
                    running.remove(&record.shard);
                }
                let mut log = self.logs.remove(&record.shard).unwrap_or_default();
                for stream in [OutputStream::Stdout, OutputStream::Stderr] {
                    if let Some(held) = self.partial.remove(&(record.shard, stream)) {
                        if !held.line.is_empty() {
                            let mut sinks = Sinks {
                                out: (self.options.output == OutputMode::All)
                                    .then_some(&mut self.out),
                                spill: log.spill.as_mut(),
                            };
                            sinks.write_all(&held.prefix)?;
                            sinks.write_all(&held.line)?;
                            sinks.write_all(b"\n")?;
                            keep_tail(&mut log.tail, &held.line);
                            keep_tail(&mut log.tail, b"\n");
                        }
                    }
                }
                let passed = record.status == ShardStatus::Passed;
                if let (false, Some(spill)) = (passed, log.spill.take()) {
                    // --output failed: the whole output of a shard that did not pass.
                    let mut file = spill.into_inner().map_err(|e| e.into_error())?;
                    file.rewind()?;
                    std::io::copy(&mut file, &mut self.out)?;
                }
                let detail = match &record.status {
                    ShardStatus::Passed => String::new(),
                    other => format!(" ({})", self.describe(other)),
                };
                let label = self
                    .options
                    .palette
                    .status(&record.status, record.status.label());
                writeln!(
                    self.out,
                    "[{}] {label}{detail} in {}",
                    record.shard,
                    secs(record.duration)
                )?;
                // A rerun's end replaces the shard's earlier one.
                self.failed_tails
                    .retain(|(shard, ..)| *shard != record.shard);
                if !passed && !log.tail.is_empty() {
                    let heading = format!("{}{detail}", record.status.label());
                    self.failed_tails.push((record.shard, heading, log.tail));
                }
                self.out.flush()
            }
        }
    }

    /// Writes the summary table, the failed tests and the closing count line.
    pub fn summary(&mut self, summary: &RunSummary, tests: &TestReport) -> std::io::Result<()> {
        let palette = self.options.palette;
        // Failures together, where the reader's eyes are when the run ends.
        let tails = std::mem::take(&mut self.failed_tails);
        if !tails.is_empty()
            && (summary.records.len() > 1 || self.options.output != OutputMode::All)
        {
            writeln!(
                self.out,
                "\n{}",
                palette.bold("output of the shards that did not pass (their last lines):")
            )?;
            for (shard, heading, tail) in &tails {
                writeln!(self.out, "──── [{shard}] {heading} ────")?;
                let start = if tail.len() >= TAIL_BYTES {
                    writeln!(self.out, "{REPEATED}…")?;
                    memchr::memchr(b'\n', tail).map_or(0, |i| i + 1)
                } else {
                    0
                };
                // Marked as a repeat, not with the shard's prefix: `[i/n]`
                // lines stay each line of the live log, once, for readers and greps.
                for line in tail[start..].split_inclusive(|b| *b == b'\n') {
                    self.out.write_all(REPEATED.as_bytes())?;
                    self.out.write_all(line)?;
                }
            }
        }
        writeln!(self.out)?;
        let expected_column = !self.expected.is_empty();
        let expected = |shard: &ShardId| {
            if !expected_column {
                return String::new();
            }
            let e = self.expected.get(shard).map_or("-".into(), |d| secs(*d));
            format!(" {e:>9}")
        };
        writeln!(
            self.out,
            "{:<8} {:<11} {:>9}{} {:>5}  environment",
            "shard",
            "status",
            "duration",
            if expected_column {
                format!(" {:>9}", "expected")
            } else {
                String::new()
            },
            "exit"
        )?;
        for r in &summary.records {
            let exit = match &r.status {
                ShardStatus::Failed {
                    exit_code: Some(c), ..
                } => c.to_string(),
                ShardStatus::Passed => "0".into(),
                ShardStatus::Failed {
                    signal: Some(s), ..
                } => format!("sig{s}"),
                _ => "-".into(),
            };
            let environment = match &r.result {
                Some(res) if res.fresh_environment => "fresh",
                Some(_) => "reused, wiped",
                None => "-",
            };
            // Padded before it is painted, so colours keep the columns.
            let status = palette.status(&r.status, &format!("{:<11}", r.status.label()));
            writeln!(
                self.out,
                "{:<8} {status} {:>9}{} {:>5}  {}",
                r.shard.to_string(),
                secs(r.duration),
                expected(&r.shard),
                exit,
                environment
            )?;
        }
        for (shard, path, error) in &tests.problems {
            writeln!(self.out, "[{shard}] {path}: {error}")?;
        }
        if !tests.failures.is_empty() {
            writeln!(self.out, "\n{}", palette.bold("failed tests:"))?;
            for f in tests.failures.iter().take(MAX_LISTED_FAILURES) {
                let place = match (&f.file, f.line) {
                    (Some(file), Some(line)) => format!(" ({file}:{line})"),
                    (Some(file), None) => format!(" ({file})"),
                    _ => String::new(),
                };
                // A multi-line message keeps its own indentation, under the name.
                let mut lines = f.message.lines();
                let first = lines.next().unwrap_or("");
                writeln!(self.out, "  [{}] {}{place}: {first}", f.shard, f.name)?;
                for line in lines {
                    writeln!(self.out, "      {line}")?;
                }
            }
            if tests.failures.len() > MAX_LISTED_FAILURES {
                writeln!(
                    self.out,
                    "  ... and {} more",
                    tests.failures.len() - MAX_LISTED_FAILURES
                )?;
            }
        }
        if !tests.flaky.is_empty() {
            writeln!(
                self.out,
                "\n{}",
                palette.bold("flaky (failed, then passed on a rerun):")
            )?;
            for f in tests.flaky.iter().take(MAX_LISTED_FAILURES) {
                let first = f.message.lines().next().unwrap_or("");
                writeln!(self.out, "  [{}] {}: {first}", f.shard, f.name)?;
            }
            if tests.flaky.len() > MAX_LISTED_FAILURES {
                let more = tests.flaky.len() - MAX_LISTED_FAILURES;
                writeln!(self.out, "  ... and {more} more")?;
            }
        }
        let failed: Vec<String> = summary
            .records
            .iter()
            .filter(|r| r.status != ShardStatus::Passed)
            .map(|r| r.shard.index.to_string())
            .collect();
        let count = |f: fn(&ShardStatus) -> bool| summary.count(f);
        let timed_out = match (count(|s| *s == ShardStatus::TimedOut), self.options.timeout) {
            (n, Some(limit)) if n > 0 => format!("{n} timed out (limit {})", limit_text(limit)),
            (n, _) => format!("{n} timed out"),
        };
        writeln!(
            self.out,
            "{}: {} passed, {} failed, {timed_out}, {} could not run{}{}{}",
            super::plural(summary.records.len(), "shard"),
            count(|s| *s == ShardStatus::Passed),
            count(|s| matches!(s, ShardStatus::Failed { .. })),
            count(|s| matches!(s, ShardStatus::InfraFailed { .. })),
            match count(|s| matches!(s, ShardStatus::Interrupted { .. })) {
                0 => String::new(),
                n => format!(", {n} interrupted"),
            },
            match tests.flaky.len() {
                0 => String::new(),
                n => format!("; {} flaky", super::plural(n, "test")),
            },
            if failed.is_empty() {
                String::new()
            } else {
                format!(" (not passed: {})", failed.join(", "))
            }
        )?;
        writeln!(
            self.out,
            "{}",
            super::timing_line(summary, self.started.elapsed())
        )?;
        if let Some(cost) = super::cost::estimate(summary) {
            writeln!(self.out, "{}", cost.describe())?;
        }
        self.out.flush()
    }

    /// A status in words, naming the time limit a timed-out shard ran out of.
    fn describe(&self, status: &ShardStatus) -> String {
        match (status, self.options.timeout) {
            (ShardStatus::TimedOut, Some(limit)) => {
                format!("ran out of its {} time limit", limit_text(limit))
            }
            _ => status.describe(),
        }
    }
}

/// A time limit as people write it: `90s`, `10m`, `1h 30m`.
fn limit_text(limit: Duration) -> String {
    humantime::format_duration(Duration::from_secs(limit.as_secs().max(1))).to_string()
}

/// " · running: 3/8 45s, 6/8 12s, +2 more", the longest-running first.
fn running_list(running: &HashMap<ShardId, Instant>, now: Instant) -> String {
    if running.is_empty() {
        return String::new();
    }
    let mut shards: Vec<(&ShardId, Duration)> = running
        .iter()
        .map(|(shard, since)| (shard, now.saturating_duration_since(*since)))
        .collect();
    shards.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let shown: Vec<String> = shards
        .iter()
        .take(4)
        .map(|(shard, d)| format!("{shard} {}s", d.as_secs()))
        .collect();
    let more = match shards.len().saturating_sub(4) {
        0 => String::new(),
        n => format!(", +{n} more"),
    };
    format!(" · running: {}{more}", shown.join(", "))
}

/// Writes the whole lines of `data`, each with the prefix, completing the
/// line `held` started and keeping the unfinished end of `data` for later;
/// the end of what was written, without prefixes, goes to `tail`. One pass
/// over `data`; nothing but a held line's start and the tail is copied.
fn write_lines(
    out: &mut impl Write,
    tail: &mut Vec<u8>,
    held: &mut Held,
    data: &[u8],
) -> std::io::Result<()> {
    let mut rest = data;
    if !held.line.is_empty() {
        match memchr::memchr(b'\n', rest) {
            Some(end) => {
                out.write_all(&held.prefix)?;
                out.write_all(&held.line)?;
                out.write_all(&rest[..=end])?;
                keep_tail(tail, &held.line);
                keep_tail(tail, &rest[..=end]);
                if held.line.capacity() > WRITE_BUFFER {
                    // Give a long line's memory back.
                    held.line = Vec::new();
                }
                held.line.clear();
                rest = &rest[end + 1..];
            }
            None => {
                held.line.extend_from_slice(rest);
                if held.line.len() > MAX_HELD_LINE {
                    out.write_all(&held.prefix)?;
                    out.write_all(&held.line)?;
                    out.write_all(b"\n")?;
                    keep_tail(tail, &held.line);
                    keep_tail(tail, b"\n");
                    held.line = Vec::new();
                }
                return Ok(());
            }
        }
    }
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', rest) {
        out.write_all(&held.prefix)?;
        out.write_all(&rest[start..=end])?;
        start = end + 1;
    }
    keep_tail(tail, &rest[..start]);
    let unfinished = &rest[start..];
    if unfinished.len() > MAX_HELD_LINE {
        out.write_all(&held.prefix)?;
        out.write_all(unfinished)?;
        out.write_all(b"\n")?;
        keep_tail(tail, unfinished);
        keep_tail(tail, b"\n");
    } else {
        held.line.extend_from_slice(unfinished);
    }
    Ok(())
}

impl<W: Write + Send> Reporter for TerminalReporter<W> {
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    fn handle(&mut self, event: &RunEvent) -> std::io::Result<()> {
        let Some(bar) = self.progress.clone() else {
            return TerminalReporter::handle(self, event);
        };
        // The bar steps aside while lines are written above it.
        let written = bar.suspend(|| {
            let written = TerminalReporter::handle(self, event);
            self.out.flush().and(written)
        });
        if let RunEvent::Rerunning { .. } = event {
            bar.inc_length(1);
        }
        if let RunEvent::Finished(record) = event {
            let earlier = self.ended.insert(record.shard, record.status.clone());
            if earlier.is_some_and(|s| s != ShardStatus::Passed) {
                self.not_passed -= 1;
            }
            if record.status != ShardStatus::Passed {
                self.not_passed += 1;
            }
            bar.set_message(match self.not_passed {
                0 => String::new(),
                n => format!(", {n} not passed"),
            });
            bar.inc(1);
        }
        written
    }

    fn expect(&mut self, expected: &std::collections::BTreeMap<ShardId, Duration>) {
        self.expected = expected.clone();
    }

    fn finish(&mut self, summary: &RunSummary, tests: &TestReport) -> std::io::Result<()> {
        if let Some(bar) = self.progress.take() {
            bar.finish_and_clear();
        }
        self.summary(summary, tests)
    }
}

/// `rerun 1 of 2: 3 failed tests in a new fresh environment`, for every renderer.
pub fn rerun_line(round: u32, of: u32, what: &str) -> String {
    format!("rerun {round} of {of}: {what} in a new fresh environment")
}

/// Failed tests listed at the end before the rest is counted.
const MAX_LISTED_FAILURES: usize = 50;

/// Seconds with two decimals, as durations are shown everywhere.
pub fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::ShardRecord;
    use bytes::Bytes;

    fn shard(index: u32) -> ShardId {
        ShardId { index, count: 2 }
    }

    fn output(index: u32, data: &'static [u8]) -> RunEvent {
        RunEvent::Output {
            shard: shard(index),
            stream: OutputStream::Stdout,
            data: Bytes::from_static(data),
        }
    }

    #[test]
    fn the_progress_line_counts_finished_shards_and_leaves_the_output_alone() {
        let mut out = Vec::new();
        let bar = ProgressBar::hidden();
        bar.set_length(2);
        let mut r = TerminalReporter::new(&mut out).with_progress(bar.clone());
        Reporter::handle(&mut r, &output(1, b"line\n")).unwrap();
        Reporter::handle(
            &mut r,
            &RunEvent::Finished(ShardRecord {
                shard: shard(1),
                status: ShardStatus::TimedOut,
                duration: Duration::from_millis(10),
                attempts: 1,
                result: None,
                files: Vec::new(),
            }),
        )
        .unwrap();
        assert_eq!(bar.position(), 1);
        assert_eq!(bar.message(), ", 1 not passed");
        drop(r);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[1/2] line\n[1/2] TIMED OUT (ran out of time) in 0.01s\n"
        );
    }

    #[test]
    fn lines_from_concurrent_shards_never_mix() {
        let mut out = Vec::new();
        let mut r = TerminalReporter::new(&mut out);
        for e in [
            output(1, b"hel"),
            output(2, b"other\nsec"),
            output(1, b"lo\n"),
            output(2, b"ond"),
        ] {
            r.handle(&e).unwrap();
        }
        r.handle(&RunEvent::Finished(ShardRecord {
            shard: shard(2),
            status: ShardStatus::Failed {
                exit_code: Some(1),
                signal: None,
            },
            duration: Duration::from_millis(1500),
            attempts: 1,
            result: None,
            files: Vec::new(),
        }))
        .unwrap();
        drop(r);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "[2/2] other\n[1/2] hello\n[2/2] second\n[2/2] FAILED (exited with code 1) in 1.50s\n"
        );
    }

    fn on(stream: OutputStream, data: &[u8]) -> RunEvent {
        RunEvent::Output {
            shard: shard(1),
            stream,
            data: Bytes::copy_from_slice(data),
        }
    }

    fn finished() -> RunEvent {
        RunEvent::Finished(ShardRecord {
            shard: shard(1),
            status: ShardStatus::Passed,
            duration: Duration::from_millis(10),
            attempts: 1,
            result: None,
            files: Vec::new(),
        })
    }

    /// What the reporter writes for `events`, then the shard's end.
    fn shown(events: &[RunEvent]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut r = TerminalReporter::new(&mut out);
        for e in events {
            r.handle(e).unwrap();
        }
        r.handle(&finished()).unwrap();
        drop(r);
        out
    }

    /// `log` as the reporter must show it: every line prefixed, the last
    /// one ended, then the end line.
    fn expected(log: &[u8]) -> Vec<u8> {
        let mut want = Vec::new();
        for line in log.split_inclusive(|b| *b == b'\n') {
            want.extend_from_slice(b"[1/2] ");
            want.extend_from_slice(line);
        }
        if !log.is_empty() && !log.ends_with(b"\n") {
            want.push(b'\n');
        }
        want.extend_from_slice(b"[1/2] passed in 0.01s\n");
        want
    }

    #[test]
    fn output_is_the_same_bytes_whatever_the_chunk_boundaries() {
        // Binary bytes too: NUL, CR, invalid UTF-8, empty lines, a partial last line.
        let log: &[u8] = b"first\n\n\x00\xff\xfe binary\r\nsecond line\nno newline at the end";
        let want = expected(log);
        for size in 1..=log.len() {
            let events: Vec<RunEvent> = log
                .chunks(size)
                .map(|c| on(OutputStream::Stdout, c))
                .collect();
            assert_eq!(shown(&events), want, "chunks of {size}");
        }
        // Every single split point, with the two halves as separate chunks.
        for cut in 0..=log.len() {
            let events = [
                on(OutputStream::Stdout, &log[..cut]),
                on(OutputStream::Stdout, &log[cut..]),
            ];
            assert_eq!(shown(&events), want, "cut at {cut}");
        }
    }

    #[test]
    fn a_ten_megabyte_line_stays_whole() {
        let mut line = vec![b'x'; 10 * 1024 * 1024];
        line.push(b'\n');
        let events: Vec<RunEvent> = line
            .chunks(64 * 1024 + 7)
            .map(|c| on(OutputStream::Stdout, c))
            .collect();
        assert_eq!(shown(&events), expected(&line));
    }

    #[test]
    fn output_without_newlines_is_shown_in_bounded_pieces() {
        let blob = vec![b'y'; MAX_HELD_LINE * 2 + 10];
        let events: Vec<RunEvent> = blob
            .chunks(1024 * 1024)
            .map(|c| on(OutputStream::Stdout, c))
            .collect();
        let out = shown(&events);
        let pieces: Vec<&[u8]> = out.split_inclusive(|b| *b == b'\n').collect();
        let (end, pieces) = pieces.split_last().unwrap();
        assert_eq!(*end, b"[1/2] passed in 0.01s\n");
        assert!(pieces.len() >= 2, "{} pieces", pieces.len());
        for piece in pieces {
            assert!(piece.starts_with(b"[1/2] y"));
            assert!(piece.len() - 7 <= MAX_HELD_LINE + 1024 * 1024);
        }
        assert_eq!(
            pieces.iter().map(|p| p.len() - 7).sum::<usize>(),
            blob.len()
        );
    }

    #[test]
    fn stdout_and_stderr_lines_keep_their_order_and_never_mix() {
        let events = [
            on(OutputStream::Stdout, b"out 1\npar"),
            on(OutputStream::Stderr, b"err 1\n"),
            on(OutputStream::Stdout, b"tial out\n"),
            on(OutputStream::Stderr, b"err 2 unfinished"),
            on(OutputStream::Stdout, b"out 3\n"),
        ];
        assert_eq!(
            String::from_utf8(shown(&events)).unwrap(),
            "[1/2] out 1\n[1/2] err 1\n[1/2] partial out\n[1/2] out 3\n\
             [1/2] err 2 unfinished\n[1/2] passed in 0.01s\n"
        );
    }

    /// Counts the writes that reach the underlying output.
    struct CountingWriter<'a>(&'a mut Vec<u8>, &'a mut usize);

    impl Write for CountingWriter<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            *self.1 += 1;
            self.0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn many_lines_go_out_in_few_writes() {
        let (mut out, mut writes) = (Vec::new(), 0);
        let mut r = TerminalReporter::new(CountingWriter(&mut out, &mut writes));
        let log = "a line of a test log, about as long as pytest's\n".repeat(20_000);
        for chunk in log.as_bytes().chunks(4096) {
            Reporter::handle(&mut r, &on(OutputStream::Stdout, chunk)).unwrap();
        }
        Reporter::flush(&mut r).unwrap();
        drop(r);
        assert_eq!(out.len(), log.len() + 20_000 * "[1/2] ".len());
        assert!(writes < 30, "{writes} writes for 20,000 lines");
    }

    fn record(index: u32, status: ShardStatus) -> ShardRecord {
        ShardRecord {
            shard: shard(index),
            status,
            duration: Duration::from_millis(1000 * u64::from(index)),
            attempts: 1,
            result: None,
            files: Vec::new(),
        }
    }

    fn failed() -> ShardStatus {
        ShardStatus::Failed {
            exit_code: Some(1),
            signal: None,
        }
    }

    /// Shard 1 passes and shard 2 fails, each printing a line; then the summary.
    fn two_shards(options: TerminalOptions) -> String {
        let mut out = Vec::new();
        let mut r = TerminalReporter::new(&mut out).with_options(options);
        r.handle(&output(1, b"one says hi\n")).unwrap();
        r.handle(&output(2, b"two says hi\nno newline")).unwrap();
        let records = vec![record(1, ShardStatus::Passed), record(2, failed())];
        for rec in &records {
            r.handle(&RunEvent::Finished(rec.clone())).unwrap();
        }
        let summary = RunSummary {
            records,
            stopped_by: None,
        };
        r.summary(&summary, &TestReport::default()).unwrap();
        drop(r);
        String::from_utf8(out).unwrap()
    }

    fn with_output(output: OutputMode) -> TerminalOptions {
        TerminalOptions {
            output,
            ..TerminalOptions::default()
        }
    }

    #[test]
    fn with_output_failed_only_failures_are_shown_whole_when_they_end() {
        let text = two_shards(with_output(OutputMode::Failed));
        assert!(!text.contains("one says hi"), "{text}");
        let live =
            "[2/2] two says hi\n[2/2] no newline\n[2/2] FAILED (exited with code 1) in 2.00s\n";
        assert!(
            text.starts_with(&format!("[1/2] passed in 1.00s\n{live}")),
            "{text}"
        );
        // ...and repeated with the other failures at the end.
        assert!(
            text.contains(
                "──── [2/2] FAILED (exited with code 1) ────\n  │ two says hi\n  │ no newline\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn with_output_none_nothing_is_shown_live_but_failures_are_repeated() {
        let text = two_shards(with_output(OutputMode::None));
        assert!(!text.contains("one says hi"), "{text}");
        assert_eq!(text.matches("two says hi").count(), 1, "{text}");
        assert!(text.contains("──── [2/2] FAILED"), "{text}");
    }

    #[test]
    fn with_output_all_everything_is_live_and_failures_come_again_at_the_end() {
        let text = two_shards(TerminalOptions::default());
        assert_eq!(text.matches("one says hi").count(), 1, "{text}");
        assert_eq!(text.matches("two says hi").count(), 2, "{text}");
        let end = text.find("──── [2/2]").unwrap();
        assert!(end > text.find("[2/2] FAILED (exited").unwrap());
    }

    #[test]
    fn the_summary_counts_in_words_names_the_time_limit_and_keeps_message_indentation() {
        let mut out = Vec::new();
        let options = TerminalOptions {
            timeout: Some(Duration::from_secs(600)),
            ..TerminalOptions::default()
        };
        let mut r = TerminalReporter::new(&mut out).with_options(options);
        let rec = record(1, ShardStatus::TimedOut);
        r.handle(&RunEvent::Finished(rec.clone())).unwrap();
        let tests = TestReport {
            failures: vec![crate::report::junit::TestFailure {
                shard: shard(1),
                name: "t".into(),
                file: None,
                line: None,
                message: "assert 1 == 2\n  where 1 = f()\n    and more".into(),
            }],
            ..TestReport::default()
        };
        let summary = RunSummary {
            records: vec![rec],
            stopped_by: None,
        };
        r.summary(&summary, &tests).unwrap();
        drop(r);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("[1/2] TIMED OUT (ran out of its 10m time limit) in 1.00s\n"),
            "{text}"
        );
        assert!(text.contains("1 shard: 0 passed, 0 failed, 1 timed out (limit 10m), 0 could not run (not passed: 1)\n"), "{text}");
        assert!(
            text.contains("  [1/2] t: assert 1 == 2\n        where 1 = f()\n          and more\n"),
            "{text}"
        );
        assert!(text.contains("\nwall time "), "{text}");
        assert!(!text.contains('\u{1b}'), "no colour unless asked: {text}");
    }

    #[test]
    fn planned_shards_show_expected_next_to_actual_and_flaky_tests_are_listed() {
        let mut out = Vec::new();
        let mut r = TerminalReporter::new(&mut out);
        let records = vec![
            record(1, ShardStatus::Passed),
            record(2, ShardStatus::Passed),
        ];
        let expected = [(shard(1), Duration::from_millis(2500))]
            .into_iter()
            .collect();
        Reporter::expect(&mut r, &expected);
        let tests = TestReport {
            flaky: vec![crate::report::junit::TestFailure {
                shard: shard(2),
                name: "t.py::test_x".into(),
                file: None,
                line: None,
                message: "AssertionError: once\nmore".into(),
            }],
            ..TestReport::default()
        };
        let summary = RunSummary {
            records,
            stopped_by: None,
        };
        r.summary(&summary, &tests).unwrap();
        drop(r);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("shard    status       duration  expected  exit  environment\n"),
            "{text}"
        );
        assert!(
            text.contains("1/2      passed          1.00s     2.50s     0  -\n"),
            "{text}"
        );
        assert!(
            text.contains("2/2      passed          2.00s         -     0  -\n"),
            "{text}"
        );
        assert!(
            text.contains("flaky (failed, then passed on a rerun):\n  [2/2] t.py::test_x: AssertionError: once\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "2 shards: 2 passed, 0 failed, 0 timed out, 0 could not run; 1 test flaky\n"
            ),
            "{text}"
        );
        // Without a plan, no such column.
        let text = two_shards(TerminalOptions::default());
        assert!(!text.contains("expected"), "{text}");
    }

    #[test]
    fn colour_paints_statuses_and_keeps_the_columns() {
        let text = two_shards(TerminalOptions {
            palette: Palette::new(true),
            ..TerminalOptions::default()
        });
        assert!(
            text.contains("[2/2] \u{1b}[1m\u{1b}[31mFAILED\u{1b}[0m (exited"),
            "{text}"
        );
        assert!(
            text.contains("1/2      \u{1b}[32mpassed     \u{1b}[0m     1.00s"),
            "{text}"
        );
    }

    #[test]
    fn the_running_list_shows_the_longest_running_first() {
        let now = Instant::now();
        let mut running = HashMap::new();
        for (index, secs) in [(1, 5), (2, 45), (3, 12), (4, 1), (5, 30), (6, 2)] {
            running.insert(shard(index), now - Duration::from_secs(secs));
        }
        assert_eq!(
            running_list(&running, now),
            " · running: 2/2 45s, 5/2 30s, 3/2 12s, 1/2 5s, +2 more"
        );
        assert_eq!(running_list(&HashMap::new(), now), "");
    }
}
