//! The progress tracker: one job's prompt events in, [`ProgressSnapshot`]s out (node and step,
//! node and overall percentages with cached nodes counted done, ETA from the step rate, queue
//! position).

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use super::snapshot::{Num, ProgressKind, ProgressSnapshot};
use super::step_name::step_name;
use crate::comfy::{PromptEvent, Workflow};
use crate::eta::{round1, step_eta};

#[derive(Debug, Clone)]
struct StepState {
    node: String,
    value: f64,
    max: f64,
    /// First observed step of this node and when.
    first: (f64, Instant),
    /// When the node started.
    node_started: Instant,
}

/// Turns [`PromptEvent`]s into [`ProgressSnapshot`]s for one job.
#[derive(Debug, Clone)]
pub struct ProgressTracker {
    started_at: Instant,
    class_of: HashMap<String, String>,
    /// What the user sees as the name of a node inside a subgraph (ids like `12:3`).
    title_of: HashMap<String, String>,
    /// Share of the workflow each node stands for: 1, plus its `steps` for sampler-like nodes,
    /// so a 25-step sampler weighs more than a loader in `overall_percent`.
    weight_of: HashMap<String, f64>,
    total_weight: f64,
    nodes_total: usize,
    done: HashSet<String>,
    /// The weight of the nodes in `done`, kept as they are added (every snapshot needs it: a
    /// sum over `done` there would make a job's progress quadratic in its node count).
    done_weight: f64,
    cached: HashSet<String>,
    current: Option<(String, Instant)>,
    step: Option<StepState>,
    overall: f64,
    prompt_id: Option<String>,
    queue_remaining: Option<u64>,
    queue_position: Option<usize>,
    /// A `queued` snapshot was published (later ones only when the queue state changes).
    queued_reported: bool,
}

/// The `step` label of a [`ProgressKind::Loading`] snapshot.
pub const LOADING_MODELS: &str = "Loading models";

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

impl ProgressTracker {
    /// A tracker for `workflow`, whose job started at `started_at`.
    pub fn new(workflow: &Workflow, started_at: Instant) -> ProgressTracker {
        let class_of = workflow
            .nodes()
            .filter_map(|n| Some((n.id.to_owned(), n.class_type?.to_owned())))
            .collect();
        let title_of = workflow
            .nodes()
            .filter(|n| n.id.contains(':'))
            .filter_map(|n| Some((n.id.to_owned(), n.title.or(n.class_type)?.to_owned())))
            .collect();
        let weight_of: HashMap<String, f64> = workflow
            .nodes()
            .map(|n| {
                (
                    n.id.to_owned(),
                    1.0 + n.steps.unwrap_or(0).min(10_000) as f64,
                )
            })
            .collect();
        let total_weight = weight_of.values().sum();
        ProgressTracker {
            started_at,
            class_of,
            title_of,
            weight_of,
            total_weight,
            nodes_total: workflow.len(),
            done: HashSet::new(),
            done_weight: 0.0,
            cached: HashSet::new(),
            current: None,
            step: None,
            overall: 0.0,
            prompt_id: None,
            queue_remaining: None,
            queue_position: None,
            queued_reported: false,
        }
    }

    /// Records the prompt id once ComfyUI accepted the prompt.
    pub fn set_prompt_id(&mut self, prompt_id: &str) {
        self.prompt_id = Some(prompt_id.to_owned());
    }

    fn is_node(&self, id: &str) -> bool {
        self.class_of.contains_key(id)
    }

    fn mark_done(&mut self, id: &str) {
        if self.is_node(id) && !self.done.contains(id) {
            self.done.insert(id.to_owned());
            self.done_weight += self.weight_of.get(id).copied().unwrap_or(0.0);
        }
    }

    fn start_node(&mut self, node: &str, now: Instant) {
        if let Some((prev, _)) = self.current.take() {
            if prev != node {
                self.mark_done(&prev);
            }
        }
        self.current = Some((node.to_owned(), now));
        if self.step.as_ref().is_some_and(|s| s.node != node) {
            self.step = None;
        }
    }

