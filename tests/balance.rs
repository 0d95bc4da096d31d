//! Test-aware runs (`--runner`): listing where the tests run, learned
//! durations, balanced shards, every test exactly once.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::cli;

/// One shard's line of the balance table: (tests, expected s, took s).
fn shard_lines(stderr: &str) -> BTreeMap<u32, (usize, f64, f64)> {
    let mut out = BTreeMap::new();
    for line in stderr.lines() {
        let Some(rest) = line.strip_prefix("mvm-shard: shard ") else {
            continue;
        };
        let words: Vec<&str> = rest.split([' ', ',', '/']).collect();
        let index: u32 = words[0].parse().unwrap();
        let tests: usize = words[2].parse().unwrap();
        let number = |after: &str| -> f64 {
            let i = words.iter().position(|w| *w == after).unwrap();
            words[i + 1].trim_end_matches('s').parse().unwrap()
        };
        out.insert(index, (tests, number("expected"), number("took")));
    }
    out
}

/// Test cases (`classname::name`) in a JUnit report, with how often each appears.
fn cases(report: &Path) -> BTreeMap<String, usize> {
    cases_in(&std::fs::read_to_string(report).unwrap())
}

/// Test cases (`classname::name`) in a JUnit report's text, with how often each appears.
fn cases_in(text: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for part in text.split("<testcase ").skip(1) {
        let head = part.split('>').next().unwrap();
        let attr = |key: &str| {
            head.split(&format!(" {key}=\""))
                .nth(1)
                .or_else(|| head.strip_prefix(&format!("{key}=\"")))
                .map(|v| v.split('"').next().unwrap().to_string())
                .unwrap_or_default()
        };
        *out.entry(format!("{}::{}", attr("classname"), attr("name")))
            .or_default() += 1;
    }
    out
}

/// A pytest suite of skewed durations: one test of 3 s, forty of 0.05 s.
fn skewed_suite(dir: &Path) {
    std::fs::write(
        dir.join("test_skew.py"),
        "import time, pytest\n\
         def test_slow():\n    time.sleep(3)\n\
         @pytest.mark.parametrize('i', range(40))\n\
         def test_fast(i):\n    time.sleep(0.05)\n",
    )
    .unwrap();
}

fn run_pytest(dir: &Path, timings: &Path, report: &Path) -> (i32, String, String) {
    run_pytest_listing(dir, timings, report, &[])
}

/// `--runner pytest` on 4 local shards, with `extra` options before `--`.
fn run_pytest_listing(
    dir: &Path,
    timings: &Path,
    report: &Path,
    extra: &[&str],
) -> (i32, String, String) {
    let mut options = vec!["--shards", "4", "--max-parallel", "4"];
    options.extend(extra);
    cli(dir, &pytest_run(timings, report, &options))
}

/// `run --local --source . --runner pytest` with `options`, learning into
/// `timings`, merging into `report`.
fn pytest_run<'a>(timings: &'a Path, report: &'a Path, options: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run", "--local", "--source", ".", "--runner", "pytest"];
    args.extend(["--timings", timings.to_str().unwrap()]);
    args.extend(["--report", report.to_str().unwrap()]);
    args.extend(options);
    args.extend([
        "--",
        "python3",
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
    ]);
    args.push("{tests}");
    args
}

