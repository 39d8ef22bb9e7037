//! `Idempotency-Key` on `POST /api/v2/jobs`, as the contract defines it: single-use,
//! reject-on-duplicate (no response replay). A key is claimed only by a request that reaches
//! submission (validation comes first), released when the submission definitively failed
//! without creating a job (a full queue, ComfyUI's validation), and forgotten after 24 hours.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::error::V2Error;

/// How long a key is remembered.
const KEY_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Keys remembered at most (the oldest go first beyond it).
const MAX_KEYS: usize = 100_000;

/// The claimed keys.
#[derive(Debug, Default)]
pub(crate) struct IdempotencyKeys {
    inner: Mutex<Keys>,
}

#[derive(Debug, Default)]
struct Keys {
    claimed: HashMap<String, Instant>,
    order: VecDeque<(String, Instant)>,
}

/// Reads the header: `None` when absent; 400 `invalid_request` when empty, longer than 255
/// characters or not printable ASCII.
pub(crate) fn read_key(
    header: Option<&axum::http::HeaderValue>,
) -> Result<Option<String>, V2Error> {
    let Some(value) = header else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("");
    let ok =
        !text.is_empty() && text.len() <= 255 && text.bytes().all(|b| (0x20..0x7f).contains(&b));
    if !ok {
        return Err(V2Error::bad_request(
            "Idempotency-Key must be 1 to 255 printable ASCII characters.",
        ));
    }
    Ok(Some(text.to_owned()))
}

impl IdempotencyKeys {
    /// Claims `key`; 422 `idempotency_key_reuse` when it was claimed before.
    pub(crate) fn claim(&self, key: &str) -> Result<(), V2Error> {
        let mut keys = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        while let Some((old, at)) = keys.order.front().cloned() {
            if now.duration_since(at) < KEY_LIFETIME && keys.order.len() < MAX_KEYS {
                break;
            }
            keys.order.pop_front();
            if keys.claimed.get(&old) == Some(&at) {
                keys.claimed.remove(&old);
            }
        }
        if keys.claimed.contains_key(key) {
            return Err(V2Error::new(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reuse",
                "This Idempotency-Key was already used; a key is single-use. Poll or list your jobs to find the job it created.",
            ));
        }
        keys.claimed.insert(key.to_owned(), now);
        keys.order.push_back((key.to_owned(), now));
        Ok(())
    }

    /// Releases `key` after a submission that created no job.
    pub(crate) fn release(&self, key: &str) {
        let mut keys = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        keys.claimed.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn a_key_is_single_use_until_released() {
        let keys = IdempotencyKeys::default();
        keys.claim("k1").unwrap();
        let again = keys.claim("k1").unwrap_err();
        assert_eq!(
            (again.status.as_u16(), again.code),
            (422, "idempotency_key_reuse")
        );
        keys.claim("k2").unwrap();
        keys.release("k1");
        keys.claim("k1").unwrap();
    }

    #[test]
    fn keys_are_checked() {
        assert_eq!(read_key(None).unwrap(), None);
        let ok = HeaderValue::from_static("abc-123");
        assert_eq!(read_key(Some(&ok)).unwrap().as_deref(), Some("abc-123"));
        for bad in [String::new(), "x".repeat(256)] {
            let v = HeaderValue::from_str(&bad).unwrap();
            assert_eq!(read_key(Some(&v)).unwrap_err().status.as_u16(), 400);
        }
    }
}
