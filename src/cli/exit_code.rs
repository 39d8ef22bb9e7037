//! One exit-code table for every command, shown in `--help` and docs/cli.md.

use std::process::ExitCode;

/// The command did what it was asked (a server stopped by a signal after draining, too).
pub(crate) const SUCCESS: u8 = 0;
/// The job failed (or `health`: ComfyUI is unreachable or unhealthy; `watch`: the prompt failed).
pub(crate) const FAILED: u8 = 1;
/// A usage error or unreadable input: a bad flag, address, variable or file. Nothing ran.
pub(crate) const USAGE: u8 = 2;
/// Interrupted (Ctrl+C) before the work was done: 128 + SIGINT.
pub(crate) const INTERRUPTED: u8 = 130;
/// stdout was closed by its reader (`| head`): 128 + SIGPIPE, what a shell reports for tools
/// killed by it. Nothing more is printed.
pub(crate) const BROKEN_PIPE: u8 = 141;

/// The table, for `--help`.
pub(crate) const TABLE: &str = "\
Exit codes (every command):
  0    success (a server stopped by Ctrl+C or SIGTERM after draining, too)
  1    the job failed; health: ComfyUI unreachable; watch --submit: the prompt failed
  2    usage error or unreadable input (bad flag, address, variable or file); nothing ran
  130  interrupted by Ctrl+C before the work was done
  141  stdout was closed by its reader (e.g. `| head`); nothing more is printed";

/// `code` as an [`ExitCode`].
pub(crate) fn exit(code: u8) -> ExitCode {
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_every_code() {
        for code in [SUCCESS, FAILED, USAGE, INTERRUPTED, BROKEN_PIPE] {
            assert!(
                TABLE
                    .lines()
                    .any(|l| l.trim_start().starts_with(&format!("{code} "))),
                "{code} missing from the table"
            );
        }
    }
}
