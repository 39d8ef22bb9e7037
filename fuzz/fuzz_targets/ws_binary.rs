//! `BinaryFrame::parse` on arbitrary binary frames (bounds-checked lengths), and `image_mime`.
#![no_main]

use comfy_worker::comfy::messages::BinaryFrame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = BinaryFrame::parse(data) {
        let _ = frame.image_mime();
        match &frame {
            BinaryFrame::Preview { data: image, .. }
            | BinaryFrame::PreviewWithMetadata { data: image, .. } => {
                assert!(image.len() <= data.len());
            }
            BinaryFrame::Text { node_id, text } => {
                assert!(node_id.len() <= data.len());
                let _ = text.len();
            }
            BinaryFrame::Unknown { len, .. } => assert_eq!(*len + 4, data.len()),
        }
    }
});
