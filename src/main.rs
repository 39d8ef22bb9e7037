//! The `comfy-worker` binary; everything lives in the library.

fn main() -> std::process::ExitCode {
    comfy_worker::cli::main()
}
