//! Video and audio as the simulator tracks them through a graph (frames, rate, samples instead of
//! data), and the files the save nodes write for them: small files with plausible container
//! headers (MP4 `ftyp`, WebM EBML, animated WebP `VP8X`/`ANIM`/`ANMF`, GIF89a, FLAC `STREAMINFO`,
//! MP3 `ID3`, Ogg Opus `OpusHead`, safetensors latents). Nothing is really encoded: clients only
//! fetch and pass the bytes on, so a recognisable header and distinct content are what matter.

use super::image::ImageInfo;

/// A simulated VIDEO value (`VideoFromComponents`: frames, rate, optional audio).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct VideoInfo {
    pub(crate) frames: ImageInfo,
    pub(crate) fps: f64,
    pub(crate) audio: Option<AudioInfo>,
}

/// A simulated AUDIO value (`{"waveform": [batch, channels, samples], "sample_rate"}`).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct AudioInfo {
    pub(crate) batch: u32,
    pub(crate) channels: u32,
    pub(crate) samples: u64,
    pub(crate) sample_rate: u32,
}

impl AudioInfo {
    /// `str()` of the dict a node receives (the waveform shown by its shape only).
    pub(crate) fn python_str(&self) -> String {
        format!(
            "{{'waveform': tensor(shape=[{}, {}, {}]), 'sample_rate': {}}}",
            self.batch, self.channels, self.samples, self.sample_rate
        )
    }
}

/// Bytes that depend on the content, so different videos or sounds give different files.
fn payload(seed: &[u8], len: usize) -> Vec<u8> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    (0..len)
        .map(|i| {
            h = h
                .wrapping_add(i as u64)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .rotate_left(17);
            (h >> 24) as u8
        })
        .collect()
}

fn frames_seed(frames: &ImageInfo, extra: &str) -> Vec<u8> {
    format!(
        "{}x{}x{} {:?} {extra}",
        frames.width, frames.height, frames.batch, frames.fill
    )
    .into_bytes()
}

