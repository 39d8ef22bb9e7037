//! Fetching a job's input files before anything is uploaded: URL inputs downloaded through the
//! SSRF guard ([`crate::ssrf`]) within [`InputPolicy`]'s limits, `s3://` inputs read from the
//! job's bucket within the same size limit, a few at a time; one failure fails them all, so a
//! bad URL fails the job before ComfyUI sees any of it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::media::{media_type_of, note_mismatch};
use super::{InputFile, Source};
use crate::comfy::Upload;
use crate::config::InputPolicy;
use crate::job::failure::{JobFailure, Report};
use crate::job::storage::{JobStorage, ReadError};
use crate::media_type::{extension_for, sniff_media_type};
use crate::ssrf::{Downloader, FetchError, Guard, Limits};

/// Redirects followed for one URL input.
pub const MAX_REDIRECTS: usize = 5;

/// URL inputs downloaded at once.
pub const DOWNLOAD_CONCURRENCY: usize = 4;

/// How to ask for a refused URL anyway.
const ALLOW_HINT: &str = "(set ALLOW_PRIVATE_INPUT_URLS=true to allow it)";

/// An input file that could not be fetched: a line in the job's `details`.
#[derive(Debug, thiserror::Error)]
#[error("Error downloading {name} from {from}: {failure}")]
pub struct DownloadError {
    /// The file's name.
    pub name: String,
    /// Where from, as it may be shown (a URL without its query, or `s3://bucket/key`).
    pub from: String,
    /// Why.
    pub failure: DownloadFailure,
}

/// Why an input file could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum DownloadFailure {
    /// The URL could not be downloaded.
    #[error("{}", describe(.error, *.max_bytes, *.timeout))]
    Url {
        /// What the guarded download gave.
        error: FetchError,
        /// `INPUT_URL_MAX_BYTES`, for the message.
        max_bytes: u64,
        /// `INPUT_URL_TIMEOUT_S`, for the message.
        timeout: Duration,
    },
    /// The `s3://` object could not be read from the job's bucket.
    #[error(transparent)]
    S3(#[from] ReadError),
    /// Reading the `s3://` object took longer than `INPUT_URL_TIMEOUT_S`.
    #[error("timed out after {} s (INPUT_URL_TIMEOUT_S)", .0.as_secs_f64())]
    TimedOut(Duration),
    /// It came empty.
    #[error("the file is empty")]
    Empty,
    /// A file the front end holds could not be read (an asset deleted meanwhile).
    #[error("cannot read it: {0}")]
    Local(String),
}

/// Gets the bytes of input files: decoded ones as they are, URL inputs downloaded through the
/// SSRF guard within the [`InputPolicy`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct Fetcher {
    downloader: Downloader,
    policy: InputPolicy,
}

impl Fetcher {
    /// A fetcher under `policy`.
    pub fn new(policy: &InputPolicy) -> Fetcher {
        let guard = Guard::new(policy.allow_private, policy.timeout)
            .with_allowed_hosts(&policy.allowed_hosts);
        let limits = Limits {
            max_bytes: policy.max_bytes,
            timeout: policy.timeout,
            max_redirects: MAX_REDIRECTS,
        };
        Fetcher {
            downloader: Downloader::new(guard, limits, "input URL host"),
            policy: policy.clone(),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &InputPolicy {
        &self.policy
    }

    /// Every file's bytes, ready to upload in order: URL inputs are downloaded and `s3://`
    /// inputs read from the job's bucket (`storage`) [`DOWNLOAD_CONCURRENCY`] at a time. Any
    /// failure fails the whole list (each one named under `Failed to upload one or more input
    /// images`), so nothing is uploaded.
    pub async fn fetch_all(
        &self,
        files: &[InputFile],
        storage: &JobStorage,
        cancel: &CancellationToken,
    ) -> Result<Vec<Upload>, JobFailure> {
        // Owned futures: borrowed ones trip the compiler's `Send` inference for spawned callers.
        let all = futures_util::stream::iter(files.to_vec())
            .map(|file| {
                let this = self.clone();
                let storage = storage.clone();
                async move { this.fetch_one(&file, &storage).await }
            })
            .buffered(DOWNLOAD_CONCURRENCY)
            .collect::<Vec<_>>();
        let results = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                return Err(JobFailure::Cancelled(Report::new("Job cancelled while downloading input files")))
            }
            results = all => results,
        };
        let mut uploads = Vec::with_capacity(results.len());
        let mut problems = Vec::new();
        for r in results {
            match r {
                Ok(upload) => uploads.push(upload),
                Err(problem) => problems.push(problem.to_string()),
            }
        }
        if problems.is_empty() {
            Ok(uploads)
        } else {
            Err(JobFailure::InputFiles(Report::with_details(
                "Failed to upload one or more input images",
                problems,
            )))
        }
    }