    /// Records a step; returns false when it repeats the last one (progress_state then progress).
    fn record_step(&mut self, node: &str, value: f64, max: f64, now: Instant) -> bool {
        if let Some(s) = &mut self.step {
            if s.node == node {
                if s.value == value && s.max == max {
                    return false;
                }
                s.value = value;
                s.max = max;
                return true;
            }
        }
        let node_started = match &self.current {
            Some((n, t)) if n == node => *t,
            _ => now,
        };
        if self.current.as_ref().map(|c| c.0.as_str()) != Some(node) {
            self.start_node(node, now);
        }
        self.step = Some(StepState {
            node: node.to_owned(),
            value,
            max,
            first: (value, now),
            node_started,
        });
        true
    }

    fn eta(&self, now: Instant) -> Option<f64> {
        let s = self.step.as_ref()?;
        step_eta(s.first, s.node_started, s.value, s.max, now)
    }

    fn snapshot(&mut self, kind: ProgressKind, now: Instant) -> ProgressSnapshot {
        let node = self.current.as_ref().map(|c| c.0.clone());
        let step = self
            .step
            .as_ref()
            .filter(|s| Some(&s.node) == node.as_ref());
        let (value, max) = step.map(|s| (s.value, s.max)).unwrap_or((0.0, 1.0));
        let percent = if max > 0.0 {
            round1((value / max * 100.0).clamp(0.0, 100.0))
        } else {
            0.0
        };
        let nodes_done = self.done.len();
        let weight = |n: &str| self.weight_of.get(n).copied().unwrap_or(0.0);
        let done_weight = self.done_weight;
        let running_weight = match &node {
            Some(n) if !self.done.contains(n) && max > 0.0 => {
                weight(n) * (value / max).clamp(0.0, 1.0)
            }
            _ => 0.0,
        };
        let computed = if kind == ProgressKind::Finished {
            100.0
        } else if self.total_weight > 0.0 {
            ((done_weight + running_weight) / self.total_weight * 100.0).min(100.0)
        } else {
            0.0
        };
        self.overall = self.overall.max(round1(computed));
        let node_type = node.as_ref().and_then(|n| self.class_of.get(n)).cloned();
        ProgressSnapshot {
            kind,
            value: Num(value),
            max: Num(max),
            percent,
            step: node_type.as_deref().map(step_name),
            title: node.as_ref().and_then(|n| self.title_of.get(n)).cloned(),
            node,
            node_type,
            overall_percent: self.overall,
            nodes_done,
            nodes_total: self.nodes_total,
            nodes_cached: self.cached.len(),
            eta_seconds: if kind == ProgressKind::Progress {
                self.eta(now)
            } else {
                None
            },
            elapsed_seconds: round2(now.duration_since(self.started_at).as_secs_f64()),
            prompt_id: self.prompt_id.clone(),
            queue_remaining: self.queue_remaining,
            queue_position: if kind == ProgressKind::Queued {
                self.queue_position
            } else {
                None
            },
            message: None,
        }
    }