/// The number in "N tests listed".
fn listed(stderr: &str) -> usize {
    let line = stderr.lines().find(|l| l.contains("tests listed")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Each shard's test cases' durations as the merged JUnit report tells them
/// (one `<testsuite name="shard K/N: …">` per shard), by shard index.
fn case_times(report: &Path) -> BTreeMap<u32, Vec<f64>> {
    let text = std::fs::read_to_string(report).unwrap();
    let mut out = BTreeMap::new();
    for suite in text.split("<testsuite ").skip(1) {
        let index: u32 = suite
            .split("name=\"shard ")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|k| k.parse().ok())
            .unwrap_or_else(|| panic!("a suite per shard: {suite}"));
        let times = suite
            .split("<testcase ")
            .skip(1)
            .map(|case| {
                let head = case.split('>').next().unwrap();
                head.split(" time=\"")
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        out.insert(index, times);
    }
    out
}

/// Checks the run against the best possible split of what its tests took:
/// the lower bound is max(total/N, longest test), from this run's own
/// durations (the JUnit report). The tests of the slowest-by-tests shard
/// must take at most 15% over it (the plan's quality, free of start-up), and
/// the slowest shard's wall time at most 15% over it plus the start-up every
/// shard pays (the most any shard spent outside its tests).
fn assert_balanced(stderr: &str, report: &Path) {
    let shards = shard_lines(stderr);
    assert_eq!(shards.len(), 4, "{stderr}");
    let cases = case_times(report);
    assert_eq!(cases.len(), 4, "a suite per shard in the report");
    let all: Vec<f64> = cases.values().flatten().copied().collect();
    let bound = (all.iter().sum::<f64>() / 4.0).max(all.iter().copied().fold(0.0, f64::max));
    let in_tests: BTreeMap<u32, f64> = cases.iter().map(|(k, t)| (*k, t.iter().sum())).collect();
    let heaviest = in_tests.values().copied().fold(0.0, f64::max);
    assert!(
        heaviest <= 1.15 * bound,
        "the heaviest shard's tests took {heaviest} s, the bound is {bound} s: {in_tests:?}\n{stderr}"
    );
    let startup = shards
        .iter()
        .map(|(k, (_, _, took))| took - in_tests[k])
        .fold(0.0, f64::max);
    let slowest = shards.values().map(|s| s.2).fold(0.0, f64::max);
    assert!(
        slowest <= 1.15 * bound + startup,
        "slowest {slowest} s, bound {bound} s, start-up {startup} s: {stderr}"
    );
}

fn learned(timings: &Path) -> serde_json::Map<String, serde_json::Value> {
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(timings).unwrap()).unwrap();
    value["tests"].as_object().unwrap().clone()
}

/// more-itertools' own test suite, from its sdist on PyPI (`.ci/run`
/// downloads it into target/pypi-suites), without its slowest tests (to
/// stay quick; one of several seconds remains), through `--runner pytest` twice: learned, then balanced, each
/// test once.
#[test]
fn a_real_pypi_suite_is_learned_then_balanced() {
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pypi-suites/more-itertools");
    assert!(
        suite.join("tests").is_dir(),
        "{} is missing: run .ci/run, which downloads more-itertools' sdist there",
        suite.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let copied = std::process::Command::new("cp")
        .arg("-R")
        .arg(suite.join("."))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(copied.success());
    let timings = state.path().join("timings.json");
    let report = state.path().join("junit.xml");
    let listing = [
        "--list-command",
        "python3 -m pytest --collect-only -q -p no:cacheprovider \
         --deselect tests/test_recipes.py::PrimeFunctionTests \
         --deselect tests/test_more.py::TestConcurrentTee \
         --deselect tests/test_more.py::ExtractTests::test_all_orderings",
    ];
    let (code, stdout, stderr) = run_pytest_listing(dir.path(), &timings, &report, &listing);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let count = listed(&stderr);
    assert!(count > 500, "{stderr}");
    let first = learned(&timings);
    assert_eq!(first.len(), count, "every listed test learned");

    let (code, stdout, stderr) = run_pytest_listing(dir.path(), &timings, &report, &listing);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stderr.contains(&format!("{count} tests listed, {count} with learned")));
    let seen = cases(&report);
    assert_eq!(seen.len(), count, "each listed test ran");
    assert!(seen.values().all(|n| *n == 1), "each test once");
    assert_balanced(&stderr, &report);
}

#[test]
fn a_skewed_suite_is_learned_then_balanced_and_every_test_runs_once() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    skewed_suite(dir.path());
    let timings = state.path().join("timings.json");
    let report = state.path().join("junit.xml");

    let (code, stdout, stderr) = run_pytest(dir.path(), &timings, &report);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stderr.contains("41 tests listed, 0 with learned"),
        "{stderr}"
    );
    let learned: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&timings).unwrap()).unwrap();
    let learned = learned["tests"].as_object().unwrap();
    assert_eq!(learned.len(), 41, "{learned:?}");
    let slow = learned["test_skew.py::test_slow"].as_f64().unwrap();
    assert!(slow >= 2.9, "the first run learned the slow test: {slow}");

    let (code, stdout, stderr) = run_pytest(dir.path(), &timings, &report);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stderr.contains("41 tests listed, 41 with learned"),
        "{stderr}"
    );
    let seen = cases(&report);
    assert_eq!(seen.len(), 41, "{seen:?}");
    assert!(seen.values().all(|n| *n == 1), "each test once: {seen:?}");

    assert_balanced(&stderr, &report);
    let shards = shard_lines(&stderr);
    let with_slow = shards
        .values()
        .find(|s| s.1 >= 2.5)
        .unwrap_or_else(|| panic!("no shard expects the slow test: {stderr}"));
    assert_eq!(
        with_slow.0, 1,
        "the 3 s test has a shard of its own: {stderr}"
    );
}

#[test]
fn files_are_split_by_file_and_each_runs_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("t/sub")).unwrap();
    let names = ["t/a.sh", "t/b.sh", "t/c d.sh", "t/sub/e.sh", "t/sub/f.sh"];
    for name in names {
        std::fs::write(dir.path().join(name), format!("echo ran {name}\n")).unwrap();
    }
    let (code, stdout, stderr) = cli(
        dir.path(),
        &[
            "run",
            "--local",
            "--shards",
            "2",
            "--source",
            ".",
            "--runner",
            "files",
            "--files",
            "t/**/*.sh",
            "--timings",
            dir.path().join(".timings.json").to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "for f in {tests}; do sh \"$f\"; done",
        ],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    for name in names {
        let line = format!("ran {name}\n");
        assert_eq!(stdout.matches(&line).count(), 1, "{name}: {stdout}");
    }
    let shards = shard_lines(&stderr);
    assert_eq!(
        shards.values().map(|s| s.0).collect::<Vec<_>>(),
        vec![3, 2],
        "{stderr}"
    );
    // The summary shows each shard's expected time next to the actual one.
    assert!(stdout.contains(" duration  expected  exit "), "{stdout}");
}

#[test]
fn a_failing_listing_exits_2_and_shows_its_output() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x"), "").unwrap();
    for local in [false, true] {
        let mut args = vec![
            "run",
            "--local",
            "--source",
            ".",
            "--runner",
            "pytest",
            "--list-command",
            "echo no such suite >&2; exit 4",
            "--timings",
            "t.json",
        ];
        if local {
            args.push("--list-local");
        }
        args.extend(["--", "pytest", "{tests}"]);
        let (code, stdout, stderr) = cli(dir.path(), &args);
        assert_eq!(code, 2, "{stdout}\n{stderr}");
        assert!(
            stderr.contains("listing the tests failed") && stderr.contains("no such suite"),
            "{stderr}"
        );
    }
}

