//! Models a job brings (`input.models`): `COMFY_MODELS_DIR`, `MODEL_CACHE_DIR`,
//! `MODEL_CACHE_MAX_GB`, `MODEL_URL_MAX_BYTES`, `MODEL_URL_TIMEOUT_S`. Their URLs pass the same
//! SSRF guard as URL inputs (`ALLOW_PRIVATE_INPUT_URLS`, `INPUT_URL_ALLOW_HOSTS`).

use std::path::PathBuf;
use std::time::Duration;

use super::env::{ConfigError, EnvReader};

/// Where models go and how they are downloaded.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelPolicy {
    /// `COMFY_MODELS_DIR` (`/comfyui/models`): ComfyUI's model folder (`checkpoints/`, `loras/`, …).
    pub models_dir: PathBuf,
    /// `MODEL_CACHE_DIR` (`/comfyui/model-cache`): the content-addressed cache the files are
    /// kept in (by sha256), linked into the model folder.
    pub cache_dir: PathBuf,
    /// `MODEL_CACHE_MAX_GB` (100): the cache's size cap; the least recently used models go first.
    pub cache_max_bytes: u64,
    /// `MODEL_URL_MAX_BYTES` (50 GB): the largest model one URL may be.
    pub max_bytes: u64,
    /// `MODEL_URL_TIMEOUT_S` (3600): bound for one model's whole download.
    pub timeout: Duration,
}

impl Default for ModelPolicy {
    fn default() -> Self {
        ModelPolicy {
            models_dir: PathBuf::from("/comfyui/models"),
            cache_dir: PathBuf::from("/comfyui/model-cache"),
            cache_max_bytes: 100 * GB,
            max_bytes: 50 * GB,
            timeout: Duration::from_secs(3600),
        }
    }
}

const GB: u64 = 1_000_000_000;

impl ModelPolicy {
    /// Reads the variables through `lookup`; a bad value names its variable.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<ModelPolicy, ConfigError> {
        let env = EnvReader::new(lookup);
        let d = ModelPolicy::default();
        let cache_max_bytes = env
            .parse("MODEL_CACHE_MAX_GB", "a number of gigabytes above 0", |v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|n| n.is_finite() && *n > 0.0)
                    .map(|n| (n.min(1e9) * GB as f64) as u64)
            })?
            .unwrap_or(d.cache_max_bytes);
        let max_bytes = env
            .parse(
                "MODEL_URL_MAX_BYTES",
                "a whole number of bytes, at least 1",
                |v| v.parse::<u64>().ok().filter(|n| *n >= 1),
            )?
            .unwrap_or(d.max_bytes);
        let timeout = env.secs("MODEL_URL_TIMEOUT_S", d.timeout)?;
        Ok(ModelPolicy {
            models_dir: env
                .get("COMFY_MODELS_DIR")
                .map_or(d.models_dir, PathBuf::from),
            cache_dir: env
                .get("MODEL_CACHE_DIR")
                .map_or(d.cache_dir, PathBuf::from),
            cache_max_bytes,
            max_bytes,
            timeout: timeout.min(Duration::from_secs(86_400 * 7)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_from_the_environment() {
        let d = ModelPolicy::from_lookup(|_| None).unwrap();
        assert_eq!(d, ModelPolicy::default());
        let p = ModelPolicy::from_lookup(|k| match k {
            "MODEL_CACHE_MAX_GB" => Some("0.5".into()),
            "COMFY_MODELS_DIR" => Some("/m".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(
            (p.cache_max_bytes, p.models_dir),
            (500_000_000, PathBuf::from("/m"))
        );
        let err = ModelPolicy::from_lookup(|k| (k == "MODEL_CACHE_MAX_GB").then(|| "0".into()))
            .unwrap_err();
        assert_eq!(err.name, "MODEL_CACHE_MAX_GB");
    }
}
