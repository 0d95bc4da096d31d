//! `--retries`: what a shard that did not pass reruns in a new fresh
//! environment, and how its attempts add up to one record. The last attempt
//! decides the shard's status; the JUnit reports of all attempts are merged,
//! each rerun test carrying its earlier failures (`<flakyFailure>` when it
//! passed in the end, `<rerunFailure>` when it did not), as Maven Surefire
//! writes them.

use std::collections::HashMap;

use quick_junit::{
    FlakyOrRerun, NonSuccessReruns, Report, TestCase, TestCaseStatus, TestRerun, TestSuite,
};

use crate::dispatch::{CollectedFile, ShardRecord, ShardStatus};
use crate::runner::Results;

/// What a shard runs again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rerun {
    /// These tests, the ones that failed or never ran (with `--runner`).
    Failed(Vec<String>),
    /// All the tests the shard ran, when its report cannot say which
    /// failed (with `--runner`).
    All(Vec<String>),
    /// The shard's whole command (without `--runner`).
    Whole,
}

impl Rerun {
    /// The tests it runs (with `--runner`); `None` for the whole shard.
    pub fn tests(&self) -> Option<&[String]> {
        match self {
            Rerun::Failed(tests) | Rerun::All(tests) => Some(tests),
            Rerun::Whole => None,
        }
    }

    /// In words: `2 failed tests`, `all 5 tests (no report says which
    /// failed)`, `the whole shard`.
    pub fn describe(&self) -> String {
        match self {
            Rerun::Failed(tests) => crate::report::plural(tests.len(), "failed test"),
            Rerun::All(tests) => format!(
                "all {} (no report says which failed)",
                crate::report::plural(tests.len(), "test")
            ),
            Rerun::Whole => "the whole shard".into(),
        }
    }
}

/// What `record`'s shard reruns, or `None` when it passed or was
/// interrupted (an interrupted run starts nothing more). `ran` is the tests
/// its last attempt ran (with `--runner`), `results` what the runner said of
/// each (its report, or its log). When the shard failed and the runner named
/// a failed test, every test of `ran` that did not pass reruns: the failed
/// ones and those that never ran (a runner stopped at its first failure,
/// such as nextest by default or `pytest -x`). A shard that timed out, could
/// not run, or failed with no failed test named reruns all of `ran`.
pub fn rerun_of(
    record: &ShardRecord,
    ran: Option<&[String]>,
    results: Option<&Results>,
) -> Option<Rerun> {
    if matches!(
        record.status,
        ShardStatus::Passed | ShardStatus::Interrupted { .. }
    ) {
        return None;
    }
    let Some(ran) = ran else {
        return Some(Rerun::Whole);
    };
    let not_passed: Vec<String> = match (&record.status, results) {
        (ShardStatus::Failed { .. }, Some(results)) if results.values().any(|r| !r.passed) => ran
            .iter()
            .filter(|t| !results.get(*t).is_some_and(|r| r.passed))
            .cloned()
            .collect(),
        _ => Vec::new(),
    };
    Some(if not_passed.is_empty() {
        Rerun::All(ran.to_vec())
    } else {
        Rerun::Failed(not_passed)
    })
}

/// One record for a shard from its record so far and a rerun's: the rerun's
/// status, the time and attempts of both, and the files of both, JUnit
/// reports merged.
pub fn fold(earlier: ShardRecord, rerun: ShardRecord) -> ShardRecord {
    let status = rerun.status;
    let mut files = earlier.files;
    for file in rerun.files {
        match files.iter_mut().find(|f| f.path == file.path) {
            Some(old) => *old = merge_file(old, file),
            None => files.push(file),
        }
    }
    ShardRecord {
        shard: earlier.shard,
        status,
        duration: earlier.duration + rerun.duration,
        attempts: earlier.attempts + rerun.attempts,
        result: rerun.result.or(earlier.result),
        files,
    }
}

/// A file sent back by two attempts: JUnit reports merged; anything else
/// (or a report that does not parse) is the later one.
fn merge_file(earlier: &CollectedFile, later: CollectedFile) -> CollectedFile {
    let parse = crate::report::junit::parse;
    let (Ok(old), Ok(new)) = (parse(&earlier.data), parse(&later.data)) else {
        return later;
    };
    let mut data = Vec::new();
    match merge_reports(old, new).serialize(&mut data) {
        Ok(()) => CollectedFile {
            path: later.path,
            data: data.into(),
        },
        Err(_) => later,
    }
}

