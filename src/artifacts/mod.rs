//! The artifact channel: how the source and `--include` archives of a run
//! reach every shard whatever their size. Inside the request when they fit
//! and nothing else is set up; over loopback for `--local`; through an S3
//! bucket (`--artifacts s3://BUCKET/PREFIX`) and short-lived presigned links
//! otherwise, so no AWS credential ever enters a shard.

mod cache;
mod loopback;
mod packed;
mod s3;

use std::time::Duration;

pub use cache::{local_dir as local_cache_dir, CacheArg};
pub use loopback::LoopbackServer;
pub use packed::{hex, PackedArchive, PackedWriter};
pub use s3::S3Store;

use crate::protocol::{ArchiveFormat, SourceSpec};

/// Why an archive could not be made reachable to the shards.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// `--artifacts` is not an `s3://` location.
    #[error("--artifacts {given:?}: {problem}; expected s3://BUCKET or s3://BUCKET/PREFIX")]
    Url {
        /// What was given.
        given: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The store cannot be used as configured (region, bucket, permissions).
    #[error("artifact store {location}: {message}")]
    Config {
        /// `s3://bucket/key`.
        location: String,
        /// What is wrong.
        message: String,
    },
    /// The store failed (network, server errors).
    #[error("artifact store {location}: {message}")]
    Store {
        /// `s3://bucket/key`.
        location: String,
        /// What failed.
        message: String,
    },
    /// `--cache` is malformed or its key files cannot be read.
    #[error("--cache {given:?}: {problem}")]
    Cache {
        /// What was given.
        given: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A local file or socket failed.
    #[error("artifacts: {0}")]
    Io(#[from] std::io::Error),
}

impl ArtifactError {
    /// True when the user can fix it by changing the configuration (exit 2).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            ArtifactError::Url { .. } | ArtifactError::Config { .. } | ArtifactError::Cache { .. }
        )
    }
}

/// An archive made reachable to the shards.
#[derive(Debug, Clone)]
pub struct Published {
    /// What goes into the request.
    pub spec: SourceSpec,
    /// Values in it that must never be logged (a presigned link's signature).
    pub secrets: Vec<String>,
    /// What happened, for the run's header (`uploaded`, `already in the store`).
    pub note: String,
}

/// Where a run's archives travel besides the request.
pub enum Channel {
    /// Nowhere: only what fits inside the request reaches a shard.
    Inline,
    /// A loopback HTTP server (`--local` without a store).
    Loopback(LoopbackServer),
    /// An S3 bucket with presigned links (`--artifacts`).
    Store(S3Store),
}

impl Channel {
    /// The channel for a run: the store when `artifacts` names one, loopback
    /// when `local` (keeping caches in `cache_dir`), inline otherwise.
    /// `link_lifetime` is how long presigned links stay valid.
    pub async fn open(
        artifacts: Option<&str>,
        local: bool,
        cache_dir: Option<std::path::PathBuf>,
        region: Option<String>,
        link_lifetime: Duration,
    ) -> Result<Self, ArtifactError> {
        match artifacts.filter(|a| !a.is_empty()) {
            Some(url) => Ok(Channel::Store(
                S3Store::connect(url, region, link_lifetime).await?,
            )),
            None if local => Ok(Channel::Loopback(LoopbackServer::start(cache_dir).await?)),
            None => Ok(Channel::Inline),
        }
    }

    /// Makes `archive` reachable by every shard; `None` when only the request can carry it.
    pub async fn publish(
        &self,
        archive: &PackedArchive,
    ) -> Result<Option<Published>, ArtifactError> {
        match self {
            Channel::Inline => Ok(None),
            Channel::Loopback(server) => Ok(Some(Published {
                spec: url_spec(server.serve(archive), archive),
                secrets: Vec::new(),
                note: "served over loopback".into(),
            })),
            Channel::Store(store) => {
                let uploaded = store.upload(archive).await?;
                let url = store.presign_get(&uploaded.key).await?;
                Ok(Some(Published {
                    secrets: s3::link_secrets(&url),
                    spec: url_spec(url, archive),
                    note: if uploaded.skipped {
                        "already in the artifact store".into()
                    } else {
                        "uploaded to the artifact store".into()
                    },
                }))
            }
        }
    }

    /// The links for the cache with this key: a GET link when it was saved
    /// before, else a PUT link to save it.
    pub async fn cache(&self, key: &str) -> Result<CacheLinks, ArtifactError> {
        match self {
            Channel::Inline => Err(ArtifactError::Cache {
                given: key.to_string(),
                problem: "caches need an artifact store: pass --artifacts s3://BUCKET/PREFIX (or use --local)".into(),
            }),
            Channel::Loopback(server) => server.cache(key).await,
            Channel::Store(store) => store.cache(key).await,
        }
    }

    /// Stops serving (loopback); the store keeps its objects.
    pub async fn shutdown(self) {
        if let Channel::Loopback(server) = self {
            server.shutdown().await;
        }
    }
}

/// Where one cache comes from or goes to, for every shard of a run.
#[derive(Debug, Clone, Default)]
pub struct CacheLinks {
    /// GET link of the saved folder (a hit).
    pub restore: Option<String>,
    /// PUT link to save it (a miss).
    pub save: Option<String>,
    /// Values in the links that must never be logged.
    pub secrets: Vec<String>,
}

fn url_spec(url: String, archive: &PackedArchive) -> SourceSpec {
    SourceSpec::Url {
        url,
        format: ArchiveFormat::TarZst,
        strip_components: 0,
        sha256: Some(archive.sha256.clone()),
    }
}
