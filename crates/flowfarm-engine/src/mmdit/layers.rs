//! The pieces the blocks are made of. Norms and softmax run in F32 whatever
//! the model's dtype, as the reference does, so F16/BF16 stay close to F32.

use candle_core::{DType, Device, Tensor, D};

use super::WeightSource;
use crate::EngineError;

/// Epsilon of every norm in SD3-class models.
pub const NORM_EPS: f64 = 1e-6;

/// Loads what a layer needs from a checkpoint.
pub struct Loader<'a> {
    pub weights: &'a dyn WeightSource,
    pub dtype: DType,
    pub device: &'a Device,
}

impl Loader<'_> {
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor, EngineError> {
        self.weights.tensor(name, shape, self.dtype, self.device)
    }

    /// `prefix.weight` (out, in) and `prefix.bias` (out).
    pub fn linear(&self, prefix: &str, input: usize, output: usize) -> Result<Linear, EngineError> {
        let weight = self.tensor(&format!("{prefix}.weight"), &[output, input])?;
        let bias = self.tensor(&format!("{prefix}.bias"), &[output])?;
        Ok(Linear { weight, bias })
    }

    pub fn rms_norm(&self, name: &str, width: usize) -> Result<RmsNorm, EngineError> {
        Ok(RmsNorm { weight: self.tensor(&format!("{name}.weight"), &[width])? })
    }
}

