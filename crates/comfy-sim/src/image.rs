//! Images as the simulator tracks them through a graph (size, batch and a fill pattern instead of pixels),
//! and the bytes made from them: real PNG files (png crate, with ComfyUI's `prompt`/`workflow` text chunks),
//! tiny baseline JPEG previews, header sniffing for uploaded files, and PyTorch's `str(tensor)` text that
//! ComfyUI puts into `execution_error.current_inputs`.

use std::fmt::Write as _;

/// What a simulated IMAGE / LATENT / MASK value looks like.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ImageInfo {
    pub(crate) width: u32,
    pub(crate) height: u32,
    pub(crate) batch: u32,
    pub(crate) fill: Fill,
    /// LATENT values print as `{'samples': tensor(...)}` with 4 channels at an eighth of the pixel size.
    pub(crate) latent: bool,
}

/// How the pixels of a simulated image are coloured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Fill {
    Solid([u8; 3]),
    /// A red/green ramp over x/y, used for anything "generated".
    Gradient {
        inverted: bool,
    },
    /// Pseudo-random pixels: incompressible, so PNGs have realistic sizes (benchmarks).
    Noise,
}

impl ImageInfo {
    pub(crate) fn solid(width: u32, height: u32, batch: u32, rgb: [u8; 3]) -> ImageInfo {
        ImageInfo {
            width,
            height,
            batch,
            fill: Fill::Solid(rgb),
            latent: false,
        }
    }

    pub(crate) fn gradient(width: u32, height: u32, batch: u32) -> ImageInfo {
        ImageInfo {
            width,
            height,
            batch,
            fill: Fill::Gradient { inverted: false },
            latent: false,
        }
    }

    pub(crate) fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        match self.fill {
            Fill::Solid(rgb) => rgb,
            Fill::Gradient { inverted } => {
                let ramp =
                    |v: u32, n: u32| (u64::from(v) * 255 / u64::from(n.max(2) - 1)).min(255) as u8;
                let rgb = [ramp(x, self.width), ramp(y, self.height), 128];
                if inverted {
                    rgb.map(|c| 255 - c)
                } else {
                    rgb
                }
            }
            Fill::Noise => {
                // splitmix64 of the position: fixed per pixel, no visible pattern.
                let mut h =
                    ((u64::from(x) << 32) | u64::from(y)).wrapping_add(0x9E37_79B9_7F4A_7C15);
                h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                h ^= h >> 31;
                let b = h.to_le_bytes();
                [b[0], b[1], b[2]]
            }
        }
    }

    /// The colour a downscaled preview of this image shows.
    pub(crate) fn average(&self) -> [u8; 3] {
        match self.fill {
            Fill::Solid(rgb) => rgb,
            Fill::Gradient { inverted: false } => [128, 128, 128],
            Fill::Gradient { inverted: true } => [127, 127, 127],
            Fill::Noise => [128, 128, 128],
        }
    }

    pub(crate) fn inverted(&self) -> ImageInfo {
        let fill = match self.fill {
            Fill::Solid(rgb) => Fill::Solid(rgb.map(|c| 255 - c)),
            Fill::Gradient { inverted } => Fill::Gradient {
                inverted: !inverted,
            },
            Fill::Noise => Fill::Noise,
        };
        ImageInfo {
            fill,
            ..self.clone()
        }
    }

    pub(crate) fn resized(&self, width: u32, height: u32) -> ImageInfo {
        ImageInfo {
            width: width.max(1),
            height: height.max(1),
            ..self.clone()
        }
    }

    /// `str(x)` of the value a node receives: a tensor for images, a dict holding one for latents.
    pub(crate) fn python_str(&self) -> String {
        if self.latent {
            let shape = [
                self.batch as usize,
                4,
                (self.height / 8).max(1) as usize,
                (self.width / 8).max(1) as usize,
            ];
            format!("{{'samples': {}}}", tensor_repr(&shape, |_| 0.0))
        } else {
            let shape = [
                self.batch as usize,
                self.height as usize,
                self.width as usize,
                3,
            ];
            tensor_repr(&shape, |idx| {
                let rgb = self.pixel(idx[2] as u32, idx[1] as u32);
                f32::from(rgb[idx[3]]) / 255.0
            })
        }
    }
}

/// Encode one frame of `info` as an 8-bit RGB PNG with `tEXt` chunks (keyword, text).
pub(crate) fn encode_png(
    info: &ImageInfo,
    texts: &[(String, String)],
) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, info.width, info.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    for (keyword, text) in texts {
        // A keyword PNG cannot hold (empty, too long, non Latin-1) is skipped rather than failing the save.
        let _ = encoder.add_text_chunk(keyword.clone(), text.clone());
    }
    let mut writer = encoder.write_header()?;
    {
        let mut stream = writer.stream_writer()?;
        let mut row = Vec::with_capacity(info.width as usize * 3);
        for y in 0..info.height {
            row.clear();
            for x in 0..info.width {
                row.extend_from_slice(&info.pixel(x, y));
            }
            std::io::Write::write_all(&mut stream, &row)?;
        }
        stream.finish()?;
    }
    writer.finish()?;
    Ok(out)
}

