//! One job's storage: where each output file goes ([`JobStorage::place`]: inline as base64, or
//! uploaded and returned as a presigned URL, largest first in `auto` mode, multipart above the
//! threshold), and `s3://` inputs read from the job's bucket ([`JobStorage::read`]).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::signer::{Method, Signer};
use object_store::{
    Attribute, Attributes, GetOptions, ObjectStore, PutMultipartOptions, PutOptions, PutPayload,
};
use tracing::{debug, info, warn};

use super::bucket::{describe_error, BucketError, Target};
use crate::config::{BucketLocation, StorageSettings, UploadMode};
use crate::job::collected_file::{base64_entry, CollectedFile};
use crate::job::output::FileEntry;

/// Files (and parts of one file) uploaded at once.
const UPLOAD_CONCURRENCY: usize = 2;

/// A generous estimate of a presigned URL without its key (~600 B in practice).
const URL_ESTIMATE: u64 = 1200;

/// The rest of a result (`{"output": {"images": [], …}}`, the platform's fields) with room to
/// spare; the texts and `errors` are counted on top.
const RESULT_OVERHEAD: u64 = 4096;

/// One job's bucket, if any: output placement and `s3://` inputs; cheap to clone.
#[derive(Debug, Clone)]
pub struct JobStorage {
    pub(super) settings: Arc<StorageSettings>,
    pub(super) job_id: String,
    pub(super) target: Option<Result<Arc<Target>, BucketError>>,
}

/// The result would be over `MAX_INLINE_OUTPUT_BYTES` with nowhere to upload the files to (no
/// bucket, or `OUTPUT_UPLOAD=never`): the platform would refuse it, so the job fails with this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "The job output is {} MB as base64, over the {} MB the platform accepts in a result (MAX_INLINE_OUTPUT_BYTES); {}",
    mb(*.bytes),
    mb(*.limit),
    if *.uploads_off { UPLOADS_OFF_FIX } else { NO_BUCKET_FIX }
)]
pub struct OverLimit {
    /// The whole result inline, in JSON bytes (an estimate, generous).
    pub bytes: u64,
    /// `MAX_INLINE_OUTPUT_BYTES`.
    pub limit: u64,
    /// A bucket is configured but `OUTPUT_UPLOAD=never` keeps everything inline.
    pub uploads_off: bool,
}

const UPLOADS_OFF_FIX: &str = "OUTPUT_UPLOAD=never keeps every output inline; set OUTPUT_UPLOAD=auto to upload large outputs to the configured bucket";
const NO_BUCKET_FIX: &str = "set BUCKET_ENDPOINT_URL/BUCKET_ACCESS_KEY_ID/BUCKET_SECRET_ACCESS_KEY (or send s3Config) to return large outputs as URLs";

/// An output file that could not be uploaded: worker-comfyui's line in the result's `errors`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Error uploading {filename} to S3: {failure}")]
pub struct UploadError {
    /// The file.
    pub filename: String,
    /// Why.
    pub failure: UploadFailure,
}

/// Why an upload failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadFailure {
    /// The job's bucket cannot be used.
    #[error(transparent)]
    Bucket(BucketError),
    /// The job has no bucket.
    #[error("no bucket is configured")]
    NoBucket,
    /// The bucket refused it or could not be reached (object_store's message, scrubbed of the
    /// secret, with a hint when the credentials were refused).
    #[error("{0}")]
    S3(String),
}

