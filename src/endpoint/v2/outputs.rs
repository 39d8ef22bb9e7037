//! A v2 job's outputs, committed as each node finishes: the node's files are fetched from
//! ComfyUI's `/view` (its texts taken as they are), hashed and stored as assets, and each one
//! published at once, in node order, by one task per job. The job's end waits for it, so every
//! output is in the job (and on its event stream) before its terminal status.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::warn;

use super::assets::AssetStore;
use super::job_record::V2Output;
use crate::comfy::{ComfyClient, FileKind, NodeOutput, OutputFile};
use crate::media_type::content_type_for;

/// What the collector hands back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Collected {
    /// An output, stored.
    Output(V2Output),
    /// Something worth a `log` event (an output that could not be fetched).
    Log {
        level: &'static str,
        message: String,
    },
}

/// Where collected outputs go (the job store).
pub(crate) type Publish = Box<dyn Fn(Collected) + Send + Sync>;

/// One job's output collector.
pub(crate) struct OutputCollector {
    tx: mpsc::UnboundedSender<NodeOutput>,
    task: tokio::task::JoinHandle<()>,
}

impl OutputCollector {
    /// Starts the job's collector task.
    pub(crate) fn start(
        job_id: String,
        comfy: ComfyClient,
        assets: Option<Arc<AssetStore>>,
        publish: Publish,
    ) -> OutputCollector {
        let (tx, mut rx) = mpsc::unbounded_channel::<NodeOutput>();
        let task = tokio::spawn(async move {
            while let Some(node) = rx.recv().await {
                collect_node(&job_id, &comfy, assets.as_deref(), &publish, node).await;
            }
        });
        OutputCollector { tx, task }
    }

    /// A node finished with these outputs (never blocks).
    pub(crate) fn push(&self, output: NodeOutput) {
        let _ = self.tx.send(output);
    }

    /// Waits (at most `bound`) until every output pushed so far is committed.
    pub(crate) async fn finish(self, bound: Duration) {
        let OutputCollector { tx, mut task } = self;
        drop(tx);
        if tokio::time::timeout(bound, &mut task).await.is_err() {
            warn!("storing the job's outputs took too long; the job ends without the rest");
            task.abort();
        }
    }
}

async fn collect_node(
    job_id: &str,
    comfy: &ComfyClient,
    assets: Option<&AssetStore>,
    publish: &Publish,
    node: NodeOutput,
) {
    let Some(assets) = assets else {
        publish(Collected::Log {
            level: "warning",
            message: format!(
                "node {}: outputs not stored (the asset store is unavailable)",
                node.node_id
            ),
        });
        return;
    };
    for file in &node.files {
        let name = file.file.filename.clone();
        let bytes = match comfy.view(&file.file).await {
            Ok(b) => b,
            Err(e) => {
                warn!(node = %node.node_id, file = %name, error = %e, "could not fetch an output");
                publish(Collected::Log {
                    level: "warning",
                    message: format!("node {}: could not fetch {name}: {e}", node.node_id),
                });
                continue;
            }
        };
        let content_type = content_type_for(&name, file.format.as_deref());
        let kind = output_type(file, &content_type);
        store(
            job_id,
            assets,
            publish,
            &node.node_id,
            name,
            kind,
            content_type,
            &bytes,
        )
        .await;
    }
    for (i, text) in node.texts.iter().enumerate() {
        let name = format!("{}_text_{}.txt", node.node_id, i + 1);
        let content_type = "text/plain; charset=utf-8".to_owned();
        store(
            job_id,
            assets,
            publish,
            &node.node_id,
            name,
            "text",
            content_type,
            text.as_bytes(),
        )
        .await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn store(
    job_id: &str,
    assets: &AssetStore,
    publish: &Publish,
    node_id: &str,
    name: String,
    kind: &'static str,
    content_type: String,
    bytes: &[u8],
) {
    match assets
        .add_output(job_id, bytes, content_type.clone(), name.clone())
        .await
    {
        Ok(record) => publish(Collected::Output(V2Output {
            node_id: node_id.to_owned(),
            name,
            kind,
            content_type,
            size: record.size,
            asset_id: record.id,
            hash_hex: record.hash_hex,
            job_id: job_id.to_owned(),
        })),
        Err(e) => {
            warn!(node = %node_id, file = %name, error = %e, "could not store an output");
            publish(Collected::Log {
                level: "warning",
                message: format!("node {node_id}: could not store {name}: {e}"),
            });
        }
    }
}

/// The contract's output type: from the key ComfyUI listed the file under, refined by its
/// media type (ComfyUI lists SaveVideo's mp4 under `images`).
fn output_type(file: &OutputFile, content_type: &str) -> &'static str {
    let by_media = |fallback: &'static str| {
        if content_type.starts_with("video/") {
            "video"
        } else if content_type.starts_with("audio/") {
            "audio"
        } else if content_type.starts_with("image/") {
            "image"
        } else {
            fallback
        }
    };
    match &file.kind {
        FileKind::Image => by_media("image"),
        FileKind::Video => "video",
        FileKind::Audio => "audio",
        FileKind::Other(key) if key.starts_with("latent") => "latent",
        FileKind::Other(_) => by_media("file"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comfy::FileRef;

    fn file(kind: FileKind, name: &str) -> OutputFile {
        OutputFile {
            key: String::new(),
            kind,
            file: FileRef {
                filename: name.into(),
                subfolder: String::new(),
                folder_type: "output".into(),
            },
            format: None,
            frame_rate: None,
        }
    }

    #[test]
    fn output_types_follow_the_key_and_the_media_type() {
        let t = |kind, name: &str| output_type(&file(kind, name), &content_type_for(name, None));
        assert_eq!(t(FileKind::Image, "a.png"), "image");
        assert_eq!(t(FileKind::Image, "a.mp4"), "video");
        assert_eq!(t(FileKind::Video, "a.gif"), "video");
        assert_eq!(t(FileKind::Audio, "a.flac"), "audio");
        assert_eq!(t(FileKind::Other("latents".into()), "a.latent"), "latent");
        assert_eq!(t(FileKind::Other("3d".into()), "a.glb"), "file");
    }
}
