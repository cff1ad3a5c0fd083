//! Numbered (caption, image) pairs, deterministic from a seed, with a fixed
//! part of the grammar held out of training for scoring.
//!
//! Invariant: item `i` of a dataset is the same bytes on every machine and
//! in every run (ChaCha8 keyed by the seed, one stream per item), and a
//! held-out scene is never a training item, whatever the seed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::draw::draw;
use crate::grammar::{Layout, Scene};
use crate::{check_size, SceneError};

/// Which part of the grammar a scene belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    /// About one scene in twenty, chosen by its caption alone.
    HeldOut,
}

impl Split {
    /// The split of `scene`: held out when the FNV-1a hash of its caption
    /// is 0 modulo 20.
    pub fn of(scene: &Scene) -> Split {
        let hash = scene.caption().bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
        if hash.is_multiple_of(20) {
            Split::HeldOut
        } else {
            Split::Train
        }
    }
}

/// One numbered pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub scene: Scene,
    pub caption: String,
    /// RGB8 rows, width × height × 3 bytes.
    pub rgb: Vec<u8>,
}

/// The scenes of a split at one image size, numbered from a seed.
#[derive(Debug, Clone)]
pub struct Dataset {
    seed: u64,
    width: usize,
    height: usize,
    split: Split,
    /// The split's scenes with one object, then those with two.
    ones: Vec<Scene>,
    twos: Vec<Scene>,
}

/// The share of items with one object (the grammar has 14 times more
/// two-object scenes; both kinds should be learnt).
const ONE_OBJECT_SHARE: f64 = 0.3;

impl Dataset {
    /// # Errors
    /// [`SceneError::Size`] unless both sides are positive multiples of 16.
    pub fn new(seed: u64, width: usize, height: usize, split: Split) -> Result<Dataset, SceneError> {
        check_size(width, height)?;
        let (ones, twos) = Scene::all().into_iter().filter(|s| Split::of(s) == split).partition(|s| matches!(s.layout, Layout::One { .. }));
        Ok(Dataset { seed, width, height, split, ones, twos })
    }

    pub fn size(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    pub fn split(&self) -> Split {
        self.split
    }

    /// Every scene of this split.
    pub fn scenes(&self) -> impl Iterator<Item = &Scene> {
        self.ones.iter().chain(&self.twos)
    }

    /// Item `index`: a scene of the split (one object with probability 0.3)
    /// and its image.
    pub fn item(&self, index: u64) -> Item {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(index);
        let pool = if rng.gen_bool(ONE_OBJECT_SHARE) { &self.ones } else { &self.twos };
        let scene = pool[rng.gen_range(0..pool.len())];
        // The size was checked when the dataset was made.
        let rgb = draw(&scene, self.width, self.height, &mut rng).unwrap_or_default();
        Item { scene, caption: scene.caption(), rgb }
    }

    /// `count` different captions of this split, in a seeded order: the
    /// prompts a model is scored on.
    pub fn prompts(&self, count: usize) -> Vec<String> {
        let mut scenes: Vec<&Scene> = self.scenes().collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x005e_ed0f_9705);
        // Fisher–Yates, so the order does not depend on a library's shuffle.
        for i in (1..scenes.len()).rev() {
            scenes.swap(i, rng.gen_range(0..=i));
        }
        scenes.into_iter().take(count).map(Scene::caption).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_the_same_bytes_every_time_and_differ_between_seeds() {
        let a = Dataset::new(7, 64, 48, Split::Train).unwrap();
        let b = Dataset::new(7, 64, 48, Split::Train).unwrap();
        let other = Dataset::new(8, 64, 48, Split::Train).unwrap();
        for i in 0..20 {
            assert_eq!(a.item(i), b.item(i));
            assert_eq!(a.item(i).rgb.len(), 64 * 48 * 3);
        }
        assert!((0..20).any(|i| a.item(i) != other.item(i)));
        assert!((1..20).any(|i| a.item(i).caption != a.item(0).caption));
    }

    #[test]
    fn held_out_scenes_never_train_and_are_about_a_twentieth() {
        let train = Dataset::new(1, 32, 32, Split::Train).unwrap();
        let held = Dataset::new(1, 32, 32, Split::HeldOut).unwrap();
        let (t, h) = (train.scenes().count(), held.scenes().count());
        assert_eq!(t + h, Scene::all().len());
        assert!((h as f64 / (t + h) as f64 - 0.05).abs() < 0.01, "{h} of {}", t + h);
        assert!((0..500).all(|i| Split::of(&train.item(i).scene) == Split::Train));
        let prompts = held.prompts(100);
        assert_eq!(prompts.len(), 100);
        assert!(prompts.iter().all(|p| Scene::parse(p).is_some_and(|s| Split::of(&s) == Split::HeldOut)));
        let mut unique = prompts.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 100);
    }

    #[test]
    fn sides_must_be_multiples_of_16() {
        assert_eq!(Dataset::new(1, 40, 32, Split::Train).err(), Some(SceneError::Size { width: 40, height: 32 }));
        assert_eq!(Dataset::new(1, 0, 32, Split::Train).err(), Some(SceneError::Size { width: 0, height: 32 }));
    }
}
