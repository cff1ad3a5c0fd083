//! The pieces the blocks are made of. Norms and softmax run in F32 whatever
//! the model's dtype, as the reference does, so F16/BF16 stay close to F32.

use candle_core::{DType, Device, Tensor, D};

use super::cpu::{self, F32View, Scratch, StreamQkv};
use super::WeightSource;
use crate::EngineError;

/// Epsilon of every norm in SD3-class models.
pub const NORM_EPS: f64 = 1e-6;

/// Loads what a layer needs from a checkpoint.
pub struct Loader<'a> {
    pub weights: &'a dyn WeightSource,
    pub dtype: DType,
    pub device: &'a Device,
    /// Build for training: products keep views of the weights they were
    /// given (so gradients reach them) and run composed tensor ops, never
    /// the fused CPU kernels, which have no gradients.
    pub trainable: bool,
}

impl Loader<'_> {
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor, EngineError> {
        self.weights.tensor(name, shape, self.dtype, self.device)
    }

    /// `prefix.weight` (out, in) and `prefix.bias` (out).
    pub fn linear(&self, prefix: &str, input: usize, output: usize) -> Result<Linear, EngineError> {
        let weight = self.tensor(&format!("{prefix}.weight"), &[output, input])?;
        let bias = self.tensor(&format!("{prefix}.bias"), &[output])?;
        self.product(&weight, bias)
    }

    /// A [`Linear`] of W (out, in) and b (out), as this loader builds them.
    pub fn product(&self, weight: &Tensor, bias: Tensor) -> Result<Linear, EngineError> {
        Ok(if self.trainable { Linear::trainable(weight, bias)? } else { Linear::new(weight, bias)? })
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
/// On the CPU, BF16 and F16 products run in F32 and are rounded back, as
/// torch's CPU kernels accumulate: candle has no BF16 matmul there, and its
/// F16 one (gemm's AVX-512-FP16 kernels where the CPU has them) accumulates
/// in F16, which doubled the error against F32.
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
    let dtype = a.dtype();
    if matches!(dtype, DType::BF16 | DType::F16) && a.device().is_cpu() {
        a.to_dtype(DType::F32)?.broadcast_matmul(&b.to_dtype(DType::F32)?)?.to_dtype(dtype)
    } else {
        a.broadcast_matmul(b)
    }
}

/// y = x·Wᵀ + b over the last dim, W: (out, in).
pub struct Linear {
    /// Wᵀ, (in, out). Stored so on the CPU (gemm streams a row-major right
    /// operand fastest, most of all for the 4·D-deep MLP down projection);
    /// elsewhere a transposed view of W, as the BLAS takes either.
    weight_t: Tensor,
    bias: Tensor,
    /// Whether F32 on the CPU takes the fused path.
    fused: bool,
}

impl Linear {
    /// From W (out, in) and b (out).
    pub fn new(weight: &Tensor, bias: Tensor) -> candle_core::Result<Self> {
        let weight_t = if weight.device().is_cpu() { weight.t()?.contiguous()? } else { weight.t()? };
        Ok(Linear { weight_t, bias, fused: true })
    }

    /// From W and b, for training: Wᵀ a view of W and composed tensor ops
    /// only, so the product is differentiable with respect to both.
    pub fn trainable(weight: &Tensor, bias: Tensor) -> candle_core::Result<Self> {
        Ok(Linear { weight_t: weight.t()?, bias, fused: false })
    }

