//! Logging: structured `tracing` events, one line each, on stderr, filtered by `RUST_LOG`.
//!
//! Human text by default (a job's lines carry `job{job_id=…}`); with `RUNPOD_ENDPOINT_ID` set,
//! one JSON object per line in the platform's log-viewer convention:
//! `{"requestId": <job id or null>, "message": "...", "level": "INFO", ...fields}`.
//!
//! **Secrets.** Every line goes through [`scrub`] on its way to stderr: the value of every
//! [`crate::secret::Secret`] alive in the process (API keys from the environment, a job's
//! `comfy_org_api_key`, …) and of every environment variable whose name looks secret
//! (`*_API_KEY`, `*SECRET*`, `*TOKEN*`, …) is replaced by `[redacted]`. This is the safety net;
//! the code itself never formats a secret.

use std::fmt;
use std::io::Write;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::secret::{remember_env_secrets, scrub};

/// Longest message kept whole; longer ones are cut in the middle, as the SDK does.
const MAX_MESSAGE: usize = 4096;

/// Stderr, with every line passed through [`scrub`] (the fmt layer writes one event per call).
#[derive(Clone, Copy)]
struct ScrubbedStderr;

impl Write for ScrubbedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        match std::str::from_utf8(buf) {
            Ok(text) => err.write_all(scrub(text).as_bytes())?,
            Err(_) => err.write_all(buf)?,
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for ScrubbedStderr {
    type Writer = ScrubbedStderr;
    fn make_writer(&'a self) -> ScrubbedStderr {
        ScrubbedStderr
    }
}

/// Reports panics on stderr through [`scrub`] (the default hook would print the message as it
/// is); installed once by the binary.
pub fn install_panic_hook() {
    remember_env_secrets();
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        let line = format!(
            "comfy-worker: thread '{}' panicked{at}: {what}",
            thread.name().unwrap_or("unnamed")
        );
        eprintln!("{}", scrub(&line));
    }));
}

/// Third-party crates whose debug and trace lines are noise, or worse: the WebSocket library
/// prints frames (payloads in hex) at trace, past the secret scrubber. A global `RUST_LOG`
/// level (`RUST_LOG=trace`) leaves them at `info` unless it names them.
const THIRD_PARTY: &[&str] = &[
    "axum",
    "h2",
    "hyper",
    "hyper_util",
    "lambda_runtime",
    "lambda_runtime_api_client",
    "mio",
    "object_store",
    "reqwest",
    "rustls",
    "tokio",
    "tokio_tungstenite",
    "tower",
    "tower_http",
    "tungstenite",
];

/// Crates never logged above `debug`, even when named: their trace lines carry payloads.
const NEVER_TRACE: &[&str] = &["tungstenite", "tokio_tungstenite"];

/// The filter directives for `RUST_LOG` (`None`: unset or empty) and the command's default:
/// the user's directives, with every third-party crate they do not name capped at `info`, and
/// the WebSocket library never above `debug`.
pub fn filter_directives(rust_log: Option<&str>, default: &str) -> String {
    let given = rust_log.map(str::trim).filter(|v| !v.is_empty());
    let mut directives: Vec<String> = given
        .unwrap_or(default)
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| match d.split_once('=') {
            Some((target, level))
                if NEVER_TRACE.iter().any(|c| target.starts_with(c))
                    && level.eq_ignore_ascii_case("trace") =>
            {
                format!("{target}=debug")
            }
            _ => d.to_owned(),
        })
        .collect();
    let named = |krate: &str| {
        directives.iter().any(|d| {
            let target = d.split(['=', '[']).next().unwrap_or_default();
            target == krate || target.starts_with(&format!("{krate}::"))
        })
    };
    let caps: Vec<String> = THIRD_PARTY
        .iter()
        .filter(|krate| !named(krate))
        .map(|krate| format!("{krate}=info"))
        .collect();
    directives.extend(caps);
    directives.join(",")
}

/// Installs the global subscriber once; `default` applies when `RUST_LOG` is unset.
pub fn init(default: &str, json: bool) {
    remember_env_secrets();
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = EnvFilter::try_new(filter_directives(rust_log.as_deref(), default))
        .or_else(|_| EnvFilter::try_new(filter_directives(None, default)))
        .unwrap_or_else(|_| EnvFilter::new(default));
    if json {
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(ScrubbedStderr)
            .event_format(RunPodJson);
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(JobIdLayer)
            .with(fmt)
            .try_init();
    } else {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(ScrubbedStderr)
            .with_target(false)
            // Colours only on a terminal: a log file or `docker logs` gets plain text.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init();
    }
}

