//! `WsEvent::parse` on arbitrary text frames, and the accessors the prompt watcher calls.
#![no_main]

use comfy_worker::comfy::messages::WsEvent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(event) = WsEvent::parse(text) {
        let _ = event.prompt_id();
        let _ = event.kind();
        if let WsEvent::ExecutionError(e) = &event {
            let _ = e.is_blocked_variant();
        }
        let _ = format!("{event:?}");
    }
});
