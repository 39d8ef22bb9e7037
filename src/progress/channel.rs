//! How a job's updates leave the engine: an unbounded channel, so progress never waits on a
//! consumer.

use tokio::sync::mpsc;

use super::node_event::NodeEvent;
use super::snapshot::ProgressSnapshot;
use crate::metrics::RetryReason;

/// One update of a running job, in the order the engine made them.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// A progress snapshot.
    Snapshot(ProgressSnapshot),
    /// What a node produced or reported.
    Node(NodeEvent),
    /// A call to ComfyUI is retried (for the metrics; no sink sees it).
    Retry(RetryReason),
}

/// Where a job's updates go: never blocks the job; a dropped receiver is ignored.
#[derive(Debug, Clone, Default)]
pub struct ProgressSender(Option<mpsc::UnboundedSender<Update>>);

impl ProgressSender {
    /// A sender that discards everything.
    pub fn none() -> ProgressSender {
        ProgressSender(None)
    }

    /// Publishes a snapshot.
    pub fn send(&self, snapshot: ProgressSnapshot) {
        self.update(Update::Snapshot(snapshot));
    }

    /// Publishes what a node produced or reported.
    pub fn node_event(&self, event: NodeEvent) {
        self.update(Update::Node(event));
    }

    /// Counts a retry of a call to ComfyUI (a WebSocket reconnect).
    pub fn retry(&self, reason: RetryReason) {
        self.update(Update::Retry(reason));
    }

    fn update(&self, update: Update) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(update);
        }
    }
}

/// A sender and the receiver its updates arrive on, in order.
pub fn channel() -> (ProgressSender, mpsc::UnboundedReceiver<Update>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (ProgressSender(Some(tx)), rx)
}
