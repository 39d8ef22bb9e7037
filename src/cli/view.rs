//! Progress on stderr: a live bar on a terminal, one readable line per event otherwise,
//! NDJSON with `--json-progress`, nothing with `--quiet`.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::progress::{Num, ProgressKind, ProgressSnapshot};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProgressMode {
    Quiet,
    Json,
    Bar,
    Lines,
}

impl ProgressMode {
    pub(crate) fn choose(quiet: bool, json: bool) -> ProgressMode {
        if quiet {
            ProgressMode::Quiet
        } else if json {
            ProgressMode::Json
        } else if std::io::stderr().is_terminal() {
            ProgressMode::Bar
        } else {
            ProgressMode::Lines
        }
    }
}

/// One `--json-progress` line.
#[derive(Debug, Serialize)]
pub(crate) struct JsonLine<'a> {
    #[serde(rename = "type")]
    kind: ProgressKind,
    step: Num,
    max_steps: Num,
    percent: f64,
    eta_seconds: Option<f64>,
    node: Option<&'a str>,
    node_type: Option<&'a str>,
    stage: Option<&'a str>,
    overall_percent: f64,
    nodes_done: usize,
    nodes_total: usize,
    nodes_cached: usize,
    elapsed_seconds: f64,
    prompt_id: Option<&'a str>,
    queue_position: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
}

impl<'a> JsonLine<'a> {
    pub(crate) fn from_snapshot(s: &'a ProgressSnapshot) -> JsonLine<'a> {
        JsonLine {
            kind: s.kind,
            step: s.value,
            max_steps: s.max,
            percent: s.percent,
            eta_seconds: s.eta_seconds,
            node: s.node.as_deref(),
            node_type: s.node_type.as_deref(),
            stage: s.step.as_deref(),
            overall_percent: s.overall_percent,
            nodes_done: s.nodes_done,
            nodes_total: s.nodes_total,
            nodes_cached: s.nodes_cached,
            elapsed_seconds: s.elapsed_seconds,
            prompt_id: s.prompt_id.as_deref(),
            queue_position: s.queue_position,
            message: s.message.as_deref(),
        }
    }
}

/// A readable description: `Sampling (KSampler, node 3) step 12/25 48% · ETA 3.1s`.
pub(crate) fn describe(s: &ProgressSnapshot) -> String {
    let what = match (&s.step, &s.node_type, &s.node) {
        (Some(step), Some(class), Some(node)) if step != class => {
            format!("{step} ({class}, node {node})")
        }
        (_, Some(class), Some(node)) => format!("{class} (node {node})"),
        (_, _, Some(node)) => format!("node {node}"),
        _ => String::new(),
    };
    let mut text = match s.kind {
        ProgressKind::Queued => match s.queue_position {
            Some(0) | None => "queued".to_owned(),
            Some(n) => format!("queued, {n} prompt(s) ahead"),
        },
        ProgressKind::Started => "started".to_owned(),
        ProgressKind::Cached => format!("{} node(s) cached", s.nodes_cached),
        ProgressKind::Executing => what,
        ProgressKind::Progress => format!(
            "{what} step {}/{} {:.0}%",
            fmt_num(s.value),
            fmt_num(s.max),
            s.percent
        ),
        ProgressKind::Executed => format!("{what} done"),
        ProgressKind::Error => format!("{what} failed"),
        ProgressKind::Interrupted => "interrupted".to_owned(),
        ProgressKind::Finished => "finished, collecting outputs".to_owned(),
    };
    if let Some(eta) = s.eta_seconds {
        text.push_str(&format!(" · ETA {eta:.1}s"));
    }
    text
}

fn fmt_num(n: Num) -> String {
    if n.0.fract() == 0.0 {
        format!("{}", n.0 as i64)
    } else {
        format!("{:.1}", n.0)
    }
}

/// Consumes snapshots until the job's sender is dropped.
pub(crate) struct ProgressView {
    mode: ProgressMode,
}

impl ProgressView {
    pub(crate) fn new(mode: ProgressMode) -> ProgressView {
        ProgressView { mode }
    }

    pub(crate) async fn drive(self, mut rx: UnboundedReceiver<ProgressSnapshot>) {
        let bar = (self.mode == ProgressMode::Bar).then(|| {
            let bar = ProgressBar::with_draw_target(Some(1000), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{spinner:.green} [{elapsed_precise}] [{bar:30.cyan/blue}] {percent:>3}% {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        let mut stderr = std::io::stderr();
        while let Some(s) = rx.recv().await {
            match self.mode {
                ProgressMode::Quiet => {}
                ProgressMode::Json => {
                    if let Ok(line) = serde_json::to_string(&JsonLine::from_snapshot(&s)) {
                        let _ = writeln!(stderr, "{line}");
                    }
                }
                ProgressMode::Lines => {
                    let _ = writeln!(stderr, "[{:>5.1}%] {}", s.overall_percent, describe(&s));
                }
                ProgressMode::Bar => {
                    if let Some(bar) = &bar {
                        bar.set_position((s.overall_percent * 10.0).round() as u64);
                        bar.set_message(describe(&s));
                        if s.kind == ProgressKind::Error {
                            bar.println(format!(
                                "error: {}",
                                s.message.as_deref().unwrap_or("node failed")
                            ));
                        }
                    }
                }
            }
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn snapshot() -> ProgressSnapshot {
        ProgressSnapshot {
            kind: ProgressKind::Progress,
            value: Num(12.0),
            max: Num(25.0),
            percent: 48.0,
            node: Some("3".into()),
            node_type: Some("KSampler".into()),
            step: Some("Sampling".into()),
            overall_percent: 40.0,
            nodes_done: 3,
            nodes_total: 7,
            nodes_cached: 0,
            eta_seconds: Some(3.1),
            elapsed_seconds: 2.5,
            prompt_id: Some("p".into()),
            queue_remaining: Some(1),
            queue_position: None,
            message: None,
        }
    }

    #[test]
    fn json_line_fields() {
        let s = snapshot();
        let v = serde_json::to_value(JsonLine::from_snapshot(&s)).unwrap();
        assert_eq!(v["step"], json!(12));
        assert_eq!(v["max_steps"], json!(25));
        assert_eq!(v["percent"], json!(48.0));
        assert_eq!(v["eta_seconds"], json!(3.1));
        assert_eq!(v["node"], json!("3"));
        assert_eq!(v["node_type"], json!("KSampler"));
        assert_eq!(v["stage"], json!("Sampling"));
    }

    #[test]
    fn readable_description() {
        assert_eq!(
            describe(&snapshot()),
            "Sampling (KSampler, node 3) step 12/25 48% · ETA 3.1s"
        );
    }
}