#[test]
fn a_runner_without_a_tests_placeholder_is_bad_usage() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = cli(
        dir.path(),
        &[
            "run", "--local", "--source", ".", "--runner", "pytest", "--", "pytest",
        ],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("{tests}"), "{stderr}");
}

/// Runs shard `only` of 2 of eight script files as a matrix job of workflow
/// run 77 would; returns the files it ran.
fn matrix_job(dir: &Path, timings: &Path, only: &str) -> Vec<String> {
    let out = std::process::Command::new(common::binary())
        .args([
            "run",
            "--local",
            "--shards",
            "2",
            "--only",
            only,
            "--source",
            ".",
            "--runner",
            "files",
            "--files",
            "t/*.sh",
            "--timings",
            timings.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "for f in {tests}; do sh \"$f\"; done",
        ])
        .current_dir(dir)
        .env("GITHUB_RUN_ID", "77")
        .env_remove("GITHUB_ACTIONS")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    // It says how to make separate runs share one plan.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "plan once with --plan-only FILE and run each share with --replay-plan FILE --only K"
        ),
        "{stderr}"
    );
    stdout
        .lines()
        .filter_map(|l| l.split("ran ").nth(1).map(str::to_string))
        .collect()
}

#[test]
fn matrix_jobs_reach_the_same_plan_when_the_timings_change_between_them() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("t")).unwrap();
    let names: Vec<String> = "abcdefgh".chars().map(|c| format!("t/{c}.sh")).collect();
    let mut before = serde_json::Map::new();
    for name in &names {
        std::fs::write(dir.path().join(name), format!("echo ran {name}\n")).unwrap();
        before.insert(name.clone(), serde_json::json!(10.0));
    }
    let timings = state.path().join("timings.json");
    let snapshot = serde_json::json!({ "tests": before }).to_string();
    std::fs::write(&timings, &snapshot).unwrap();

    let mut ran = matrix_job(dir.path(), &timings, "1");
    let after = std::fs::read_to_string(&timings).unwrap();
    assert_ne!(
        after, snapshot,
        "job 1 learned: job 2 starts from other timings"
    );
    ran.extend(matrix_job(dir.path(), &timings, "2"));
    ran.sort();
    assert_eq!(ran, names, "every test exactly once across the jobs");
}

/// Runs `mvm-shard run --local ARGS` in `dir` as a job of workflow run 88.
fn job_of_run_88(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(common::binary())
        .args(["run", "--local", "--source", "."])
        .args(args)
        .current_dir(dir)
        .env("GITHUB_RUN_ID", "88")
        .env_remove("GITHUB_ACTIONS")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn jobs_that_each_replay_one_published_plan_run_every_test_once_whatever_timings_they_restored() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("t")).unwrap();
    let names: Vec<String> = "abcdefgh".chars().map(|c| format!("t/{c}.sh")).collect();
    for name in &names {
        std::fs::write(dir.path().join(name), format!("echo ran {name}\n")).unwrap();
    }
    common::git(dir.path(), &["init", "-q"]);
    common::git(dir.path(), &["add", "-A"]);
    let commit = common::GIT_COMMIT;
    common::git(dir.path(), &[&commit[..], &["-m", "tests"]].concat());
    // Two snapshots of learned timings that plan differently: the jobs
    // restore one or the other (another workflow run saved in between).
    let snapshot = |slow: &str| {
        let tests: serde_json::Map<String, serde_json::Value> = names
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    serde_json::json!(if n == slow { 30.0 } else { 1.0 }),
                )
            })
            .collect();
        serde_json::json!({ "tests": tests }).to_string()
    };
    let plan = state.path().join("plan.json");
    let timings = |job: u32| state.path().join(format!("timings-{job}.json"));
    let inputs = |job: u32| -> Vec<String> {
        [
            "--shards",
            "3",
            "--runner",
            "files",
            "--files",
            "t/*.sh",
            "--timings",
            timings(job).to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "for f in {tests}; do sh \"$f\"; done",
        ]
        .map(str::to_string)
        .to_vec()
    };
    let with = |extra: &[&str], job: u32| -> Vec<String> {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        args.extend(inputs(job));
        args
    };
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        job_of_run_88(dir.path(), &args)
    };

    // The first job plans with the snapshot it restored and publishes the plan.
    std::fs::write(timings(0), snapshot("t/a.sh")).unwrap();
    let (code, stdout, stderr) = run(with(&["--plan-only", plan.to_str().unwrap()], 0));
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(!stdout.contains("ran "), "plans only: {stdout}");
    let published: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    let plan_id = published["run_id"].as_str().unwrap().to_string();

    // Each job restored other timings (another run saved between them);
    // each runs its share of the one published plan.
    let mut ran = Vec::new();
    for (job, slow) in [(1, "t/a.sh"), (2, "t/h.sh"), (3, "t/d.sh")] {
        std::fs::write(timings(job), snapshot(slow)).unwrap();
        let only = job.to_string();
        let (code, stdout, stderr) = run(with(
            &["--replay-plan", plan.to_str().unwrap(), "--only", &only],
            job,
        ));
        assert_eq!(code, 0, "job {job}: {stdout}\n{stderr}");
        assert!(
            stderr.contains(&format!("replaying plan {plan_id} ")),
            "job {job}: {stderr}"
        );
        let mine: Vec<String> = stdout
            .lines()
            .filter_map(|l| l.split("ran ").nth(1).map(str::to_string))
            .collect();
        let want: Vec<String> = published["shares"][job as usize - 1]["tests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        let mut sorted = mine.clone();
        sorted.sort();
        assert_eq!(sorted, want, "job {job} ran its share: {stdout}");
        ran.extend(mine);
        // It learned its tests' durations, kept the others', and records
        // the plan's snapshot as what the run planned with.
        let learned: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(timings(job)).unwrap()).unwrap();
        assert_eq!(learned["tests"].as_object().unwrap().len(), 8, "{learned}");
        assert_eq!(learned["before"], published["planned_with"], "{learned}");
    }
    ran.sort();
    assert_eq!(ran, names, "every test exactly once across the jobs");

    // Their files merge as one run's (no "other timings" alarm).
    for job in [2, 3] {
        let out = std::process::Command::new(common::binary())
            .arg("merge-timings")
            .args([timings(job), timings(job - 1)])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
    }

    // A job at another commit refuses, in one line, and runs nothing.
    common::git(
        dir.path(),
        &[&commit[..], &["--allow-empty", "-m", "later"]].concat(),
    );
    let (code, stdout, stderr) = run(with(
        &["--replay-plan", plan.to_str().unwrap(), "--only", "1"],
        1,
    ));
    assert_eq!(code, 2, "{stdout}\n{stderr}");
    assert!(!stdout.contains("ran "), "{stdout}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("it was made at commit"), "{stderr}");
}

