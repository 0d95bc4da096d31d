//! What `--runner` takes from a listing, and what it does with the learned
//! timings file: strict listings (a line that is not an id, an id that
//! cannot travel, output only on stderr: exit 2, said), pytest ids of every
//! shape, a versioned timings file, and runs sharing it.
//!
//! Needs pytest (the venv `.ci/run` makes).

mod common;

use common::Ran;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The most one `mvm-shard run` here may take.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// `mvm-shard ARGS` in `dir`, killed after [`RUN_LIMIT`].
async fn mvm(dir: &Path, args: &[&str]) -> Ran {
    let mut cmd = tokio::process::Command::new(common::binary());
    cmd.args(args).current_dir(dir);
    let out = common::output_within(cmd, RUN_LIMIT, &format!("mvm-shard {args:?}")).await;
    Ran::from(out)
}

/// `run --local --source . --runner files --files 't/*.sh'` learning into
/// `timings`, with `extra` options, each shard running its files with sh.
async fn run_files(dir: &Path, timings: &Path, extra: &[&str]) -> Ran {
    let mut args = vec![
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
    ];
    args.extend(extra);
    args.extend([
        "--",
        "sh",
        "-c",
        "for f in {tests}; do sh \"$f\" || exit 1; done",
    ]);
    mvm(dir, &args).await
}

fn write(dir: &Path, files: &[(&str, &str)]) {
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

/// The learned seconds per test id.
fn learned(timings: &Path) -> BTreeMap<String, f64> {
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(timings).unwrap()).unwrap();
    value["tests"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
        .collect()
}

/// Ids with spaces, quotes, non-ASCII and `::` in their parameters, in a
/// project whose `addopts` add a `-q` (with the listing's own, pytest would
/// print counts per file instead of ids): each listed, run once, learned.
#[tokio::test(flavor = "multi_thread")]
async fn pytest_ids_of_every_shape_are_listed_run_once_and_learned() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ("pytest.ini", "[pytest]\naddopts = -q\n"),
            (
                "test_shapes.py",
                "import os, pytest\n\
                 @pytest.mark.parametrize('x', ['a b', '\u{e9}', \"q'uote\", 'dq\"', 'c::d'])\n\
                 def test_p(x):\n    open(os.environ['RAN_LOG'], 'a', encoding='utf-8').write(x + '\\n')\n\
                 class TestK:\n    def test_m(self):\n        open(os.environ['RAN_LOG'], 'a', encoding='utf-8').write('m\\n')\n",
            ),
        ],
    );
    let timings = state.path().join("timings.json");
    let ran_log = state.path().join("ran.log");
    let ran = mvm(
        dir.path(),
        &[
            "run",
            "--local",
            "--source",
            ".",
            "--shards",
            "3",
            "--runner",
            "pytest",
            "--timings",
            timings.to_str().unwrap(),
            &format!("--env=RAN_LOG={}", ran_log.display()),
            "--",
            "python3",
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "{tests}",
        ],
    )
    .await;
    assert_eq!(ran.code, 0, "{ran}");
    assert!(ran.stderr.contains("6 tests listed"), "{ran}");
    let mut lines: Vec<String> = std::fs::read_to_string(&ran_log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        ["a b", "c::d", "dq\"", "m", "q'uote", "\u{e9}"],
        "each test once: {ran}"
    );
    assert_eq!(
        learned(&timings).keys().collect::<Vec<_>>(),
        [
            "test_shapes.py::TestK::test_m",
            "test_shapes.py::test_p[\\xe9]",
            "test_shapes.py::test_p[a b]",
            "test_shapes.py::test_p[c::d]",
            "test_shapes.py::test_p[dq\"]",
            "test_shapes.py::test_p[q'uote]",
        ],
        "each test's own time learned: {ran}"
    );
}

/// A stray line in a listing is not taken for a test: exit 2, the line and
/// the command shown, nothing run; the same where the listing runs and here.
#[tokio::test(flavor = "multi_thread")]
async fn a_listing_line_that_is_not_a_test_id_is_exit_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &[("x", "")]);
    let listing = "echo hello from conftest; echo t.py::test_a; echo; echo 1 test collected";
    for local in [false, true] {
        let mut args = vec![
            "run",
            "--local",
            "--source",
            ".",
            "--runner",
            "pytest",
            "--list-command",
            listing,
            "--timings",
            "t.json",
        ];
        if local {
            args.push("--list-local");
        }
        args.extend(["--", "sh", "-c", "echo RAN {tests}"]);
        let ran = mvm(dir.path(), &args).await;
        assert_eq!(ran.code, 2, "{ran}");
        assert!(
            ran.stderr.contains(&format!("`{listing}`"))
                && ran
                    .stderr
                    .contains("not test ids:\n  \"hello from conftest\"")
                && ran.stderr.contains("pytest node ids"),
            "{ran}"
        );
        assert!(!ran.stderr.contains("\"t.py::test_a\""), "{ran}");
        assert!(!ran.stdout.contains("RAN"), "{ran}");
    }
}