    /// x: (B, …, in) → (B, …, out). F32 on the CPU takes the fused path
    /// (per-sample gemm, bias in one parallel pass), as the blocks do.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.fused && x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() >= 2 {
            let x = x.contiguous()?;
            let mut dims = x.dims().to_vec();
            let (batch, input) = (dims[0], dims[dims.len() - 1]);
            let rows = x.elem_count() / (batch * input).max(1);
            let mut y = self.product_fused(&F32View::of(&x)?, batch, rows, rows * input)?;
            cpu::add_bias(&mut y, &F32View::of(&self.bias)?);
            if let Some(last) = dims.last_mut() {
                *last = self.width()?;
            }
            return Tensor::from_vec(y.into_vec(), dims, x.device());
        }
        matmul(x, &self.weight_t)?.broadcast_add(&self.bias)
    }

    /// Output width.
    fn width(&self) -> candle_core::Result<usize> {
        self.weight_t.dim(1)
    }

    /// Fused CPU F32 form of x·Wᵀ without the bias: `batch` samples of `rows`
    /// rows, sample i's first row at `x[i·sample_stride..]` → (batch·rows, out).
    pub fn product_fused(&self, x: &[f32], batch: usize, rows: usize, sample_stride: usize) -> candle_core::Result<Scratch> {
        Ok(cpu::product(x, batch, rows, sample_stride, &F32View::of(&self.weight_t)?, self.width()?))
    }

    /// Fused CPU F32 residual update: residual += gate ⊙ (x·Wᵀ + b), `gate`
    /// one vector per sample (see [`Linear::product_fused`] for `x`).
    pub fn add_gated_fused(
        &self,
        residual: &mut [f32],
        x: &[f32],
        batch: usize,
        rows: usize,
        sample_stride: usize,
        gate: &[&[f32]],
    ) -> candle_core::Result<()> {
        let y = self.product_fused(x, batch, rows, sample_stride)?;
        cpu::add_gated(residual, &y, &F32View::of(&self.bias)?, rows, gate);
        Ok(())
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
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

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
        self.flat(c)?.chunk(self.parts, 1)
    }

    /// c: (B, D) → (B, parts·D), the parts side by side.
    pub fn flat(&self, c: &Tensor) -> candle_core::Result<Tensor> {
        self.linear.forward(&c.silu()?)?.contiguous()
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

/// Query/key/value projections of one stream as one (D → 3·D) product, with
/// optional QK RMSNorm (applied per head).
pub struct Qkv {
    proj: Linear,
    norm: Option<(RmsNorm, RmsNorm)>,
    heads: usize,
}

impl Qkv {
    /// `names`: the q, k, v linear prefixes and the q, k norm prefixes.
    pub fn load(l: &Loader, names: [&str; 3], norms: Option<[&str; 2]>, hidden: usize, heads: usize) -> Result<Self, EngineError> {
        let norm = match norms {
            Some([nq, nk]) => Some((l.rms_norm(nq, hidden / heads)?, l.rms_norm(nk, hidden / heads)?)),
            None => None,
        };
        let part = |name: &str, suffix: &str, shape: &[usize]| l.tensor(&format!("{name}.{suffix}"), shape);
        let weights = names.iter().map(|n| part(n, "weight", &[hidden, hidden])).collect::<Result<Vec<_>, _>>()?;
        let biases = names.iter().map(|n| part(n, "bias", &[hidden])).collect::<Result<Vec<_>, _>>()?;
        let proj = l.product(&Tensor::cat(&weights, 0)?, Tensor::cat(&biases, 0)?)?;
        Ok(Qkv { proj, norm, heads })
    }

    /// x: (B, S, D) → q, k, v: (B, S, D) each.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let qkv = self.proj.forward(x)?;
        let d = qkv.dim(2)? / 3;
        let (q, k, v) = (qkv.narrow(2, 0, d)?, qkv.narrow(2, d, d)?, qkv.narrow(2, 2 * d, d)?);
        match &self.norm {
            None => Ok((q, k, v)),
            Some((nq, nk)) => {
                let (b, s, d) = q.dims3()?;
                let per_head = |t: &Tensor, n: &RmsNorm| n.forward(&t.reshape((b, s, self.heads, d / self.heads))?)?.reshape((b, s, d));
                Ok((per_head(&q, nq)?, per_head(&k, nk)?, v))
            }
        }
    }

    /// Fused CPU F32 form, first half: x (batch, rows, D) → the q | k | v
    /// products (batch·rows, 3·D), bias and norms still to apply.
    pub fn product_fused(&self, x: &[f32], batch: usize, rows: usize) -> candle_core::Result<Scratch> {
        let d = self.proj.width()? / 3;
        self.proj.product_fused(x, batch, rows, rows * d)
    }

    /// The bias and norm scales as CPU F32 slices, for [`QkvViews::stream`].
    pub fn views(&self) -> candle_core::Result<QkvViews<'_>> {
        let norms = match &self.norm {
            Some((nq, nk)) => Some((F32View::of(nq.weight())?, F32View::of(nk.weight())?)),
            None => None,
        };
        Ok(QkvViews { bias: F32View::of(&self.proj.bias)?, norms })
    }
}

/// A [`Qkv`]'s bias and QK-norm scales, borrowed as CPU F32 slices.
pub struct QkvViews<'a> {
    bias: F32View<'a>,
    norms: Option<(F32View<'a>, F32View<'a>)>,
}

impl QkvViews<'_> {
    /// Pairs a stream's products ([`Qkv::product_fused`], `rows` per sample)
    /// with its bias and norms, for [`cpu::split_heads`].
    pub fn stream<'a>(&'a self, qkv: &'a [f32], rows: usize) -> StreamQkv<'a> {
        StreamQkv { qkv, rows, bias: &self.bias, norms: self.norms.as_ref().map(|(q, k)| (&q[..], &k[..])) }
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

    /// Fused CPU F32 residual update: residual += gate ⊙ MLP(x), x (batch,
    /// rows, D), `gate` one vector per sample.
    pub fn add_gated_fused(&self, residual: &mut [f32], x: &[f32], batch: usize, rows: usize, gate: &[&[f32]]) -> candle_core::Result<()> {
        let d = self.down.width()?;
        let mut hidden = self.up.product_fused(x, batch, rows, rows * d)?;
        cpu::bias_gelu_tanh(&mut hidden, &F32View::of(&self.up.bias)?);
        self.down.add_gated_fused(residual, &hidden, batch, rows, rows * 4 * d, gate)
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
        Ok(Mlp2 { a: l.linear(&format!("{prefix}.linear_1"), input, hidden)?, b: l.linear(&format!("{prefix}.linear_2"), hidden, hidden)? })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.b.forward(&self.a.forward(x)?.silu()?)
    }
}