#[test]
fn fail_fast_stops_the_run_after_the_first_failing_shard() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x"), "").unwrap();
    let run = |fail_fast: bool| {
        let mut args = vec![
            "run",
            "--local",
            "--source",
            ".",
            "--shards",
            "4",
            "--max-parallel",
            "1",
        ];
        if fail_fast {
            args.push("--fail-fast");
        }
        // Shard 1 fails at once; the others would pass after a second.
        args.extend([
            "--",
            "sh",
            "-c",
            "test {index} -ne 1 && sleep 1 && echo ran {index}",
        ]);
        cli(dir.path(), &args)
    };
    let (code, stdout, stderr) = run(true);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(
        !stdout.contains("ran 3") && !stdout.contains("ran 4"),
        "{stdout}"
    );
    assert!(stdout.contains("0 passed, 1 failed"), "{stdout}");
    assert!(
        stderr.contains("--fail-fast: shard 1/4 failed") && stderr.contains("never started"),
        "{stderr}"
    );
    // Without it, every shard runs.
    let (code, stdout, _) = run(false);
    assert_eq!(code, 1);
    assert!(stdout.contains("3 passed, 1 failed"), "{stdout}");
}

/// A pytest suite whose tests write their name to `$RUNS_DIR/runs` each
/// time they run: `test_flaky` fails the first time (it leaves a marker in
/// `$RUNS_DIR`, which outlives the fresh environments), `test_broken`
/// fails whenever `BROKEN` is set, six others pass.
fn flaky_suite(dir: &Path) {
    std::fs::write(
        dir.join("test_flaky.py"),
        "import os, pathlib, pytest\n\
         RUNS = pathlib.Path(os.environ['RUNS_DIR'])\n\
         def ran(name):\n    with open(RUNS / 'runs', 'a') as f:\n        f.write(name + '\\n')\n\
         def test_flaky():\n    ran('flaky')\n    marker = RUNS / 'flaky-failed-once'\n    \
             if not marker.exists():\n        marker.write_text('')\n        assert False, 'fails the first time'\n\
         def test_broken():\n    ran('broken')\n    assert not os.environ.get('BROKEN'), 'fails every time'\n\
         @pytest.mark.parametrize('i', range(6))\n\
         def test_ok(i):\n    ran(f'ok{i}')\n",
    )
    .unwrap();
}

/// `--runner pytest` on 2 local shards of the flaky suite with `extra`
/// options; returns the exit code, the output, and how often each test ran.
fn run_flaky(dir: &Path, extra: &[&str]) -> (i32, String, String, BTreeMap<String, usize>, String) {
    let runs = tempfile::tempdir().unwrap();
    let report = runs.path().join("junit.xml");
    let timings = runs.path().join("timings.json");
    let runs_env = format!("RUNS_DIR={}", runs.path().display());
    let mut options = vec!["--shards", "2", "--timeout", "60s", "--env", &runs_env];
    options.extend(extra);
    let args = pytest_run(&timings, &report, &options);
    let (code, stdout, stderr) = cli(dir, &args);
    let mut counted = BTreeMap::new();
    let log = std::fs::read_to_string(runs.path().join("runs")).unwrap_or_default();
    for name in log.lines() {
        *counted.entry(name.to_string()).or_default() += 1;
    }
    let junit = std::fs::read_to_string(&report).unwrap_or_default();
    (code, stdout, stderr, counted, junit)
}

