//! Mistakes are found before anything runs and told in one line: every
//! configuration and usage mistake through the real binary, against the
//! emulator on loopback, with how many invocations the emulator saw.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{agent_function, cli_isolated, start_emulator};
use mvm_shard::emulator::{EmulatorConfig, RunningEmulator};

/// A value passed with `--env` that must never be printed.
const SECRET: &str = "hunter2-do-not-print";
/// Bound of every run of the binary.
const LIMIT: Duration = Duration::from_secs(60);
/// Words of the SDK's `Debug` dumps and of printed requests.
const DUMPS: &[&str] = &[
    "ServiceError",
    "ErrorMetadata",
    "DispatchFailure",
    "ConstructionFailure",
    "Request {",
    "SdkBody",
    "Blob {",
    "\"source\"",
];

/// An emulator with `fn` (our agent, tenant-isolated, as deployed) and
/// `denied` (whose invocations AWS refuses).
async fn emulator() -> RunningEmulator {
    let mut denied = agent_function("denied", true);
    denied.deny_invoke = true;
    start_emulator(EmulatorConfig {
        functions: vec![agent_function("fn", true), denied],
        region: "us-east-1".into(),
        microvm_images: Vec::new(),
        microvm_faults: Default::default(),
        throttle_streams: false,
        lambda_faults: Default::default(),
    })
    .await
}

fn source_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data.txt"), "some source\n").unwrap();
    dir
}

/// AWS settings of a user with credentials and a region.
const AWS: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
    ("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMIEXAMPLEKEY"),
    ("AWS_REGION", "us-east-1"),
];

/// What one run printed, checked for the promises every mistake keeps.
struct Told {
    code: i32,
    line: String,
    all: String,
}

