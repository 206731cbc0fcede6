//! [`NatsServer`]: a nats-server of a test's own, on a free loopback port with JetStream in a
//! directory of its own, that the test can kill and start again. The shared server on 4222
//! must not be restarted by a test: other tests and other users run on it.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Context;

use super::server_process::{port_and_dir, wait_listening};

/// How long a started server gets to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A private `nats-server -js` process. Dropping it kills the process and removes its
/// directory, so a failing test leaves neither behind.
pub struct NatsServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server on a free port of 127.0.0.1, with JetStream storing under a new
    /// directory in the system's temp dir.
    pub async fn start() -> anyhow::Result<Self> {
        let (port, dir) = port_and_dir("nats")?;
        let mut server = Self {
            port,
            dir,
            child: None,
        };
        server.restart().await?;
        Ok(server)
    }

    /// The URL clients connect to.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server with SIGKILL (no shutdown, no flush) and waits for it to exit. What it
    /// had written stays in its directory, as after a crash of the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again (killing it first if it runs) on the same port and directory,
    /// and waits until it accepts connections.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let bin = find_bin().context(
            "nats-server not found on PATH or in /usr/sbin; scripts/services.sh installs it",
        )?;
        let child = Command::new(&bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.child = Some(child);
        let listening =
            wait_listening("nats-server", &mut self.child, self.port, START_TIMEOUT).await;
        if listening.is_err() {
            self.kill();
        }
        listening
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// nats-server on PATH, or where Debian puts it (`/usr/sbin`, not on a user's PATH).
fn find_bin() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/local/bin"].map(PathBuf::from))
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}