#[test]
fn retries_rerun_only_the_failed_tests_and_a_test_failing_again_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    flaky_suite(dir.path());
    let (code, stdout, stderr, runs, junit) =
        run_flaky(dir.path(), &["--retries", "2", "--env", "BROKEN=1"]);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    // Each failed test reran twice at most; the others ran once.
    assert_eq!(runs["broken"], 3, "{runs:?}");
    assert_eq!(runs["flaky"], 2, "{runs:?}");
    for i in 0..6 {
        assert_eq!(runs[&format!("ok{i}")], 1, "{runs:?}");
    }
    assert!(stdout.contains("rerun 2 of 2: 1 failed test"), "{stdout}");
    assert!(
        stdout.contains("flaky (failed, then passed on a rerun):")
            && stdout.contains("test_flaky::test_flaky: AssertionError: fails the first time"),
        "{stdout}"
    );
    // The merged report: each test once, the reruns marked.
    let seen = cases_in(&junit);
    assert_eq!(seen.len(), 8, "{junit}");
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    assert_eq!(junit.matches("<flakyFailure").count(), 1, "{junit}");
    assert_eq!(junit.matches("<rerunFailure").count(), 2, "{junit}");
}

#[test]
fn a_flaky_test_passes_the_run_unless_no_flaky() {
    let dir = tempfile::tempdir().unwrap();
    flaky_suite(dir.path());
    let (code, stdout, stderr, runs, junit) = run_flaky(dir.path(), &["--retries", "1"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(runs["flaky"], 2, "{runs:?}");
    assert_eq!(runs["broken"], 1, "{runs:?}");
    assert!(stdout.contains("; 1 test flaky"), "{stdout}");
    assert!(junit.contains("<flakyFailure"), "{junit}");

    let (code, stdout, stderr, runs, _) = run_flaky(dir.path(), &["--retries", "1", "--no-flaky"]);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert_eq!(runs["flaky"], 2, "{runs:?}");
    assert!(
        stderr.contains("--no-flaky: 1 flaky test failed, then passed on a rerun"),
        "{stderr}"
    );
    // Without --retries nothing reruns: the flaky test fails the run.
    let (code, _, _, runs, _) = run_flaky(dir.path(), &[]);
    assert_eq!(code, 1);
    assert_eq!(runs["flaky"], 1, "{runs:?}");
}

#[test]
fn without_a_runner_retries_rerun_the_whole_shard() {
    let dir = tempfile::tempdir().unwrap();
    let runs = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x"), "").unwrap();
    let runs_env = format!("RUNS_DIR={}", runs.path().display());
    // Shard 2 fails the first time only; shard 1 passes.
    let (code, stdout, stderr) = cli(
        dir.path(),
        &[
            "run",
            "--local",
            "--source",
            ".",
            "--shards",
            "2",
            "--retries",
            "3",
            "--env",
            &runs_env,
            "--",
            "sh",
            "-c",
            "echo {index} >> \"$RUNS_DIR/runs\"; test {index} = 1 || test -e \"$RUNS_DIR/m\" || { touch \"$RUNS_DIR/m\"; exit 1; }",
        ],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let log = std::fs::read_to_string(runs.path().join("runs")).unwrap();
    let mut lines: Vec<&str> = log.lines().collect();
    lines.sort();
    assert_eq!(lines, ["1", "2", "2"], "shard 2 ran twice, shard 1 once");
    assert!(
        stdout.contains("rerun 1 of 3: the whole shard")
            && stdout.contains("[2/2] the whole shard: exited with code 1"),
        "{stdout}"
    );
}

#[test]
fn a_recorded_plan_replays_exactly_one_shards_tests() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("t")).unwrap();
    for c in "abcdefg".chars() {
        let name = format!("t/{c}.sh");
        std::fs::write(dir.path().join(&name), format!("echo ran {name}\n")).unwrap();
    }
    let report = state.path().join("junit.xml");
    let timings = state.path().join("timings.json");
    let command = ["--", "sh", "-c", "for f in {tests}; do sh \"$f\"; done"];
    let mut args = vec![
        "run",
        "--local",
        "--shards",
        "3",
        "--source",
        ".",
        "--runner",
        "files",
        "--files",
        "t/*.sh",
        "--timings",
        timings.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ];
    args.extend(command);
    let (code, stdout, stderr) = cli(dir.path(), &args);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let plan_path = state.path().join("junit.plan.json");
    assert!(
        stderr.contains(&format!("plan recorded in {}", plan_path.display())),
        "{stderr}"
    );
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan_path).unwrap()).unwrap();
    let want: Vec<String> = plan["shares"][1]["tests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    assert!(!want.is_empty(), "{plan}");

    let plan_arg = plan_path.to_str().unwrap();
    let replay = |extra: &[&str]| {
        let mut args = vec!["run", "--local", "--source", ".", "--replay-plan", plan_arg];
        args.extend(extra);
        cli(dir.path(), &args)
    };
    let (code, stdout, stderr) = replay(&["--only", "2"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let mut ran: Vec<String> = stdout
        .lines()
        .filter_map(|l| l.split("ran ").nth(1).map(str::to_string))
        .collect();
    ran.sort();
    assert_eq!(ran, want, "exactly shard 2's tests: {stdout}");
    assert!(
        !stderr.contains(" with learned durations"),
        "no listing: {stderr}"
    );
    // With --timings alone (the runner is the plan's), what it ran is learned.
    let learned = state.path().join("replayed.json");
    let (code, stdout, stderr) = replay(&["--only", "2", "--timings", learned.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let learned: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&learned).unwrap()).unwrap();
    for test in &want {
        assert!(learned["tests"][test].is_number(), "{test}: {learned}");
    }
    // A plan edited to have planned with durations no test takes is learned
    // from all the same (it made the invoker panic after the shards ran).
    assert!(want.len() >= 2, "{plan}");
    let mut edited = plan.clone();
    let absurd: serde_json::Map<String, serde_json::Value> = want
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), if i == 0 { (-1.0).into() } else { 5.0.into() }))
        .collect();
    edited["planned_with"] = absurd.into();
    let edited_path = state.path().join("edited.plan.json");
    std::fs::write(&edited_path, edited.to_string()).unwrap();
    let learned = state.path().join("edited.json");
    let (code, stdout, stderr) = cli(
        dir.path(),
        &[
            "run",
            "--local",
            "--source",
            ".",
            "--replay-plan",
            edited_path.to_str().unwrap(),
            "--only",
            "2",
            "--timings",
            learned.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(learned.exists(), "{stderr}");

    // Without --local: on the configured backend (here a separate emulator).
    let emulator = common::Emulate::start();
    let out = std::process::Command::new(common::binary())
        .args(["run", "--function", "mvm-shard", "--endpoint-url"])
        .args([&emulator.endpoint, "--region", "us-east-1", "--source", "."])
        .args(["--replay-plan", plan_arg, "--only", "1"])
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env_remove("GITHUB_ACTIONS")
        .current_dir(dir.path())
        .output()
        .unwrap();
    drop(emulator);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let mut ran: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split("ran ").nth(1))
        .collect();
    ran.sort();
    assert_eq!(
        ran,
        plan["shares"][0]["tests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect::<Vec<_>>(),
        "{stdout}"
    );

    // Bad input: one line, exit 2, nothing run.
    let bad = |extra: &[&str], says: &str| {
        let (code, stdout, stderr) = replay(extra);
        assert_eq!(code, 2, "{extra:?}: {stdout}\n{stderr}");
        assert!(stderr.contains(says), "{extra:?}: {stderr}");
        assert!(!stdout.contains("ran "), "{stdout}");
    };
    bad(&["--only", "4"], "shards are numbered 1 to 3");
    // A replay given inputs of its own: they must be what the plan was made from.
    let differing: [(&[&str], &str); 4] = [
        (&["--shards", "4"], "it was made for 3 shards, not 4"),
        (
            &["--", "sh", "-c", "true"],
            "it was made for the command \"sh -c for f in {tests}",
        ),
        (
            &["--runner", "pytest"],
            "it was made with --runner files, not pytest",
        ),
        (
            &["--runner", "files", "--files", "t/a.sh"],
            "its tests were listed with",
        ),
    ];
    for (given, says) in differing {
        bad(&[&["--only", "1"], given].concat(), says);
    }
    let (code, stdout, stderr) = replay(&[
        "--only", "3", "--shards", "3", "--runner", "files", "--files", "t/*.sh", "--", command[1],
        command[2], command[3],
    ]);
    assert_eq!(code, 0, "the same inputs replay: {stdout}\n{stderr}");
    let mut other = plan.clone();
    other["format"] = 1.into();
    std::fs::write(&plan_path, other.to_string()).unwrap();
    bad(&["--only", "1"], "another version of mvm-shard");
    std::fs::remove_file(&plan_path).unwrap();
    bad(&["--only", "1"], "cannot read it");
}

#[test]
fn tests_file_carries_a_list_too_long_for_a_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/x"), "").unwrap();
    let timings = state.path().join("timings.json");
    let runs_env = format!("RUNS_DIR={}", state.path().display());
    // 20,000 ids of 37 bytes: 10,000 a shard (380 KB), over Linux's 128 KiB bound on one argument.
    let listing = "seq -f 'tests/test_module.py::test_case_%05g' 1 20000";
    let run = |command: &str| {
        cli(
            &dir.path().join("sub"),
            &[
                "run",
                "--local",
                "--shards",
                "2",
                "--source",
                "..",
                "--runner",
                "files",
                "--list-local",
                "--list-command",
                listing,
                "--timings",
                timings.to_str().unwrap(),
                "--env",
                &runs_env,
                "--",
                "sh",
                "-c",
                command,
            ],
        )
    };
    let (code, stdout, stderr) = run("cp {tests_file} \"$RUNS_DIR/ids-{index}\"");
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stderr.contains("20000 tests listed"), "{stderr}");
    let mut ids = Vec::new();
    for index in 1..=2 {
        let part = std::fs::read_to_string(state.path().join(format!("ids-{index}"))).unwrap();
        let lines: Vec<String> = part.lines().map(str::to_string).collect();
        assert_eq!(lines.len(), 10_000, "shard {index}");
        ids.extend(lines);
    }
    ids.sort();
    let want: Vec<String> = (1..=20_000)
        .map(|i| format!("tests/test_module.py::test_case_{i:05}"))
        .collect();
    assert_eq!(ids, want, "every id exactly once, one a line");
    // The same list on the command line does not fit, and the error says what does.
    let (code, stdout, stderr) = run("echo {tests} | wc -w");
    assert_eq!(code, 2, "{stdout}\n{stderr}");
    assert!(stderr.contains("{tests_file}"), "{stderr}");
}

