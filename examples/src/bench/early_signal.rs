//! SIGINT and SIGTERM, listened for from the bench's first line. Until a handler is
//! registered, either signal ends the process at once, and one that came while an
//! environment was being made (its database created, its migrations running) left that
//! database behind: `run_and_cleanup` only watches for signals once the work starts, and one
//! that came between the environment's check and that start went to these handlers only.
//! So the work runs under both ([`EarlySignals::run`]).

use futures::FutureExt;
use herald_engine::testkit::TestEnv;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// The two signals, registered when made.
pub struct EarlySignals {
    interrupt: Signal,
    terminate: Signal,
}

impl EarlySignals {
    /// Registers the handlers; from now on the signals no longer end the process by
    /// themselves.
    pub fn register() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Whether either signal came since the last call (or since registering).
    fn arrived(&mut self) -> bool {
        self.next().now_or_never().is_some()
    }

    /// The next signal of either kind (one already buffered counts).
    async fn next(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }

    /// `env.run_and_cleanup(work)`, with the work also ended by a signal these handlers
    /// got: the environment is removed either way.
    pub async fn run<T>(
        &mut self,
        env: &TestEnv,
        work: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        let mut interrupted = false;
        let ran = env
            .run_and_cleanup(async {
                tokio::select! {
                    done = work => done,
                    _ = self.next() => {
                        interrupted = true;
                        anyhow::bail!("interrupted")
                    }
                }
            })
            .await;
        if interrupted {
            anyhow::bail!("interrupted; database {} removed", env.db_name());
        }
        ran
    }

    /// Makes an environment; if a signal came meanwhile, removes it again and fails.
    pub async fn new_env(&mut self, name: &str) -> anyhow::Result<TestEnv> {
        let env = TestEnv::new(name).await?;
        if self.arrived() {
            env.cleanup().await?;
            anyhow::bail!("interrupted; database {} removed", env.db_name());
        }
        Ok(env)
    }
}
