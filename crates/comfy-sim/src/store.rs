//! In-memory server state that HTTP handlers and the executor share: the three file folders (`input`,
//! `output`, `temp`) with the real server's path rules, the prompt queue (heap-ordered by `number`) and the
//! history. Paths are virtual POSIX paths under `/comfyui/...` so that error messages read like the recordings.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use serde_json::{json, Map, Value};

/// Root of the simulated ComfyUI install (the recordings rewrote real paths to this).
pub(crate) const COMFY_ROOT: &str = "/comfyui";
/// `extra_data` keys the real server strips before writing history.
const SENSITIVE_EXTRA_DATA_KEYS: [&str; 2] = ["auth_token_comfy_org", "api_key_comfy_org"];
/// `MAXIMUM_HISTORY_SIZE` in execution.py.
const MAX_HISTORY: usize = 10_000;

/// One of the server's file folders, as named by the `type` query/form field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Folder {
    Input,
    Output,
    Temp,
}

impl Folder {
    /// `folder_paths.get_directory_by_type`.
    pub(crate) fn from_type(name: &str) -> Option<Folder> {
        match name {
            "input" => Some(Folder::Input),
            "output" => Some(Folder::Output),
            "temp" => Some(Folder::Temp),
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Folder::Input => "input",
            Folder::Output => "output",
            Folder::Temp => "temp",
        }
    }

    /// Absolute virtual directory of this folder.
    pub(crate) fn root(self) -> String {
        format!("{COMFY_ROOT}/{}", self.as_str())
    }

    /// Map an absolute path to a path relative to this folder, `None` when it escapes (the server's
    /// `os.path.commonpath((root, path)) != root` check).
    pub(crate) fn relative(self, abs_path: &str) -> Option<String> {
        let root = self.root();
        let p = path::normpath(abs_path);
        if p == root {
            Some(String::new())
        } else {
            p.strip_prefix(&format!("{root}/")).map(str::to_owned)
        }
    }
}

/// The three folders' files, keyed by path relative to the folder (`"sub/x.png"`).
#[derive(Default)]
pub(crate) struct Files {
    files: BTreeMap<(Folder, String), Bytes>,
    /// Directories created explicitly (uploads with a `subfolder`); parents of files exist implicitly.
    dirs: BTreeSet<(Folder, String)>,
    /// Real directories that mirror folders: every stored file is also written there, as
    /// ComfyUI writes it (`SimConfig::input_dir` and friends).
    disk: BTreeMap<Folder, std::path::PathBuf>,
}

impl Files {
    pub(crate) fn get(&self, folder: Folder, rel: &str) -> Option<&Bytes> {
        self.files.get(&(folder, rel.to_owned()))
    }

