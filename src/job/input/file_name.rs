//! Input file names and subfolders that cannot escape ComfyUI's input folder: the checks a
//! given name must pass ([`check_image_name`], [`check_subfolder`], with look-alike characters
//! folded first), and safe names made from a URL ([`name_from_url`]).

/// Folds characters that look like `.`, `/`, `\` or `:` (fullwidth forms, dot leaders, division
/// and fraction slashes, ...) into the ASCII character they imitate, so the name checks see what
/// a normalising file system, a Windows "best fit" code page or a person would. `‥` and `…`
/// become two and three dots.
pub(super) fn fold_lookalikes(s: &str) -> std::borrow::Cow<'_, str> {
    let lookalike = |c: char| {
        matches!(
            c,
            '\u{FF0E}' | '\u{2024}' | '\u{FE52}' | '\u{2025}' | '\u{2026}' // dots
                | '\u{FF0F}' | '\u{2215}' | '\u{2044}' | '\u{29F8}' | '\u{1735}' // slashes
                | '\u{FF3C}' | '\u{2216}' | '\u{FE68}' | '\u{29F9}' | '\u{29F5}' // backslashes
                | '\u{FF1A}' | '\u{A789}' | '\u{2236}' | '\u{FE55}' // colons
        )
    };
    if !s.chars().any(lookalike) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\u{FF0E}' | '\u{2024}' | '\u{FE52}' => out.push('.'),
            '\u{2025}' => out.push_str(".."),
            '\u{2026}' => out.push_str("..."),
            '\u{FF0F}' | '\u{2215}' | '\u{2044}' | '\u{29F8}' | '\u{1735}' => out.push('/'),
            '\u{FF3C}' | '\u{2216}' | '\u{FE68}' | '\u{29F9}' | '\u{29F5}' => out.push('\\'),
            '\u{FF1A}' | '\u{A789}' | '\u{2236}' | '\u{FE55}' => out.push(':'),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A file name refused for ComfyUI's input folder ([`check_image_name`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "Invalid image name {:?}: {why}; use a plain file name such as \"input.png\"",
    truncate_chars(.name, 80)
)]
pub struct InvalidImageName {
    /// The name as given.
    pub name: String,
    /// Why it is refused.
    pub why: NameProblem,
}

/// Why a file name is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameProblem {
    /// Empty or only whitespace.
    #[error("it is empty")]
    Empty,
    /// A `/` or `\`.
    #[error("it contains a path separator ('/' or '\\')")]
    PathSeparator,
    /// A character that folds to `/` or `\`.
    #[error("it contains a character that looks like a path separator")]
    LooksLikePathSeparator,
    /// `.`, or `..` anywhere.
    #[error("it contains '..'")]
    DotDot,
    /// Characters that fold to `..`.
    #[error("it contains characters that look like '..'")]
    LooksLikeDotDot,
    /// Only dots and spaces (Windows trims them).
    #[error("it is only dots and spaces")]
    OnlyDotsAndSpaces,
    /// A `:` (or a look-alike).
    #[error("it contains ':' (a drive or stream separator on Windows)")]
    Colon,
    /// Control characters (NUL included).
    #[error("it contains control characters")]
    ControlCharacters,
    /// More than 255 bytes.
    #[error("it is longer than 255 bytes")]
    TooLong,
}

/// A subfolder refused for ComfyUI's folders ([`check_subfolder`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "Invalid subfolder {:?}: {why}; use a relative folder such as \"uploads/job-1\"",
    truncate_chars(.subfolder, 80)
)]
pub struct InvalidSubfolder {
    /// The subfolder as given.
    pub subfolder: String,
    /// Why it is refused.
    pub why: SubfolderProblem,
}

/// Why a subfolder is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubfolderProblem {
    /// Absolute.
    #[error("it starts with '/' (it must be relative)")]
    Absolute,
    /// A `\`.
    #[error("it contains '\\' (separate folders with '/')")]
    Backslash,
    /// `..` anywhere.
    #[error("it contains '..'")]
    DotDot,
    /// Characters that fold to `/`, `\` or `..`.
    #[error("it contains characters that look like '/', '\\' or '..'")]
    LookAlikes,
    /// A `:` (or a look-alike).
    #[error("it contains ':' (a drive or stream separator on Windows)")]
    Colon,
    /// Control characters.
    #[error("it contains control characters")]
    ControlCharacters,
    /// More than 255 bytes.
    #[error("it is longer than 255 bytes")]
    TooLong,
    /// A folder name of only dots and spaces.
    #[error("a folder name is only dots and spaces")]
    OnlyDotsAndSpaces,
}

