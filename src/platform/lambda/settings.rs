//! Lambda settings from the environment: the variables the Runtime API contract sets, the
//! response mode, the deadline margin, and the inline output limit per mode.

use std::time::Duration;

use crate::config::{ConfigError, EnvReader};

/// `MAX_INLINE_OUTPUT_BYTES` default with a buffered response: Lambda's 6 MB response limit.
pub const BUFFERED_LIMIT: u64 = 6 * 1024 * 1024;
/// The whole streamed response may be 20 MB (the limit this adapter assumes; AWS may allow more).
pub const STREAMED_LIMIT: u64 = 20 * 1024 * 1024;
/// Of a streamed response, what the progress lines may take; the output line gets the rest.
pub const PROGRESS_BUDGET: u64 = 1024 * 1024;
/// `LAMBDA_DEADLINE_MARGIN_S` default.
pub const DEFAULT_DEADLINE_MARGIN: Duration = Duration::from_secs(3);

/// The variables the Lambda service (or an emulator) sets for a runtime, which the
/// `lambda_runtime` crate requires; it panics without them, so they are checked first.
pub const REQUIRED_VARS: [&str; 4] = [
    "AWS_LAMBDA_RUNTIME_API",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION",
];

/// How an invocation's result goes back (`LAMBDA_RESPONSE_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseMode {
    /// One JSON response at the end (the default; any invocation type, 6 MB).
    Buffered,
    /// NDJSON progress lines, then the output line (needs a function URL with
    /// `InvokeMode: RESPONSE_STREAM` or `InvokeWithResponseStream`; 20 MB).
    Streaming,
}

impl ResponseMode {
    /// The inline output limit when `MAX_INLINE_OUTPUT_BYTES` is not set.
    pub fn inline_limit(self) -> u64 {
        match self {
            ResponseMode::Buffered => BUFFERED_LIMIT,
            ResponseMode::Streaming => STREAMED_LIMIT - PROGRESS_BUDGET,
        }
    }

    /// The name used in `LAMBDA_RESPONSE_MODE` and in logs.
    pub fn name(self) -> &'static str {
        match self {
            ResponseMode::Buffered => "buffered",
            ResponseMode::Streaming => "streaming",
        }
    }
}

/// Settings of the Lambda front end.
#[derive(Debug, Clone)]
pub struct LambdaSettings {
    /// `AWS_LAMBDA_RUNTIME_API`: `host:port` of the Runtime API.
    pub runtime_api: String,
    /// `LAMBDA_RESPONSE_MODE`: `buffered` (default) or `streaming`.
    pub response_mode: ResponseMode,
    /// `LAMBDA_DEADLINE_MARGIN_S` (3): the prompt is interrupted this long before the
    /// invocation's deadline and a `Timeout` error is returned, instead of being killed.
    pub deadline_margin: Duration,
}

/// Why the Lambda settings cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LambdaConfigError {
    /// Variables the Runtime API contract sets are missing.
    #[error("{} not set: they are set by the Lambda service (or by an emulator such as `cargo lambda watch` or the Runtime Interface Emulator); set them by hand to run against another Runtime API", .0.join(", "))]
    Missing(Vec<&'static str>),
    /// A value that does not parse.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

impl LambdaSettings {
    /// Reads the settings through `lookup` (the process environment in production).
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<LambdaSettings, LambdaConfigError> {
        let env = EnvReader::new(lookup);
        let get = |name: &str| env.get(name);
        let missing: Vec<&'static str> = REQUIRED_VARS
            .iter()
            .copied()
            .filter(|name| get(name).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(LambdaConfigError::Missing(missing));
        }
        env.parse(
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
            "a whole number of MB",
            |v| v.parse::<i32>().ok(),
        )?;
        let response_mode = match get("LAMBDA_RESPONSE_MODE").map(|v| v.to_ascii_lowercase()) {
            None => ResponseMode::Buffered,
            Some(v) if v == "buffered" => ResponseMode::Buffered,
            Some(v) if v == "streaming" || v == "stream" => ResponseMode::Streaming,
            Some(v) => {
                return Err(ConfigError {
                    name: "LAMBDA_RESPONSE_MODE",
                    value: v,
                    expected: "buffered or streaming".into(),
                }
                .into())
            }
        };
        let deadline_margin = env
            .parse("LAMBDA_DEADLINE_MARGIN_S", "seconds from 0 to 900", |v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && (0.0..=900.0).contains(s))
                    .map(Duration::from_secs_f64)
            })?
            .unwrap_or(DEFAULT_DEADLINE_MARGIN);
        Ok(LambdaSettings {
            runtime_api: get("AWS_LAMBDA_RUNTIME_API").unwrap_or_default(),
            response_mode,
            deadline_margin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(vars: &[(&str, &str)]) -> Result<LambdaSettings, LambdaConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        LambdaSettings::from_lookup(|k| map.get(k).cloned())
    }

    const BASE: [(&str, &str); 4] = [
        ("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001"),
        ("AWS_LAMBDA_FUNCTION_NAME", "comfy"),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024"),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
    ];

    #[test]
    fn defaults_and_modes() {
        let s = read(&BASE).unwrap();
        assert_eq!(s.runtime_api, "127.0.0.1:9001");
        assert_eq!(s.response_mode, ResponseMode::Buffered);
        assert_eq!(s.deadline_margin, DEFAULT_DEADLINE_MARGIN);
        let mut vars = BASE.to_vec();
        vars.push(("LAMBDA_RESPONSE_MODE", " Streaming "));
        vars.push(("LAMBDA_DEADLINE_MARGIN_S", "1.5"));
        let s = read(&vars).unwrap();
        assert_eq!(s.response_mode, ResponseMode::Streaming);
        assert_eq!(s.deadline_margin, Duration::from_millis(1500));
        assert_eq!(ResponseMode::Buffered.inline_limit(), 6 * 1024 * 1024);
        assert_eq!(ResponseMode::Streaming.inline_limit(), 19 * 1024 * 1024);
    }

    #[test]
    fn missing_and_bad_values_are_named() {
        let err = read(&BASE[..2]).unwrap_err();
        assert_eq!(
            err,
            LambdaConfigError::Missing(vec![
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                "AWS_LAMBDA_FUNCTION_VERSION"
            ])
        );
        assert!(err
            .to_string()
            .starts_with("AWS_LAMBDA_FUNCTION_MEMORY_SIZE, AWS_LAMBDA_FUNCTION_VERSION not set"));
        let mut vars = BASE.to_vec();
        vars.push(("LAMBDA_RESPONSE_MODE", "chunked"));
        assert!(read(&vars)
            .unwrap_err()
            .to_string()
            .contains("LAMBDA_RESPONSE_MODE"));
        let mut vars = BASE.to_vec();
        vars[2].1 = "lots";
        assert!(read(&vars)
            .unwrap_err()
            .to_string()
            .contains("AWS_LAMBDA_FUNCTION_MEMORY_SIZE"));
        let mut vars = BASE.to_vec();
        vars.push(("LAMBDA_DEADLINE_MARGIN_S", "-1"));
        assert!(read(&vars).is_err());
    }
}
