//! A job's bucket: where its output files go, inline as base64 (worker-comfyui's default) or
//! uploaded to an S3-compatible bucket and returned as presigned GET URLs (`"type": "s3_url"`),
//! and where its `s3://bucket/key` inputs are read from.
//!
//! * The bucket comes from `BUCKET_ENDPOINT_URL` / `BUCKET_ACCESS_KEY_ID` /
//!   `BUCKET_SECRET_ACCESS_KEY` (worker-comfyui's names) plus `BUCKET_NAME`, `BUCKET_PREFIX`,
//!   `BUCKET_REGION`, or, for one job, from the job's `s3Config` (the platform's field,
//!   `{accessId, accessSecret, bucketName, endpointUrl}`), which replaces the env bucket.
//! * A job's `s3Config.endpointUrl` comes from the client, so it passes the SSRF guard of
//!   [`crate::ssrf`] (checked when the job starts, and every connection through a guarded
//!   resolver): loopback, private, link-local and metadata addresses are refused unless
//!   `ALLOW_PRIVATE_S3_ENDPOINTS=true`. The operator's `BUCKET_ENDPOINT_URL` is trusted.
//! * `OUTPUT_UPLOAD` picks when to upload: `auto` (default) only when the result would exceed
//!   `MAX_INLINE_OUTPUT_BYTES` (the largest files go first, until the rest fits), `always`, or
//!   `never`. A result over the limit that cannot be uploaded fails the job with a message
//!   naming its size and the fix, instead of a result the platform would refuse. Every file kind
//!   (images, videos, audio, other keys) may be uploaded; text outputs stay inline.
//! * Keys are `{prefix}/{job_id}/{subfolder}/{filename}` (no subfolder for most outputs); files
//!   above [`StorageSettings::multipart_threshold`] go up as a multipart upload. A failed upload
//!   is an `errors` entry (`Error uploading {filename} to S3: …`), never a failed worker.
//! * `s3://bucket/key` inputs ([`JobStorage::read`]) are read from the job's bucket when the
//!   bucket names match, within `INPUT_URL_MAX_BYTES`.
//!
//! Secrets never reach logs or messages: they are [`Secret`]s, and S3 errors are scrubbed.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{HttpClient, HttpConnector};
use object_store::path::Path as ObjectPath;
use object_store::signer::{Method, Signer};
use object_store::{
    Attribute, Attributes, BackoffConfig, ClientOptions, GetOptions, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, RetryConfig,
};
use serde_json::Value;
use tracing::{debug, info, warn};

use super::collect::{base64_entry, CollectedFile};
use super::output::FileEntry;
use crate::config::{
    locate, BucketLocation, BucketSettings, Names, StorageSettings, UploadMode, ENV_NAMES,
    JOB_NAMES,
};
use crate::secret::Secret;
use crate::ssrf::{Guard, UrlError};

/// Files (and parts of one file) uploaded at once.
const UPLOAD_CONCURRENCY: usize = 2;
/// A generous estimate of a presigned URL without its key (~600 B in practice).
const URL_ESTIMATE: u64 = 1200;
/// The rest of a result (`{"output": {"images": [], …}}`, the platform's fields) with room to
/// spare; the texts and `errors` are counted on top.
const RESULT_OVERHEAD: u64 = 4096;
/// Connection bound for a bucket's endpoint (also bounds the SSRF guard's lookup).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound for one request to a bucket.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// How to allow a job's private endpoint anyway.
const ALLOW_HINT: &str = "(set ALLOW_PRIVATE_S3_ENDPOINTS=true to allow it)";

/// A job's `s3Config`: top level on the job (`top`) first, then inside `input` (an object, or a
/// JSON string holding one). `null` counts as absent.
pub fn job_s3_config(top: Option<&Value>, input: Option<&Value>) -> Option<Value> {
    let present = |v: Option<&Value>| v.filter(|v| !v.is_null()).cloned();
    if let Some(v) = present(top) {
        return Some(v);
    }
    match input {
        Some(Value::String(s)) => serde_json::from_str::<Value>(s)
            .ok()
            .and_then(|i| present(i.get("s3Config"))),
        Some(i) => present(i.get("s3Config")),
        None => None,
    }
}

