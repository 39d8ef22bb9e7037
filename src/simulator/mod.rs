//! Placeholder for the ComfyUI simulator (being written on the `sim` branch).
#![allow(missing_docs, clippy::todo, unused_variables)]

use std::net::SocketAddr;
use std::time::Duration;

pub struct SimConfig {
    pub step_delay: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            step_delay: Duration::from_millis(50),
        }
    }
}

pub struct Simulator {
    addr: SocketAddr,
}

impl Simulator {
    pub async fn start(
        listener: tokio::net::TcpListener,
        config: SimConfig,
    ) -> std::io::Result<Simulator> {
        Ok(Simulator {
            addr: listener.local_addr()?,
        })
    }
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn host(&self) -> String {
        self.addr.to_string()
    }
    pub async fn shutdown(self) {}
}

pub async fn serve(
    addr: SocketAddr,
    config: SimConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    shutdown.await;
    Ok(())
}
