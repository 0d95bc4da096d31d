//! Test runner adapters (`--runner NAME`): how to list a runner's tests, how
//! the command selects a subset (`{tests}`), and how each test's duration and
//! outcome come back (a report the runner is asked to write, or its log).

pub mod listing;
pub mod results;
pub mod timings;

use quick_junit::Report;

pub use results::{LogScanner, Results, TestResult};
pub use timings::Timings;

/// Where an adapter asks the runner to write its JUnit report, relative to
/// the shard's working directory; sent back with the `collect` mechanism.
pub const JUNIT_PATH: &str = ".mvm-shard-junit.xml";

/// Where the jest adapter asks jest to write its `--json` report (turned
/// into JUnit when it comes back).
pub const JEST_REPORT_PATH: &str = ".mvm-shard-jest.json";

/// The test runners mvm-shard knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RunnerKind {
    /// pytest: node ids from `pytest --collect-only`, JUnit through `PYTEST_ADDOPTS`.
    Pytest,
    /// Files matching `--files GLOB`, split by file.
    Files,
    /// cargo-nextest: `binary test` ids from `cargo nextest list`'s JSON.
    CargoNextest,
    /// Go: packages from `go list ./...`.
    Go,
    /// Jest: test files from `jest --listTests --json`.
    Jest,
    /// Vitest: test files from `vitest list --filesOnly --json`.
    Vitest,
}

/// A problem with the runner's configuration or its listing (exit 2).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RunnerError {
    /// `--runner files` without a glob.
    #[error("--runner files needs --files GLOB (the test files to split, e.g. 'tests/*.sh')")]
    NoGlob,
    /// The command has no placeholder to put the selected tests in.
    #[error("with --runner, the command must contain {{tests}} (the selected test ids) or {{tests_file}}; e.g. -- pytest {{tests}}")]
    NoPlaceholder,
    /// The listing command failed.
    #[error("listing the tests failed ({status}): `{command}`\n{output}")]
    ListingFailed {
        /// The listing command.
        command: String,
        /// How it ended.
        status: String,
        /// What it printed.
        output: String,
    },
    /// The listing printed more than the invoker keeps.
    #[error("listing the tests with `{command}` printed more than {} MiB: is it the listing command? (see --list-command)", limit >> 20)]
    ListingTooLong {
        /// The listing command.
        command: String,
        /// The most it may print, in bytes.
        limit: usize,
    },
    /// The listing's output is not the runner's listing format.
    #[error("listing the tests with `{command}` did not give {format}: {source}")]
    Listing {
        /// The listing command.
        command: String,
        /// The format expected ([`RunnerKind::listing_format`]).
        format: &'static str,
        /// What is wrong with the output.
        #[source]
        source: listing::ListingError,
    },
    /// The listing printed nothing on its standard output.
    #[error("listing the tests with `{command}` printed nothing on its standard output, where the test ids are read from; on its standard error:\n{output}")]
    NothingOnStdout {
        /// The listing command.
        command: String,
        /// What it printed on its standard error.
        output: String,
    },
    /// The listing found no tests.
    #[error("listing the tests with `{command}` found none; {output}")]
    NoTests {
        /// The listing command.
        command: String,
        /// What it printed, in words (`its output:` and its end, or `it printed nothing`).
        output: String,
    },
}

/// A runner adapter as configured for one run.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// Which runner.
    pub kind: RunnerKind,
    /// The shell command that lists the tests, one way or another.
    pub list_command: String,
}

