//! The S3 artifact store: content-addressed uploads (multipart, streamed
//! from disk) and presigned GET links for the shards.

use std::time::Duration;

use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use futures::{StreamExt, TryStreamExt};

use super::{ArtifactError, CacheLinks, PackedArchive};

/// Size of one multipart part; archives up to this size go in one PUT.
const PART_SIZE: u64 = 16 * 1024 * 1024;
/// Parts in flight at once (each streams from the file: memory stays flat).
const PARTS_IN_FLIGHT: usize = 4;
/// S3's limit on a presigned link's lifetime (SigV4).
const MAX_LINK_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// A bucket and prefix that hold a run's archives.
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    link_lifetime: Duration,
}

/// What [`S3Store::upload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    /// The object's key.
    pub key: String,
    /// True when the object was already there and nothing was sent.
    pub skipped: bool,
}

/// Splits `s3://bucket/prefix` into bucket and prefix (no slashes at its ends).
pub fn parse_location(given: &str) -> Result<(String, String), ArtifactError> {
    let err = |problem: &str| ArtifactError::Url {
        given: given.to_string(),
        problem: problem.to_string(),
    };
    let rest = given
        .strip_prefix("s3://")
        .ok_or_else(|| err("not an s3:// location"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if !valid {
        return Err(err(
            "the bucket name must be 3 to 63 lower-case letters, digits, dots and hyphens",
        ));
    }
    Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

impl S3Store {
    /// Connects with the AWS SDK's own configuration (credentials, region,
    /// `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`); a custom endpoint is
    /// addressed path-style, as S3 servers on loopback need.
    pub async fn connect(
        location: &str,
        region: Option<String>,
        link_lifetime: Duration,
    ) -> Result<Self, ArtifactError> {
        let (bucket, prefix) = parse_location(location)?;
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = region {
            loader = loader.region(aws_config::Region::new(region));
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(ArtifactError::Config {
                location: location.to_string(),
                message: "no AWS region: set AWS_REGION (the bucket's region) or pass --region"
                    .into(),
            });
        }
        let custom_endpoint = sdk.endpoint_url().is_some()
            || ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
                .iter()
                .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
        let config = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(custom_endpoint)
            // Integrity is the archive's SHA-256, checked by every agent; the
            // SDK's default trailing checksums are not spoken by every S3 server.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        Ok(S3Store {
            client: aws_sdk_s3::Client::from_conf(config),
            bucket,
            prefix,
            link_lifetime: link_lifetime.min(MAX_LINK_LIFETIME),
        })
    }

    /// The key of an archive with this hash.
    pub fn archive_key(&self, sha256: &str) -> String {
        self.key(&format!("archives/{sha256}.tar.zst"))
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.prefix)
        }
    }

    fn location(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// The size of the object at `key`, or `None` when there is none.
    async fn size_of(&self, key: &str) -> Result<Option<i64>, ArtifactError> {
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await;
        match head {
            Ok(found) => Ok(Some(found.content_length().unwrap_or(-1))),
            // Without s3:ListBucket (the template grants none) a missing object answers 403.
            Err(e)
                if e.as_service_error().is_some_and(|s| s.is_not_found())
                    || e.raw_response().is_some_and(|r| r.status().as_u16() == 403) =>
            {
                Ok(None)
            }
            Err(e) => Err(self.sdk_error(key, "HeadObject", e)),
        }
    }

    /// Uploads `archive` under its hash unless an object is already there.
    pub async fn upload(&self, archive: &PackedArchive) -> Result<Uploaded, ArtifactError> {
        let key = self.archive_key(&archive.sha256);
        if self.size_of(&key).await? == Some(archive.size as i64) {
            return Ok(Uploaded { key, skipped: true });
        }
        if archive.size <= PART_SIZE {
            let body = ByteStream::from_path(archive.path())
                .await
                .map_err(|e| ArtifactError::Io(std::io::Error::other(e)))?;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&key)
                .content_length(archive.size as i64)
                .body(body)
                .send()
                .await
                .map_err(|e| self.sdk_error(&key, "PutObject", e))?;
        } else {
            self.multipart(archive, &key).await?;
        }
        Ok(Uploaded {
            key,
            skipped: false,
        })
    }

    async fn multipart(&self, archive: &PackedArchive, key: &str) -> Result<(), ArtifactError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.sdk_error(key, "CreateMultipartUpload", e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let parts = archive.size.div_ceil(PART_SIZE);
        let sent: Result<Vec<CompletedPart>, ArtifactError> = futures::stream::iter(0..parts)
            .map(|i| {
                let upload_id = &upload_id;
                async move {
                    let offset = i * PART_SIZE;
                    let length = PART_SIZE.min(archive.size - offset);
                    let body = ByteStream::read_from()
                        .path(archive.path())
                        .offset(offset)
                        .length(Length::Exact(length))
                        .build()
                        .await
                        .map_err(|e| ArtifactError::Io(std::io::Error::other(e)))?;
                    let part = self
                        .client
                        .upload_part()
                        .bucket(&self.bucket)
                        .key(key)
                        .upload_id(upload_id)
                        .part_number(i as i32 + 1)
                        .content_length(length as i64)
                        .body(body)
                        .send()
                        .await
                        .map_err(|e| self.sdk_error(key, "UploadPart", e))?;
                    Ok(CompletedPart::builder()
                        .part_number(i as i32 + 1)
                        .set_e_tag(part.e_tag().map(str::to_string))
                        .build())
                }
            })
            .buffered(PARTS_IN_FLIGHT)
            .try_collect()
            .await;
        let completed = match sent {
            Ok(parts) => self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.sdk_error(key, "CompleteMultipartUpload", e)),
            Err(e) => Err(e),
        };
        if completed.is_err() {
            // Parts of an unfinished upload are billed until aborted (the
            // template's lifecycle rule also aborts them after a day).
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        completed
    }

    /// A link that lets its holder GET `key`, and nothing else, for the link lifetime.
    pub async fn presign_get(&self, key: &str) -> Result<String, ArtifactError> {
        let config = self.presigning(key)?;
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(config)
            .await
            .map_err(|e| self.sdk_error(key, "presigning GetObject", e))?;
        Ok(request.uri().to_string())
    }

    /// A GET link when the cache `key` was saved, else a PUT link to save it.
    pub async fn cache(&self, key: &str) -> Result<CacheLinks, ArtifactError> {
        let object = self.key(&format!("caches/{key}.tar.zst"));
        let config = self.presigning(&object)?;
        let (restore, save) = match self.size_of(&object).await? {
            Some(_) => (Some(self.presign_get(&object).await?), None),
            None => {
                // `If-None-Match: *` is signed: the link can create the
                // object, never replace a saved cache, whoever holds it.
                let put = self
                    .client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(&object)
                    .if_none_match("*")
                    .presigned(config)
                    .await
                    .map_err(|e| self.sdk_error(&object, "presigning PutObject", e))?;
                (None, Some(put.uri().to_string()))
            }
        };
        let secrets = restore
            .iter()
            .chain(&save)
            .flat_map(|u| link_secrets(u))
            .collect();
        Ok(CacheLinks {
            restore,
            save,
            secrets,
        })
    }

    fn presigning(&self, key: &str) -> Result<PresigningConfig, ArtifactError> {
        PresigningConfig::expires_in(self.link_lifetime).map_err(|e| ArtifactError::Config {
            location: self.location(key),
            message: e.to_string(),
        })
    }

    /// A store error in one line; 4xx answers are configuration (bucket, permissions).
    fn sdk_error<E>(&self, key: &str, action: &str, e: SdkError<E, HttpResponse>) -> ArtifactError
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let client_fault = e
            .raw_response()
            .is_some_and(|r| r.status().is_client_error());
        let message = format!("{action} failed: {}", crate::backend::errors::causes(&e));
        if client_fault || matches!(e, SdkError::ConstructionFailure(_)) {
            ArtifactError::Config {
                location: self.location(key),
                message,
            }
        } else {
            ArtifactError::Store {
                location: self.location(key),
                message,
            }
        }
    }
}

