//! The terminal renderer: each shard's output line by line with a shard
//! prefix as it arrives, then a summary table and the failed tests.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::junit::TestReport;
use super::Reporter;
use crate::dispatch::{RunEvent, RunSummary, ShardStatus};
use crate::protocol::{OutputStream, ShardId};

/// A line longer than this is shown in pieces rather than held back (a
/// shard that prints megabytes without a newline must not fill memory).
const MAX_HELD_LINE: usize = 16 * 1024 * 1024;
/// Output is written in pieces of about this size while it streams.
const WRITE_BUFFER: usize = 64 * 1024;

/// Writes shard output with `[i/n] ` prefixes, whole lines at a time, so
/// lines of concurrent shards never interleave mid-line. Output is buffered
/// and written out when the buffer fills, when a shard ends, and whenever
/// the reporter is idle ([`Reporter::flush`]), never a `write` per line.
pub struct TerminalReporter<W: Write> {
    out: BufWriter<W>,
    partial: HashMap<(ShardId, OutputStream), Held>,
    progress: Option<ProgressBar>,
    not_passed: usize,
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
        }
    }

    /// Adds a progress line below the output (for a terminal): shards done,
    /// how many did not pass, time so far. Output is printed above it.
    pub fn with_progress(mut self, bar: ProgressBar) -> Self {
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} {elapsed_precise} {pos}/{len} shards done{msg}")
        {
            bar.set_style(style);
        }
        self.progress = Some(bar);
        self
    }

    /// Shows one event.
    pub fn handle(&mut self, event: &RunEvent) -> std::io::Result<()> {
        match event {
            RunEvent::Started { .. } | RunEvent::Secret(_) => Ok(()),
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
                write_lines(&mut self.out, held, data)
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
            RunEvent::Finished(record) => {
                for stream in [OutputStream::Stdout, OutputStream::Stderr] {
                    if let Some(held) = self.partial.remove(&(record.shard, stream)) {
                        if !held.line.is_empty() {
                            self.out.write_all(&held.prefix)?;
                            self.out.write_all(&held.line)?;
                            self.out.write_all(b"\n")?;
                        }
                    }
                }
                let detail = match &record.status {
                    ShardStatus::Passed => String::new(),
                    other => format!(" ({})", other.describe()),
                };
                writeln!(
                    self.out,
                    "[{}] {}{detail} in {}",
                    record.shard,
                    record.status.label(),
                    secs(record.duration)
                )?;
                self.out.flush()
            }
        }
    }

    /// Writes the summary table, the failed tests and the closing count line.
    pub fn summary(&mut self, summary: &RunSummary, tests: &TestReport) -> std::io::Result<()> {
        writeln!(self.out)?;
        writeln!(
            self.out,
            "{:<8} {:<10} {:>9} {:>5}  environment",
            "shard", "status", "duration", "exit"
        )?;
        for r in &summary.records {
            let exit = match (&r.status, &r.result) {
                (
                    ShardStatus::Failed {
                        exit_code: Some(c), ..
                    },
                    _,
                ) => c.to_string(),
                (ShardStatus::Passed, _) => "0".into(),
                (
                    ShardStatus::Failed {
                        signal: Some(s), ..
                    },
                    _,
                ) => format!("sig{s}"),
                _ => "-".into(),
            };
            let environment = match &r.result {
                Some(res) if res.fresh_environment => "fresh",
                Some(_) => "reused, wiped",
                None => "-",
            };
            writeln!(
                self.out,
                "{:<8} {:<10} {:>9} {:>5}  {}",
                r.shard.to_string(),
                r.status.label(),
                secs(r.duration),
                exit,
                environment
            )?;
        }
        for (shard, path, error) in &tests.problems {
            writeln!(self.out, "[{shard}] {path}: {error}")?;
        }
        if !tests.failures.is_empty() {
            writeln!(self.out, "\nfailed tests:")?;
            for f in tests.failures.iter().take(MAX_LISTED_FAILURES) {
                let place = match (&f.file, f.line) {
                    (Some(file), Some(line)) => format!(" ({file}:{line})"),
                    (Some(file), None) => format!(" ({file})"),
                    _ => String::new(),
                };
                writeln!(self.out, "  [{}] {}{place}: {}", f.shard, f.name, f.message)?;
            }
            if tests.failures.len() > MAX_LISTED_FAILURES {
                writeln!(
                    self.out,
                    "  ... and {} more",
                    tests.failures.len() - MAX_LISTED_FAILURES
                )?;
            }
        }
        let failed: Vec<String> = summary
            .records
            .iter()
            .filter(|r| r.status != ShardStatus::Passed)
            .map(|r| r.shard.index.to_string())
            .collect();
        writeln!(
            self.out,
            "{} shards: {} passed, {} failed, {} timed out, {} could not run{}{}",
            summary.records.len(),
            summary.count(|s| *s == ShardStatus::Passed),
            summary.count(|s| matches!(s, ShardStatus::Failed { .. })),
            summary.count(|s| *s == ShardStatus::TimedOut),
            summary.count(|s| matches!(s, ShardStatus::InfraFailed { .. })),
            match summary.count(|s| matches!(s, ShardStatus::Interrupted { .. })) {
                0 => String::new(),
                n => format!(", {n} interrupted"),
            },
            if failed.is_empty() {
                String::new()
            } else {
                format!(" (not passed: {})", failed.join(", "))
            }
        )?;
        self.out.flush()
    }
}

/// Writes the whole lines of `data`, each with the prefix, completing the
/// line `held` started and keeping the unfinished end of `data` for later.
/// One pass over `data`; nothing but a held line's start is copied.
fn write_lines(out: &mut impl Write, held: &mut Held, data: &[u8]) -> std::io::Result<()> {
    let mut rest = data;
    if !held.line.is_empty() {
        match memchr::memchr(b'\n', rest) {
            Some(end) => {
                out.write_all(&held.prefix)?;
                out.write_all(&held.line)?;
                out.write_all(&rest[..=end])?;
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
    let tail = &rest[start..];
    if tail.len() > MAX_HELD_LINE {
        out.write_all(&held.prefix)?;
        out.write_all(tail)?;
        out.write_all(b"\n")?;
    } else {
        held.line.extend_from_slice(tail);
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
        if let RunEvent::Finished(record) = event {
            if record.status != ShardStatus::Passed {
                self.not_passed += 1;
                bar.set_message(format!(", {} not passed", self.not_passed));
            }
            bar.inc(1);
        }
        written
    }

    fn finish(&mut self, summary: &RunSummary, tests: &TestReport) -> std::io::Result<()> {
        if let Some(bar) = self.progress.take() {
            bar.finish_and_clear();
        }
        self.summary(summary, tests)
    }
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
}
