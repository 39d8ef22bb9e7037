//! URL inputs' settings: `INPUT_URL_MAX_BYTES`, `INPUT_URL_TIMEOUT_S`,
//! `ALLOW_PRIVATE_INPUT_URLS`, `INPUT_URL_ALLOW_HOSTS`.

use std::time::Duration;

use super::env::{ConfigError, EnvReader};

/// How URL inputs are downloaded.
#[derive(Debug, Clone, PartialEq)]
pub struct InputPolicy {
    /// `INPUT_URL_MAX_BYTES` (100 MB): the largest file one URL input may be.
    pub max_bytes: u64,
    /// `INPUT_URL_TIMEOUT_S` (60): bound for one whole download, redirects included.
    pub timeout: Duration,
    /// `ALLOW_PRIVATE_INPUT_URLS=true`: allow loopback, private, link-local and other non-public
    /// addresses (turns the SSRF guard's address checks off).
    pub allow_private: bool,
    /// `INPUT_URL_ALLOW_HOSTS`: host names or IP addresses exempt from the address checks
    /// (comma-separated), for a known internal server.
    pub allowed_hosts: Vec<String>,
}

impl Default for InputPolicy {
    fn default() -> Self {
        InputPolicy {
            max_bytes: 100 * 1024 * 1024,
            timeout: Duration::from_secs(60),
            allow_private: false,
            allowed_hosts: Vec::new(),
        }
    }
}

impl InputPolicy {
    /// Reads `INPUT_URL_MAX_BYTES`, `INPUT_URL_TIMEOUT_S`, `ALLOW_PRIVATE_INPUT_URLS` and
    /// `INPUT_URL_ALLOW_HOSTS` through `lookup`; a bad value names its variable.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<InputPolicy, ConfigError> {
        let env = EnvReader::new(lookup);
        let d = InputPolicy::default();
        let max_bytes = env
            .parse(
                "INPUT_URL_MAX_BYTES",
                "a whole number of bytes, at least 1",
                |v| v.parse::<u64>().ok().filter(|n| *n >= 1),
            )?
            .unwrap_or(d.max_bytes);
        let timeout = env
            .parse("INPUT_URL_TIMEOUT_S", "a number of seconds above 0", |v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|n| n.is_finite() && *n > 0.0)
                    // Clamped so that a huge value cannot panic the conversion.
                    .map(|n| Duration::from_secs_f64(n.min(86_400.0 * 365.0)))
            })?
            .unwrap_or(d.timeout);
        let allow_private = env.flag("ALLOW_PRIVATE_INPUT_URLS", d.allow_private)?;
        let allowed_hosts = env
            .get("INPUT_URL_ALLOW_HOSTS")
            .map(|v| {
                v.split(',')
                    .map(|h| h.trim().to_owned())
                    .filter(|h| !h.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        Ok(InputPolicy {
            max_bytes,
            timeout,
            allow_private,
            allowed_hosts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_from_the_environment() {
        use std::collections::HashMap;
        let from = |pairs: &[(&str, &str)]| {
            let map: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            InputPolicy::from_lookup(|k| map.get(k).cloned())
        };
        let d = from(&[]).unwrap();
        assert_eq!(d.max_bytes, 104_857_600);
        assert_eq!(d.timeout, Duration::from_secs(60));
        assert!(!d.allow_private);
        assert!(d.allowed_hosts.is_empty());
        let p = from(&[
            ("INPUT_URL_MAX_BYTES", "1000"),
            ("INPUT_URL_TIMEOUT_S", "0.5"),
            ("ALLOW_PRIVATE_INPUT_URLS", "yes"),
            ("INPUT_URL_ALLOW_HOSTS", " minio.internal , 10.0.0.5,"),
        ])
        .unwrap();
        assert_eq!(p.max_bytes, 1000);
        assert_eq!(p.timeout, Duration::from_millis(500));
        assert!(p.allow_private);
        assert_eq!(p.allowed_hosts, ["minio.internal", "10.0.0.5"]);
        for (name, bad) in [
            ("INPUT_URL_MAX_BYTES", "0"),
            ("INPUT_URL_MAX_BYTES", "1MB"),
            ("INPUT_URL_TIMEOUT_S", "0"),
            ("INPUT_URL_TIMEOUT_S", "-1"),
            ("ALLOW_PRIVATE_INPUT_URLS", "maybe"),
        ] {
            let err = from(&[(name, bad)]).unwrap_err();
            assert_eq!(err.name, name);
        }
        assert!(from(&[("INPUT_URL_TIMEOUT_S", "1e300")]).is_ok());
    }
}
