//! How snapshots leave the engine: an unbounded channel, so progress never waits on a consumer.

use tokio::sync::mpsc;

use super::snapshot::ProgressSnapshot;

/// Where a job's snapshots go: never blocks the job; a dropped receiver is ignored.
#[derive(Debug, Clone, Default)]
pub struct ProgressSender(Option<mpsc::UnboundedSender<ProgressSnapshot>>);

impl ProgressSender {
    /// A sender that discards everything.
    pub fn none() -> ProgressSender {
        ProgressSender(None)
    }

    /// Publishes a snapshot.
    pub fn send(&self, snapshot: ProgressSnapshot) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(snapshot);
        }
    }
}

/// A sender and the receiver its snapshots arrive on, in order.
pub fn channel() -> (ProgressSender, mpsc::UnboundedReceiver<ProgressSnapshot>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (ProgressSender(Some(tx)), rx)
}
