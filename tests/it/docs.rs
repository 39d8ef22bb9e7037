//! The docs cannot drift from the code: every relative link and anchor resolves, the README stays
//! within its budget, every worker command in a shell block is accepted by the real argument
//! parser, every variable named in the docs is read by the code and every variable the code reads
//! is in `docs/configuration.md`, every script and source path exists, every `curl` to the local
//! endpoint uses a route it serves, and the README's first command runs for real.
//!
//! Markdown is read with a small scanner (fenced blocks, inline code spans, `[text](target)`
//! links, ATX headings), enough for these files; external links are never fetched.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::error::ErrorKind;
use clap::Parser;
use comfy_worker::cli::Cli;
use serde_json::Value;

use crate::harness::png_size;

/// The README's line budget.
const README_MAX_LINES: usize = 300;

/// Fenced-block languages whose lines are shell commands.
const SHELL_LANGUAGES: &[&str] = &["sh", "bash", "console", "shell"];

/// Variables in our families that belong to other programs: the RunPod SDK's and the Comfy SDK's
/// clients read them, the worker does not.
const FOREIGN_VARIABLES: &[&str] = &[
    "RUNPOD_ENDPOINT_BASE_URL",
    "RUNPOD_API_KEY",
    "COMFY_BASE_URL",
];

/// String literals in `src/` that look like our variables but are not environment variables
/// (ComfyUI's V3 input types and output kinds).
const NOT_VARIABLES: &[&str] = &[
    "COMFY_AUTOGROW_V3",
    "COMFY_DYNAMICCOMBO_V3",
    "PREVIEW_3D",
    "PREVIEW_3D_ANIMATION",
];

/// Where the local endpoint listens in the docs' examples.
const ENDPOINT_AUTHORITIES: &[&str] = &["localhost:8000", "127.0.0.1:8000", "[::1]:8000"];