/// A listing that succeeds but prints only on stderr (a wrapper that
/// swallowed its output, a missing tool whose shell kept going) says so.
#[tokio::test(flavor = "multi_thread")]
async fn a_listing_that_prints_only_on_stderr_is_exit_2_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &[("x", "")]);
    let ran = mvm(
        dir.path(),
        &[
            "run",
            "--local",
            "--source",
            ".",
            "--runner",
            "go",
            "--list-command",
            "gotest list ./... 2>&1 >/dev/null | sed 's/^/wrapped: /' >&2; true",
            "--timings",
            "t.json",
            "--",
            "go",
            "test",
            "{tests}",
        ],
    )
    .await;
    assert_eq!(ran.code, 2, "{ran}");
    assert!(
        ran.stderr
            .contains("printed nothing on its standard output, where the test ids are read from")
            && ran.stderr.contains("wrapped: "),
        "{ran}"
    );
}

/// A file whose name holds a line break cannot be one line of
/// `{tests_file}`: the run refuses it, naming it with escapes, before any
/// shard runs; it is never split into two ids nor dropped.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_name_with_a_line_break_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[
            ("t/a b.sh", "echo RAN a\n"),
            ("t/new\nline.sh", "echo RAN new\n"),
        ],
    );
    let ran = run_files(dir.path(), &state.path().join("timings.json"), &[]).await;
    assert_eq!(ran.code, 2, "{ran}");
    assert!(
        ran.stderr.contains("names the test \"t/new\\nline.sh\"")
            && ran.stderr.contains("line break"),
        "{ran}"
    );
    assert!(!ran.stdout.contains("RAN"), "{ran}");
    // Without it, the name with a space is one file.
    std::fs::remove_file(dir.path().join("t/new\nline.sh")).unwrap();
    let ran = run_files(dir.path(), &state.path().join("timings.json"), &[]).await;
    assert_eq!(ran.code, 0, "{ran}");
    assert_eq!(ran.stdout.matches("RAN a\n").count(), 1, "{ran}");
}

/// The timings file says its version. One written by a newer mvm-shard is
/// left byte for byte as it is and the run plans without it, saying so
/// once; one that does not parse is kept aside, said once, and the run
/// learns afresh.
#[tokio::test(flavor = "multi_thread")]
async fn a_newer_or_broken_timings_file_is_kept_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[("t/a.sh", "echo RAN a\n"), ("t/b.sh", "echo RAN b\n")],
    );
    let timings = state.path().join("timings.json");

    let newer = "{\"version\": 2, \"tests\": {\"t/a.sh\": {\"p50\": 9}}}";
    std::fs::write(&timings, newer).unwrap();
    let ran = run_files(dir.path(), &timings, &["--shards", "2"]).await;
    assert_eq!(ran.code, 0, "{ran}");
    assert_eq!(
        ran.stderr.matches("newer than this mvm-shard's").count(),
        1,
        "{ran}"
    );
    assert!(
        ran.stderr.contains("2 tests listed, 0 with learned"),
        "{ran}"
    );
    assert_eq!(
        std::fs::read_to_string(&timings).unwrap(),
        newer,
        "untouched"
    );

    let broken = "{\"tests\": {\"t/a.sh\": 1.0,";
    std::fs::write(&timings, broken).unwrap();
    let ran = run_files(dir.path(), &timings, &["--shards", "2"]).await;
    assert_eq!(ran.code, 0, "{ran}");
    assert_eq!(ran.stderr.matches("is not valid").count(), 1, "{ran}");
    let aside: Vec<_> = std::fs::read_dir(state.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("timings.json.unreadable-"))
        .collect();
    assert_eq!(aside.len(), 1, "{ran}");
    assert_eq!(std::fs::read_to_string(&aside[0]).unwrap(), broken);
    assert!(
        ran.stderr.contains(&aside[0].display().to_string()),
        "{ran}"
    );
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&timings).unwrap()).unwrap();
    assert_eq!(saved["version"], 1, "{saved}");
    assert_eq!(learned(&timings).len(), 2, "learned afresh: {ran}");
}