impl Adapter {
    /// The adapter for `kind`, listing with `list_command` when given, else
    /// with the runner's own listing command (`files` needs `glob`).
    pub fn new(
        kind: RunnerKind,
        list_command: Option<String>,
        glob: Option<&str>,
    ) -> Result<Self, RunnerError> {
        let list_command = match (list_command, kind) {
            (Some(command), _) => command,
            (None, RunnerKind::Files) => {
                let glob = glob.ok_or(RunnerError::NoGlob)?;
                // bash expands ** with globstar; nullglob: no match lists nothing.
                // Each path ended by a NUL: a name may hold a line break.
                format!(
                    "exec bash -O globstar -O nullglob -c 'for f in {glob}; do [ -f \"$f\" ] && printf \"%s\\0\" \"$f\"; done; true'"
                )
            }
            // --verbosity=-1 (ids only) whatever -q or -v the project's addopts add.
            (None, RunnerKind::Pytest) => "python3 -m pytest --collect-only --verbosity=-1".into(),
            (None, RunnerKind::CargoNextest) => "cargo nextest list --message-format json".into(),
            (None, RunnerKind::Go) => "go list ./...".into(),
            (None, RunnerKind::Jest) => "npx jest --listTests --json".into(),
            (None, RunnerKind::Vitest) => "npx vitest list --filesOnly --json".into(),
        };
        Ok(Adapter { kind, list_command })
    }

    /// The test ids in the listing command's standard output (`root`: the
    /// folder it ran in), sorted and without duplicates; output that is not
    /// the runner's listing format, or ids the shards cannot be given, are
    /// an error naming the command.
    pub fn parse_listing(&self, output: &[u8], root: &str) -> Result<Vec<String>, RunnerError> {
        listing::parse(self.kind, output, root).map_err(|source| RunnerError::Listing {
            command: self.list_command.clone(),
            format: self.kind.listing_format(),
            source,
        })
    }

    /// Environment that makes the runner write a JUnit report at
    /// [`JUNIT_PATH`], for the runners that can be asked that way.
    pub fn junit_env(&self) -> Option<(String, String)> {
        match self.kind {
            // xunit1 keeps the `file` attribute, which maps a case back to its node id.
            RunnerKind::Pytest => Some((
                "PYTEST_ADDOPTS".into(),
                format!("--junitxml={JUNIT_PATH} -o junit_family=xunit1"),
            )),
            _ => None,
        }
    }

    /// The report each shard sends back for the tests' durations and
    /// outcomes: pytest's and vitest's JUnit, jest's JSON; `None` for the
    /// runners whose log says them ([`Adapter::reads_log`]).
    pub fn report_file(&self) -> Option<&'static str> {
        match self.kind {
            RunnerKind::Pytest | RunnerKind::Vitest => Some(JUNIT_PATH),
            RunnerKind::Jest => Some(JEST_REPORT_PATH),
            RunnerKind::CargoNextest | RunnerKind::Go | RunnerKind::Files => None,
        }
    }

    /// True for the runners whose log has a line per test (nextest) or per
    /// package (Go) with its time and outcome, read as the shards stream it.
    pub fn reads_log(&self) -> bool {
        matches!(self.kind, RunnerKind::CargoNextest | RunnerKind::Go)
    }

    /// Each listed test's duration and outcome in a JUnit report the runner
    /// wrote, by id.
    pub fn results(&self, report: &Report) -> Results {
        match self.kind {
            RunnerKind::Jest | RunnerKind::Vitest => return results::by_suite(report),
            RunnerKind::Pytest => {}
            _ => return Results::new(),
        }
        let mut out = Results::new();
        for suite in &report.test_suites {
            for case in &suite.test_cases {
                let file = case
                    .extra
                    .iter()
                    .find(|(k, _)| k.as_str() == "file")
                    .map(|(_, v)| v.as_str());
                let classname = case.classname.as_deref().unwrap_or("");
                let Some(id) = pytest_id(classname, case.name.as_str(), file) else {
                    continue;
                };
                let passed = !matches!(case.status, quick_junit::TestCaseStatus::NonSuccess { .. });
                let duration = case.time;
                results::merge(&mut out, id, TestResult { duration, passed });
            }
        }
        out
    }
}