    async fn fetch_one(
        &self,
        file: &InputFile,
        storage: &JobStorage,
    ) -> Result<Upload, DownloadError> {
        let fail = |failure: DownloadFailure| DownloadError {
            name: file.name.clone(),
            from: file.source.describe(),
            failure,
        };
        let (data, declared) = match &file.source {
            Source::Inline { data, media_type } => (data.clone(), media_type.clone()),
            Source::Url(url) => {
                let started = Instant::now();
                let fetched = self
                    .downloader
                    .get(url)
                    .await
                    .map_err(|e| fail(self.failure(e)))?;
                info!(
                    name = %file.name,
                    url = %file.source.describe(),
                    bytes = fetched.data.len(),
                    redirects = fetched.redirects,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "input downloaded"
                );
                note_mismatch(
                    &file.name,
                    fetched.content_type.as_deref(),
                    &fetched.data,
                    "the server's Content-Type",
                );
                (fetched.data, fetched.content_type)
            }
            Source::S3 { bucket, key } => {
                let started = Instant::now();
                let data = self.fetch_s3(bucket, key, storage).await.map_err(fail)?;
                info!(
                    name = %file.name,
                    url = %file.source.describe(),
                    bytes = data.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "input read from the bucket"
                );
                (data, None)
            }
            Source::Local(path) => match tokio::fs::read(path).await {
                Ok(data) => (Bytes::from(data), None),
                Err(e) => return Err(fail(DownloadFailure::Local(e.to_string()))),
            },
        };
        if data.is_empty() {
            return Err(fail(DownloadFailure::Empty));
        }
        let mut name = file.name.clone();
        if file.name_derived && !name.contains('.') {
            if let Some(ext) = sniff_media_type(&data).and_then(extension_for) {
                name = format!("{name}.{ext}");
            }
        }
        let content_type = media_type_of(&name, &data, declared.as_deref());
        Ok(Upload {
            name,
            data,
            subfolder: file.subfolder.clone(),
            folder_type: file.folder_type.clone(),
            content_type: Some(content_type),
            original_ref: file.original_ref.clone(),
        })
    }

    /// The bytes of `s3://bucket/key`, read from the job's bucket (its `s3Config`, else the
    /// worker's `BUCKET_*`) when `bucket` is that bucket, within `INPUT_URL_MAX_BYTES` and
    /// `INPUT_URL_TIMEOUT_S` (see [`JobStorage::read`]).
    pub async fn fetch_s3(
        &self,
        bucket: &str,
        key: &str,
        storage: &JobStorage,
    ) -> Result<Bytes, DownloadFailure> {
        let read = storage.read(bucket, key, self.policy.max_bytes);
        match tokio::time::timeout(self.policy.timeout, read).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(DownloadFailure::TimedOut(self.policy.timeout)),
        }
    }

    /// A download failure, with the limits its message names.
    fn failure(&self, error: FetchError) -> DownloadFailure {
        DownloadFailure::Url {
            error,
            max_bytes: self.policy.max_bytes,
            timeout: self.policy.timeout,
        }
    }
}

