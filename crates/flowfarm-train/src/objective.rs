//! The rectified-flow objective: a straight path from data to noise,
//! z_t = (1 − t)·x₀ + t·ε, and a network trained to predict its velocity
//! dz/dt = ε − x₀ (the paper's eq. 1–3 with the conditional flow matching
//! loss). The sampler then walks the path backwards, x ← x + (σ' − σ)·v.

use candle_core::{DType, Tensor};

/// z_t for each sample: `x0` and `noise` (B, …), `t` (B,) in [0, 1].
///
/// # Errors
/// Tensor errors (mismatched shapes).
pub fn noised(x0: &Tensor, noise: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
    let shape: Vec<usize> = std::iter::once(x0.dim(0)?).chain(std::iter::repeat_n(1, x0.rank() - 1)).collect();
    let t = t.to_dtype(x0.dtype())?.reshape(shape)?;
    x0.broadcast_mul(&(1.0 - &t)?)?.add(&noise.broadcast_mul(&t)?)
}

/// The velocity the network learns: ε − x₀.
///
/// # Errors
/// Tensor errors.
pub fn velocity_target(x0: &Tensor, noise: &Tensor) -> candle_core::Result<Tensor> {
    noise - x0
}

/// Mean squared error per sample, in F32: (B, …) → (B,).
///
/// # Errors
/// Tensor errors.
pub fn per_sample_loss(prediction: &Tensor, target: &Tensor) -> candle_core::Result<Tensor> {
    let diff = (prediction.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?;
    diff.sqr()?.flatten_from(1)?.mean(1)
}

/// The batch's loss: the mean of [`per_sample_loss`].
///
/// # Errors
/// Tensor errors.
pub fn loss(prediction: &Tensor, target: &Tensor) -> candle_core::Result<Tensor> {
    per_sample_loss(prediction, target)?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_path_runs_from_data_to_noise_at_the_target_velocity() {
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        let noise = Tensor::new(&[[0.0f32, -2.0], [1.0, 1.0]], &dev).unwrap();
        let at = |t: [f32; 2]| noised(&x0, &noise, &Tensor::new(&t, &dev).unwrap()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(at([0.0, 0.0]), x0.to_vec2::<f32>().unwrap());
        assert_eq!(at([1.0, 1.0]), noise.to_vec2::<f32>().unwrap());
        assert_eq!(at([0.5, 0.25]), vec![vec![0.5, 0.0], vec![2.5, 3.25]]);
        // A step of dt along the target velocity moves z_t to z_{t+dt}.
        let v = velocity_target(&x0, &noise).unwrap();
        let stepped = (noised(&x0, &noise, &Tensor::new(&[0.5f32, 0.5], &dev).unwrap()).unwrap() + (&v * 0.25).unwrap()).unwrap();
        assert_eq!(stepped.to_vec2::<f32>().unwrap(), at([0.75, 0.75]));
        let loss = per_sample_loss(&x0, &noise).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(loss, vec![(1.0 + 16.0) / 2.0, (4.0 + 9.0) / 2.0]);
    }
}