/// `earlier` with each of `later`'s cases in place of the same case
/// (classname and name), carrying the earlier failures as reruns; cases new
/// in `later` are added.
pub fn merge_reports(earlier: Report, later: Report) -> Report {
    let key = |c: &TestCase| {
        (
            c.classname.as_ref().map(|s| s.to_string()),
            c.name.to_string(),
        )
    };
    let mut newer: HashMap<_, TestCase> = HashMap::new();
    let mut order = Vec::new();
    for suite in &later.test_suites {
        for case in &suite.test_cases {
            let k = key(case);
            order.push((suite.name.clone(), k.clone()));
            newer.insert(k, case.clone());
        }
    }
    let mut merged = earlier;
    let earlier_suites = std::mem::take(&mut merged.test_suites);
    (merged.tests, merged.failures, merged.errors) = (0, 0, 0);
    let mut suites: Vec<TestSuite> = Vec::new();
    for mut suite in earlier_suites {
        let cases = std::mem::take(&mut suite.test_cases);
        let mut out = suite;
        (out.tests, out.skipped, out.errors, out.failures) = (0, 0, 0, 0);
        for case in cases {
            let case = match newer.remove(&key(&case)) {
                Some(again) => rerun_case(case, again),
                None => case,
            };
            out.add_test_case(case);
        }
        suites.push(out);
    }
    for (suite_name, k) in order {
        let Some(case) = newer.remove(&k) else {
            continue;
        };
        match suites.iter_mut().find(|s| s.name == suite_name) {
            Some(suite) => {
                suite.add_test_case(case);
            }
            None => {
                let mut suite = TestSuite::new(suite_name);
                suite.add_test_case(case);
                suites.push(suite);
            }
        }
    }
    merged.add_test_suites(suites);
    merged
}

