//! Transparent huge pages off for a process that runs herald on mimalloc.
//!
//! mimalloc asks the kernel for huge pages on its arenas (`madvise(MADV_HUGEPAGE)`), so the
//! first touch of any 2 MiB of them, or of memory it gave back after a second of disuse,
//! zeroes all 2 MiB in one page fault on the thread that touched it. Traced over the first
//! 100 creates after a start (session 27), the API's thread spent 13.2 of its 16.8 ms of
//! CPU in such faults (`clear_page_erms` under `do_huge_pmd_anonymous_page`), from the
//! insert's bind buffer and the tasks' futures. With huge pages off a create cost 24–29 µs
//! of the engine's CPU instead of 36–40, and the API-only node's back-to-back p99 was
//! 6.0–9.4 ms instead of 16.5–22.9 ms in six of seven runs (BENCHMARKS.md).

/// Turns transparent huge pages off for the whole process (`prctl(PR_SET_THP_DISABLE)`),
/// whatever the machine's setting and whatever the allocator asked for. For the binaries,
/// which own their process: an embedding service decides for its own. Processes it starts
/// inherit the setting (`herald dev`'s nats-server and redis-server; Redis recommends huge
/// pages off). Elsewhere than Linux it does nothing.
pub fn disable_transparent_huge_pages() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
        if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn the_process_reads_back_huge_pages_off() {
        super::disable_transparent_huge_pages().unwrap();
        // SAFETY: PR_GET_THP_DISABLE takes plain integers and returns the flag.
        assert_eq!(
            unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) },
            1
        );
    }
}
