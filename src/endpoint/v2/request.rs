//! What a v2 request carries, read in the contract's terms: a route's `{id}`, and a body
//! within the route's limit (413 `payload_too_large` past it).

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::Path;
use axum::http::StatusCode;
use serde::Deserialize;

use super::error::V2Error;

/// The `{id}` of a route.
#[derive(Debug, Deserialize)]
pub(crate) struct IdPath {
    pub(crate) id: String,
}

pub(crate) fn path_id(path: Result<Path<IdPath>, PathRejection>) -> Result<String, V2Error> {
    path.map(|Path(p)| p.id)
        .map_err(|e| V2Error::bad_request(e.body_text()))
}

/// A request body; 413 `payload_too_large` past the route's limit.
pub(crate) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, V2Error> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            V2Error::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "The request body is larger than this route takes.",
            )
        } else {
            V2Error::new(rejection.status(), "invalid_request", rejection.body_text())
        }
    })
}
