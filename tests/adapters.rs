//! `--runner cargo-nextest|go|jest|vitest` against the real runners, on
//! small projects made here: listed where they run, every test once, each
//! test's duration learned from the run without a flag from the user (the
//! second run plans with them), a failing test fails the run and is placed
//! at its file and line.
//!
//! Needs `cargo-nextest`, `go`, `gotestsum`, `node` and `npm` (`.ci/run`
//! installs them); jest and vitest are installed from npm once, under
//! `CARGO_TARGET_TMPDIR`, and reused.

mod common;

use common::Ran;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The most one `mvm-shard run` of these small projects may take.
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// Runs `mvm-shard run --local --shards 2 --runner RUNNER` in `dir` with
/// `extra` options (another `--shards` among them replaces 2) and `command`, as a user would from a shell (none of the
/// variables cargo sets for this test), killed after [`RUN_LIMIT`].
async fn run(project: &Project, extra: &[&str], command: &[&str]) -> Ran {
    let _ = std::fs::remove_file(&project.ran_log);
    let shards = if extra.contains(&"--shards") {
        [].as_slice()
    } else {
        ["--shards", "2"].as_slice()
    };
    let mut args: Vec<String> = ["run", "--local"]
        .iter()
        .chain(shards)
        .chain(&[
            "--max-parallel",
            "2",
            "--runner",
            project.runner,
            "--timings",
        ])
        .map(|s| s.to_string())
        .collect();
    args.push(project.timings().display().to_string());
    args.push("--source=.".into());
    args.push(format!("--report={}", project.report().display()));
    args.push(format!("--env=RAN_LOG={}", project.ran_log.display()));
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--".into());
    args.extend(command.iter().map(|s| s.to_string()));
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_mvm-shard"));
    cmd.args(&args)
        .current_dir(project.dir.path().join(project.workdir));
    for (name, _) in std::env::vars() {
        if name.starts_with("CARGO") && name != "CARGO_HOME" {
            cmd.env_remove(name);
        }
    }
    let out = common::output_within(cmd, RUN_LIMIT, &format!("mvm-shard {args:?}")).await;
    Ran::from(out)
}

/// A project made for one runner, and where its tests say they ran.
struct Project {
    runner: &'static str,
    /// The repository (`--source`).
    dir: tempfile::TempDir,
    /// Where in it the run starts (the shards' working directory).
    workdir: &'static str,
    state: tempfile::TempDir,
    /// Each test appends its id here (forwarded as `RAN_LOG`).
    ran_log: PathBuf,
}

impl Project {
    /// `files` in the folder `workdir` of a new repository (a git one when
    /// `workdir` is not its root: the run starts in `workdir`).
    fn new(runner: &'static str, workdir: &'static str, files: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let path = dir.path().join(workdir).join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        if !workdir.is_empty() {
            common::git(dir.path(), &["init", "-q"]);
        }
        let state = tempfile::tempdir().unwrap();
        let ran_log = state.path().join("ran.log");
        Project {
            runner,
            dir,
            workdir,
            state,
            ran_log,
        }
    }

    /// The merged JUnit report.
    fn report(&self) -> PathBuf {
        self.state.path().join("report.xml")
    }

    /// Each file's time in the merged report (jest, vitest: a suite a file).
    fn suite_times(&self) -> BTreeMap<String, f64> {
        let xml = std::fs::read_to_string(self.report()).unwrap();
        let report = quick_junit::Report::deserialize_from_str(&xml).unwrap();
        report
            .test_suites
            .iter()
            .map(|s| {
                // "shard 1/2: web/sum.test.js"
                let name = s.name.as_str().split_once(": ").unwrap().1.to_string();
                (name, s.time.unwrap().as_secs_f64())
            })
            .collect()
    }

    fn timings(&self) -> PathBuf {
        self.state.path().join("timings.json")
    }

    /// The learned seconds per test id.
    fn learned(&self) -> BTreeMap<String, f64> {
        let value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(self.timings()).unwrap()).unwrap();
        value["tests"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
            .collect()
    }

    /// How often each test said it ran.
    fn ran(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        let text = std::fs::read_to_string(&self.ran_log).unwrap_or_default();
        for line in text.lines() {
            *out.entry(line.to_string()).or_default() += 1;
        }
        out
    }