/// Top-level folders whose paths, when a doc names them, must exist.
const CHECKED_FOLDERS: &[&str] = &[
    "scripts/", "docker/", "src/", "tests/", "benches/", "crates/",
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A Markdown file of the docs.
struct Doc {
    /// Relative to the repository, for messages.
    name: String,
    path: PathBuf,
    text: String,
}

impl Doc {
    fn load(relative: &str) -> Doc {
        let path = repo().join(relative);
        Doc {
            name: relative.to_owned(),
            text: read(&path),
            path,
        }
    }

    /// The text with every fenced block's lines blanked (line numbers kept).
    fn unfenced(&self) -> String {
        let mut out = String::with_capacity(self.text.len());
        let mut fence: Option<String> = None;
        for line in self.text.lines() {
            let trimmed = line.trim_start();
            match &fence {
                Some(f) => {
                    if trimmed.starts_with(f.as_str()) && trimmed[f.len()..].trim().is_empty() {
                        fence = None;
                    }
                }
                None => {
                    if let Some(f) = fence_opening(trimmed) {
                        fence = Some(f);
                    } else {
                        out.push_str(line);
                    }
                }
            }
            out.push('\n');
        }
        out
    }

    /// Fenced blocks: their info string's first word, the line of their first line, their lines.
    fn blocks(&self) -> Vec<Block> {
        let mut blocks = Vec::new();
        let mut open: Option<(String, Block)> = None;
        for (i, line) in self.text.lines().enumerate() {
            let trimmed = line.trim_start();
            match open.take() {
                Some((f, block))
                    if trimmed.starts_with(f.as_str()) && trimmed[f.len()..].trim().is_empty() =>
                {
                    blocks.push(block)
                }
                Some((f, mut block)) => {
                    block.lines.push(line.to_owned());
                    open = Some((f, block));
                }
                None => {
                    if let Some(f) = fence_opening(trimmed) {
                        let language = trimmed[f.len()..]
                            .split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_owned();
                        open = Some((
                            f,
                            Block {
                                language,
                                first_line: i + 2,
                                lines: Vec::new(),
                            },
                        ));
                    }
                }
            }
        }
        blocks
    }

    /// The text outside fenced blocks, with inline code blanked, and the code spans with their
    /// lines.
    fn prose(&self) -> (String, Vec<(usize, String)>) {
        strip_code_spans(&self.unfenced())
    }

    /// The anchors of the file's headings, as GitHub makes them.
    fn anchors(&self) -> HashSet<String> {
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut anchors = HashSet::new();
        for line in self.unfenced().lines() {
            let Some(text) = heading(line) else {
                continue;
            };
            let base = slug(text);
            let n = seen.entry(base.clone()).or_insert(0);
            anchors.insert(if *n == 0 {
                base.clone()
            } else {
                format!("{base}-{n}")
            });
            *n += 1;
        }
        anchors
    }
}

/// A fenced code block.
struct Block {
    language: String,
    /// The file line of the block's first content line (1-based).
    first_line: usize,
    lines: Vec<String>,
}

/// The fence that opens a block (three or more backticks or tildes), if `trimmed` is one.
fn fence_opening(trimmed: &str) -> Option<String> {
    for c in ['`', '~'] {
        let n = trimmed.chars().take_while(|&x| x == c).count();
        if n >= 3 {
            return Some(c.to_string().repeat(n));
        }
    }
    None
}

/// `README.md` and `docs/*.md`.
fn docs() -> Vec<Doc> {
    let mut names: Vec<String> = std::fs::read_dir(repo().join("docs"))
        .expect("docs/")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    names.sort();
    let mut docs = vec![Doc::load("README.md")];
    docs.extend(names.iter().map(|n| Doc::load(n)));
    docs
}

/// Blanks inline code spans (keeping newlines) and returns them with their 1-based lines.
fn strip_code_spans(text: &str) -> (String, Vec<(usize, String)>) {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut spans = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            if chars[i] == '\n' {
                line += 1;
            }
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let run = chars[i..].iter().take_while(|&&c| c == '`').count();
        // The closing run: exactly as many backticks.
        let mut j = i + run;
        let mut close = None;
        while j < chars.len() {
            if chars[j] == '`' {
                let n = chars[j..].iter().take_while(|&&c| c == '`').count();
                if n == run {
                    close = Some(j);
                    break;
                }
                j += n;
            } else {
                j += 1;
            }
        }
        let Some(end) = close else {
            for _ in 0..run {
                out.push('`');
            }
            i += run;
            continue;
        };
        let content: String = chars[i + run..end].iter().collect();
        spans.push((line, content.replace('\n', " ").trim().to_owned()));
        for c in chars[i..end + run].iter() {
            if *c == '\n' {
                line += 1;
                out.push('\n');
            } else {
                out.push(' ');
            }
        }
        i = end + run;
    }
    (out, spans)
}

/// An ATX heading's text.
fn heading(line: &str) -> Option<&str> {
    let indent = line.len() - line.trim_start().len();
    let rest = line.trim_start();
    let level = rest.chars().take_while(|&c| c == '#').count();
    if indent > 3 || level == 0 || level > 6 {
        return None;
    }
    let text = &rest[level..];
    if !(text.is_empty() || text.starts_with(' ')) {
        return None;
    }
    Some(text.trim().trim_end_matches('#').trim())
}

/// GitHub's anchor for a heading: the rendered text (link targets and markup dropped),
/// lowercased, without punctuation, spaces as hyphens.
fn slug(heading: &str) -> String {
    // `[text](target)` renders as `text`.
    let mut rendered = String::new();
    let mut rest = heading;
    while let Some(open) = rest.find('[') {
        let Some(mid) = rest[open..].find("](") else {
            break;
        };
        let Some(close) = rest[open + mid..].find(')') else {
            break;
        };
        rendered.push_str(&rest[..open]);
        rendered.push_str(&rest[open + 1..open + mid]);
        rest = &rest[open + mid + close + 1..];
    }
    rendered.push_str(rest);
    rendered
        .chars()
        .filter_map(|c| {
            if c == ' ' {
                Some("-".to_owned())
            } else if c.is_alphanumeric() || c == '-' || c == '_' {
                Some(c.to_lowercase().collect())
            } else {
                None
            }
        })
        .collect()
}

