//! Softmax and LayerNorm as tensor ops, for the composed path (GPUs, half
//! precision, training) and the text encoders. On CPU F32 each runs the row
//! kernels of `cpu.rs` over rows in parallel, where the composed tensor ops
//! make five or six passes with a fresh buffer each; their gradients are
//! composed tensor ops, so training runs through the same kernels. Other
//! devices, and dtypes other than F32, use the composed ops (and on CUDA a
//! softmax kernel of our own, inference only).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::cpu;

fn rows<'a>(storage: &'a CpuStorage, layout: &Layout, name: &str) -> Result<(&'a [f32], usize)> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("{name}: only F32 is fused") };
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("{name}: input must be contiguous") };
    let width = layout.dims().last().copied().unwrap_or(1);
    Ok((&data[start..end], width))
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "flowfarm-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (src, width) = rows(storage, layout, self.name())?;
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(width).zip(src.par_chunks(width)).for_each(|(dst, row)| cpu::softmax_row(row, dst));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// dx = y ⊙ (dy − Σ dy ⊙ y), per row.
    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dot = (dy * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((y * dy.broadcast_sub(&dot)?)?))
    }
}

struct LayerNorm {
    eps: f64,
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "flowfarm-layer-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (src, width) = rows(storage, layout, self.name())?;
        let eps = self.eps as f32;
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(width).zip(src.par_chunks(width)).for_each(|(dst, row)| cpu::layer_norm_row(row, dst, eps));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// With y = (x − μ)/σ per row: dx = (dy − mean(dy) − y·mean(dy ⊙ y)) / σ.
    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let sigma = (centered.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
        let along = y.broadcast_mul(&(dy * y)?.mean_keepdim(D::Minus1)?)?;
        Ok(Some(dy.broadcast_sub(&dy.mean_keepdim(D::Minus1)?)?.sub(&along)?.broadcast_div(&sigma)?))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
    use candle_core::{CustomOp1, Layout, Result, Shape};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/softmax.ptx"));

    /// Row softmax in F32 with the input's dtype in and out (softmax.cu).
    pub struct Softmax;

    impl CustomOp1 for Softmax {
        fn name(&self) -> &'static str {
            "flowfarm-softmax"
        }

        fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("flowfarm-softmax runs on CUDA only")
        }

        fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
            let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("flowfarm-softmax needs a contiguous input") };
            let dims = layout.shape().dims();
            let cols = *dims.last().unwrap_or(&1);
            let rows = (end - start) / cols.max(1);
            let dev = storage.device();
            let config = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            macro_rules! run {
                ($src:expr, $ty:ty, $name:literal, $wrap:path) => {{
                    let func = dev.get_or_load_custom_func($name, "flowfarm_softmax", PTX)?;
                    let src = $src.slice(start..end);
                    // SAFETY: every element is written by the kernel.
                    let dst = unsafe { dev.alloc::<$ty>(end - start)? };
                    let mut launch = func.builder();
                    let cols = cols as i32;
                    launch.arg(&src).arg(&dst).arg(&cols);
                    // SAFETY: the kernel reads rows·cols inputs and writes as many outputs.
                    unsafe { launch.launch(config) }.w()?;
                    $wrap(dst)
                }};
            }
            let slice = match &storage.slice {
                CudaStorageSlice::F32(s) => run!(s, f32, "softmax_rows_f32", CudaStorageSlice::F32),
                CudaStorageSlice::BF16(s) => run!(s, half::bf16, "softmax_rows_bf16", CudaStorageSlice::BF16),
                CudaStorageSlice::F16(s) => run!(s, half::f16, "softmax_rows_f16", CudaStorageSlice::F16),
                _ => candle_core::bail!("flowfarm-softmax: unsupported dtype {:?}", storage.dtype()),
            };
            Ok((CudaStorage { slice, device: dev.clone() }, layout.shape().clone()))
        }
    }
}

fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// Attention probabilities: softmax over the last dim computed in F32,
/// returned in `x`'s dtype. On CUDA one fused kernel reads the
/// half-precision scores and writes the probabilities (the casts to F32 and
/// back took most of a block's time at 1024²); elsewhere the scores are
/// cast, softmaxed and cast back.
pub fn softmax_probabilities(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return x.contiguous()?.apply_op1_no_bwd(&cuda::Softmax);
    }
    softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())
}

/// Softmax over the last dim.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// (x − mean) / sqrt(var + eps) over the last dim, no affine.
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(x) {
        return x.contiguous()?.apply_op1(LayerNorm { eps });
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn composed_softmax(x: &Tensor) -> Tensor {
        candle_nn::ops::softmax_last_dim(x).unwrap()
    }

    #[test]
    fn fused_ops_match_the_composed_ones() {
        let x = (Tensor::randn(0f32, 3.0, (4, 7, 33), &Device::Cpu).unwrap() + 10.0).unwrap();
        let d = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d(&softmax_last_dim(&x).unwrap(), &composed_softmax(&x)) < 1e-6);
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let c = x.broadcast_sub(&mean).unwrap();
        let expected = c.broadcast_div(&(c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-6).unwrap().sqrt().unwrap()).unwrap();
        assert!(d(&layer_norm(&x, 1e-6).unwrap(), &expected) < 1e-5);
        // Rows far below the maximum give exact zeros, not NaN.
        let spread = Tensor::new(&[[0f32, -500.0, -1e30]], &Device::Cpu).unwrap();
        assert_eq!(softmax_last_dim(&spread).unwrap().to_vec2::<f32>().unwrap(), vec![vec![1.0, 0.0, 0.0]]);
    }

    /// The fused CUDA kernel against cast → F32 softmax → cast on the CPU, on
    /// rows as long as SD3's attention at 1024² (4250 keys).
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_softmax_matches_the_f32_softmax_in_every_dtype() {
        let gpu = Device::new_cuda(0).expect("a CUDA build's tests need a GPU");
        let x = (Tensor::randn(0f32, 4.0, (3, 5, 4250), &Device::Cpu).unwrap() - 30.0).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = x.to_dtype(dtype).unwrap();
            let reference = softmax_probabilities(&x).unwrap().to_dtype(DType::F32).unwrap();
            let fused = softmax_probabilities(&x.to_device(&gpu).unwrap()).unwrap().to_device(&Device::Cpu).unwrap();
            assert_eq!(fused.dtype(), dtype);
            let diff =
                (fused.to_dtype(DType::F32).unwrap() - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let top = reference.max_all().unwrap().to_scalar::<f32>().unwrap();
            // F32: the two sum 4250 terms in different orders (the CPU one
            // sequentially), ~1e-5 apart; F16 and BF16: one rounding of the output.
            let ulp = match dtype {
                DType::F32 => 3e-5,
                DType::F16 => 1e-3,
                _ => 8e-3,
            };
            println!("{dtype:?}: fused CUDA softmax vs F32 softmax on the CPU: max abs {diff:.2e} (largest probability {top:.3})");
            assert!(diff <= ulp * top, "{dtype:?}: {diff} vs max {top}");
        }
    }
}