#[test]
fn a_rerun_whose_result_never_arrives_is_not_a_pass() {
    let dir = tempfile::tempdir().unwrap();
    let runs = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x"), "").unwrap();
    let runs_env = format!("RUNS_DIR={}", runs.path().display());
    // The first attempt fails; the rerun kills its own agent (the shell's
    // parent), so its final result never arrives.
    let (code, stdout, stderr) = cli(
        dir.path(),
        &[
            "run",
            "--local",
            "--source",
            ".",
            "--timeout",
            "60s",
            "--retries",
            "1",
            "--env",
            &runs_env,
            "--",
            "sh",
            "-c",
            "if test -e \"$RUNS_DIR/m\"; then kill -9 $PPID; sleep 30; fi; touch \"$RUNS_DIR/m\"; exit 1",
        ],
    );
    assert_eq!(code, 3, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("rerun 1 of 1: the whole shard")
            && stdout.contains("1 shard: 0 passed, 0 failed, 0 timed out, 1 could not run"),
        "{stdout}"
    );
    assert!(!stdout.contains("flaky"), "{stdout}");
}

#[test]
fn every_run_records_its_plan_in_the_git_directory_and_fail_fast_skips_reruns() {
    let dir = tempfile::tempdir().unwrap();
    let runs = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x"), "").unwrap();
    common::git(dir.path(), &["init", "-q"]);
    let runs_env = format!("RUNS_DIR={}", runs.path().display());
    // Shard 1 fails; --fail-fast stops there, before any rerun.
    let (code, stdout, stderr) = cli(
        dir.path(),
        &[
            "run",
            "--local",
            "--shards",
            "2",
            "--max-parallel",
            "1",
            "--retries",
            "2",
            "--fail-fast",
            "--env",
            &runs_env,
            "--",
            "sh",
            "-c",
            "echo {index} >> \"$RUNS_DIR/runs\"; test {index} = 2",
        ],
    );
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(!stdout.contains("rerun"), "{stdout}");
    assert!(
        stderr.contains("so the rest stopped: 1 shard never started or was interrupted"),
        "{stderr}"
    );
    let log = std::fs::read_to_string(runs.path().join("runs")).unwrap();
    assert_eq!(log, "1\n", "shard 1 once, no rerun, shard 2 never");

    let plan = dir.path().join(".git/mvm-shard/plan.json");
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    assert_eq!(recorded["shards"], 2, "{recorded}");
    assert_eq!(
        recorded["command"][2],
        "echo {index} >> \"$RUNS_DIR/runs\"; test {index} = 2"
    );
    // Replayed: shard 2's command, as the plan has it.
    let (code, stdout, stderr) = cli(
        dir.path(),
        &[
            "run",
            "--local",
            "--replay-plan",
            plan.to_str().unwrap(),
            "--only",
            "2",
            "--env",
            &runs_env,
        ],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let log = std::fs::read_to_string(runs.path().join("runs")).unwrap();
    assert_eq!(log, "1\n2\n");
}

#[test]
fn a_replayed_pytest_shard_reruns_only_its_failed_tests() {
    let dir = tempfile::tempdir().unwrap();
    let runs = tempfile::tempdir().unwrap();
    flaky_suite(dir.path());
    let report = runs.path().join("junit.xml");
    let timings = runs.path().join("timings.json");
    let runs_env = format!("RUNS_DIR={}", runs.path().display());
    let args = pytest_run(&timings, &report, &["--shards", "2", "--env", &runs_env]);
    let (code, stdout, stderr) = cli(dir.path(), &args);
    assert_eq!(
        code, 1,
        "test_flaky fails the first time: {stdout}\n{stderr}"
    );
    let plan_path = runs.path().join("junit.plan.json");
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan_path).unwrap()).unwrap();
    let with_flaky = (0..2)
        .find(|i| {
            plan["shares"][i]["tests"]
                .to_string()
                .contains("::test_flaky\"")
        })
        .unwrap();
    let shard = (with_flaky + 1).to_string();
    let count = plan["shares"][with_flaky]["tests"]
        .as_array()
        .unwrap()
        .len();
    // Flaky again: the replay's first attempt fails it, its rerun passes.
    std::fs::remove_file(runs.path().join("flaky-failed-once")).unwrap();
    std::fs::remove_file(runs.path().join("runs")).unwrap();
    let plan_arg = plan_path.to_str().unwrap();
    let (code, stdout, stderr) = cli(
        dir.path(),
        &[
            "run",
            "--local",
            "--source",
            ".",
            "--replay-plan",
            plan_arg,
            "--only",
            &shard,
            "--retries",
            "1",
            "--env",
            &runs_env,
        ],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("rerun 1 of 1: 1 failed test"), "{stdout}");
    let log = std::fs::read_to_string(runs.path().join("runs")).unwrap();
    assert_eq!(
        log.lines().count(),
        count + 1,
        "the shard's tests, then test_flaky: {log}"
    );
    assert_eq!(log.lines().filter(|l| *l == "flaky").count(), 2, "{log}");
}

