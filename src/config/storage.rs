//! Output placement settings: the worker's bucket (`BUCKET_*`), `OUTPUT_UPLOAD`,
//! `MAX_INLINE_OUTPUT_BYTES`, `ALLOW_PRIVATE_S3_ENDPOINTS`, and where a bucket's endpoint URL
//! points ([`locate`]: the bucket, path or virtual-hosted style, the signing region), which both
//! the worker's bucket (checked at start) and a job's `s3Config` (checked when the job starts)
//! go through.

use std::net::IpAddr;
use std::time::Duration;

use super::env::{ConfigError, EnvReader};
use crate::secret::Secret;

/// `MAX_INLINE_OUTPUT_BYTES` default: 15 MiB of JSON, leaving room under the ~20 MB the
/// platform's job-done endpoint accepts (worker-comfyui#129).
pub const DEFAULT_MAX_INLINE_OUTPUT_BYTES: u64 = 15 * 1024 * 1024;
/// `BUCKET_URL_EXPIRY_S` default and maximum: 7 days, the SigV4 limit (and the SDK's value).
pub const MAX_URL_EXPIRY: Duration = Duration::from_secs(604_800);
/// Files above this size are uploaded in parts.
pub const DEFAULT_MULTIPART_THRESHOLD: usize = 16 * 1024 * 1024;
/// Part size of a multipart upload (S3's minimum is 5 MiB, except for the last part).
pub const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;
/// When output files are uploaded (`OUTPUT_UPLOAD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadMode {
    /// Only what does not fit inline, largest files first (the default).
    Auto,
    /// Every file (worker-comfyui's behaviour with `BUCKET_ENDPOINT_URL`).
    Always,
    /// Never; everything is base64.
    Never,
}

/// A bucket and the keys to write to it, as configured (not yet checked against the server).
#[derive(Debug, Clone)]
pub struct BucketSettings {
    /// `BUCKET_ENDPOINT_URL` / `s3Config.endpointUrl`.
    pub endpoint_url: String,
    /// `BUCKET_ACCESS_KEY_ID` / `s3Config.accessId`.
    pub access_key_id: String,
    /// `BUCKET_SECRET_ACCESS_KEY` / `s3Config.accessSecret`.
    pub secret_access_key: Secret,
    /// `BUCKET_NAME` / `s3Config.bucketName`; without it the bucket comes from the endpoint URL.
    pub bucket_name: Option<String>,
    /// `BUCKET_REGION` / `s3Config.region`; without it, from the endpoint's host, else `us-east-1`.
    pub region: Option<String>,
}

/// Output placement settings, read from the environment with the other [`crate::config::Settings`].
#[derive(Debug, Clone)]
pub struct StorageSettings {
    /// The worker's bucket (`BUCKET_ENDPOINT_URL` and friends); `None` when unset.
    pub bucket: Option<BucketSettings>,
    /// `OUTPUT_UPLOAD`.
    pub mode: UploadMode,
    /// `BUCKET_PREFIX`, without leading or trailing slashes (may be empty).
    pub prefix: String,
    /// `BUCKET_URL_EXPIRY_S`: how long presigned GET URLs work.
    pub url_expiry: Duration,
    /// `MAX_INLINE_OUTPUT_BYTES`: the largest result (JSON bytes) returned inline; `None`: no
    /// limit (`comfy-worker run`, which prints to stdout, unless the variable is set).
    pub max_inline_bytes: Option<u64>,
    /// `ALLOW_PRIVATE_S3_ENDPOINTS=true`: a job's `s3Config.endpointUrl` may be a loopback,
    /// private or link-local address (the SSRF guard's address checks are off for it).
    pub allow_private_endpoints: bool,
    /// Files above this many bytes are uploaded in parts.
    pub multipart_threshold: usize,
    /// Part size of multipart uploads.
    pub part_size: usize,
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            bucket: None,
            mode: UploadMode::Auto,
            prefix: String::new(),
            url_expiry: MAX_URL_EXPIRY,
            max_inline_bytes: Some(DEFAULT_MAX_INLINE_OUTPUT_BYTES),
            allow_private_endpoints: false,
            multipart_threshold: DEFAULT_MULTIPART_THRESHOLD,
            part_size: DEFAULT_PART_SIZE,
        }
    }
}