fn mp4_box(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut out = ((body.len() + 8) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(body);
    out
}

/// An MP4 (`ftyp isom`, a `free` box with the metadata, an `mdat`), e.g. SaveVideo's `.mp4`.
pub(crate) fn mp4(video: &VideoInfo, metadata: &str) -> Vec<u8> {
    let mut ftyp = b"isom".to_vec();
    ftyp.extend_from_slice(&0x200u32.to_be_bytes());
    for brand in [b"isom", b"iso2", b"avc1", b"mp41"] {
        ftyp.extend_from_slice(brand);
    }
    let mut out = mp4_box(b"ftyp", &ftyp);
    out.extend(mp4_box(b"free", metadata.as_bytes()));
    let seed = frames_seed(&video.frames, &format!("{} {:?}", video.fps, video.audio));
    out.extend(mp4_box(
        b"mdat",
        &payload(&seed, 64 * video.frames.batch as usize),
    ));
    out
}

/// An EBML variable-size integer of 8 bytes.
fn ebml_size(len: usize) -> [u8; 8] {
    let mut bytes = (len as u64).to_be_bytes();
    bytes[0] = 0x01;
    bytes
}

fn ebml_element(id: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = id.to_vec();
    out.extend_from_slice(&ebml_size(body.len()));
    out.extend_from_slice(body);
    out
}

/// A WebM (EBML header with DocType `webm`, a Segment), e.g. SaveWEBM's `.webm`.
pub(crate) fn webm(frames: &ImageInfo, fps: f64, metadata: &str) -> Vec<u8> {
    let mut header = Vec::new();
    header.extend(ebml_element(&[0x42, 0x86], &[1])); // EBMLVersion
    header.extend(ebml_element(&[0x42, 0xF7], &[1])); // EBMLReadVersion
    header.extend(ebml_element(&[0x42, 0xF2], &[4])); // EBMLMaxIDLength
    header.extend(ebml_element(&[0x42, 0xF3], &[8])); // EBMLMaxSizeLength
    header.extend(ebml_element(&[0x42, 0x82], b"webm")); // DocType
    header.extend(ebml_element(&[0x42, 0x87], &[4])); // DocTypeVersion
    header.extend(ebml_element(&[0x42, 0x85], &[2])); // DocTypeReadVersion
    let mut out = ebml_element(&[0x1A, 0x45, 0xDF, 0xA3], &header);
    let mut segment = ebml_element(&[0xEC], metadata.as_bytes()); // Void, holding the metadata
    segment.extend(ebml_element(
        &[0xEC],
        &payload(
            &frames_seed(frames, &fps.to_string()),
            64 * frames.batch as usize,
        ),
    ));
    out.extend(ebml_element(&[0x18, 0x53, 0x80, 0x67], &segment));
    out
}

fn riff_chunk(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut out = kind.to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    if body.len() % 2 == 1 {
        out.push(0);
    }
    out
}

fn u24_le(v: u32) -> [u8; 3] {
    let b = v.to_le_bytes();
    [b[0], b[1], b[2]]
}

/// An animated WebP (`VP8X` with the animation flag, `ANIM`, one `ANMF` per frame), e.g.
/// SaveAnimatedWEBP's `.webp` or VideoHelperSuite's `image/webp`.
pub(crate) fn animated_webp(frames: &ImageInfo, fps: f64, loops: u16) -> Vec<u8> {
    let (w, h) = (frames.width.max(1), frames.height.max(1));
    let mut vp8x = vec![0x02, 0, 0, 0]; // animation
    vp8x.extend_from_slice(&u24_le(w - 1));
    vp8x.extend_from_slice(&u24_le(h - 1));
    let mut anim = vec![0, 0, 0, 0];
    anim.extend_from_slice(&loops.to_le_bytes());
    let mut body = b"WEBP".to_vec();
    body.extend(riff_chunk(b"VP8X", &vp8x));
    body.extend(riff_chunk(b"ANIM", &anim));
    let duration = (1000.0 / fps.max(0.01)).round().clamp(1.0, 16_777_215.0) as u32;
    for i in 0..frames.batch.max(1) {
        let mut frame = vec![0; 6];
        frame.extend_from_slice(&u24_le(w - 1));
        frame.extend_from_slice(&u24_le(h - 1));
        frame.extend_from_slice(&u24_le(duration));
        frame.push(0);
        // A VP8L chunk: signature byte, then (fake) image data.
        let mut vp8l = vec![0x2F];
        vp8l.extend(payload(&frames_seed(frames, &i.to_string()), 16));
        frame.extend(riff_chunk(b"VP8L", &vp8l));
        body.extend(riff_chunk(b"ANMF", &frame));
    }
    riff_chunk(b"RIFF", &body)
}

/// A GIF89a (screen descriptor, NETSCAPE loop extension, trailer), e.g. VideoHelperSuite's
/// `image/gif`.
pub(crate) fn gif(frames: &ImageInfo, loops: u16) -> Vec<u8> {
    let mut out = b"GIF89a".to_vec();
    out.extend_from_slice(&(frames.width.min(65_535) as u16).to_le_bytes());
    out.extend_from_slice(&(frames.height.min(65_535) as u16).to_le_bytes());
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&[0x21, 0xFF, 0x0B]);
    out.extend_from_slice(b"NETSCAPE2.0");
    out.extend_from_slice(&[0x03, 0x01]);
    out.extend_from_slice(&loops.to_le_bytes());
    out.push(0);
    // A comment extension standing in for the frames.
    let data = payload(&frames_seed(frames, "gif"), 32);
    out.extend_from_slice(&[0x21, 0xFE, data.len() as u8]);
    out.extend_from_slice(&data);
    out.push(0);
    out.push(0x3B);
    out
}

/// A FLAC stream header (`fLaC` + `STREAMINFO` with rate, channels and length), e.g. SaveAudio's
/// `.flac` for one batch item.
pub(crate) fn flac(audio: &AudioInfo, index: u32) -> Vec<u8> {
    let mut out = b"fLaC".to_vec();
    out.extend_from_slice(&[0x80, 0, 0, 34]); // last block, STREAMINFO, 34 bytes
    out.extend_from_slice(&4096u16.to_be_bytes());
    out.extend_from_slice(&4096u16.to_be_bytes());
    out.extend_from_slice(&[0; 6]); // frame sizes unknown
    let rate = u64::from(audio.sample_rate.min(0xF_FFFF));
    let channels = u64::from(audio.channels.clamp(1, 8) - 1);
    let bits = 15u64; // 16 bits per sample
    let samples = audio.samples.min(0xF_FFFF_FFFF);
    let packed = (rate << 44) | (channels << 41) | (bits << 36) | samples;
    out.extend_from_slice(&packed.to_be_bytes());
    let seed = format!("{audio:?} {index}");
    out.extend(payload(seed.as_bytes(), 16)); // MD5 of the audio
    out.extend(payload(seed.as_bytes(), 48)); // a frame's worth
    out
}

