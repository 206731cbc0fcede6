//! Process measurements from /proc: CPU seconds of this process and of the local servers, and
//! peak resident memory (resettable).

/// The local servers whose CPU the bench reports, by `/proc/<pid>/comm`.
pub const SERVERS: [&str; 3] = ["nats-server", "redis-server", "postgres"];

/// CPU seconds used so far by this process, by each of [`SERVERS`] and by every other process
/// on the machine, with the hypervisor's steal and the time of the reading.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSnapshot {
    /// This process: the engine and the bench's thin driver.
    pub engine: f64,
    /// Each of [`SERVERS`], in order.
    pub servers: [f64; 3],
    /// Every other process and kernel thread (other services, the kernel's workers).
    pub others: f64,
    /// Time the hypervisor ran something else while this machine's CPUs had work (the
    /// `steal` of /proc/stat, to a clock tick).
    pub steal: f64,
    /// Seconds since the first reading in this process; in a difference, the wall time.
    pub wall: f64,
}

impl CpuSnapshot {
    /// Reads the counters now.
    pub fn now() -> Self {
        static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let epoch = *EPOCH.get_or_init(std::time::Instant::now);
        let (servers, others) = machine_cpu();
        Self {
            engine: cpu_seconds(),
            servers,
            others,
            steal: steal_seconds(),
            wall: epoch.elapsed().as_secs_f64(),
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
            others: now.others - before.others,
            steal: now.steal - before.steal,
            wall: now.wall - before.wall,
        }
    }

    /// This process and the servers together (not the other processes).
    pub fn total(&self) -> f64 {
        self.engine + self.servers.iter().sum::<f64>()
    }

    /// The share of the machine's CPU time that no process used over a difference's wall
    /// time. Interrupts run on the time of the task they interrupt, so this is not less.
    pub fn idle_share(&self) -> f64 {
        let capacity = self.wall * crate::report::cores() as f64;
        if capacity <= 0.0 {
            return 0.0;
        }
        (1.0 - (self.total() + self.others) / capacity).clamp(0.0, 1.0)
    }

    /// `engine 1.2, nats-server 0.4, …, all 2.0; other processes 0.1, idle 30%, steal 0 ms`,
    /// CPU in microseconds per `per` (a user, a login).
    pub fn micros_per(&self, per: f64) -> String {
        let us = |s: f64| s * 1e6 / per.max(1.0);
        let mut parts = vec![format!("engine {:.1}", us(self.engine))];
        for (name, s) in SERVERS.iter().zip(self.servers) {
            parts.push(format!("{name} {:.1}", us(s)));
        }
        parts.push(format!("all {:.1}", us(self.total())));
        format!(
            "{}; other processes {:.1}, machine idle {:.0}%, steal {:.0} ms",
            parts.join(", "),
            us(self.others),
            self.idle_share() * 100.0,
            self.steal * 1e3
        )
    }

    /// The same as JSON: seconds per process, the others, steal and the idle share.
    pub fn json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("engine".into(), self.engine.into());
        for (name, s) in SERVERS.iter().zip(self.servers) {
            m.insert((*name).into(), s.into());
        }
        m.insert("other_processes".into(), self.others.into());
        m.insert("steal".into(), self.steal.into());
        m.insert("idle_share".into(), self.idle_share().into());
        serde_json::Value::Object(m)
    }
}

/// CPU seconds every process named as in [`SERVERS`] has used so far, their reaped children
/// included (PostgreSQL's backends that exited count through the postmaster).
pub fn server_cpu() -> [f64; 3] {
    machine_cpu().0
}