/// Runs `run <args> --env SECRET=… -- true` in `dir`; asserts exit 2 and
/// exactly one error line, and that nothing secret or dumped was printed.
async fn mistake(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Told {
    let secret = format!("SECRET_VALUE={SECRET}");
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--env", &secret, "--", "true"]);
    let (code, stdout, stderr) = cli_isolated(dir, &full, env, LIMIT).await;
    let all = format!("{stdout}{stderr}");
    let errors: Vec<&str> = all.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{args:?}: {all}");
    for word in DUMPS.iter().chain([&SECRET, &"wJalrXUtnFEMIEXAMPLEKEY"]) {
        assert!(!all.contains(word), "{args:?} printed {word:?}: {all}");
    }
    assert!(all.lines().all(|l| l.len() < 1000), "{args:?}: {all}");
    Told {
        code,
        line: errors[0].to_string(),
        all,
    }
}

#[tokio::test]
async fn a_missing_function_is_named_with_its_region_before_any_invoke() {
    let emulator = emulator().await;
    let dir = source_dir();
    let told = mistake(
        dir.path(),
        &["--function", "nope", "--endpoint-url", &emulator.endpoint],
        AWS,
    )
    .await;
    assert_eq!(told.code, 2, "{}", told.all);
    assert!(
        told.line
            .starts_with("error: function nope not found in region us-east-1"),
        "{}",
        told.line
    );
    assert!(told.line.contains("--region"), "{}", told.line);
    assert_eq!(emulator.invocations(), 0);
}

#[tokio::test]
async fn a_function_arn_of_another_region_says_which_region_to_pass() {
    let emulator = emulator().await;
    let dir = source_dir();
    let arn = "arn:aws:lambda:eu-west-1:123456789012:function:fn";
    let told = mistake(
        dir.path(),
        &["--function", arn, "--endpoint-url", &emulator.endpoint],
        AWS,
    )
    .await;
    assert_eq!(told.code, 2, "{}", told.all);
    assert!(
        told.line.contains(
            "is in region eu-west-1, but the region is us-east-1: pass --region eu-west-1"
        ),
        "{}",
        told.line
    );
    assert_eq!(emulator.invocations(), 0);
}

#[tokio::test]
async fn a_tenant_isolation_mismatch_is_found_before_any_invoke() {
    let emulator = emulator().await;
    let dir = source_dir();
    let told = mistake(
        dir.path(),
        &[
            "--function",
            "fn",
            "--no-tenant-isolation",
            "--endpoint-url",
            &emulator.endpoint,
        ],
        AWS,
    )
    .await;
    assert_eq!(told.code, 2, "{}", told.all);
    assert!(
        told.line
            .contains("uses tenant isolation: drop --no-tenant-isolation"),
        "{}",
        told.line
    );
    assert_eq!(emulator.invocations(), 0);
}

#[tokio::test]
async fn access_denied_stops_the_run_at_the_first_answer() {
    let emulator = emulator().await;
    let dir = source_dir();
    let told = mistake(
        dir.path(),
        &[
            "--function",
            "denied",
            "--shards",
            "4",
            "--max-parallel",
            "1",
            "--endpoint-url",
            &emulator.endpoint,
        ],
        AWS,
    )
    .await;
    assert_eq!(told.code, 2, "{}", told.all);
    assert!(
        told.line.contains("function denied in region us-east-1: the caller is not allowed to invoke it (AccessDeniedException: User: "),
        "{}",
        told.line
    );
    assert!(told.line.contains("lambda:InvokeFunction"), "{}", told.line);
    assert!(
        told.line
            .ends_with("(the run stopped there: 4 of 4 shards did not run)"),
        "{}",
        told.line
    );
    // Not retried, and no other shard started after it; no line per shard.
    assert_eq!(emulator.invocations(), 1);
    assert!(!told.all.contains("NOT RUN"), "{}", told.all);
}

#[tokio::test]
async fn an_endpoint_without_a_scheme_is_refused_before_anything() {
    let emulator = emulator().await;
    let dir = source_dir();
    let bare = emulator.endpoint.trim_start_matches("http://").to_string();
    let told = mistake(
        dir.path(),
        &["--function", "fn", "--endpoint-url", &bare],
        AWS,
    )
    .await;
    assert_eq!(told.code, 2, "{}", told.all);
    assert!(
        told.line.contains(&format!("http://{bare}")),
        "{}",
        told.line
    );
    assert_eq!(emulator.invocations(), 0);
}

/// A loopback URL nothing listens on.
fn closed_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

#[tokio::test]
async fn an_unreachable_endpoint_is_told_at_once() {
    let url = closed_endpoint();
    let dir = source_dir();
    let told = mistake(
        dir.path(),
        &["--function", "fn", "--shards", "3", "--endpoint-url", &url],
        AWS,
    )
    .await;
    assert_eq!(told.code, 2, "{}", told.all);
    assert!(
        told.line
            .starts_with(&format!("error: cannot reach {url}: ")),
        "{}",
        told.line
    );
    assert!(!told.all.contains("attempt"), "retried: {}", told.all);
}

#[tokio::test]
async fn no_credentials_are_told_in_one_line() {
    let emulator = emulator().await;
    let dir = source_dir();
    let told = mistake(
        dir.path(),
        &["--function", "fn", "--endpoint-url", &emulator.endpoint],
        &[("AWS_REGION", "us-east-1")],
    )
    .await;
    assert_eq!(told.code, 2, "{}", told.all);
    assert!(
        told.line.starts_with("error: no AWS credentials found"),
        "{}",
        told.line
    );
    assert_eq!(emulator.invocations(), 0);
}

/// A loopback server that answers every call as AWS answers expired
/// credentials; returns its URL and how many calls it saw.
async fn expired_credentials_endpoint() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>)
{
    use std::sync::atomic::{AtomicUsize, Ordering};
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let app = axum::Router::new().fallback(move || {
        let seen = seen.clone();
        async move {
            seen.fetch_add(1, Ordering::SeqCst);
            (
                http::StatusCode::FORBIDDEN,
                [("x-amzn-errortype", "ExpiredTokenException")],
                axum::Json(serde_json::json!({
                    "message": "The security token included in the request is expired"
                })),
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, calls)
}

#[tokio::test]
async fn expired_credentials_are_told_with_what_to_do_before_any_invoke() {
    let (url, calls) = expired_credentials_endpoint().await;
    let dir = source_dir();
    let told = mistake(
        dir.path(),
        &["--function", "fn", "--shards", "3", "--endpoint-url", &url],
        AWS,
    )
    .await;
    assert_eq!(told.code, 2, "{}", told.all);
    assert!(
        told.line.starts_with("error: AWS refused the credentials (ExpiredTokenException: The security token included in the request is expired): refresh them"),
        "{}",
        told.line
    );
    // The preflight read, and nothing after it.
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_unknown_microvm_image_is_named_before_any_microvm_starts() {
    let emulator = emulator().await;
    let dir = source_dir();
    let told = mistake(
        dir.path(),
        &[
            "--microvm-image",
            "nope",
            "--endpoint-url",
            &emulator.endpoint,
        ],
        AWS,
    )
    .await;
    assert_eq!(told.code, 2, "{}", told.all);
    assert!(
        told.line
            .starts_with("error: MicroVM image nope not found in region us-east-1"),
        "{}",
        told.line
    );
}

#[tokio::test]
async fn usage_mistakes_are_refused_before_any_invoke() {
    let emulator = emulator().await;
    let dir = source_dir();
    let ep = emulator.endpoint.as_str();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--function", "", "--endpoint-url", ep],
            "must not be empty",
        ),
        (&["--local", "--image-version", "3"], "--image-version"),
        (
            &[
                "--function",
                "fn",
                "--execution-role-arn",
                "arn:aws:iam::1:role/r",
                "--endpoint-url",
                ep,
            ],
            "--execution-role-arn",
        ),
        (
            &[
                "--function",
                "fn",
                "--image-version",
                "3",
                "--endpoint-url",
                ep,
            ],
            "--image-version",
        ),
    ];
    for (args, said) in cases {
        let told = mistake(dir.path(), args, AWS).await;
        assert_eq!(told.code, 2, "{args:?}: {}", told.all);
        assert!(told.line.contains(said), "{args:?}: {}", told.line);
    }
    assert_eq!(emulator.invocations(), 0);
}

#[tokio::test]
async fn a_directory_with_nothing_shipped_is_refused_before_any_invoke() {
    let emulator = emulator().await;
    let repo = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| common::git(repo.path(), args);
    git(&["init", "-q"]);
    std::fs::write(repo.path().join(".gitignore"), "build/\n").unwrap();
    std::fs::write(repo.path().join("tracked"), "x").unwrap();
    std::fs::create_dir_all(repo.path().join("empty")).unwrap();
    std::fs::create_dir_all(repo.path().join("build")).unwrap();
    std::fs::write(repo.path().join("build/out"), "ignored").unwrap();
    for sub in ["empty", "build"] {
        let told = mistake(
            &repo.path().join(sub),
            &["--function", "fn", "--endpoint-url", &emulator.endpoint],
            AWS,
        )
        .await;
        assert_eq!(told.code, 2, "{sub}: {}", told.all);
        assert!(
            told.line.contains(&format!(
                "the current directory {sub} holds no file the shards receive"
            )),
            "{}",
            told.line
        );
    }
    assert_eq!(emulator.invocations(), 0);
}

#[tokio::test]
async fn a_source_too_large_stops_packing_at_the_budget_before_any_invoke() {
    let emulator = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    // Random bytes do not compress: 8 MB of them pass the 4.5 MiB budget.
    let mut noise = Vec::with_capacity(8_000_000);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    while noise.len() < 8_000_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        noise.extend_from_slice(&state.to_le_bytes());
    }
    std::fs::write(dir.path().join("noise.bin"), &noise).unwrap();
    let told = mistake(
        dir.path(),
        &["--function", "fn", "--endpoint-url", &emulator.endpoint],
        AWS,
    )
    .await;
    assert_eq!(told.code, 2, "{}", told.all);
    assert!(
        told.line
            .contains("the source archive is over 4.5 MiB compressed"),
        "{}",
        told.line
    );
    assert_eq!(emulator.invocations(), 0);
}

/// The step outputs GitHub Actions would read.
fn outputs(path: &Path) -> std::collections::BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn in_github_actions_a_usage_error_is_an_annotation_and_the_outputs_are_written() {
    let dir = source_dir();
    let out = dir.path().join("github_output");
    let out_str = out.display().to_string();
    let github = [
        ("GITHUB_ACTIONS", "true"),
        ("GITHUB_OUTPUT", out_str.as_str()),
    ];
    let (code, stdout, stderr) = cli_isolated(
        dir.path(),
        &["run", "--function", "", "--", "true"],
        &github,
        LIMIT,
    )
    .await;
    assert_eq!(code, 2, "{stdout}{stderr}");
    let annotations: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("::error"))
        .collect();
    assert_eq!(annotations.len(), 1, "{stdout}");
    assert!(annotations[0].contains("--function"), "{stdout}");
    let o = outputs(&out);
    assert_eq!(
        o.get("result").map(String::as_str),
        Some("usage-error"),
        "{o:?}"
    );
    for count in ["passed", "failed", "timed-out", "infra-failed"] {
        assert_eq!(o.get(count).map(String::as_str), Some("0"), "{o:?}");
    }
}