/// An MP3 (`ID3` v2.4 tag, then an MPEG-1 Layer III frame header), e.g. SaveAudioMP3.
pub(crate) fn mp3(audio: &AudioInfo, index: u32) -> Vec<u8> {
    let mut out = b"ID3\x04\x00\x00\x00\x00\x00\x00".to_vec();
    out.extend_from_slice(&[0xFF, 0xFB, 0x90, 0x64]);
    out.extend(payload(format!("{audio:?} {index} mp3").as_bytes(), 64));
    out
}

/// An Ogg Opus stream's first page (`OggS` + `OpusHead`), e.g. SaveAudioOpus.
pub(crate) fn opus(audio: &AudioInfo, index: u32) -> Vec<u8> {
    let mut head = b"OpusHead".to_vec();
    head.push(1);
    head.push(audio.channels.clamp(1, 2) as u8);
    head.extend_from_slice(&312u16.to_le_bytes());
    head.extend_from_slice(&audio.sample_rate.to_le_bytes());
    head.extend_from_slice(&0u16.to_le_bytes());
    head.push(0);
    let mut out = b"OggS".to_vec();
    out.push(0); // version
    out.push(0x02); // beginning of stream
    out.extend_from_slice(&0u64.to_le_bytes()); // granule
    out.extend_from_slice(&(index + 1).to_le_bytes()); // serial
    out.extend_from_slice(&0u32.to_le_bytes()); // sequence
    out.extend_from_slice(&0u32.to_le_bytes()); // checksum (not computed)
    out.push(1);
    out.push(head.len() as u8);
    out.extend(head);
    out.extend(payload(format!("{audio:?} {index} opus").as_bytes(), 48));
    out
}

/// SaveLatent's `.latent`: a safetensors file (little-endian header length, JSON header, data).
pub(crate) fn latent(samples: &ImageInfo, metadata: &str) -> Vec<u8> {
    let shape = [
        samples.batch.max(1),
        4,
        (samples.height / 8).max(1),
        (samples.width / 8).max(1),
    ];
    let len: u32 = shape.iter().product::<u32>().saturating_mul(4).min(1 << 20);
    let header = serde_json::json!({
        "__metadata__": {"prompt": metadata},
        "latent_tensor": {"dtype": "F32", "shape": shape, "data_offsets": [0, len]},
    })
    .to_string();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.resize(out.len() + len as usize, 0);
    out
}

#[cfg(test)]
mod unit {
    use super::*;

    fn frames() -> ImageInfo {
        ImageInfo::gradient(64, 48, 3)
    }

    #[test]
    fn headers_are_recognisable() {
        let video = VideoInfo {
            frames: frames(),
            fps: 24.0,
            audio: None,
        };
        let mp4 = mp4(&video, "{}");
        assert_eq!(&mp4[4..12], b"ftypisom");
        let webm = webm(&frames(), 24.0, "{}");
        assert_eq!(&webm[..4], &[0x1A, 0x45, 0xDF, 0xA3]);
        assert!(webm.windows(4).any(|w| w == b"webm"));
        let webp = animated_webp(&frames(), 6.0, 0);
        assert_eq!(&webp[..4], b"RIFF");
        assert_eq!(&webp[8..16], b"WEBPVP8X");
        let size = u32::from_le_bytes(webp[4..8].try_into().unwrap()) as usize;
        assert_eq!(size + 8, webp.len(), "RIFF size");
        assert_eq!(webp.windows(4).filter(|w| *w == b"ANMF").count(), 3);
        assert_eq!(&gif(&frames(), 0)[..6], b"GIF89a");
        let audio = AudioInfo {
            batch: 1,
            channels: 2,
            samples: 44_100,
            sample_rate: 44_100,
        };
        let flac = flac(&audio, 0);
        assert_eq!(&flac[..4], b"fLaC");
        // Sample rate in the first 20 bits of the packed field.
        let packed = u64::from_be_bytes(flac[18..26].try_into().unwrap());
        assert_eq!(packed >> 44, 44_100);
        assert_eq!(packed & 0xF_FFFF_FFFF, 44_100);
        assert_ne!(super::flac(&audio, 1), flac, "batch items differ");
        assert_eq!(&mp3(&audio, 0)[..3], b"ID3");
        let ogg = opus(&audio, 0);
        assert_eq!(&ogg[..4], b"OggS");
        assert_eq!(&ogg[28..36], b"OpusHead");
        let latent = latent(&ImageInfo::gradient(64, 64, 1), "{}");
        let n = u64::from_le_bytes(latent[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&latent[8..8 + n]).unwrap();
        assert_eq!(
            header["latent_tensor"]["shape"],
            serde_json::json!([1, 4, 8, 8])
        );
        assert_eq!(latent.len(), 8 + n + 4 * 4 * 8 * 8);
    }
}
