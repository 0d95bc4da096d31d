//! JUnit reports sent back by shards: counting tests, finding failures with
//! their file and line, and merging every shard's report into one.

use std::collections::BTreeMap;

use quick_junit::{NonSuccessKind, Report, TestCaseStatus};

use crate::dispatch::RunSummary;
use crate::protocol::ShardId;

/// Test counts of one shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TestCounts {
    /// Tests that passed.
    pub passed: usize,
    /// Tests that failed or errored.
    pub failed: usize,
    /// Tests that were skipped.
    pub skipped: usize,
}

/// One failed test, with where it failed when the report says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestFailure {
    /// The shard it ran in.
    pub shard: ShardId,
    /// `classname::name`, or the name alone.
    pub name: String,
    /// Source file, from the test case's `file` attribute.
    pub file: Option<String>,
    /// Line, from the test case's `line` attribute.
    pub line: Option<u32>,
    /// The failure message (first line of it when there is none).
    pub message: String,
}

/// Everything the shards' JUnit reports said.
#[derive(Debug, Default)]
pub struct TestReport {
    /// Counts per shard that sent a report.
    pub counts: BTreeMap<ShardId, TestCounts>,
    /// Every failed test, by shard.
    pub failures: Vec<TestFailure>,
    /// Reports that are lost: not valid JUnit XML, or not sent back because
    /// they were over the shard's budget for collected files: (shard, path, why).
    pub problems: Vec<(ShardId, String, String)>,
    /// All shards' suites in one report, names prefixed with the shard.
    pub merged: Option<Report>,
}

impl TestReport {
    /// Reads every file the shards sent back as a JUnit report.
    pub fn from_summary(summary: &RunSummary) -> Self {
        let mut out = TestReport::default();
        let mut merged = Report::new("mvm-shard");
        let mut any = false;
        for record in &summary.records {
            let skipped = record.result.iter().flat_map(|r| &r.files_skipped);
            for path in skipped {
                let why = "not sent back: the shard's collected files were over their size budget";
                out.problems.push((record.shard, path.clone(), why.into()));
            }
            for file in &record.files {
                let report = match parse(&file.data) {
                    Ok(r) => r,
                    Err(e) => {
                        out.problems.push((
                            record.shard,
                            file.path.clone(),
                            format!("not a JUnit report: {e}"),
                        ));
                        continue;
                    }
                };
                any = true;
                let counts = out.counts.entry(record.shard).or_default();
                for mut suite in report.test_suites {
                    for case in &suite.test_cases {
                        match &case.status {
                            TestCaseStatus::Success { .. } => counts.passed += 1,
                            TestCaseStatus::Skipped { .. } => counts.skipped += 1,
                            TestCaseStatus::NonSuccess {
                                kind,
                                message,
                                description,
                                ..
                            } => {
                                counts.failed += 1;
                                let name = match &case.classname {
                                    Some(class) if !class.is_empty() => {
                                        format!("{}::{}", class.as_str(), case.name.as_str())
                                    }
                                    _ => case.name.to_string(),
                                };
                                let attr = |key: &str| {
                                    case.extra
                                        .iter()
                                        .find(|(k, _)| k.as_str() == key)
                                        .map(|(_, v)| v.to_string())
                                };
                                let message = message
                                    .as_ref()
                                    .map(|m| m.to_string())
                                    .or_else(|| {
                                        description
                                            .as_ref()
                                            .and_then(|d| d.lines().next().map(str::to_owned))
                                    })
                                    .unwrap_or_else(|| match kind {
                                        NonSuccessKind::Failure => "failed".into(),
                                        NonSuccessKind::Error => "errored".into(),
                                    });
                                out.failures.push(TestFailure {
                                    shard: record.shard,
                                    name,
                                    file: attr("file"),
                                    line: attr("line").and_then(|l| l.parse().ok()),
                                    message,
                                });
                            }
                        }
                    }
                    suite.name = format!("shard {}: {}", record.shard, suite.name.as_str()).into();
                    merged.add_test_suite(suite);
                }
            }
        }
        if any {
            out.merged = Some(merged);
        }
        out
    }
}

/// Parses one report; a bare `<testsuite>` root is accepted as well.
fn parse(data: &[u8]) -> Result<Report, String> {
    let text = std::str::from_utf8(data).map_err(|e| format!("not UTF-8: {e}"))?;
    match Report::deserialize_from_str(text) {
        Ok(report) => Ok(report),
        Err(first) => {
            let body = text.trim_start();
            let body = match body.strip_prefix("<?xml") {
                Some(rest) => rest.split_once("?>").map_or(rest, |(_, after)| after),
                None => body,
            };
            if body.trim_start().starts_with("<testsuite")
                && !body.trim_start().starts_with("<testsuites")
            {
                Report::deserialize_from_str(&format!("<testsuites>{body}</testsuites>"))
                    .map_err(|e| e.to_string())
            } else {
                Err(first.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::{CollectedFile, ShardRecord, ShardStatus};
    use std::time::Duration;

    const PYTEST: &str = r#"<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="3" time="0.1"><testcase classname="tests.test_math" name="test_add" file="tests/test_math.py" line="3" time="0.001" /><testcase classname="tests.test_math" name="test_sub" file="tests/test_math.py" line="7" time="0.001"><failure message="assert 1 == 2">def test_sub():
&gt;       assert 1 == 2</failure></testcase><testcase classname="tests.test_math" name="test_skip" time="0"><skipped message="later" /></testcase></testsuite></testsuites>"#;
    const BARE: &str = r#"<?xml version="1.0"?><testsuite name="jest" tests="1"><testcase name="renders" classname="App"><error>boom
at line</error></testcase></testsuite>"#;

    fn summary(files: Vec<(&str, &str)>) -> RunSummary {
        RunSummary {
            records: vec![ShardRecord {
                shard: ShardId { index: 2, count: 3 },
                status: ShardStatus::Passed,
                duration: Duration::ZERO,
                attempts: 1,
                result: Some(crate::protocol::ShardResult {
                    files_skipped: vec!["huge.xml".into()],
                    ..crate::protocol::ShardResult::not_run(crate::protocol::Outcome::Exited {
                        code: 0,
                    })
                }),
                files: files
                    .into_iter()
                    .map(|(p, d)| CollectedFile {
                        path: p.into(),
                        data: bytes::Bytes::copy_from_slice(d.as_bytes()),
                    })
                    .collect(),
            }],
        }
    }

    #[test]
    fn counts_and_failures_carry_file_and_line() {
        let report = TestReport::from_summary(&summary(vec![
            ("junit.xml", PYTEST),
            ("bare.xml", BARE),
            ("junk.xml", "<nope"),
        ]));
        let shard = ShardId { index: 2, count: 3 };
        assert_eq!(
            report.counts[&shard],
            TestCounts {
                passed: 1,
                failed: 2,
                skipped: 1
            }
        );
        let f = &report.failures[0];
        assert_eq!(f.name, "tests.test_math::test_sub");
        assert_eq!(
            (f.file.as_deref(), f.line),
            (Some("tests/test_math.py"), Some(7))
        );
        assert_eq!(f.message, "assert 1 == 2");
        assert_eq!(report.failures[1].message, "boom");
        let problems: Vec<(&str, bool)> = report
            .problems
            .iter()
            .map(|(_, path, why)| (path.as_str(), why.contains("not sent back")))
            .collect();
        assert_eq!(problems, [("huge.xml", true), ("junk.xml", false)]);
        let merged = report.merged.unwrap();
        assert_eq!(merged.test_suites.len(), 2);
        assert!(merged.test_suites[0].name.starts_with("shard 2/3: "));
    }
}
