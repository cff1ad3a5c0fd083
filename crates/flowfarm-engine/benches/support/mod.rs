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

/// The benches' MM-DiT: 6 blocks × 384 hidden (6 heads), SD3's patch size,
/// latent channels and text widths; small enough for a CPU, shaped like SD3.
#[allow(dead_code)] // not every bench uses it
pub fn bench_config() -> flowfarm_engine::mmdit::MmDitConfig {
    flowfarm_engine::mmdit::MmDitConfig {
        variant: flowfarm_engine::mmdit::Variant::Sd3Medium,
        depth: 6,
        hidden: 384,
        heads: 6,
        patch_size: 2,
        in_channels: 16,
        out_channels: 16,
        joint_attention_dim: 4096,
        pooled_dim: 2048,
        pos_embed_max_size: 96,
        qk_norm: false,
        dual_attention_layers: Vec::new(),
    }
}

/// The middle of `times` (the upper middle for an even count).
#[allow(dead_code)] // not every bench uses it
pub fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}