/// Parses `{accessId, accessSecret, bucketName?, endpointUrl, region?}`.
fn parse_s3_config(value: &Value) -> Result<BucketSettings, String> {
    const USAGE: &str =
        "expected {\"accessId\", \"accessSecret\", \"endpointUrl\", \"bucketName\"?}";
    let Value::Object(map) = value else {
        return Err(format!("Invalid s3Config: not an object; {USAGE}"));
    };
    let field = |key: &str, required: bool| -> Result<Option<String>, String> {
        match map.get(key) {
            None | Some(Value::Null) if !required => Ok(None),
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.trim().to_owned())),
            Some(Value::String(_)) if !required => Ok(None),
            _ => Err(format!(
                "Invalid s3Config: '{key}' must be a non-empty string; {USAGE}"
            )),
        }
    };
    Ok(BucketSettings {
        endpoint_url: field("endpointUrl", true)?.unwrap_or_default(),
        access_key_id: field("accessId", true)?.unwrap_or_default(),
        secret_access_key: Secret::new(field("accessSecret", true)?.unwrap_or_default()),
        bucket_name: field("bucketName", false)?,
        region: field("region", false)?,
    })
}

/// A bucket a job writes to and reads from, with its client.
#[derive(Debug)]
struct Target {
    store: AmazonS3,
    location: BucketLocation,
    secret: Secret,
}

/// object_store's HTTP client for a job's own endpoint: built by the SSRF guard (its resolver
/// refuses private addresses at every connection, no proxy, no redirects).
#[derive(Debug)]
struct GuardedConnector {
    guard: Guard,
}

impl HttpConnector for GuardedConnector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        let builder = reqwest::Client::builder()
            .user_agent(concat!("comfy-worker/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT);
        let client = self
            .guard
            .client(builder, "S3 endpoint host")
            .build()
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })?;
        Ok(HttpClient::new(client))
    }
}

impl Target {
    /// A client for `bucket`; `guard` (a job's `s3Config`) makes every connection go through
    /// the SSRF guard.
    fn build(
        bucket: &BucketSettings,
        names: Names,
        guard: Option<Guard>,
    ) -> Result<Target, String> {
        let location = locate(bucket, names)?;
        let mut builder = AmazonS3Builder::new();
        if let Some(guard) = guard {
            builder = builder.with_http_connector(GuardedConnector { guard });
        }
        let store = builder
            .with_endpoint(&location.endpoint)
            .with_bucket_name(&location.bucket)
            .with_virtual_hosted_style_request(location.virtual_hosted)
            .with_region(&location.region)
            .with_access_key_id(&bucket.access_key_id)
            .with_secret_access_key(bucket.secret_access_key.expose())
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(true)
                    .with_connect_timeout(CONNECT_TIMEOUT)
                    .with_timeout(REQUEST_TIMEOUT),
            )
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 3,
                retry_timeout: Duration::from_secs(60),
            })
            .build()
            .map_err(|e| scrub(&e.to_string(), &bucket.secret_access_key))?;
        Ok(Target {
            store,
            location,
            secret: bucket.secret_access_key.clone(),
        })
    }
}

/// Removes a secret from a message (object_store never prints it; this is a second guard).
fn scrub(message: &str, secret: &Secret) -> String {
    let s = secret.expose();
    if s.len() >= 4 {
        message.replace(s, "[redacted]")
    } else {
        message.to_owned()
    }
}

/// Places output files for every job; built once from the settings.
#[derive(Debug, Clone)]
pub struct Storage {
    settings: Arc<StorageSettings>,
    /// The env bucket's client, or why it could not be built.
    env_target: Option<Result<Arc<Target>, String>>,
}

