//! Base64 with the base64 crate's runtime-detected SIMD engine (AVX2 / NEON, scalar fallback).

use std::sync::LazyLock;

use base64::engine::general_purpose::{PAD, PAD_INDIFFERENT};
use base64::Engine;

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
type Fast = base64::engine::Simd;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
type Fast = base64::engine::GeneralPurpose;

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn engine(config: base64::engine::GeneralPurposeConfig) -> Fast {
    base64::engine::Simd::standard(config)
}
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn engine(config: base64::engine::GeneralPurposeConfig) -> Fast {
    base64::engine::GeneralPurpose::new(&base64::alphabet::STANDARD, config)
}

/// Encodes with padding (what clients of worker-comfyui decode).
static ENCODER: LazyLock<Fast> = LazyLock::new(|| engine(PAD));
/// Decodes with or without padding.
static DECODER: LazyLock<Fast> = LazyLock::new(|| engine(PAD_INDIFFERENT));

/// Standard, padded base64.
pub fn encode(data: &[u8]) -> String {
    ENCODER.encode(data)
}

/// [`encode`] appended to `out` (no intermediate string).
pub fn encode_into(data: &[u8], out: &mut String) {
    ENCODER.encode_string(data, out);
}

/// The length of `n` bytes in padded base64.
pub fn encoded_len(n: u64) -> u64 {
    n.div_ceil(3) * 4
}

/// Base64 that does not decode (the base64 crate's reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(transparent)]
pub struct InvalidBase64(#[from] base64::DecodeError);

/// Decodes client input: strips a `data:...;base64,` prefix (anything up to the first comma,
/// like worker-comfyui) and ASCII whitespace (MIME line breaks), accepts missing padding.
pub fn decode_input(text: &str) -> Result<Vec<u8>, InvalidBase64> {
    let payload = match text.split_once(',') {
        Some((_, rest)) => rest,
        None => text,
    };
    let result = if payload.bytes().any(|b| b.is_ascii_whitespace()) {
        let compact: Vec<u8> = payload
            .bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        DECODER.decode(compact)
    } else {
        DECODER.decode(payload)
    };
    result.map_err(InvalidBase64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_lenient_input() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let text = encode(&data);
        assert_eq!(decode_input(&text).unwrap(), data);
        assert_eq!(
            decode_input(&format!("data:image/png;base64,{text}")).unwrap(),
            data
        );
        let wrapped: String = text
            .as_bytes()
            .chunks(76)
            .map(|c| format!("{}\n", std::str::from_utf8(c).unwrap()))
            .collect();
        assert_eq!(decode_input(&wrapped).unwrap(), data);
        assert_eq!(decode_input("aGk").unwrap(), b"hi");
        assert!(decode_input("not base64!").is_err());
    }
}
