//! What the engine tests share: the device they run on.

use candle_core::Device;

/// The device named by `FLOWFARM_TEST_DEVICE` (`cpu`, the default, or
/// `cuda:N` in a `--features cuda` build), so the parity tests can be run
/// unchanged on a GPU.
pub fn device() -> Device {
    let spec = std::env::var("FLOWFARM_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    flowfarm_engine::device::open_device(&spec).unwrap_or_else(|e| panic!("FLOWFARM_TEST_DEVICE: {e}"))
}
