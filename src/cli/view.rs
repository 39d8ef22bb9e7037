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

/// One `--json-progress` line: the snapshot exactly as `/status` shows it (`step` is the label,
/// `value`/`max` the step numbers), plus the names this line used before, kept as aliases:
/// `stage` (= `step`) and `max_steps` (= `max`).
#[derive(Debug, Serialize)]
pub(crate) struct JsonLine<'a> {
    #[serde(flatten)]
    snapshot: &'a ProgressSnapshot,
    /// Alias of `step`.
    stage: Option<&'a str>,
    /// Alias of `max`.
    max_steps: Num,
}

impl<'a> JsonLine<'a> {
    pub(crate) fn from_snapshot(s: &'a ProgressSnapshot) -> JsonLine<'a> {
        JsonLine {
            snapshot: s,
            stage: s.step.as_deref(),
            max_steps: s.max,
        }
    }
}

/// The widest a progress line gets (a classic terminal).
pub(crate) const LINE_WIDTH: usize = 80;

/// At most `max` characters of `text`, with `…` when cut.
fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// What the job does now, after its overall percentage: `Sampling #3 12/25 · node 48% · ETA 3.1s`.
/// Names are cut so a line stays within [`LINE_WIDTH`].
pub(crate) fn describe(s: &ProgressSnapshot) -> String {
    let node = s.node.as_deref().map(|n| format!("#{}", cut(n, 12)));
    let what = match (&s.step, &s.node_type, &node) {
        (Some(step), Some(class), Some(node)) if step != class => {
            format!("{} {node} ({})", cut(step, 20), cut(class, 20))
        }
        (_, Some(class), Some(node)) => format!("{} {node}", cut(class, 28)),
        (_, _, Some(node)) => format!("node {node}"),
        _ => String::new(),
    };
    let mut text = match s.kind {
        ProgressKind::Waiting => s
            .message
            .clone()
            .unwrap_or_else(|| "waiting for ComfyUI".into()),
        ProgressKind::Downloading => match s.max.0 {
            max if max > 0.0 => format!(
                "downloading model {:.0}/{:.0} MB",
                s.value.0 / 1e6,
                max / 1e6
            ),
            _ => format!("downloading model {:.0} MB", s.value.0 / 1e6),
        },
        ProgressKind::Queued => match s.queue_position {
            Some(0) | None => "queued".to_owned(),
            Some(n) => format!("queued, {n} prompt(s) ahead"),
        },
        ProgressKind::Started => "started".to_owned(),
        ProgressKind::Cached => format!("{} node(s) cached", s.nodes_cached),
        ProgressKind::Executing | ProgressKind::Loading => what,
        ProgressKind::Progress => {
            let short = match (&s.step, &node) {
                (Some(step), Some(node)) => format!("{} {node}", cut(step, 20)),
                _ => what,
            };
            format!(
                "{short} {}/{} · node {:.0}%",
                fmt_num(s.value),
                fmt_num(s.max),
                s.percent
            )
        }
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

/// One plain progress line: `job  40% · Sampling #3 12/25 · node 48% · ETA 3.1s`, at most
/// [`LINE_WIDTH`] characters (a wait for ComfyUI is said in full).
pub(crate) fn line(s: &ProgressSnapshot) -> String {
    match s.kind {
        ProgressKind::Waiting => describe(s),
        _ => cut(
            &format!("job {:>3.0}% · {}", s.overall_percent.floor(), describe(s)),
            LINE_WIDTH,
        ),
    }
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
            // 1 + 1 + 8 + 1 + 22 + 10 = 43 columns, so the message gets the rest of 80 (and is
            // cut to the terminal's width when it is narrower).
            let style = ProgressStyle::with_template(
                "{spinner:.green} {elapsed_precise} [{bar:20.cyan/blue}] job {percent:>3}% · {wide_msg}",
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
                    let _ = writeln!(stderr, "{}", line(&s));
                }
                ProgressMode::Bar => {
                    if let Some(bar) = &bar {
                        bar.set_position((s.overall_percent * 10.0).floor() as u64);
                        // The failure itself is said once, in the command's summary.
                        bar.set_message(describe(&s));
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
            title: None,
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
    fn json_line_is_the_status_snapshot_plus_aliases() {
        let s = snapshot();
        let v = serde_json::to_value(JsonLine::from_snapshot(&s)).unwrap();
        let mut status = s.to_json();
        assert_eq!(
            v["step"],
            json!("Sampling"),
            "one meaning of step everywhere"
        );
        assert_eq!(
            (v["value"].clone(), v["max"].clone()),
            (json!(12), json!(25))
        );
        assert_eq!(v["stage"], json!("Sampling"));
        assert_eq!(v["max_steps"], json!(25));
        let line = v.as_object().unwrap();
        for (k, val) in status.as_object_mut().unwrap() {
            assert_eq!(line.get(k), Some(&*val), "{k}");
        }
    }

    #[test]
    fn readable_lines_fit_80_columns_and_label_both_percentages() {
        assert_eq!(
            line(&snapshot()),
            "job  40% · Sampling #3 12/25 · node 48% · ETA 3.1s"
        );
        let mut long = snapshot();
        long.node = Some("1234:5678:91011:1213".into());
        long.node_type = Some("KSamplerAdvancedEfficientWithAVeryLongName".into());
        long.step = long.node_type.clone();
        long.value = Num(1234.0);
        long.max = Num(10000.0);
        long.eta_seconds = Some(12345.6);
        for kind in [
            ProgressKind::Progress,
            ProgressKind::Executing,
            ProgressKind::Executed,
        ] {
            long.kind = kind;
            let l = line(&long);
            assert!(l.chars().count() <= LINE_WIDTH, "{l}");
            assert!(l.starts_with("job  40% · "), "{l}");
        }
    }
}