/// Size a preview of `width`×`height` gets when fitted into `max`×`max` (`PIL.ImageOps.contain`).
pub(crate) fn contain(width: u32, height: u32, max: u32) -> (u32, u32) {
    let (w, h) = (f64::from(width.max(1)), f64::from(height.max(1)));
    if width == height {
        (max, max)
    } else if width > height {
        (
            max,
            ((h / w * f64::from(max)).round_ties_even() as u32).max(1),
        )
    } else {
        (
            ((w / h * f64::from(max)).round_ties_even() as u32).max(1),
            max,
        )
    }
}

/// A baseline JPEG of a single colour. Every 8×8 block of a flat image has only a DC coefficient, so the
/// encoder needs no DCT: each block is a DC difference and an end-of-block code.
pub(crate) fn encode_jpeg_solid(width: u16, height: u16, rgb: [u8; 3]) -> Vec<u8> {
    let (r, g, b) = (f64::from(rgb[0]), f64::from(rgb[1]), f64::from(rgb[2]));
    let ycc = [
        0.299 * r + 0.587 * g + 0.114 * b,
        128.0 - 0.168_736 * r - 0.331_264 * g + 0.5 * b,
        128.0 + 0.5 * r - 0.418_688 * g - 0.081_312 * b,
    ];
    // Quantiser 1 everywhere: a flat block's DC coefficient is 8 × (sample − 128).
    let dc = ycc.map(|v| (8.0 * (v - 128.0)).round() as i32);

    let mut out = vec![0xFF, 0xD8];
    out.extend_from_slice(&[
        0xFF, 0xE0, 0x00, 0x10, b'J', b'F', b'I', b'F', 0x00, 0x01, 0x01, 0x00, 0x00, 0x01, 0x00,
        0x01, 0x00, 0x00,
    ]);
    out.extend_from_slice(&[0xFF, 0xDB, 0x00, 0x43, 0x00]);
    out.extend_from_slice(&[1u8; 64]);
    let [hh, hl] = height.max(1).to_be_bytes();
    let [wh, wl] = width.max(1).to_be_bytes();
    out.extend_from_slice(&[
        0xFF, 0xC0, 0x00, 0x11, 0x08, hh, hl, wh, wl, 0x03, 0x01, 0x11, 0x00, 0x02, 0x11, 0x00,
        0x03, 0x11, 0x00,
    ]);
    // DC table 0: the standard luminance DC table. AC table 0: a single symbol, end-of-block, code `0`.
    out.extend_from_slice(&[0xFF, 0xC4, 0x00, 0x31, 0x00]);
    out.extend_from_slice(&DC_BITS);
    out.extend_from_slice(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
    out.push(0x10);
    out.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x00]);
    out.extend_from_slice(&[
        0xFF, 0xDA, 0x00, 0x0C, 0x03, 0x01, 0x00, 0x02, 0x00, 0x03, 0x00, 0x00, 0x3F, 0x00,
    ]);

    let blocks = u32::from(width.max(1)).div_ceil(8) * u32::from(height.max(1)).div_ceil(8);
    let mut bits = BitWriter::default();
    for block in 0..blocks {
        for value in dc {
            let diff = if block == 0 { value } else { 0 };
            let category = 32 - diff.unsigned_abs().leading_zeros();
            let (code, len) = DC_CODES[category as usize];
            bits.put(code, len);
            if category > 0 {
                let magnitude = if diff < 0 { diff - 1 } else { diff };
                bits.put(magnitude as u32 & ((1 << category) - 1), category);
            }
            bits.put(0, 1); // end of block
        }
    }
    out.extend_from_slice(&bits.finish());
    out.extend_from_slice(&[0xFF, 0xD9]);
    out
}

/// Code lengths 1..=16 of the standard DC luminance Huffman table (JPEG Annex K.3).
const DC_BITS: [u8; 16] = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
/// Canonical `(code, length)` of categories 0..=11 for `DC_BITS`.
const DC_CODES: [(u32, u32); 12] = [
    (0b00, 2),
    (0b010, 3),
    (0b011, 3),
    (0b100, 3),
    (0b101, 3),
    (0b110, 3),
    (0b1110, 4),
    (0b11110, 5),
    (0b111110, 6),
    (0b1111110, 7),
    (0b11111110, 8),
    (0b111111110, 9),
];

/// MSB-first bit packer with JPEG byte stuffing.
#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    acc: u32,
    n: u32,
}

