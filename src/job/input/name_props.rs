//! Property tests of the upload-name checks: names and subfolders drawn from a seeded, hand-rolled
//! generator that glues together hostile pieces (`..`, encoded and look-alike dots and slashes,
//! absolute and Windows paths, NUL and other controls, very long runs). Whatever is accepted must
//! be a plain relative path inside ComfyUI's folder, on Linux and on Windows.

use std::path::{Component, Path};

use serde_json::json;

use super::file_name::fold_lookalikes;
use super::*;

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// Pieces of names: traversal, encodings, separators, look-alikes, drive letters, controls.
const PIECES: &[&str] = &[
    "..",
    ".",
    "...",
    "/",
    "\\",
    "//",
    "./",
    "../",
    "..\\",
    "%2e",
    "%2e%2e",
    "%2f",
    "%5c",
    "%252e",
    "%c0%ae",
    "%00",
    "\u{0}",
    "\n",
    "\r",
    "\t",
    "\u{7f}",
    "\u{85}",
    "\u{202e}",
    "\u{200b}",
    "．",
    "．．",
    "／",
    "＼",
    "‥",
    "…",
    "․",
    "﹒",
    "∕",
    "⁄",
    "⧸",
    "∖",
    "﹨",
    "：",
    "C:",
    "c:\\",
    "\\\\?\\",
    "\\\\server\\share",
    ":",
    "::$DATA",
    "/etc/passwd",
    "/",
    "~",
    "$HOME",
    "con",
    "NUL",
    "a",
    "b",
    "photo",
    ".png",
    "image.png",
    "é",
    "日本",
    "🙂",
    " ",
    "  ",
    "-",
    "_",
    "=",
    "%",
    "?",
    "*",
    "x",
];

fn gen_name(rng: &mut Rng) -> String {
    match rng.below(12) {
        // A very long run of one piece.
        0 => rng.pick(PIECES).repeat(1 + rng.below(300)),
        _ => {
            let n = 1 + rng.below(6);
            (0..n).map(|_| rng.pick(PIECES)).collect()
        }
    }
}

/// The segments a path splits into on Windows (both separators) and on Linux.
fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split(['/', '\\'])
}

/// What "stays inside the folder" means, checked independently of the implementation.
fn assert_plain_relative(path: &str, what: &str) {
    assert!(!path.is_empty(), "{what}: empty");
    assert!(
        !path.starts_with('/') && !path.starts_with('\\'),
        "{what}: absolute {path:?}"
    );
    assert!(!path.contains(':'), "{what}: drive or stream in {path:?}");
    assert!(
        !path.chars().any(char::is_control),
        "{what}: control character in {path:?}"
    );
    for seg in segments(path) {
        assert!(
            seg != ".." && seg != "." && !seg.is_empty(),
            "{what}: segment {seg:?} in {path:?}"
        );
        // Windows drops trailing dots and spaces: `.. ` would become `..`.
        let trimmed = seg.trim_end_matches(['.', ' ']);
        assert!(!trimmed.is_empty(), "{what}: segment {seg:?} in {path:?}");
        // Look-alikes folded (as NFKC or a Windows best-fit code page would) are no better.
        let folded = fold_lookalikes(seg);
        assert!(
            !folded.contains("..") && !folded.contains(['/', '\\', ':']),
            "{what}: look-alike traversal {seg:?} in {path:?}"
        );
    }
    assert!(
        Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_))),
        "{what}: not a plain relative path {path:?}"
    );
}

