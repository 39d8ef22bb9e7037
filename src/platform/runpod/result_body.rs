//! A job-done body whose files are never copied: the JSON around the files is serialised (a
//! few hundred bytes), and each inline file's base64 is sent between its pieces: moved out of
//! the output as it is, or, for an output the engine kept in its spool folder, read from the
//! file and encoded chunk by chunk as the body is sent (the file is never held whole in memory,
//! nor its base64). The body's length is known before it is sent (`Content-Length`, from the
//! files' sizes), and a retry sends the same pieces again. The bytes are exactly those of
//! `serde_json::to_vec(&result_body(output.into_json(), stop_pod))`.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};
use serde_json::Value;
use tokio::io::AsyncReadExt;

use crate::job::codec;
use crate::job::output::result_body;
use crate::job::spooled_file::SpooledFile;
use crate::job::{FileData, JobOutput};

/// Raw bytes per encoded chunk of a spooled file: a multiple of 3, so no chunk but the last
/// has base64 padding.
const CHUNK: usize = 3 * 21_846;

/// One piece of a body.
#[derive(Debug, Clone)]
enum Piece {
    /// Bytes sent as they are.
    Bytes(Bytes),
    /// The base64 of a spooled file, encoded as it is sent.
    Base64Of(Arc<SpooledFile>),
}

impl Piece {
    fn len(&self) -> usize {
        match self {
            Piece::Bytes(b) => b.len(),
            Piece::Base64Of(f) => codec::encoded_len(f.len()) as usize,
        }
    }

    /// The piece as a stream of chunks.
    fn chunks(self) -> BoxStream<'static, std::io::Result<Bytes>> {
        match self {
            Piece::Bytes(b) => stream::once(async move { Ok(b) }).boxed(),
            Piece::Base64Of(file) => stream::try_unfold(
                (file, None::<tokio::fs::File>, 0u64),
                |(file, open, done)| async move {
                    if done >= file.len() {
                        return Ok(None);
                    }
                    let mut handle = match open {
                        Some(h) => h,
                        None => tokio::fs::File::open(file.path()).await?,
                    };
                    let want = (file.len() - done).min(CHUNK as u64) as usize;
                    let mut raw = vec![0u8; want];
                    handle.read_exact(&mut raw).await?;
                    let mut text = String::with_capacity(codec::encoded_len(want as u64) as usize);
                    codec::encode_into(&raw, &mut text);
                    Ok(Some((
                        Bytes::from(text.into_bytes()),
                        (file, Some(handle), done + want as u64),
                    )))
                },
            )
            .boxed(),
        }
    }
}

/// A result body in pieces.
#[derive(Debug, Clone, Default)]
pub struct ResultBody {
    pieces: Vec<Piece>,
    len: usize,
}

/// Whether `data` can stand in a JSON string as it is (base64's alphabet): only such data is
/// moved out; anything else stays in the serialised JSON, escaped by serde.
fn plain(data: &str) -> bool {
    data.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_'))
}

impl ResultBody {
    /// The body for `output` (`"stopPod": true` with `stop_pod`), its files' data moved, not
    /// copied, and spooled files left on disk until they are sent.
    pub fn build(mut output: JobOutput, stop_pod: bool) -> Result<ResultBody, serde_json::Error> {
        // A marker no serialised output can hold by chance: a fresh random id per body.
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let mut moved: Vec<(String, Piece)> = Vec::new();
        for (i, entry) in output.files_mut().into_iter().enumerate() {
            let movable = match &entry.data {
                FileData::Text(t) => t.len() >= 64 && plain(t),
                FileData::Base64Of(_) => true,
            };
            if movable {
                let marker = format!("cw{nonce}d{i}");
                let data = std::mem::replace(&mut entry.data, FileData::Text(marker.clone()));
                let piece = match data {
                    FileData::Text(t) => Piece::Bytes(Bytes::from(t.into_bytes())),
                    FileData::Base64Of(file) => Piece::Base64Of(file),
                };
                moved.push((marker, piece));
            }
        }
        let skeleton = serde_json::to_vec(&result_body(output.into_json(), stop_pod))?;
        // Each marker appears once, inside its string's quotes; cut there, in body order.
        let mut cuts: Vec<(usize, usize, Piece)> = moved
            .into_iter()
            .filter_map(|(marker, piece)| {
                find(&skeleton, marker.as_bytes()).map(|at| (at, marker.len(), piece))
            })
            .collect();
        cuts.sort_by_key(|c| c.0);
        let skeleton = Bytes::from(skeleton);
        let mut pieces = Vec::with_capacity(cuts.len() * 2 + 1);
        let mut from = 0;
        for (at, marker_len, piece) in cuts {
            pieces.push(Piece::Bytes(skeleton.slice(from..at)));
            pieces.push(piece);
            from = at + marker_len;
        }
        pieces.push(Piece::Bytes(skeleton.slice(from..)));
        Ok(ResultBody::from_pieces(pieces))
    }

