//! [`PgServer`]: a PostgreSQL cluster of a test's own, on a free loopback port in a directory
//! of its own, that the test can crash and start again. The shared server on 5432 must not be
//! restarted by a test.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{ensure, Context};

use super::{
    server_process::{ServerProcess, TestServer},
    Servers,
};

/// How long a started server gets to accept connections (crash recovery included).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// PostgreSQL refuses to run as root; as root, the cluster belongs to this user.
const RUN_AS: &str = "postgres";

/// A private PostgreSQL cluster (`initdb` at start, trust auth, user `postgres`). Dropping it
/// stops the server and removes its directory, so a failing test leaves neither behind.
pub struct PgServer {
    process: ServerProcess,
    bin: PathBuf,
    /// Whether this process is root, so the server runs as [`RUN_AS`].
    as_root: bool,
}

impl PgServer {
    /// The admin URL (database `postgres`), without TLS.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.process.port()
        )
    }

    /// `program` from the server's bin dir, as [`RUN_AS`] when this process is root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_root {
            // setpriv execs the program itself, so the child's pid is the server's.
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={RUN_AS}"),
                &format!("--regid={RUN_AS}"),
                "--init-groups",
                "--",
            ])
            .arg(path);
            c
        } else {
            Command::new(path)
        }
    }
}

impl TestServer for PgServer {
    /// Makes a new cluster (`initdb`) and starts it.
    async fn start() -> anyhow::Result<Self> {
        let bin = find_bin_dir().context(
            "no PostgreSQL server under /usr/lib/postgresql/*/bin; scripts/services.sh installs it",
        )?;
        let mut server = Self {
            process: ServerProcess::new("pg", "-QUIT")?,
            bin,
            as_root: is_root(),
        };
        if server.as_root {
            let owned = Command::new("chown")
                .arg(format!("{RUN_AS}:{RUN_AS}"))
                .arg(server.process.dir())
                .status()
                .context("chown")?;
            ensure!(
                owned.success(),
                "chown {RUN_AS} {}: {owned}",
                server.process.dir().display()
            );
        }
        let mut initdb = server.command("initdb");
        initdb
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(server.process.dir().join("data"));
        // initdb takes seconds: off the async threads.
        let out = tokio::task::spawn_blocking(move || initdb.output())
            .await?
            .context("running initdb")?;
        ensure!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        server.restart().await?;
        Ok(server)
    }

    fn servers(&self) -> Servers {
        Servers {
            pg_admin: self.url(),
            ..Servers::default()
        }
    }

    /// An immediate shutdown (SIGQUIT), which ends every backend at once with no
    /// checkpoint, so the next start runs crash recovery.
    async fn crash(&mut self) {
        self.process.crash().await;
    }

    async fn restart(&mut self) -> anyhow::Result<()> {
        let dir = self.process.dir();
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-p", &self.process.port().to_string(), "-k"])
            .arg(dir)
            .args(["-c", "listen_addresses=127.0.0.1"]);
        self.process.start(command, START_TIMEOUT).await
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has `postgres` and `initdb`.
fn find_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, bin)| bin)
}

fn has_server(bin: &Path) -> bool {
    bin.join("postgres").is_file() && bin.join("initdb").is_file()
}
