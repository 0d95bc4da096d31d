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
    /// Tests that failed, then passed on a rerun (`--retries`), with their
    /// first failure; and shards with no report that did the same.
    pub flaky: Vec<TestFailure>,
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
                    // pytest names its suite "pytest"; its xunit1 `line` is 0-based.
                    let pytest = suite.name.as_str() == "pytest";
                    for case in &suite.test_cases {
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
                        // Where a failure happened: its text names the place, or the case's attributes.
                        let place = |message: &str, description: Option<&str>| {
                            let text = [message, description.unwrap_or("")].join("\n");
                            let line = attr("line").and_then(|l| l.parse().ok());
                            locate(attr("file"), line, pytest, &text)
                        };
                        match &case.status {
                            TestCaseStatus::Success { flaky_runs } => {
                                counts.passed += 1;
                                if let Some(first) = flaky_runs.first() {
                                    let message = first
                                        .message
                                        .as_ref()
                                        .map_or_else(|| "failed".into(), |m| m.to_string());
                                    let (file, line) =
                                        place(&message, first.description.as_deref());
                                    out.flaky.push(TestFailure {
                                        shard: record.shard,
                                        name,
                                        file,
                                        line,
                                        message,
                                    });
                                }
                            }
                            TestCaseStatus::Skipped { .. } => counts.skipped += 1,
                            TestCaseStatus::NonSuccess {
                                kind,
                                message,
                                description,
                                ..
                            } => {
                                counts.failed += 1;
                                let message: String = message
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
                                let (file, line) = place(&message, description.as_deref());
                                out.failures.push(TestFailure {
                                    shard: record.shard,
                                    name,
                                    file,
                                    line,
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

/// A Go module of the source: go.mod's `module` path and its folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoModule {
    /// The module path (`example.com/m`).
    pub path: String,
    /// Its folder relative to the repository (`""` at the root).
    pub dir: String,
}

impl GoModule {
    /// The module the working directory `workdir` (relative to `root`)
    /// belongs to: the nearest `go.mod` at or above it, within `root`.
    pub fn find(root: &std::path::Path, workdir: &str) -> Option<GoModule> {
        let mut dir = std::path::PathBuf::from(workdir.trim_matches('/'));
        loop {
            if let Ok(text) = std::fs::read_to_string(root.join(&dir).join("go.mod")) {
                let path = text.lines().find_map(|l| {
                    let rest = l.trim().strip_prefix("module")?;
                    rest.starts_with([' ', '\t'])
                        .then(|| rest.trim().trim_matches('"').to_string())
                })?;
                return Some(GoModule {
                    path,
                    dir: dir.to_string_lossy().into_owned(),
                });
            }
            if !dir.pop() {
                return None;
            }
        }
    }

    /// Where the package `import` path lives in the repository, if in this module.
    fn package_dir(&self, import: &str) -> Option<String> {
        let rest = import.strip_prefix(self.path.as_str())?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        let dir = format!("{}{rest}", self.dir);
        Some(dir.trim_start_matches('/').to_string())
    }
}

impl TestReport {
    /// Go names a failure's file relative to its package's folder
    /// (`calc_test.go:14`); where the case's class is the package's import
    /// path (go-junit-report, gotestsum), the file becomes its place in the
    /// repository, through `module`'s path and folder.
    pub fn place_go_files(&mut self, module: &GoModule) {
        for failure in self.failures.iter_mut().chain(&mut self.flaky) {
            let Some(file) = failure.file.as_deref() else {
                continue;
            };
            if file.contains('/') || !file.ends_with(".go") {
                continue;
            }
            let Some((import, _)) = failure.name.split_once("::") else {
                continue;
            };
            if let Some(dir) = module.package_dir(import) {
                let placed = match dir.as_str() {
                    "" => file.to_string(),
                    dir => format!("{dir}/{file}"),
                };
                failure.file = Some(placed);
            }
        }
    }
}

impl TestReport {
    /// Runners name files relative to where they ran (vitest's stack,
    /// pytest's failure text): a failure's relative file that is not in the
    /// repository `root` but is in the working directory `workdir` (relative
    /// to `root`) becomes that file's place in the repository.
    pub fn place_in_workdir(&mut self, root: &std::path::Path, workdir: &str) {
        let workdir = workdir.trim_matches('/');
        if workdir.is_empty() {
            return;
        }
        for failure in self.failures.iter_mut().chain(&mut self.flaky) {
            let Some(file) = failure.file.as_deref() else {
                continue;
            };
            let in_workdir = format!("{workdir}/{file}");
            if !file.starts_with('/')
                && !root.join(file).exists()
                && root.join(&in_workdir).is_file()
            {
                failure.file = Some(in_workdir);
            }
        }
    }
}

/// Where a failure happened, for an annotation: the place of the failing
/// assertion in the failure text when the text names one (pytest's
/// `tests/test_calc.py:14: AssertionError`, a Rust panic's `panicked at
/// src/lib.rs:10:5`, a JavaScript stack frame, Go's `calc_test.go:14:`),
/// preferring the test's own file; otherwise the report's `file` and `line`
/// attributes, with pytest's 0-based xunit1 line made 1-based.
fn locate(
    file: Option<String>,
    line: Option<u32>,
    pytest: bool,
    text: &str,
) -> (Option<String>, Option<u32>) {
    let file = file.map(|f| workspace_relative(&f).unwrap_or(f));
    let places = places_in_text(text);
    let in_test_file = file
        .as_deref()
        .and_then(|f| places.iter().rev().find(|p| p.file == f));
    let chosen = in_test_file
        .or_else(|| places.iter().find(|p| p.panic))
        .or_else(|| places.iter().find(|p| p.stack_frame))
        .or_else(|| places.iter().rev().find(|p| !p.stack_frame));
    match chosen {
        Some(place) => (Some(place.file.clone()), Some(place.line)),
        None => {
            let line = if pytest { line.map(|l| l + 1) } else { line };
            (file, line)
        }
    }
}

/// A `path:line` the failure text names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Place {
    file: String,
    line: u32,
    /// Right after `panicked at` (Rust): the failing assertion itself.
    panic: bool,
    /// Inside a JavaScript stack frame (`at f (path:line:col)`), innermost first.
    stack_frame: bool,
}

/// Every place in the workspace that `text` names, in order. Places outside
/// the workspace (the standard library, `node_modules`, `site-packages`) are
/// left out: an annotation can only point into the repository.
fn places_in_text(text: &str) -> Vec<Place> {
    let mut places = Vec::new();
    for text_line in text.lines() {
        let trimmed = text_line.trim_start();
        let stack_frame = trimmed.starts_with("at ");
        let mut after_panic = false;
        for token in trimmed.split_whitespace() {
            if token == "at" && trimmed.contains("panicked at") {
                after_panic = true;
                continue;
            }
            let token = token.trim_matches(|c: char| matches!(c, '(' | ')' | '\'' | '"' | ','));
            if let Some((file, line)) = path_and_line(token) {
                places.push(Place {
                    file,
                    line,
                    panic: after_panic,
                    stack_frame,
                });
            }
            after_panic = false;
        }
    }
    places
}

/// `path:line`, `path:line:`, `path:line:col` or `path:line:col:`, with a
/// path that has a file extension and lies in the workspace.
fn path_and_line(token: &str) -> Option<(String, u32)> {
    let token = token.strip_prefix("file://").unwrap_or(token);
    let mut parts = token.trim_end_matches(':').split(':');
    let path = parts.next()?;
    let line: u32 = parts.next()?.parse().ok()?;
    match parts.next() {
        None => {}
        Some(col) if col.parse::<u32>().is_ok() => {}
        Some(_) => return None,
    }
    if parts.next().is_some() || line == 0 {
        return None;
    }
    let name = path.rsplit('/').next()?;
    let (stem, ext) = name.rsplit_once('.')?;
    if stem.is_empty() || ext.is_empty() || !ext.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    let outside = [
        "node_modules/",
        "site-packages/",
        "/rustc/",
        ".cargo/registry/",
        "<",
    ];
    if outside.iter().any(|o| path.contains(o)) {
        return None;
    }
    let path = if path.starts_with('/') {
        workspace_relative(path)?
    } else {
        path.trim_start_matches("./").to_string()
    };
    Some((path, line))
}

/// A path inside a shard's workspace (`…/shard-<id>/src/<path>`), relative to
/// the source root; `None` for any other absolute path.
pub(crate) fn workspace_relative(path: &str) -> Option<String> {
    let mut rest = path;
    while let Some(at) = rest.find("/shard-") {
        let after = &rest[at + "/shard-".len()..];
        if let Some((id, tail)) = after.split_once('/') {
            if id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()) {
                if let Some(relative) = tail.strip_prefix("src/") {
                    return Some(relative.to_string());
                }
            }
        }
        rest = after;
    }
    None
}

/// Parses one report; a bare `<testsuite>` root is accepted as well.
pub(crate) fn parse(data: &[u8]) -> Result<Report, String> {
    let text = std::str::from_utf8(data).map_err(|e| format!("not UTF-8: {e}"))?;
    let text = &*char_refs_decoded(text);
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

/// `text` with its numeric character references (`&#xA;`, `&#10;`, which
/// gotestsum writes for each newline of a failure) made the characters
/// they stand for: quick-junit's reader takes only the named entities in
/// text. The characters of markup stay escaped, by name.
fn char_refs_decoded(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("&#") {
        return text.into();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("&#") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let decoded = after.split_once(';').and_then(|(code, _)| {
            let value = match code.strip_prefix(['x', 'X']) {
                Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                None => code.parse().ok()?,
            };
            Some((char::from_u32(value)?, code.len()))
        });
        match decoded {
            Some((c, len)) => {
                match c {
                    '<' => out.push_str("&lt;"),
                    '>' => out.push_str("&gt;"),
                    '&' => out.push_str("&amp;"),
                    '"' => out.push_str("&quot;"),
                    '\'' => out.push_str("&apos;"),
                    c => out.push(c),
                }
                rest = &after[len + 1..];
            }
            None => {
                out.push_str("&#");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.into()
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
            stopped_by: None,
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
        // pytest's xunit1 `line` is 0-based: the annotation points one line further.
        assert_eq!(
            (f.file.as_deref(), f.line),
            (Some("tests/test_math.py"), Some(8))
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

    fn failures_of(file: &str, xml: &str) -> Vec<TestFailure> {
        let summary = summary(vec![(file, xml)]);
        TestReport::from_summary(&summary).failures
    }

    fn places(failures: &[TestFailure]) -> Vec<(String, Option<String>, Option<u32>)> {
        failures
            .iter()
            .map(|f| (f.name.clone(), f.file.clone(), f.line))
            .collect()
    }

    // Recorded with pytest 8 (default junit_family, xunit2: no file or line attributes).
    #[test]
    fn pytest_failures_are_placed_at_the_failing_assertion() {
        let xml = include_str!("../../tests/fixtures/junit/pytest-xunit2.xml");
        let file = Some("tests/test_calc.py".to_string());
        assert_eq!(
            places(&failures_of("junit.xml", xml)),
            [
                ("tests.test_calc::test_fails".into(), file.clone(), Some(11)),
                // The assertion that failed is in the helper the test called.
                ("tests.test_calc::test_in_helper".into(), file, Some(2)),
            ]
        );
    }

    // Recorded with pytest 8 and `-o junit_family=xunit1`: 0-based `line` of the `def`.
    #[test]
    fn pytest_xunit1_lines_are_not_taken_for_one_based() {
        let xml = include_str!("../../tests/fixtures/junit/pytest-xunit1.xml");
        let failures = failures_of("junit.xml", xml);
        assert_eq!(failures[0].line, Some(11), "the assertion, not the def");
        let stripped = xml.replace("tests/test_calc.py:", "elsewhere:");
        let failures = failures_of("junit.xml", &stripped);
        // With no place in the text, the 0-based def line 8 becomes line 9, the `def`.
        assert_eq!(failures[0].line, Some(9));
    }

    // Recorded with cargo-nextest 0.9 (JUnit from a profile's `junit.path`).
    #[test]
    fn rust_panics_are_placed_where_they_panicked() {
        let xml = include_str!("../../tests/fixtures/junit/nextest.xml");
        assert_eq!(
            places(&failures_of("junit.xml", xml)),
            [(
                "nx::tests::fails".into(),
                Some("src/lib.rs".into()),
                Some(17)
            )]
        );
    }

    // Recorded with gotestsum 1.8 (go 1.19) on module example.com/m, package
    // c/d: newlines as `&#xA;`, the file named relative to the package.
    #[test]
    fn go_failures_are_placed_in_the_repository_through_the_module_path() {
        let xml = include_str!("../../tests/fixtures/junit/gotestsum.xml");
        let summary = summary(vec![("junit.xml", xml)]);
        let mut report = TestReport::from_summary(&summary);
        assert!(
            report.problems.iter().all(|p| p.1 != "junit.xml"),
            "{:?}",
            report.problems
        );
        let at_package = [(
            "example.com/m/c/d::TestD".to_string(),
            Some("d_test.go".to_string()),
            Some(6),
        )];
        assert_eq!(places(&report.failures), at_package);
        report.place_go_files(&GoModule {
            path: "example.com/m".into(),
            dir: "".into(),
        });
        assert_eq!(report.failures[0].file.as_deref(), Some("c/d/d_test.go"));
        // The module in a folder of the repository; a package of another module is left alone.
        let mut report = TestReport::from_summary(&summary);
        report.place_go_files(&GoModule {
            path: "example.com/m".into(),
            dir: "go/svc".into(),
        });
        assert_eq!(
            report.failures[0].file.as_deref(),
            Some("go/svc/c/d/d_test.go")
        );
        let mut report = TestReport::from_summary(&summary);
        report.place_go_files(&GoModule {
            path: "example.com/mm".into(),
            dir: "".into(),
        });
        assert_eq!(report.failures[0].file.as_deref(), Some("d_test.go"));
    }

    #[test]
    fn the_go_module_is_the_nearest_go_mod_above_the_working_directory() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("svc/pkg")).unwrap();
        std::fs::write(
            root.path().join("svc/go.mod"),
            "// x\nmodule \"example.com/svc\"\n\ngo 1.21\n",
        )
        .unwrap();
        let found = GoModule::find(root.path(), "svc/pkg").unwrap();
        assert_eq!(
            (found.path.as_str(), found.dir.as_str()),
            ("example.com/svc", "svc")
        );
        assert_eq!(GoModule::find(root.path(), ""), None);
    }

    #[test]
    fn files_named_from_the_working_directory_are_placed_in_the_repository() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("web/test")).unwrap();
        std::fs::write(root.path().join("web/test/a.test.js"), "").unwrap();
        std::fs::write(root.path().join("top.js"), "").unwrap();
        let failure = |file: &str| TestFailure {
            shard: ShardId { index: 1, count: 1 },
            name: "t".into(),
            file: Some(file.into()),
            line: Some(3),
            message: String::new(),
        };
        let mut report = TestReport {
            failures: vec![
                failure("test/a.test.js"),
                failure("top.js"),
                failure("gone.js"),
            ],
            ..TestReport::default()
        };
        report.place_in_workdir(root.path(), "web/");
        let files: Vec<_> = report
            .failures
            .iter()
            .map(|f| f.file.clone().unwrap())
            .collect();
        assert_eq!(files, ["web/test/a.test.js", "top.js", "gone.js"]);
    }

    #[test]
    fn numeric_character_references_are_read() {
        assert_eq!(
            char_refs_decoded("a&#xA;b&#10;c&#x3C;&#38;d&#zz;"),
            "a\nb\nc&lt;&amp;d&#zz;"
        );
    }

    #[test]
    fn stack_frames_in_the_workspace_are_made_relative_and_others_skipped() {
        let text = "Error: expect(received).toBe(expected)\n    at Object.toBe (/tmp/x/node_modules/expect/build/index.js:9:1)\n    at Object.<anonymous> (/tmp/mvm/shard-0123456789abcdef0123456789abcdef/src/web/sum.test.js:5:17)\n    at Promise.then.completed (/tmp/x/node_modules/jest-circus/build/utils.js:298:28)";
        assert_eq!(
            locate(None, None, false, text),
            (Some("web/sum.test.js".into()), Some(5))
        );
        let go = "    calc_test.go:14: got 2, want 3";
        assert_eq!(
            locate(None, None, false, go),
            (Some("calc_test.go".into()), Some(14))
        );
        // Nothing in the workspace: the report's own attributes stand.
        let outside = "at /usr/lib/python3/x.py:3: boom";
        assert_eq!(
            locate(Some("a.py".into()), Some(4), false, outside),
            (Some("a.py".into()), Some(4))
        );
    }
}