/// The targets of `[text](target)` links in `prose` (code already blanked), with their lines.
fn links(prose: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (i, line) in prose.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let end = after
                .find(|c: char| c == ')' || c.is_whitespace())
                .unwrap_or(after.len());
            let target = after[..end].trim_matches(|c| c == '<' || c == '>');
            if !target.is_empty() {
                found.push((i + 1, target.to_owned()));
            }
            rest = &after[end..];
        }
    }
    found
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let mut all = docs();
    all.push(Doc::load("ARCHITECTURE.md"));
    let mut anchors: HashMap<PathBuf, HashSet<String>> = HashMap::new();
    let mut broken = Vec::new();
    for doc in &all {
        let (prose, _) = doc.prose();
        let dir = doc.path.parent().unwrap();
        for (line, target) in links(&prose) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let resolved = if file.is_empty() {
                doc.path.clone()
            } else {
                dir.join(file)
            };
            if !resolved.exists() {
                broken.push(format!("{}:{line}: {target}: no such file", doc.name));
                continue;
            }
            let Some(anchor) = anchor else {
                continue;
            };
            if resolved.extension().is_none_or(|e| e != "md") {
                continue;
            }
            let known = anchors
                .entry(resolved.canonicalize().unwrap())
                .or_insert_with(|| {
                    Doc {
                        name: String::new(),
                        text: read(&resolved),
                        path: resolved.clone(),
                    }
                    .anchors()
                });
            if !known.contains(anchor) {
                broken.push(format!("{}:{line}: {target}: no such heading", doc.name));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_readme_stays_within_its_budget() {
    let lines = Doc::load("README.md").text.lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines, over its budget of {README_MAX_LINES}: move details into docs/"
    );
}

/// One command line of a shell block: where it starts, and its text with continuations joined.
struct CommandLine {
    at: String,
    text: String,
}

/// The command lines of every shell block of `docs`.
fn command_lines(docs: &[Doc]) -> Vec<CommandLine> {
    let mut out = Vec::new();
    for doc in docs {
        for block in doc.blocks() {
            if !SHELL_LANGUAGES.contains(&block.language.as_str()) {
                continue;
            }
            let console = block.language == "console";
            let mut pending: Option<(usize, String)> = None;
            for (i, raw) in block.lines.iter().enumerate() {
                let line_no = block.first_line + i;
                let line = match (&pending, console) {
                    (Some(_), _) | (None, false) => raw.as_str(),
                    (None, true) => match raw.trim_start().strip_prefix("$ ") {
                        Some(command) => command,
                        None => continue,
                    },
                };
                let (start, mut text) = pending.take().unwrap_or((line_no, String::new()));
                match line.trim_end().strip_suffix('\\') {
                    Some(head) => {
                        text.push_str(head);
                        text.push(' ');
                        pending = Some((start, text));
                    }
                    None => {
                        text.push_str(line);
                        out.push(CommandLine {
                            at: format!("{}:{start}", doc.name),
                            text,
                        });
                    }
                }
            }
        }
    }
    out
}

/// The simple commands of a shell line, as words: split at `&&`, `||`, `;`, `|` and `&`, quotes
/// removed, redirections and a trailing `# comment` dropped; the commands inside `$(…)` follow.
fn simple_commands(line: &str) -> Vec<Vec<String>> {
    let chars: Vec<char> = line.chars().collect();
    let mut commands = Vec::new();
    let mut subshells = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut skip_next_word = false;
    let mut i = 0;
    let end_word =
        |word: &mut String, in_word: &mut bool, skip: &mut bool, words: &mut Vec<String>| {
            if *in_word {
                if *skip {
                    *skip = false;
                } else {
                    words.push(std::mem::take(word));
                }
                word.clear();
                *in_word = false;
            }
        };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\'' => {
                in_word = true;
                i += 1;
                while i < chars.len() && chars[i] != '\'' {
                    word.push(chars[i]);
                    i += 1;
                }
                i += 1;
            }
            '"' => {
                in_word = true;
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' && i + 1 < chars.len() {
                        i += 1;
                    }
                    word.push(chars[i]);
                    i += 1;
                }
                i += 1;
            }
            '\\' => {
                in_word = true;
                if i + 1 < chars.len() {
                    word.push(chars[i + 1]);
                }
                i += 2;
            }
            '$' if chars.get(i + 1) == Some(&'(') => {
                in_word = true;
                let mut depth = 0;
                let start = i + 2;
                while i < chars.len() {
                    match chars[i] {
                        '(' => depth += 1,
                        ')' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    word.push(chars[i]);
                    i += 1;
                }
                subshells.push(chars[start..i.min(chars.len())].iter().collect::<String>());
                word.push(')');
                i += 1;
            }
            '#' if !in_word => break,
            c if c.is_whitespace() => {
                end_word(&mut word, &mut in_word, &mut skip_next_word, &mut words);
                i += 1;
            }
            '>' | '<' => {
                // `2>`: the fd number is not a word.
                if in_word && word.chars().all(|d| d.is_ascii_digit()) {
                    word.clear();
                    in_word = false;
                } else {
                    end_word(&mut word, &mut in_word, &mut skip_next_word, &mut words);
                }
                i += 1;
                if chars.get(i) == Some(&'>') {
                    i += 1;
                }
                if chars.get(i) == Some(&'&') {
                    i += 1;
                    while chars
                        .get(i)
                        .is_some_and(|d| d.is_ascii_digit() || *d == '-')
                    {
                        i += 1;
                    }
                } else {
                    skip_next_word = true;
                }
            }
            '|' | '&' | ';' => {
                end_word(&mut word, &mut in_word, &mut skip_next_word, &mut words);
                if (c == '|' || c == '&') && chars.get(i + 1) == Some(&c) {
                    i += 1;
                }
                i += 1;
                if !words.is_empty() {
                    commands.push(std::mem::take(&mut words));
                }
            }
            _ => {
                in_word = true;
                word.push(c);
                i += 1;
            }
        }
    }
    end_word(&mut word, &mut in_word, &mut skip_next_word, &mut words);
    if !words.is_empty() {
        commands.push(words);
    }
    // Leading `VAR=value` assignments are not the command.
    let mut out: Vec<Vec<String>> = commands
        .into_iter()
        .map(|words| {
            words
                .into_iter()
                .skip_while(|w| {
                    w.split_once('=').is_some_and(|(name, _)| {
                        !name.is_empty()
                            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                            && !name.starts_with(|c: char| c.is_ascii_digit())
                    })
                })
                .collect::<Vec<String>>()
        })
        .filter(|words| !words.is_empty())
        .collect();
    for inner in subshells {
        out.extend(simple_commands(&inner));
    }
    out
}

