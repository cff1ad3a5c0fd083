//! Procedural scenes for training and scoring a small text-to-image model.
//!
//! A [`Scene`] is one or two flat objects (a colour and a shape each) on a
//! plain background, placed as its caption says: "a red circle on the left
//! on a yellow background", "a red circle above a blue square on a yellow
//! background". [`grammar`] lists every scene, writes and reads captions;
//! [`draw`] rasterises a scene at any size that is a multiple of 16, with
//! sizes and positions jittered from a seed; [`Dataset`] numbers
//! (scene, image) pairs deterministically from a seed, keeping a fixed part
//! of the grammar out of training; [`detect`] reads colours, shapes and
//! positions back from pixels and scores an image against its caption.
//!
//! Invariant: the detector scores every drawn image right (tests hold it to
//! all of a few thousand), so a score below that measures the model that
//! drew the image, not the detector.

pub mod dataset;
pub mod detect;
pub mod draw;
pub mod grammar;

pub use dataset::{Dataset, Item, Split};
pub use detect::{detect, score, Detected, Score};
pub use draw::draw;
pub use grammar::{Colour, Layout, Object, Place, Relation, Scene, Shape};

/// What cannot be drawn or read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SceneError {
    /// Image sides must be positive multiples of 16 (the latent grid of an
    /// 8× VAE with 2×2 patches).
    #[error("{width}×{height}: sides must be positive multiples of 16")]
    Size { width: usize, height: usize },
    /// A buffer that is not width × height × 3 bytes.
    #[error("{len} bytes is not a {width}×{height} RGB image ({} bytes)", width * height * 3)]
    Pixels { width: usize, height: usize, len: usize },
}

/// Refuses sides that are not positive multiples of 16.
pub(crate) fn check_size(width: usize, height: usize) -> Result<(), SceneError> {
    if width == 0 || height == 0 || !width.is_multiple_of(16) || !height.is_multiple_of(16) {
        return Err(SceneError::Size { width, height });
    }
    Ok(())
}
