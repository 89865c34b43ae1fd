//! What the allocator keeps (ARCHITECTURE.md, "The event loop", its memory
//! paragraph): glibc's malloc is told, once at start, how many arenas it
//! may make, and asked, once every target has run, to hand its free pages
//! back. These are the crate's two `unsafe` calls; a musl build has neither
//! and leaves its allocator alone.

/// Limits glibc's arenas to one per core (at least two), unless the user
/// set a limit (`MALLOC_ARENA_MAX`, or `glibc.malloc.arena_max` in
/// `GLIBC_TUNABLES`). `anchorage run` calls it before it starts a thread.
///
/// glibc gives a thread that finds the arenas busy an arena of its own, up
/// to eight per core. The daemon's run threads (`daemon::runs`) would each
/// get one, and each keeps the pages where the bundles it parsed lie
/// between the freed buffers of its renders. With one arena per core, a
/// 1,000-bundle daemon keeps about 0.5 MiB less and starts as fast: its
/// renders are mostly system calls, and the threads rarely wait for an
/// arena. A one-shot command keeps glibc's default: its memory is gone at
/// exit, and the threads that parse 10,000 CAs at once do wait (such a
/// render took 14 to 29% longer with two arenas).
#[allow(unsafe_code)]
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tuned = std::env::var_os("GLIBC_TUNABLES")
            .is_some_and(|t| t.to_string_lossy().contains("glibc.malloc.arena_max"));
        if tuned || std::env::var_os("MALLOC_ARENA_MAX").is_some() {
            return;
        }
        let arenas = i32::try_from(crate::parallel::cores().max(2)).unwrap_or(i32::MAX);
        // SAFETY: mallopt takes no pointer and sets one of the allocator's
        // parameters under its own lock; arenas made before keep working.
        unsafe {
            nix::libc::mallopt(nix::libc::M_ARENA_MAX, arenas);
        }
    }
}

/// Hands the allocator's free pages back to the kernel. A start's peak
/// (the configuration's parse tree, the run threads' work) is freed by the
/// time every entry has run once, but glibc keeps the pages of its arenas
/// mapped where free chunks lie between live ones: at 1,000 bundles, 1 to
/// 1.7 MiB kept for the daemon's life.
#[allow(unsafe_code)]
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointer and touches only the
    // allocator's own state, under each arena's lock: any thread may call
    // it at any time.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
