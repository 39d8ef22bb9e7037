//! UI-format workflows (`UiWorkflow::from_map` and the conversion with the recorded
//! `/object_info`): arbitrary bytes as a workflow document. Neither may panic, and whatever
//! converts must be an API-format workflow the engine accepts.
#![no_main]

use std::sync::OnceLock;

use comfy_worker::comfy::{ConvertOptions, ObjectInfo, UiWorkflow, Workflow};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn object_info() -> &'static ObjectInfo {
    static INFO: OnceLock<ObjectInfo> = OnceLock::new();
    INFO.get_or_init(|| {
        let text = include_str!("../../crates/comfy-sim/assets/object_info.json");
        ObjectInfo::from_value(serde_json::from_str(text).expect("recorded object_info"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let Ok(ui) = UiWorkflow::from_map(&map) else {
        return;
    };
    if let Ok(api) = ui.convert_with(object_info(), &ConvertOptions { seed: Some(1) }) {
        assert!(!api.is_empty());
        Workflow::from_value(Value::Object(api)).expect("a converted workflow is valid");
    }
});