impl Adapter {
    /// What the runner's report among a shard's sent-back `files` says of
    /// each test ([`Adapter::report_file`]; nothing for the runners whose log
    /// says it).
    pub fn report_results(&self, files: &[crate::dispatch::CollectedFile]) -> Results {
        let mut results = Results::new();
        if let Some(path) = self.report_file() {
            for file in files.iter().filter(|f| f.path == path) {
                if let Ok(report) = crate::report::junit::parse(&file.data) {
                    results.extend(self.results(&report));
                }
            }
        }
        results
    }
}

impl RunnerKind {
    /// The words `{tests}` becomes for `tests`: the ids themselves, or what
    /// selects exactly them in this runner, with what asks it for its report.
    /// nextest: one filterset (`-E 'binary_id(=b) & test(=t) | …'`); jest:
    /// `--json --outputFile=… --runTestsByPath` and the files; vitest: its
    /// default and JUnit reporters (`--outputFile.junit=…`), the files, and
    /// an `--exclude` for each other file of `listed` (every listed test)
    /// whose path contains one of them, since vitest selects by substring.
    pub fn selection<'a>(
        self,
        tests: &[String],
        listed: impl IntoIterator<Item = &'a String>,
    ) -> Vec<String> {
        match self {
            RunnerKind::CargoNextest => {
                let each = tests.iter().map(|id| match id.split_once(' ') {
                    Some((binary, test)) => format!("binary_id(={binary}) & test(={test})"),
                    None => format!("test(={id})"),
                });
                vec!["-E".into(), each.collect::<Vec<_>>().join(" | ")]
            }
            RunnerKind::Jest => {
                let mut words = vec![
                    "--json".to_string(),
                    format!("--outputFile={JEST_REPORT_PATH}"),
                    "--runTestsByPath".into(),
                ];
                words.extend(tests.iter().cloned());
                words
            }
            RunnerKind::Vitest => {
                let mut words = vec![
                    "--reporter=default".to_string(),
                    "--reporter=junit".into(),
                    format!("--outputFile.junit={JUNIT_PATH}"),
                ];
                words.extend(tests.iter().cloned());
                let mine: std::collections::HashSet<&String> = tests.iter().collect();
                for other in listed {
                    if !mine.contains(other) && tests.iter().any(|t| other.contains(t.as_str())) {
                        words.push(format!("--exclude={}", glob_escaped(other)));
                    }
                }
                words
            }
            RunnerKind::Pytest | RunnerKind::Go | RunnerKind::Files => tests.to_vec(),
        }
    }
}

/// A pytest node id from a JUnit case (xunit1: `file` is the module's path,
/// `classname` the module's dotted path, then the classes).
fn pytest_id(classname: &str, name: &str, file: Option<&str>) -> Option<String> {
    let file = file?;
    let module = file.trim_end_matches(".py").replace('/', ".");
    let classes = classname
        .strip_prefix(module.as_str())
        .unwrap_or("")
        .trim_start_matches('.');
    let mut id = file.to_string();
    for class in classes.split('.').filter(|c| !c.is_empty()) {
        id.push_str("::");
        id.push_str(class);
    }
    id.push_str("::");
    id.push_str(name);
    Some(id)
}

/// Where `{tests_file}` puts the selected tests, one id a line, relative to
/// the shard's working directory (the file travels in the shard's request).
pub const TESTS_FILE: &str = ".mvm-shard-tests.txt";

/// Whether the command takes its tests in a file (`{tests_file}`).
pub fn uses_tests_file(command: &[String]) -> bool {
    command.iter().any(|a| a.contains("{tests_file}"))
}

/// The content of [`TESTS_FILE`]: one id a line.
pub fn tests_file(tests: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for test in tests {
        out.extend_from_slice(test.as_bytes());
        out.push(b'\n');
    }
    out
}

