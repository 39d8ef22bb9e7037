//! `CLEANUP_FILES=true`: after a job's outputs were collected and delivered, its uploaded inputs
//! and its output files (`output` and `temp`) are deleted from ComfyUI's folders. ComfyUI has no
//! delete API, so this works on disk: the worker runs in ComfyUI's container and sees the folders
//! at `COMFY_INPUT_DIR`, `COMFY_OUTPUT_DIR` and `COMFY_TEMP_DIR`.
//!
//! Path safety: a file is deleted only when its subfolder and name are plain relative components
//! (no `..`, no root, no `.`), its directory, with every symlink resolved, lies inside the
//! canonical folder, and it is a regular file (never a directory, never a symlink). Anything else
//! is refused and counted. A file already gone is fine.

use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use crate::comfy::FileRef;
use crate::config::Housekeeping;
use crate::job::JobFiles;

/// What a clean-up did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Files deleted.
    pub deleted: usize,
    /// Files that were already gone.
    pub missing: usize,
    /// Files refused by the path checks (outside the folders, not a regular file, unknown type).
    pub refused: usize,
    /// Files whose deletion failed (permissions, I/O).
    pub failed: usize,
}

/// How one file went.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    Deleted,
    Missing,
    Refused(String),
    Failed(String),
}

/// Deletes `files` from the folders in `dirs`. Never panics; every problem is counted (and the
/// refusals and failures logged, one line each).
pub fn delete_job_files(dirs: &Housekeeping, files: &JobFiles) -> CleanupReport {
    let mut report = CleanupReport::default();
    let inputs = files.inputs.iter().map(|f| (f, true));
    let outputs = files.outputs.iter().map(|f| (f, false));
    let mut seen = std::collections::HashSet::new();
    for (file, is_input) in inputs.chain(outputs) {
        if !seen.insert((&file.folder_type, &file.subfolder, &file.filename)) {
            continue;
        }
        let fate = match folder_for(dirs, file, is_input) {
            Some(root) => delete_one(root, &file.subfolder, &file.filename),
            None if !is_input && file.folder_type == "input" => continue,
            None => Fate::Refused(format!("unknown folder type {:?}", file.folder_type)),
        };
        match fate {
            Fate::Deleted => report.deleted += 1,
            Fate::Missing => report.missing += 1,
            Fate::Refused(why) => {
                tracing::warn!(file = %file.filename, subfolder = %file.subfolder, folder = %file.folder_type, reason = %why, "clean-up refused a file");
                report.refused += 1;
            }
            Fate::Failed(why) => {
                tracing::warn!(file = %file.filename, subfolder = %file.subfolder, folder = %file.folder_type, error = %why, "clean-up could not delete a file");
                report.failed += 1;
            }
        }
    }
    report
}

/// The folder a file lives in. Uploads go to `input` unless they said otherwise; outputs are
/// deleted from `output` and `temp` only.
fn folder_for<'a>(dirs: &'a Housekeeping, file: &FileRef, is_input: bool) -> Option<&'a Path> {
    match file.folder_type.as_str() {
        "" | "input" if is_input => Some(&dirs.input_dir),
        "output" => Some(&dirs.output_dir),
        "temp" => Some(&dirs.temp_dir),
        _ => None,
    }
}

/// True when `p` is one or more plain names (no root, `.`, `..` or prefix).
fn plain_relative(p: &Path) -> bool {
    p.components().all(|c| matches!(c, Component::Normal(_)))
}