/// Checks a file name for ComfyUI's input folder; returns why it is refused.
///
/// An accepted name is one plain path segment on every platform ComfyUI runs on: not empty,
/// not `.` or `..` and without `..` anywhere, not only dots and spaces (Windows trims trailing
/// dots and spaces), no `/`, `\` or `:` (a drive or stream on Windows), no control characters
/// (NUL included), at most 255 bytes, and none of that through look-alike characters (`．．`,
/// `／`, `＼`, `‥`).
pub fn check_image_name(name: &str) -> Result<(), InvalidImageName> {
    let folded = fold_lookalikes(name);
    let lookalike = matches!(folded, std::borrow::Cow::Owned(_));
    let n: &str = &folded;
    let why = if name.trim().is_empty() {
        Some(NameProblem::Empty)
    } else if n.contains('/') || n.contains('\\') {
        Some(if lookalike {
            NameProblem::LooksLikePathSeparator
        } else {
            NameProblem::PathSeparator
        })
    } else if n == "." || n.contains("..") {
        Some(if lookalike {
            NameProblem::LooksLikeDotDot
        } else {
            NameProblem::DotDot
        })
    } else if n
        .trim_matches(|c: char| c == '.' || c.is_whitespace())
        .is_empty()
    {
        Some(NameProblem::OnlyDotsAndSpaces)
    } else if n.contains(':') {
        Some(NameProblem::Colon)
    } else if name.chars().any(char::is_control) {
        Some(NameProblem::ControlCharacters)
    } else if name.len() > 255 {
        Some(NameProblem::TooLong)
    } else {
        None
    };
    match why {
        Some(why) => Err(InvalidImageName {
            name: name.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

/// Checks a `subfolder`: relative, no `..`, no `\`, no `:`, no control characters, no look-alikes
/// of those, each folder a valid name. Returns it normalised (empty and `.` segments dropped, so
/// `a//b/` is `a/b`), or why it is refused.
pub fn check_subfolder(subfolder: &str) -> Result<String, InvalidSubfolder> {
    let s = subfolder.trim();
    let folded = fold_lookalikes(s);
    let lookalike = matches!(folded, std::borrow::Cow::Owned(_));
    let f: &str = &folded;
    let why = if s.starts_with('/') {
        Some(SubfolderProblem::Absolute)
    } else if s.contains('\\') {
        Some(SubfolderProblem::Backslash)
    } else if s.contains("..") {
        Some(SubfolderProblem::DotDot)
    } else if lookalike && (f.contains('/') || f.contains('\\') || f.contains("..")) {
        Some(SubfolderProblem::LookAlikes)
    } else if f.contains(':') {
        Some(SubfolderProblem::Colon)
    } else if s.chars().any(char::is_control) {
        Some(SubfolderProblem::ControlCharacters)
    } else if s.len() > 255 {
        Some(SubfolderProblem::TooLong)
    } else if s.split('/').any(|seg| {
        seg != "."
            && !seg.is_empty()
            && seg
                .trim_matches(|c: char| c == '.' || c.is_whitespace())
                .is_empty()
    }) {
        Some(SubfolderProblem::OnlyDotsAndSpaces)
    } else {
        None
    };
    match why {
        Some(why) => Err(InvalidSubfolder {
            subfolder: subfolder.to_owned(),
            why,
        }),
        // Trimmed again: `a /` must give what `a` gives (and what `a` normalises to), so
        // normalising twice changes nothing.
        None => Ok(s
            .split('/')
            .filter(|seg| !seg.is_empty() && *seg != ".")
            .collect::<Vec<_>>()
            .join("/")
            .trim()
            .to_owned()),
    }
}

/// A safe ASCII file name from an untrusted one (a URL's last path segment, percent-decoded):
/// only letters, digits, `.`, `-` and `_`; anything else becomes `_`; no `..`, no leading dot;
/// at most 100 bytes (the extension kept); `input` when nothing is left.
pub fn sanitize_file_name(raw: &str) -> String {
    let mut out = String::new();
    for c in raw.chars() {
        match c {
            c if c.is_ascii_alphanumeric() || c == '-' => out.push(c),
            '.' => {
                while out.ends_with('_') {
                    out.pop();
                }
                if !out.ends_with('.') {
                    out.push('.');
                }
            }
            _ => {
                if !out.ends_with('_') {
                    out.push('_');
                }
            }
        }
    }
    let trimmed = out
        .trim_start_matches(['.', '_', '-'])
        .trim_end_matches(['.', '_']);
    let mut name = trimmed.to_owned();
    const MAX: usize = 100;
    if name.len() > MAX {
        // ASCII only, so byte positions are character positions.
        let ext = match name.rfind('.') {
            Some(i) if name.len() - i <= 10 => name[i..].to_owned(),
            _ => String::new(),
        };
        let stem: String = name[..MAX - ext.len()]
            .trim_end_matches(['.', '_'])
            .to_owned();
        name = stem + &ext;
    }
    if name.is_empty() || name.starts_with('.') {
        format!("input{name}")
    } else {
        name
    }
}

/// Percent-decodes a URL path segment (invalid UTF-8 is replaced).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The name for a URL input without one: its path's last segment, made safe.
pub fn name_from_url(url: &str) -> String {
    let last = url::Url::parse(url.trim())
        .ok()
        .and_then(|u| {
            u.path_segments()
                .and_then(|mut segs| segs.next_back().map(str::to_owned))
        })
        .unwrap_or_default();
    sanitize_file_name(&percent_decode(&last))
}

pub(crate) fn truncate_chars(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::input::parse_input;
    use crate::job::input::tests::WF;
    use serde_json::{json, Value};

    #[test]
    fn names_from_urls_are_made_safe() {
        for (raw, safe) in [
            ("photo.png", "photo.png"),
            ("My Photo (1).PNG", "My_Photo_1.PNG"),
            ("../../etc/passwd", "etc_passwd"),
            ("..", "input"),
            ("", "input"),
            (".hidden.png", "hidden.png"),
            ("a..b.png", "a.b.png"),
            ("a._.b", "a.b"),
            ("ünïcödé.jpg", "n_c_d.jpg"),
            ("x\u{0}y\n.png", "x_y.png"),
            ("-rf.png", "rf.png"),
            ("a\\b.png", "a_b.png"),
            ("___", "input"),
            (".png", "png"),
        ] {
            let name = sanitize_file_name(raw);
            assert_eq!(name, safe, "{raw:?}");
            assert!(check_image_name(&name).is_ok(), "{raw:?} -> {name:?}");
        }
        let long = format!("{}.webp", "a".repeat(300));
        let name = sanitize_file_name(&long);
        assert_eq!(name.len(), 100);
        assert!(name.ends_with("a.webp"), "{name}");
        let long_ext = format!("b.{}", "c".repeat(300));
        assert_eq!(sanitize_file_name(&long_ext).len(), 100);
        for (url, name) in [
            ("https://example.com/img/cat.png?sig=abc#x", "cat.png"),
            ("https://example.com/img/My%20Cat%2B1.png", "My_Cat_1.png"),
            ("https://example.com/a/%2e%2e%2fsecret", "secret"),
            ("https://example.com/", "input"),
            ("https://example.com", "input"),
            ("https://example.com/512", "512"),
            ("s3://bucket/dir/clip.mp4", "clip.mp4"),
            ("https://example.com/%ff%fe.png", "png"),
        ] {
            assert_eq!(name_from_url(url), name, "{url}");
        }
    }

    #[test]
    fn subfolders_are_relative_and_stay_inside() {
        for (raw, normal) in [
            ("", ""),
            ("uploads", "uploads"),
            ("uploads/job-1/", "uploads/job-1"),
            ("a//b/./c", "a/b/c"),
            (" x ", "x"),
        ] {
            assert_eq!(check_subfolder(raw).as_deref(), Ok(normal), "{raw:?}");
        }
        for (raw, why) in [
            ("/etc", "it starts with '/'"),
            ("..", "it contains '..'"),
            ("a/../../b", "it contains '..'"),
            ("a\\b", "it contains '\\'"),
            ("a\u{7}b", "control characters"),
        ] {
            let err = check_subfolder(raw).unwrap_err();
            assert_eq!(err.subfolder, raw);
            let err = err.to_string();
            assert!(err.starts_with("Invalid subfolder"), "{err}");
            assert!(err.contains(why), "{raw:?}: {err}");
        }
        assert!(check_subfolder(&"a/".repeat(200)).is_err());
    }

    /// Found by the `job_input_json` fuzz target (fuzz/regressions/job_input_json/): a folder
    /// with trailing spaces before a `/` normalised to a form that normalised differently again.
    #[test]
    fn fuzz_regression_subfolder_normalisation_is_idempotent() {
        for raw in ["KSampler% /", "a /", "a / ", "x/y  /", " a/b /"] {
            let once = check_subfolder(raw).unwrap();
            assert_eq!(
                check_subfolder(&once).as_deref(),
                Ok(once.as_str()),
                "{raw:?}"
            );
        }
        assert_eq!(check_subfolder("KSampler% /").as_deref(), Ok("KSampler%"));
        let wf: Value = serde_json::from_str(WF).unwrap();
        let input = json!({"workflow": wf,
            "images": [{"name": "x.png", "image": "aGk=", "subfolder": "KSampler% /"}]});
        let files = parse_input(Some(&input)).unwrap().files;
        assert_eq!(files[0].subfolder, "KSampler%");
    }
}