impl StorageSettings {
    /// Reads the `BUCKET_*`, `OUTPUT_UPLOAD`, `MAX_INLINE_OUTPUT_BYTES` and
    /// `ALLOW_PRIVATE_S3_ENDPOINTS` variables through `lookup`; an endpoint that names no bucket, or one without keys, is refused here so a
    /// misconfigured worker fails at start rather than on the first large output.
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = EnvReader::new(lookup);
        let get = |name: &str| env.get(name);
        let d = StorageSettings::default();
        let mode = match get("OUTPUT_UPLOAD").map(|v| v.to_ascii_lowercase()) {
            None => d.mode,
            Some(v) if v == "auto" => UploadMode::Auto,
            Some(v) if v == "always" => UploadMode::Always,
            Some(v) if v == "never" => UploadMode::Never,
            Some(v) => {
                return Err(ConfigError {
                    name: "OUTPUT_UPLOAD",
                    value: v,
                    expected: "auto, always or never".into(),
                })
            }
        };
        let url_expiry = env
            .parse(
                "BUCKET_URL_EXPIRY_S",
                "whole seconds from 1 to 604800 (7 days, the S3 maximum)",
                |v| {
                    v.parse::<u64>()
                        .ok()
                        .filter(|s| (1..=MAX_URL_EXPIRY.as_secs()).contains(s))
                        .map(Duration::from_secs)
                },
            )?
            .unwrap_or(d.url_expiry);
        let max_inline_bytes = env
            .parse("MAX_INLINE_OUTPUT_BYTES", "a number of bytes", |v| {
                v.parse::<u64>().ok()
            })?
            .or(d.max_inline_bytes);
        let allow_private_endpoints =
            env.flag("ALLOW_PRIVATE_S3_ENDPOINTS", d.allow_private_endpoints)?;
        let bucket = match get("BUCKET_ENDPOINT_URL") {
            None => None,
            Some(endpoint_url) => {
                let missing = |name: &'static str| ConfigError {
                    name,
                    value: String::new(),
                    expected: "required when BUCKET_ENDPOINT_URL is set".into(),
                };
                let access_key_id =
                    get("BUCKET_ACCESS_KEY_ID").ok_or_else(|| missing("BUCKET_ACCESS_KEY_ID"))?;
                let secret_access_key = Secret::new(
                    get("BUCKET_SECRET_ACCESS_KEY")
                        .ok_or_else(|| missing("BUCKET_SECRET_ACCESS_KEY"))?,
                );
                let bucket = BucketSettings {
                    endpoint_url,
                    access_key_id,
                    secret_access_key,
                    bucket_name: get("BUCKET_NAME"),
                    region: get("BUCKET_REGION"),
                };
                if locate(&bucket, ENV_NAMES).is_err() {
                    return Err(ConfigError {
                        name: "BUCKET_ENDPOINT_URL",
                        value: without_credentials(&bucket.endpoint_url),
                        expected: "an http(s) URL that names the bucket, like https://<bucket>.s3.<region>.amazonaws.com or http://host:9000/<bucket>, or any endpoint with BUCKET_NAME set".into(),
                    });
                }
                Some(bucket)
            }
        };
        Ok(StorageSettings {
            bucket,
            mode,
            prefix: get("BUCKET_PREFIX")
                .map(|p| p.trim_matches('/').to_owned())
                .unwrap_or_default(),
            url_expiry,
            max_inline_bytes,
            allow_private_endpoints,
            ..d
        })
    }

    /// Whether `MAX_INLINE_OUTPUT_BYTES` is set (not empty) in `lookup`: `comfy-worker run`
    /// applies the inline limit only then.
    pub fn inline_limit_is_set(lookup: &dyn Fn(&str) -> Option<String>) -> bool {
        lookup("MAX_INLINE_OUTPUT_BYTES").is_some_and(|v| !v.trim().is_empty())
    }
}

/// A URL for a message: credentials in it (`user:pw@`) are dropped.
fn without_credentials(raw: &str) -> String {
    match url::Url::parse(raw.trim()) {
        Ok(mut url) if !url.username().is_empty() || url.password().is_some() => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.to_string()
        }
        Ok(_) => raw.trim().to_owned(),
        Err(_) => "(not a URL)".into(),
    }
}