/// Why an `s3://bucket/key` input cannot be read ([`JobStorage::read`]): a phrase for
/// `Error downloading {name} from s3://…: {e}`.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The job's bucket cannot be used.
    #[error("the bucket cannot be used: {0}")]
    Bucket(BucketError),
    /// The job has no bucket.
    #[error("no bucket is configured: s3:// inputs are read from the worker's bucket (BUCKET_ENDPOINT_URL/BUCKET_ACCESS_KEY_ID/BUCKET_SECRET_ACCESS_KEY) or the job's s3Config")]
    NoBucket,
    /// The URL names another bucket than the job's.
    #[error("the bucket {bucket:?} is not the configured one ({configured:?}); s3:// inputs are read from the job's bucket only")]
    OtherBucket {
        /// The bucket in the URL.
        bucket: String,
        /// The job's bucket.
        configured: String,
    },
    /// The key is not a valid object path.
    #[error("invalid object key: {0}")]
    InvalidKey(object_store::path::Error),
    /// The URL has no key.
    #[error("the URL names no object key")]
    NoKey,
    /// The bucket has no such object.
    #[error("no such object in the bucket")]
    NotFound,
    /// The object's announced size is over the limit.
    #[error("the object is {size} bytes, larger than INPUT_URL_MAX_BYTES ({max_bytes} bytes)")]
    TooLarge {
        /// The object's size.
        size: u64,
        /// `INPUT_URL_MAX_BYTES`.
        max_bytes: u64,
    },
    /// More bytes came than the limit allows.
    #[error("the object is larger than INPUT_URL_MAX_BYTES ({max_bytes} bytes)")]
    LargerThan {
        /// `INPUT_URL_MAX_BYTES`.
        max_bytes: u64,
    },
    /// The bucket refused the read or could not be reached (object_store's message, scrubbed).
    #[error("{0}")]
    S3(String),
    /// What the bytes were handed to refused them (writing a model to disk).
    #[error("the object could not be stored: {0}")]
    Sink(String),
}

/// Base64 length of `n` bytes (padded).
pub(super) fn base64_len(n: usize) -> u64 {
    (n as u64).div_ceil(3) * 4
}

/// Bytes as MB (MiB, as the platform counts), one decimal unless whole, three below 0.05.
pub(super) fn mb(bytes: u64) -> String {
    let tenths = (bytes as f64 / 1_048_576.0 * 10.0).round() as u64;
    if tenths == 0 && bytes > 0 {
        return format!("{:.3}", bytes as f64 / 1_048_576.0);
    }
    if tenths.is_multiple_of(10) {
        format!("{}", tenths / 10)
    } else {
        format!("{}.{}", tenths / 10, tenths % 10)
    }
}

impl JobStorage {
    /// True when a bucket is configured for this job (usable or not).
    pub fn has_bucket(&self) -> bool {
        self.target.is_some()
    }

    /// Turns files into output entries, one per file in order: base64 entries, `s3_url` entries
    /// for uploaded files (same `content_type`, `format`, `frame_rate`), or an error line for a
    /// file whose upload failed. `reserved` is what the rest of the result takes (texts,
    /// `errors`), in JSON bytes. `Err` is the job's error when the result cannot be returned at
    /// all: over the inline limit with nothing to upload to, or uploads turned off.
    pub async fn place(
        &self,
        files: Vec<CollectedFile>,
        reserved: u64,
    ) -> Result<Vec<Result<FileEntry, UploadError>>, OverLimit> {
        let s = &self.settings;
        let all_inline: u64 =
            RESULT_OVERHEAD + reserved + files.iter().map(inline_size).sum::<u64>();
        let mode = if self.target.is_some() {
            s.mode
        } else {
            UploadMode::Never
        };
        let over_limit = |total: u64| s.max_inline_bytes.is_some_and(|limit| total > limit);
        let mut upload = vec![false; files.len()];
        match mode {
            UploadMode::Always => upload.iter_mut().for_each(|u| *u = true),
            UploadMode::Never => {
                if over_limit(all_inline) {
                    let limit = s.max_inline_bytes.unwrap_or_default();
                    warn!(
                        bytes = all_inline,
                        limit, "the output is too large to return inline"
                    );
                    return Err(OverLimit {
                        bytes: all_inline,
                        limit,
                        uploads_off: self.target.is_some(),
                    });
                }
            }
            UploadMode::Auto => {
                let mut order: Vec<usize> = (0..files.len()).collect();
                order.sort_by_key(|&i| std::cmp::Reverse(files[i].bytes.len()));
                let mut total = all_inline;
                for i in order {
                    if !over_limit(total) {
                        break;
                    }
                    upload[i] = true;
                    total = total - inline_size(&files[i]) + self.url_size(&files[i]);
                }
            }
        }
        let uploads = upload.iter().filter(|u| **u).count();
        if uploads > 0 {
            info!(
                files = files.len(),
                uploads,
                inline_bytes = all_inline,
                limit = ?s.max_inline_bytes,
                mode = ?mode,
                "uploading outputs to the bucket"
            );
        }
        let entries = futures_util::stream::iter(files.into_iter().zip(upload))
            .map(|(file, up)| async move {
                if up {
                    self.upload(file).await
                } else {
                    Ok(base64_entry(file))
                }
            })
            .buffered(UPLOAD_CONCURRENCY)
            .collect()
            .await;
        Ok(entries)
    }

