//! Output collection, in three steps:
//!
//! 1. [`select`]: which of the prompt's outputs to return (by kind, `input.output` options,
//!    temp files skipped unless asked for), plus the text outputs.
//! 2. [`Engine::fetch_files`]: fetch each selected file's bytes from `/view` into a
//!    [`CollectedFile`]; images a `SaveImageWebsocket` node sent over the socket
//!    ([`WebSocketImages`]) join them as collected files too.
//! 3. [`Engine::deliver_files`]: turn collected files into output entries, base64 inline or
//!    uploaded to the job's bucket (`s3_url`), as [`super::storage`] decides.
//!
//! Step 3 is the only place that decides how a file's bytes reach the client.

use std::collections::HashMap;

use futures_util::StreamExt;
use serde_json::Number;
use tracing::debug;

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tracing::warn;

use super::collected_file::{CollectedFile, FileBytes, WEBSOCKET_FOLDER};
use super::output::{OutputKind, OutputOptions, Outputs, TEXT_KIND};
use super::spooled_file::{Spool, SpooledFile};
use super::storage::{JobStorage, OverLimit};
use super::Engine;
use crate::comfy::{ComfyClient, ComfyError, FileKind, FileRef, NodeOutput, PromptEvent};
use crate::media_type::content_type_for;

/// Output files fetched from `/view` at once.
const FETCH_CONCURRENCY: usize = 4;

/// A file to fetch from `/view`.
#[derive(Debug, Clone, PartialEq)]
pub struct WantedFile {
    /// Where it goes in the output.
    pub kind: OutputKind,
    /// Where ComfyUI keeps it.
    pub file: FileRef,
    /// VideoHelperSuite's `format`.
    pub format: Option<String>,
    /// VideoHelperSuite's `frame_rate`.
    pub frame_rate: Option<Number>,
}

/// What [`select`] picked: files to fetch, in output order, and the text outputs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Selection {
    /// Files, in node order then entry order.
    pub files: Vec<WantedFile>,
    /// Text outputs, in node order.
    pub texts: Vec<String>,
}

/// The output kind of a ComfyUI file kind.
pub fn output_kind(kind: &FileKind) -> OutputKind {
    match kind {
        FileKind::Image => OutputKind::Images,
        FileKind::Video => OutputKind::Videos,
        FileKind::Audio => OutputKind::Audio,
        FileKind::Other(key) => OutputKind::other(key),
    }
}

/// Step 1: the files and texts to return, in ComfyUI's node order. Temp files are skipped
/// unless `include_temp`; kinds not in `kinds` are skipped.
pub fn select(outputs: &[NodeOutput], options: &OutputOptions) -> Selection {
    let mut selection = Selection::default();
    for node in outputs {
        for file in &node.files {
            let kind = output_kind(&file.kind);
            if (file.file.is_temp() && !options.include_temp) || !options.wants(kind.name()) {
                continue;
            }
            selection.files.push(WantedFile {
                kind,
                file: file.file.clone(),
                format: file.format.clone(),
                frame_rate: file.frame_rate.clone(),
            });
        }
        if options.wants(TEXT_KIND) {
            selection.texts.extend(node.texts.iter().cloned());
        }
    }
    selection
}

/// An output file `/view` did not give: a line in the result's `errors`.
#[derive(Debug, thiserror::Error)]
#[error(
    "Failed to fetch {} data for {filename} from /view endpoint: {error}",
    noun(.kind)
)]
pub struct ViewError {
    /// Where the file would have gone.
    pub kind: OutputKind,
    /// The file.
    pub filename: String,
    /// What ComfyUI's `/view` call gave.
    pub error: ComfyError,
}

fn noun(kind: &OutputKind) -> &'static str {
    match kind {
        OutputKind::Images => "image",
        OutputKind::Videos => "video",
        OutputKind::Audio => "audio",
        OutputKind::Other(_) => "output file",
    }
}

