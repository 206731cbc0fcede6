//! [`NatsServer`]: a nats-server of a test's own, on a free loopback port with JetStream in a
//! directory of its own, that the test can kill and start again. The shared server on 4222
//! must not be restarted by a test: other tests and other users run on it.

use std::{process::Command, time::Duration};

use super::{
    server_process::{find_bin, ServerProcess, TestServer},
    Servers,
};

/// How long a started server gets to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A private `nats-server -js` process. Dropping it kills the process and removes its
/// directory, so a failing test leaves neither behind.
pub struct NatsServer {
    process: ServerProcess,
}

impl NatsServer {
    /// The URL clients connect to.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.process.port())
    }
}

impl TestServer for NatsServer {
    async fn start() -> anyhow::Result<Self> {
        let mut server = Self {
            process: ServerProcess::new("nats", "-KILL")?,
        };
        server.restart().await?;
        Ok(server)
    }

    fn servers(&self) -> Servers {
        Servers {
            nats: self.url(),
            ..Servers::default()
        }
    }

    /// SIGKILL: no shutdown, no flush. What it had written stays in its directory.
    async fn crash(&mut self) {
        self.process.crash().await;
    }

    async fn restart(&mut self) -> anyhow::Result<()> {
        let bin = find_bin("nats-server")?;
        let mut command = Command::new(bin);
        command
            .args(["-a", "127.0.0.1", "-p", &self.process.port().to_string()])
            .args(["-js", "-sd"])
            .arg(self.process.dir());
        self.process.start(command, START_TIMEOUT).await
    }
}