/// `path` as a glob that matches only itself.
fn glob_escaped(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if matches!(
            c,
            '*' | '?' | '[' | ']' | '{' | '}' | '(' | ')' | '!' | '\\'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Puts the selected tests in the command (`tests`: the words of
/// [`RunnerKind::selection`]): an argument that is exactly `{tests}` becomes
/// one argument per word; inside a longer argument (such as a `sh -c`
/// script) it becomes the words, shell-quoted, space-separated.
/// `{tests_file}` becomes [`TESTS_FILE`], the file that holds the ids.
pub fn select(command: &[String], tests: &[String]) -> Vec<String> {
    let quoted = || {
        tests
            .iter()
            .map(|t| shlex::try_quote(t).map_or_else(|_| t.clone(), |q| q.into_owned()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut out = Vec::new();
    for arg in command {
        if arg == "{tests}" {
            out.extend(tests.iter().cloned());
        } else if arg.contains("{tests}") {
            // One pass, so that an id containing `{tests_file}` stays itself.
            let parts: Vec<String> = arg
                .split("{tests}")
                .map(|part| part.replace("{tests_file}", TESTS_FILE))
                .collect();
            out.push(parts.join(&quoted()));
        } else {
            out.push(arg.replace("{tests_file}", TESTS_FILE));
        }
    }
    out
}

/// Checks that the command can receive the selected tests.
pub fn check_command(command: &[String]) -> Result<(), RunnerError> {
    if !uses_tests_file(command) && !command.iter().any(|a| a.contains("{tests}")) {
        return Err(RunnerError::NoPlaceholder);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_needs_a_glob() {
        assert_eq!(
            Adapter::new(RunnerKind::Files, None, None).unwrap_err(),
            RunnerError::NoGlob
        );
    }

    #[test]
    fn tests_expand_to_arguments_or_quoted_words() {
        let tests = vec!["a.py::t[x y]".to_string(), "b.py::u".to_string()];
        let cmd = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            select(&cmd(&["pytest", "{tests}"]), &tests),
            cmd(&["pytest", "a.py::t[x y]", "b.py::u"])
        );
        assert_eq!(
            select(&cmd(&["sh", "-c", "pytest {tests}"]), &tests),
            cmd(&["sh", "-c", "pytest 'a.py::t[x y]' b.py::u"])
        );
        assert_eq!(
            check_command(&cmd(&["pytest"])),
            Err(RunnerError::NoPlaceholder)
        );
        let in_file = cmd(&["sh", "-c", "pytest $(cat {tests_file})"]);
        assert_eq!(check_command(&in_file), Ok(()));
        assert_eq!(
            select(&in_file, &tests),
            cmd(&["sh", "-c", "pytest $(cat .mvm-shard-tests.txt)"])
        );
        assert_eq!(tests_file(&tests), b"a.py::t[x y]\nb.py::u\n");
    }

    #[test]
    fn runners_get_what_selects_exactly_their_tests() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let listed = ids(&[
            "a/web/sum.test.js",
            "b.test.js",
            "web/sum.test.js",
            "x/b.test.js",
        ]);
        let vitest = RunnerKind::Vitest.selection(&ids(&["web/sum.test.js", "b.test.js"]), &listed);
        assert_eq!(
            vitest[3..],
            ids(&[
                "web/sum.test.js",
                "b.test.js",
                "--exclude=a/web/sum.test.js",
                "--exclude=x/b.test.js"
            ])
        );
        let nextest =
            RunnerKind::CargoNextest.selection(&ids(&["nx tests::ok", "nx::integ it"]), &listed);
        assert_eq!(
            nextest,
            ids(&[
                "-E",
                "binary_id(=nx) & test(=tests::ok) | binary_id(=nx::integ) & test(=it)"
            ])
        );
        assert_eq!(glob_escaped("a[1]/*.js"), "a\\[1\\]/\\*.js");
    }

    #[test]
    fn pytest_cases_map_back_to_node_ids() {
        assert_eq!(
            pytest_id("tests.test_a.TestK", "test_two[1]", Some("tests/test_a.py")).unwrap(),
            "tests/test_a.py::TestK::test_two[1]"
        );
        assert_eq!(
            pytest_id("test_b", "test_one", Some("test_b.py")).unwrap(),
            "test_b.py::test_one"
        );
    }
}
