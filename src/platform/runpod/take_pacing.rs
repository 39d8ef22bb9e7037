//! When the job loop sends its next job-take after one that brought no job: at once after jobs,
//! at least 250 ms after the last poll was sent when the platform had nothing (a platform that
//! answers at once instead of long-polling must not be hammered), 5 s after a 429, and with a
//! backoff from 1 s doubling to 30 s after failures (reset by any answer).

use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use super::client::TakeError;
use crate::metrics::{Metrics, RetryReason};

/// The shortest time between two polls the platform answered with no job.
const POLL_FLOOR: Duration = Duration::from_millis(250);

/// The job-take backoff.
#[derive(Debug)]
pub(super) struct TakePacing {
    backoff: Duration,
}

impl TakePacing {
    pub(super) fn new() -> TakePacing {
        TakePacing {
            backoff: Duration::from_secs(1),
        }
    }

    /// The take brought jobs: the next one may go at once.
    pub(super) fn jobs(&mut self) -> Duration {
        self.backoff = Duration::from_secs(1);
        Duration::ZERO
    }

    /// The platform had nothing for the poll sent at `polled`.
    pub(super) fn no_job(&mut self, polled: Instant) -> Duration {
        self.backoff = Duration::from_secs(1);
        POLL_FLOOR.saturating_sub(polled.elapsed())
    }

    /// HTTP 429.
    pub(super) fn rate_limited(&self) -> Duration {
        warn!("job-take rate limited (HTTP 429); waiting 5 s");
        Duration::from_secs(5)
    }

    /// The take failed: the backoff, then twice as long next time (counted as a retry).
    pub(super) fn failed(&mut self, e: &TakeError, metrics: &Metrics) -> Duration {
        warn!(error = %e, retry_in_s = self.backoff.as_secs(), "Failed to get job");
        metrics.retry(RetryReason::JobTake);
        let pause = self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
        pause
    }
}