/// CPU seconds used so far by the processes named as in [`SERVERS`], and by every other
/// process but this one, reaped children included.
///
/// A walk of /proc is not atomic. A process that exits after its parent was read and before
/// its own turn counts nowhere (its time reaches the parent's children's counters too late);
/// one read and then reaped before its parent's turn counts twice. A walk during which a
/// process went away is taken again, up to [`WALKS`] times.
fn machine_cpu() -> ([f64; 3], f64) {
    let mut cpu = walk_machine_cpu();
    for _ in 1..WALKS {
        if cpu.1 {
            break;
        }
        std::thread::yield_now();
        cpu = walk_machine_cpu();
    }
    cpu.0
}

/// Walks of /proc [`machine_cpu`] takes at most.
const WALKS: usize = 20;

/// One walk of /proc, and whether no process went away during it.
fn walk_machine_cpu() -> (([f64; 3], f64), bool) {
    let mut servers = [0.0; 3];
    let mut others = 0.0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return ((servers, others), true);
    };
    let me = std::process::id().to_string();
    let mut settled = true;
    let mut read = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str() else { continue };
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = entry.path();
        let (Ok(comm), Some(cpu)) = (
            std::fs::read_to_string(path.join("comm")),
            process_cpu_seconds(&path),
        ) else {
            settled = false;
            continue;
        };
        match SERVERS.iter().position(|s| *s == comm.trim()) {
            Some(i) => servers[i] += cpu,
            None => others += cpu,
        }
        read.push(path);
    }
    settled &= read.iter().all(|path| path.exists());
    ((servers, others), settled)
}

/// The machine's steal time so far, from /proc/stat (0 when it is not there).
fn steal_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    // cpu  user nice system idle iowait irq softirq steal ...
    stat.lines()
        .find(|l| l.starts_with("cpu "))
        .and_then(|l| l.split_whitespace().nth(8)?.parse::<f64>().ok())
        .map_or(0.0, |ticks| ticks / clock_ticks())
}

/// CPU seconds of the process at `path` (`/proc/<pid>`) and of its reaped children. Its live
/// threads count to the nanosecond where the kernel shows their scheduler statistics: the
/// stat file's counters move in clock ticks (10 ms), which is 5 µs per request in a loop of
/// 2,000 creates, as large as some of the figures it measured. A child reaped between two
/// readings counts once: live in the first, through its parent in the second. None when
/// the process is gone.
fn process_cpu_seconds(path: &std::path::Path) -> Option<f64> {
    let (own, children) = stat_seconds(path.join("stat"))?;
    Some(threads_cpu_seconds(path).unwrap_or(own) + children)
}

/// The sum of `se.sum_exec_runtime` (ms) over the process's threads; None when the kernel
/// does not show it.
fn threads_cpu_seconds(path: &std::path::Path) -> Option<f64> {
    let mut ms = 0.0;
    let mut seen = false;
    for task in std::fs::read_dir(path.join("task")).ok()?.flatten() {
        let Ok(sched) = std::fs::read_to_string(task.path().join("sched")) else {
            continue;
        };
        if let Some(v) = sum_exec_runtime_ms(&sched) {
            ms += v;
            seen = true;
        }
    }
    seen.then_some(ms / 1e3)
}