#[test]
fn in_github_actions_a_flaky_test_is_a_warning_at_its_first_failure_and_in_the_job_summary() {
    let dir = tempfile::tempdir().unwrap();
    let runs = tempfile::tempdir().unwrap();
    flaky_suite(dir.path());
    let summary = runs.path().join("summary.md");
    let out = std::process::Command::new(common::binary())
        .args([
            "run", "--local", "--shards", "2", "--source", ".", "--runner",
        ])
        .args(["pytest", "--retries", "1", "--timings"])
        .arg(runs.path().join("timings.json"))
        .arg("--report")
        .arg(runs.path().join("junit.xml"))
        .arg("--env")
        .arg(format!("RUNS_DIR={}", runs.path().display()))
        .args([
            "--",
            "python3",
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
        ])
        .arg("{tests}")
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_STEP_SUMMARY", &summary)
        .env_remove("GITHUB_OUTPUT")
        .env_remove("GITHUB_RUN_ID")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("::warning title=Flaky%3A test_flaky%3A%3Atest_flaky (shard ")
            && stdout.contains(",file=test_flaky.py,line=11::failed, then passed on a rerun"),
        "{stdout}"
    );
    assert!(
        stdout.contains(": rerun 1 of 1: 1 failed test in a new fresh environment"),
        "{stdout}"
    );
    let md = std::fs::read_to_string(&summary).unwrap();
    assert!(
        md.contains("Flaky: failed, then passed on a rerun (1)")
            && md.contains(
                "`test_flaky::test_flaky` `test_flaky.py:11`: AssertionError: fails the first time"
            ),
        "{md}"
    );
    assert!(md.contains("| Expected |"), "{md}");
}

