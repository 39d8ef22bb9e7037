//! Writing to stdout and stderr without panicking when the reader went away: `println!` and
//! `eprintln!` panic on a closed pipe (`comfy-worker run | head -c 10`). A closed stdout ends
//! the command quietly with [`BROKEN_PIPE`](super::exit_code::BROKEN_PIPE), as a tool killed by
//! SIGPIPE would; a closed stderr is ignored (there is nowhere left to say anything).

use std::io::{ErrorKind, Write};

use super::exit_code::BROKEN_PIPE;

/// Writes `text` and a newline to stdout; a closed stdout ends the process quietly.
pub(crate) fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
    if let Err(e) = written {
        if e.kind() == ErrorKind::BrokenPipe {
            std::process::exit(BROKEN_PIPE.into());
        }
    }
}

/// Writes `text` and a newline to stderr, ignoring a closed stderr.
pub(crate) fn err(text: &str) {
    let mut stderr = std::io::stderr().lock();
    let _ = stderr
        .write_all(text.as_bytes())
        .and_then(|()| stderr.write_all(b"\n"));
}

/// `comfy-worker <command>: <message>` on stderr: how every command reports an error, once.
pub(crate) fn error(command: &str, message: &dyn std::fmt::Display) {
    if command.is_empty() {
        err(&format!("comfy-worker: {message}"));
    } else {
        err(&format!("comfy-worker {command}: {message}"));
    }
}
