//! Webhooks (placeholder with the agreed API; implemented on the `webhook` branch).
#![allow(missing_docs, unused_variables, dead_code)]

use std::time::Duration;

use serde_json::Value;

use crate::progress::ProgressSnapshot;

/// How webhooks are checked and delivered.
#[derive(Debug, Clone)]
pub struct WebhookPolicy {
    /// `ALLOW_PRIVATE_WEBHOOKS=true`: allow private, loopback and link-local targets.
    pub allow_private: bool,
    /// `WEBHOOK_ATTEMPTS` (3).
    pub attempts: u32,
    /// `WEBHOOK_RETRY_DELAY_MS` (10000).
    pub retry_delay: Duration,
    /// Per-request timeout (10 s).
    pub timeout: Duration,
}

impl Default for WebhookPolicy {
    fn default() -> Self {
        WebhookPolicy {
            allow_private: false,
            attempts: 3,
            retry_delay: Duration::from_secs(10),
            timeout: Duration::from_secs(10),
        }
    }
}

impl WebhookPolicy {
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<WebhookPolicy, crate::config::ConfigError> {
        Ok(WebhookPolicy::default())
    }
}

/// A webhook URL that passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl(pub(crate) String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("invalid webhook URL {url:?}: {reason}")]
    Invalid { url: String, reason: String },
    #[error("webhook URL {url:?} refused: {reason}")]
    Refused { url: String, reason: String },
}

/// Delivers webhooks; cheap to clone.
#[derive(Debug, Clone)]
pub struct Webhooks {
    policy: WebhookPolicy,
}

impl Webhooks {
    pub fn new(policy: WebhookPolicy) -> Webhooks {
        Webhooks { policy }
    }

    pub async fn validate(&self, url: &str) -> Result<WebhookUrl, WebhookError> {
        Ok(WebhookUrl(url.to_owned()))
    }

    pub fn send_final(&self, url: WebhookUrl, body: Value) {}

    pub fn progress(&self, url: WebhookUrl, task_id: &str) -> ProgressHook {
        ProgressHook {}
    }
}

/// One job's progress webhook: events are delivered in order, on their own task.
#[derive(Debug)]
pub struct ProgressHook {}

impl ProgressHook {
    pub fn snapshot(&self, snapshot: &ProgressSnapshot) {}
    pub fn completed(&self, output: &Value) {}
    pub fn failed(&self, message: &str, details: Option<&[String]>) {}
    pub async fn finish(self) {}
}
