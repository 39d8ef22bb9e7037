//! An input file's media type: from its name, else its bytes, else what its source declared (a
//! data URI's type, a server's `Content-Type`); a declared type the bytes contradict is logged.

use tracing::debug;

use crate::media_type::{media_type_for_name, sniff_media_type};

/// A media type without parameters, lower-cased, with common aliases folded.
fn canonical_media_type(media_type: &str) -> String {
    let base = media_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match base.as_str() {
        "image/jpg" | "image/pjpeg" => "image/jpeg".into(),
        "audio/x-wav" | "audio/wave" | "audio/vnd.wave" => "audio/wav".into(),
        "audio/mp3" | "audio/x-mp3" => "audio/mpeg".into(),
        "audio/x-flac" => "audio/flac".into(),
        "video/x-matroska" => "video/webm".into(),
        "image/x-ms-bmp" => "image/bmp".into(),
        _ => base,
    }
}

/// The media type of a `data:` URI (`data:image/png;base64,…` gives `image/png`).
pub(crate) fn data_uri_media_type(text: &str) -> Option<String> {
    let rest = text.trim_start();
    let rest = rest
        .get(..5)
        .filter(|p| p.eq_ignore_ascii_case("data:"))
        .map(|_| &rest[5..])?;
    let (meta, _) = rest.split_once(',')?;
    let media = meta.split(';').next().unwrap_or("").trim();
    (!media.is_empty()).then(|| media.to_owned())
}

/// The upload's media type: from the name's extension, else the bytes, else what was declared.
pub(crate) fn media_type_of(name: &str, data: &[u8], declared: Option<&str>) -> String {
    media_type_for_name(name)
        .or_else(|| sniff_media_type(data))
        .map(str::to_owned)
        .or_else(|| declared.map(canonical_media_type))
        .unwrap_or_else(|| "application/octet-stream".into())
}

/// Logs (at debug) a declared media type that the bytes contradict; such inputs are accepted.
pub(crate) fn note_mismatch(name: &str, declared: Option<&str>, data: &[u8], what: &str) {
    if let (Some(declared), Some(sniffed)) = (declared, sniff_media_type(data)) {
        let declared = canonical_media_type(declared);
        if declared != sniffed && declared != "application/octet-stream" {
            debug!(name, declared = %declared, detected = sniffed, "{what} does not match the bytes; using the bytes");
        }
    }
}
