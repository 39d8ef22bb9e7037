//! Reading settings from the environment: [`EnvReader`] (through a lookup, so tests pass a
//! map instead of mutating the process environment) and [`ConfigError`], the one error a bad
//! value is reported with.

use std::path::PathBuf;
use std::time::Duration;

/// A variable with a value that does not parse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid value for {name}: '{value}' ({expected})")]
pub struct ConfigError {
    /// Variable name.
    pub name: &'static str,
    /// The value found.
    pub value: String,
    /// What was expected, or why the value cannot work.
    pub expected: std::borrow::Cow<'static, str>,
}

/// Reads variables through a lookup (the environment, or a map in tests): values are trimmed,
/// an empty one counts as unset, and a value that does not parse is a [`ConfigError`] naming
/// the variable. Every settings reader of the crate goes through it.
pub(crate) struct EnvReader<F: Fn(&str) -> Option<String>>(F);

impl<F: Fn(&str) -> Option<String>> EnvReader<F> {
    pub(crate) fn new(lookup: F) -> Self {
        EnvReader(lookup)
    }

    /// The trimmed value, `None` when unset or empty.
    pub(crate) fn get(&self, name: &str) -> Option<String> {
        (self.0)(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    /// The value as `parse` reads it, `None` when unset; a value `parse` refuses is an error
    /// saying what was `expected`.
    pub(crate) fn parse<T>(
        &self,
        name: &'static str,
        expected: &'static str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match parse(&v) {
                Some(t) => Ok(Some(t)),
                None => Err(ConfigError {
                    name,
                    value: v,
                    expected: expected.into(),
                }),
            },
        }
    }

    pub(crate) fn number(&self, name: &'static str, default: f64) -> Result<f64, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => match v.parse::<f64>() {
                Ok(n) if n.is_finite() && n >= 0.0 => Ok(n),
                _ => Err(ConfigError {
                    name,
                    value: v,
                    expected: "a non-negative number".into(),
                }),
            },
        }
    }

    pub(crate) fn millis(
        &self,
        name: &'static str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        self.number(name, default.as_millis() as f64)
            .map(|ms| Duration::from_secs_f64(ms / 1000.0))
    }

    pub(crate) fn secs(
        &self,
        name: &'static str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        self.number(name, default.as_secs_f64())
            .map(Duration::from_secs_f64)
    }

    /// `true`/`1`/`yes`/`on` or `false`/`0`/`no`/`off`, any case.
    pub(crate) fn flag(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        let value = self.parse(name, "true or false", |v| {
            match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Some(true),
                "false" | "0" | "no" | "off" => Some(false),
                _ => None,
            }
        })?;
        Ok(value.unwrap_or(default))
    }

    pub(crate) fn path(&self, name: &str, default: PathBuf) -> PathBuf {
        self.get(name).map(PathBuf::from).unwrap_or(default)
    }

    pub(crate) fn count(&self, name: &'static str, default: u32) -> Result<u32, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.parse::<u32>().map_err(|_| ConfigError {
                name,
                value: v,
                expected: "a non-negative integer".into(),
            }),
        }
    }
}
