//! `job::input::parse_input` on arbitrary bytes: as a JSON document (when it is one) and as the
//! string form of `input` (a JSON string holding the object). Must never panic.
#![no_main]

use comfy_worker::job::input::parse_input;
use comfy_worker::job::OutputOptions;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = serde_json::from_slice::<Value>(data) {
        let _ = parse_input(Some(&value));
        let _ = OutputOptions::parse(Some(&value));
    }
    let text = String::from_utf8_lossy(data).into_owned();
    let _ = parse_input(Some(&Value::String(text)));
});
