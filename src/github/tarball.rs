//! `GET /repos/{owner}/{repo}/tarball/{ref}` answers 302 with a codeload link
//! valid for minutes; we read `Location` and never follow it, so the archive
//! is fetched by the VM and the token stays here.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use http::StatusCode;
use http_body_util::BodyExt;

use crate::dispatch::{ResolvedSource, SourceResolver};
use crate::protocol::{ArchiveFormat, SourceSpec};

/// A link is reused for this long; GitHub's live about five minutes.
const LINK_REUSE: Duration = Duration::from_secs(120);

/// Why no tarball link could be had.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GithubError {
    /// Missing setting (repository, commit, token).
    #[error("{0}")]
    Config(String),
    /// 404: wrong repository or commit, or the token cannot read it.
    #[error("GitHub answered 404 for {repo}@{commit}: the repository or commit does not exist, or the token cannot read it (give the job `contents: read`)")]
    NotFound {
        /// owner/name.
        repo: String,
        /// The ref.
        commit: String,
    },
    /// 401: the token is invalid or expired.
    #[error("GitHub refused the token (401 {0}): it is invalid or expired; GITHUB_TOKEN lives only as long as its job")]
    Unauthorized(String),
    /// Any other answer.
    #[error("GitHub answered {status} to the tarball request: {message}")]
    Unexpected {
        /// The status.
        status: u16,
        /// GitHub's message.
        message: String,
    },
    /// The request itself failed.
    #[error("cannot reach the GitHub API at {url}: {message}")]
    Transport {
        /// The API base.
        url: String,
        /// What failed.
        message: String,
    },
}

/// Hands out tarball links of one commit, renewing them before they expire.
pub struct TarballLinks {
    client: octocrab::Octocrab,
    api_url: String,
    repo: String,
    commit: String,
    cached: Mutex<Option<(Instant, String)>>,
}

impl TarballLinks {
    /// For `repo` (`owner/name`) at `commit`, through the API at `api_url`
    /// (`GITHUB_API_URL`, for GitHub Enterprise Server too).
    pub fn new(api_url: &str, token: &str, repo: &str, commit: &str) -> Result<Self, GithubError> {
        if repo.split('/').count() != 2 || repo.split('/').any(str::is_empty) {
            return Err(GithubError::Config(format!(
                "repository {repo:?} is not owner/name"
            )));
        }
        if commit.is_empty() {
            return Err(GithubError::Config(
                "no commit to fetch (GITHUB_SHA is empty)".into(),
            ));
        }
        if token.is_empty() {
            return Err(GithubError::Config(
                "no GitHub token: set GITHUB_TOKEN (the action passes github.token) or use --source-from tree".into(),
            ));
        }
        let client = octocrab::Octocrab::builder()
            .base_uri(api_url)
            .map_err(|e| GithubError::Config(format!("GitHub API URL {api_url:?}: {e}")))?
            .personal_token(token.to_string())
            .build()
            .map_err(|e| GithubError::Config(format!("cannot build the GitHub client: {e}")))?;
        Ok(TarballLinks {
            client,
            api_url: api_url.trim_end_matches('/').to_string(),
            repo: repo.to_string(),
            commit: commit.to_string(),
            cached: Mutex::new(None),
        })
    }

    /// Asks GitHub for a fresh link (no caching).
    pub async fn fetch_link(&self) -> Result<String, GithubError> {
        let url = format!(
            "{}/repos/{}/tarball/{}",
            self.api_url, self.repo, self.commit
        );
        let resp = self
            .client
            ._get(url)
            .await
            .map_err(|e| GithubError::Transport {
                url: self.api_url.clone(),
                message: e.to_string(),
            })?;
        let status = resp.status();
        if status.is_redirection() {
            return resp
                .headers()
                .get(http::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .ok_or_else(|| GithubError::Unexpected {
                    status: status.as_u16(),
                    message: "a redirect without Location".into(),
                });
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("message")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
        Err(match status {
            StatusCode::NOT_FOUND => GithubError::NotFound {
                repo: self.repo.clone(),
                commit: self.commit.clone(),
            },
            StatusCode::UNAUTHORIZED => GithubError::Unauthorized(message),
            _ => GithubError::Unexpected {
                status: status.as_u16(),
                message,
            },
        })
    }

    async fn link(&self) -> Result<(String, bool), GithubError> {
        if let Some((at, link)) = self.cached.lock().expect("lock poisoned").as_ref() {
            if at.elapsed() < LINK_REUSE {
                return Ok((link.clone(), false));
            }
        }
        let link = self.fetch_link().await?;
        *self.cached.lock().expect("lock poisoned") = Some((Instant::now(), link.clone()));
        Ok((link, true))
    }
}

impl SourceResolver for TarballLinks {
    fn resolve(&self) -> BoxFuture<'_, Result<ResolvedSource, String>> {
        async move {
            let (url, new) = self.link().await.map_err(|e| e.to_string())?;
            Ok(ResolvedSource {
                secret: new.then(|| url.clone()),
                spec: SourceSpec::Url {
                    url,
                    format: ArchiveFormat::TarGz,
                    strip_components: 1,
                    sha256: None,
                },
            })
        }
        .boxed()
    }
}