/// Two worktrees of one repository list other tests (another branch): each
/// learns into, and records its plan in, its own git directory, so neither
/// run drops the tests only the other lists.
#[tokio::test(flavor = "multi_thread")]
async fn each_worktree_learns_its_own_tests() {
    let repo = tempfile::tempdir().unwrap();
    let main = repo.path().join("main");
    let other = repo.path().join("other");
    write(
        &main,
        &[("t/a.sh", "echo RAN a\n"), ("t/b.sh", "echo RAN b\n")],
    );
    let commit = common::GIT_COMMIT;
    common::git(&main, &["init", "-q"]);
    common::git(&main, &["add", "."]);
    common::git(&main, &[&commit[..], &["-m", "a b"]].concat());
    let other_arg = other.to_str().unwrap();
    common::git(&main, &["worktree", "add", "-q", "-b", "other", other_arg]);
    common::git(&other, &["mv", "t/b.sh", "t/c.sh"]);
    common::git(&other, &[&commit[..], &["-m", "a c"]].concat());

    let run_in = |dir: PathBuf| async move {
        let args = [
            "run", "--local", "--source", ".", "--runner", "files", "--files", "t/*.sh",
        ];
        let command = [
            "--",
            "sh",
            "-c",
            "for f in {tests}; do sh \"$f\" || exit 1; done",
        ];
        let ran = mvm(&dir, &[&args[..], &command[..]].concat()).await;
        assert_eq!(ran.code, 0, "{ran}");
    };
    for dir in [&main, &other, &main, &other] {
        run_in(dir.clone()).await;
    }
    let keys = |path: PathBuf| learned(&path).into_keys().collect::<Vec<_>>();
    let own = main.join(".git/mvm-shard");
    let others = main.join(".git/worktrees/other/mvm-shard");
    assert_eq!(keys(own.join("timings.json")), ["t/a.sh", "t/b.sh"]);
    assert_eq!(keys(others.join("timings.json")), ["t/a.sh", "t/c.sh"]);
    for (dir, test) in [(&own, "t/b.sh"), (&others, "t/c.sh")] {
        let plan = std::fs::read_to_string(dir.join("plan.json")).unwrap();
        assert!(plan.contains(test), "{plan}");
    }
}

/// `merge-timings` (the action's matrix jobs) given a file of a newer
/// version, as this job's or the other's: both files left byte for byte as
/// they are, said once, exit 0 (as `run` leaves such a file).
#[tokio::test(flavor = "multi_thread")]
async fn merge_timings_leaves_a_newer_versions_file_as_it_is() {
    let state = tempfile::tempdir().unwrap();
    let newer_text = "{\"version\": 2, \"tests\": {\"t/a.sh\": {\"p50\": 9}}}";
    let ours_text = "{\"version\": 1, \"tests\": {\"t/b.sh\": 1.0}}";
    let (newer, ours) = (
        state.path().join("newer.json"),
        state.path().join("ours.json"),
    );
    for (into, from) in [(&newer, &ours), (&ours, &newer)] {
        std::fs::write(&newer, newer_text).unwrap();
        std::fs::write(&ours, ours_text).unwrap();
        let (into_arg, from_arg) = (into.to_str().unwrap(), from.to_str().unwrap());
        let ran = mvm(state.path(), &["merge-timings", into_arg, from_arg]).await;
        assert_eq!(ran.code, 0, "{ran}");
        assert_eq!(
            ran.stderr.matches("newer than this mvm-shard's").count(),
            1,
            "{ran}"
        );
        assert!(ran.stderr.contains("nothing merged"), "{ran}");
        assert_eq!(std::fs::read_to_string(&newer).unwrap(), newer_text);
        assert_eq!(std::fs::read_to_string(&ours).unwrap(), ours_text);
    }
}

/// Two runs on one laptop share the default timings file; each runs one
/// shard of two (`--only`), and their shards meet (a FIFO: each waits for
/// the other) so that both read the file before either saves it. Both
/// tests' learning is in the file afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn two_runs_ending_together_both_keep_their_learning() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let fifo = state.path().join("meet");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    write(
        dir.path(),
        &[
            ("t/a.sh", "read x < \"$MEET\"; echo RAN a\n"),
            ("t/b.sh", "echo go > \"$MEET\"; echo RAN b\n"),
        ],
    );
    let timings = state.path().join("timings.json");
    let env = format!("--env=MEET={}", fifo.display());
    let (first, second) = (
        ["--shards", "2", "--only", "1", &env],
        ["--shards", "2", "--only", "2", &env],
    );
    let (one, two) = tokio::join!(
        run_files(dir.path(), &timings, &first),
        run_files(dir.path(), &timings, &second),
    );
    assert_eq!(one.code, 0, "{one}");
    assert_eq!(two.code, 0, "{two}");
    assert_eq!(
        learned(&timings).keys().collect::<Vec<_>>(),
        ["t/a.sh", "t/b.sh"],
        "both runs' learning kept:\n{one}\n{two}"
    );
}