/// The case as it ran again, with the earlier run's failures as its reruns.
fn rerun_case(earlier: TestCase, mut again: TestCase) -> TestCase {
    let mut runs = match earlier.status {
        TestCaseStatus::NonSuccess {
            kind,
            message,
            ty,
            description,
            reruns,
        } => {
            let mut first = TestRerun::new(kind);
            first.message = message;
            first.ty = ty;
            first.description = description;
            first.time = earlier.time;
            first.system_out = earlier.system_out;
            first.system_err = earlier.system_err;
            std::iter::once(first).chain(reruns.runs).collect()
        }
        TestCaseStatus::Success { flaky_runs } => flaky_runs,
        TestCaseStatus::Skipped { .. } => Vec::new(),
    };
    match &mut again.status {
        TestCaseStatus::Success { flaky_runs } => {
            runs.append(flaky_runs);
            *flaky_runs = runs;
        }
        TestCaseStatus::NonSuccess { reruns, .. } => {
            runs.append(&mut reruns.runs);
            *reruns = NonSuccessReruns {
                kind: FlakyOrRerun::Rerun,
                runs,
            };
        }
        TestCaseStatus::Skipped { .. } => {}
    }
    again
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ShardId;
    use crate::runner::{Adapter, RunnerKind, JUNIT_PATH};
    use std::time::Duration;

    fn case(name: &str, passed: bool) -> String {
        let body = if passed {
            String::new()
        } else {
            format!("<failure message=\"{name} broke\">trace of {name}\ntest_a.py:7: AssertionError</failure>")
        };
        format!("<testcase classname=\"test_a\" name=\"{name}\" file=\"test_a.py\" time=\"0.5\">{body}</testcase>")
    }

    fn report(cases: &[(&str, bool)]) -> String {
        let cases: String = cases.iter().map(|(n, p)| case(n, *p)).collect();
        format!("<testsuites><testsuite name=\"pytest\">{cases}</testsuite></testsuites>")
    }

    fn record(status: ShardStatus, junit: Option<String>) -> ShardRecord {
        ShardRecord {
            shard: ShardId { index: 1, count: 2 },
            status,
            duration: Duration::from_secs(1),
            attempts: 1,
            result: None,
            files: junit
                .into_iter()
                .map(|j| CollectedFile {
                    path: JUNIT_PATH.into(),
                    data: j.into(),
                })
                .collect(),
        }
    }

    const FAILED: ShardStatus = ShardStatus::Failed {
        exit_code: Some(1),
        signal: None,
    };

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| format!("test_a.py::{n}")).collect()
    }

    #[test]
    fn what_did_not_pass_reruns_when_the_runner_names_a_failed_test() {
        let adapter = Adapter::new(RunnerKind::Pytest, None, None).unwrap();
        let said = |r: &ShardRecord| Some(adapter.report_results(&r.files));
        let ran = ids(&["t1", "t2", "t3"]);
        let failed = record(
            FAILED,
            Some(report(&[("t1", true), ("t2", false), ("t3", true)])),
        );
        assert_eq!(
            rerun_of(&failed, Some(&ran), said(&failed).as_ref()),
            Some(Rerun::Failed(ids(&["t2"])))
        );
        // Stopped at its first failure (`pytest -x`): t3 never ran, it reruns too.
        let stopped = record(FAILED, Some(report(&[("t1", true), ("t2", false)])));
        assert_eq!(
            rerun_of(&stopped, Some(&ran), said(&stopped).as_ref()),
            Some(Rerun::Failed(ids(&["t2", "t3"])))
        );
        // No report, a time-out, a failure with no failed test: all of it.
        let all = Some(Rerun::All(ran.clone()));
        let no_report = record(FAILED, None);
        assert_eq!(
            rerun_of(&no_report, Some(&ran), said(&no_report).as_ref()),
            all
        );
        let timed_out = record(ShardStatus::TimedOut, Some(report(&[("t2", false)])));
        assert_eq!(
            rerun_of(&timed_out, Some(&ran), said(&timed_out).as_ref()),
            all
        );
        let none_failed = record(FAILED, Some(report(&[("t1", true)])));
        assert_eq!(
            rerun_of(&none_failed, Some(&ran), said(&none_failed).as_ref()),
            all
        );
        // Without a runner, the whole shard; what passed or was interrupted, nothing.
        assert_eq!(rerun_of(&failed, None, None), Some(Rerun::Whole));
        assert_eq!(
            rerun_of(&record(ShardStatus::Passed, None), None, None),
            None
        );
        let interrupted = ShardStatus::Interrupted { detail: "x".into() };
        assert_eq!(rerun_of(&record(interrupted, None), None, None), None);
    }

    fn statuses(record: &ShardRecord) -> Vec<(String, &'static str, usize)> {
        let report = crate::report::junit::parse(&record.files[0].data).unwrap();
        report.test_suites[0]
            .test_cases
            .iter()
            .map(|c| match &c.status {
                TestCaseStatus::Success { flaky_runs } => {
                    (c.name.to_string(), "passed", flaky_runs.len())
                }
                TestCaseStatus::NonSuccess { reruns, .. } => {
                    (c.name.to_string(), "failed", reruns.runs.len())
                }
                TestCaseStatus::Skipped { .. } => (c.name.to_string(), "skipped", 0),
            })
            .collect()
    }

    #[test]
    fn a_rerun_that_passes_is_flaky_and_one_that_fails_again_keeps_failing() {
        let first = record(
            FAILED,
            Some(report(&[("t1", true), ("t2", false), ("t3", false)])),
        );
        let rerun = record(ShardStatus::Passed, Some(report(&[("t2", true)])));
        let folded = fold(first, rerun);
        assert_eq!(folded.status, ShardStatus::Passed);
        assert_eq!(folded.attempts, 2);
        assert_eq!(folded.duration, Duration::from_secs(2));
        assert_eq!(
            statuses(&folded),
            [
                ("t1".into(), "passed", 0),
                ("t2".into(), "passed", 1),
                ("t3".into(), "failed", 0)
            ]
        );
        let xml = String::from_utf8(folded.files[0].data.to_vec()).unwrap();
        assert!(xml.contains("<flakyFailure"), "{xml}");
        assert!(xml.contains("t2 broke"), "the first failure is kept: {xml}");
        let summary = crate::dispatch::RunSummary {
            stopped_by: None,
            records: vec![folded.clone()],
        };
        let flaky = crate::report::junit::TestReport::from_summary(&summary).flaky;
        assert_eq!(
            (flaky.len(), flaky[0].file.as_deref(), flaky[0].line),
            (1, Some("test_a.py"), Some(7)),
            "a flaky test is placed where it first failed"
        );

        let again = record(FAILED, Some(report(&[("t3", false)])));
        let twice = fold(folded, again);
        assert_eq!(twice.status, FAILED);
        assert_eq!(
            statuses(&twice)[2],
            ("t3".into(), "failed", 1),
            "its earlier failure is a rerun"
        );
        let xml = String::from_utf8(twice.files[0].data.to_vec()).unwrap();
        assert!(xml.contains("<rerunFailure"), "{xml}");
        let merged = crate::report::junit::parse(&twice.files[0].data).unwrap();
        assert_eq!((merged.tests, merged.failures), (3, 1));
    }

    #[test]
    fn a_rerun_without_a_result_is_a_failure() {
        let first = record(FAILED, Some(report(&[("t1", false)])));
        let lost = ShardStatus::InfraFailed {
            reason: "no final result arrived".into(),
        };
        let folded = fold(first, record(lost.clone(), None));
        assert_eq!(folded.status, lost);
        assert_eq!(statuses(&folded), [("t1".into(), "failed", 0)]);
    }
}
