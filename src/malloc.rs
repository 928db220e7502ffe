//! glibc's allocator, set for a process that allocates and frees the same few large feature
//! maps on every forward pass. Called first thing by the binary and the in-process benchmarks;
//! an explicit `MALLOC_*` variable or `GLIBC_TUNABLES` still wins.

/// Sets the allocator up; does nothing off glibc.
///
/// - **Two arenas.** glibc gives threads that allocate at the same time separate arenas (up to
///   eight per core), and memory freed in one is not reused by the others: under eight
///   concurrent clients the server's peak RSS grew to 315 MiB; two keep it near 180 MiB with no
///   loss of throughput (`cargo bench --bench load`).
/// - **Freed maps stay mapped.** By default glibc hands a freed block over 128 KiB (raised on
///   the fly to the largest one freed) back to the kernel, trimming the heap once 2x that is
///   free at its top; the next forward pass then faults every page in again, zeroed: about
///   5,000 page faults a pass at 256x256 and 10 % of its time. Serving blocks of up to 32 MiB
///   from the heap and trimming only past 64 MiB free makes them reused instead. Peak RSS does
///   not move: what is kept is what the next pass takes again.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune() {
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    let settings = [
        (libc::M_ARENA_MAX, "MALLOC_ARENA_MAX", "arena_max", 2),
        (
            libc::M_MMAP_THRESHOLD,
            "MALLOC_MMAP_THRESHOLD_",
            "mmap_threshold",
            32 << 20,
        ),
        (
            libc::M_TRIM_THRESHOLD,
            "MALLOC_TRIM_THRESHOLD_",
            "trim_threshold",
            64 << 20,
        ),
    ];
    for (parameter, variable, tunable, value) in settings {
        let chosen = std::env::var_os(variable).is_some()
            || tunables.contains(&format!("glibc.malloc.{tunable}"));
        if !chosen {
            // SAFETY: mallopt only sets an allocator parameter; callers run it before any other
            // thread allocates.
            unsafe { libc::mallopt(parameter, value) };
        }
    }
}

/// Sets the allocator up; does nothing off glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune() {}