/// The arguments a command passes to the worker, when it runs the worker.
fn worker_args(words: &[String]) -> Option<Vec<String>> {
    let program = words.first()?;
    if program == "comfy-worker" || program.ends_with("/comfy-worker") {
        return Some(words[1..].to_vec());
    }
    if program == "cargo" {
        let mut rest = words[1..].iter().skip_while(|w| w.starts_with('+'));
        if rest.next().map(String::as_str) == Some("run") {
            let after: Vec<String> = rest.skip_while(|w| *w != "--").skip(1).cloned().collect();
            return Some(after);
        }
    }
    None
}

#[test]
fn every_documented_worker_command_parses() {
    let mut refused = Vec::new();
    let mut checked = 0;
    for line in command_lines(&docs()) {
        for words in simple_commands(&line.text) {
            let Some(args) = worker_args(&words) else {
                continue;
            };
            checked += 1;
            let argv = std::iter::once("comfy-worker".to_owned()).chain(args.iter().cloned());
            if let Err(e) = Cli::try_parse_from(argv) {
                if matches!(
                    e.kind(),
                    ErrorKind::DisplayHelp
                        | ErrorKind::DisplayVersion
                        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                ) {
                    continue;
                }
                let why = e.to_string();
                let why = why.lines().next().unwrap_or_default();
                refused.push(format!(
                    "{}: comfy-worker {}: {why}",
                    line.at,
                    args.join(" ")
                ));
            }
        }
    }
    assert!(checked >= 20, "only {checked} worker commands found");
    assert!(
        refused.is_empty(),
        "{} documented command(s) refused by the argument parser:\n{}",
        refused.len(),
        refused.join("\n")
    );
}

