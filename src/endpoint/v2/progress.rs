//! The contract's `Progress` object, from the progress tracker's snapshot (the one place
//! progress is computed): `value` is the tracker's overall fraction (node- and step-weighted,
//! never decreasing), `step`/`steps` the current node's sampler steps.

use serde_json::{json, Value};

use crate::progress::{ProgressKind, ProgressSnapshot};

/// `Progress` for one snapshot.
pub(crate) fn progress_object(s: &ProgressSnapshot) -> Value {
    let value = (s.overall_percent / 100.0).clamp(0.0, 1.0);
    let stepping = s.node.is_some()
        && s.max.0 > 0.0
        && (s.kind == ProgressKind::Progress || !(s.value.0 == 0.0 && s.max.0 == 1.0));
    let (step, steps) = if stepping {
        (Some(s.value.0.max(0.0) as u64), Some(s.max.0 as u64))
    } else {
        (None, None)
    };
    let label = s
        .node_type
        .as_deref()
        .or(s.step.as_deref())
        .unwrap_or("node");
    let message = match (s.kind, step, steps) {
        (ProgressKind::Queued, _, _) => Some(match s.queue_position {
            Some(n) if n > 0 => format!("Waiting in ComfyUI's queue ({n} ahead)"),
            _ => "Waiting in ComfyUI's queue".to_owned(),
        }),
        (ProgressKind::Error | ProgressKind::Interrupted, _, _) => s.message.clone(),
        (ProgressKind::Finished, _, _) => Some("Finished".to_owned()),
        (_, Some(step), Some(steps)) => Some(format!("{label} {step}/{steps}")),
        (_, _, _) if s.node.is_some() => Some(label.to_owned()),
        _ => None,
    };
    json!({
        "value": value,
        "nodes_done": s.nodes_done,
        "nodes_total": s.nodes_total,
        "current_node": s.node,
        "current_node_class": s.node_type,
        "step": step,
        "steps": steps,
        "message": message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comfy::{PromptEvent, Workflow};
    use crate::progress::ProgressTracker;
    use std::time::Instant;

    #[test]
    fn steps_and_the_overall_fraction() {
        let workflow = Workflow::from_value(json!({
            "1": {"class_type": "KSampler", "inputs": {"steps": 20}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}
        }))
        .unwrap();
        let t = Instant::now();
        let mut tracker = ProgressTracker::new(&workflow, t);
        tracker.apply(&PromptEvent::Executing { node: "1".into() }, t);
        let s = tracker
            .apply(
                &PromptEvent::Progress {
                    node: Some("1".into()),
                    value: 5.0,
                    max: 20.0,
                },
                t,
            )
            .unwrap();
        let p = progress_object(&s);
        assert_eq!(p["step"], 5);
        assert_eq!(p["steps"], 20);
        assert_eq!(p["current_node"], "1");
        assert_eq!(p["current_node_class"], "KSampler");
        assert_eq!(p["message"], "KSampler 5/20");
        let v = p["value"].as_f64().unwrap();
        assert!(v > 0.0 && v < 1.0, "{v}");
        let done = progress_object(&tracker.finished(t));
        assert_eq!(done["value"], 1.0);
        assert_eq!(done["step"], Value::Null);
    }
}
