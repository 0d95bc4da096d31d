//! The emulator is Lambda MicroVMs to the real aws-sdk-lambdamicrovms client:
//! microVMs run from images, through the hooks, behind an authenticated
//! endpoint, and end with everything they started. The image here is a small
//! stand-in written in Python (`tests/clients/fake_microvm.py`).

mod common;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use aws_sdk_lambdamicrovms::types::{MicrovmState, PortRange, PortSpecification};
use aws_sdk_lambdamicrovms::Client;
use mvm_shard::emulator::{EmulatorConfig, MicrovmImageConfig, RunningEmulator};
use tempfile::TempDir;

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// An image whose microVMs run the fake application, recording into `records`.
fn fake_image(name: &str, records: &Path) -> MicrovmImageConfig {
    MicrovmImageConfig::new(
        name,
        vec![
            "python3".into(),
            clients_dir().join("fake_microvm.py").display().to_string(),
            records.display().to_string(),
        ],
    )
}

/// An emulator hosting the fake image `fake`, its record folder, and a client.
struct Setup {
    emu: RunningEmulator,
    client: Client,
    records: TempDir,
}

async fn setup() -> Setup {
    let records = tempfile::tempdir().unwrap();
    let images = vec![fake_image("fake", records.path())];
    let emu = emulator(images).await;
    let client = client(&emu.endpoint).await;
    Setup {
        emu,
        client,
        records,
    }
}

async fn emulator(microvm_images: Vec<MicrovmImageConfig>) -> RunningEmulator {
    RunningEmulator::start(EmulatorConfig {
        functions: Vec::new(),
        region: "us-east-1".into(),
        microvm_images,
        microvm_faults: Default::default(),
        throttle_streams: false,
        lambda_faults: Default::default(),
    })
    .await
    .expect("emulator starts")
}

async fn client(endpoint: &str) -> Client {
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_lambdamicrovms::config::Credentials::new(
            "k", "s", None, None, "test",
        ))
        .load()
        .await;
    Client::new(&conf)
}

/// The one record with this suffix (there is one microVM per folder unless a test says otherwise).
fn record(records: &Path, suffix: &str) -> Option<String> {
    std::fs::read_dir(records)
        .unwrap()
        .flatten()
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .ends_with(&format!(".{suffix}"))
        })
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
}

/// Pids of every fake microVM process recorded in `records`, children included.
fn recorded_pids(records: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir(records).unwrap().flatten() {
        if entry.file_name().to_string_lossy().ends_with(".pid") {
            let doc: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(entry.path()).unwrap()).unwrap();
            pids.push(doc["pid"].as_u64().unwrap() as u32);
            pids.push(doc["child"].as_u64().unwrap() as u32);
        }
    }
    pids
}

/// Polls `check` every 20 ms until it holds, failing after `limit`.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn all_gone(pids: &[u32]) {
    let pids = pids.to_vec();
    eventually(
        "every process of the microVM is gone",
        Duration::from_secs(5),
        || {
            let pids = pids.clone();
            async move { pids.iter().all(|&p| !mvm_shard::os::is_alive(p)) }
        },
    )
    .await;
}

async fn state_of(client: &Client, id: &str) -> MicrovmState {
    client
        .get_microvm()
        .microvm_identifier(id)
        .send()
        .await
        .unwrap()
        .state()
        .clone()
}

/// Waits (bounded) until microVM `id` reaches `state`, as a client of the
/// service must after `RunMicrovm` answered `PENDING`.
async fn until_state(client: &Client, id: &str, state: MicrovmState) {
    eventually(
        &format!("microVM {id} is {}", state.as_str()),
        Duration::from_secs(30),
        || {
            let (client, id, state) = (client.clone(), id.to_string(), state.clone());
            async move { state_of(&client, &id).await == state }
        },
    )
    .await;
}

/// Runs a fake microVM with `payload` and waits until it is RUNNING.
async fn run(client: &Client, payload: &str) -> String {
    let out = client
        .run_microvm()
        .image_identifier("fake")
        .run_hook_payload(payload)
        .maximum_duration_in_seconds(300)
        .send()
        .await
        .expect("RunMicrovm succeeds");
    let id = out.microvm_id().to_string();
    until_state(client, &id, MicrovmState::Running).await;
    id
}

