//! What a run said of each listed test: its duration and whether it passed,
//! read from the report the runner was asked to write (JUnit, or jest's JSON
//! turned into JUnit) or, for the runners that print one line per test or
//! package, from the shard's log as it streams.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};

use super::RunnerKind;
use crate::protocol::{OutputStream, ShardId};

/// One test's result in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestResult {
    /// How long it took, when the runner said (Go says nothing for a cached package).
    pub duration: Option<Duration>,
    /// Whether it passed (a skipped test counts as passed).
    pub passed: bool,
}

/// Results by test id.
pub type Results = BTreeMap<String, TestResult>;

/// Adds `result` for `id`: durations add up (several cases of one file), a
/// failure anywhere fails the id.
pub(crate) fn merge(into: &mut Results, id: String, result: TestResult) {
    match into.get_mut(&id) {
        Some(known) => {
            known.duration = match (known.duration, result.duration) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            };
            known.passed &= result.passed;
        }
        None => {
            into.insert(id, result);
        }
    }
}

/// The result a log line gives, for the runners whose log has one line per
/// test (nextest: `PASS [   0.023s] (1/2) nx tests::ok`) or per package (Go:
/// `ok  \texample.com/m/a\t0.002s`, or `go test -json`'s package events).
pub fn log_line(kind: RunnerKind, line: &str) -> Option<(String, TestResult)> {
    let line = strip_escapes(line);
    match kind {
        RunnerKind::CargoNextest => nextest_line(&line),
        RunnerKind::Go => go_line(&line),
        _ => None,
    }
}

/// `STATUS [ 0.023s] (1/2) binary-id test-name`, the final status lines of
/// nextest's human output (`TRY 2 FAIL` is an attempt, overwritten by the
/// test's later line; `SLOW` is not an end).
fn nextest_line(line: &str) -> Option<(String, TestResult)> {
    let (head, rest) = line.trim_start().split_once('[')?;
    let status = head.split_whitespace().last()?;
    let passed = match status {
        "PASS" | "LEAK" => true,
        "FAIL" | "TIMEOUT" | "LEAK-FAIL" | "ABORT" => false,
        s if s.starts_with("SIG") => false,
        _ => return None,
    };
    let (time, rest) = rest.split_once(']')?;
    let seconds: f64 = time.trim().strip_suffix('s')?.trim().parse().ok()?;
    let mut rest = rest.trim_start();
    if let Some(after) = rest.strip_prefix('(') {
        rest = after.split_once(')')?.1.trim_start();
    }
    let (binary, test) = rest.split_once(' ')?;
    let test = test.trim();
    if binary.is_empty() || test.is_empty() || test.contains(' ') {
        return None;
    }
    Some((
        format!("{binary} {test}"),
        TestResult {
            duration: seconds_said(seconds),
            passed,
        },
    ))
}

/// A time a log line says, if it could be one: the log is the shard's
/// output, which any test can write to (`-1s`, `NaNs`, `1e300s`).
fn seconds_said(seconds: f64) -> Option<Duration> {
    Duration::try_from_secs_f64(seconds).ok()
}

