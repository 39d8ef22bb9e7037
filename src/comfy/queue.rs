//! `/queue`: the prompts running and pending.

use serde_json::Value;

/// `/queue`, reduced to what we use.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QueueSnapshot {
    /// Running prompt ids.
    pub running: Vec<String>,
    /// Pending prompt ids, sorted by queue number (run order).
    pub pending: Vec<String>,
}

impl QueueSnapshot {
    /// 0 when running, n when n prompts run before it, None when not in the queue.
    pub fn position(&self, prompt_id: &str) -> Option<usize> {
        if self.running.iter().any(|p| p == prompt_id) {
            return Some(0);
        }
        self.pending
            .iter()
            .position(|p| p == prompt_id)
            .map(|i| i + self.running.len())
    }

    pub(crate) fn parse(v: &Value) -> QueueSnapshot {
        let items = |k: &str| -> Vec<(f64, String)> {
            v.get(k)
                .and_then(Value::as_array)
                .map(|list| {
                    list.iter()
                        .filter_map(|item| {
                            let number = item.get(0).and_then(Value::as_f64).unwrap_or(0.0);
                            let id = item.get(1).and_then(Value::as_str)?;
                            Some((number, id.to_owned()))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut pending = items("queue_pending");
        pending.sort_by(|a, b| a.0.total_cmp(&b.0));
        QueueSnapshot {
            running: items("queue_running").into_iter().map(|i| i.1).collect(),
            pending: pending.into_iter().map(|i| i.1).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn queue_position_sorts_pending_by_number() {
        let q = QueueSnapshot::parse(&json!({"queue_running": [[0, "r", {}, {}, []]],
            "queue_pending": [[5, "late", {}, {}, []], [2, "early", {}, {}, []]]}));
        assert_eq!(q.position("r"), Some(0));
        assert_eq!(q.position("early"), Some(1));
        assert_eq!(q.position("late"), Some(2));
        assert_eq!(q.position("x"), None);
    }
}