    pub(crate) fn put(&mut self, folder: Folder, rel: &str, data: Bytes) {
        if let Some(root) = self.disk.get(&folder) {
            let file = root.join(rel);
            let written = file
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(&file, &data));
            if let Err(error) = written {
                tracing::warn!(file = %file.display(), %error, "simulator: cannot write the file to disk");
            }
        }
        self.files.insert((folder, rel.to_owned()), data);
    }

    /// Also write `folder`'s files below `dir` from now on.
    pub(crate) fn mirror_to_disk(&mut self, folder: Folder, dir: std::path::PathBuf) {
        self.disk.insert(folder, dir);
    }

    /// `os.path.exists`: a file or a directory.
    pub(crate) fn exists(&self, folder: Folder, rel: &str) -> bool {
        rel.is_empty() || self.get(folder, rel).is_some() || self.dir_exists(folder, rel)
    }

    pub(crate) fn dir_exists(&self, folder: Folder, rel: &str) -> bool {
        if rel.is_empty() || self.dirs.contains(&(folder, rel.to_owned())) {
            return true;
        }
        let prefix = format!("{rel}/");
        self.files
            .keys()
            .any(|(f, p)| *f == folder && p.starts_with(&prefix))
            || self
                .dirs
                .iter()
                .any(|(f, p)| *f == folder && p.starts_with(&prefix))
    }

    pub(crate) fn mkdirs(&mut self, folder: Folder, rel: &str) {
        if !rel.is_empty() {
            self.dirs.insert((folder, rel.to_owned()));
        }
    }

    /// `folder_paths.annotated_filepath` + `os.path.join`: where `"sub/x.png"`, `"x.png [output]"` and
    /// friends point. `None` when the path leaves the three folders.
    pub(crate) fn resolve_annotated(name: &str) -> Option<(Folder, String)> {
        let (name, base) = strip_annotation(name);
        let abs = path::normpath(&path::join(&base.unwrap_or(Folder::Input).root(), name));
        [Folder::Input, Folder::Output, Folder::Temp]
            .into_iter()
            .find_map(|folder| folder.relative(&abs).map(|rel| (folder, rel)))
    }

    /// `folder_paths.exists_annotated_filepath`.
    pub(crate) fn exists_annotated(&self, name: &str) -> bool {
        Files::resolve_annotated(name).is_some_and(|(folder, rel)| self.exists(folder, &rel))
    }

    /// Names of the files directly inside `rel_dir` (`os.listdir` without the directories), sorted.
    pub(crate) fn list_dir(&self, folder: Folder, rel_dir: &str) -> Vec<String> {
        self.files
            .keys()
            .filter(|(f, _)| *f == folder)
            .filter_map(|(_, p)| {
                let (dir, name) = match p.rsplit_once('/') {
                    Some((d, n)) => (d, n),
                    None => ("", p.as_str()),
                };
                (dir == rel_dir).then(|| name.to_owned())
            })
            .collect()
    }
}

/// `folder_paths.annotated_filepath`: `"x.png [output]"` → `("x.png", Some(Output))`. Like the Python code
/// it cuts a fixed number of characters (`name[:-9]` for `[output]`), space or not.
pub(crate) fn strip_annotation(name: &str) -> (&str, Option<Folder>) {
    for (suffix, cut, folder) in [
        ("[output]", 9, Folder::Output),
        ("[input]", 8, Folder::Input),
        ("[temp]", 7, Folder::Temp),
    ] {
        if name.ends_with(suffix) {
            let keep = name.chars().count().saturating_sub(cut);
            let end = name.char_indices().nth(keep).map_or(name.len(), |(i, _)| i);
            return (&name[..end], Some(folder));
        }
    }
    (name, None)
}

/// A queued or running prompt: the real server's queue tuple plus what the executor needs.
#[derive(Clone, Debug)]
pub(crate) struct QueueItem {
    /// `number` as it goes over the wire: an int from the server's counter or a float the client sent.
    pub(crate) number: Value,
    pub(crate) prompt_id: String,
    /// The prompt after validation (validation converts literal values in place, like the real server).
    pub(crate) prompt: Map<String, Value>,
    pub(crate) extra_data: Map<String, Value>,
    /// Output node ids that passed validation (`prompt[4]` of history).
    pub(crate) outputs: Vec<String>,
}

impl QueueItem {
    /// The 5-array `GET /queue` shows.
    pub(crate) fn to_json(&self) -> Value {
        json!([
            self.number,
            self.prompt_id,
            self.prompt,
            self.extra_data,
            self.outputs
        ])
    }

    /// `extra_data` without the sensitive keys (today's ComfyUI keeps them out of `/queue` and
    /// the jobs API too; 0.3.64 only out of history).
    pub(crate) fn public_extra_data(&self) -> Map<String, Value> {
        let mut extra = self.extra_data.clone();
        for key in SENSITIVE_EXTRA_DATA_KEYS {
            extra.remove(key);
        }
        extra
    }

    /// The 5-array `GET /queue` shows in today's ComfyUI (sensitive keys removed).
    pub(crate) fn to_public_json(&self) -> Value {
        json!([
            self.number,
            self.prompt_id,
            self.prompt,
            self.public_extra_data(),
            self.outputs
        ])
    }

    /// The 5-array history shows (sensitive `extra_data` keys removed).
    pub(crate) fn to_history_json(&self) -> Value {
        let extra = self.public_extra_data();
        json!([
            self.number,
            self.prompt_id,
            self.prompt,
            extra,
            self.outputs
        ])
    }