impl Engine {
    /// Step 2: fetches each wanted file's bytes from `/view` (a few at a time, results in the
    /// order given). A file that cannot be fetched becomes a line in `errors`.
    pub async fn fetch_files(
        &self,
        wanted: Vec<WantedFile>,
        errors: &mut Vec<String>,
    ) -> Vec<CollectedFile> {
        let fetched: Vec<Result<CollectedFile, ViewError>> = futures_util::stream::iter(wanted)
            .map(|wanted| {
                let comfy = self.comfy.clone();
                let spool = self.spool.clone();
                async move {
                    match fetch(&comfy, spool.as_ref(), &wanted.file).await {
                        Ok(bytes) => Ok(CollectedFile {
                            content_type: content_type_for(
                                &wanted.file.filename,
                                wanted.format.as_deref(),
                            ),
                            kind: wanted.kind,
                            filename: wanted.file.filename,
                            subfolder: wanted.file.subfolder,
                            folder_type: wanted.file.folder_type,
                            format: wanted.format,
                            frame_rate: wanted.frame_rate,
                            bytes,
                        }),
                        Err(error) => Err(ViewError {
                            kind: wanted.kind,
                            filename: wanted.file.filename,
                            error,
                        }),
                    }
                }
            })
            .buffered(FETCH_CONCURRENCY)
            .collect()
            .await;
        let mut files = Vec::with_capacity(fetched.len());
        for f in fetched {
            match f {
                Ok(file) => files.push(file),
                Err(e) => errors.push(e.to_string()),
            }
        }
        files
    }

    /// Step 3: turns collected files into output entries, in order, each under its kind, with
    /// the text outputs next to them.
    ///
    /// The job's [`JobStorage`] decides per file ([`JobStorage::place`]): base64 inline
    /// ([`base64_entry`]), or uploaded to the job's bucket and returned as an `s3_url` entry (a
    /// presigned URL in `data`, the same `content_type`/`format`/`frame_rate`): with
    /// `OUTPUT_UPLOAD=auto`, the largest files until the result fits `MAX_INLINE_OUTPUT_BYTES`
    /// (the texts and the `errors` so far count too), `always` every file, `never` none. A file
    /// whose upload fails is left out with `Error uploading {filename} to S3: {e}` in `errors`.
    /// `Err` is the job's error: the result is over the limit and there is no bucket to upload
    /// to (or uploads are off).
    pub async fn deliver_files(
        &self,
        storage: &JobStorage,
        files: Vec<CollectedFile>,
        texts: Vec<String>,
        errors: &mut Vec<String>,
    ) -> Result<Outputs, OverLimit> {
        let reserved = serde_json::to_vec(&texts).map_or(0, |t| t.len())
            + serde_json::to_vec(&*errors).map_or(0, |e| e.len());
        let kinds: Vec<OutputKind> = files.iter().map(|f| f.kind.clone()).collect();
        let placed = storage.place(files, reserved as u64).await?;
        let mut outputs = Outputs::default();
        for (kind, entry) in kinds.iter().zip(placed) {
            match entry {
                Ok(entry) => outputs.push(kind, entry),
                Err(e) => errors.push(e.to_string()),
            }
        }
        outputs.more.text = texts;
        Ok(outputs)
    }
}

/// One file from `/view`: streamed into a file of the spool when there is one (so the job's
/// outputs are not held in memory), else read into memory. A spool file that cannot be written
/// (a full disk) is logged and the file read into memory instead.
async fn fetch(
    comfy: &ComfyClient,
    spool: Option<&Arc<Spool>>,
    file: &FileRef,
) -> Result<FileBytes, ComfyError> {
    if let Some(spool) = spool {
        let path = spool.new_path();
        match spool_download(comfy, file, &path).await {
            Ok(len) => {
                return Ok(FileBytes::Spooled(Arc::new(SpooledFile::new(
                    spool.clone(),
                    path,
                    len,
                ))))
            }
            Err(failed) => {
                let _ = std::fs::remove_file(&path);
                match failed {
                    SpoolFailure::Comfy(e) => return Err(e),
                    SpoolFailure::Write(e) => warn!(
                        file = %file.filename,
                        error = %e,
                        "cannot write the output to the spool folder; reading it into memory"
                    ),
                }
            }
        }
    }
    comfy.view(file).await.map(FileBytes::Memory)
}