#[test]
fn accepted_names_and_subfolders_are_plain_relative_paths() {
    for seed in [1u64, 42, 0x5eed, 0xdead_beef, 20_250_601] {
        let mut rng = Rng::new(seed);
        let (mut names_ok, mut subs_ok) = (0, 0);
        for _ in 0..20_000 {
            let name = gen_name(&mut rng);
            if check_image_name(&name).is_ok() {
                names_ok += 1;
                assert_plain_relative(&name, &format!("seed {seed}: name"));
                assert!(name.len() <= 255);
            }
            let sub: String = (0..1 + rng.below(4))
                .map(|_| gen_name(&mut rng) + if rng.below(2) == 0 { "/" } else { "" })
                .collect();
            if let Ok(normal) = check_subfolder(&sub) {
                subs_ok += 1;
                // Normalising is idempotent.
                assert_eq!(check_subfolder(&normal).as_deref(), Ok(normal.as_str()));
                if !normal.is_empty() {
                    assert_plain_relative(&normal, &format!("seed {seed}: subfolder {sub:?}"));
                    if check_image_name(&name).is_ok() {
                        assert_plain_relative(&format!("{normal}/{name}"), "subfolder/name");
                    }
                }
            }
        }
        // The generator must also produce valid names, or the test proves nothing.
        assert!(
            names_ok > 500,
            "seed {seed}: only {names_ok} names accepted"
        );
        assert!(
            subs_ok > 100,
            "seed {seed}: only {subs_ok} subfolders accepted"
        );
    }
}

#[test]
fn known_escapes_are_refused() {
    for name in [
        "..",
        ".",
        "../a.png",
        "..\\a.png",
        "/etc/passwd",
        "\\\\server\\share\\x.png",
        "C:\\x.png",
        "C:x.png",
        "x.png::$DATA",
        "x\u{0}.png",
        "．．",
        "．．／x.png",
        "a／b.png",
        "a＼b.png",
        "‥",
        "…",
        "x：y.png",
        ". .",
        " . ",
        "...",
    ] {
        assert!(check_image_name(name).is_err(), "{name:?} was accepted");
    }
    for sub in [
        "/abs", "..", "a/..", "a/../b", "a\\b", "C:/x", "．．/x", "a／..", "x/‥/y", "a/ . /b",
        "a\u{0}b",
    ] {
        assert!(check_subfolder(sub).is_err(), "{sub:?} was accepted");
    }
    // Percent-encodings are literal characters to ComfyUI, not traversal: accepted as names.
    assert!(check_image_name("%2e%2e").is_ok());
    assert!(check_image_name(&"a".repeat(255)).is_ok());
    assert!(check_image_name(&"a".repeat(256)).is_err());
}

#[test]
fn names_made_from_urls_always_pass_the_checks() {
    let mut rng = Rng::new(7);
    for _ in 0..20_000 {
        let raw = gen_name(&mut rng);
        let safe = sanitize_file_name(&raw);
        assert!(check_image_name(&safe).is_ok(), "{raw:?} -> {safe:?}");
        assert_plain_relative(&safe, "sanitized");
        let url = format!("https://example.com/dir/{raw}");
        let derived = name_from_url(&url);
        assert!(check_image_name(&derived).is_ok(), "{url:?} -> {derived:?}");
    }
}

#[test]
fn parse_input_only_accepts_inside_paths() {
    let mut rng = Rng::new(99);
    let mut accepted = 0;
    for _ in 0..5_000 {
        let name = gen_name(&mut rng);
        let sub = gen_name(&mut rng);
        let input = json!({
            "workflow": {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}},
            "images": [
                {"name": name, "image": "aGk=", "subfolder": sub},
                {"name": "m.png", "image": "aGk=", "kind": "mask",
                 "original_ref": {"filename": name, "subfolder": sub}},
            ],
        });
        if let Ok(parsed) = parse_input(Some(&input)) {
            accepted += 1;
            for file in &parsed.files {
                let path = match file.subfolder.as_str() {
                    "" => file.name.clone(),
                    sub => format!("{sub}/{}", file.name),
                };
                assert_plain_relative(&path, "parsed");
                if let Some(r) = &file.original_ref {
                    assert_plain_relative(&r.filename, "original_ref");
                }
            }
        }
    }
    assert!(accepted > 100, "only {accepted} inputs accepted");
}