impl Storage {
    /// The storage for `settings` (builds the env bucket's client; nothing is contacted).
    pub fn new(settings: StorageSettings) -> Storage {
        let env_target = settings.bucket.as_ref().map(|b| {
            let target = Target::build(b, ENV_NAMES, None).map(Arc::new);
            match &target {
                Ok(t) => info!(
                    bucket = %t.location.bucket,
                    endpoint = %t.location.endpoint,
                    region = %t.location.region,
                    mode = ?settings.mode,
                    "output bucket configured"
                ),
                Err(e) => warn!(error = %e, "the output bucket cannot be used"),
            }
            target
        });
        if settings.bucket.is_none() && settings.mode == UploadMode::Always {
            warn!("OUTPUT_UPLOAD=always but no bucket is configured (BUCKET_ENDPOINT_URL); outputs stay base64 unless a job sends s3Config");
        }
        Storage {
            settings: Arc::new(settings),
            env_target,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &StorageSettings {
        &self.settings
    }

    /// The bucket of one job: the job's `s3Config` (see [`job_s3_config`]) replaces the env
    /// bucket. Its endpoint must pass the SSRF guard (unless `ALLOW_PRIVATE_S3_ENDPOINTS`), and
    /// the guard stays on its connections. An invalid or refused `s3Config` is an error message
    /// for the job's output.
    pub async fn for_job(
        &self,
        job_id: &str,
        s3_config: Option<&Value>,
    ) -> Result<JobStorage, String> {
        let target = match s3_config {
            Some(value) => {
                let bucket = parse_s3_config(value)?;
                locate(&bucket, JOB_NAMES).map_err(|e| format!("Invalid s3Config: {e}"))?;
                let guard = Guard::new(self.settings.allow_private_endpoints, CONNECT_TIMEOUT);
                guard
                    .check(&bucket.endpoint_url)
                    .await
                    .map_err(|e| match e {
                        UrlError::Refused(why) => format!(
                            "Invalid s3Config: {} refused: {why} {ALLOW_HINT}",
                            JOB_NAMES.endpoint
                        ),
                        UrlError::Invalid(why) => {
                            format!("Invalid s3Config: {}: {why}", JOB_NAMES.endpoint)
                        }
                    })?;
                let target = Target::build(&bucket, JOB_NAMES, Some(guard))
                    .map_err(|e| format!("Invalid s3Config: {e}"))?;
                info!(bucket = %target.location.bucket, endpoint = %target.location.endpoint, "the job uses its s3Config bucket");
                Some(Ok(Arc::new(target)))
            }
            None => self.env_target.clone(),
        };
        Ok(JobStorage {
            settings: self.settings.clone(),
            job_id: job_id.to_owned(),
            target,
        })
    }
}

/// One job's bucket, if any: output placement and `s3://` inputs; cheap to clone.
#[derive(Debug, Clone)]
pub struct JobStorage {
    settings: Arc<StorageSettings>,
    job_id: String,
    target: Option<Result<Arc<Target>, String>>,
}

/// How the over-limit error of [`JobStorage::place`] begins.
const OVER_LIMIT_PREFIX: &str = "The job output is ";

/// Base64 length of `n` bytes (padded).
fn base64_len(n: usize) -> u64 {
    (n as u64).div_ceil(3) * 4
}

/// Bytes as MB (MiB, as the platform counts), one decimal unless whole, three below 0.05.
fn mb(bytes: u64) -> String {
    let tenths = (bytes as f64 / 1_048_576.0 * 10.0).round() as u64;
    if tenths == 0 && bytes > 0 {
        return format!("{:.3}", bytes as f64 / 1_048_576.0);
    }
    if tenths % 10 == 0 {
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
    ) -> Result<Vec<Result<FileEntry, String>>, String> {
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
                    let fix = if self.target.is_some() {
                        "OUTPUT_UPLOAD=never keeps every output inline; set OUTPUT_UPLOAD=auto to upload large outputs to the configured bucket"
                    } else {
                        "set BUCKET_ENDPOINT_URL/BUCKET_ACCESS_KEY_ID/BUCKET_SECRET_ACCESS_KEY (or send s3Config) to return large outputs as URLs"
                    };
                    let limit = s.max_inline_bytes.unwrap_or_default();
                    warn!(
                        bytes = all_inline,
                        limit, "the output is too large to return inline"
                    );
                    return Err(format!(
                        "{OVER_LIMIT_PREFIX}{} MB as base64, over the {} MB the platform accepts in a result (MAX_INLINE_OUTPUT_BYTES); {fix}",
                        mb(all_inline),
                        mb(limit)
                    ));
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
    async fn upload(&self, file: CollectedFile) -> Result<FileEntry, String> {
        let fail = |e: String| format!("Error uploading {} to S3: {e}", file.filename);
        let target = match &self.target {
            Some(Ok(t)) => t,
            Some(Err(e)) => return Err(fail(e.clone())),
            None => return Err(fail("no bucket is configured".into())),
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
                    data: url.to_string(),
                    content_type: file.content_type,
                    format: file.format,
                    frame_rate: file.frame_rate,
                })
            }
            Err(e) => {
                let message = describe_error(&e, &target.secret);
                warn!(key = %key, error = %message, "output upload failed");
                Err(fail(message))
            }
        }
    }

