//! What the ComfyUI at hand can do, detected once per client (`ComfyClient::capabilities`): its version (`/system_stats`), its
//! flags (`/features`), and whether it has the jobs API (`GET /api/jobs?limit=1` answers JSON;
//! 0.3.64 answers `404` text/plain) and its cancel route (`POST /api/jobs/{id}/cancel` for an
//! unknown id answers `{"cancelled": false}` and touches nothing). Nothing advertises the jobs
//! API, hence the probes. A detection that ComfyUI did not answer is not kept, so the next
//! prompt asks again.

use std::fmt;

use super::features::Features;

/// A `MAJOR.MINOR.PATCH` ComfyUI version, compared numerically (0.3.64 < 0.38.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ComfyVersion(pub u32, pub u32, pub u32);

impl ComfyVersion {
    /// Reads `0.38.1` (a suffix after the numbers, as in `0.38.1-rc1`, is ignored).
    pub fn parse(text: &str) -> Option<ComfyVersion> {
        let mut parts = text.trim().trim_start_matches('v').split('.');
        let mut next = || -> Option<u32> {
            let part = parts.next()?;
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        };
        let major = next()?;
        let minor = next()?;
        Some(ComfyVersion(major, minor, next().unwrap_or(0)))
    }
}

impl fmt::Display for ComfyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// What one ComfyUI supports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// `system.comfyui_version`, when it says.
    pub version: Option<ComfyVersion>,
    /// `/features` (all off when the route is missing).
    pub features: Features,
    /// `GET /api/jobs` and `GET /api/jobs/{id}` exist.
    pub jobs_api: bool,
    /// `POST /api/jobs/{id}/cancel` exists (atomic and idempotent; newer than the jobs API).
    pub jobs_cancel: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        let old = ComfyVersion::parse("0.3.64").unwrap();
        let new = ComfyVersion::parse("0.38.1").unwrap();
        assert!(old < new);
        assert_eq!(new.to_string(), "0.38.1");
        assert_eq!(ComfyVersion::parse("v1.2"), Some(ComfyVersion(1, 2, 0)));
        assert_eq!(
            ComfyVersion::parse("0.4.0-rc1"),
            Some(ComfyVersion(0, 4, 0))
        );
        assert_eq!(ComfyVersion::parse("nightly"), None);
    }
}