fn delete_one(root: &Path, subfolder: &str, filename: &str) -> Fate {
    let name = Path::new(filename);
    if filename.is_empty() || name.components().count() != 1 || !plain_relative(name) {
        return Fate::Refused(format!("not a plain file name: {filename:?}"));
    }
    if subfolder.contains('\\') || filename.contains('\\') || filename.contains('\0') {
        return Fate::Refused("backslash or NUL in the path".into());
    }
    let sub = Path::new(subfolder);
    if !plain_relative(sub) {
        return Fate::Refused(format!("not a plain subfolder: {subfolder:?}"));
    }
    let root = match root.canonicalize() {
        Ok(r) => r,
        Err(e) if e.kind() == ErrorKind::NotFound => return Fate::Missing,
        Err(e) => return Fate::Failed(format!("{}: {e}", root.display())),
    };
    // The directory with every symlink resolved must still be inside the folder.
    let dir = match root.join(sub).canonicalize() {
        Ok(d) => d,
        Err(e) if e.kind() == ErrorKind::NotFound => return Fate::Missing,
        Err(e) => return Fate::Failed(e.to_string()),
    };
    if !dir.starts_with(&root) {
        return Fate::Refused(format!("{} is outside {}", dir.display(), root.display()));
    }
    let path: PathBuf = dir.join(name);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Fate::Missing,
        Err(e) => Fate::Failed(e.to_string()),
        Ok(meta) if !meta.file_type().is_file() => {
            Fate::Refused("not a regular file (a directory or a symlink)".into())
        }
        Ok(_) => match std::fs::remove_file(&path) {
            Ok(()) => Fate::Deleted,
            Err(e) if e.kind() == ErrorKind::NotFound => Fate::Missing,
            Err(e) => Fate::Failed(e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(folder: &str, subfolder: &str, name: &str) -> FileRef {
        FileRef {
            filename: name.into(),
            subfolder: subfolder.into(),
            folder_type: folder.into(),
        }
    }

    struct Dirs {
        _tmp: tempfile::TempDir,
        base: PathBuf,
        settings: Housekeeping,
    }

    fn dirs() -> Dirs {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().to_path_buf();
        for d in ["input", "output", "temp", "outside"] {
            std::fs::create_dir_all(base.join(d)).unwrap();
        }
        let settings = Housekeeping {
            input_dir: base.join("input"),
            output_dir: base.join("output"),
            temp_dir: base.join("temp"),
            ..Housekeeping::default()
        };
        Dirs {
            _tmp: tmp,
            base,
            settings,
        }
    }

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    #[test]
    fn deletes_the_jobs_files_and_nothing_else() {
        let d = dirs();
        touch(&d.base.join("input/job/in.png"));
        touch(&d.base.join("input/keep.png"));
        touch(&d.base.join("output/probe/out_00001_.png"));
        touch(&d.base.join("output/probe/other_00001_.png"));
        touch(&d.base.join("temp/ComfyUI_temp_abc_00001_.png"));
        let files = JobFiles {
            inputs: vec![file("input", "job", "in.png")],
            outputs: vec![
                file("output", "probe", "out_00001_.png"),
                file("temp", "", "ComfyUI_temp_abc_00001_.png"),
                file("output", "", "gone.png"),
                // A reference into the input folder is not the job's to delete.
                file("input", "", "keep.png"),
            ],
        };
        let report = delete_job_files(&d.settings, &files);
        assert_eq!(
            report,
            CleanupReport {
                deleted: 3,
                missing: 1,
                refused: 0,
                failed: 0
            }
        );
        assert!(!d.base.join("input/job/in.png").exists());
        assert!(d.base.join("input/keep.png").exists());
        assert!(!d.base.join("output/probe/out_00001_.png").exists());
        assert!(d.base.join("output/probe/other_00001_.png").exists());
        assert!(!d.base.join("temp/ComfyUI_temp_abc_00001_.png").exists());
    }

    #[test]
    fn refuses_paths_that_leave_the_folders() {
        let d = dirs();
        touch(&d.base.join("outside/secret.txt"));
        touch(&d.base.join("input/dir/inner.png"));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(d.base.join("outside"), d.base.join("output/link")).unwrap();
            std::os::unix::fs::symlink(
                d.base.join("outside/secret.txt"),
                d.base.join("output/alias.txt"),
            )
            .unwrap();
        }
        let bad = vec![
            file("output", "..", "outside/secret.txt"),
            file("output", "../outside", "secret.txt"),
            file("output", "", "../outside/secret.txt"),
            file("output", "/", "secret.txt"),
            file(
                "output",
                &d.base.join("outside").display().to_string(),
                "secret.txt",
            ),
            file("output", "", ".."),
            file("output", "", ""),
            file("output", "./", "x.png"),
            file("models", "", "x.safetensors"),
            #[cfg(unix)]
            file("output", "link", "secret.txt"),
            #[cfg(unix)]
            file("output", "", "alias.txt"),
        ];
        let n = bad.len();
        let report = delete_job_files(
            &d.settings,
            &JobFiles {
                inputs: vec![file("input", "", "dir")],
                outputs: bad,
            },
        );
        assert_eq!(report.deleted, 0, "{report:?}");
        assert_eq!(report.refused + report.missing, n + 1, "{report:?}");
        assert!(d.base.join("outside/secret.txt").exists());
        assert!(d.base.join("input/dir/inner.png").exists());
        #[cfg(unix)]
        assert!(d.base.join("output/alias.txt").symlink_metadata().is_ok());
    }

    #[test]
    fn missing_folders_are_fine() {
        let settings = Housekeeping {
            input_dir: "/nonexistent/comfy-worker/input".into(),
            output_dir: "/nonexistent/comfy-worker/output".into(),
            ..Housekeeping::default()
        };
        let report = delete_job_files(
            &settings,
            &JobFiles {
                inputs: vec![file("input", "", "a.png")],
                outputs: vec![file("output", "", "b.png")],
            },
        );
        assert_eq!(report.missing, 2);
    }
}
