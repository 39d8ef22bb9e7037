//! Media types (MIME types): from a file name's extension, for uploads
//! ([`media_type_for_name`]) and for returned files ([`content_type_for`], worker-comfyui's
//! table); from a file's first bytes ([`sniff_media_type`]); and back to an extension.

/// The media type a file name's extension stands for, if it is a known one.
pub fn media_type_for_name(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    let (_, ext) = lower.rsplit_once('.')?;
    Some(match ext {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        "tif" | "tiff" => "image/tiff",
        "avif" => "image/avif",
        "heic" => "image/heic",
        "exr" => "image/x-exr",
        "mp4" | "m4v" => "video/mp4",
        "webm" => "video/webm",
        "mkv" => "video/x-matroska",
        "mov" => "video/quicktime",
        "avi" => "video/x-msvideo",
        "wav" => "audio/wav",
        "mp3" => "audio/mpeg",
        "flac" => "audio/flac",
        "ogg" | "opus" => "audio/ogg",
        "m4a" => "audio/mp4",
        "glb" => "model/gltf-binary",
        "json" => "application/json",
        "txt" => "text/plain",
        _ => return None,
    })
}

/// The MIME type of a returned file: from its extension, else VideoHelperSuite's `format` when
/// it looks like a MIME type, else `application/octet-stream`. The extension wins over `format`
/// because VideoHelperSuite's formats are not all MIME types (`video/h264-mp4` is an `.mp4`).
pub fn content_type_for(filename: &str, format: Option<&str>) -> String {
    let ext = filename
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
        .unwrap_or_default();
    let known = match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" | "jpe" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        "tif" | "tiff" => "image/tiff",
        "svg" => "image/svg+xml",
        "avif" => "image/avif",
        "mp4" | "m4v" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        "mkv" => "video/x-matroska",
        "avi" => "video/x-msvideo",
        "flac" => "audio/flac",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "ogg" | "opus" => "audio/ogg",
        "m4a" => "audio/mp4",
        "aac" => "audio/aac",
        "glb" => "model/gltf-binary",
        "gltf" => "model/gltf+json",
        "obj" => "model/obj",
        "json" => "application/json",
        "txt" => "text/plain",
        _ => "",
    };
    if !known.is_empty() {
        return known.to_owned();
    }
    match format {
        Some(f)
            if f.split_once('/').is_some_and(|(t, s)| {
                !t.is_empty() && !s.is_empty() && !f.contains(char::is_whitespace)
            }) =>
        {
            f.to_owned()
        }
        _ => "application/octet-stream".to_owned(),
    }
}

/// The media type the bytes' signature says, for the formats ComfyUI workflows take.
pub fn sniff_media_type(data: &[u8]) -> Option<&'static str> {
    let at = |offset: usize, sig: &[u8]| data.get(offset..offset + sig.len()) == Some(sig);
    Some(if at(0, b"\x89PNG\r\n\x1a\n") {
        "image/png"
    } else if at(0, b"\xff\xd8\xff") {
        "image/jpeg"
    } else if at(0, b"GIF87a") || at(0, b"GIF89a") {
        "image/gif"
    } else if at(0, b"RIFF") && at(8, b"WEBP") {
        "image/webp"
    } else if at(0, b"RIFF") && at(8, b"WAVE") {
        "audio/wav"
    } else if at(0, b"RIFF") && at(8, b"AVI ") {
        "video/x-msvideo"
    } else if at(0, b"II*\0") || at(0, b"MM\0*") {
        "image/tiff"
    } else if at(0, b"v/1\x01") {
        "image/x-exr"
    } else if at(4, b"ftyp") {
        match data.get(8..12) {
            Some(b"qt  ") => "video/quicktime",
            Some(b"M4A ") => "audio/mp4",
            Some(b"avif") | Some(b"avis") => "image/avif",
            Some(b"heic") | Some(b"heix") | Some(b"mif1") => "image/heic",
            _ => "video/mp4",
        }
    } else if at(0, b"\x1a\x45\xdf\xa3") {
        "video/webm"
    } else if at(0, b"fLaC") {
        "audio/flac"
    } else if at(0, b"OggS") {
        "audio/ogg"
    } else if at(0, b"ID3") || (data.len() > 1 && data[0] == 0xff && data[1] & 0xe0 == 0xe0) {
        "audio/mpeg"
    } else if at(0, b"glTF") {
        "model/gltf-binary"
    } else if at(0, b"BM") && data.len() > 14 {
        "image/bmp"
    } else {
        return None;
    })
}

/// The usual extension for a sniffed media type.
pub fn extension_for(media_type: &str) -> Option<&'static str> {
    Some(match media_type {
        "image/png" => "png",
        "image/jpeg" => "jpg",
        "image/gif" => "gif",
        "image/webp" => "webp",
        "image/tiff" => "tiff",
        "image/bmp" => "bmp",
        "image/avif" => "avif",
        "image/heic" => "heic",
        "image/x-exr" => "exr",
        "video/mp4" => "mp4",
        "video/quicktime" => "mov",
        "video/webm" => "webm",
        "video/x-msvideo" => "avi",
        "audio/wav" => "wav",
        "audio/mpeg" => "mp3",
        "audio/flac" => "flac",
        "audio/ogg" => "ogg",
        "audio/mp4" => "m4a",
        "model/gltf-binary" => "glb",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_from_extension_then_format() {
        assert_eq!(content_type_for("a.PNG", None), "image/png");
        assert_eq!(
            content_type_for("v.mp4", Some("video/h264-mp4")),
            "video/mp4"
        );
        assert_eq!(content_type_for("a.gif", Some("image/gif")), "image/gif");
        assert_eq!(content_type_for("a.flac", None), "audio/flac");
        assert_eq!(
            content_type_for("x.bin", Some("video/ProRes")),
            "video/ProRes"
        );
        assert_eq!(
            content_type_for("x", Some("nonsense")),
            "application/octet-stream"
        );
        assert_eq!(
            content_type_for("x.latent", None),
            "application/octet-stream"
        );
    }
}
