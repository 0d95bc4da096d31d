//! The command-line contract: output, summary and exit status of `mvm-shard run`.

mod common;

use std::process::Command;

use common::{binary, cli};

fn plain_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data.txt"), "payload\n").unwrap();
    dir
}

#[test]
fn four_local_shards_print_their_lines_and_exit_0() {
    let dir = plain_dir();
    let (code, stdout, stderr) = cli(
        dir.path(),
        &[
            "run",
            "--local",
            "--shards",
            "4",
            "--",
            "sh",
            "-c",
            "echo shard {index} of {count}",
        ],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    for i in 1..=4 {
        assert!(
            stdout.contains(&format!("[{i}/4] shard {i} of 4\n")),
            "{stdout}"
        );
    }
    assert!(stdout.contains("4 shards: 4 passed, 0 failed"), "{stdout}");
}

#[test]
fn one_failing_shard_exits_1_and_the_summary_names_it() {
    let dir = plain_dir();
    let (code, stdout, _) = cli(
        dir.path(),
        &[
            "run",
            "--local",
            "--shards",
            "4",
            "--",
            "sh",
            "-c",
            "test {index} -ne 3",
        ],
    );
    assert_eq!(code, 1, "{stdout}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("3/4 "))
        .expect("a row for shard 3");
    assert!(row.contains("FAILED"), "{row}");
    assert!(stdout.contains("(not passed: 3)"), "{stdout}");
}

#[test]
fn only_runs_the_chosen_shards() {
    let dir = plain_dir();
    let (code, stdout, _) = cli(
        dir.path(),
        &[
            "run",
            "--local",
            "--shards",
            "4",
            "--only",
            "2,4",
            "--",
            "echo",
            "ran {index}",
        ],
    );
    assert_eq!(code, 0);
    assert!(
        stdout.contains("[2/4] ran 2") && stdout.contains("[4/4] ran 4"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("ran 1") && !stdout.contains("ran 3"),
        "{stdout}"
    );
    assert!(stdout.contains("2 shards: 2 passed"), "{stdout}");
}

#[test]
fn bad_usage_exits_2_and_says_what_to_do() {
    let dir = plain_dir();
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--local", "--shards", "4"], "COMMAND"),
        (
            &["run", "--local", "--shards", "0", "--", "true"],
            "--shards must be between 1",
        ),
        (
            &[
                "run", "--local", "--shards", "4", "--only", "5", "--", "true",
            ],
            "numbered 1 to 4",
        ),
        (
            &["run", "--local", "--frobnicate", "--", "true"],
            "--frobnicate",
        ),
        (&["run", "--shards", "2", "--", "true"], "--local"),
        (
            &[
                "run",
                "--local",
                "--env",
                "MVM_SURELY_UNSET_VAR",
                "--",
                "true",
            ],
            "--env MVM_SURELY_UNSET_VAR=VALUE",
        ),
        (
            &["run", "--local", "--timeout", "soon", "--", "true"],
            "--timeout",
        ),
    ];
    for (args, hint) in cases {
        let (code, stdout, stderr) = cli(dir.path(), args);
        assert_eq!(code, 2, "{args:?}: {stdout}{stderr}");
        assert!(
            stderr.contains(hint),
            "{args:?} should mention {hint:?}: {stderr}"
        );
        assert!(stdout.is_empty(), "{args:?} ran something: {stdout}");
    }
}

#[test]
fn a_killed_agent_exits_3() {
    let dir = plain_dir();
    let (code, stdout, _) = cli(
        dir.path(),
        &[
            "run",
            "--local",
            "--",
            "sh",
            "-c",
            "echo started; kill -9 $PPID; sleep 3",
        ],
    );
    assert_eq!(code, 3, "{stdout}");
    assert!(stdout.contains("NOT RUN"), "{stdout}");
}

#[test]
fn the_default_source_is_the_git_working_tree_with_uncommitted_changes() {
    let repo = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| common::git(repo.path(), args);
    git(&["init", "-q"]);
    std::fs::write(repo.path().join(".gitignore"), "build/\n").unwrap();
    std::fs::write(repo.path().join("committed.txt"), "old\n").unwrap();
    git(&["add", "."]);
    git(&[
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.com",
        "commit",
        "-qm",
        "one",
    ]);
    std::fs::write(repo.path().join("committed.txt"), "edited, not committed\n").unwrap();
    std::fs::write(repo.path().join("new.txt"), "untracked\n").unwrap();
    std::fs::create_dir(repo.path().join("build")).unwrap();
    std::fs::write(repo.path().join("build/out"), "ignored\n").unwrap();
    std::fs::create_dir(repo.path().join("sub")).unwrap();
    std::fs::write(repo.path().join("sub/here.txt"), "in sub\n").unwrap();

    let (code, stdout, stderr) = cli(
        &repo.path().join("sub"),
        &[
            "run",
            "--local",
            "--",
            "sh",
            "-c",
            "cat here.txt ../committed.txt ../new.txt; test ! -e ../build && echo no-build",
        ],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    for expected in ["in sub", "edited, not committed", "untracked", "no-build"] {
        assert!(stdout.contains(expected), "missing {expected:?}: {stdout}");
    }
}

fn write_incompressible(path: &std::path::Path, len: usize) {
    let mut bytes = Vec::with_capacity(len);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while bytes.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, &bytes[..len]).unwrap();
}

#[test]
fn a_source_too_large_for_a_request_fails_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    write_incompressible(&dir.path().join("blob"), 8 * 1024 * 1024);
    // Nothing listens on the endpoint: the size check must come first.
    let (code, stdout, stderr) = cli(
        dir.path(),
        &[
            "run",
            "--function",
            "f",
            "--endpoint-url",
            "http://127.0.0.1:9",
            "--region",
            "us-east-1",
            "--",
            "true",
        ],
    );
    assert_eq!(code, 2, "{stdout}{stderr}");
    // Packing stops at the budget: the rest of the tree is never read.
    assert!(
        stderr.contains("is over 4.5 MiB compressed") && stderr.contains("--local"),
        "{stderr}"
    );
}

#[test]
fn a_local_run_ships_a_large_source_over_loopback() {
    let dir = tempfile::tempdir().unwrap();
    write_incompressible(&dir.path().join("blob"), 8 * 1024 * 1024);
    let (code, stdout, stderr) = cli(
        dir.path(),
        &[
            "run",
            "--local",
            "--shards",
            "2",
            "--",
            "sh",
            "-c",
            "wc -c < blob",
        ],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(stdout.matches("8388608").count(), 2, "{stdout}");
    assert!(
        stderr.contains("warning: the source is") && stderr.contains("refused on Lambda"),
        "{stderr}"
    );
}

#[test]
fn env_values_reach_every_shard() {
    let dir = plain_dir();
    let out = Command::new(binary())
        .args([
            "run",
            "--local",
            "--shards",
            "2",
            "--env",
            "FROM_HERE",
            "--env",
            "SET=v=1",
            "--",
        ])
        .args(["sh", "-c", "echo $FROM_HERE $SET"])
        .env("FROM_HERE", "forwarded")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout.matches("forwarded v=1").count(), 2, "{stdout}");
}

#[test]
fn run_against_a_separate_emulator_process_with_endpoint_url() {
    let (mut emulator, endpoint) = common::start_emulate();
    assert!(endpoint.starts_with("http://127.0.0.1:"), "{endpoint:?}");

    let dir = plain_dir();
    let out = Command::new(binary())
        .args([
            "run",
            "--function",
            "mvm-shard",
            "--endpoint-url",
            &endpoint,
            "--region",
            "us-east-1",
        ])
        .args(["--shards", "3", "--", "cat", "data.txt"])
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .current_dir(dir.path())
        .output()
        .unwrap();
    // SIGTERM: the emulator stops its environments before it exits.
    common::sigterm(&emulator);
    assert!(emulator.wait().unwrap().success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("] payload").count(), 3, "{stdout}");
}

#[test]
fn in_github_actions_logs_are_grouped_failures_annotated_and_outputs_written() {
    let dir = plain_dir();
    let gh = tempfile::tempdir().unwrap();
    let (summary, output) = (gh.path().join("summary.md"), gh.path().join("output"));
    let report = gh.path().join("merged.xml");
    let script = r#"mkdir -p reports
if [ {index} = 2 ]; then status='<failure message="expected 1, got 2">trace</failure>'; fi
printf '<testsuites><testsuite name="suite{index}"><testcase classname="pkg.mod" name="test_{index}" file="src/mod.py" line="1{index}">%s</testcase></testsuite></testsuites>' "$status" > reports/junit.xml
echo "token is $API_TOKEN"
test {index} = 1"#;
    let out = Command::new(binary())
        .args([
            "run",
            "--local",
            "--shards",
            "2",
            "--junit",
            "reports/*.xml",
            "--report",
        ])
        .arg(&report)
        .args([
            "--env",
            "API_TOKEN",
            "--mask",
            "API_TOKEN",
            "--env",
            "LOG_FORMAT=shard",
        ])
        .args(["--", "sh", "-c", script])
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_STEP_SUMMARY", &summary)
        .env("GITHUB_OUTPUT", &output)
        .env("API_TOKEN", "s3cr3t-value")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    // The secret is masked before anything could print it.
    let mask = stdout
        .find("::add-mask::s3cr3t-value")
        .expect("secret masked");
    assert!(mask < stdout.find("::group::").unwrap());
    // Only what was asked to be masked is.
    assert_eq!(stdout.matches("::add-mask::").count(), 1, "{stdout}");
    assert!(stdout.contains("::group::✅ shard 1/2 passed"), "{stdout}");
    assert!(stdout.contains("::group::❌ shard 2/2 FAILED"), "{stdout}");
    assert!(
        stdout.contains("::error title=pkg.mod%3A%3Atest_2 (shard 2/2),file=src/mod.py,line=12::expected 1, got 2"),
        "{stdout}"
    );
    let outputs = std::fs::read_to_string(&output).unwrap();
    assert!(
        outputs.contains("result=failed\npassed=1\nfailed=1\ntimed-out=0\ninfra-failed=0\n"),
        "{outputs}"
    );
    assert!(outputs.contains(&format!("report={}", report.display())));
    let md = std::fs::read_to_string(&summary).unwrap();
    assert!(
        md.contains("| 1/2 | ✅ passed |") && md.contains("| 1 | 0 | fresh |"),
        "{md}"
    );
    assert!(md.contains("`pkg.mod::test_2` `src/mod.py:12`"), "{md}");
    // The agents reported their environment: the emulator's 10,240 MB functions.
    assert!(md.contains("\nwall time "), "{md}");
    assert!(
        md.contains("cost: nothing (local emulator); on Lambda: ")
            && md.contains(" GB-s over 2 shards ≈ $"),
        "{md}"
    );
    let merged = std::fs::read_to_string(&report).unwrap();
    assert!(
        merged.contains("shard 1/2: suite1") && merged.contains("shard 2/2: suite2"),
        "{merged}"
    );
}

#[test]
fn help_shows_examples_and_exit_codes_and_hides_the_agent() {
    let out = Command::new(common::binary())
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Examples:") && text.contains("Exit status:"),
        "{text}"
    );
    assert!(text.contains("  3  a shard could not run"), "{text}");
    assert!(
        text.contains("emulate") && !text.contains("\n  agent "),
        "{text}"
    );
    let run = Command::new(common::binary())
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&run.stdout).contains("Exit status:"));
    let agent = Command::new(common::binary())
        .args(["agent", "--help"])
        .output()
        .unwrap();
    assert!(agent.status.success());
    assert!(String::from_utf8_lossy(&agent.stdout).contains("--microvm"));
}

