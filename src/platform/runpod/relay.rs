//! The progress relay of one job: at most one progress post in flight; while one is in flight,
//! newer snapshots replace older ones (the platform keeps only the last), so a slow platform never
//! slows the job. [`Relay::finish`] waits for the post in flight and then, when asked, sends the
//! latest snapshot not yet sent, so `/status` is current just before the result; after it
//! returns no progress post is sent or in flight, so none can land after the final result.

use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::client::PlatformClient;

/// A running relay.
#[derive(Debug)]
pub struct Relay {
    latest: watch::Sender<Option<Value>>,
    stop: CancellationToken,
    /// Returns its stats and the receiver, so `finish` can send what is still pending.
    task: JoinHandle<(RelayStats, Option<watch::Receiver<Option<Value>>>)>,
    client: PlatformClient,
    job_id: String,
}

/// What a relay did, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Posts the platform accepted.
    pub posted: u64,
    /// Posts that failed (not retried: the next snapshot supersedes them).
    pub failed: u64,
}

impl Relay {
    /// Starts relaying for `job_id`.
    pub fn start(client: PlatformClient, job_id: String) -> Relay {
        let (latest, mut rx) = watch::channel::<Option<Value>>(None);
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let (task_client, task_job) = (client.clone(), job_id.clone());
        let task = tokio::spawn(async move {
            let (client, job_id) = (task_client, task_job);
            let mut stats = RelayStats::default();
            loop {
                tokio::select! {
                    biased;
                    _ = stopped.cancelled() => break,
                    changed = rx.changed() => {
                        if changed.is_err() {
                            return (stats, None);
                        }
                    }
                }
                let Some(snapshot) = rx.borrow_and_update().clone() else {
                    continue;
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
            (stats, Some(rx))
        });
        Relay {
            latest,
            stop,
            task,
            client,
            job_id,
        }
    }

    /// Queues a snapshot, replacing one not yet sent. Never blocks.
    pub fn update(&self, snapshot: Value) {
        self.latest.send_replace(Some(snapshot));
    }

    /// Waits for the post in flight to settle; with `flush`, then posts the latest snapshot not
    /// yet sent. After this returns, no progress post for the job is sent or in flight.
    pub async fn finish(self, flush: bool) -> RelayStats {
        self.stop.cancel();
        let (mut stats, rx) = self.task.await.unwrap_or_default();
        if let (true, Some(mut rx)) = (flush, rx) {
            if rx.has_changed().unwrap_or(false) {
                if let Some(snapshot) = rx.borrow_and_update().clone() {
                    match self.client.post_progress(&self.job_id, &snapshot).await {
                        Ok(()) => stats.posted += 1,
                        Err(_) => stats.failed += 1,
                    }
                }
            }
        }
        stats
    }
}
