//! The API key check of every protected route (both surfaces): `Authorization: Bearer <key>`
//! (any case of the scheme), or the raw key as the RunPod docs also show, compared in constant
//! time.

use axum::http::{header, HeaderMap};

use crate::secret::Secret;

/// Whether the request carries the key.
pub(super) fn authorized(headers: &HeaderMap, key: &Secret) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or("");
    let token = match given.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("bearer ") => given[7..].trim(),
        _ => given,
    };
    same_secret(token.as_bytes(), key.expose().as_bytes())
}

/// Compares without stopping at the first difference, so timing does not reveal the key.
fn same_secret(given: &[u8], key: &[u8]) -> bool {
    let mut diff = given.len() ^ key.len();
    for (i, k) in key.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(0) ^ k);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abd", b"abc"));
        assert!(!same_secret(b"ab", b"abc"));
        assert!(!same_secret(b"abcd", b"abc"));
        assert!(!same_secret(b"", b"abc"));
    }

    #[test]
    fn bearer_or_raw() {
        let key = Secret::new("k-1");
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            authorized(&h, &key)
        };
        assert!(with("Bearer k-1") && with("bearer k-1") && with("k-1"));
        assert!(!with("Bearer k-2") && !authorized(&HeaderMap::new(), &key));
    }
}