async fn token(client: &Client, id: &str, ports: PortSpecification) -> String {
    let out = client
        .create_microvm_auth_token()
        .microvm_identifier(id)
        .expiration_in_minutes(5)
        .allowed_ports(ports)
        .send()
        .await
        .expect("CreateMicrovmAuthToken succeeds");
    out.auth_token()
        .get("X-aws-proxy-auth")
        .expect("the token is under X-aws-proxy-auth")
        .clone()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

#[tokio::test]
async fn a_microvm_runs_and_its_endpoint_reaches_it_with_a_token() {
    let s = setup().await;
    let payload = r#"{"version":1,"request":{"hello":"microvm"}}"#;
    let out = s
        .client
        .run_microvm()
        .image_identifier("fake")
        .run_hook_payload(payload)
        .maximum_duration_in_seconds(300)
        .send()
        .await
        .unwrap();
    // As on the service, the answer comes at once, before provisioning ends.
    assert_eq!(out.state(), &MicrovmState::Pending);
    assert!(
        out.endpoint().starts_with("http://127.0.0.1:"),
        "{}",
        out.endpoint()
    );
    assert_eq!(
        out.image_arn(),
        "arn:aws:lambda:us-east-1:000000000000:microvm-image:fake"
    );
    assert_eq!(out.maximum_duration_in_seconds(), 300);
    assert!(out.started_at().secs() > 1_700_000_000);
    let id = out.microvm_id().to_string();
    until_state(&s.client, &id, MicrovmState::Running).await;

    let got = s
        .client
        .get_microvm()
        .microvm_identifier(&id)
        .send()
        .await
        .unwrap();
    assert_eq!(got.state(), &MicrovmState::Running);
    assert_eq!(got.endpoint(), out.endpoint());
    assert_eq!(got.started_at(), out.started_at());
    assert!(got.terminated_at().is_none());

    let token = token(&s.client, &id, PortSpecification::Port(8080)).await;
    let resp = http()
        .post(format!("{}/echo?x=1", got.endpoint()))
        .header("X-aws-proxy-auth", &token)
        .header("X-aws-proxy-port", "8080")
        .header("X-Aws-Proxy-Anything", "secret")
        .header("X-Custom", "kept")
        .body("request body")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/echo?x=1");
    assert_eq!(echo["body"], "request body");
    assert_eq!(echo["run"], payload, "the run hook got the payload");
    let headers = echo["headers"].as_object().unwrap();
    assert!(
        headers
            .keys()
            .all(|k| !k.to_ascii_lowercase().starts_with("x-aws-proxy-")),
        "proxy headers reached the microVM: {headers:?}"
    );
    assert!(headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("x-custom") && v == "kept"));
    assert_eq!(record(s.records.path(), "run").as_deref(), Some(payload));

    // Without X-aws-proxy-port the request goes to 8080.
    let resp = http()
        .get(format!("{}/echo", got.endpoint()))
        .header("X-aws-proxy-auth", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    s.emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_endpoint_answers_401_without_a_live_token_of_that_microvm() {
    let s = setup().await;
    let a = run(&s.client, "a").await;
    let b = run(&s.client, "b").await;
    let endpoint = |id: &str| {
        let client = s.client.clone();
        let id = id.to_string();
        async move {
            client
                .get_microvm()
                .microvm_identifier(id)
                .send()
                .await
                .unwrap()
                .endpoint()
                .to_string()
        }
    };
    let endpoint_a = endpoint(&a).await;
    let token_b = token(&s.client, &b, PortSpecification::AllPorts).await;
    for auth in [None, Some("not-a-token"), Some(token_b.as_str())] {
        let mut req = http().get(format!("{endpoint_a}/echo"));
        if let Some(auth) = auth {
            req = req.header("X-aws-proxy-auth", auth);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "token {auth:?}");
    }
    s.emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_endpoint_answers_403_for_a_port_the_token_does_not_open() {
    let s = setup().await;
    let id = run(&s.client, "p").await;
    let vm = s
        .client
        .get_microvm()
        .microvm_identifier(&id)
        .send()
        .await
        .unwrap();
    let only_8080 = token(&s.client, &id, PortSpecification::Port(8080)).await;
    let resp = http()
        .post(format!(
            "{}/aws/lambda-microvms/runtime/v1/resume",
            vm.endpoint()
        ))
        .header("X-aws-proxy-auth", &only_8080)
        .header("X-aws-proxy-port", "9000")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);

    // A range that holds 9000 opens it.
    let range = PortRange::builder()
        .start_port(8999)
        .end_port(9001)
        .build()
        .unwrap();
    let hooks = token(&s.client, &id, PortSpecification::Range(range)).await;
    let resp = http()
        .post(format!(
            "{}/aws/lambda-microvms/runtime/v1/resume",
            vm.endpoint()
        ))
        .header("X-aws-proxy-auth", &hooks)
        .header("X-aws-proxy-port", "9000")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    s.emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_endpoint_streams_a_response_as_it_is_written() {
    let s = setup().await;
    let id = run(&s.client, "stream").await;
    let endpoint = endpoint_of(&s.client, &id).await;
    let token = token(&s.client, &id, PortSpecification::Port(8080)).await;
    let mut resp = http()
        .get(format!("{endpoint}/stream"))
        .header("X-aws-proxy-auth", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The second line is only written after /release: the first must arrive alone.
    let first = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
        .await
        .expect("the first line arrives before the response ends")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"first\n");
    let release = http()
        .get(format!("{endpoint}/release"))
        .header("X-aws-proxy-auth", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(release.status(), 200);
    let mut rest = Vec::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"second\n");
    s.emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn terminate_ends_the_microvm_and_everything_it_started() {
    let s = setup().await;
    let id = run(&s.client, "t").await;
    let endpoint = endpoint_of(&s.client, &id).await;
    let pids = recorded_pids(s.records.path());
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|&p| mvm_shard::os::is_alive(p)));

    s.client
        .terminate_microvm()
        .microvm_identifier(&id)
        .send()
        .await
        .unwrap();
    let got = s
        .client
        .get_microvm()
        .microvm_identifier(&id)
        .send()
        .await
        .unwrap();
    assert_eq!(got.state(), &MicrovmState::Terminated);
    assert!(got.terminated_at().is_some());
    assert!(got.state_reason().unwrap().contains("TerminateMicrovm"));
    assert_eq!(
        record(s.records.path(), "terminate").as_deref(),
        Some("called"),
        "the terminate hook was called first"
    );
    all_gone(&pids).await;
    // The endpoint is closed with the microVM.
    assert!(http().get(format!("{endpoint}/echo")).send().await.is_err());

    // Terminating again is not an error; an unknown id is.
    s.client
        .terminate_microvm()
        .microvm_identifier(&id)
        .send()
        .await
        .unwrap();
    let err = s
        .client
        .terminate_microvm()
        .microvm_identifier("mvm-nope")
        .send()
        .await
        .unwrap_err();
    assert!(err.into_service_error().is_resource_not_found_exception());
    s.emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_maximum_duration_is_enforced() {
    let s = setup().await;
    let out = s
        .client
        .run_microvm()
        .image_identifier("fake")
        .maximum_duration_in_seconds(1)
        .send()
        .await
        .unwrap();
    let id = out.microvm_id().to_string();
    // The microVM may reach its 1 s limit before the image recorded its
    // processes; whatever it started by then must be gone after.
    let client = s.client.clone();
    eventually(
        "the microVM is no longer PENDING",
        Duration::from_secs(15),
        || {
            let client = client.clone();
            let id = id.clone();
            async move { state_of(&client, &id).await != MicrovmState::Pending }
        },
    )
    .await;
    let pids = recorded_pids(s.records.path());
    let client = s.client.clone();
    eventually("the microVM is terminated", Duration::from_secs(15), || {
        let client = client.clone();
        let id = id.clone();
        async move { state_of(&client, &id).await == MicrovmState::Terminated }
    })
    .await;
    let got = s
        .client
        .get_microvm()
        .microvm_identifier(&id)
        .send()
        .await
        .unwrap();
    assert!(
        got.state_reason().unwrap().contains("maximum duration"),
        "{:?}",
        got.state_reason()
    );
    all_gone(&pids).await;
    s.emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unknown_image_is_resource_not_found() {
    let s = setup().await;
    let err = s
        .client
        .run_microvm()
        .image_identifier("no-such-image")
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(err.is_resource_not_found_exception(), "{err:?}");
    // The image's ARN names it as well as its name does.
    let id = s
        .client
        .run_microvm()
        .image_identifier("arn:aws:lambda:us-east-1:000000000000:microvm-image:fake")
        .send()
        .await
        .unwrap()
        .microvm_id()
        .to_string();
    until_state(&s.client, &id, MicrovmState::Running).await;
    s.emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_run_hook_payload_over_16_kib_is_a_validation_error() {
    let s = setup().await;
    let err = s
        .client
        .run_microvm()
        .image_identifier("fake")
        .run_hook_payload("x".repeat(16 * 1024 + 1))
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(err.is_validation_exception(), "{err:?}");
    assert!(
        recorded_pids(s.records.path()).is_empty(),
        "nothing started"
    );

    let exactly = "y".repeat(16 * 1024);
    run(&s.client, &exactly).await;
    assert_eq!(record(s.records.path(), "run"), Some(exactly));
    s.emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_maximum_duration_out_of_1_s_to_8_h_is_a_validation_error() {
    let s = setup().await;
    for bad in [0, 28_801] {
        let err = s
            .client
            .run_microvm()
            .image_identifier("fake")
            .maximum_duration_in_seconds(bad)
            .send()
            .await
            .unwrap_err()
            .into_service_error();
        assert!(err.is_validation_exception(), "{bad}: {err:?}");
    }
    s.emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn list_microvms_shows_every_microvm_page_by_page() {
    let s = setup().await;
    let a = run(&s.client, "a").await;
    let b = run(&s.client, "b").await;
    s.client
        .terminate_microvm()
        .microvm_identifier(&a)
        .send()
        .await
        .unwrap();

    let all = s.client.list_microvms().send().await.unwrap();
    let items: Vec<(String, MicrovmState)> = all
        .items()
        .iter()
        .map(|i| (i.microvm_id().to_string(), i.state().clone()))
        .collect();
    assert_eq!(
        items,
        [
            (a.clone(), MicrovmState::Terminated),
            (b.clone(), MicrovmState::Running)
        ]
    );
    assert!(all.next_token().is_none());

    let first = s
        .client
        .list_microvms()
        .max_results(1)
        .send()
        .await
        .unwrap();
    assert_eq!(first.items()[0].microvm_id(), a);
    let second = s
        .client
        .list_microvms()
        .max_results(1)
        .next_token(first.next_token().expect("a second page"))
        .send()
        .await
        .unwrap();
    assert_eq!(second.items()[0].microvm_id(), b);
    assert!(second.next_token().is_none());

    let filtered = s
        .client
        .list_microvms()
        .image_identifier("fake")
        .image_version("7")
        .send()
        .await
        .unwrap();
    assert!(filtered.items().is_empty());
    s.emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_retried_client_token_gets_the_same_microvm_and_a_reused_one_a_conflict() {
    let s = setup().await;
    let call = |payload: &'static str| {
        s.client
            .run_microvm()
            .image_identifier("fake")
            .run_hook_payload(payload)
            .client_token("run-1-shard-0-attempt-0")
            .send()
    };
    let (first, second) = tokio::join!(call("same"), call("same"));
    let first = first.unwrap().microvm_id().to_string();
    assert_eq!(second.unwrap().microvm_id(), first);
    until_state(&s.client, &first, MicrovmState::Running).await;
    assert_eq!(
        recorded_pids(s.records.path()).len(),
        2,
        "one microVM started"
    );

    let err = call("different").await.unwrap_err().into_service_error();
    assert!(err.is_conflict_exception(), "{err:?}");
    s.emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_image_that_exits_at_start_ends_terminated_with_its_reason() {
    let emu = emulator(vec![MicrovmImageConfig::new(
        "broken",
        vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo cannot boot >&2; exit 3".into(),
        ],
    )])
    .await;
    let client = client(&emu.endpoint).await;
    // The call succeeds, as on the service: the start fails later.
    let out = client
        .run_microvm()
        .image_identifier("broken")
        .client_token("broken-1")
        .send()
        .await
        .expect("a failing start does not fail RunMicrovm");
    let id = out.microvm_id().to_string();
    until_state(&client, &id, MicrovmState::Terminated).await;

    let items = client.list_microvms().send().await.unwrap();
    assert_eq!(items.items().len(), 1);
    assert_eq!(items.items()[0].state(), &MicrovmState::Terminated);
    let got = client
        .get_microvm()
        .microvm_identifier(&id)
        .send()
        .await
        .unwrap();
    let reason = got.state_reason().unwrap();
    assert!(reason.contains("exit status: 3"), "{reason}");
    assert!(reason.contains("cannot boot"), "{reason}");
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_refused_run_hook_ends_the_microvm_with_the_hook_s_answer() {
    let emu = emulator(vec![common::refusing_image("refuses")]).await;
    let client = client(&emu.endpoint).await;
    let id = client
        .run_microvm()
        .image_identifier("refuses")
        .run_hook_payload("{}")
        .send()
        .await
        .expect("a refused run hook does not fail RunMicrovm")
        .microvm_id()
        .to_string();
    until_state(&client, &id, MicrovmState::Terminated).await;
    let got = client
        .get_microvm()
        .microvm_identifier(&id)
        .send()
        .await
        .unwrap();
    let reason = got.state_reason().unwrap();
    assert!(reason.contains("run hook answered 400"), "{reason}");
    assert!(reason.contains("no such request here"), "{reason}");
    emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn auth_tokens_are_checked_as_the_service_checks_them() {
    let s = setup().await;
    let id = run(&s.client, "tok").await;
    for minutes in [0, 61] {
        let err = s
            .client
            .create_microvm_auth_token()
            .microvm_identifier(&id)
            .expiration_in_minutes(minutes)
            .allowed_ports(PortSpecification::Port(8080))
            .send()
            .await
            .unwrap_err()
            .into_service_error();
        assert!(err.is_validation_exception(), "{minutes}: {err:?}");
    }
    let err = s
        .client
        .create_microvm_auth_token()
        .microvm_identifier("mvm-unknown")
        .expiration_in_minutes(5)
        .allowed_ports(PortSpecification::Port(8080))
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(err.is_resource_not_found_exception(), "{err:?}");

    s.client
        .terminate_microvm()
        .microvm_identifier(&id)
        .send()
        .await
        .unwrap();
    let err = s
        .client
        .create_microvm_auth_token()
        .microvm_identifier(&id)
        .expiration_in_minutes(5)
        .allowed_ports(PortSpecification::Port(8080))
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(err.is_conflict_exception(), "{err:?}");
    s.emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn images_are_listed_and_described() {
    let s = setup().await;
    let list = s.client.list_microvm_images().send().await.unwrap();
    assert_eq!(list.items().len(), 1);
    assert_eq!(list.items()[0].name(), "fake");
    let image = s
        .client
        .get_microvm_image()
        .image_identifier("fake")
        .send()
        .await
        .unwrap();
    assert_eq!(
        image.image_arn(),
        "arn:aws:lambda:us-east-1:000000000000:microvm-image:fake"
    );
    let err = s
        .client
        .suspend_microvm()
        .microvm_identifier("mvm-x")
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(err.is_validation_exception(), "{err:?}");
    s.emu.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutting_the_emulator_down_terminates_its_microvms() {
    let s = setup().await;
    run(&s.client, "1").await;
    run(&s.client, "2").await;
    let pids = recorded_pids(s.records.path());
    assert_eq!(pids.len(), 4);
    s.emu.shutdown().await.unwrap();
    all_gone(&pids).await;
}

#[tokio::test]
async fn boto3_drives_the_microvm_control_plane() {
    let s = setup().await;
    let endpoint = s.emu.endpoint.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(clients_dir().join("boto3_microvms.py"))
            .args([&endpoint, "fake"])
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "boto3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["run_state"], "PENDING");
    assert_eq!(report["state_after_polling"], "RUNNING");
    assert_eq!(report["no_payload_state"], "RUNNING");
    assert_eq!(report["echo_run"], "from boto3");
    assert_eq!(report["proxy_headers_seen"], 0);
    assert_eq!(report["terminated_state"], "TERMINATED");
    assert_eq!(report["unknown_image_error"], "ResourceNotFoundException");
    assert_eq!(report["oversized_payload_error"], "ValidationException");
    s.emu.shutdown().await.unwrap();
}

/// The endpoint GetMicrovm reports for `id`.
async fn endpoint_of(client: &aws_sdk_lambdamicrovms::Client, id: &str) -> String {
    client
        .get_microvm()
        .microvm_identifier(id)
        .send()
        .await
        .unwrap()
        .endpoint()
        .to_string()
}