    /// `{path prefix}/{BUCKET_PREFIX}/{job_id}/{subfolder}/{filename}`, empty, `.` and `..`
    /// segments dropped.
    fn key(&self, location: &BucketLocation, subfolder: &str, filename: &str) -> ObjectPath {
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
        if file.bytes.len() <= self.settings.multipart_threshold {
            let options = PutOptions {
                attributes,
                ..PutOptions::default()
            };
            target
                .store
                .put_opts(key, PutPayload::from_bytes(file.bytes.clone()), options)
                .await?;
            return Ok(());
        }
        let options = PutMultipartOptions {
            attributes,
            ..PutMultipartOptions::default()
        };
        let mut upload = target.store.put_multipart_opts(key, options).await?;
        let part_size = self.settings.part_size.max(1);
        let parts: Vec<Bytes> = (0..file.bytes.len())
            .step_by(part_size)
            .map(|start| {
                file.bytes
                    .slice(start..(start + part_size).min(file.bytes.len()))
            })
            .collect();
        let sent = futures_util::stream::iter(parts)
            .map(|part| upload.put_part(PutPayload::from_bytes(part)))
            .buffered(UPLOAD_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await;
        let done = match sent {
            Ok(_) => upload.complete().await.map(|_| ()),
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
    pub async fn read(&self, bucket: &str, key: &str, max_bytes: u64) -> Result<Bytes, String> {
        let target = match &self.target {
            Some(Ok(t)) => t,
            Some(Err(e)) => return Err(format!("the bucket cannot be used: {e}")),
            None => {
                return Err(
                    "no bucket is configured: s3:// inputs are read from the worker's bucket (BUCKET_ENDPOINT_URL/BUCKET_ACCESS_KEY_ID/BUCKET_SECRET_ACCESS_KEY) or the job's s3Config".into(),
                )
            }
        };
        if bucket != target.location.bucket {
            return Err(format!(
                "the bucket {bucket:?} is not the configured one ({:?}); s3:// inputs are read from the job's bucket only",
                target.location.bucket
            ));
        }
        let path = ObjectPath::parse(key).map_err(|e| format!("invalid object key: {e}"))?;
        if path.as_ref().is_empty() {
            return Err("the URL names no object key".into());
        }
        let started = std::time::Instant::now();
        let result = target
            .store
            .get_opts(&path, GetOptions::default())
            .await
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => "no such object in the bucket".to_owned(),
                e => describe_error(&e, &target.secret),
            })?;
        let size = result.meta.size;
        if size > max_bytes {
            return Err(format!(
                "the object is {size} bytes, larger than INPUT_URL_MAX_BYTES ({max_bytes} bytes)"
            ));
        }
        let too_large =
            || format!("the object is larger than INPUT_URL_MAX_BYTES ({max_bytes} bytes)");
        // Reserved up front only up to 8 MiB: the announced size is a claim, not bytes.
        let mut buf = BytesMut::with_capacity(size.min(8 * 1024 * 1024) as usize);
        let mut stream = result.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| describe_error(&e, &target.secret))?;
            if (buf.len() + chunk.len()) as u64 > max_bytes {
                return Err(too_large());
            }
            buf.extend_from_slice(&chunk);
        }
        debug!(
            key = %path,
            bytes = buf.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "input read from the bucket"
        );
        Ok(buf.freeze())
    }
}

/// A file's entry in the result without its `data`, in JSON bytes (with the separator).
fn entry_size_without_data(file: &CollectedFile) -> u64 {
    let entry = FileEntry {
        filename: file.filename.clone(),
        kind: "base64".into(),
        data: String::new(),
        content_type: file.content_type.clone(),
        format: file.format.clone(),
        frame_rate: file.frame_rate.clone(),
    };
    serde_json::to_vec(&entry).map_or(256, |v| v.len() as u64) + 2
}

/// A file's base64 entry in the result, in JSON bytes.
fn inline_size(file: &CollectedFile) -> u64 {
    entry_size_without_data(file) + base64_len(file.bytes.len())
}

/// An object_store error for a message: scrubbed of the secret, with a hint when the server
/// refused the credentials.
fn describe_error(e: &object_store::Error, secret: &Secret) -> String {
    let mut message = scrub(&error_text(e), secret);
    if [
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "AuthorizationHeaderMalformed",
    ]
    .iter()
    .any(|code| message.contains(code))
    {
        message.push_str(" (check the bucket's access key id, secret and region)");
    }
    message
}

