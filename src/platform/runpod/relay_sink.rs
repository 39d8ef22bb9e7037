//! A job's progress as RunPod progress posts: every snapshot goes to the [`Relay`]; when the
//! job asked for previews (`input.previews: true`, or `RUNPOD_PREVIEWS` for every job), each
//! post also carries the latest live preview, so `/status` shows the image as it forms.

use serde_json::Value;

use super::relay::Relay;
use crate::progress::{preview_body, NodeEvent, ProgressSnapshot};
use crate::runner::ProgressSink;

/// The runner's sink for a RunPod job's progress posts.
pub(super) struct RelaySink<'a> {
    relay: Option<&'a Relay>,
    previews: bool,
    last: Option<Value>,
    preview: Option<Value>,
}

impl<'a> RelaySink<'a> {
    /// Posts through `relay` (none when progress relaying is off); with `previews`, each post
    /// carries the latest preview.
    pub(super) fn new(relay: Option<&'a Relay>, previews: bool) -> RelaySink<'a> {
        RelaySink {
            relay,
            previews,
            last: None,
            preview: None,
        }
    }

    fn post(&self) {
        let (Some(relay), Some(last)) = (self.relay, &self.last) else {
            return;
        };
        let mut body = last.clone();
        if let (Some(preview), Value::Object(map)) = (&self.preview, &mut body) {
            map.insert("preview".into(), preview.clone());
        }
        relay.update(body);
    }
}

impl ProgressSink for RelaySink<'_> {
    fn snapshot(&mut self, snapshot: &ProgressSnapshot) {
        self.last = Some(snapshot.to_json());
        self.post();
    }

    fn node_event(&mut self, event: &NodeEvent) {
        let NodeEvent::Preview {
            node, mime, data, ..
        } = event
        else {
            return;
        };
        if !self.previews {
            return;
        }
        let node = node.clone().or_else(|| {
            self.last
                .as_ref()
                .and_then(|l| l["node"].as_str().map(str::to_owned))
        });
        self.preview = Some(preview_body(node.as_deref(), mime, data));
        self.post();
    }
}
