//! What [`NatsServer`](super::NatsServer), [`PgServer`](super::PgServer) and
//! [`RedisServer`](super::RedisServer) share: the [`TestServer`] interface, and a process on
//! a free loopback port with a directory of its own, started and waited for until it
//! listens, stopped with the signal that server takes as a crash, and removed with its
//! directory when dropped.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use tokio::net::TcpStream;

use super::Servers;

/// A server of a test's own, to take down and bring back in the middle of a test.
pub trait TestServer: Sized {
    /// Starts a new one on a free port of 127.0.0.1, with its data in a new directory under
    /// the system's temp dir, and waits until it accepts connections.
    fn start() -> impl std::future::Future<Output = anyhow::Result<Self>> + Send;

    /// The shared servers, with this one in the place of its kind.
    fn servers(&self) -> Servers;

    /// Crashes it, as that server takes a crash, and waits for it to exit.
    fn crash(&mut self) -> impl std::future::Future<Output = ()> + Send;

    /// Starts it again (crashing it first if it runs) on the same port and directory, and
    /// waits until it accepts connections.
    fn restart(&mut self) -> impl std::future::Future<Output = anyhow::Result<()>> + Send;
}

/// A server process of a test's own.
pub(super) struct ServerProcess {
    what: &'static str,
    /// The `kill` option that crashes it: `-KILL`, or `-QUIT` for PostgreSQL, whose
    /// backends a SIGKILL of the postmaster would leave running.
    crash_signal: &'static str,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl ServerProcess {
    /// Picks a port of 127.0.0.1 free right now and makes a new directory under the system's
    /// temp dir named after `what`, this process and the port. Nothing runs yet.
    pub(super) fn new(what: &'static str, crash_signal: &'static str) -> anyhow::Result<Self> {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let dir = std::env::temp_dir().join(format!("herald-{what}-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            what,
            crash_signal,
            port,
            dir,
            child: None,
        })
    }

    pub(super) fn port(&self) -> u16 {
        self.port
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sends the crash signal, if the server runs, and waits for it to exit (PostgreSQL
    /// takes a while to end its backends), on a blocking thread.
    pub(super) async fn crash(&mut self) {
        if let Some(child) = self.child.take() {
            let signal = self.crash_signal;
            let _ = tokio::task::spawn_blocking(move || end(child, signal)).await;
        }
    }

    /// Crashes the server if it runs, starts `command` (its output discarded) and waits until
    /// it accepts connections on the port; on failure it is crashed again.
    pub(super) async fn start(
        &mut self,
        mut command: Command,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        self.crash().await;
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.what))?;
        self.child = Some(child);
        let listening = self.wait_listening(timeout).await;
        if listening.is_err() {
            self.crash().await;
        }
        listening
    }

    /// Waits until something accepts connections on the port, or fails when the child exits
    /// first or `timeout` passes.
    async fn wait_listening(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let (what, port) = (self.what, self.port);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    self.child = None;
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
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // Nothing can be awaited here.
        if let Some(child) = self.child.take() {
            end(child, self.crash_signal);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends `signal` (a `kill` option) to the child and waits for it to exit.
fn end(mut child: Child, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Where Debian and local installs put server binaries (`/usr/sbin` is not on a user's PATH).
const SERVER_DIRS: [&str; 4] = ["/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/usr/bin"];

/// `name` on PATH or in [`SERVER_DIRS`]; the error says where it looked and what installs it.
pub(super) fn find_bin(name: &str) -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(SERVER_DIRS.map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "{name} not found on PATH or in {}; scripts/services.sh installs it",
                SERVER_DIRS.join(", ")
            )
        })
}
