//! [`RedisServer`]: a redis-server of a test's own, on a free loopback port, that the test can
//! kill and start again. It keeps nothing on disk (as the shared server on this kind of
//! machine), so a restart is also Redis losing all its data. The shared server on 6379 must
//! not be restarted by a test.

use std::{process::Command, time::Duration};

use super::{
    server_process::{find_bin, ServerProcess, TestServer},
    Servers,
};

/// How long a started server gets to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A private `redis-server` process without persistence. Dropping it kills the process and
/// removes its directory.
pub struct RedisServer {
    process: ServerProcess,
}

impl RedisServer {
    /// The URL clients connect to.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.process.port())
    }
}

impl TestServer for RedisServer {
    async fn start() -> anyhow::Result<Self> {
        let mut server = Self {
            process: ServerProcess::new("redis", "-KILL")?,
        };
        server.restart().await?;
        Ok(server)
    }

    fn servers(&self) -> Servers {
        Servers {
            redis: self.url(),
            ..Servers::default()
        }
    }

    /// SIGKILL: its data is gone, and it comes back empty.
    async fn crash(&mut self) {
        self.process.crash().await;
    }

    async fn restart(&mut self) -> anyhow::Result<()> {
        let bin = find_bin("redis-server")?;
        let mut command = Command::new(bin);
        command
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.process.port().to_string())
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
            ])
            .arg(self.process.dir());
        self.process.start(command, START_TIMEOUT).await
    }
}
