//! A child process of a benchmark (the worker, a `simulate-comfyui`), killed and reaped when
//! dropped, so a panicking run leaves nothing behind.

use std::process::Child;

/// The process; killed when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