/// A package's end in `go test`'s output: `ok  \tpkg\t0.002s`,
/// `FAIL\tpkg\t0.003s`, `?   \tpkg\t[no test files]`, `ok  \tpkg\t(cached)`,
/// or, with `-json`, an event with a `Package`, no `Test` and an `Action` of
/// `pass`, `fail` or `skip`.
fn go_line(line: &str) -> Option<(String, TestResult)> {
    if line.starts_with('{') {
        let event: serde_json::Value = serde_json::from_str(line).ok()?;
        if event.get("Test").is_some() {
            return None;
        }
        let passed = match event.get("Action")?.as_str()? {
            "pass" | "skip" => true,
            "fail" => false,
            _ => return None,
        };
        let package = event.get("Package")?.as_str()?.to_string();
        let duration = event
            .get("Elapsed")
            .and_then(serde_json::Value::as_f64)
            .and_then(seconds_said);
        return Some((package, TestResult { duration, passed }));
    }
    let mut fields = line.split('\t');
    let passed = match fields.next()?.trim_end() {
        "ok" | "?" => true,
        "FAIL" => false,
        _ => return None,
    };
    let package = fields.next()?.trim();
    // `FAIL\tpkg [build failed]`: the package never ran.
    let (package, ran) = match package.split_once(' ') {
        Some((package, _)) => (package, false),
        None => (package, true),
    };
    if package.is_empty() {
        return None;
    }
    let said = fields.next().map(str::trim).unwrap_or("");
    let duration = match said.strip_suffix('s').and_then(|s| s.parse::<f64>().ok()) {
        Some(seconds) => seconds_said(seconds),
        // Nothing ran: no time to learn, but nothing to wait for either.
        None if said == "[no test files]" => Some(Duration::ZERO),
        None => None,
    };
    Some((
        package.to_string(),
        TestResult {
            duration: duration.filter(|_| ran),
            passed,
        },
    ))
}

/// The line without terminal escape sequences (colour).
fn strip_escapes(line: &str) -> std::borrow::Cow<'_, str> {
    if !line.contains('\u{1b}') {
        return line.into();
    }
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        // CSI: ESC [ parameters final-letter.
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        }
    }
    out.into()
}

/// Reads each shard's log, line by line as it streams, for the results of
/// the runners whose log says them (see [`log_line`]).
#[derive(Debug)]
pub struct LogScanner {
    kind: RunnerKind,
    /// The unfinished last line of each stream.
    partial: HashMap<(ShardId, OutputStream), Vec<u8>>,
    /// The listed ids: a line about any other (a test printing look-alike
    /// lines) is not kept, so what is kept stays bounded by the listing.
    listed: HashSet<String>,
    /// What each shard's log said so far.
    pub results: BTreeMap<ShardId, Results>,
}

/// Longest unfinished line kept: a longer one is no status line.
const MAX_LINE: usize = 64 * 1024;

impl LogScanner {
    /// A scanner for `kind`'s log lines.
    pub fn new(kind: RunnerKind) -> Self {
        LogScanner {
            kind,
            partial: HashMap::new(),
            listed: HashSet::new(),
            results: BTreeMap::new(),
        }
    }

    /// The ids the listing gave: only lines about these are kept.
    pub fn expect(&mut self, listed: &[String]) {
        self.listed = listed.iter().cloned().collect();
    }

    /// Takes a piece of a shard's output.
    pub fn feed(&mut self, shard: ShardId, stream: OutputStream, data: &[u8]) {
        let partial = self.partial.entry((shard, stream)).or_default();
        let mut rest = data;
        while let Some(at) = rest.iter().position(|b| *b == b'\n') {
            partial.extend_from_slice(&rest[..at]);
            let line = String::from_utf8_lossy(partial);
            if let Some((id, result)) = log_line(self.kind, line.trim_end_matches('\r')) {
                if self.listed.contains(&id) {
                    // A later line of the same test (a retry's) says the last word.
                    self.results.entry(shard).or_default().insert(id, result);
                }
            }
            partial.clear();
            rest = &rest[at + 1..];
        }
        if partial.len() + rest.len() <= MAX_LINE {
            partial.extend_from_slice(rest);
        } else {
            partial.clear();
        }
    }
}