    /// A body already serialised (a spooled result, a short error).
    pub fn from_bytes(bytes: impl Into<Bytes>) -> ResultBody {
        ResultBody::from_pieces(vec![Piece::Bytes(bytes.into())])
    }

    /// `value` serialised.
    pub fn from_json(value: &Value) -> Result<ResultBody, serde_json::Error> {
        Ok(ResultBody::from_bytes(serde_json::to_vec(value)?))
    }

    fn from_pieces(pieces: Vec<Piece>) -> ResultBody {
        let pieces: Vec<Piece> = pieces.into_iter().filter(|p| p.len() > 0).collect();
        let len = pieces.iter().map(Piece::len).sum();
        ResultBody { pieces, len }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `"stopPod": true` ends the body (the skeleton's tail holds it).
    pub fn stops_pod(&self) -> bool {
        matches!(self.pieces.last(), Some(Piece::Bytes(tail)) if find(tail, br#""stopPod":true}"#).is_some())
    }

    /// The body for a request: its pieces in order, nothing copied; spooled files read and
    /// encoded a chunk at a time.
    pub fn to_body(&self) -> reqwest::Body {
        if let [Piece::Bytes(one)] = self.pieces.as_slice() {
            return reqwest::Body::from(one.clone());
        }
        let pieces = self.pieces.clone();
        reqwest::Body::wrap_stream(stream::iter(pieces).flat_map(Piece::chunks))
    }

    /// The whole body in one buffer (for the result spool; a copy, spooled files read now).
    pub fn to_vec(&self) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.len);
        for p in &self.pieces {
            match p {
                Piece::Bytes(b) => out.extend_from_slice(b),
                Piece::Base64Of(file) => {
                    out.extend_from_slice(codec::encode(&file.read_all_blocking()?).as_bytes())
                }
            }
        }
        Ok(out)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::output::FileEntry;
    use crate::job::Completed;

    fn entry(name: &str, data: String) -> FileEntry {
        FileEntry {
            filename: name.into(),
            kind: "base64".into(),
            data: data.into(),
            content_type: "image/png".into(),
            format: None,
            frame_rate: None,
        }
    }

    #[test]
    fn the_pieces_are_the_bytes_of_the_json_body() {
        let a = "QUJD".repeat(40);
        let b = "RA==".repeat(30);
        let completed = Completed::from_parts(
            vec![entry("a.png", a.clone()), entry("b \"q\".png", b.clone())],
            vec!["a warning with \"quotes\"".into()],
        )
        .unwrap();
        for stop in [false, true] {
            let output = JobOutput::from(completed.clone());
            let want = serde_json::to_vec(&result_body(output.clone().into_json(), stop)).unwrap();
            let body = ResultBody::build(output, stop).unwrap();
            assert_eq!(body.to_vec().unwrap(), want);
            assert_eq!(body.len(), want.len());
            assert_eq!(body.pieces.len(), 5, "two files moved out");
            assert_eq!(body.stops_pod(), stop);
        }
        let failed = JobOutput::error("boom");
        let want = serde_json::to_vec(&result_body(failed.clone().into_json(), false)).unwrap();
        assert_eq!(
            ResultBody::build(failed, false).unwrap().to_vec().unwrap(),
            want
        );
    }

    #[tokio::test]
    async fn a_spooled_file_is_encoded_into_the_body_as_it_is_sent() {
        use crate::job::spooled_file::{Spool, SpooledFile};
        use futures_util::TryStreamExt;
        let spool = Spool::create().unwrap();
        // Over two chunks, and not a multiple of 3 (padding at the very end only).
        let raw: Vec<u8> = (0..(2 * CHUNK + 7)).map(|i| (i * 31 % 251) as u8).collect();
        let path = spool.new_path();
        std::fs::write(&path, &raw).unwrap();
        let file = Arc::new(SpooledFile::new(
            spool.clone(),
            path.clone(),
            raw.len() as u64,
        ));
        let mut spooled = entry("big.png", String::new());
        spooled.data = FileData::Base64Of(file);
        let completed =
            Completed::from_parts(vec![spooled, entry("small.png", "QUJD".repeat(40))], vec![])
                .unwrap();
        let output = JobOutput::from(completed);
        let want = serde_json::to_vec(&result_body(output.clone().into_json(), false)).unwrap();
        assert!(want
            .windows(8)
            .any(|w| w == &codec::encode(&raw).as_bytes()[..8]));
        let body = ResultBody::build(output, false).unwrap();
        assert_eq!(
            body.len(),
            want.len(),
            "the length is known before reading the file"
        );
        assert_eq!(body.to_vec().unwrap(), want);
        let streamed: Vec<Bytes> = stream::iter(body.pieces.clone())
            .flat_map(Piece::chunks)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(streamed.concat(), want);
        assert!(
            streamed
                .iter()
                .all(|c| c.len() <= codec::encoded_len(CHUNK as u64) as usize),
            "the file is read and encoded a chunk at a time"
        );
        drop(body);
        assert!(
            !path.exists(),
            "the file goes with the last piece holding it"
        );
    }
}