    /// Two passing runs then a failing one: the first learns every listed
    /// test's duration (the slow test's own, not a share of its shard's),
    /// the second plans with them, each runs every test exactly once; with
    /// `FAIL_ONE` set the run fails (and no test runs twice).
    async fn check(&self, command: &[&str], listed: &[&str], slow: &str, ran: &[&str]) -> Ran {
        let n = listed.len();
        let first = run(self, &[], command).await;
        assert_eq!(first.code, 0, "{first}");
        assert!(
            first
                .stderr
                .contains(&format!("{n} tests listed, 0 with learned")),
            "{first}"
        );
        let learned = self.learned();
        assert_eq!(
            learned.keys().map(String::as_str).collect::<Vec<_>>(),
            listed,
            "every listed test's duration learned: {first}"
        );
        assert!(
            learned[slow] >= 0.9,
            "the slow test's own time is learned: {learned:?}\n{first}"
        );
        // Each its own time, not a share of its shard's (which would give
        // the slow test's shard-mate as much as the slow test). jest's file
        // times include the start of its worker, whichever file pays it:
        // they are checked against jest's own report.
        if self.runner == "jest" {
            let reported = self.suite_times();
            for (id, took) in &learned {
                assert!(
                    (took - reported[id]).abs() < 0.002,
                    "{id}'s own time is learned: {learned:?} {reported:?}\n{first}"
                );
            }
        } else {
            for (id, took) in &learned {
                assert!(
                    id == slow || *took < 0.6 * learned[slow],
                    "{id}'s own time is learned: {learned:?}\n{first}"
                );
            }
        }
        let once: BTreeMap<String, usize> = ran.iter().map(|t| (t.to_string(), 1)).collect();
        assert_eq!(self.ran(), once, "each test ran once: {first}");

        let second = run(self, &[], command).await;
        assert_eq!(second.code, 0, "{second}");
        assert!(
            second
                .stderr
                .contains(&format!("{n} tests listed, {n} with learned")),
            "{second}"
        );
        assert_eq!(self.ran(), once, "each test ran once: {second}");

        let failing = run(self, &["--env=FAIL_ONE=1"], command).await;
        assert_eq!(failing.code, 1, "a failing test fails the run: {failing}");
        // A runner may stop at its first failure (nextest does), never run a test twice.
        let ran = self.ran();
        assert!(
            ran.values().all(|n| *n == 1),
            "no test twice: {ran:?}\n{failing}"
        );
        failing
    }
}

