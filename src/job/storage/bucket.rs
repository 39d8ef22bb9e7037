//! One bucket's client: object_store's `AmazonS3` for the bucket's location, behind the SSRF
//! guard for a job's own endpoint, with S3 errors turned into scrubbed messages.

use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{HttpClient, HttpConnector};
use object_store::{BackoffConfig, ClientOptions, RetryConfig};

use crate::config::{locate, BucketLocation, BucketSettings, LocateError, Names};
use crate::secret::Secret;
use crate::ssrf::Guard;

/// Connection bound for a bucket's endpoint (also bounds the SSRF guard's lookup).
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound for one request to a bucket.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Why a bucket's client cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BucketError {
    /// The endpoint URL does not say where the bucket is.
    #[error(transparent)]
    Location(#[from] LocateError),
    /// object_store refused the settings (its message, scrubbed of the secret).
    #[error("{0}")]
    Client(String),
}

/// A bucket a job writes to and reads from, with its client.
#[derive(Debug)]
pub(super) struct Target {
    pub(super) store: AmazonS3,
    pub(super) location: BucketLocation,
    pub(super) secret: Secret,
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
    pub(super) fn build(
        bucket: &BucketSettings,
        names: Names,
        guard: Option<Guard>,
    ) -> Result<Target, BucketError> {
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
            .map_err(|e| BucketError::Client(scrub(&e.to_string(), &bucket.secret_access_key)))?;
        Ok(Target {
            store,
            location,
            secret: bucket.secret_access_key.clone(),
        })
    }
}

/// Removes a secret from a message (object_store never prints it; this is a second guard).
pub(super) fn scrub(message: &str, secret: &Secret) -> String {
    let s = secret.expose();
    if s.len() >= 4 {
        message.replace(s, "[redacted]")
    } else {
        message.to_owned()
    }
}

/// An object_store error for a message: scrubbed of the secret, with a hint when the server
/// refused the credentials.
pub(super) fn describe_error(e: &object_store::Error, secret: &Secret) -> String {
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
