//! The module graph's rules, checked on the source (ARCHITECTURE.md, "Import rules"):
//!
//! * **Imports flow one way.** Every top-level module of the product crate has a layer; a module
//!   may import only from lower layers (and from itself). Two modules of one layer never import
//!   each other: the front ends (the RunPod adapter, the Lambda adapter, the local endpoint) know
//!   nothing of one another, nor do the leaves.
//! * **No circle.** No file imports a file that (directly or not) imports it back.
//! * **The map is true.** `lib.rs`'s `//!` list names every module it declares.
//!
//! Imports are read from the code itself: `use` trees (braces expanded) and inline
//! `crate::`/`super::` paths, with comments and string literals removed first. `mod` lines and
//! `pub use` re-exports of a module's own children are structure, not dependencies, and are not
//! arrows; nor are the imports of a file's unit tests (its final `#[cfg(test)] mod tests`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may import modules of lower layers only.
const LAYERS: &[&[&str]] = &[
    // Leaves: no import from the crate.
    &[
        "secret",
        "media_type",
        "json_type",
        "eta",
        "redact",
        "comfy_address",
        "metrics",
        "scratch_dir",
    ],
    // Settings, logs, the SSRF guard and the ComfyUI client: leaves only.
    &["config", "telemetry", "ssrf", "comfy"],
    // Progress: prompt events in, snapshots out.
    &["progress"],
    // The job engine.
    &["job"],
    // What runs around jobs.
    &["webhook", "housekeeping"],
    // The one job runner.
    &["runner"],
    // The front ends, which never import one another.
    &["platform::runpod", "platform::lambda", "endpoint"],
    // The command line.
    &["cli"],
];

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The module path of a file: `src/job/input/mod.rs` → `["job", "input"]`.
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_owned());
    }
    parts
}