#[test]
fn a_command_that_does_not_exist_is_a_failed_shard_with_the_shells_127() {
    let dir = plain_dir();
    let (code, stdout, stderr) = cli(dir.path(), &["run", "--local", "--", "/no/such/prog"]);
    assert_eq!(
        code, 1,
        "the user's test failed to start\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("[1/1] mvm-shard: /no/such/prog: command not found (PATH="),
        "{stdout}"
    );
    assert!(
        stdout.contains("command `/no/such/prog` was not found in this shard"),
        "{stdout}"
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("1/1 "))
        .expect("a summary row");
    assert!(row.contains("FAILED") && row.contains("127"), "{row}");
}

#[test]
fn masking_a_variable_that_is_not_passed_is_a_usage_error() {
    let dir = plain_dir();
    let out = Command::new(binary())
        .args(["run", "--local", "--mask", "API_TOKEN", "--", "true"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "--mask API_TOKEN: API_TOKEN is not passed to the shards; add --env API_TOKEN"
        ),
        "{stderr}"
    );
}

/// `mvm-shard run ARGS` on a pseudo-terminal (util-linux `script`), with `env`.
fn on_a_terminal(dir: &std::path::Path, args: &str, env: &[(&str, &str)]) -> String {
    let command = format!("exec '{}' {args}", binary());
    let mut script = Command::new("script");
    script
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .env("TERM", "xterm-256color")
        .env_remove("NO_COLOR")
        .env_remove("CLICOLOR_FORCE")
        .env_remove("CLICOLOR")
        .current_dir(dir);
    for (name, value) in env {
        script.env(name, value);
    }
    let out = script.output().expect("util-linux script runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const GREEN: &str = "\u{1b}[32mpassed";
const RED: &str = "\u{1b}[1m\u{1b}[31mFAILED";

#[test]
fn statuses_are_coloured_on_a_terminal_and_plain_on_a_pipe() {
    let dir = plain_dir();
    let args =
        |extra: &str| format!("run --local --shards 2 {extra} -- sh -c 'test {{index}} = 1'");
    let tty = on_a_terminal(dir.path(), &args(""), &[]);
    assert!(tty.contains(GREEN) && tty.contains(RED), "{tty:?}");

    let no_color = on_a_terminal(dir.path(), &args(""), &[("NO_COLOR", "1")]);
    assert!(no_color.contains("FAILED"), "{no_color:?}");
    assert!(
        !no_color.contains(GREEN) && !no_color.contains(RED),
        "{no_color:?}"
    );
    let forced = on_a_terminal(
        dir.path(),
        &args("--color never"),
        &[("CLICOLOR_FORCE", "1")],
    );
    assert!(!forced.contains(RED), "--color never wins: {forced:?}");

    let pipe = |extra: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(binary());
        cmd.args(["run", "--local", "--shards", "2"])
            .args(extra)
            .args(["--", "sh", "-c", "test {index} = 1"])
            .env_remove("NO_COLOR")
            .env_remove("CLICOLOR_FORCE")
            .current_dir(dir.path());
        for (name, value) in env {
            cmd.env(name, value);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let plain = pipe(&[], &[]);
    assert!(
        plain.contains("FAILED") && !plain.contains('\u{1b}'),
        "{plain:?}"
    );
    assert!(pipe(&[], &[("CLICOLOR_FORCE", "1")]).contains(RED));
    assert!(pipe(&["--color", "always"], &[]).contains(RED));
}

#[test]
fn the_progress_line_counts_shards_in_the_singular_and_the_plural() {
    let dir = plain_dir();
    let one = on_a_terminal(dir.path(), "run --local --shards 1 -- sleep 1", &[]);
    assert!(one.contains("/1 shard done"), "{one:?}");
    assert!(!one.contains("shards done"), "{one:?}");
    let two = on_a_terminal(dir.path(), "run --local --shards 2 -- sleep 1", &[]);
    assert!(two.contains("/2 shards done"), "{two:?}");
}

#[test]
fn output_failed_hides_passing_shards_and_shows_failures_whole() {
    let dir = plain_dir();
    let (code, stdout, stderr) = cli(
        dir.path(),
        &[
            "run",
            "--local",
            "--shards",
            "3",
            "--output",
            "failed",
            "--",
            "sh",
            "-c",
            "echo line of {index}; test {index} != 2",
        ],
    );
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        !stdout.contains("line of 1") && !stdout.contains("line of 3"),
        "{stdout}"
    );
    // Shown when it ended, and once more, marked as a repeat, with the failures at the end.
    assert_eq!(stdout.matches("[2/3] line of 2").count(), 1, "{stdout}");
    assert!(
        stdout.contains("──── [2/3] FAILED (exited with code 1) ────\n  │ line of 2\n"),
        "{stdout}"
    );
    assert!(stdout.contains("3 shards: 2 passed, 1 failed"), "{stdout}");
}

/// The emulator folders (`mvm-shard-emulator-*`) in `tmp`, by name.
fn emulator_folders(tmp: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("mvm-shard-emulator-"))
        .collect();
    names.sort();
    names
}

/// A local run killed outright (SIGKILL) cannot remove its emulator folder;
/// the next run does, and leaves a folder that names no owner (not one of
/// ours) where it is.
#[test]
fn the_folder_of_a_run_killed_outright_goes_with_the_next_run() {
    use std::io::BufRead;
    let dir = plain_dir();
    let tmp = tempfile::tempdir().unwrap();
    let foreign = tmp.path().join("mvm-shard-emulator-foreign");
    std::fs::create_dir(&foreign).unwrap();
    let mut killed = Command::new(binary())
        .args([
            "run",
            "--local",
            "--",
            "sh",
            "-c",
            "echo started; exec sleep 2",
        ])
        .current_dir(dir.path())
        .env("TMPDIR", tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = killed.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let started = std::io::BufReader::new(stdout)
            .lines()
            .any(|l| l.is_ok_and(|l| l.ends_with("] started")));
        let _ = tx.send(started);
    });
    let started = rx.recv_timeout(std::time::Duration::from_secs(60));
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert_eq!(started, Ok(true), "the shard started");
    let left = emulator_folders(tmp.path());
    assert_eq!(left.len(), 2, "the killed run's folder is left: {left:?}");

    let next = Command::new(binary())
        .args(["run", "--local", "--", "true"])
        .current_dir(dir.path())
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    assert_eq!(next.status.code(), Some(0), "{next:?}");
    assert_eq!(
        emulator_folders(tmp.path()),
        ["mvm-shard-emulator-foreign"],
        "{next:?}"
    );
}