/// Whether `s` has the shape of an environment variable name (`ABC_DEF`).
fn variable_shape(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_uppercase())
        && s.contains('_')
        && !s.ends_with('_')
        && s.chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// The quoted strings of the `const NAME: &[&str] = &[...]` list in `text`.
fn string_list(text: &str, name: &str) -> Vec<String> {
    let start = text
        .find(&format!("const {name}: &[&str] = &["))
        .unwrap_or_else(|| panic!("{name} not found"));
    let body = &text[start..];
    let body = &body[body.find("= &[").unwrap() + 4..];
    let body = &body[..body.find("];").unwrap()];
    body.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// Our variables' families, from the list of what the test harness clears before running the
/// binary (`tests/it/harness.rs`), plus the endpoint's and the start script's.
struct Families {
    prefixes: Vec<String>,
    names: Vec<String>,
}

impl Families {
    fn load() -> Families {
        let harness = read(&repo().join("tests/it/harness.rs"));
        let mut prefixes = string_list(&harness, "PREFIXES");
        prefixes.extend(["SERVE_".to_owned(), "COMFYUI_".to_owned()]);
        Families {
            prefixes,
            names: string_list(&harness, "NAMES"),
        }
    }

    fn ours(&self, name: &str) -> bool {
        variable_shape(name)
            && (self.names.iter().any(|n| n == name)
                || self.prefixes.iter().any(|p| name.starts_with(p.as_str())))
    }
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().filter_map(|e| e.ok()) {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The upper-case words (`A-Z`, digits, `_`) of `text`.
fn upper_words(text: &str) -> HashSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| variable_shape(w))
        .map(str::to_owned)
        .collect()
}

/// The variables named in backticks in the docs' prose (`NAME` or `NAME=value`), with where.
fn documented_variables(families: &Families) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for doc in docs() {
        let (_, spans) = doc.prose();
        for (line, span) in spans {
            let name = span.split('=').next().unwrap_or_default();
            if families.ours(name) {
                found.push((format!("{}:{line}", doc.name), name.to_owned()));
            }
        }
    }
    found
}

