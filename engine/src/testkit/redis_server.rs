//! [`RedisServer`]: a redis-server of a test's own, on a free loopback port, that the test can
//! kill and start again. It keeps nothing on disk (as the shared server on this kind of
//! machine), so a restart is also Redis losing all its data. The shared server on 6379 must
//! not be restarted by a test.

use std::{process::Command, time::Duration};

use anyhow::Context;

use super::server_process::{find_bin, ServerProcess};

/// How long a started server gets to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A private `redis-server` process without persistence. Dropping it kills the process and
/// removes its directory.
pub struct RedisServer {
    process: ServerProcess,
}

impl RedisServer {
    /// Starts a server on a free port of 127.0.0.1, working in a new directory in the
    /// system's temp dir.
    pub async fn start() -> anyhow::Result<Self> {
        let mut server = Self {
            process: ServerProcess::new("redis", "-KILL")?,
        };
        server.restart().await?;
        Ok(server)
    }

    /// The URL clients connect to.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.process.port())
    }

    /// Kills the server with SIGKILL and waits for it to exit; its data is gone.
    pub fn kill(&mut self) {
        self.process.crash();
    }

    /// Starts the server again, empty (killing it first if it runs), on the same port, and
    /// waits until it accepts connections.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let bin = find_bin("redis-server").context(
            "redis-server not found on PATH or in /usr/bin; scripts/services.sh installs it",
        )?;
        let mut command = Command::new(bin);
        command
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.process.port().to_string(),
            ])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.process.dir());
        self.process.start(command, START_TIMEOUT).await
    }
}
