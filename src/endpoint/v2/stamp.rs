//! Wall-clock stamps as the contract writes them: RFC 3339 date-times with an offset (UTC,
//! microseconds), and the wall-clock time of a monotonic instant.

use std::time::{Duration, Instant, SystemTime};

/// `2026-12-04T12:36:43.212965Z`.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// The wall-clock time of `at`, given that `origin` happened at `origin_wall`.
pub(crate) fn wall(origin: Instant, origin_wall: SystemTime, at: Instant) -> SystemTime {
    match at.checked_duration_since(origin) {
        Some(after) => origin_wall + after,
        None => origin_wall
            .checked_sub(origin.saturating_duration_since(at))
            .unwrap_or(origin_wall),
    }
}

/// Whole milliseconds, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_rfc3339_with_an_offset() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_765_000_000_123_456);
        assert_eq!(rfc3339(t), "2025-12-06T05:46:40.123456Z");
        let now = Instant::now();
        let w = SystemTime::now();
        assert_eq!(
            wall(now, w, now + Duration::from_secs(2)),
            w + Duration::from_secs(2)
        );
    }
}