/// A command that runs tests beyond its `{tests}` (here one named on its
/// command line, so in every shard) has them reported by several shards:
/// said once, naming them, so that "each test once" is not taken on trust.
#[tokio::test(flavor = "multi_thread")]
async fn a_test_reported_by_several_shards_is_said() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[(
            "test_x.py",
            "def test_common(): pass\n\
             def test_a(): pass\n\
             def test_b(): pass\n\
             def test_c(): pass\n",
        )],
    );
    let timings = state.path().join("timings.json");
    let run = |extra: &'static str| {
        let timings = timings.clone();
        let dir = dir.path().to_path_buf();
        async move {
            let mut args = vec![
                "run",
                "--local",
                "--source",
                ".",
                "--shards",
                "3",
                "--runner",
                "pytest",
                "--timings",
                timings.to_str().unwrap(),
                "--",
                "python3",
                "-m",
                "pytest",
                "-p",
                "no:cacheprovider",
                "{tests}",
            ];
            args.extend(extra.split_whitespace());
            mvm(&dir, &args).await
        }
    };
    let ran = run("test_x.py::test_common").await;
    assert_eq!(ran.code, 0, "{ran}");
    let said: Vec<&str> = ran
        .stderr
        .lines()
        .filter(|l| l.contains("reported by more than one shard"))
        .collect();
    assert_eq!(said.len(), 1, "{ran}");
    assert!(
        said[0].contains("test_x.py::test_common (shards ") && !said[0].contains("test_a"),
        "{ran}"
    );
    // Each test in its own shard only: nothing said.
    let ran = run("").await;
    assert_eq!(ran.code, 0, "{ran}");
    assert!(!ran.stderr.contains("more than one shard"), "{ran}");
}

/// A share with no tests (fewer tests than shards), run on its own with
/// `--only`: nothing runs, the run passes, and it says why.
#[tokio::test(flavor = "multi_thread")]
async fn an_empty_share_run_alone_says_it_has_no_tests() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[("t/a.sh", "echo ran a\n"), ("t/b.sh", "echo ran b\n")],
    );
    let timings = state.path().join("timings.json");
    let plan = state.path().join("plan.json");
    let plan_arg = plan.to_str().unwrap();
    let planned = run_files(
        dir.path(),
        &timings,
        &["--shards", "3", "--plan-only", plan_arg],
    )
    .await;
    assert_eq!(planned.code, 0, "{planned}");
    let ran = mvm(
        dir.path(),
        &[
            "run",
            "--local",
            "--source",
            ".",
            "--replay-plan",
            plan_arg,
            "--only",
            "3",
        ],
    )
    .await;
    assert_eq!(ran.code, 0, "{ran}");
    assert!(!ran.stdout.contains("ran "), "{ran}");
    assert!(
        ran.stderr
            .contains("shard 3/3 has no tests (fewer tests than shards): nothing to run"),
        "{ran}"
    );
}

/// A listing that finds no test stops the run (exit 2) before any shard
/// runs, saying so, and what it printed (here: nothing, said in words).
#[tokio::test(flavor = "multi_thread")]
async fn a_listing_that_finds_nothing_is_exit_2_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    write(dir.path(), &[("t/readme.txt", "not a test\n")]);
    let ran = run_files(dir.path(), &state.path().join("timings.json"), &[]).await;
    assert_eq!(ran.code, 2, "{ran}");
    assert!(!ran.stdout.contains("passed"), "nothing ran: {ran}");
    assert!(
        ran.stderr.contains("found none; it printed nothing"),
        "{ran}"
    );
}

/// A plan made without `--runner` has no test durations to learn from:
/// replaying it with `--timings` says so (exit 2) rather than dropping the
/// option silently, and writes no timings file.
#[tokio::test(flavor = "multi_thread")]
async fn a_runner_less_plan_replayed_with_timings_is_refused_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    write(dir.path(), &[("t/a.sh", "echo ran a\n")]);
    let plan = state.path().join("plan.json");
    let plan_arg = plan.to_str().unwrap();
    let planned = mvm(
        dir.path(),
        &[
            "run",
            "--local",
            "--source",
            ".",
            "--shards",
            "2",
            "--plan-only",
            plan_arg,
            "--",
            "sh",
            "t/a.sh",
        ],
    )
    .await;
    assert_eq!(planned.code, 0, "{planned}");
    let timings = state.path().join("timings.json");
    let ran = mvm(
        dir.path(),
        &[
            "run",
            "--local",
            "--source",
            ".",
            "--replay-plan",
            plan_arg,
            "--only",
            "1",
            "--timings",
            timings.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(ran.code, 2, "{ran}");
    assert!(
        ran.stderr.contains("made without --runner") && ran.stderr.contains("--timings"),
        "{ran}"
    );
    assert!(!ran.stdout.contains("ran a"), "{ran}");
    assert!(!timings.exists());
}