/// A download failure, in words.
fn describe(e: &FetchError, max: u64, timeout: Duration) -> String {
    match e {
        FetchError::Invalid {
            redirect: None,
            reason,
        } => format!("invalid URL: {reason}"),
        FetchError::Invalid {
            redirect: Some(to),
            reason,
        } => format!("invalid redirect to {to}: {reason}"),
        FetchError::Refused {
            redirect: None,
            reason,
        } => format!("refused: {reason} {ALLOW_HINT}"),
        FetchError::Refused {
            redirect: Some(to),
            reason,
        } => format!("redirect to {to} refused: {reason} {ALLOW_HINT}"),
        FetchError::TooLarge {
            announced: Some(len),
        } => format!(
            "the server announces {len} bytes, larger than INPUT_URL_MAX_BYTES ({max} bytes)"
        ),
        FetchError::TooLarge { announced: None } => {
            format!("the file is larger than INPUT_URL_MAX_BYTES ({max} bytes)")
        }
        FetchError::TimedOut => format!(
            "timed out after {} s (INPUT_URL_TIMEOUT_S)",
            timeout.as_secs_f64()
        ),
        FetchError::TooManyRedirects => format!("more than {MAX_REDIRECTS} redirects"),
        FetchError::Status(status) => format!("the server answered {status}"),
        FetchError::Transport(e) => e.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::input::tests::{files_of, WF};
    use crate::job::JobOutput;
    use serde_json::{json, Value};

    #[tokio::test]
    async fn fetching_inline_files_and_s3_without_a_bucket() {
        let wf: Value = serde_json::from_str(WF).unwrap();
        let files = files_of(json!({"workflow": wf, "images": [
            {"name": "a.png", "image": "aGk=", "subfolder": "x", "type": "temp"},
            {"name": "b.bin", "image": "data:image/png;base64,aGk="},
        ]}));
        let fetcher = Fetcher::new(&InputPolicy::default());
        let storage = crate::job::Storage::new(Default::default())
            .for_job("job-1", None)
            .await
            .unwrap();
        let cancel = CancellationToken::new();
        let uploads = fetcher.fetch_all(&files, &storage, &cancel).await.unwrap();
        assert_eq!(uploads[0].name, "a.png");
        assert_eq!(uploads[0].subfolder, "x");
        assert_eq!(uploads[0].folder_type, "temp");
        assert_eq!(uploads[0].content_type.as_deref(), Some("image/png"));
        assert_eq!(&uploads[0].data[..], b"hi");
        assert_eq!(uploads[1].content_type.as_deref(), Some("image/png"));
        let files =
            files_of(json!({"workflow": wf, "images": [{"image": "s3://bucket/in/a.png"}]}));
        let out = fetcher
            .fetch_all(&files, &storage, &cancel)
            .await
            .unwrap_err();
        let out = JobOutput::from(out).to_json();
        assert_eq!(
            out,
            json!({"error": "Failed to upload one or more input images", "details": [
                "Error downloading a.png from s3://bucket/in/a.png: no bucket is configured: s3:// inputs are read from the worker's bucket (BUCKET_ENDPOINT_URL/BUCKET_ACCESS_KEY_ID/BUCKET_SECRET_ACCESS_KEY) or the job's s3Config"
            ]})
        );
        // Refused before any connection: no network needed.
        let files = files_of(
            json!({"workflow": wf, "images": [{"name": "input.png", "image": "http://10.0.0.5/x.png?sig=1"}]}),
        );
        let out = fetcher
            .fetch_all(&files, &storage, &cancel)
            .await
            .unwrap_err();
        let out = JobOutput::from(out).to_json();
        assert_eq!(
            out["details"][0],
            "Error downloading input.png from http://10.0.0.5/x.png?…: refused: 10.0.0.5 is a private address (set ALLOW_PRIVATE_INPUT_URLS=true to allow it)"
        );
        cancel.cancel();
        let out = fetcher
            .fetch_all(&files, &storage, &cancel)
            .await
            .unwrap_err();
        assert!(matches!(out, JobFailure::Cancelled(_)), "{out}");
        assert!(out.message().contains("cancelled"));
    }
}