/// A runner installed from npm under the test target folder, once.
fn npm_runner(package: &str) -> PathBuf {
    let name = package.split('@').next().unwrap();
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("js-runners");
    let dir = base.join(name);
    if dir.join("node_modules/.bin").join(name).exists() {
        return dir.join("node_modules");
    }
    // Installed aside, then moved in whole: an interrupted install is never taken for one.
    let partial = base.join(format!("{name}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("package.json"), "{\"private\":true}\n").unwrap();
    let out = std::process::Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            package,
        ])
        .current_dir(&partial)
        .output()
        .expect("npm runs (.ci/run installs it)");
    assert!(
        out.status.success(),
        "npm install {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&partial, &dir).unwrap();
    dir.join("node_modules")
}

const GO_RECORD: &str = r#"package ranlog

import "os"

// Record appends id to $RAN_LOG.
func Record(id string) {
	f, err := os.OpenFile(os.Getenv("RAN_LOG"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		panic(err)
	}
	defer f.Close()
	f.WriteString(id + "\n")
}
"#;

/// A Go module of four packages (one without tests, one nested), `go test`
/// through `--runner go`; then gotestsum's JUnit of a failing run places the
/// failure at its file relative to the repository, not to its package.
#[tokio::test(flavor = "multi_thread")]
async fn go_packages_are_learned_from_go_tests_own_lines() {
    let project = Project::new(
        "go",
        "",
        &[
            ("go.mod", "module example.com/m\n\ngo 1.19\n"),
            ("ranlog/ranlog.go", GO_RECORD),
            (
                "a/a_test.go",
                "package a\n\nimport (\n\t\"testing\"\n\t\"time\"\n\n\t\"example.com/m/ranlog\"\n)\n\n\
                 func TestSlow(t *testing.T) {\n\tranlog.Record(\"example.com/m/a\")\n\ttime.Sleep(time.Second)\n}\n",
            ),
            (
                "b/b_test.go",
                "package b\n\nimport (\n\t\"testing\"\n\n\t\"example.com/m/ranlog\"\n)\n\n\
                 func TestB(t *testing.T) { ranlog.Record(\"example.com/m/b\") }\n",
            ),
            (
                "c/d/d_test.go",
                "package d\n\nimport (\n\t\"os\"\n\t\"testing\"\n\n\t\"example.com/m/ranlog\"\n)\n\n\
                 func TestD(t *testing.T) {\n\tranlog.Record(\"example.com/m/c/d\")\n\tif os.Getenv(\"FAIL_ONE\") != \"\" {\n\t\tt.Errorf(\"got %d, want %d\", 2, 3)\n\t}\n}\n",
            ),
        ],
    );
    let listed = [
        "example.com/m/a",
        "example.com/m/b",
        "example.com/m/c/d",
        "example.com/m/ranlog",
    ];
    let ran = ["example.com/m/a", "example.com/m/b", "example.com/m/c/d"];
    let failing = project
        .check(
            &["go", "test", "-count=1", "{tests}"],
            &listed,
            "example.com/m/a",
            &ran,
        )
        .await;
    assert!(
        failing.stdout.contains("FAIL\texample.com/m/c/d"),
        "{failing}"
    );

    // gotestsum's JUnit names the file as go does, relative to the package.
    let junit = run(
        &project,
        &["--env=FAIL_ONE=1", "--junit", "junit.xml"],
        &[
            "gotestsum",
            "--junitfile",
            "junit.xml",
            "--",
            "-count=1",
            "{tests}",
        ],
    )
    .await;
    assert_eq!(junit.code, 1, "{junit}");
    assert!(
        junit
            .stdout
            .contains("example.com/m/c/d::TestD (c/d/d_test.go:13): "),
        "placed in the repository: {junit}"
    );
}

/// A crate with unit and integration tests, `cargo nextest run` through
/// `--runner cargo-nextest`: the ids select exactly their tests, and the
/// durations come from nextest's own status lines.
#[tokio::test(flavor = "multi_thread")]
async fn nextest_tests_are_selected_exactly_and_learned_from_its_status_lines() {
    // One write per id: tests of two shards append at once, and writeln!
    // on a File writes the id and its line break separately.
    let record = "fn record(id: &str) {\n    use std::io::Write;\n    let path = std::env::var(\"RAN_LOG\").unwrap();\n    let mut f = std::fs::OpenOptions::new().append(true).create(true).open(path).unwrap();\n    f.write_all(format!(\"{id}\\n\").as_bytes()).unwrap();\n}\n";
    let lib = format!(
        "pub fn add(a: i32, b: i32) -> i32 {{\n    a + b\n}}\n\n#[cfg(test)]\nmod tests {{\n    {}\n    #[test]\n    fn ok() {{\n        record(\"nx tests::ok\");\n    }}\n\n    #[test]\n    fn ok_too() {{\n        record(\"nx tests::ok_too\");\n    }}\n\n    #[test]\n    fn slow() {{\n        record(\"nx tests::slow\");\n        std::thread::sleep(std::time::Duration::from_secs(1));\n    }}\n\n    #[test]\n    fn maybe_fails() {{\n        record(\"nx tests::maybe_fails\");\n        if std::env::var_os(\"FAIL_ONE\").is_some() {{\n            assert_eq!(super::add(1, 1), 3);\n        }}\n        if std::env::var_os(\"FAIL_ONCE\").is_some() {{\n            let ran = std::fs::read_to_string(std::env::var(\"RAN_LOG\").unwrap()).unwrap();\n            assert!(ran.matches(\"nx tests::maybe_fails\\n\").count() > 1, \"fails its first time\");\n        }}\n    }}\n}}\n",
        record.replace('\n', "\n    ")
    );
    let integ = format!("{record}\n#[test]\nfn it() {{\n    record(\"nx::integ it\");\n}}\n");
    let project = Project::new(
        "cargo-nextest",
        "",
        &[
            (
                "Cargo.toml",
                "[package]\nname = \"nx\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n",
            ),
            ("src/lib.rs", &lib),
            ("tests/integ.rs", &integ),
        ],
    );
    let listed = [
        "nx tests::maybe_fails",
        "nx tests::ok",
        "nx tests::ok_too",
        "nx tests::slow",
        "nx::integ it",
    ];
    // `ok` selects `ok_too` too by name; the id selects it alone.
    let failing = project
        .check(
            &["cargo", "nextest", "run", "{tests}"],
            &listed,
            "nx tests::slow",
            &listed,
        )
        .await;
    assert!(failing.stdout.contains("FAIL ["), "{failing}");

    // A rerun takes what did not pass, read from nextest's log: the failed
    // test and those its stop at the first failure left unrun, not the passed.
    // One test at a time, so what nextest leaves unrun does not depend on
    // timing: it runs a shard's tests in id order, `maybe_fails` (the first)
    // fails and stops it, in both attempts. Its shard-mates never run, and
    // the run fails: no test that never ran passes for one that did.
    let command = ["cargo", "nextest", "run", "--test-threads=1", "{tests}"];
    let rerun = run(&project, &["--env=FAIL_ONE=1", "--retries=1"], &command).await;
    assert_eq!(rerun.code, 1, "failing again fails the run: {rerun}");
    let plan = project.state.path().join("report.plan.json");
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    let mut expected = BTreeMap::new();
    for share in recorded["shares"].as_array().unwrap() {
        let tests: Vec<&str> = share["tests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        let stops = tests.contains(&"nx tests::maybe_fails");
        for test in tests {
            let times = match test {
                "nx tests::maybe_fails" => 2,
                _ if stops => 0,
                _ => 1,
            };
            if times > 0 {
                expected.insert(test.to_string(), times);
            }
        }
    }
    assert_eq!(project.ran(), expected, "{rerun}");

    // Failing only its first time: the rerun runs it and the shard-mates its
    // stop left unrun, each once, and the run passes (flaky).
    let flaky = run(&project, &["--env=FAIL_ONCE=1", "--retries=1"], &command).await;
    assert_eq!(flaky.code, 0, "passing on the rerun passes: {flaky}");
    let mut once: BTreeMap<String, usize> = listed.iter().map(|t| (t.to_string(), 1)).collect();
    once.insert("nx tests::maybe_fails".into(), 2);
    assert_eq!(project.ran(), once, "{flaky}");

    // The recorded plan replays one shard's tests, selected as the run did.
    let want: BTreeMap<String, usize> = recorded["shares"][0]["tests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t.as_str().unwrap().to_string(), 1))
        .collect();
    let _ = std::fs::remove_file(&project.ran_log);
    let mut replay = tokio::process::Command::new(env!("CARGO_BIN_EXE_mvm-shard"));
    replay
        .args(["run", "--local", "--source=.", "--only=1", "--replay-plan"])
        .arg(&plan)
        .arg(format!("--env=RAN_LOG={}", project.ran_log.display()))
        .current_dir(project.dir.path());
    for (name, _) in std::env::vars() {
        if name.starts_with("CARGO") && name != "CARGO_HOME" {
            replay.env_remove(name);
        }
    }
    let out = common::output_within(replay, RUN_LIMIT, "the replay").await;
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(project.ran(), want, "exactly shard 1's tests: {said}");
}

/// Test files for jest and vitest (`header` brings in what they need): one
/// whose name ends like another's, one whose path contains another's, one slow.
fn js_files(header: &str) -> Vec<(String, String)> {
    let record = |id: &str| format!("{header}appendFileSync(process.env.RAN_LOG, '{id}\\n');\n");
    vec![
        (
            "web/sum.test.js".into(),
            format!(
                "{}\ndescribe('sum', () => {{\n  test('adds', () => {{\n    expect(1 + 1).toBe(2);\n  }});\n  test('maybe fails', () => {{\n    expect(1 + 1).toBe(process.env.FAIL_ONE ? 3 : 2);\n  }});\n}});\n",
                record("web/sum.test.js")
            ),
        ),
        (
            "web/bsum.test.js".into(),
            format!(
                "{}\ntest('b', () => {{\n  expect(1).toBe(1);\n}});\n",
                record("web/bsum.test.js")
            ),
        ),
        (
            "more/web/sum.test.js".into(),
            format!(
                "{}\ntest('c', () => {{\n  expect(1).toBe(1);\n}});\n",
                record("more/web/sum.test.js")
            ),
        ),
        (
            "lib/slow.test.js".into(),
            format!(
                "{}\ntest('slow', async () => {{\n  await new Promise((done) => setTimeout(done, 1000));\n}});\n",
                record("lib/slow.test.js")
            ),
        ),
    ]
}

fn js_project(runner: &'static str, package_json: &str, header: &str, modules: &Path) -> Project {
    let files = js_files(header);
    let mut all: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_str()))
        .collect();
    all.push(("package.json", package_json));
    // In a folder of the repository: ids are relative to it, places to the repository.
    let project = Project::new(runner, "app", &all);
    // Installed once here; each shard's copy of the source links to it.
    let link = project.dir.path().join("app/node_modules");
    std::os::unix::fs::symlink(modules, link).unwrap();
    project
}

const JS_LISTED: [&str; 4] = [
    "lib/slow.test.js",
    "more/web/sum.test.js",
    "web/bsum.test.js",
    "web/sum.test.js",
];

/// jest through `--runner jest`: its `--json` report (asked for by
/// `{tests}`) gives each file's time, and the failing assertion is placed
/// at its file and line from the stack jest reports.
#[tokio::test(flavor = "multi_thread")]
async fn jest_files_are_learned_from_its_json_report_and_failures_placed() {
    let modules = npm_runner("jest@30");
    let project = js_project(
        "jest",
        "{\"private\":true}\n",
        "const { appendFileSync } = require('node:fs');\n",
        &modules,
    );
    let failing = project
        .check(
            &["npx", "jest", "{tests}"],
            &JS_LISTED,
            "lib/slow.test.js",
            &JS_LISTED,
        )
        .await;
    assert!(
        failing
            .stdout
            .contains("web/sum.test.js › sum::maybe fails (app/web/sum.test.js:9): "),
        "{failing}"
    );
}

/// vitest through `--runner vitest`: its JUnit reporter (asked for by
/// `{tests}`, next to its default one) gives each file's time, and the
/// failing assertion is placed at its file and line.
#[tokio::test(flavor = "multi_thread")]
async fn vitest_files_are_learned_from_its_junit_report_and_failures_placed() {
    let modules = npm_runner("vitest@3");
    let project = js_project(
        "vitest",
        "{\"private\":true,\"type\":\"module\"}\n",
        "import { describe, test, expect } from 'vitest';\nimport { appendFileSync } from 'node:fs';\n",
        &modules,
    );
    let failing = project
        .check(
            &["npx", "vitest", "run", "{tests}"],
            &JS_LISTED,
            "lib/slow.test.js",
            &JS_LISTED,
        )
        .await;
    assert!(
        failing
            .stdout
            .contains("web/sum.test.js::sum > maybe fails (app/web/sum.test.js:10): "),
        "{failing}"
    );
    // One file a shard: `web/sum.test.js` alone would select `more/web/sum.test.js` too.
    let apart = run(
        &project,
        &["--shards", "4"],
        &["npx", "vitest", "run", "{tests}"],
    )
    .await;
    assert_eq!(apart.code, 0, "{apart}");
    let once: BTreeMap<String, usize> = JS_LISTED.iter().map(|t| (t.to_string(), 1)).collect();
    assert_eq!(project.ran(), once, "each file once: {apart}");
}

/// A test file whose name holds a line break, as jest and vitest list it
/// (their JSON keeps it whole): the run refuses it with exit 2, naming it
/// with escapes, before any shard runs; it is never split into two files.
#[tokio::test(flavor = "multi_thread")]
async fn jest_and_vitest_files_named_with_a_line_break_are_refused() {
    for (runner, package, package_json, header, command) in [
        (
            "jest",
            "jest@30",
            "{\"private\":true}\n",
            "const { appendFileSync } = require('node:fs');\n",
            &["npx", "jest", "{tests}"][..],
        ),
        (
            "vitest",
            "vitest@3",
            "{\"private\":true,\"type\":\"module\"}\n",
            "import { describe, test, expect } from 'vitest';\nimport { appendFileSync } from 'node:fs';\n",
            &["npx", "vitest", "run", "{tests}"][..],
        ),
    ] {
        let project = js_project(runner, package_json, header, &npm_runner(package));
        let odd = project.dir.path().join("app/web/new\nline.test.js");
        std::fs::copy(project.dir.path().join("app/web/bsum.test.js"), &odd).unwrap();
        let ran = run(&project, &[], command).await;
        assert_eq!(ran.code, 2, "{runner}: {ran}");
        assert!(
            ran.stderr
                .contains("names the test \"web/new\\nline.test.js\", which contains a line break"),
            "{runner}: {ran}"
        );
        assert!(project.ran().is_empty(), "{runner}: nothing ran: {ran}");
    }
}
