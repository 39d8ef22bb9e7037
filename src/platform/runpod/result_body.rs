//! A job-done body whose files are never copied: the JSON around the files is serialised (a
//! few hundred bytes), and each inline file's base64, moved out of the output as it is, is sent
//! between its pieces. The body's length is known before it is sent (`Content-Length`), and a
//! retry sends the same pieces again without copying them. The bytes are exactly those of
//! `serde_json::to_vec(&result_body(output.into_json(), stop_pod))`.

use bytes::Bytes;
use serde_json::Value;

use crate::job::output::result_body;
use crate::job::JobOutput;

/// A result body in pieces.
#[derive(Debug, Clone, Default)]
pub struct ResultBody {
    pieces: Vec<Bytes>,
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
    /// copied.
    pub fn build(mut output: JobOutput, stop_pod: bool) -> Result<ResultBody, serde_json::Error> {
        // A marker no serialised output can hold by chance: a fresh random id per body.
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let mut moved: Vec<(String, String)> = Vec::new();
        for (i, entry) in output.files_mut().into_iter().enumerate() {
            if entry.data.len() >= 64 && plain(&entry.data) {
                let marker = format!("cw{nonce}d{i}");
                let data = std::mem::replace(&mut entry.data, marker.clone());
                moved.push((marker, data));
            }
        }
        let skeleton = serde_json::to_vec(&result_body(output.into_json(), stop_pod))?;
        // Each marker appears once, inside its string's quotes; cut there, in body order.
        let mut cuts: Vec<(usize, usize, String)> = moved
            .into_iter()
            .filter_map(|(marker, data)| {
                find(&skeleton, marker.as_bytes()).map(|at| (at, marker.len(), data))
            })
            .collect();
        cuts.sort_by_key(|c| c.0);
        let skeleton = Bytes::from(skeleton);
        let mut pieces = Vec::with_capacity(cuts.len() * 2 + 1);
        let mut from = 0;
        for (at, marker_len, data) in cuts {
            pieces.push(skeleton.slice(from..at));
            pieces.push(Bytes::from(data.into_bytes()));
            from = at + marker_len;
        }
        pieces.push(skeleton.slice(from..));
        Ok(ResultBody::from_pieces(pieces))
    }

    /// A body already serialised (a spooled result, a short error).
    pub fn from_bytes(bytes: impl Into<Bytes>) -> ResultBody {
        ResultBody::from_pieces(vec![bytes.into()])
    }

    /// `value` serialised.
    pub fn from_json(value: &Value) -> Result<ResultBody, serde_json::Error> {
        Ok(ResultBody::from_bytes(serde_json::to_vec(value)?))
    }

    fn from_pieces(pieces: Vec<Bytes>) -> ResultBody {
        let pieces: Vec<Bytes> = pieces.into_iter().filter(|p| !p.is_empty()).collect();
        let len = pieces.iter().map(Bytes::len).sum();
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
        self.pieces
            .last()
            .is_some_and(|tail| find(tail, br#""stopPod":true}"#).is_some())
    }

    /// The body for a request: its pieces in order, nothing copied.
    pub fn to_body(&self) -> reqwest::Body {
        if let [one] = self.pieces.as_slice() {
            return reqwest::Body::from(one.clone());
        }
        let pieces = self.pieces.clone();
        reqwest::Body::wrap_stream(futures_util::stream::iter(
            pieces
                .into_iter()
                .map(Ok::<Bytes, std::convert::Infallible>),
        ))
    }

    /// The whole body in one buffer (for the spool; a copy).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for p in &self.pieces {
            out.extend_from_slice(p);
        }
        out
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
            data,
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
            assert_eq!(body.to_vec(), want);
            assert_eq!(body.len(), want.len());
            assert_eq!(body.pieces.len(), 5, "two files moved out");
            assert_eq!(body.stops_pod(), stop);
        }
        let failed = JobOutput::error("boom");
        let want = serde_json::to_vec(&result_body(failed.clone().into_json(), false)).unwrap();
        assert_eq!(ResultBody::build(failed, false).unwrap().to_vec(), want);
    }
}
