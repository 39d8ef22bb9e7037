//! `SHUTDOWN_GRACE_S`: after SIGTERM, how long a running job may take to finish before it is
//! interrupted and failed; shared by every front end that has a shutdown (the RunPod loop and
//! the local endpoint).

use std::time::Duration;

use super::env::{ConfigError, EnvReader};

/// The default of `SHUTDOWN_GRACE_S`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Reads `SHUTDOWN_GRACE_S` (seconds, fractions allowed; default 20 s), shared by the job loop
/// and the local endpoint.
pub fn shutdown_grace_from(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Duration, ConfigError> {
    let grace = EnvReader::new(lookup).parse(
        "SHUTDOWN_GRACE_S",
        "a number of seconds from 0 to 86400",
        |v| {
            v.parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && (0.0..=86_400.0).contains(s))
                .map(Duration::from_secs_f64)
        },
    )?;
    Ok(grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_grace() {
        let grace = |v: Option<&str>| shutdown_grace_from(|_| v.map(str::to_owned));
        assert_eq!(grace(None), Ok(DEFAULT_SHUTDOWN_GRACE));
        assert_eq!(grace(Some(" ")), Ok(DEFAULT_SHUTDOWN_GRACE));
        assert_eq!(grace(Some("0.2")), Ok(Duration::from_millis(200)));
        assert_eq!(grace(Some("0")), Ok(Duration::ZERO));
        for bad in ["-1", "soon", "inf", "1e9"] {
            assert_eq!(grace(Some(bad)).unwrap_err().name, "SHUTDOWN_GRACE_S");
        }
    }
}