/// True when logs should be JSON lines (the platform sets `RUNPOD_ENDPOINT_ID`).
pub fn json_requested() -> bool {
    std::env::var_os("RUNPOD_ENDPOINT_ID").is_some_and(|v| !v.is_empty())
}

/// The `job_id` of a span, kept in its extensions.
struct JobId(String);

/// Records the `job_id` field of new spans.
struct JobIdLayer;

impl<S> Layer<S> for JobIdLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let (Some(Value::String(job_id)), Some(span)) = (fields.0.remove("job_id"), ctx.span(id))
        {
            span.extensions_mut().insert(JobId(job_id));
        }
    }
}

#[derive(Default)]
struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::Bool(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
}

fn cut_middle(s: String) -> String {
    if s.len() <= MAX_MESSAGE {
        return s;
    }
    let half = MAX_MESSAGE / 2;
    let mut head = half;
    while !s.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = s.len() - half;
    while !s.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{}\n...TRUNCATED {} CHARACTERS...\n{}",
        &s[..head],
        tail - head,
        &s[tail..]
    )
}

/// One JSON object per event: `requestId`, `message`, `level`, then the event's other fields.
struct RunPodJson;

impl<S, N> FormatEvent<S, N> for RunPodJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let job_id = ctx.event_scope().and_then(|scope| {
            scope
                .from_root()
                .filter_map(|span| span.extensions().get::<JobId>().map(|j| j.0.clone()))
                .last()
        });
        let message = match fields.0.remove("message") {
            Some(Value::String(s)) => s,
            Some(other) => other.to_string(),
            None => String::new(),
        };
        let mut line = Map::new();
        line.insert(
            "requestId".into(),
            job_id.map(Value::String).unwrap_or(Value::Null),
        );
        line.insert("message".into(), Value::String(cut_middle(message)));
        line.insert(
            "level".into(),
            Value::String(event.metadata().level().to_string()),
        );
        for (k, v) in fields.0 {
            line.entry(k).or_insert(v);
        }
        let text = serde_json::to_string(&Value::Object(line)).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_the_job_id() {
        let capture = Capture::default();
        let sink = capture.clone();
        let subscriber = tracing_subscriber::registry().with(JobIdLayer).with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || sink.clone())
                .event_format(RunPodJson),
        );
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside");
            let span = tracing::info_span!("job", job_id = %"job-7");
            let _g = span.enter();
            tracing::warn!(attempt = 2, "posting failed");
        });
        let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines[0],
            serde_json::json!({"requestId": null, "message": "outside", "level": "INFO"})
        );
        assert_eq!(
            lines[1],
            serde_json::json!({"requestId": "job-7", "message": "posting failed", "level": "WARN", "attempt": 2})
        );
    }

    #[test]
    fn long_messages_are_cut_in_the_middle() {
        let long = "a".repeat(5000);
        let cut = cut_middle(long);
        assert!(cut.len() < 4200);
        assert!(cut.contains("...TRUNCATED 904 CHARACTERS..."));
    }

    #[test]
    fn third_party_crates_stay_at_info_unless_named() {
        let d = filter_directives(None, "comfy_worker=info");
        assert!(d.starts_with("comfy_worker=info,"), "{d}");
        assert!(
            d.contains("tungstenite=info") && d.contains("hyper=info"),
            "{d}"
        );
        let d = filter_directives(Some("trace"), "comfy_worker=info");
        assert!(d.starts_with("trace,"), "{d}");
        assert!(
            d.contains(",tungstenite=info") && d.contains(",reqwest=info"),
            "{d}"
        );
        // Named: the user's level stands, except trace for the WebSocket library.
        let d = filter_directives(Some("debug,hyper=trace,tungstenite=trace"), "x=info");
        assert!(
            d.contains("hyper=trace") && !d.contains("hyper=info"),
            "{d}"
        );
        assert!(
            d.contains("tungstenite=debug") && !d.contains("tungstenite=trace"),
            "{d}"
        );
        assert!(!d.split(',').any(|x| x == "tungstenite=info"), "{d}");
        assert_eq!(
            filter_directives(Some("  "), "comfy_worker=warn")
                .split(',')
                .next(),
            Some("comfy_worker=warn")
        );
        // Every result is a filter tracing accepts.
        for given in [
            None,
            Some("trace"),
            Some("comfy_worker=debug,comfy_sim=debug"),
        ] {
            let d = filter_directives(given, "comfy_worker=info");
            assert!(EnvFilter::try_new(&d).is_ok(), "{d}");
        }
    }
}