    fn sort_key(&self) -> f64 {
        self.number.as_f64().unwrap_or(0.0)
    }

    /// Python tuple ordering of `(number, prompt_id, ...)` as used by `heapq`.
    fn precedes(&self, other: &QueueItem) -> bool {
        match self.sort_key().total_cmp(&other.sort_key()) {
            std::cmp::Ordering::Less => true,
            std::cmp::Ordering::Greater => false,
            std::cmp::Ordering::Equal => self.prompt_id < other.prompt_id,
        }
    }
}

/// The prompt queue and the history (`execution.PromptQueue`).
#[derive(Default)]
pub(crate) struct Queue {
    pending: Vec<QueueItem>,
    running: Option<QueueItem>,
    /// Insertion-ordered like a Python dict; re-using a prompt id keeps the old position.
    history: Map<String, Value>,
    /// `PromptServer.number`: the next `number` handed out when a client sends none.
    counter: i64,
}

impl Queue {
    /// Take the next `number` (the counter advances even for prompts that fail validation).
    pub(crate) fn next_number(&mut self, front: bool) -> Value {
        let n = self.counter;
        self.counter += 1;
        json!(if front { -n } else { n })
    }

    /// `get_tasks_remaining`: pending plus running.
    pub(crate) fn remaining(&self) -> usize {
        self.pending.len() + usize::from(self.running.is_some())
    }

    pub(crate) fn put(&mut self, item: QueueItem) {
        self.pending.push(item);
    }

    /// Pop the lowest `(number, prompt_id)` and mark it running.
    pub(crate) fn take_next(&mut self) -> Option<QueueItem> {
        let mut best: Option<usize> = None;
        for (i, item) in self.pending.iter().enumerate() {
            if best.is_none_or(|b| item.precedes(&self.pending[b])) {
                best = Some(i);
            }
        }
        let item = self.pending.remove(best?);
        self.running = Some(item.clone());
        Some(item)
    }

    pub(crate) fn running(&self) -> Option<&QueueItem> {
        self.running.as_ref()
    }

    /// Pending items in queue order.
    pub(crate) fn pending_sorted(&self) -> Vec<&QueueItem> {
        let mut items: Vec<&QueueItem> = self.pending.iter().collect();
        items.sort_by(|a, b| {
            a.sort_key()
                .total_cmp(&b.sort_key())
                .then_with(|| a.prompt_id.cmp(&b.prompt_id))
        });
        items
    }

    /// `wipe_queue`.
    pub(crate) fn wipe(&mut self) {
        self.pending.clear();
    }

    /// `delete_queue_item`: remove the first pending item with this id; returns whether one was removed
    /// and whether the queue held only that item (the real server then wipes, announcing status twice).
    pub(crate) fn delete_pending(&mut self, prompt_id: &Value) -> Option<bool> {
        let pos = self
            .pending
            .iter()
            .position(|item| prompt_id.as_str() == Some(item.prompt_id.as_str()))?;
        let was_single = self.pending.len() == 1;
        self.pending.remove(pos);
        Some(was_single)
    }

    /// `task_done`: store the history entry and clear the running slot.
    pub(crate) fn task_done(&mut self, prompt_id: &str, entry: Value) {
        self.running = None;
        if self.history.len() > MAX_HISTORY {
            if let Some(first) = self.history.keys().next().cloned() {
                self.history.shift_remove(&first);
            }
        }
        self.history.insert(prompt_id.to_owned(), entry);
    }

    pub(crate) fn history_entry(&self, prompt_id: &str) -> Option<&Value> {
        self.history.get(prompt_id)
    }

    /// `get_history(max_items, offset)` for `GET /history`.
    pub(crate) fn history_page(
        &self,
        max_items: Option<i64>,
        offset: Option<i64>,
    ) -> Map<String, Value> {
        let len = self.history.len() as i64;
        let mut offset = offset.unwrap_or(-1);
        if offset < 0 {
            if let Some(max) = max_items {
                offset = len.saturating_sub(max);
            }
        }
        let mut out = Map::new();
        for (i, (k, v)) in self.history.iter().enumerate() {
            if i as i64 >= offset {
                out.insert(k.clone(), v.clone());
                if max_items.is_some_and(|m| out.len() as i64 >= m) {
                    break;
                }
            }
        }
        out
    }

