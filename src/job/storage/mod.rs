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

mod bucket;
mod job_storage;
mod s3_config;

use std::sync::Arc;

use serde_json::Value;
use tracing::{info, warn};

pub use bucket::BucketError;
pub use job_storage::{JobStorage, OverLimit, ReadError, UploadError, UploadFailure};
pub use s3_config::{job_s3_config, S3ConfigError};

use crate::config::{locate, StorageSettings, UploadMode, ENV_NAMES, JOB_NAMES};
use crate::ssrf::Guard;
use bucket::{Target, CONNECT_TIMEOUT};
use s3_config::parse_s3_config;

/// Places output files for every job; built once from the settings.
#[derive(Debug, Clone)]
pub struct Storage {
    settings: Arc<StorageSettings>,
    /// The env bucket's client, or why it could not be built.
    env_target: Option<Result<Arc<Target>, BucketError>>,
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
    /// the guard stays on its connections. An invalid or refused `s3Config` fails the job.
    pub async fn for_job(
        &self,
        job_id: &str,
        s3_config: Option<&Value>,
    ) -> Result<JobStorage, S3ConfigError> {
        let target = match s3_config {
            Some(value) => {
                let bucket = parse_s3_config(value)?;
                locate(&bucket, JOB_NAMES).map_err(BucketError::from)?;
                let guard = Guard::new(self.settings.allow_private_endpoints, CONNECT_TIMEOUT);
                guard
                    .check(&bucket.endpoint_url)
                    .await
                    .map_err(S3ConfigError::Endpoint)?;
                let target = Target::build(&bucket, JOB_NAMES, Some(guard))?;
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

#[cfg(test)]
mod tests {
    use super::bucket::*;
    use super::job_storage::*;
    use super::*;
    use crate::config::*;
    use crate::job::collected_file::base64_entry;
    use crate::job::collected_file::CollectedFile;
    use crate::job::OutputKind;
    use crate::secret::Secret;
    use crate::ssrf::UrlError;
    use bytes::Bytes;
    use std::collections::HashMap;
    use std::time::Duration;

    fn bucket(endpoint: &str, name: Option<&str>, region: Option<&str>) -> BucketSettings {
        BucketSettings {
            endpoint_url: endpoint.into(),
            access_key_id: "AKID".into(),
            secret_access_key: Secret::new("very-secret"),
            bucket_name: name.map(Into::into),
            region: region.map(Into::into),
        }
    }

    fn settings(pairs: &[(&str, &str)]) -> Result<StorageSettings, crate::config::ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        StorageSettings::from_lookup(&|k| map.get(k).cloned())
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
            crate::job::codec::decode_input(&first.data.to_text().unwrap()).unwrap(),
            vec![7u8; 300]
        );
        let err = job.place(files(&[60_000, 40_000]), 0).await.unwrap_err();
        assert_eq!((err.limit, err.uploads_off), (100_000, false));
        let err = err.to_string();
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
        assert_eq!(err.filename, "f0.png");
        assert!(matches!(err.failure, UploadFailure::S3(_)), "{err}");
        let err = err.to_string();
        assert!(err.starts_with("Error uploading f0.png to S3: "), "{err}");
        assert!(!err.contains("job-secret-123"));
        assert_eq!(placed[1].as_ref().unwrap().kind, "base64");
        let bad = storage
            .for_job("job-3", Some(&serde_json::json!({"accessId": "a", "accessSecret": "s", "endpointUrl": "http://127.0.0.1:9"})))
            .await
            .unwrap_err();
        assert!(
            matches!(
                bad,
                S3ConfigError::Bucket(BucketError::Location(LocateError::NoBucket { .. }))
            ),
            "{bad}"
        );
        let bad = bad.to_string();
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
                matches!(err, S3ConfigError::Endpoint(UrlError::Refused(_))),
                "{err}"
            );
            let err = err.to_string();
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
        assert!(matches!(err, ReadError::S3(_)), "{err}");
        let err = err.to_string();
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
        assert!(matches!(err, ReadError::NoBucket), "{err}");
        let err = err.to_string();
        assert!(err.starts_with("no bucket is configured"), "{err}");
        let env = Storage::new(StorageSettings {
            bucket: Some(bucket("http://127.0.0.1:9", Some("b"), None)),
            ..StorageSettings::default()
        })
        .for_job("job", None)
        .await
        .unwrap();
        let err = env.read("other", "in/a.png", 100).await.unwrap_err();
        assert!(matches!(err, ReadError::OtherBucket { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "the bucket \"other\" is not the configured one (\"b\"); s3:// inputs are read from the job's bucket only"
        );
        let err = env.read("b", "in/../a.png", 100).await.unwrap_err();
        assert!(matches!(err, ReadError::InvalidKey(_)), "{err}");
        let err = err.to_string();
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
