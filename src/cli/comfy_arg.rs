//! `--comfy ADDR` (alias `--comfy-host`): how every subcommand names the ComfyUI it talks to,
//! with one help text and one default.

use clap::Args;

use crate::comfy_address::ComfyAddress;
use crate::config::Settings;

/// The ComfyUI address option.
#[derive(Debug, Clone, Default, Args)]
pub struct ComfyArg {
    /// ComfyUI's address: HOST:PORT or http(s)://HOST[:PORT] [env: COMFY_HOST] [default:
    /// 127.0.0.1:8188].
    #[arg(
        long = "comfy",
        visible_alias = "comfy-host",
        value_name = "ADDR",
        value_parser = ComfyAddress::parse,
    )]
    pub comfy: Option<ComfyAddress>,
}

impl ComfyArg {
    /// Points `settings` at the address given on the command line, if one was. A ComfyUI named
    /// there is not necessarily the one the start script's PID file describes, so that file
    /// then no longer decides how long to wait for it.
    pub(crate) fn apply(&self, settings: &mut Settings) {
        if let Some(address) = &self.comfy {
            settings.use_only(address.clone());
        }
    }
}

#[cfg(test)]
impl ComfyArg {
    /// The address given, as messages show it.
    pub(crate) fn shown(&self) -> Option<String> {
        self.comfy.as_ref().map(ComfyAddress::shown)
    }
}