    /// Applies one event; returns the snapshot to publish, if the event changes what users see.
    pub fn apply(&mut self, event: &PromptEvent, now: Instant) -> Option<ProgressSnapshot> {
        match event {
            PromptEvent::Queued {
                prompt_id,
                position,
                queue_remaining,
            } => {
                self.prompt_id = Some(prompt_id.clone());
                // Reported once, then only when the place in the queue moves: the `status`
                // broadcasts that follow a queueing repeat it, or change only the queue's length.
                let position = position.or(self.queue_position);
                let changed = !self.queued_reported || position != self.queue_position;
                self.queue_position = position;
                self.queue_remaining = queue_remaining.or(self.queue_remaining);
                self.queued_reported = true;
                changed.then(|| self.snapshot(ProgressKind::Queued, now))
            }
            PromptEvent::Started => Some(self.snapshot(ProgressKind::Started, now)),
            PromptEvent::Cached { nodes } => {
                let before = self.cached.len();
                for n in nodes {
                    if self.is_node(n) {
                        self.cached.insert(n.clone());
                        self.mark_done(n);
                    }
                }
                // ComfyUI always sends the list, usually empty: report only actual cache hits.
                (self.cached.len() > before).then(|| self.snapshot(ProgressKind::Cached, now))
            }
            PromptEvent::Executing { node } => {
                if self.current.as_ref().map(|c| c.0.as_str()) == Some(node.as_str()) {
                    return None;
                }
                self.start_node(node, now);
                Some(self.snapshot(ProgressKind::Executing, now))
            }
            PromptEvent::Loading { node } => {
                if self.current.as_ref().map(|c| c.0.as_str()) != Some(node.as_str()) {
                    self.start_node(node, now);
                }
                let mut snap = self.snapshot(ProgressKind::Loading, now);
                snap.step = Some(LOADING_MODELS.to_owned());
                Some(snap)
            }
            PromptEvent::Progress { node, value, max } => {
                let node = node
                    .clone()
                    .or_else(|| self.current.as_ref().map(|c| c.0.clone()))?;
                self.record_step(&node, *value, *max, now)
                    .then(|| self.snapshot(ProgressKind::Progress, now))
            }
            PromptEvent::NodeStates { nodes } => {
                let mut step = None;
                for n in nodes {
                    if n.finished {
                        self.mark_done(&n.node);
                    } else if n.max > 1.0 && n.value > 0.0 {
                        step = Some((n.node.clone(), n.value, n.max));
                    }
                }
                let (node, value, max) = step?;
                self.record_step(&node, value, max, now)
                    .then(|| self.snapshot(ProgressKind::Progress, now))
            }
            PromptEvent::Executed { node, .. } => {
                self.mark_done(node);
                let mut snap = self.snapshot(ProgressKind::Executed, now);
                snap.node_type = self.class_of.get(node).cloned();
                snap.step = snap.node_type.as_deref().map(step_name);
                snap.title = self.title_of.get(node).cloned();
                snap.node = Some(node.clone());
                Some(snap)
            }
            PromptEvent::Failed(f) => {
                let mut snap = self.snapshot(ProgressKind::Error, now);
                snap.node = Some(f.node_id.clone());
                snap.node_type = Some(f.node_type.clone());
                snap.step = Some(step_name(&f.node_type));
                snap.title = self.title_of.get(&f.node_id).cloned();
                snap.message = Some(f.message.clone());
                Some(snap)
            }
            PromptEvent::Interrupted(i) => {
                let mut snap = self.snapshot(ProgressKind::Interrupted, now);
                snap.message = Some(format!(
                    "interrupted at node {} ({})",
                    i.node_id, i.node_type
                ));
                Some(snap)
            }
            PromptEvent::Succeeded => {
                if let Some((n, _)) = self.current.take() {
                    self.mark_done(&n);
                }
                None
            }
            PromptEvent::Preview { .. }
            | PromptEvent::Text { .. }
            | PromptEvent::ConnectionLost { .. }
            | PromptEvent::Reconnecting { .. }
            | PromptEvent::Reconnected => None,
        }
    }