impl BitWriter {
    fn put(&mut self, code: u32, len: u32) {
        for i in (0..len).rev() {
            self.acc = (self.acc << 1) | ((code >> i) & 1);
            self.n += 1;
            if self.n == 8 {
                self.emit();
            }
        }
    }

    fn emit(&mut self) {
        let byte = self.acc as u8;
        self.out.push(byte);
        if byte == 0xFF {
            self.out.push(0x00);
        }
        self.acc = 0;
        self.n = 0;
    }

    fn finish(mut self) -> Vec<u8> {
        while self.n != 0 {
            self.put(1, 1);
        }
        self.out
    }
}

/// Width and height from a PNG, JPEG or GIF header.
pub(crate) fn image_size(data: &[u8]) -> Option<(u32, u32)> {
    if data.starts_with(b"\x89PNG\r\n\x1a\n") && data.get(12..16) == Some(b"IHDR") {
        let w = u32::from_be_bytes(data.get(16..20)?.try_into().ok()?);
        let h = u32::from_be_bytes(data.get(20..24)?.try_into().ok()?);
        return Some((w, h));
    }
    if data.starts_with(b"GIF8") {
        let w = u16::from_le_bytes(data.get(6..8)?.try_into().ok()?);
        let h = u16::from_le_bytes(data.get(8..10)?.try_into().ok()?);
        return Some((u32::from(w), u32::from(h)));
    }
    if data.starts_with(&[0xFF, 0xD8]) {
        let mut i = 2;
        while i + 4 <= data.len() {
            if data[i] != 0xFF {
                return None;
            }
            let marker = data[i + 1];
            if marker == 0xFF {
                i += 1;
                continue;
            }
            if marker == 0xD8 || (0xD0..=0xD7).contains(&marker) || marker == 0x01 {
                i += 2;
                continue;
            }
            let len = usize::from(u16::from_be_bytes([data[i + 2], data[i + 3]]));
            let is_sof = (0xC0..=0xCF).contains(&marker) && ![0xC4, 0xC8, 0xCC].contains(&marker);
            if is_sof {
                let h = u16::from_be_bytes(data.get(i + 5..i + 7)?.try_into().ok()?);
                let w = u16::from_be_bytes(data.get(i + 7..i + 9)?.try_into().ok()?);
                return Some((u32::from(w), u32::from(h)));
            }
            i += 2 + len;
        }
    }
    None
}

/// `str(tensor)` as PyTorch prints a float32 tensor of `shape` (default print options: summarise above
/// 1000 elements with 3 edge items, 4 decimals, line width 80).
pub(crate) fn tensor_repr(shape: &[usize], value: impl Fn(&[usize]) -> f32) -> String {
    let numel: usize = shape.iter().product();
    let summarize = numel > 1000;
    let shown: Vec<Vec<usize>> = shape
        .iter()
        .map(|&n| {
            if summarize && n > 6 {
                vec![0, 1, 2, n - 3, n - 2, n - 1]
            } else {
                (0..n).collect()
            }
        })
        .collect();

    // Gather the values that will be printed to pick the number format, like torch's `_Formatter`.
    let mut values = Vec::new();
    let mut idx = vec![0usize; shape.len()];
    collect_values(&shown, 0, &mut idx, &value, &mut values);
    let formatter = NumberFormat::new(&values);

    let mut idx = vec![0usize; shape.len()];
    let body = if shape.is_empty() {
        formatter.format(value(&[]))
    } else {
        tensor_body(shape, &shown, 0, 7, summarize, &mut idx, &value, &formatter)
    };
    format!("tensor({body})")
}

fn collect_values(
    shown: &[Vec<usize>],
    dim: usize,
    idx: &mut Vec<usize>,
    value: &impl Fn(&[usize]) -> f32,
    out: &mut Vec<f32>,
) {
    if dim == shown.len() {
        out.push(value(idx));
        return;
    }
    for &i in &shown[dim] {
        idx[dim] = i;
        collect_values(shown, dim + 1, idx, value, out);
    }
}

