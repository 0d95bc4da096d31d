//! The GitHub source: a local server answers as GitHub's REST documentation
//! says (`GET /repos/{owner}/{repo}/tarball/{ref}` → 302 to a short-lived
//! link; 404 and 401 with a JSON message), and serves the archive at the link.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use mvm_shard::github::{GithubError, TarballLinks};

const TOKEN: &str = "ghs_valid_token";
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Clone)]
struct FakeGithub {
    base: String,
    archive: Arc<Vec<u8>>,
    downloads: Arc<AtomicUsize>,
    api_calls: Arc<AtomicUsize>,
}

async fn tarball(
    State(gh): State<FakeGithub>,
    Path((owner, repo, reference)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    gh.api_calls.fetch_add(1, Ordering::SeqCst);
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth != format!("Bearer {TOKEN}") && auth != format!("token {TOKEN}") {
        return (
            StatusCode::UNAUTHORIZED,
            [("content-type", "application/json")],
            r#"{"message":"Bad credentials","documentation_url":"https://docs.github.com/rest","status":"401"}"#,
        )
            .into_response();
    }
    if (owner.as_str(), repo.as_str(), reference.as_str()) != ("octo", "app", SHA) {
        return (
            StatusCode::NOT_FOUND,
            [("content-type", "application/json")],
            r#"{"message":"Not Found","documentation_url":"https://docs.github.com/rest/repos/contents#download-a-repository-archive-tar","status":"404"}"#,
        )
            .into_response();
    }
    let location = format!(
        "{}/codeload/octo/app/legacy.tar.gz/{SHA}?token=SHORTLIVED",
        gh.base
    );
    (StatusCode::FOUND, [("location", location)]).into_response()
}

async fn codeload(State(gh): State<FakeGithub>) -> Response {
    gh.downloads.fetch_add(1, Ordering::SeqCst);
    (
        [("content-type", "application/x-gzip")],
        (*gh.archive).clone(),
    )
        .into_response()
}

/// A tar.gz with GitHub's layout: one top folder `owner-repo-sha7/`.
fn github_archive() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("octo-app-0123456");
    std::fs::create_dir_all(top.join("src")).unwrap();
    std::fs::write(top.join("README.md"), "from the commit\n").unwrap();
    std::fs::write(top.join("src/lib.txt"), "nested\n").unwrap();
    let out = dir.path().join("a.tar.gz");
    let ok = std::process::Command::new("tar")
        .arg("czf")
        .arg(&out)
        .arg("-C")
        .arg(dir.path())
        .arg("octo-app-0123456")
        .status()
        .unwrap()
        .success();
    assert!(ok);
    std::fs::read(out).unwrap()
}

async fn fake_github() -> FakeGithub {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gh = FakeGithub {
        base: format!("http://{}", listener.local_addr().unwrap()),
        archive: Arc::new(github_archive()),
        downloads: Arc::default(),
        api_calls: Arc::default(),
    };
    let app = Router::new()
        .route("/repos/{owner}/{repo}/tarball/{reference}", get(tarball))
        .route("/codeload/octo/app/legacy.tar.gz/{sha}", get(codeload))
        .with_state(gh.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    gh
}

#[tokio::test]
async fn the_redirect_is_read_and_not_followed() {
    let gh = fake_github().await;
    let links = TarballLinks::new(&gh.base, TOKEN, "octo/app", SHA).unwrap();
    let link = links.fetch_link().await.unwrap();
    assert_eq!(
        link,
        format!(
            "{}/codeload/octo/app/legacy.tar.gz/{SHA}?token=SHORTLIVED",
            gh.base
        )
    );
    assert_eq!(
        gh.downloads.load(Ordering::SeqCst),
        0,
        "the invoker followed the link"
    );
}

#[tokio::test]
async fn a_missing_commit_and_a_bad_token_give_clear_errors() {
    let gh = fake_github().await;
    let missing = TarballLinks::new(&gh.base, TOKEN, "octo/app", "deadbeef").unwrap();
    let err = missing.fetch_link().await.unwrap_err();
    assert!(matches!(err, GithubError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("contents: read"), "{err}");

    let expired = TarballLinks::new(&gh.base, "ghs_expired", "octo/app", SHA).unwrap();
    let err = expired.fetch_link().await.unwrap_err();
    assert_eq!(err, GithubError::Unauthorized("Bad credentials".into()));
    assert!(err.to_string().contains("expired"), "{err}");
}

#[tokio::test]
async fn shards_fetch_the_commit_themselves_and_the_link_is_masked() {
    let gh = fake_github().await;
    let work = tempfile::tempdir().unwrap();
    let gh_files = tempfile::tempdir().unwrap();
    std::fs::create_dir(work.path().join("target")).unwrap();
    std::fs::write(
        work.path().join("target/nextest-archive.tar.zst"),
        "prepared on the runner\n",
    )
    .unwrap();
    let base = gh.base.clone();
    let (code, stdout, stderr) = tokio::task::spawn_blocking({
        let work = work.path().to_path_buf();
        let output = gh_files.path().join("output");
        move || {
            let out = std::process::Command::new(common::binary())
                .args(["run", "--local", "--shards", "2", "--source-from", "github"])
                // A build output prepared on the runner, laid over the commit's tree.
                .args(["--include", "target/nextest-archive.tar.zst", "--"])
                .args([
                    "sh",
                    "-c",
                    "cat README.md src/lib.txt target/nextest-archive.tar.zst",
                ])
                .current_dir(&work)
                .env("GITHUB_ACTIONS", "true")
                .env("GITHUB_OUTPUT", &output)
                .env("GITHUB_API_URL", &base)
                .env("GITHUB_TOKEN", TOKEN)
                .env("GITHUB_REPOSITORY", "octo/app")
                .env("GITHUB_SHA", SHA)
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(stdout.matches("from the commit").count(), 2, "{stdout}");
    assert_eq!(stdout.matches("nested").count(), 2, "{stdout}");
    assert_eq!(
        stdout.matches("prepared on the runner").count(),
        2,
        "{stdout}"
    );
    let mask = format!("::add-mask::{}/codeload/", gh.base);
    let masked_at = stdout.find(&mask).expect("the link is masked");
    assert!(masked_at < stdout.find("::group::").unwrap());
    assert_eq!(
        gh.downloads.load(Ordering::SeqCst),
        2,
        "each shard downloads the archive itself"
    );
    assert!(!stderr.contains(TOKEN) && !stdout.contains(TOKEN));
    // The banner names the commit each shard fetches, not an empty local archive.
    let banner = format!(
        "source octo/app@{} (a GitHub tarball each shard fetches)",
        &SHA[..7]
    );
    assert!(stderr.contains(&banner), "{stderr}");

    // A bad token fails before anything runs.
    let base = gh.base.clone();
    let work = work.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(common::binary())
            .args(["run", "--local", "--source-from", "github", "--", "true"])
            .current_dir(&work)
            .env("GITHUB_API_URL", &base)
            .env("GITHUB_TOKEN", "ghs_expired")
            .env("GITHUB_REPOSITORY", "octo/app")
            .env("GITHUB_SHA", SHA)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expired"));
}