#[test]
fn a_single_test_is_counted_in_the_singular() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("t")).unwrap();
    std::fs::write(dir.path().join("t/only.sh"), "echo ran only\n").unwrap();
    let timings = state.path().join("timings.json");
    let report = state.path().join("junit.xml");
    let args = [
        "run",
        "--local",
        "--source",
        ".",
        "--runner",
        "files",
        "--files",
        "t/*.sh",
        "--timings",
        timings.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "for f in {tests}; do sh \"$f\"; done",
    ];
    let (code, stdout, stderr) = cli(dir.path(), &args);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stderr.contains("mvm-shard: 1 test listed, 0 with learned durations"),
        "{stderr}"
    );
    assert!(
        stderr.contains("mvm-shard: shard 1/1: 1 test, expected"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(" 1 tests") && !stdout.contains(" 1 tests"),
        "{stderr}\n{stdout}"
    );
}

#[test]
fn a_masked_value_in_the_command_is_not_recorded_and_its_replay_asks_for_the_command() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x"), "").unwrap();
    common::git(dir.path(), &["init", "-q"]);
    let secret = "tok-3f9a7c1e";
    let env = format!("TOKEN={secret}");
    let script = format!("test \"$TOKEN\" = {secret} && echo token-ok");
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--local", "--env", &env, "--mask", "TOKEN"];
        args.extend(extra);
        cli(dir.path(), &args)
    };
    let (code, stdout, stderr) = run(&["--", "sh", "-c", &script]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("token-ok"), "{stdout}");
    assert!(!stderr.contains(secret), "{stderr}");

    let plan = dir.path().join(".git/mvm-shard/plan.json");
    let text = std::fs::read_to_string(&plan).unwrap();
    assert!(!text.contains(secret), "{text}");
    let recorded: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        recorded["command"][2],
        "test \"$TOKEN\" = *** && echo token-ok"
    );

    let plan_arg = plan.to_str().unwrap();
    let (code, stdout, stderr) = run(&["--replay-plan", plan_arg]);
    assert_eq!(code, 2, "{stdout}\n{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("give the command again after --"),
        "{stderr}"
    );
    let (code, stdout, stderr) = run(&["--replay-plan", plan_arg, "--", "sh", "-c", &script]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("token-ok"), "{stdout}");
}

#[test]
#[expect(
    clippy::zombie_processes,
    reason = "reaped by wait4_within, which also reports its peak memory"
)]
fn a_listing_that_never_stops_printing_is_cut_off_with_the_invoker_small() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x"), "").unwrap();
    for local in [false, true] {
        let err = tempfile::NamedTempFile::new().unwrap();
        let mut run = std::process::Command::new(common::binary());
        run.args(["run", "--local", "--source", ".", "--runner", "pytest"])
            .args(["--list-command", "yes tests/test_garbage.py::test_x"])
            .args(["--timings", "t.json"])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(err.reopen().unwrap());
        if local {
            run.arg("--list-local");
        }
        let child = run.args(["--", "pytest", "{tests}"]).spawn().unwrap();
        let (code, usage) = common::wait4_within(&child, std::time::Duration::from_secs(120));
        let stderr = std::fs::read_to_string(err.path()).unwrap();
        assert_eq!(code, 2, "{}", &stderr[..stderr.len().min(2000)]);
        assert!(
            stderr.contains("printed more than 64 MiB"),
            "{stderr:.2000}"
        );
        // ru_maxrss is in KiB: what the listing printed was not all kept.
        let peak_mib = usage.ru_maxrss / 1024;
        assert!(peak_mib < 400, "the invoker grew to {peak_mib} MiB");
    }
}

/// The report and plan a run writes where it starts are its outputs, not
/// the project's source: the next run does not ship (or list) them.
#[test]
fn a_runs_own_outputs_are_not_shipped_with_the_next_runs_source() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.sh"), "echo ran a.sh\n").unwrap();
    let run = || {
        cli(
            dir.path(),
            &[
                "run",
                "--local",
                "--source",
                ".",
                "--runner",
                "files",
                "--files",
                "*",
                "--",
                "sh",
                "-c",
                "for f in {tests}; do echo ran \"$f\"; done",
            ],
        )
    };
    let (code, stdout, stderr) = run();
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        dir.path().join("mvm-shard-junit.plan.json").is_file(),
        "the plan is recorded next to the default report: {stderr}"
    );
    std::fs::write(dir.path().join("mvm-shard-junit.xml"), "<testsuites/>").unwrap();
    let (code, stdout, stderr) = run();
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stderr.contains("1 test listed"), "{stderr}");
    assert!(!stdout.contains("mvm-shard-junit"), "{stdout}");
}
