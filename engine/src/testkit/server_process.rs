//! What [`NatsServer`](super::NatsServer) and [`PgServer`](super::PgServer) share: a free
//! loopback port, a directory of their own, and waiting for a started server to listen.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use tokio::net::TcpStream;

/// A port of 127.0.0.1 free right now, and a new directory under the system's temp dir
/// named after `what`, this process and the port.
pub(super) fn port_and_dir(what: &str) -> anyhow::Result<(u16, PathBuf)> {
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    let dir = std::env::temp_dir().join(format!("herald-{what}-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok((port, dir))
}

/// Waits until something accepts connections on `port`, or fails when `child` exits first
/// (clearing it) or `timeout` passes.
pub(super) async fn wait_listening(
    what: &str,
    child: &mut Option<Child>,
    port: u16,
    timeout: Duration,
) -> anyhow::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let started = Instant::now();
    while started.elapsed() < timeout {
        if let Some(c) = child.as_mut() {
            if let Some(status) = c.try_wait()? {
                *child = None;
                bail!("{what} on port {port} exited at start: {status}");
            }
        }
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("{what} on port {port} did not listen within {timeout:?}")
}