#[test]
fn every_documented_variable_is_read_by_the_code() {
    let families = Families::load();
    let mut code = String::new();
    for file in rust_files(&repo().join("src")) {
        code.push_str(&read(&file));
    }
    code.push_str(&read(&repo().join("docker/start.sh")));
    let read_by_code = upper_words(&code);
    // The test suite's own variables (`COMFY_WORKER_TEST_*`, `COMFY_WORKER_BLESS`).
    let mut test_code = String::new();
    for file in rust_files(&repo().join("tests/it")) {
        test_code.push_str(&read(&file));
    }
    test_code.push_str(&read(&repo().join("scripts/test")));
    let read_by_tests = upper_words(&test_code);
    let mut unknown = BTreeSet::new();
    for (at, name) in documented_variables(&families) {
        let known = read_by_code.contains(&name)
            || FOREIGN_VARIABLES.contains(&name.as_str())
            || (name.starts_with("COMFY_WORKER_") && read_by_tests.contains(&name));
        if !known {
            unknown.insert(format!("{at}: {name}"));
        }
    }
    assert!(
        unknown.is_empty(),
        "variables in the docs that no code reads (src/, docker/start.sh):\n{}",
        unknown.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn every_variable_the_code_reads_is_in_the_configuration_page() {
    let families = Families::load();
    let mut read_by_code: BTreeSet<String> = families.names.iter().cloned().collect();
    for file in rust_files(&repo().join("src")) {
        let text = read(&file);
        // Every `"NAME"` string literal: a piece between two quotes that is just a name (code
        // between two literals never is).
        let pieces: Vec<&str> = text.split('"').collect();
        for name in pieces.iter().skip(1).take(pieces.len().saturating_sub(2)) {
            if families.ours(name) && !NOT_VARIABLES.contains(name) {
                read_by_code.insert((*name).to_owned());
            }
        }
    }
    // The start script's `${NAME…}` expansions.
    let script = read(&repo().join("docker/start.sh"));
    for part in script.split("${").skip(1) {
        let name: String = part
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if families.ours(&name) {
            read_by_code.insert(name);
        }
    }
    let (_, spans) = Doc::load("docs/configuration.md").prose();
    let documented: HashSet<&str> = spans
        .iter()
        .map(|(_, s)| s.split('=').next().unwrap_or_default())
        .collect();
    let missing: Vec<&String> = read_by_code
        .iter()
        .filter(|name| !documented.contains(name.as_str()))
        .collect();
    assert!(
        read_by_code.len() >= 60,
        "only {} variables found",
        read_by_code.len()
    );
    assert!(
        missing.is_empty(),
        "variables the code reads that docs/configuration.md does not name: {missing:?}"
    );
}

#[test]
fn every_path_the_docs_name_exists() {
    let mut missing = BTreeSet::new();
    for doc in docs() {
        for (i, line) in doc.text.lines().enumerate() {
            for folder in CHECKED_FOLDERS {
                let mut from = 0;
                while let Some(at) = line[from..].find(folder) {
                    let start = from + at;
                    from = start + folder.len();
                    let before = line[..start].chars().next_back();
                    if before.is_some_and(|c| c.is_alphanumeric() || "./-_$".contains(c)) {
                        continue;
                    }
                    let path: String = line[start..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || "._/-".contains(*c))
                        .collect();
                    let path = path.trim_end_matches(['.', ',']);
                    if !repo().join(path).exists() {
                        missing.insert(format!("{}:{}: {path}", doc.name, i + 1));
                    }
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "paths in the docs that do not exist:\n{}",
        missing.into_iter().collect::<Vec<_>>().join("\n")
    );
}

/// The local endpoint's routes, as `src/endpoint/routes.rs` declares them, also under each
/// nested prefix.
fn endpoint_routes() -> Vec<String> {
    let text = read(&repo().join("src/endpoint/routes.rs"));
    let literal_after = |marker: &str| -> Vec<String> {
        text.match_indices(marker)
            .filter_map(|(at, _)| {
                let rest = text[at + marker.len()..].trim_start();
                let rest = rest.strip_prefix('"')?;
                Some(rest[..rest.find('"')?].to_owned())
            })
            .collect()
    };
    let routes = literal_after(".route(");
    let prefixes = literal_after(".nest(");
    let mut all = routes.clone();
    for prefix in &prefixes {
        all.extend(
            routes
                .iter()
                .filter(|r| !r.starts_with(prefix.as_str()))
                .map(|r| format!("{prefix}{r}")),
        );
    }
    all
}

fn route_matches(route: &str, path: &str) -> bool {
    let r: Vec<&str> = route.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    r.len() == p.len()
        && r.iter().zip(&p).all(|(r, p)| {
            if r.starts_with('{') && r.ends_with('}') {
                !p.is_empty()
            } else {
                r == p
            }
        })
}

#[test]
fn every_curl_to_the_local_endpoint_uses_a_route_it_serves() {
    let routes = endpoint_routes();
    assert!(
        routes.iter().any(|r| r == "/status/{id}"),
        "routes not found: {routes:?}"
    );
    let mut checked = 0;
    let mut unknown = Vec::new();
    for line in command_lines(&docs()) {
        for words in simple_commands(&line.text) {
            if words.first().map(String::as_str) != Some("curl") {
                continue;
            }
            for word in &words[1..] {
                let url = word
                    .strip_prefix("http://")
                    .or_else(|| word.strip_prefix("https://"))
                    .unwrap_or(word);
                let (authority, path) = url.split_once('/').unwrap_or((url, ""));
                if !ENDPOINT_AUTHORITIES.contains(&authority) {
                    continue;
                }
                let path = format!("/{}", path.split(['?', '#']).next().unwrap_or_default());
                checked += 1;
                if !routes.iter().any(|r| route_matches(r, &path)) {
                    unknown.push(format!("{}: {path}", line.at));
                }
            }
        }
    }
    assert!(checked >= 10, "only {checked} curl URLs found");
    assert!(
        unknown.is_empty(),
        "curl examples on paths the local endpoint does not serve:\n{}",
        unknown.join("\n")
    );
}

#[test]
fn the_quick_start_simulator_run_prints_an_image() {
    // The README's first command that runs the worker: the quick start's simulator run.
    let readme = Doc::load("README.md");
    let args = command_lines(std::slice::from_ref(&readme))
        .into_iter()
        .flat_map(|line| simple_commands(&line.text))
        .find_map(|words| worker_args(&words))
        .expect("a worker command in the README");
    assert_eq!(args[0], "run", "{args:?}");
    assert!(args.iter().any(|a| a == "--simulate"), "{args:?}");
    // In a directory of its own, with the files the command names.
    let dir = crate::cli::job_dir();
    let out = crate::harness::clear_worker_env(&mut Command::new(crate::cli::bin()))
        .args(&args)
        .current_dir(dir.path())
        .env("RUST_LOG", "comfy_worker=warn")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run comfy-worker");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    // Not on a terminal, stdout is the job output JSON.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let output: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout}"));
    let image = &output["images"][0];
    assert_eq!(image["type"], "base64", "{output}");
    assert_eq!(png_size(image["data"].as_str().unwrap()), (1024, 1024));
}

#[test]
fn the_scanners_read_what_the_docs_write() {
    assert_eq!(
        slug("The start script (`docker/start.sh`)"),
        "the-start-script-dockerstartsh"
    );
    assert_eq!(slug("`s3://` inputs"), "s3-inputs");
    assert_eq!(
        slug("1. A job on the simulator"),
        "1-a-job-on-the-simulator"
    );
    assert_eq!(slug("See [RunPod](runpod.md) now"), "see-runpod-now");
    let words = |line: &str| simple_commands(line);
    assert_eq!(
        words("A=1 B='x y' comfy-worker run \"a b.json\" --simulate > out.json 2>&1 # note"),
        [["comfy-worker", "run", "a b.json", "--simulate"]]
    );
    assert_eq!(
        words("cargo build --release && ./target/release/comfy-worker serve &"),
        [
            vec!["cargo", "build", "--release"],
            vec!["./target/release/comfy-worker", "serve"]
        ]
    );
    assert_eq!(
        words("ID=$(curl -s localhost:8000/run -d @x | jq -r .id)"),
        [
            vec!["curl", "-s", "localhost:8000/run", "-d", "@x"],
            vec!["jq", "-r", ".id"]
        ]
    );
    assert_eq!(
        worker_args(&["cargo", "run", "--release", "--", "run", "x.json"].map(String::from)),
        Some(vec!["run".to_owned(), "x.json".to_owned()])
    );
    assert_eq!(
        worker_args(&["cargo", "lambda", "watch"].map(String::from)),
        None
    );
    assert!(route_matches(
        "/v2/{endpoint_id}/status/{id}",
        "/v2/local/status/$ID"
    ));
    assert!(!route_matches("/status/{id}", "/status/"));
    let (prose, spans) = strip_code_spans("a `X_Y` [`b`](c.md#d)\n``e ` f``");
    assert_eq!(links(&prose), [(1, "c.md#d".to_owned())]);
    assert_eq!(
        spans,
        [
            (1, "X_Y".to_owned()),
            (1, "b".to_owned()),
            (2, "e ` f".to_owned())
        ]
    );
}