    /// A generous estimate of a file's `s3_url` entry in the result.
    fn url_size(&self, file: &CollectedFile) -> u64 {
        let key = self.settings.prefix.len()
            + self.job_id.len()
            + file.subfolder.len()
            + file.filename.len();
        entry_size_without_data(file) + URL_ESTIMATE + 2 * key as u64
    }

    /// Uploads one file and returns its `s3_url` entry, or worker-comfyui's error line.
    async fn upload(&self, file: CollectedFile) -> Result<FileEntry, UploadError> {
        let fail = |failure: UploadFailure| UploadError {
            filename: file.filename.clone(),
            failure,
        };
        let target = match &self.target {
            Some(Ok(t)) => t,
            Some(Err(e)) => return Err(fail(UploadFailure::Bucket(e.clone()))),
            None => return Err(fail(UploadFailure::NoBucket)),
        };
        let key = self.key(&target.location, &file.subfolder, &file.filename);
        let started = std::time::Instant::now();
        let result = async {
            self.put(target, &key, &file).await?;
            target
                .store
                .signed_url(Method::GET, &key, self.settings.url_expiry)
                .await
        }
        .await;
        match result {
            Ok(url) => {
                debug!(
                    key = %key,
                    bytes = file.bytes.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "output uploaded"
                );
                Ok(FileEntry {
                    filename: file.filename,
                    kind: "s3_url".into(),
                    data: url.to_string().into(),
                    content_type: file.content_type,
                    format: file.format,
                    frame_rate: file.frame_rate,
                })
            }
            Err(e) => {
                let message = describe_error(&e, &target.secret);
                warn!(key = %key, error = %message, "output upload failed");
                Err(fail(UploadFailure::S3(message)))
            }
        }
    }

    /// `{path prefix}/{BUCKET_PREFIX}/{job_id}/{subfolder}/{filename}`, empty, `.` and `..`
    /// segments dropped.
    pub(super) fn key(
        &self,
        location: &BucketLocation,
        subfolder: &str,
        filename: &str,
    ) -> ObjectPath {
        let parts = [
            location.path_prefix.as_str(),
            self.settings.prefix.as_str(),
            self.job_id.as_str(),
            subfolder,
            filename,
        ];
        let key = parts
            .iter()
            .flat_map(|p| p.split('/'))
            .filter(|p| !matches!(*p, "" | "." | ".."))
            .collect::<Vec<_>>()
            .join("/");
        ObjectPath::from(key)
    }

    /// One `PUT` up to the multipart threshold, else a multipart upload (aborted on failure).
    async fn put(
        &self,
        target: &Target,
        key: &ObjectPath,
        file: &CollectedFile,
    ) -> object_store::Result<()> {
        let attributes: Attributes = [(Attribute::ContentType, file.content_type.clone())]
            .into_iter()
            .collect();
        // A spooled file is read from disk here: whole up to the multipart threshold, else one
        // part at a time (at most UPLOAD_CONCURRENCY parts in memory).
        let unreadable = |e: std::io::Error| object_store::Error::Generic {
            store: "output spool",
            source: Box::new(e),
        };
        if file.bytes.len() <= self.settings.multipart_threshold {
            let options = PutOptions {
                attributes,
                ..PutOptions::default()
            };
            let bytes = file.bytes.all().await.map_err(unreadable)?;
            target
                .store
                .put_opts(key, PutPayload::from_bytes(bytes), options)
                .await?;
            return Ok(());
        }
        let options = PutMultipartOptions {
            attributes,
            ..PutMultipartOptions::default()
        };
        let mut upload = target.store.put_multipart_opts(key, options).await?;
        let part_size = self.settings.part_size.max(1);
        let sent = async {
            let mut in_flight = futures_util::stream::FuturesOrdered::new();
            for start in (0..file.bytes.len()).step_by(part_size) {
                let part = file
                    .bytes
                    .range(start, part_size)
                    .await
                    .map_err(unreadable)?;
                in_flight.push_back(upload.put_part(PutPayload::from_bytes(part)));
                if in_flight.len() >= UPLOAD_CONCURRENCY {
                    if let Some(done) = in_flight.next().await {
                        done?;
                    }
                }
            }
            while let Some(done) = in_flight.next().await {
                done?;
            }
            Ok::<(), object_store::Error>(())
        }
        .await;
        let done = match sent {
            Ok(()) => upload.complete().await.map(|_| ()),
            Err(e) => Err(e),
        };
        if done.is_err() {
            if let Err(e) = upload.abort().await {
                debug!(error = %e, "aborting the multipart upload failed");
            }
        }
        done
    }