#[allow(clippy::too_many_arguments)]
fn tensor_body(
    shape: &[usize],
    shown: &[Vec<usize>],
    dim: usize,
    indent: usize,
    summarize: bool,
    idx: &mut Vec<usize>,
    value: &impl Fn(&[usize]) -> f32,
    fmt: &NumberFormat,
) -> String {
    let n = shape[dim];
    let elided = summarize && n > 6;
    let remaining = shape.len() - dim;
    if remaining == 1 {
        let element_length = fmt.width + 2;
        let per_line = ((80usize.saturating_sub(indent)) / element_length).max(1);
        let mut data = Vec::new();
        for (k, &i) in shown[dim].iter().enumerate() {
            if elided && k == 3 {
                data.push(" ...".to_owned());
            }
            idx[dim] = i;
            data.push(fmt.format(value(idx)));
        }
        let lines: Vec<String> = data.chunks(per_line).map(|c| c.join(", ")).collect();
        return format!(
            "[{}]",
            lines.join(&format!(",\n{}", " ".repeat(indent + 1)))
        );
    }
    let mut slices = Vec::new();
    for (k, &i) in shown[dim].iter().enumerate() {
        if elided && k == 3 {
            slices.push("...".to_owned());
        }
        idx[dim] = i;
        slices.push(tensor_body(
            shape,
            shown,
            dim + 1,
            indent + 1,
            summarize,
            idx,
            value,
            fmt,
        ));
    }
    let sep = format!(",{}{}", "\n".repeat(remaining - 1), " ".repeat(indent + 1));
    format!("[{}]", slices.join(&sep))
}

/// torch's choice between `0.`-style integers, fixed 4 decimals and scientific notation.
struct NumberFormat {
    mode: NumberMode,
    width: usize,
}

#[derive(Clone, Copy)]
enum NumberMode {
    Int,
    Fixed,
    Sci,
}

impl NumberFormat {
    fn new(values: &[f32]) -> NumberFormat {
        let nonzero: Vec<f64> = values
            .iter()
            .map(|&v| f64::from(v))
            .filter(|v| v.is_finite() && *v != 0.0)
            .collect();
        let mode = if nonzero.is_empty() {
            NumberMode::Int
        } else {
            let min = nonzero
                .iter()
                .map(|v| v.abs())
                .fold(f64::INFINITY, f64::min);
            let max = nonzero.iter().map(|v| v.abs()).fold(0.0, f64::max);
            let int_mode = nonzero.iter().all(|v| v.ceil() == *v);
            if int_mode {
                if max / min > 1000.0 || max > 1.0e8 {
                    NumberMode::Sci
                } else {
                    NumberMode::Int
                }
            } else if max / min > 1000.0 || max > 1.0e8 || min < 1.0e-4 {
                NumberMode::Sci
            } else {
                NumberMode::Fixed
            }
        };
        let mut fmt = NumberFormat { mode, width: 0 };
        fmt.width = values.iter().map(|&v| fmt.raw(v).len()).max().unwrap_or(1);
        fmt
    }

    fn raw(&self, v: f32) -> String {
        let v = f64::from(v);
        match self.mode {
            NumberMode::Int => format!("{v:.0}."),
            NumberMode::Fixed => format!("{v:.4}"),
            NumberMode::Sci => {
                let s = format!("{v:.4e}");
                match s.split_once('e') {
                    Some((m, e)) => {
                        let (sign, digits) = e.strip_prefix('-').map_or(('+', e), |d| ('-', d));
                        format!("{m}e{sign}{digits:0>2}")
                    }
                    None => s,
                }
            }
        }
    }

    fn format(&self, v: f32) -> String {
        let raw = self.raw(v);
        let mut out = String::new();
        let _ = write!(out, "{raw:>width$}", width = self.width);
        out
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn png_decodes_to_the_tracked_size() {
        let info = ImageInfo::gradient(37, 21, 1);
        let bytes = encode_png(&info, &[("prompt".into(), "{}".into())]).expect("encode");
        assert_eq!(image_size(&bytes), Some((37, 21)));
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let reader = decoder.read_info().expect("decode");
        assert_eq!((reader.info().width, reader.info().height), (37, 21));
    }

    #[test]
    fn jpeg_header_is_well_formed() {
        let jpeg = encode_jpeg_solid(64, 48, [255, 0, 0]);
        assert!(jpeg.starts_with(&[0xFF, 0xD8, 0xFF, 0xE0]));
        assert!(jpeg.ends_with(&[0xFF, 0xD9]));
        assert_eq!(image_size(&jpeg), Some((64, 48)));
    }

    #[test]
    fn tensor_text_matches_torch() {
        // Blue 128×128 image, as recorded in runtime_error.json's current_inputs.
        let info = ImageInfo::solid(128, 128, 1, [0, 0, 255]);
        let row = "[0., 0., 1.]";
        let rows = format!(
            "[{row},\n          {row},\n          {row},\n          ...,\n          {row},\n          {row},\n          {row}]"
        );
        let sep = ",\n\n         ";
        let expected = format!(
            "tensor([[{rows}{sep}{rows}{sep}{rows}{sep}...{sep}{rows}{sep}{rows}{sep}{rows}]])"
        );
        assert_eq!(info.python_str(), expected);
        let orange = ImageInfo::solid(2, 1, 1, [255, 128, 0]).python_str();
        assert_eq!(
            orange,
            "tensor([[[[1.0000, 0.5020, 0.0000],\n          [1.0000, 0.5020, 0.0000]]]])"
        );
    }
}