    /// The last snapshot of a prompt that ran to its end.
    pub fn finished(&mut self, now: Instant) -> ProgressSnapshot {
        if let Some((n, _)) = self.current.take() {
            self.mark_done(&n);
        }
        self.step = None;
        self.snapshot(ProgressKind::Finished, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comfy::NodeState;
    use serde_json::json;
    use std::time::Duration;

    fn workflow() -> Workflow {
        Workflow::from_value(json!({
            "1": {"class_type": "EmptyImage", "inputs": {}},
            "2": {"class_type": "KSampler", "inputs": {}},
            "3": {"class_type": "SaveImage", "inputs": {}},
            "4": {"class_type": "VAEDecode", "inputs": {}}
        }))
        .unwrap()
    }

    #[test]
    fn sampler_steps_give_percent_overall_and_eta() {
        let t0 = Instant::now();
        let mut tr = ProgressTracker::new(&workflow(), t0);
        tr.set_prompt_id("p");
        let s = tr
            .apply(
                &PromptEvent::Cached {
                    nodes: vec!["1".into()],
                },
                t0,
            )
            .unwrap();
        assert_eq!(
            (s.nodes_done, s.nodes_cached, s.overall_percent),
            (1, 1, 25.0)
        );
        let s = tr
            .apply(&PromptEvent::Executing { node: "2".into() }, t0)
            .unwrap();
        assert_eq!(s.step.as_deref(), Some("Sampling"));
        let at = |ms| t0 + Duration::from_millis(ms);
        let s = tr
            .apply(
                &PromptEvent::Progress {
                    node: Some("2".into()),
                    value: 1.0,
                    max: 10.0,
                },
                at(100),
            )
            .unwrap();
        assert_eq!((s.percent, s.eta_seconds), (10.0, Some(0.9)));
        let s = tr
            .apply(
                &PromptEvent::Progress {
                    node: Some("2".into()),
                    value: 5.0,
                    max: 10.0,
                },
                at(500),
            )
            .unwrap();
        assert_eq!(s.kind, ProgressKind::Progress);
        assert_eq!((s.percent, s.eta_seconds), (50.0, Some(0.5)));
        assert_eq!(s.overall_percent, 37.5);
        let json = s.to_json();
        assert_eq!(json["value"], json!(5));
        assert_eq!(json["max"], json!(10));
        assert_eq!(json["type"], json!("progress"));
        assert!(json.get("message").is_none());
    }

    #[test]
    fn samplers_weigh_their_steps_in_the_overall_percent() {
        let wf = Workflow::from_value(json!({
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {}},
            "2": {"class_type": "KSampler", "inputs": {"steps": 18}},
            "3": {"class_type": "SaveImage", "inputs": {}}
        }))
        .unwrap();
        let t0 = Instant::now();
        let mut tr = ProgressTracker::new(&wf, t0);
        tr.apply(&PromptEvent::Executing { node: "1".into() }, t0);
        let s = tr
            .apply(&PromptEvent::Executing { node: "2".into() }, t0)
            .unwrap();
        assert_eq!(s.overall_percent, 4.8, "1 of 21 weight units");
        let s = tr
            .apply(
                &PromptEvent::Progress {
                    node: Some("2".into()),
                    value: 9.0,
                    max: 18.0,
                },
                t0,
            )
            .unwrap();
        assert_eq!(s.overall_percent, 50.0, "(1 + 19 / 2) of 21");
        assert!(
            tr.apply(&PromptEvent::Cached { nodes: vec![] }, t0)
                .is_none(),
            "an empty cache list is not news"
        );
    }

    #[test]
    fn repeated_queue_states_are_reported_once() {
        let t0 = Instant::now();
        let mut tr = ProgressTracker::new(&workflow(), t0);
        let queued = |position, remaining| PromptEvent::Queued {
            prompt_id: "p".into(),
            position,
            queue_remaining: remaining,
        };
        assert!(tr.apply(&queued(Some(2), None), t0).is_some());
        assert!(tr.apply(&queued(Some(2), None), t0).is_none());
        let s = tr.apply(&queued(Some(1), Some(2)), t0).unwrap();
        assert_eq!((s.queue_position, s.queue_remaining), (Some(1), Some(2)));
        assert!(tr.apply(&queued(Some(1), Some(2)), t0).is_none());
        assert_eq!(s.prompt_id.as_deref(), Some("p"));
    }

    #[test]
    fn progress_state_then_progress_is_one_snapshot_per_step() {
        let t0 = Instant::now();
        let mut tr = ProgressTracker::new(&workflow(), t0);
        tr.apply(&PromptEvent::Executing { node: "2".into() }, t0);
        let state = PromptEvent::NodeStates {
            nodes: vec![
                NodeState {
                    node: "1".into(),
                    value: 1.0,
                    max: 1.0,
                    finished: true,
                },
                NodeState {
                    node: "2".into(),
                    value: 3.0,
                    max: 20.0,
                    finished: false,
                },
            ],
        };
        assert!(tr.apply(&state, t0).is_some());
        let again = PromptEvent::Progress {
            node: Some("2".into()),
            value: 3.0,
            max: 20.0,
        };
        assert!(tr.apply(&again, t0).is_none());
    }

    #[test]
    fn overall_never_decreases_and_finishes_at_100() {
        let t0 = Instant::now();
        let mut tr = ProgressTracker::new(&workflow(), t0);
        let mut last = 0.0;
        let events = [
            PromptEvent::Executing { node: "1".into() },
            PromptEvent::Executing { node: "2".into() },
            PromptEvent::Progress {
                node: Some("2".into()),
                value: 9.0,
                max: 10.0,
            },
            PromptEvent::Executing { node: "4".into() },
            PromptEvent::Executed {
                node: "3".into(),
                files: 1,
                output: Box::default(),
            },
        ];
        for e in &events {
            if let Some(s) = tr.apply(e, t0) {
                assert!(
                    s.overall_percent >= last,
                    "{e:?}: {} < {last}",
                    s.overall_percent
                );
                last = s.overall_percent;
            }
        }
        assert_eq!(tr.finished(t0).overall_percent, 100.0);
    }
}
