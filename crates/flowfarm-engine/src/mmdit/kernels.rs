//! Fused CPU kernels for the two row-wise ops that dominate a forward besides
//! the products: softmax over attention scores and LayerNorm. Each reads its
//! row once or twice and writes it once, rows in parallel, where the
//! composed tensor ops make five or six passes with a fresh buffer each.
//! Other devices, and dtypes other than F32, use the composed ops.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Below this, exp() is under F32's smallest normal (and soon 0); taking 0
/// directly keeps libm off its slow underflow path, which sets errno for
/// every such element.
const EXP_FLOOR: f32 = -87.0;

fn rows<'a>(storage: &'a CpuStorage, layout: &Layout, name: &str) -> Result<(&'a [f32], usize)> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{name}: only F32 is fused")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{name}: input must be contiguous")
    };
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
        out.par_chunks_mut(width).zip(src.par_chunks(width)).for_each(|(dst, row)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (d, &x) in dst.iter_mut().zip(row) {
                let shifted = x - max;
                *d = if shifted < EXP_FLOOR { 0.0 } else { shifted.exp() };
                sum += *d;
            }
            let inv = 1.0 / sum;
            dst.iter_mut().for_each(|d| *d *= inv);
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
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
        out.par_chunks_mut(width).zip(src.par_chunks(width)).for_each(|(dst, row)| {
            // Two passes (mean, then centred variance) for accuracy at large means.
            let n = row.len() as f32;
            let mean = row.iter().sum::<f32>() / n;
            let var = row.iter().map(|&x| (x - mean) * (x - mean)).sum::<f32>() / n;
            let inv = 1.0 / (var + eps).sqrt();
            for (d, &x) in dst.iter_mut().zip(row) {
                *d = (x - mean) * inv;
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// Softmax over the last dim.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        x.contiguous()?.apply_op1_no_bwd(&Softmax)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// (x − mean) / sqrt(var + eps) over the last dim, no affine.
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(x) {
        return x.contiguous()?.apply_op1_no_bwd(&LayerNorm { eps });
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
        let d = |a: &Tensor, b: &Tensor| {
            (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        assert!(d(&softmax_last_dim(&x).unwrap(), &composed_softmax(&x)) < 1e-6);
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let c = x.broadcast_sub(&mean).unwrap();
        let expected = c.broadcast_div(&(c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-6).unwrap().sqrt().unwrap()).unwrap();
        assert!(d(&layer_norm(&x, 1e-6).unwrap(), &expected) < 1e-5);
        // Rows far below the maximum give exact zeros, not NaN.
        let spread = Tensor::new(&[[0f32, -500.0, -1e30]], &Device::Cpu).unwrap();
        assert_eq!(softmax_last_dim(&spread).unwrap().to_vec2::<f32>().unwrap(), vec![vec![1.0, 0.0, 0.0]]);
    }
}