enum SpoolFailure {
    Comfy(ComfyError),
    Write(std::io::Error),
}

/// Streams `/view` into `path`; its length.
async fn spool_download(
    comfy: &ComfyClient,
    file: &FileRef,
    path: &std::path::Path,
) -> Result<u64, SpoolFailure> {
    let mut download = comfy
        .view_download(file)
        .await
        .map_err(SpoolFailure::Comfy)?;
    let mut out = tokio::fs::File::create(path)
        .await
        .map_err(SpoolFailure::Write)?;
    let mut len = 0u64;
    while let Some(chunk) = download.chunk().await.map_err(SpoolFailure::Comfy)? {
        out.write_all(&chunk).await.map_err(SpoolFailure::Write)?;
        len += chunk.len() as u64;
    }
    out.flush().await.map_err(SpoolFailure::Write)?;
    Ok(len)
}

/// Collects the images `SaveImageWebsocket` nodes send as binary frames while they run (one
/// full-size PNG per image; nothing reaches `/history`). Sampler previews of other nodes are
/// not outputs and are ignored.
#[derive(Debug, Default)]
pub struct WebSocketImages {
    /// The workflow's SaveImageWebsocket node ids.
    nodes: Vec<String>,
    /// Images per node so far, for file names.
    counts: HashMap<String, u32>,
    files: Vec<CollectedFile>,
    /// The node running, from `executing`.
    current: Option<String>,
    /// SaveImageWebsocket nodes seen to finish (another node started after them, or the end).
    finished: Vec<String>,
    /// Nodes that had not finished when the socket dropped: frames they sent meanwhile are lost.
    lost: Vec<String>,
}

impl WebSocketImages {
    /// A collector for these nodes (none: it collects nothing).
    pub fn new(nodes: Vec<String>) -> WebSocketImages {
        WebSocketImages {
            nodes,
            ..WebSocketImages::default()
        }
    }

    /// Looks at one event of the prompt.
    pub fn observe(&mut self, event: &PromptEvent) {
        if self.nodes.is_empty() {
            return;
        }
        match event {
            PromptEvent::Preview {
                node: Some(node),
                mime,
                data,
            } if self.nodes.iter().any(|n| n == node) => {
                let n = self.counts.entry(node.clone()).or_default();
                *n += 1;
                let filename = format!("ComfyUI_ws_{}_{:05}.{}", safe_name(node), n, ext(mime));
                debug!(%node, %filename, bytes = data.len(), "image received over the WebSocket");
                self.files.push(CollectedFile {
                    kind: OutputKind::Images,
                    content_type: content_type_for(&filename, Some(mime)),
                    filename,
                    subfolder: String::new(),
                    folder_type: WEBSOCKET_FOLDER.into(),
                    format: None,
                    frame_rate: None,
                    bytes: FileBytes::Memory(data.clone()),
                });
            }
            PromptEvent::Executing { node } => {
                self.end_current();
                self.current = Some(node.clone());
            }
            PromptEvent::Succeeded => self.end_current(),
            PromptEvent::ConnectionLost { .. } => {
                for node in &self.nodes {
                    if !self.finished.contains(node) && !self.lost.contains(node) {
                        self.lost.push(node.clone());
                    }
                }
            }
            _ => {}
        }
    }

    fn end_current(&mut self) {
        if let Some(node) = self.current.take() {
            if self.nodes.contains(&node) && !self.finished.contains(&node) {
                self.finished.push(node);
            }
        }
    }

    /// True when no image came.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The collected images, in arrival order, and a warning when the socket dropped before a
    /// SaveImageWebsocket node finished (images sent while it was down cannot be recovered: they
    /// never reach `/history`).
    pub fn finish(self) -> (Vec<CollectedFile>, Option<String>) {
        let warning = (!self.lost.is_empty()).then(|| {
            format!(
                "The ComfyUI WebSocket dropped before SaveImageWebsocket node(s) {} finished: images sent while it was down are missing",
                self.lost.join(", ")
            )
        });
        (self.files, warning)
    }
}