/// The file a module path names, if one does: the deepest prefix that is a file.
fn file_of(module: &[String]) -> Option<PathBuf> {
    for len in (1..=module.len()).rev() {
        let base = src().join(module[..len].join("/"));
        for candidate in [base.with_extension("rs"), base.join("mod.rs")] {
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// The code with comments, string and char literals blanked (lengths kept).
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let end = text[i + 2..].find("*/").map_or(b.len(), |e| i + 2 + e + 2);
            out.extend(
                text[i..end]
                    .chars()
                    .map(|c| if c == '\n' { '\n' } else { ' ' }),
            );
            i = end;
        } else if b[i] == b'r'
            && (b[i + 1..].starts_with(b"\"") || b[i + 1..].starts_with(b"#"))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            let hashes = b[i + 1..].iter().take_while(|c| **c == b'#').count();
            if b.get(i + 1 + hashes) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            let close = format!("\"{}", "#".repeat(hashes));
            let start = i + 2 + hashes;
            let end = text[start..]
                .find(&close)
                .map_or(b.len(), |e| start + e + close.len());
            out.push_str(" \"\"");
            i = end;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\u{..}'), else a lifetime.
            let rest = &text[i..];
            let len = if rest.starts_with("'\\u{") {
                rest.find("}'").map(|e| e + 2)
            } else if rest.starts_with("'\\") {
                Some(4)
            } else {
                rest.char_indices()
                    .nth(2)
                    .filter(|(_, c)| *c == '\'')
                    .map(|(at, _)| at + 1)
            };
            match len {
                Some(n) => {
                    out.push_str("' '");
                    i += n;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            let ch = text[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// The paths of a `use` tree: `crate::a::{b, c::{d, e}}` → `crate::a::b`, `crate::a::c::d`, ...
fn expand_use(tree: &str) -> Vec<String> {
    // `x as y` renames: only the path matters.
    let mut plain = String::new();
    let mut words = tree.split_whitespace().peekable();
    while let Some(word) = words.next() {
        if word == "as" {
            // The new name, and whatever punctuation follows it.
            if let Some(name) = words.next() {
                plain.push_str(name.trim_start_matches(|c: char| c.is_alphanumeric() || c == '_'));
            }
        } else {
            plain.push_str(word);
        }
    }
    let tree = plain;
    fn walk(prefix: &str, tree: &str, out: &mut Vec<String>) {
        match tree.find('{') {
            None => out.push(format!("{prefix}{tree}")),
            Some(open) => {
                let head = &tree[..open];
                let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
                let mut depth = 0;
                let mut start = 0;
                for (at, c) in inner.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            walk(&format!("{prefix}{head}"), &inner[start..at], out);
                            start = at + 1;
                        }
                        _ => {}
                    }
                }
                if start < inner.len() {
                    walk(&format!("{prefix}{head}"), &inner[start..], out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk("", &tree, &mut out);
    out.into_iter()
        .map(|p| p.trim_end_matches("::self").to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// One file's imports, as absolute module paths (`["job", "storage", "JobStorage"]`).
fn imports_of(file: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(file).unwrap();
    // Unit tests (the `#[cfg(test)] mod tests { ... }` block that ends a file) may reach anything.
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(at) => &text[..at],
        None => &text[..],
    };
    let code = code_only(text);
    let here = module_of(file);
    let children: BTreeSet<String> = code
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l
                .strip_prefix("pub(crate) ")
                .or(l.strip_prefix("pub "))
                .unwrap_or(l);
            l.strip_prefix("mod ")
                .map(|m| m.trim_end_matches(';').trim().to_owned())
        })
        .collect();
    let absolute = |path: &str| -> Option<Vec<String>> {
        let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        let first = *segs.first()?;
        let mut base: Vec<String> = match first {
            "crate" => Vec::new(),
            "super" | "self" => {
                let mut base = here.clone();
                let mut n = 0;
                for s in &segs {
                    match *s {
                        "super" => {
                            base.pop();
                            n += 1;
                        }
                        "self" => n += 1,
                        _ => break,
                    }
                }
                return Some(
                    base.into_iter()
                        .chain(segs[n..].iter().map(|s| s.to_string()))
                        .collect(),
                );
            }
            child if children.contains(child) => here.clone(),
            _ => return None,
        };
        let skip = usize::from(first == "crate");
        base.extend(segs[skip..].iter().map(|s| s.to_string()));
        Some(base)
    };
    let mut out = Vec::new();
    // `use` statements (re-exports of the module's own children are structure, not arrows).
    let mut rest = code.as_str();
    while let Some(at) = rest.find("use ") {
        let before = &rest[..at];
        let boundary = before
            .chars()
            .last()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        let stmt_end = rest[at..].find(';').map_or(rest.len(), |e| at + e);
        if boundary {
            let is_pub = before.trim_end().ends_with("pub") || before.trim_end().ends_with(')');
            for path in expand_use(&rest[at + 4..stmt_end]) {
                let child_reexport = is_pub
                    && path
                        .split("::")
                        .next()
                        .is_some_and(|f| children.contains(f));
                if child_reexport {
                    continue;
                }
                if let Some(abs) = absolute(&path) {
                    out.push(abs);
                }
            }
        }
        rest = &rest[stmt_end.min(rest.len())..];
        if rest.is_empty() {
            break;
        }
        rest = &rest[1.min(rest.len())..];
    }
    // Inline paths: `crate::job::Engine::new(...)`, `super::store::lock(...)`.
    let bytes = code.as_bytes();
    let starts = code
        .match_indices("crate::")
        .chain(code.match_indices("super::"))
        .map(|(at, _)| at);
    for start in starts {
        let glued = start > 0
            && (bytes[start - 1].is_ascii_alphanumeric()
                || bytes[start - 1] == b'_'
                || bytes[start - 1] == b':');
        if glued {
            continue;
        }
        let end = code[start..]
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .map_or(code.len(), |e| start + e);
        if let Some(abs) = absolute(code[start..end].trim_end_matches(':')) {
            out.push(abs);
        }
    }
    out
}

/// A module's area: its layer entry (`platform::runpod`, `job`, ...), or `None` for the crate
/// root and the binary.
fn area_of(module: &[String]) -> Option<String> {
    let first = module.first()?;
    if first == "platform" {
        return Some(match module.get(1) {
            Some(second) => format!("platform::{second}"),
            None => "platform".to_owned(),
        });
    }
    Some(first.clone())
}

fn layer_of(area: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&area))
}

/// Every arrow between files: (from, to, the import that makes it).
fn arrows() -> Vec<(PathBuf, PathBuf, String)> {
    let mut out = Vec::new();
    for file in rust_files(&src()) {
        for import in imports_of(&file) {
            if let Some(to) = file_of(&import) {
                if to != file {
                    out.push((file.clone(), to, import.join("::")));
                }
            }
        }
    }
    out
}

fn short(p: &Path) -> String {
    p.strip_prefix(src())
        .map(|r| format!("src/{}", r.display()))
        .unwrap_or_else(|_| p.display().to_string())
}

#[test]
fn every_top_level_module_has_a_layer() {
    let root = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let declared: Vec<String> = root
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_owned())
        .collect();
    assert!(declared.len() > 10, "lib.rs declares {declared:?}");
    for module in &declared {
        let known = module == "platform" || module == "cli" || layer_of(module).is_some();
        assert!(known, "src/lib.rs declares `{module}`, which has no layer in tests/it/architecture.rs (and ARCHITECTURE.md)");
    }
}

#[test]
fn imports_flow_one_way() {
    let mut broken = Vec::new();
    for (from, to, import) in arrows() {
        let (Some(a), Some(b)) = (area_of(&module_of(&from)), area_of(&module_of(&to))) else {
            continue;
        };
        if a == b || a == "platform" || b == "platform" {
            continue;
        }
        let (Some(la), Some(lb)) = (layer_of(&a), layer_of(&b)) else {
            if a != "cli" {
                broken.push(format!("{}: `{a}` has no layer", short(&from)));
            }
            continue;
        };
        if lb >= la {
            broken.push(format!(
                "{} ({a}, layer {la}) imports {import} ({b}, layer {lb})",
                short(&from)
            ));
        }
    }
    assert!(
        broken.is_empty(),
        "imports that run upward or sideways:\n{}",
        broken.join("\n")
    );
}

#[test]
fn no_file_imports_itself_through_others() {
    let mut graph: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for (from, to, _) in arrows() {
        graph.entry(from).or_default().insert(to);
    }
    // Tarjan's strongly connected components.
    struct Tarjan<'a> {
        graph: &'a BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        index: BTreeMap<&'a PathBuf, usize>,
        low: BTreeMap<&'a PathBuf, usize>,
        stack: Vec<&'a PathBuf>,
        on_stack: BTreeSet<&'a PathBuf>,
        next: usize,
        circles: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a PathBuf) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut scc = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    scc.push(short(w));
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    scc.sort();
                    self.circles.push(scc);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph: &graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        circles: Vec::new(),
    };
    let nodes: Vec<&PathBuf> = graph.keys().collect();
    for v in nodes {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    assert!(t.circles.is_empty(), "import circles: {:#?}", t.circles);
}

#[test]
fn the_crate_map_names_every_module() {
    let root = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let doc: String = root
        .lines()
        .filter(|l| l.starts_with("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    for module in root
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';'))
    {
        assert!(
            doc.contains(&format!("[`{module}`]")),
            "lib.rs's //! map does not list `{module}`"
        );
    }
}

/// The checker itself: it must see what it is meant to forbid.
#[test]
fn the_checker_sees_imports_in_use_trees_and_code() {
    assert_eq!(
        expand_use("crate::job::{Engine, storage::{JobStorage, Storage as S}, self}"),
        [
            "crate::job::Engine",
            "crate::job::storage::JobStorage",
            "crate::job::storage::Storage",
            "crate::job"
        ]
    );
    let code = code_only("let a = \"crate::endpoint::x\"; // crate::cli\nlet c = '\\'';");
    assert!(
        !code.contains("endpoint") && !code.contains("cli"),
        "{code}"
    );
    // The real tree: the RunPod worker imports the runner (downward) and the runner does not
    // import it back.
    let worker = src().join("platform/runpod/worker.rs");
    let imports: Vec<String> = imports_of(&worker).iter().map(|i| i.join("::")).collect();
    assert!(
        imports.iter().any(|i| i.starts_with("runner")),
        "{imports:?}"
    );
    let (runpod, runner) = (
        layer_of("platform::runpod").unwrap(),
        layer_of("runner").unwrap(),
    );
    assert!(runner < runpod);
    assert_eq!(
        layer_of("platform::runpod"),
        layer_of("endpoint"),
        "front ends share a layer, so neither may import the other"
    );
}
