//! Process measurements from /proc: CPU seconds and peak resident memory (resettable).

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

/// Resets the peak so the next scenario measures its own (Linux: clear_refs 5).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