/// An object_store error as one line: its message and its sources, without repeats.
fn error_text(e: &object_store::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::OutputKind;
    use std::collections::HashMap;

    fn bucket(endpoint: &str, name: Option<&str>, region: Option<&str>) -> BucketSettings {
        BucketSettings {
            endpoint_url: endpoint.into(),
            access_key_id: "AKID".into(),
            secret_access_key: Secret::new("very-secret"),
            bucket_name: name.map(Into::into),
            region: region.map(Into::into),
        }
    }

    fn loc(endpoint: &str, name: Option<&str>) -> Result<BucketLocation, String> {
        locate(&bucket(endpoint, name, None), ENV_NAMES)
    }

    #[test]
    fn virtual_hosted_endpoint_names_the_bucket_and_region() {
        let l = loc("https://my-outputs.s3.eu-west-3.amazonaws.com", None).unwrap();
        assert_eq!(
            l,
            BucketLocation {
                endpoint: "https://my-outputs.s3.eu-west-3.amazonaws.com".into(),
                bucket: "my-outputs".into(),
                virtual_hosted: true,
                region: "eu-west-3".into(),
                path_prefix: String::new(),
            }
        );
        // The same endpoint with BUCKET_NAME set to that bucket stays virtual-hosted.
        assert_eq!(
            loc(
                "https://my-outputs.s3.eu-west-3.amazonaws.com/",
                Some("my-outputs")
            )
            .unwrap(),
            l
        );
        let spaces = loc("https://art.nyc3.digitaloceanspaces.com", None).unwrap();
        assert_eq!(
            (spaces.bucket.as_str(), spaces.region.as_str()),
            ("art", "nyc3")
        );
        assert!(spaces.virtual_hosted);
        let legacy = loc("https://b.s3-us-west-2.amazonaws.com", None).unwrap();
        assert_eq!(legacy.region, "us-west-2");
        assert_eq!(
            loc("https://b.s3.amazonaws.com", None).unwrap().region,
            "us-east-1"
        );
    }

    #[test]
    fn path_style_with_bucket_name_or_bucket_in_path() {
        let l = loc("http://127.0.0.1:9000", Some("outputs")).unwrap();
        assert_eq!(
            l,
            BucketLocation {
                endpoint: "http://127.0.0.1:9000".into(),
                bucket: "outputs".into(),
                virtual_hosted: false,
                region: "us-east-1".into(),
                path_prefix: String::new(),
            }
        );
        assert_eq!(
            loc("http://127.0.0.1:9000/outputs", Some("outputs")).unwrap(),
            l
        );
        let in_path = loc("http://127.0.0.1:9000/outputs/comfy/runs", None).unwrap();
        assert_eq!(in_path.bucket, "outputs");
        assert_eq!(in_path.path_prefix, "comfy/runs");
        assert!(!in_path.virtual_hosted);
        // A service endpoint with a bucket name: path style against the regional endpoint.
        let aws = loc("https://s3.us-east-2.amazonaws.com", Some("b")).unwrap();
        assert_eq!(
            (
                aws.endpoint.as_str(),
                aws.region.as_str(),
                aws.virtual_hosted
            ),
            ("https://s3.us-east-2.amazonaws.com", "us-east-2", false)
        );
        let r2 = loc("https://acc123.r2.cloudflarestorage.com", Some("b")).unwrap();
        assert_eq!(r2.region, "auto");
        // A proxy base path is kept.
        assert_eq!(
            loc("https://gw.example.com/s3", Some("b"))
                .unwrap()
                .endpoint,
            "https://gw.example.com/s3"
        );
        // An explicit region wins.
        let l = locate(
            &bucket(
                "https://b.s3.eu-west-1.amazonaws.com",
                None,
                Some("eu-central-1"),
            ),
            ENV_NAMES,
        )
        .unwrap();
        assert_eq!(l.region, "eu-central-1");
    }

    #[test]
    fn endpoints_without_a_bucket_are_refused_clearly() {
        for url in [
            "http://127.0.0.1:9000",
            "http://localhost:9000",
            "https://s3.us-east-1.amazonaws.com",
            "https://s3.amazonaws.com",
            "https://acc123.r2.cloudflarestorage.com",
            "https://nyc3.digitaloceanspaces.com",
        ] {
            let err = loc(url, None).unwrap_err();
            assert!(
                err.contains("names no bucket") && err.contains("BUCKET_NAME"),
                "{url}: {err}"
            );
        }
        assert!(loc("ftp://host/b", None).unwrap_err().contains("scheme"));
        assert!(loc("https://k:s@host/b", None)
            .unwrap_err()
            .contains("keys"));
        assert!(loc("not a url", None).unwrap_err().contains("not a URL"));
    }

    fn settings(pairs: &[(&str, &str)]) -> Result<StorageSettings, crate::config::ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        StorageSettings::from_lookup(&|k| map.get(k).cloned())
    }

    #[test]
    fn env_settings() {
        let s = settings(&[]).unwrap();
        assert!(s.bucket.is_none());
        assert_eq!(s.mode, UploadMode::Auto);
        assert_eq!(s.url_expiry, Duration::from_secs(604_800));
        assert_eq!(s.max_inline_bytes, Some(15 * 1024 * 1024));
        let s = settings(&[
            (
                "BUCKET_ENDPOINT_URL",
                "https://b.s3.us-west-1.amazonaws.com",
            ),
            ("BUCKET_ACCESS_KEY_ID", "AKID"),
            ("BUCKET_SECRET_ACCESS_KEY", "shh-very-secret"),
            ("BUCKET_PREFIX", "/comfy/out/"),
            ("BUCKET_URL_EXPIRY_S", "3600"),
            ("OUTPUT_UPLOAD", "Always"),
            ("MAX_INLINE_OUTPUT_BYTES", "1000"),
        ])
        .unwrap();
        assert_eq!(s.prefix, "comfy/out");
        assert_eq!(s.mode, UploadMode::Always);
        assert_eq!(s.url_expiry, Duration::from_secs(3600));
        assert_eq!(s.max_inline_bytes, Some(1000));
        assert!(!format!("{s:?}").contains("shh-very-secret"));

        let err = settings(&[("BUCKET_ENDPOINT_URL", "http://127.0.0.1:9000")]).unwrap_err();
        assert_eq!(err.name, "BUCKET_ACCESS_KEY_ID");
        let err = settings(&[
            ("BUCKET_ENDPOINT_URL", "http://127.0.0.1:9000"),
            ("BUCKET_ACCESS_KEY_ID", "a"),
            ("BUCKET_SECRET_ACCESS_KEY", "shh-very-secret"),
        ])
        .unwrap_err();
        assert_eq!(err.name, "BUCKET_ENDPOINT_URL");
        assert!(err.to_string().contains("names the bucket"), "{err}");
        assert!(!err.to_string().contains("shh-very-secret"));
        assert_eq!(
            settings(&[("OUTPUT_UPLOAD", "sometimes")])
                .unwrap_err()
                .name,
            "OUTPUT_UPLOAD"
        );
        assert_eq!(
            settings(&[("BUCKET_URL_EXPIRY_S", "604801")])
                .unwrap_err()
                .name,
            "BUCKET_URL_EXPIRY_S"
        );
    }

    #[test]
    fn s3_config_top_level_or_in_input() {
        let cfg =
            serde_json::json!({"accessId": "a", "accessSecret": "s", "endpointUrl": "http://h/b"});
        let other = serde_json::json!({"accessId": "x"});
        assert_eq!(
            job_s3_config(Some(&cfg), Some(&serde_json::json!({"s3Config": other}))),
            Some(cfg.clone())
        );
        assert_eq!(
            job_s3_config(None, Some(&serde_json::json!({"s3Config": cfg}))),
            Some(cfg.clone())
        );
        let text = serde_json::json!({"s3Config": cfg}).to_string();
        assert_eq!(
            job_s3_config(None, Some(&Value::String(text))),
            Some(cfg.clone())
        );
        assert_eq!(
            job_s3_config(Some(&Value::Null), Some(&serde_json::json!({}))),
            None
        );

        let parsed = parse_s3_config(&cfg).unwrap();
        assert_eq!(parsed.endpoint_url, "http://h/b");
        assert_eq!(parsed.bucket_name, None);
        let err =
            parse_s3_config(&serde_json::json!({"accessId": "a", "endpointUrl": "http://h/b"}))
                .unwrap_err();
        assert!(err.contains("'accessSecret'"), "{err}");
        assert!(parse_s3_config(&serde_json::json!("x")).is_err());
    }

    #[test]
    fn sizes_and_scrubbing() {
        assert_eq!(base64_len(0), 0);
        assert_eq!(base64_len(1), 4);
        assert_eq!(base64_len(3), 4);
        assert_eq!(base64_len(4), 8);
        assert_eq!(mb(15 * 1024 * 1024), "15");
        assert_eq!(mb(44_145_050), "42.1");
        assert_eq!(mb(1000), "0.001");
        assert_eq!(mb(0), "0");
        assert_eq!(
            scrub("failed: very-secret leaked", &Secret::new("very-secret")),
            "failed: [redacted] leaked"
        );
        // The inline estimate is the entry's exact JSON size (plus a separator).
        let mut file = CollectedFile::new(OutputKind::Videos, "v.mp4", Bytes::from(vec![1u8; 30]));
        file.format = Some("video/h264-mp4".into());
        file.frame_rate = Some(8.into());
        let json = serde_json::to_vec(&base64_entry(file.clone())).unwrap();
        assert_eq!(inline_size(&file), json.len() as u64 + 2);
    }

    fn files(sizes: &[usize]) -> Vec<CollectedFile> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                CollectedFile::new(
                    OutputKind::Images,
                    format!("f{i}.png"),
                    Bytes::from(vec![7u8; *n]),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn without_a_bucket_small_outputs_are_base64_and_large_ones_an_error() {
        let storage = Storage::new(StorageSettings {
            max_inline_bytes: Some(100_000),
            ..StorageSettings::default()
        });
        let job = storage.for_job("job-1", None).await.unwrap();
        assert!(!job.has_bucket());
        let placed = job.place(files(&[300, 600]), 0).await.unwrap();
        let first = placed[0].as_ref().unwrap();
        assert_eq!(
            (first.kind.as_str(), first.filename.as_str()),
            ("base64", "f0.png")
        );
        assert_eq!(first.content_type, "image/png");
        assert_eq!(
            crate::job::codec::decode_input(&first.data).unwrap(),
            vec![7u8; 300]
        );
        let err = job.place(files(&[60_000, 40_000]), 0).await.unwrap_err();
        assert!(
            err.starts_with("The job output is 0.1 MB as base64, over the 0.1 MB"),
            "{err}"
        );
        assert!(err.contains("BUCKET_ENDPOINT_URL/BUCKET_ACCESS_KEY_ID/BUCKET_SECRET_ACCESS_KEY (or send s3Config)"), "{err}");
        // What the rest of the result takes counts too.
        assert!(job.place(files(&[30_000]), 0).await.is_ok());
        assert!(job.place(files(&[30_000]), 80_000).await.is_err());
        // Without a limit (comfy-worker run), anything goes inline.
        let unlimited = Storage::new(StorageSettings {
            max_inline_bytes: None,
            ..StorageSettings::default()
        })
        .for_job("job-1", None)
        .await
        .unwrap();
        let placed = unlimited.place(files(&[200_000]), 0).await.unwrap();
        assert_eq!(placed[0].as_ref().unwrap().kind, "base64");
    }

    #[tokio::test]
    async fn an_unreachable_bucket_gives_error_entries_not_a_failure() {
        let storage = Storage::new(StorageSettings {
            max_inline_bytes: Some(10_000),
            allow_private_endpoints: true,
            ..StorageSettings::default()
        });
        // Port 9 (discard) on loopback: refused at once; retries are bounded.
        let cfg = serde_json::json!({"accessId": "a", "accessSecret": "job-secret-123", "endpointUrl": "http://127.0.0.1:9/b"});
        let job = storage.for_job("job-2", Some(&cfg)).await.unwrap();
        assert!(job.has_bucket());
        let placed = tokio::time::timeout(
            Duration::from_secs(120),
            job.place(files(&[20_000, 100]), 0),
        )
        .await
        .expect("bounded");
        let placed = placed.unwrap();
        let err = placed[0].as_ref().unwrap_err();
        assert!(err.starts_with("Error uploading f0.png to S3: "), "{err}");
        assert!(!err.contains("job-secret-123"));
        assert_eq!(placed[1].as_ref().unwrap().kind, "base64");
        let bad = storage
            .for_job("job-3", Some(&serde_json::json!({"accessId": "a", "accessSecret": "s", "endpointUrl": "http://127.0.0.1:9"})))
            .await
            .unwrap_err();
        assert!(
            bad.starts_with("Invalid s3Config: s3Config.endpointUrl names no bucket"),
            "{bad}"
        );
        assert!(bad.contains("s3Config.bucketName"), "{bad}");
    }

    #[tokio::test]
    async fn a_jobs_private_endpoint_is_refused_unless_allowed() {
        let storage = Storage::new(StorageSettings::default());
        let cfg = |endpoint: &str| serde_json::json!({"accessId": "a", "accessSecret": "job-secret-123", "endpointUrl": endpoint, "bucketName": "b"});
        // Refused before any connection: IP literals and local names need no lookup.
        for (endpoint, why) in [
            ("http://127.0.0.1:9000", "127.0.0.1 is a loopback address"),
            (
                "http://169.254.169.254",
                "169.254.169.254 is a link-local address (the cloud metadata service)",
            ),
            ("https://10.1.2.3/b", "10.1.2.3 is a private address"),
            ("http://[::1]:9000", "::1 is a loopback address"),
            ("http://localhost:9000", "localhost is a local host name"),
            (
                "http://minio.internal:9000",
                "minio.internal is a private-use name",
            ),
        ] {
            let err = storage
                .for_job("job", Some(&cfg(endpoint)))
                .await
                .unwrap_err();
            assert!(
                err.starts_with(&format!(
                    "Invalid s3Config: s3Config.endpointUrl refused: {why}"
                )),
                "{endpoint}: {err}"
            );
            assert!(
                err.ends_with("(set ALLOW_PRIVATE_S3_ENDPOINTS=true to allow it)"),
                "{err}"
            );
            assert!(!err.contains("job-secret-123"));
        }
        let allowed = Storage::new(StorageSettings {
            allow_private_endpoints: true,
            ..StorageSettings::default()
        });
        for endpoint in ["http://127.0.0.1:9000", "http://localhost:9000"] {
            assert!(allowed
                .for_job("job", Some(&cfg(endpoint)))
                .await
                .unwrap()
                .has_bucket());
        }
        // The operator's bucket is trusted: a loopback BUCKET_ENDPOINT_URL is not checked.
        let env = Storage::new(StorageSettings {
            bucket: Some(bucket("http://127.0.0.1:9000", Some("b"), None)),
            ..StorageSettings::default()
        });
        assert!(env.for_job("job", None).await.unwrap().has_bucket());
        let settings = settings(&[("ALLOW_PRIVATE_S3_ENDPOINTS", "true")]).unwrap();
        assert!(settings.allow_private_endpoints);
        assert_eq!(
            settings_err("ALLOW_PRIVATE_S3_ENDPOINTS", "maybe"),
            "ALLOW_PRIVATE_S3_ENDPOINTS"
        );
    }

    fn settings_err(name: &str, value: &str) -> &'static str {
        settings(&[(name, value)]).unwrap_err().name
    }

    #[tokio::test]
    async fn a_jobs_client_connects_only_where_the_guard_allows() {
        // A name that passed the check and now resolves to loopback (DNS rebinding): the
        // guarded resolver of the job's client refuses the connection.
        let guard = Guard::new(false, CONNECT_TIMEOUT)
            .with_fixed_lookup(&[("bucket.example.test", &["127.0.0.1"])]);
        let target = Target::build(
            &bucket("http://bucket.example.test:9", Some("b"), None),
            JOB_NAMES,
            Some(guard),
        )
        .unwrap();
        let job = JobStorage {
            settings: Arc::new(StorageSettings::default()),
            job_id: "job".into(),
            target: Some(Ok(Arc::new(target))),
        };
        let err = tokio::time::timeout(Duration::from_secs(120), job.read("b", "in/a.png", 100))
            .await
            .expect("bounded")
            .unwrap_err();
        assert!(
            err.contains("S3 endpoint host refused: bucket.example.test resolves to 127.0.0.1, a loopback address"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn s3_inputs_need_the_jobs_bucket() {
        let none = Storage::new(StorageSettings::default())
            .for_job("job", None)
            .await
            .unwrap();
        let err = none.read("b", "in/a.png", 100).await.unwrap_err();
        assert!(err.starts_with("no bucket is configured"), "{err}");
        let env = Storage::new(StorageSettings {
            bucket: Some(bucket("http://127.0.0.1:9", Some("b"), None)),
            ..StorageSettings::default()
        })
        .for_job("job", None)
        .await
        .unwrap();
        let err = env.read("other", "in/a.png", 100).await.unwrap_err();
        assert_eq!(
            err,
            "the bucket \"other\" is not the configured one (\"b\"); s3:// inputs are read from the job's bucket only"
        );
        let err = env.read("b", "in/../a.png", 100).await.unwrap_err();
        assert!(err.starts_with("invalid object key"), "{err}");
    }

    #[test]
    fn keys_take_the_prefix_job_and_subfolder() {
        let storage = Storage::new(StorageSettings {
            prefix: "runs".into(),
            ..StorageSettings::default()
        });
        let job = JobStorage {
            settings: storage.settings.clone(),
            job_id: "job-1".into(),
            target: None,
        };
        let location = locate(&bucket("http://h/b/base", None, None), ENV_NAMES).unwrap();
        assert_eq!(
            job.key(&location, "", "a.png").as_ref(),
            "base/runs/job-1/a.png"
        );
        assert_eq!(
            job.key(&location, "clips/../x", "v.mp4").as_ref(),
            "base/runs/job-1/clips/x/v.mp4"
        );
    }
}
