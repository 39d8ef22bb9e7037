//! `job::input::parse_input` and `OutputOptions::parse` on arbitrary JSON values (structured,
//! leaning towards the job schema). Neither may panic, and every accepted input file must name
//! a plain relative path inside ComfyUI's folder.
#![no_main]

mod json_gen;

use arbitrary::Unstructured;
use comfy_worker::job::input::{check_image_name, check_subfolder, parse_input};
use comfy_worker::job::OutputOptions;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

fn check_accepted(value: &Value) {
    let _ = OutputOptions::parse(Some(value));
    if let Ok(input) = parse_input(Some(value)) {
        for file in &input.files {
            assert!(check_image_name(&file.name).is_ok(), "{:?}", file.name);
            assert_eq!(
                check_subfolder(&file.subfolder).as_deref(),
                Ok(file.subfolder.as_str())
            );
            let path = if file.subfolder.is_empty() {
                file.name.clone()
            } else {
                format!("{}/{}", file.subfolder, file.name)
            };
            assert!(
                !path.starts_with('/') && !path.contains('\\') && !path.contains('\0'),
                "{path:?}"
            );
            assert!(
                path.split('/')
                    .all(|seg| !seg.is_empty() && seg != "." && seg != ".."),
                "{path:?}"
            );
            if let Some(r) = &file.original_ref {
                assert!(check_image_name(&r.filename).is_ok(), "{:?}", r.filename);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(value) = json_gen::value(&mut u, 6) else {
        return;
    };
    check_accepted(&value);
    // The same value as the job's `input`, wrapped the way front ends see it, and as a string.
    if let Value::Object(_) = value {
        check_accepted(&Value::String(value.to_string()));
    }
    // Inside a valid workflow, so the file items are reached whatever the fuzzer made.
    let wrapped = json!({
        "workflow": {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}},
        "images": value.clone(),
        "output": value,
    });
    check_accepted(&wrapped);
});
