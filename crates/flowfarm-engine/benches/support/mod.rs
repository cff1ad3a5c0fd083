//! What every engine bench shares: the flowfarm binary's allocator setup, so
//! the figures are the binary's.

// glibc's malloc would page-fault every large buffer in again.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its index in mimalloc.h's `mi_option_e`, the same in v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// As `flowfarm`'s main: freed pages stay committed for reuse.
pub fn keep_freed_memory() {
    // SAFETY: setting an option is thread-safe and takes effect on the next purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}