/// `se.sum_exec_runtime` from a `/proc/.../sched` file, in milliseconds.
fn sum_exec_runtime_ms(sched: &str) -> Option<f64> {
    sched
        .lines()
        .find(|l| l.starts_with("se.sum_exec_runtime"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

/// User + system CPU seconds of this process so far, its exited threads included, to the
/// microsecond.
pub fn cpu_seconds() -> f64 {
    rusage_seconds(libc::RUSAGE_SELF)
        .or_else(|| Some(stat_seconds("/proc/self/stat")?.0))
        .unwrap_or(0.0)
}

/// User + system CPU seconds of the calling thread, to the microsecond.
pub fn thread_cpu_seconds() -> f64 {
    rusage_seconds(libc::RUSAGE_THREAD)
        .or_else(|| Some(stat_seconds("/proc/thread-self/stat")?.0))
        .unwrap_or(0.0)
}

fn rusage_seconds(who: libc::c_int) -> Option<f64> {
    // SAFETY: getrusage only writes into the struct it is given, which is plain data.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut usage) } != 0 {
        return None;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(secs(usage.ru_utime) + secs(usage.ru_stime))
}

/// User + system CPU seconds from a `/proc/.../stat` file, of the process (or thread) itself
/// and of its reaped children, in clock ticks' resolution. None when it cannot be read.
fn stat_seconds(path: impl AsRef<std::path::Path>) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'; utime,
    // stime, cutime and cstime are fields 14 to 17 of the whole line: 11 to 14 here.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = clock_ticks();
    Some(((t(11) + t(12)) / hz, (t(13) + t(14)) / hz))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sched_file_gives_its_runtime_in_ms() {
        let sched = "bench (42, #threads: 3)\n---\nse.exec_start : 1.5\n\
                     se.sum_exec_runtime                          :          1234.567890\n";
        assert_eq!(sum_exec_runtime_ms(sched), Some(1234.56789));
        assert_eq!(sum_exec_runtime_ms("nothing here"), None);
    }

    #[test]
    fn cpu_readings_resolve_a_fraction_of_a_clock_tick() {
        let (thread0, own0) = (thread_cpu_seconds(), cpu_seconds());
        // Work until this thread has used 2 ms of CPU (or 2 s have passed).
        let wall = std::time::Instant::now();
        let mut x = 0u64;
        while thread_cpu_seconds() - thread0 < 0.002 && wall.elapsed().as_secs() < 2 {
            for _ in 0..1_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        let thread = thread_cpu_seconds() - thread0;
        // A reading in clock ticks (10 ms) would jump from 0 to 10 ms or more.
        assert!((0.002..0.009).contains(&thread), "thread {thread} s");
        // The process's reading sums its threads, each adjusted by the kernel on its own, so
        // it can trail this thread's by a fraction of a millisecond (0.12 ms seen).
        let own = cpu_seconds() - own0;
        assert!(own >= thread - 0.0005, "process {own} s, thread {thread} s");
    }

    #[test]
    fn a_sleeping_threads_runtime_is_read_whole_from_its_sched_file() {
        // A running thread's sched file trails by up to a scheduler tick, and threads of
        // other tests come and go, so the walk is checked on a thread that has stopped: its
        // entry is exact once it sleeps, and the sum over all threads cannot be below it.
        let (report, reported) = std::sync::mpsc::sync_channel(1);
        let (release, released) = std::sync::mpsc::sync_channel::<()>(1);
        let worker = std::thread::spawn(move || {
            let start = thread_cpu_seconds();
            let mut x = 0u64;
            while thread_cpu_seconds() - start < 0.005 {
                for _ in 0..1_000 {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
            }
            // SAFETY: gettid takes no arguments and cannot fail.
            let tid = unsafe { libc::gettid() };
            report.send((tid, thread_cpu_seconds())).unwrap();
            let _ = released.recv();
        });
        let (tid, used) = reported.recv().unwrap();
        let task = std::path::PathBuf::from(format!("/proc/self/task/{tid}"));
        let wall = std::time::Instant::now();
        while !std::fs::read_to_string(task.join("stat"))
            .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('S')))
        {
            assert!(
                wall.elapsed().as_secs() < 5,
                "the worker never went to sleep"
            );
            std::thread::yield_now();
        }
        let sched = std::fs::read_to_string(task.join("sched")).unwrap();
        let entry = sum_exec_runtime_ms(&sched).unwrap() / 1e3;
        // The worker's last reading came just before it sent and slept.
        assert!(
            (used..used + 0.005).contains(&entry),
            "entry {entry} s, used {used} s"
        );
        let all = threads_cpu_seconds(std::path::Path::new("/proc/self")).unwrap();
        assert!(
            all >= entry,
            "all threads {all} s, the worker alone {entry} s"
        );
        release.send(()).unwrap();
        worker.join().unwrap();
    }
}
