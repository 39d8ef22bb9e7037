//! A node's remaining time from its step rate, rounded for display: the one ETA formula, used by
//! the progress tracker and by the readable event lines of `comfy::describe`.

use std::time::Instant;

/// Seconds left in a node at step `value` of `max`, from its step rate: since its `first`
/// observed step, or since it started (`node_started`) while only one step was seen. Rounded to
/// 0.1 s; 0 once the last step is done; `None` before the first step. The one ETA formula, used
/// by [`ProgressTracker`] and by the readable event lines of `comfy::describe`.
pub fn step_eta(
    first: (f64, Instant),
    node_started: Instant,
    value: f64,
    max: f64,
    now: Instant,
) -> Option<f64> {
    if max <= 0.0 || value <= 0.0 || value >= max {
        return (value >= max && max > 0.0).then_some(0.0);
    }
    let (v0, t0) = first;
    let per_step = if value > v0 {
        now.duration_since(t0).as_secs_f64() / (value - v0)
    } else {
        now.duration_since(node_started).as_secs_f64() / value
    };
    Some(round1(per_step * (max - value)))
}

pub fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}