/// A node id usable in a file name (subgraph ids contain `:`).
fn safe_name(node: &str) -> String {
    node.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn ext(mime: &str) -> &'static str {
    match mime {
        "image/jpeg" => "jpg",
        "image/webp" => "webp",
        "image/png" => "png",
        _ => "bin",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comfy::OutputFile;
    use bytes::Bytes;

    fn file(key: &str, kind: FileKind, name: &str, folder: &str) -> OutputFile {
        OutputFile {
            key: key.into(),
            kind,
            file: FileRef {
                filename: name.into(),
                subfolder: String::new(),
                folder_type: folder.into(),
            },
            format: None,
            frame_rate: None,
        }
    }

    fn outputs() -> Vec<NodeOutput> {
        vec![
            NodeOutput {
                node_id: "3".into(),
                files: vec![
                    file("images", FileKind::Image, "a.png", "output"),
                    file("images", FileKind::Image, "t.png", "temp"),
                ],
                ..NodeOutput::default()
            },
            NodeOutput {
                node_id: "4".into(),
                files: vec![
                    file("gifs", FileKind::Video, "v.mp4", "output"),
                    file(
                        "latents",
                        FileKind::Other("latents".into()),
                        "l.latent",
                        "output",
                    ),
                ],
                texts: vec!["hello".into()],
                ..NodeOutput::default()
            },
        ]
    }

    fn names(s: &Selection) -> Vec<&str> {
        s.files.iter().map(|f| f.file.filename.as_str()).collect()
    }

    #[test]
    fn selects_by_kind_and_temp() {
        let all = select(&outputs(), &OutputOptions::default());
        assert_eq!(names(&all), ["a.png", "v.mp4", "l.latent"]);
        assert_eq!(all.texts, ["hello"]);
        assert_eq!(all.files[1].kind, OutputKind::Videos);
        let temp = select(
            &outputs(),
            &OutputOptions {
                include_temp: true,
                kinds: Some(vec!["images".into()]),
            },
        );
        assert_eq!(names(&temp), ["a.png", "t.png"]);
        assert!(temp.texts.is_empty());
        let some = select(
            &outputs(),
            &OutputOptions {
                include_temp: false,
                kinds: Some(vec!["latents".into(), "text".into()]),
            },
        );
        assert_eq!(names(&some), ["l.latent"]);
        assert_eq!(some.texts, ["hello"]);
    }

    #[test]
    fn websocket_images_only_from_their_nodes() {
        let mut ws = WebSocketImages::new(vec!["9".into(), "sub:2".into()]);
        let preview = |node: &str| PromptEvent::Preview {
            node: Some(node.into()),
            mime: "image/png",
            data: Bytes::from_static(b"\x89PNG"),
        };
        ws.observe(&preview("3"));
        ws.observe(&preview("9"));
        ws.observe(&preview("9"));
        ws.observe(&preview("sub:2"));
        let (files, warning) = ws.finish();
        let names: Vec<&str> = files.iter().map(|f| f.filename.as_str()).collect();
        assert_eq!(
            names,
            [
                "ComfyUI_ws_9_00001.png",
                "ComfyUI_ws_9_00002.png",
                "ComfyUI_ws_sub_2_00001.png"
            ]
        );
        assert_eq!(files[0].content_type, "image/png");
        assert_eq!(files[0].folder_type, WEBSOCKET_FOLDER);
        assert!(warning.is_none());
        let lost = || PromptEvent::ConnectionLost { reason: "x".into() };
        let executing = |node: &str| PromptEvent::Executing { node: node.into() };
        let mut ws = WebSocketImages::new(vec!["9".into(), "10".into()]);
        ws.observe(&executing("9"));
        ws.observe(&executing("3"));
        ws.observe(&lost());
        assert!(ws.finish().1.unwrap().contains("node(s) 10 finished"));
        let mut ws = WebSocketImages::new(vec!["9".into()]);
        ws.observe(&executing("9"));
        ws.observe(&PromptEvent::Succeeded);
        ws.observe(&lost());
        assert!(ws.finish().1.is_none(), "the node had finished");
        let mut none = WebSocketImages::new(Vec::new());
        none.observe(&lost());
        assert!(none.finish().1.is_none());
    }
}