    /// The bytes of `s3://bucket/key`, an input file: read from the job's bucket (its
    /// `s3Config`, else the worker's) when `bucket` is that bucket, refused when the object is
    /// larger than `max_bytes` (`INPUT_URL_MAX_BYTES`, by its size before reading and by
    /// counting while reading). The key is the object's full key (no prefix is added). The
    /// error is a phrase for `Error downloading {name} from s3://…: {e}`.
    pub async fn read(&self, bucket: &str, key: &str, max_bytes: u64) -> Result<Bytes, ReadError> {
        let mut buf = BytesMut::new();
        let mut reserved = false;
        self.read_stream(bucket, key, max_bytes, &mut |size, chunk| {
            if !reserved {
                // Reserved up front only up to 8 MiB: the announced size is a claim, not bytes.
                buf.reserve(size.min(8 * 1024 * 1024) as usize);
                reserved = true;
            }
            buf.extend_from_slice(chunk);
            Ok(())
        })
        .await?;
        Ok(buf.freeze())
    }

    /// [`JobStorage::read`] chunk by chunk, for objects too large to hold (models): each chunk
    /// goes to `on_chunk` with the object's announced size; returns the bytes read. An error
    /// `on_chunk` returns ends the read as [`ReadError::Sink`].
    pub async fn read_stream(
        &self,
        bucket: &str,
        key: &str,
        max_bytes: u64,
        on_chunk: &mut (dyn FnMut(u64, &[u8]) -> std::io::Result<()> + Send),
    ) -> Result<u64, ReadError> {
        let target = match &self.target {
            Some(Ok(t)) => t,
            Some(Err(e)) => return Err(ReadError::Bucket(e.clone())),
            None => return Err(ReadError::NoBucket),
        };
        if bucket != target.location.bucket {
            return Err(ReadError::OtherBucket {
                bucket: bucket.to_owned(),
                configured: target.location.bucket.clone(),
            });
        }
        let path = ObjectPath::parse(key).map_err(ReadError::InvalidKey)?;
        if path.as_ref().is_empty() {
            return Err(ReadError::NoKey);
        }
        let started = std::time::Instant::now();
        let result = target
            .store
            .get_opts(&path, GetOptions::default())
            .await
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => ReadError::NotFound,
                e => ReadError::S3(describe_error(&e, &target.secret)),
            })?;
        let size = result.meta.size;
        if size > max_bytes {
            return Err(ReadError::TooLarge { size, max_bytes });
        }
        let mut done = 0u64;
        let mut stream = result.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ReadError::S3(describe_error(&e, &target.secret)))?;
            if done + chunk.len() as u64 > max_bytes {
                return Err(ReadError::LargerThan { max_bytes });
            }
            done += chunk.len() as u64;
            on_chunk(size, &chunk).map_err(|e| ReadError::Sink(e.to_string()))?;
        }
        debug!(
            key = %path,
            bytes = done,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "object read from the bucket"
        );
        Ok(done)
    }
}

/// A file's entry in the result without its `data`, in JSON bytes (with the separator).
pub(super) fn entry_size_without_data(file: &CollectedFile) -> u64 {
    let entry = FileEntry {
        filename: file.filename.clone(),
        kind: "base64".into(),
        data: String::new().into(),
        content_type: file.content_type.clone(),
        format: file.format.clone(),
        frame_rate: file.frame_rate.clone(),
    };
    serde_json::to_vec(&entry).map_or(256, |v| v.len() as u64) + 2
}

/// A file's base64 entry in the result, in JSON bytes.
pub(super) fn inline_size(file: &CollectedFile) -> u64 {
    entry_size_without_data(file) + base64_len(file.bytes.len())
}
