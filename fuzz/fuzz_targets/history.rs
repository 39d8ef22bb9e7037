//! The `/history` parser (`HistoryEntry::parse`, behind `ComfyClient::history`): arbitrary
//! bytes as a `/history/{id}` reply, and structured values leaning towards its shape.
#![no_main]

mod json_gen;

use arbitrary::Unstructured;
use comfy_worker::comfy::HistoryEntry;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

fn parse_reply(reply: &Value) {
    if let Value::Object(entries) = reply {
        for entry in entries.values() {
            let parsed = HistoryEntry::parse(entry);
            for node in &parsed.outputs {
                for file in &node.files {
                    assert!(!file.file.filename.is_empty());
                }
            }
        }
    }
    let _ = HistoryEntry::parse(reply);
}

fuzz_target!(|data: &[u8]| {
    if data.first() == Some(&b'{') {
        if let Ok(reply) = serde_json::from_slice::<Value>(data) {
            parse_reply(&reply);
        }
        return;
    }
    let mut u = Unstructured::new(data);
    let Ok(outputs) = json_gen::value(&mut u, 5) else {
        return;
    };
    let Ok(messages) = json_gen::value(&mut u, 4) else {
        return;
    };
    let entry = json!({
        "prompt": [0, "p", {}, {}, []],
        "outputs": outputs,
        "status": {"status_str": "success", "completed": true, "messages": messages},
    });
    parse_reply(&json!({ "p": entry }));
});