/// Why a jest report could not be read.
#[derive(Debug, thiserror::Error)]
#[error("not a jest --json report: {0}")]
pub struct JestReportError(#[from] serde_json::Error);

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct JestReport {
    test_results: Vec<JestFile>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct JestFile {
    name: String,
    #[serde(default)]
    start_time: Option<f64>,
    #[serde(default)]
    end_time: Option<f64>,
    #[serde(default)]
    status: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    assertion_results: Vec<JestCase>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct JestCase {
    #[serde(default)]
    ancestor_titles: Vec<String>,
    title: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    duration: Option<f64>,
    #[serde(default)]
    failure_messages: Vec<String>,
}

/// jest's `--json` report as JUnit: one suite per test file, named by
/// `relative` of jest's absolute path for it (the id the listing gave), its
/// time the file's own; one case per test, its class the file and the
/// `describe` titles, its failure text jest's (with the stack, which places it).
pub fn jest_to_junit(
    data: &[u8],
    relative: impl Fn(&str) -> String,
) -> Result<Report, JestReportError> {
    let jest: JestReport = serde_json::from_slice(data)?;
    let mut report = Report::new("jest");
    for file in jest.test_results {
        let name = relative(&file.name);
        let mut suite = TestSuite::new(name.clone());
        if let (Some(start), Some(end)) = (file.start_time, file.end_time) {
            suite.set_time(Duration::from_millis((end - start).max(0.0) as u64));
        }
        for case in &file.assertion_results {
            let status = match case.status.as_str() {
                "passed" => TestCaseStatus::success(),
                "failed" => {
                    let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
                    let text = case.failure_messages.join("\n");
                    if let Some(first) = text.lines().next() {
                        status.set_message(first.to_string());
                    }
                    status.set_description(text);
                    status
                }
                _ => TestCaseStatus::skipped(),
            };
            let mut test = TestCase::new(case.title.clone(), status);
            let mut classname = vec![name.clone()];
            classname.extend(case.ancestor_titles.iter().cloned());
            test.set_classname(classname.join(" › "));
            if let Some(ms) = case.duration {
                test.set_time(Duration::from_millis(ms.max(0.0) as u64));
            }
            suite.add_test_case(test);
        }
        // A file that failed to run at all (a syntax error) has no tests.
        if file.assertion_results.is_empty() && file.status == "failed" {
            let mut status = TestCaseStatus::non_success(NonSuccessKind::Error);
            if let Some(first) = file.message.lines().map(str::trim).find(|l| !l.is_empty()) {
                status.set_message(first.to_string());
            }
            status.set_description(file.message.clone());
            let mut test = TestCase::new("(the file)", status);
            test.set_classname(name.clone());
            suite.add_test_case(test);
        }
        report.add_test_suite(suite);
    }
    Ok(report)
}

/// Results by file, for the runners whose ids are files (jest, vitest): a
/// suite's name is the file's path relative to the working directory, its
/// time the file's.
pub fn by_suite(report: &Report) -> Results {
    let mut out = Results::new();
    for suite in &report.test_suites {
        let passed = suite
            .test_cases
            .iter()
            .all(|c| !matches!(c.status, TestCaseStatus::NonSuccess { .. }));
        let duration = suite.time.or_else(|| {
            let times: Vec<Duration> = suite.test_cases.iter().filter_map(|c| c.time).collect();
            (!times.is_empty()).then(|| times.iter().sum())
        });
        merge(
            &mut out,
            suite.name.as_str().trim_start_matches("./").to_string(),
            TestResult { duration, passed },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Option<Duration> {
        Some(Duration::from_secs_f64(s))
    }

    #[test]
    fn times_no_run_could_take_are_not_learned() {
        for said in ["-1", "NaN", "inf", "1e300"] {
            for (kind, line) in [
                (
                    RunnerKind::CargoNextest,
                    format!("        PASS [ {said}s] nx tests::ok"),
                ),
                (RunnerKind::Go, format!("ok  \texample.com/m/a\t{said}s")),
            ] {
                if let Some((_, result)) = log_line(kind, &line) {
                    assert_eq!(result.duration, None, "{line}");
                }
            }
        }
        let event = r#"{"Action":"pass","Package":"example.com/m/a","Elapsed":-3}"#;
        assert_eq!(log_line(RunnerKind::Go, event).unwrap().1.duration, None);
    }

    #[test]
    fn nextest_status_lines_give_each_tests_end() {
        let line = |l: &str| log_line(RunnerKind::CargoNextest, l);
        assert_eq!(
            line("        PASS [   0.023s] (1/2) nx tests::ok"),
            Some((
                "nx tests::ok".into(),
                TestResult {
                    duration: secs(0.023),
                    passed: true
                }
            ))
        );
        assert_eq!(
            line("\u{1b}[31;1m        FAIL\u{1b}[0m [   1.500s] ( 3/12) nx::integ it")
                .map(|r| (r.0, r.1.passed)),
            Some(("nx::integ it".into(), false))
        );
        assert_eq!(
            line("  TRY 2 PASS [   0.010s] nx tests::flaky").map(|r| r.1.passed),
            Some(true)
        );
        for other in [
            "        SLOW [> 60.000s] nx tests::slow",
            "     Summary [   0.031s] 2 tests run: 2 passed, 2 skipped",
            "    Starting 2 tests across 2 binaries",
            "--- STDOUT: nx tests::bad ---",
        ] {
            assert_eq!(line(other), None, "{other}");
        }
    }

    #[test]
    fn go_package_lines_and_json_events() {
        let line = |l: &str| log_line(RunnerKind::Go, l);
        assert_eq!(
            line("ok  \texample.com/m/a\t0.002s\tcoverage: 50.0% of statements"),
            Some((
                "example.com/m/a".into(),
                TestResult {
                    duration: secs(0.002),
                    passed: true
                }
            ))
        );
        assert_eq!(
            line("FAIL\texample.com/m/b\t0.300s").map(|r| r.1),
            Some(TestResult {
                duration: secs(0.3),
                passed: false
            })
        );
        assert_eq!(
            line("FAIL\texample.com/m/c [build failed]"),
            Some((
                "example.com/m/c".into(),
                TestResult {
                    duration: None,
                    passed: false
                }
            ))
        );
        assert_eq!(
            line("ok  \texample.com/m/a\t(cached)").map(|r| r.1.duration),
            Some(None)
        );
        assert_eq!(
            line("?   \texample.com/m/cmd\t[no test files]").map(|r| r.1.duration),
            Some(Some(Duration::ZERO))
        );
        assert_eq!(
            line(r#"{"Action":"pass","Package":"example.com/m/a","Elapsed":0.5}"#),
            Some((
                "example.com/m/a".into(),
                TestResult {
                    duration: secs(0.5),
                    passed: true
                }
            ))
        );
        assert_eq!(
            line(r#"{"Action":"pass","Package":"p","Test":"TestX","Elapsed":0.5}"#),
            None
        );
        // A test's own FAIL line and the final bare FAIL are no package ends.
        assert_eq!(line("--- FAIL: TestX (0.00s)"), None);
        assert_eq!(line("FAIL"), None);
    }

    #[test]
    fn lines_are_read_across_pieces_per_shard_and_stream() {
        let mut scanner = LogScanner::new(RunnerKind::Go);
        scanner.expect(&["m/a".to_string(), "m/b".to_string()]);
        let (a, b) = (
            ShardId { index: 1, count: 2 },
            ShardId { index: 2, count: 2 },
        );
        scanner.feed(a, OutputStream::Stdout, b"ok  \tm/a\t0.");
        scanner.feed(b, OutputStream::Stdout, b"FAIL\tm/b\t1.0s\n");
        scanner.feed(a, OutputStream::Stderr, b"noise\n");
        scanner.feed(a, OutputStream::Stdout, b"25s\n");
        assert_eq!(scanner.results[&a]["m/a"].duration, secs(0.25));
        assert!(!scanner.results[&b]["m/b"].passed);
        scanner.feed(b, OutputStream::Stdout, b"ok  \tm/unlisted\t1.0s\n");
        assert_eq!(scanner.results[&b].len(), 1, "only listed ids are kept");
    }
}