/// The variable names a configuration problem is reported with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Names {
    pub(crate) endpoint: &'static str,
    pub(crate) bucket: &'static str,
}

pub(crate) const ENV_NAMES: Names = Names {
    endpoint: "BUCKET_ENDPOINT_URL",
    bucket: "BUCKET_NAME",
};
pub(crate) const JOB_NAMES: Names = Names {
    endpoint: "s3Config.endpointUrl",
    bucket: "s3Config.bucketName",
};

/// Where requests go, as object_store needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketLocation {
    /// The endpoint object_store talks to: the bucket's own host for virtual-hosted style, or
    /// the service's base URL (the bucket is appended) for path style.
    pub endpoint: String,
    /// The bucket.
    pub bucket: String,
    /// `https://<bucket>.<service host>/<key>` rather than `https://<host>/<bucket>/<key>`.
    pub virtual_hosted: bool,
    /// The SigV4 signing region.
    pub region: String,
    /// Key prefix taken from the endpoint's path (`http://host/<bucket>/<prefix>`), may be empty.
    pub path_prefix: String,
}

/// Why an endpoint URL (with its optional bucket name) does not say where a bucket is; the
/// messages name the variables of `names` (the worker's `BUCKET_*` or a job's `s3Config`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocateError {
    /// The endpoint does not parse as a URL.
    #[error("not a URL ({0})")]
    NotAUrl(url::ParseError),
    /// Not `http` or `https`.
    #[error("the scheme must be http or https, not {0}")]
    Scheme(String),
    /// `user:password@` in the URL.
    #[error("put the keys in the access key variables, not in {endpoint}")]
    CredentialsInUrl {
        /// The endpoint's variable (`BUCKET_ENDPOINT_URL`, `s3Config.endpointUrl`).
        endpoint: &'static str,
    },
    /// A `?query` or `#fragment`.
    #[error("the URL must not have a query or fragment")]
    QueryOrFragment,
    /// No host.
    #[error("the URL has no host")]
    NoHost,
    /// A service's bare endpoint, no bucket in the path and no bucket name.
    #[error(
        "{endpoint} names no bucket: use the bucket's own endpoint (https://<bucket>.s3.<region>.amazonaws.com), put the bucket in the path (http://host:9000/<bucket>), or set {bucket}"
    )]
    NoBucket {
        /// The endpoint's variable.
        endpoint: &'static str,
        /// The bucket name's variable (`BUCKET_NAME`, `s3Config.bucketName`).
        bucket: &'static str,
    },
}

