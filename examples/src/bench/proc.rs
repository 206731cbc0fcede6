//! Process measurements from /proc: CPU seconds of this process and of the local servers, and
//! peak resident memory (resettable).

/// The local servers whose CPU the bench reports, by `/proc/<pid>/comm`.
pub const SERVERS: [&str; 3] = ["nats-server", "redis-server", "postgres"];

/// CPU seconds used so far by this process and by each of [`SERVERS`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSnapshot {
    /// This process: the engine and the bench's thin driver.
    pub engine: f64,
    /// Each of [`SERVERS`], in order.
    pub servers: [f64; 3],
}

impl CpuSnapshot {
    /// Reads the counters now.
    pub fn now() -> Self {
        Self {
            engine: cpu_seconds(),
            servers: server_cpu(),
        }
    }

    /// What was used between `before` and now.
    pub fn since(before: &Self) -> Self {
        let now = Self::now();
        let mut servers = [0.0; 3];
        for (i, s) in servers.iter_mut().enumerate() {
            *s = now.servers[i] - before.servers[i];
        }
        Self {
            engine: now.engine - before.engine,
            servers,
        }
    }

    /// Every process together.
    pub fn total(&self) -> f64 {
        self.engine + self.servers.iter().sum::<f64>()
    }

    /// `engine 1.2, nats-server 0.4, …` in microseconds per `per` (a user, a login).
    pub fn micros_per(&self, per: f64) -> String {
        let us = |s: f64| s * 1e6 / per.max(1.0);
        let mut parts = vec![format!("engine {:.1}", us(self.engine))];
        for (name, s) in SERVERS.iter().zip(self.servers) {
            parts.push(format!("{name} {:.1}", us(s)));
        }
        parts.push(format!("all {:.1}", us(self.total())));
        parts.join(", ")
    }

    /// The same as JSON: seconds per process.
    pub fn json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("engine".into(), self.engine.into());
        for (name, s) in SERVERS.iter().zip(self.servers) {
            m.insert((*name).into(), s.into());
        }
        serde_json::Value::Object(m)
    }
}

/// CPU seconds every process named as in [`SERVERS`] has used so far, their reaped children
/// included (PostgreSQL's backends that exited count through the postmaster).
pub fn server_cpu() -> [f64; 3] {
    let mut out = [0.0; 3];
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        let Some(i) = SERVERS.iter().position(|s| *s == comm.trim()) else {
            continue;
        };
        out[i] += stat_cpu_seconds(path.join("stat"), true);
    }
    out
}

/// User + system CPU seconds of this process so far.
pub fn cpu_seconds() -> f64 {
    stat_cpu_seconds("/proc/self/stat", false)
}

/// User + system CPU seconds from a `/proc/.../stat` file; with `children`, reaped children's
/// too. 0 when it cannot be read.
pub fn stat_cpu_seconds(path: impl AsRef<std::path::Path>, children: bool) -> f64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'; utime,
    // stime, cutime and cstime are fields 14 to 17 of the whole line: 11 to 14 here.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let ticks = t(11) + t(12) + if children { t(13) + t(14) } else { 0.0 };
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Resident memory now (VmRSS) in bytes.
pub fn current_rss() -> u64 {
    status_kb("VmRSS:") * 1024
}

/// Peak resident memory (VmHWM) in bytes.
pub fn peak_rss() -> u64 {
    status_kb("VmHWM:") * 1024
}

fn status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

extern "C" {
    // mimalloc's (the bench's global allocator): frees what it holds for reuse.
    fn mi_collect(force: bool);
}

/// Hands memory that earlier scenarios freed back to the operating system, so that the next
/// scenario's peak is its own and not the allocator's cache of the one before (the
/// baseline, with a message per user in flight, leaves ~200 MB cached). mimalloc keeps
/// freed memory per thread: a pass on each runtime worker and on this thread.
pub async fn release_free_memory() {
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let passes: Vec<_> = (0..workers * 4)
        .map(|_| tokio::spawn(async { unsafe { mi_collect(true) } }))
        .collect();
    for p in passes {
        let _ = p.await;
    }
    // SAFETY: mi_collect only walks mimalloc's own heaps; it takes no pointers.
    unsafe { mi_collect(true) };
}

/// Resets the peak so the next scenario measures its own (Linux: clear_refs 5).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