/// Matrix product over the last two dims, one sample of the batch (dim 0)
/// at a time.
///
/// Per sample, so a job's numbers never depend on what shares its batch: a
/// single GEMM over all B·S rows tiles them differently as B changes, and
/// the last bits of the result move with it. On real models each sample's
/// product is already large, so little is lost.
///
/// candle's CPU backend has no BF16 matmul; there the product runs in F32
/// and is rounded back.
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let batch = a.dim(0)?;
    if batch == 1 {
        return product(a, b);
    }
    // b is either shared (a weight) or batched like a (attention).
    let paired = a.rank() >= 3 && b.rank() == a.rank() && b.dim(0)? == batch;
    let parts = (0..batch)
        .map(|i| {
            let bi = if paired { b.narrow(0, i, 1)? } else { b.clone() };
            product(&a.narrow(0, i, 1)?, &bi)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

fn product(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.dtype() == DType::BF16 && a.device().is_cpu() {
        a.to_dtype(DType::F32)?.broadcast_matmul(&b.to_dtype(DType::F32)?)?.to_dtype(DType::BF16)
    } else {
        a.broadcast_matmul(b)
    }
}

/// y = x·Wᵀ + b over the last dim, W: (out, in).
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        matmul(x, &self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// LayerNorm over the last dim without learned affine (elementwise_affine=False).
pub fn layer_norm(x: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    super::kernels::layer_norm(&x.to_dtype(DType::F32)?, NORM_EPS)?.to_dtype(dtype)
}

/// x·(1 + scale) + shift, with (B, D) modulations broadcast over tokens.
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?.broadcast_add(&shift.unsqueeze(1)?)
}

/// RMSNorm over the head dim with a learned scale.
pub struct RmsNorm {
    weight: Tensor,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let rms = (x.sqr()?.mean_keepdim(D::Minus1)? + NORM_EPS)?.sqrt()?;
        x.broadcast_div(&rms)?.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

/// Linear(SiLU(c)) split into `parts` modulation vectors of width D:
/// AdaLayerNormZero (6), its MMDiT-X form (9) and AdaLayerNormContinuous (2).
pub struct Modulation {
    linear: Linear,
    parts: usize,
}

impl Modulation {
    pub fn load(l: &Loader, prefix: &str, hidden: usize, parts: usize) -> Result<Self, EngineError> {
        Ok(Modulation { linear: l.linear(&format!("{prefix}.linear"), hidden, parts * hidden)?, parts })
    }

    /// c: (B, D) → `parts` tensors of (B, D).
    pub fn forward(&self, c: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        self.linear.forward(&c.silu()?)?.chunk(self.parts, 1)
    }
}

/// Multi-head scaled dot-product attention. q: (B, Sq, D), k, v: (B, Sk, D) → (B, Sq, D).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (b, sq, d) = q.dims3()?;
    let sk = k.dim(1)?;
    let head_dim = d / heads;
    let split = |t: &Tensor, s: usize| t.reshape((b, s, heads, head_dim))?.transpose(1, 2)?.contiguous();
    let (q, k, v) = (split(q, sq)?, split(k, sk)?, split(v, sk)?);
    // Scaling q costs Sq·D multiplications; scaling the scores would cost Sq·Sk·heads.
    let q = (q * (1.0 / (head_dim as f64).sqrt()))?;
    let scores = matmul(&q, &k.t()?)?; // (B, heads, Sq, Sk)
    let probs = super::kernels::softmax_probabilities(&scores)?;
    matmul(&probs, &v)?.transpose(1, 2)?.reshape((b, sq, d))
}

/// Query/key/value projections of one stream, with optional QK RMSNorm
/// (applied per head). Output (B, S, D) each.
pub struct Qkv {
    q: Linear,
    k: Linear,
    v: Linear,
    norm: Option<(RmsNorm, RmsNorm)>,
    heads: usize,
}

impl Qkv {
    /// `names`: the q, k, v linear prefixes and the q, k norm prefixes.
    pub fn load(
        l: &Loader,
        [q, k, v]: [&str; 3],
        norms: Option<[&str; 2]>,
        hidden: usize,
        heads: usize,
    ) -> Result<Self, EngineError> {
        let norm = match norms {
            Some([nq, nk]) => Some((l.rms_norm(nq, hidden / heads)?, l.rms_norm(nk, hidden / heads)?)),
            None => None,
        };
        Ok(Qkv {
            q: l.linear(q, hidden, hidden)?,
            k: l.linear(k, hidden, hidden)?,
            v: l.linear(v, hidden, hidden)?,
            norm,
            heads,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v) = (self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?);
        match &self.norm {
            None => Ok((q, k, v)),
            Some((nq, nk)) => {
                let (b, s, d) = q.dims3()?;
                let per_head = |t: &Tensor, n: &RmsNorm| n.forward(&t.reshape((b, s, self.heads, d / self.heads))?)?.reshape((b, s, d));
                Ok((per_head(&q, nq)?, per_head(&k, nk)?, v))
            }
        }
    }
}

/// The transformer MLP: Linear → GELU (tanh) → Linear, 4× wide.
pub struct FeedForward {
    up: Linear,
    down: Linear,
}

impl FeedForward {
    pub fn load(l: &Loader, prefix: &str, hidden: usize) -> Result<Self, EngineError> {
        Ok(FeedForward {
            up: l.linear(&format!("{prefix}.net.0.proj"), hidden, 4 * hidden)?,
            down: l.linear(&format!("{prefix}.net.2"), 4 * hidden, hidden)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.down.forward(&self.up.forward(x)?.gelu()?)
    }
}

/// Sinusoidal embedding of timesteps in [0, 1000]: (B,) → (B, 256), cosines
/// first (flip_sin_to_cos), frequencies exp(−ln(10⁴)·i/128).
///
/// Computed in F64 and rounded once: in F32, t·f at t ≈ 1000 carries an
/// error of ~6e-5 into the sinusoids, which the modulation layers amplify.
pub fn timestep_embedding(t: &Tensor) -> candle_core::Result<Tensor> {
    const HALF: usize = 128;
    let times = t.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let mut values = Vec::with_capacity(times.len() * 2 * HALF);
    for &time in &times {
        let args: Vec<f64> = (0..HALF).map(|i| time * (-(10_000f64.ln()) * i as f64 / HALF as f64).exp()).collect();
        values.extend(args.iter().map(|a| a.cos() as f32));
        values.extend(args.iter().map(|a| a.sin() as f32));
    }
    Tensor::from_vec(values, (times.len(), 2 * HALF), t.device())
}

/// Linear → SiLU → Linear.
pub struct Mlp2 {
    a: Linear,
    b: Linear,
}

impl Mlp2 {
    pub fn load(l: &Loader, prefix: &str, input: usize, hidden: usize) -> Result<Self, EngineError> {
        Ok(Mlp2 {
            a: l.linear(&format!("{prefix}.linear_1"), input, hidden)?,
            b: l.linear(&format!("{prefix}.linear_2"), hidden, hidden)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.b.forward(&self.a.forward(x)?.silu()?)
    }
}