#[tokio::test]
async fn in_github_actions_a_stopped_run_is_an_annotation_with_its_counts() {
    let emulator = emulator().await;
    let dir = source_dir();
    let out = dir.path().join("github_output");
    let out_str = out.display().to_string();
    let mut env = vec![
        ("GITHUB_ACTIONS", "true"),
        ("GITHUB_OUTPUT", out_str.as_str()),
    ];
    env.extend_from_slice(AWS);
    let (code, stdout, stderr) = cli_isolated(
        dir.path(),
        &[
            "run",
            "--function",
            "denied",
            "--shards",
            "3",
            "--endpoint-url",
            &emulator.endpoint,
            "--",
            "true",
        ],
        &env,
        LIMIT,
    )
    .await;
    assert_eq!(code, 2, "{stdout}{stderr}");
    let annotations: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("::error"))
        .collect();
    assert_eq!(annotations.len(), 1, "{stdout}");
    assert!(annotations[0].contains("AccessDeniedException"), "{stdout}");
    assert!(!stderr.contains("error:"), "{stderr}");
    let o = outputs(&out);
    assert_eq!(
        o.get("result").map(String::as_str),
        Some("usage-error"),
        "{o:?}"
    );
    assert_eq!(
        o.get("infra-failed").map(String::as_str),
        Some("3"),
        "{o:?}"
    );
}

#[tokio::test]
async fn doctor_tells_an_unreachable_endpoint_in_one_line() {
    let url = closed_endpoint();
    let dir = source_dir();
    let (code, stdout, stderr) = cli_isolated(
        dir.path(),
        &["doctor", "--function", "fn", "--endpoint-url", &url],
        AWS,
        LIMIT,
    )
    .await;
    assert_eq!(code, 1, "{stdout}{stderr}");
    let problems: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("PROBLEM"))
        .collect();
    assert_eq!(problems.len(), 1, "{stdout}");
    assert!(
        problems[0].contains(&format!("cannot reach {url}")),
        "{stdout}"
    );
    for word in DUMPS {
        assert!(
            !stdout.contains(word) && !stderr.contains(word),
            "{stdout}{stderr}"
        );
    }
}