/// The parts of a presigned link that grant access (signature, credential,
/// session token), to mask in CI logs.
pub fn link_secrets(url: &str) -> Vec<String> {
    let Some((_, query)) = url.split_once('?') else {
        return Vec::new();
    };
    let mut secrets = vec![query.to_string()];
    for pair in query.split('&') {
        if let Some((name, value)) = pair.split_once('=') {
            let name = name.to_ascii_lowercase();
            if [
                "x-amz-signature",
                "x-amz-credential",
                "x-amz-security-token",
            ]
            .contains(&name.as_str())
                && value.len() >= 4
            {
                secrets.push(value.to_string());
            }
        }
    }
    secrets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_location("s3://my-bucket/runs/ci/").unwrap(),
            ("my-bucket".into(), "runs/ci".into())
        );
        assert_eq!(
            parse_location("s3://my-bucket").unwrap(),
            ("my-bucket".into(), String::new())
        );
        for bad in ["my-bucket", "https://x/y", "s3://", "s3://B/x", "s3://ab"] {
            let e = parse_location(bad).unwrap_err();
            assert!(e.to_string().contains("s3://BUCKET"), "{bad}: {e}");
            assert!(e.is_config());
        }
    }

    #[test]
    fn link_secrets_are_the_signature_credential_and_token() {
        let url = "http://127.0.0.1:9/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAX%2F2026&X-Amz-Security-Token=tok123&X-Amz-Signature=abcdef0123";
        let secrets = link_secrets(url);
        for s in ["AKIAX%2F2026", "tok123", "abcdef0123"] {
            assert!(secrets.iter().any(|x| x == s), "{s} in {secrets:?}");
        }
        assert!(!secrets.iter().any(|x| x == "AWS4-HMAC-SHA256"));
        assert!(link_secrets("http://127.0.0.1/no-query").is_empty());
    }
}