/// Maps an endpoint URL and optional bucket name onto object_store's terms.
///
/// * With a bucket name: virtual-hosted style when the host starts with `<bucket>.`, else path
///   style with the URL (minus a trailing `/<bucket>`) as the service's base URL.
/// * Without one, the URL must name the bucket: in its path (`http://minio:9000/<bucket>`, path
///   style, further segments become a key prefix), or as the first label of its host, the
///   virtual-hosted endpoint worker-comfyui documents (`https://<bucket>.s3.<region>.amazonaws.com`).
///   Hosts that are a service's bare endpoint (`s3.…`, `<account>.r2.cloudflarestorage.com`,
///   `<region>.digitaloceanspaces.com`, IP addresses, names with fewer than three labels) name no
///   bucket and are refused.
/// * The region is the configured one, else the one in the host (`.s3.<region>.`,
///   `s3-<region>.`, `<region>.digitaloceanspaces.com`, `auto` for R2), else `us-east-1`.
pub(crate) fn locate(bucket: &BucketSettings, names: Names) -> Result<BucketLocation, LocateError> {
    let raw = bucket.endpoint_url.trim();
    let url = url::Url::parse(raw).map_err(LocateError::NotAUrl)?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(LocateError::Scheme(url.scheme().to_owned()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(LocateError::CredentialsInUrl {
            endpoint: names.endpoint,
        });
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(LocateError::QueryOrFragment);
    }
    let Some(host) = url.host_str().map(|h| h.to_ascii_lowercase()) else {
        return Err(LocateError::NoHost);
    };
    let origin = match url.port() {
        Some(port) => format!("{}://{host}:{port}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    };
    let segments: Vec<&str> = url
        .path_segments()
        .map(|s| s.filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    let is_ip = host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok();
    let region = bucket
        .region
        .clone()
        .or_else(|| (!is_ip).then(|| region_from_host(&host)).flatten())
        .unwrap_or_else(|| "us-east-1".into());
    let name = bucket
        .bucket_name
        .as_deref()
        .map(str::trim)
        .filter(|b| !b.is_empty());
    if let Some(name) = name {
        if !is_ip && host.starts_with(&format!("{}.", name.to_ascii_lowercase())) {
            return Ok(BucketLocation {
                endpoint: origin,
                bucket: name.to_owned(),
                virtual_hosted: true,
                region,
                path_prefix: segments.join("/"),
            });
        }
        let mut base = segments.clone();
        if base.last() == Some(&name) {
            base.pop();
        }
        let endpoint = if base.is_empty() {
            origin
        } else {
            format!("{origin}/{}", base.join("/"))
        };
        return Ok(BucketLocation {
            endpoint,
            bucket: name.to_owned(),
            virtual_hosted: false,
            region,
            path_prefix: String::new(),
        });
    }
    if let Some((first, rest)) = segments.split_first() {
        return Ok(BucketLocation {
            endpoint: origin,
            bucket: (*first).to_owned(),
            virtual_hosted: false,
            region,
            path_prefix: rest.join("/"),
        });
    }
    let labels: Vec<&str> = host.split('.').collect();
    let bare_service = is_ip
        || labels.len() < 3
        || labels[0] == "s3"
        || labels[0].starts_with("s3-")
        || labels[0] == "storage"
        || (host.ends_with(".r2.cloudflarestorage.com") && labels.len() == 4)
        || (host.ends_with(".digitaloceanspaces.com") && labels.len() == 3);
    if bare_service {
        return Err(LocateError::NoBucket {
            endpoint: names.endpoint,
            bucket: names.bucket,
        });
    }
    Ok(BucketLocation {
        endpoint: origin,
        bucket: labels[0].to_owned(),
        virtual_hosted: true,
        region,
        path_prefix: String::new(),
    })
}

/// The region a service host names, as boto3 and the RunPod SDK read it.
fn region_from_host(host: &str) -> Option<String> {
    let labels: Vec<&str> = host.split('.').collect();
    if host.ends_with(".r2.cloudflarestorage.com") {
        return Some("auto".into());
    }
    if let Some(i) = labels.iter().position(|l| *l == "digitaloceanspaces") {
        return (i > 0).then(|| labels[i - 1].to_owned());
    }
    for (i, label) in labels.iter().enumerate() {
        // At least a registrable domain (two labels) must follow the region.
        let followed = |j: usize| labels.len() >= j + 3;
        if *label == "s3" {
            let mut j = i + 1;
            if labels.get(j) == Some(&"dualstack") {
                j += 1;
            }
            if followed(j) {
                return Some(labels[j].to_owned());
            }
        } else if let Some(rest) = label.strip_prefix("s3-") {
            if rest.starts_with("external") {
                return Some("us-east-1".into());
            }
            if !matches!(rest, "accelerate" | "website") && followed(i) {
                return Some(rest.to_owned());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
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

    fn settings(pairs: &[(&str, &str)]) -> Result<StorageSettings, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        StorageSettings::from_lookup(&|k| map.get(k).cloned())
    }

    fn loc(endpoint: &str, name: Option<&str>) -> Result<BucketLocation, LocateError> {
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
            assert_eq!(
                err,
                LocateError::NoBucket {
                    endpoint: "BUCKET_ENDPOINT_URL",
                    bucket: "BUCKET_NAME"
                }
            );
            let err = err.to_string();
            assert!(
                err.contains("names no bucket") && err.contains("BUCKET_NAME"),
                "{url}: {err}"
            );
        }
        assert_eq!(
            loc("ftp://host/b", None).unwrap_err(),
            LocateError::Scheme("ftp".into())
        );
        assert!(loc("ftp://host/b", None)
            .unwrap_err()
            .to_string()
            .contains("scheme"));
        assert!(loc("https://k:s@host/b", None)
            .unwrap_err()
            .to_string()
            .contains("keys"));
        assert!(loc("not a url", None)
            .unwrap_err()
            .to_string()
            .contains("not a URL"));
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
}
