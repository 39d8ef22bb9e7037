//! The progress relay of one job.
//!
//! At most one progress post is in flight. Snapshots are posted in order while the platform keeps
//! up, so every sampler step reaches `/status`, bursts included (ComfyUI sends a node's last step,
//! its end and the next node's start within microseconds). When the platform falls behind (the
//! oldest unsent snapshot has waited longer than [`COALESCE_AFTER`]), the backlog is replaced by
//! its latest snapshot: the platform keeps only the last one anyway, and the job never waits for
//! the relay. [`Relay::finish`] either drains what is left under the same rule, so `/status` is
//! current just before the result, or (for a stopped job) only waits for the post in flight;
//! after it returns no progress post is sent or in flight, so none can land after the result.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::client::PlatformClient;

/// How long a snapshot may wait behind others before the backlog is coalesced to the latest.
pub const COALESCE_AFTER: Duration = Duration::from_millis(250);

/// Bound on unsent snapshots kept while a post hangs (the oldest are dropped first).
const MAX_BACKLOG: usize = 1024;

/// What a relay did, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Posts the platform accepted.
    pub posted: u64,
    /// Posts that failed (not retried: the next snapshot supersedes them).
    pub failed: u64,
    /// Snapshots dropped because a newer one replaced them while the platform was behind.
    pub coalesced: u64,
}

#[derive(Default)]
struct Backlog {
    queue: Mutex<VecDeque<(Instant, Value)>>,
    wake: Notify,
}

impl Backlog {
    fn lock(&self) -> MutexGuard<'_, VecDeque<(Instant, Value)>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next snapshot to post, coalescing a backlog that is too old.
    fn next(&self, stats: &mut RelayStats) -> Option<Value> {
        let mut q = self.lock();
        let behind = q
            .front()
            .is_some_and(|(at, _)| at.elapsed() > COALESCE_AFTER);
        if behind && q.len() > 1 {
            stats.coalesced += q.len() as u64 - 1;
            let latest = q.pop_back();
            q.clear();
            return latest.map(|(_, v)| v);
        }
        q.pop_front().map(|(_, v)| v)
    }
}

/// A running relay.
pub struct Relay {
    backlog: Arc<Backlog>,
    /// Stop after the post in flight.
    stop: CancellationToken,
    /// Stop once nothing is left to send.
    drain: CancellationToken,
    task: JoinHandle<RelayStats>,
    job_id: String,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("job_id", &self.job_id)
            .finish()
    }
}

impl Relay {
    /// Starts relaying for `job_id`.
    pub fn start(client: PlatformClient, job_id: String) -> Relay {
        let backlog = Arc::new(Backlog::default());
        let stop = CancellationToken::new();
        let drain = CancellationToken::new();
        let task = tokio::spawn(Self::post_loop(
            client,
            job_id.clone(),
            backlog.clone(),
            stop.clone(),
            drain.clone(),
        ));
        Relay {
            backlog,
            stop,
            drain,
            task,
            job_id,
        }
    }

    async fn post_loop(
        client: PlatformClient,
        job_id: String,
        backlog: Arc<Backlog>,
        stop: CancellationToken,
        drain: CancellationToken,
    ) -> RelayStats {
        let mut stats = RelayStats::default();
        loop {
            if stop.is_cancelled() {
                return stats;
            }
            let Some(snapshot) = backlog.next(&mut stats) else {
                if drain.is_cancelled() {
                    return stats;
                }
                tokio::select! {
                    _ = stop.cancelled() => return stats,
                    _ = drain.cancelled() => continue,
                    _ = backlog.wake.notified() => continue,
                }
            };
            // Not cancellable: `finish` waits for this post to settle.
            match client.post_progress(&job_id, &snapshot).await {
                Ok(()) => stats.posted += 1,
                Err(e) => {
                    stats.failed += 1;
                    debug!(job_id = %job_id, error = %e, "progress post failed");
                }
            }
        }
    }

    /// Queues a snapshot. Never blocks.
    pub fn update(&self, snapshot: Value) {
        {
            let mut q = self.backlog.lock();
            if q.len() >= MAX_BACKLOG {
                q.pop_front();
            }
            q.push_back((Instant::now(), snapshot));
        }
        self.backlog.wake.notify_one();
    }

    /// With `drain`, sends what is left (coalescing an old backlog, as always) and returns when
    /// nothing is pending; without, returns once the post in flight settled and drops the rest.
    /// After this returns, no progress post for the job is sent or in flight.
    pub async fn finish(self, drain: bool) -> RelayStats {
        if drain {
            self.drain.cancel();
        } else {
            self.stop.cancel();
        }
        let mut stats = self.task.await.unwrap_or_default();
        let mut q = self.backlog.lock();
        stats.coalesced += q.len() as u64;
        q.clear();
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_fresh_backlog_is_posted_in_order_an_old_one_coalesces() {
        let backlog = Backlog::default();
        let mut stats = RelayStats::default();
        let now = Instant::now();
        backlog.lock().extend([(now, json!(1)), (now, json!(2))]);
        assert_eq!(backlog.next(&mut stats), Some(json!(1)));
        assert_eq!(backlog.next(&mut stats), Some(json!(2)));
        assert_eq!(backlog.next(&mut stats), None);
        let old = now - COALESCE_AFTER * 2;
        backlog
            .lock()
            .extend([(old, json!(3)), (old, json!(4)), (now, json!(5))]);
        assert_eq!(backlog.next(&mut stats), Some(json!(5)));
        assert_eq!(stats.coalesced, 2);
        assert_eq!(backlog.next(&mut stats), None);
    }
}
