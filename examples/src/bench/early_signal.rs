//! SIGINT and SIGTERM, listened for from the bench's first line. Until a handler is
//! registered, either signal ends the process at once, and one that came while an
//! environment was being made (its database created, its migrations running) left that
//! database behind: `run_and_cleanup` only watches for signals once the work starts.

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
        let interrupt = self.interrupt.recv().now_or_never().is_some();
        let terminate = self.terminate.recv().now_or_never().is_some();
        interrupt || terminate
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
