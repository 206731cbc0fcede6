//! The stop signal of herald's programs: Ctrl-C (SIGINT) or, on Unix, SIGTERM, which is what
//! a service manager or `kill` sends.

/// Resolves at the first SIGINT or SIGTERM. Where SIGTERM cannot be watched, at Ctrl-C only.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
