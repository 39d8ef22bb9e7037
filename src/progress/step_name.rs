//! Human names for what a node does ("Sampling", "Decoding", ...), from its class type.

/// A human name for what a node class does.
pub fn step_name(class_type: &str) -> String {
    let c = class_type;
    let lower = c.to_ascii_lowercase();
    let named = match c {
        "CLIPTextEncode" | "CLIPTextEncodeSDXL" | "CLIPTextEncodeFlux" | "CLIPTextEncodeSD3" => {
            Some("Encoding prompt")
        }
        "VAEDecode" | "VAEDecodeTiled" | "VAEDecodeHunyuan3D" => Some("Decoding"),
        "VAEEncode" | "VAEEncodeTiled" | "VAEEncodeForInpaint" => Some("Encoding image"),
        "EmptyLatentImage" | "EmptySD3LatentImage" | "EmptyHunyuanLatentVideo" => {
            Some("Preparing latent")
        }
        "SaveImage" | "SaveAnimatedWEBP" | "SaveAnimatedPNG" | "SaveImageWebsocket" => {
            Some("Saving image")
        }
        "PreviewImage" => Some("Preview"),
        "LoadImage" | "LoadImageMask" => Some("Loading image"),
        "SaveVideo" | "SaveWEBM" | "VHS_VideoCombine" => Some("Saving video"),
        "SaveAudio" | "SaveAudioMP3" | "SaveAudioOpus" => Some("Saving audio"),
        _ => None,
    };
    if let Some(n) = named {
        return n.to_owned();
    }
    if lower.contains("sampler") || lower.starts_with("ksampler") || c == "SlowSteps" {
        "Sampling".to_owned()
    } else if lower.contains("loader") || lower.starts_with("load") && lower.contains("model") {
        "Loading model".to_owned()
    } else if lower.contains("upscale") && !lower.contains("loader") {
        "Upscaling".to_owned()
    } else {
        c.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names() {
        assert_eq!(step_name("KSampler"), "Sampling");
        assert_eq!(step_name("SamplerCustomAdvanced"), "Sampling");
        assert_eq!(step_name("CheckpointLoaderSimple"), "Loading model");
        assert_eq!(step_name("VAEDecode"), "Decoding");
        assert_eq!(step_name("MyCustomNode"), "MyCustomNode");
    }
}