    pub(crate) fn wipe_history(&mut self) {
        self.history.clear();
    }

    pub(crate) fn delete_history(&mut self, prompt_id: &str) {
        self.history.shift_remove(prompt_id);
    }
}

/// Everything behind the store lock.
#[derive(Default)]
pub(crate) struct Store {
    pub(crate) files: Files,
    pub(crate) queue: Queue,
}

/// POSIX path helpers with Python's `posixpath` semantics.
pub(crate) mod path {
    /// `posixpath.normpath` (a leading `//` is treated as `/`).
    pub(crate) fn normpath(p: &str) -> String {
        if p.is_empty() {
            return ".".to_owned();
        }
        let absolute = p.starts_with('/');
        let mut comps: Vec<&str> = Vec::new();
        for comp in p.split('/') {
            match comp {
                "" | "." => {}
                ".." if (absolute || !comps.is_empty()) && comps.last() != Some(&"..") => {
                    comps.pop();
                }
                c => comps.push(c),
            }
        }
        let joined = comps.join("/");
        match (absolute, joined.is_empty()) {
            (true, _) => format!("/{joined}"),
            (false, true) => ".".to_owned(),
            (false, false) => joined,
        }
    }

    /// `os.path.join(a, b)`.
    pub(crate) fn join(a: &str, b: &str) -> String {
        if b.starts_with('/') {
            b.to_owned()
        } else if a.is_empty() || a.ends_with('/') {
            format!("{a}{b}")
        } else {
            format!("{a}/{b}")
        }
    }

    /// `os.path.dirname`.
    pub(crate) fn dirname(p: &str) -> String {
        match p.rfind('/') {
            None => String::new(),
            Some(i) => {
                let head = &p[..=i];
                let trimmed = head.trim_end_matches('/');
                if trimmed.is_empty() {
                    head.to_owned()
                } else {
                    trimmed.to_owned()
                }
            }
        }
    }

    /// `os.path.basename`.
    pub(crate) fn basename(p: &str) -> &str {
        p.rsplit('/').next().unwrap_or(p)
    }

    /// `os.path.splitext`: `("x", ".png")`.
    pub(crate) fn splitext(name: &str) -> (&str, &str) {
        let base_start = name.rfind('/').map_or(0, |i| i + 1);
        let base = &name[base_start..];
        let leading_dots = base.len() - base.trim_start_matches('.').len();
        match base[leading_dots..].rfind('.') {
            Some(i) => name.split_at(base_start + leading_dots + i),
            None => (name, ""),
        }
    }

    /// `os.path.commonpath` of absolute, normalised paths.
    pub(crate) fn commonpath(a: &str, b: &str) -> String {
        let common: Vec<&str> = a
            .split('/')
            .zip(b.split('/'))
            .take_while(|(x, y)| x == y)
            .map(|(x, _)| x)
            .filter(|c| !c.is_empty())
            .collect();
        format!("/{}", common.join("/"))
    }
}

#[cfg(test)]
mod unit {
    use super::path::*;

    #[test]
    fn posix_paths_behave_like_python() {
        assert_eq!(normpath("../../outside_output/x"), "../../outside_output/x");
        assert_eq!(
            normpath("/comfyui/output/../../outside_output"),
            "/outside_output"
        );
        assert_eq!(normpath("a/./b//c/.."), "a/b");
        assert_eq!(normpath(""), ".");
        assert_eq!(dirname("probe/wf1"), "probe");
        assert_eq!(dirname("wf1"), "");
        assert_eq!(splitext("x.tar.png"), ("x.tar", ".png"));
        assert_eq!(splitext(".hidden"), (".hidden", ""));
        assert_eq!(commonpath("/comfyui/output", "/outside_output"), "/");
        assert_eq!(join("/comfyui/output", ""), "/comfyui/output/");
    }
}
