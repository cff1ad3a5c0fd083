//! The CPU F32 kernels of the joint block, written against slices.
//!
//! candle's composed ops make a fresh buffer per op and run elementwise ops on
//! one thread; on a CPU that overhead cost more than the products themselves.
//! Here every product is one `gemm` call per sample that reads its operands
//! where they lie (strided views, no transposes or concatenations); biases,
//! LayerNorm + modulation, GELU, gated residuals and QK RMSNorm are folded
//! into one parallel pass each; attention is blocked by query rows, so a
//! block's scores stay in cache and the S×S matrix is never built; and
//! intermediates reuse pooled buffers instead of faulting in fresh pages.
//!
//! Numerics follow the composed path (layers.rs): the same sums in F32, exp
//! to about 2 ulp (a polynomial that vectorises, instead of libm's scalar
//! call), GELU's tanh written as the logistic x / (1 + e^(−2u)), which has no
//! cancellation. `block.rs` tests the two paths against each other and the
//! parity tests check this one against diffusers.

use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, PoisonError, RwLockReadGuard};

use candle_core::{bail, CpuStorage, Result, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Query rows per attention task: 128 rows' scores against 4250 keys (SD3 at
/// 1024²) are 2 MiB, about a core's L2.
const QUERY_BLOCK: usize = 128;

/// Elementwise passes split their rows into parallel tasks of about this
/// many elements, so small tensors stay on one thread.
const TASK_ELEMENTS: usize = 1 << 14;

/// Below this, exp() is under F32's smallest normal: softmax takes 0.
const EXP_FLOOR: f32 = -87.0;

/// How many freed scratch buffers are kept for reuse.
const POOL_BUFFERS: usize = 16;

static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A buffer for a block's intermediates, returned to a small pool when
/// dropped. Fresh allocations of many MiB come from the OS as untouched
/// pages, and faulting them in cost as much as the passes that fill them;
/// reuse keeps them resident. The pool holds up to `POOL_BUFFERS` buffers for
/// the life of the process, the largest being the MLP's hidden activations
/// (batch · image tokens · 4·D floats).
pub struct Scratch(Vec<f32>);

impl Scratch {
    /// `len` elements with unspecified contents (what an earlier user left,
    /// or zeros): callers overwrite every element.
    pub fn new(len: usize) -> Scratch {
        let mut pool = POOL.lock().unwrap_or_else(PoisonError::into_inner);
        let fits = pool.iter().enumerate().filter(|(_, b)| b.capacity() >= len).min_by_key(|(_, b)| b.capacity()).map(|(i, _)| i);
        let mut buffer = fits.map(|i| pool.swap_remove(i)).unwrap_or_default();
        drop(pool);
        buffer.resize(len, 0.0);
        Scratch(buffer)
    }

    /// The buffer itself, for a tensor to own; it leaves the pool for good.
    pub fn into_vec(mut self) -> Vec<f32> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mut pool = POOL.lock().unwrap_or_else(PoisonError::into_inner);
        if self.0.capacity() > 0 && pool.len() < POOL_BUFFERS {
            pool.push(std::mem::take(&mut self.0));
        }
    }
}

impl Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.0
    }
}

/// A contiguous CPU F32 tensor's data, borrowed for as long as the view lives.
pub struct F32View<'a> {
    storage: RwLockReadGuard<'a, Storage>,
    start: usize,
    end: usize,
}

impl<'a> F32View<'a> {
    /// # Errors
    /// When the tensor is not a contiguous F32 tensor on the CPU.
    pub fn of(t: &'a Tensor) -> Result<Self> {
        let (storage, layout) = t.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("fused CPU path: tensor of shape {:?} is not contiguous", t.dims())
        };
        if !matches!(&*storage, Storage::Cpu(CpuStorage::F32(_))) {
            bail!("fused CPU path: tensor is {:?} on {:?}, not F32 on the CPU", t.dtype(), t.device().location())
        }
        Ok(F32View { storage, start, end })
    }
}

impl Deref for F32View<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(data)) => &data[self.start..self.end],
            // `of` admits nothing else and the guard keeps the storage as it was.
            _ => unreachable!("F32View holds CPU F32 storage"),
        }
    }
}

/// A matrix inside a slice: element (i, j) at `data[i·row_stride + j·col_stride]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// # Panics
    /// When the matrix reaches past the slice: a caller's indexing bug, never input.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Self {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * row_stride + (cols - 1) * col_stride;
            assert!(last < data.len(), "{rows}×{cols} matrix (strides {row_stride}, {col_stride}) past a slice of {}", data.len());
        }
        Mat { data, rows, cols, row_stride, col_stride }
    }

    /// Row-major, `cols` wide.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat::new(data, rows, cols, cols, 1)
    }
}

/// `dst` (row-major, rows `dst_stride` apart) = (`accumulate` ? dst : 0) + scale · a·b.
///
/// `parallel` lets gemm split the product over rayon's threads; callers that
/// are already parallel tasks pass false.
///
/// # Panics
/// When shapes disagree or `dst` is too short: indexing bugs, never input.
pub fn gemm_into(dst: &mut [f32], dst_stride: usize, a: Mat, b: Mat, accumulate: bool, scale: f32, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "inner dims of a {m}×{k} by {}×{n} product", b.rows);
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * dst_stride + n <= dst.len(), "{m}×{n} product into {} elements", dst.len());
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_stride).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    let parallelism =
        if parallel && rayon::current_num_threads() > 1 { Parallelism::Rayon(rayon::current_num_threads()) } else { Parallelism::None };
    // SAFETY: `Mat::new` and the assert above keep every element gemm reads
    // (i < m, j < n, l < k at the given strides) inside its slice, and `dst`
    // is borrowed mutably, so nothing else aliases what gemm writes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// x·W for `batch` samples of `rows` rows each, sample i's rows starting at
/// `x[i·sample_stride..]`. One product per sample, never one over the whole
/// batch: gemm picks kernels by the row count, so a batched product would
/// change a sample's last bits with its batch-mates.
/// `weight_t`: W as (k, n) row-major. Returns (batch·rows, n), without the
/// bias, which the pass consuming the product adds.
pub fn product(x: &[f32], batch: usize, rows: usize, sample_stride: usize, weight_t: &[f32], n: usize) -> Scratch {
    let k = weight_t.len() / n.max(1);
    let mut out = Scratch::new(batch * rows * n);
    let one = |sample: usize, sample_out: &mut [f32], parallel: bool| {
        gemm_into(sample_out, n, Mat::rows(&x[sample * sample_stride..], rows, k), Mat::rows(weight_t, k, n), false, 1.0, parallel)
    };
    // Whole samples per thread where they divide evenly (no synchronisation
    // inside a product, and a 154-row text product is too small to split
    // well); otherwise each product split over the threads. The bits are the
    // same either way (tested below), so a sample's result does not depend on
    // its batch.
    let threads = rayon::current_num_threads();
    // (`max(1)`: an empty product has no chunks, and chunks of 0 panic.)
    if threads > 1 && batch.is_multiple_of(threads) {
        out.par_chunks_mut((rows * n).max(1)).enumerate().for_each(|(sample, sample_out)| one(sample, sample_out, false));
    } else {
        out.chunks_mut((rows * n).max(1)).enumerate().for_each(|(sample, sample_out)| one(sample, sample_out, true));
    }
    out
}

/// Rows per parallel task for rows of `width` elements.
fn rows_per_task(width: usize) -> usize {
    (TASK_ELEMENTS / width.max(1)).max(1)
}

/// LayerNorm (no affine, `eps`) then x·(1 + scale) + shift, per row of
/// `width`; `shift` and `scale` hold one `width` vector per sample.
pub fn layer_norm_modulate(x: &[f32], width: usize, rows_per_sample: usize, shift: &[&[f32]], scale: &[&[f32]], eps: f32) -> Scratch {
    let mut out = Scratch::new(x.len());
    let per_task = rows_per_task(width);
    out.par_chunks_mut(per_task * width).zip(x.par_chunks(per_task * width)).enumerate().for_each(|(task, (out, x))| {
        for (i, (dst, row)) in out.chunks_mut(width).zip(x.chunks(width)).enumerate() {
            let sample = (task * per_task + i) / rows_per_sample.max(1);
            layer_norm_row(row, dst, eps);
            for ((d, &sh), &sc) in dst.iter_mut().zip(shift[sample]).zip(scale[sample]) {
                *d = *d * (1.0 + sc) + sh;
            }
        }
    });
    out
}

/// (x − mean) / √(var + eps) of one row into `dst`. Two passes (mean, then
/// the centred variance) for accuracy at large means.
pub fn layer_norm_row(row: &[f32], dst: &mut [f32], eps: f32) {
    let n = row.len() as f32;
    let mean = lane_sum(row, |v| v) / n;
    let var = lane_sum(row, |v| (v - mean) * (v - mean)) / n;
    let inv = 1.0 / (var + eps).sqrt();
    dst.iter_mut().zip(row).for_each(|(d, &v)| *d = (v - mean) * inv);
}

/// Softmax of one row into `dst`; entries more than 87 below the row's
/// maximum are exact zeros.
pub fn softmax_row(row: &[f32], dst: &mut [f32]) {
    dst.copy_from_slice(row);
    let inv = 1.0 / simd::exp_row(dst);
    dst.iter_mut().for_each(|v| *v *= inv);
}

/// x += gate ⊙ (y + bias) per row of `bias.len()`; `gate` holds one vector
/// per sample.
pub fn add_gated(x: &mut [f32], y: &[f32], bias: &[f32], rows_per_sample: usize, gate: &[&[f32]]) {
    let width = bias.len();
    let per_task = rows_per_task(width);
    x.par_chunks_mut(per_task * width).zip(y.par_chunks(per_task * width)).enumerate().for_each(|(task, (x, y))| {
        for (i, (xr, yr)) in x.chunks_mut(width).zip(y.chunks(width)).enumerate() {
            let g = gate[(task * per_task + i) / rows_per_sample.max(1)];
            for (((xv, &yv), &gv), &bv) in xr.iter_mut().zip(yr).zip(g).zip(bias) {
                *xv += (yv + bv) * gv;
            }
        }
    });
}

/// x += bias per row of `bias.len()`.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    let width = bias.len().max(1);
    x.par_chunks_mut(rows_per_task(width) * width)
        .for_each(|rows| rows.chunks_mut(width).for_each(|row| row.iter_mut().zip(bias).for_each(|(v, &b)| *v += b)));
}

/// GELU (tanh approximation) of x + bias, in place, per row of `bias.len()`.
/// 0.5·x·(1 + tanh(u)) equals x / (1 + e^(−2u)), u = √(2/π)·(x + 0.044715·x³).
pub fn bias_gelu_tanh(x: &mut [f32], bias: &[f32]) {
    let width = bias.len();
    x.par_chunks_mut(rows_per_task(width) * width).for_each(|rows| rows.chunks_mut(width).for_each(|row| simd::bias_gelu(row, bias)));
}

/// One stream's share of a joint attention: its q | k | v products
/// ((batch, rows, 3·D), bias not yet added), the bias (3·D) and, with QK-norm,
/// the RMSNorm scales of q and k (head_dim each).
pub struct StreamQkv<'a> {
    pub qkv: &'a [f32],
    pub rows: usize,
    pub bias: &'a [f32],
    pub norms: Option<(&'a [f32], &'a [f32])>,
}

/// Attention operands, head-major: per (sample, head) q scaled by
/// 1/√head_dim (S, head_dim), kᵀ (head_dim, S) and v (S, head_dim), each
/// contiguous, so the products read them at full speed and the key/value
/// panels are gathered once per head instead of once per query block.
pub struct Heads {
    q: Scratch,
    k_t: Scratch,
    v: Scratch,
    batch: usize,
    heads: usize,
    seq: usize,
    head_dim: usize,
}

/// Adds the biases, applies QK RMSNorm and the 1/√head_dim scale (to q,
/// before the product, as the composed path does) and lays the streams'
/// tokens out head-major, in stream order: the joint sequence is the first
/// stream's rows then the second's.
pub fn split_heads(streams: &[StreamQkv], batch: usize, d: usize, heads: usize, eps: f32) -> Heads {
    let head_dim = d / heads;
    let seq: usize = streams.iter().map(|s| s.rows).sum();
    let scale = 1.0 / (head_dim as f32).sqrt();
    let per_head = seq * head_dim;
    let (mut q, mut k_t, mut v) =
        (Scratch::new(batch * heads * per_head), Scratch::new(batch * heads * per_head), Scratch::new(batch * heads * per_head));
    let chunk = per_head.max(1);
    q.par_chunks_mut(chunk).zip(k_t.par_chunks_mut(chunk)).zip(v.par_chunks_mut(chunk)).enumerate().for_each(|(task, ((q, k_t), v))| {
        let (sample, head) = (task / heads, task % heads);
        let col = head * head_dim;
        let mut token = 0;
        let mut kd = vec![0f32; head_dim];
        for stream in streams {
            let bias = |part: usize| &stream.bias[part * d + col..part * d + col + head_dim];
            let (bq, bk, bv) = (bias(0), bias(1), bias(2));
            for row in stream.qkv[sample * stream.rows * 3 * d..].chunks(3 * d).take(stream.rows) {
                let qd = &mut q[token * head_dim..(token + 1) * head_dim];
                qd.iter_mut().zip(&row[col..]).zip(bq).for_each(|((o, &x), &b)| *o = x + b);
                kd.iter_mut().zip(&row[d + col..]).zip(bk).for_each(|((o, &x), &b)| *o = x + b);
                if let Some((nq, nk)) = stream.norms {
                    rms_norm(qd, nq, eps);
                    rms_norm(&mut kd, nk, eps);
                }
                qd.iter_mut().for_each(|x| *x *= scale);
                for (j, &x) in kd.iter().enumerate() {
                    k_t[j * seq + token] = x;
                }
                let vd = &mut v[token * head_dim..(token + 1) * head_dim];
                vd.iter_mut().zip(&row[2 * d + col..]).zip(bv).for_each(|((o, &x), &b)| *o = x + b);
                token += 1;
            }
        }
    });
    Heads { q, k_t, v, batch, heads, seq, head_dim }
}

/// x / √(mean(x²) + eps) · weight, in place.
fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    let inv = 1.0 / (lane_sum(x, |v| v * v) / x.len() as f32 + eps).sqrt();
    x.iter_mut().zip(weight).for_each(|(v, &w)| *v = (*v * inv) * w);
}

/// Softmax attention over `h`'s tokens; returns (batch, seq, D), heads side
/// by side. Tasks are (sample, block of `QUERY_BLOCK` query rows); each runs
/// every head with single-threaded products: scores = q·kᵀ, e^(s − max) in
/// place, scores·v into the task's own rows of the output, divided by the
/// row sums.
pub fn attention(h: &Heads) -> Scratch {
    let (seq, head_dim) = (h.seq, h.head_dim);
    let d = h.heads * head_dim;
    let per_head = seq * head_dim;
    let mut out = Scratch::new(h.batch * seq * d);
    let tasks: Vec<(usize, usize, &mut [f32])> = out
        .chunks_mut((seq * d).max(1))
        .enumerate()
        .flat_map(|(sample, rows)| rows.chunks_mut(QUERY_BLOCK * d).enumerate().map(move |(block, rows)| (sample, block, rows)))
        .collect();
    tasks.into_par_iter().for_each(|(sample, block, out_rows)| {
        let first = block * QUERY_BLOCK;
        let count = out_rows.len() / d;
        let mut scores = Scratch::new(count * seq);
        let mut sums = vec![0f32; count];
        for head in 0..h.heads {
            let at = (sample * h.heads + head) * per_head;
            let q = Mat::rows(&h.q[at + first * head_dim..], count, head_dim);
            gemm_into(&mut scores, seq, q, Mat::rows(&h.k_t[at..], head_dim, seq), false, 1.0, false);
            // Softmax's division comes after the product: head_dim divisions
            // per row instead of seq.
            scores.chunks_mut(seq).zip(sums.iter_mut()).for_each(|(row, sum)| *sum = simd::exp_row(row));
            let v = Mat::rows(&h.v[at..], seq, head_dim);
            gemm_into(&mut out_rows[head * head_dim..], d, Mat::rows(&scores, count, seq), v, false, 1.0, false);
            for (row, &sum) in out_rows.chunks_mut(d).zip(&sums) {
                let inv = 1.0 / sum;
                row[head * head_dim..(head + 1) * head_dim].iter_mut().for_each(|v| *v *= inv);
            }
        }
    });
    out
}

/// Σ f(v) over a slice with 16 independent partial sums, so the loop
/// vectorises (a single running sum is a serial dependency).
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = values.chunks_exact(16);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v);
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().map(|&v| f(v)).sum::<f32>()
}

/// The exp-heavy row kernels, compiled three times: for AVX-512 and for
/// AVX2 + FMA where the CPU has them (chosen at run time, with fused
/// multiply-adds), and for the baseline target.
mod simd {
    use super::EXP_FLOOR;

    /// a·b + c, fused where the variant's target has FMA (a libm call otherwise).
    #[inline(always)]
    fn mul_add<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
        if FMA {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }

    /// e^x to about 2 ulp for x in [−87.3, 88.3] (clamped outside): x = n·ln2 + r
    /// with |r| ≤ ln2/2, e^r by Cephes' degree-6 polynomial, 2ⁿ into the
    /// exponent bits. Branch-free, so loops over it vectorise.
    #[inline(always)]
    pub(super) fn exp<const FMA: bool>(x: f32) -> f32 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        // ln 2 split so n·LN2_HI is exact for |n| < 2⁹.
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        // 1.5·2²³: adding and subtracting it rounds to the nearest integer.
        const ROUND: f32 = 12_582_912.0;
        let x = x.clamp(-87.3, 88.3);
        let shifted = mul_add::<FMA>(x, LOG2E, ROUND);
        let n = shifted - ROUND;
        let r = mul_add::<FMA>(-n, LN2_LO, mul_add::<FMA>(-n, LN2_HI, x));
        let mut p = 1.987_569_1e-4_f32;
        p = mul_add::<FMA>(p, r, 1.398_199_9e-3);
        p = mul_add::<FMA>(p, r, 8.333_452e-3);
        p = mul_add::<FMA>(p, r, 4.166_579_6e-2);
        p = mul_add::<FMA>(p, r, 1.666_666_5e-1);
        p = mul_add::<FMA>(p, r, 0.5);
        let er = mul_add::<FMA>(p, r * r, r) + 1.0;
        // The low bits of `shifted` hold n in two's complement and n + 127 is
        // in [1, 254], so shifting it into place builds 2ⁿ without a
        // float-to-int cast (Rust's saturating cast does not vectorise).
        er * f32::from_bits(shifted.to_bits().wrapping_add(127) << 23)
    }

    /// e^(x − max) in place over the row; returns their sum.
    #[inline(always)]
    fn exp_row_body<const FMA: bool>(row: &mut [f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; 16];
        let mut chunks = row.chunks_exact(16);
        for chunk in &mut chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                *lane = lane.max(v);
            }
        }
        let max = chunks.remainder().iter().chain(&lanes).copied().fold(f32::NEG_INFINITY, f32::max);
        let floored_exp = |v: f32| {
            let shifted = v - max;
            if shifted < EXP_FLOOR {
                0.0
            } else {
                exp::<FMA>(shifted)
            }
        };
        let mut sums = [0f32; 16];
        let mut chunks = row.chunks_exact_mut(16);
        for chunk in &mut chunks {
            for (sum, v) in sums.iter_mut().zip(chunk) {
                *v = floored_exp(*v);
                *sum += *v;
            }
        }
        let mut sum: f32 = sums.iter().sum();
        for v in chunks.into_remainder() {
            *v = floored_exp(*v);
            sum += *v;
        }
        sum
    }

    #[inline(always)]
    fn bias_gelu_body<const FMA: bool>(values: &mut [f32], bias: &[f32]) {
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        for (v, &b) in values.iter_mut().zip(bias) {
            let x = *v + b;
            let u = SQRT_2_OVER_PI * mul_add::<FMA>(0.044_715 * x, x * x, x);
            *v = x / (1.0 + exp::<FMA>(-2.0 * u));
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        #[target_feature(enable = "avx512f,fma")]
        pub fn exp_row_avx512(row: &mut [f32]) -> f32 {
            super::exp_row_body::<true>(row)
        }
        #[target_feature(enable = "avx512f,fma")]
        pub fn bias_gelu_avx512(values: &mut [f32], bias: &[f32]) {
            super::bias_gelu_body::<true>(values, bias)
        }
        #[target_feature(enable = "avx2,fma")]
        pub fn exp_row_avx2(row: &mut [f32]) -> f32 {
            super::exp_row_body::<true>(row)
        }
        #[target_feature(enable = "avx2,fma")]
        pub fn bias_gelu_avx2(values: &mut [f32], bias: &[f32]) {
            super::bias_gelu_body::<true>(values, bias)
        }
    }

    /// The widest variant this CPU runs.
    #[derive(Clone, Copy, PartialEq)]
    enum Level {
        Avx512,
        Avx2,
        Baseline,
    }

    fn level() -> Level {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
                return Level::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Level::Avx2;
            }
        }
        Level::Baseline
    }

    /// e^(x − max(row)) in place, entries more than 87 below the maximum
    /// exactly 0; returns the sum, by which the caller divides (softmax).
    pub fn exp_row(row: &mut [f32]) -> f32 {
        match level() {
            // SAFETY: `level` checked that the CPU has these features.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { x86::exp_row_avx512(row) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { x86::exp_row_avx2(row) },
            _ => exp_row_body::<false>(row),
        }
    }

    /// GELU of values + bias, elementwise, in place.
    pub fn bias_gelu(values: &mut [f32], bias: &[f32]) {
        match level() {
            // SAFETY: `level` checked that the CPU has these features.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { x86::bias_gelu_avx512(values, bias) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { x86::bias_gelu_avx2(values, bias) },
            _ => bias_gelu_body::<false>(values, bias),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm_over_the_range_softmax_uses() {
        for fused in [false, true] {
            let mut worst = (0, 0f32);
            for i in 0..=200_000 {
                let x = -87.0 + 175.0 * i as f32 / 200_000.0;
                let ours = if fused { simd::exp::<true>(x) } else { simd::exp::<false>(x) };
                let err = ulps(ours, (x as f64).exp() as f32);
                if err > worst.0 {
                    worst = (err, x);
                }
            }
            assert!(worst.0 <= 2, "fused multiply-adds {fused}: {} ulp at x = {}", worst.0, worst.1);
        }
    }

    #[test]
    fn bias_gelu_matches_the_tanh_formula() {
        let bias: Vec<f32> = (0..40).map(|i| i as f32 / 40.0 - 0.5).collect();
        let mut x: Vec<f32> = (-4000..4000).map(|i| i as f32 / 400.0).collect();
        let expected: Vec<f64> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let v = v as f64 + bias[i % 40] as f64;
                0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh())
            })
            .collect();
        bias_gelu_tanh(&mut x, &bias);
        for (got, want) in x.iter().zip(&expected) {
            assert!((*got as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()), "{got} vs {want}");
        }
    }

    #[test]
    fn exp_row_gives_softmax_after_dividing_by_its_sum_and_floors_far_entries() {
        let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        row.push(-1e30);
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let denominator: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
        let expected: Vec<f64> = row.iter().map(|&v| ((v - max) as f64).exp() / denominator).collect();
        let sum = simd::exp_row(&mut row);
        assert!((sum as f64 - denominator).abs() <= 1e-6 * denominator, "{sum} vs {denominator}");
        for (got, want) in row.iter().zip(&expected) {
            let got = *got as f64 / sum as f64;
            assert!((got - want).abs() <= 1e-6 * want.max(1e-3), "{got} vs {want}");
        }
        assert_eq!(row.last().copied(), Some(0.0));
    }

    /// Strided gemm against a plain triple loop: a transposed operand, a
    /// destination with a wider stride, accumulation and scale.
    #[test]
    fn gemm_into_reads_strided_operands_and_accumulates() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.3).cos()).collect();
        // b stored transposed (n, k) and read as (k, n).
        let b_t: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut dst = vec![1f32; m * (n + 2)];
        gemm_into(&mut dst, n + 2, Mat::rows(&a, m, k), Mat::new(&b_t, k, n, 1, k), true, 0.5, false);
        for i in 0..m {
            for j in 0..n + 2 {
                let want = if j < n { 1.0 + 0.5 * (0..k).map(|l| a[i * k + l] * b_t[j * k + l]).sum::<f32>() } else { 1.0 };
                assert!((dst[i * (n + 2) + j] - want).abs() < 1e-5, "({i}, {j})");
            }
        }
    }

    /// `product` runs a batch's samples on separate threads, each product
    /// single-threaded, and a lone sample as one product split over the
    /// threads: that is only batch-invariant if threading never changes a
    /// product's bits. Checked at the model's shapes (text and image rows,
    /// D- and 4·D-deep products).
    #[test]
    fn threading_does_not_change_a_products_bits() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        for (m, k, n) in [(154, 384, 1152), (1024, 384, 1536), (1024, 1536, 384), (77, 4096, 384), (4, 384, 96)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 104_729) % 2003) as f32 / 2003.0 - 0.5).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 7919) % 1009) as f32 / 1009.0 - 0.5).collect();
            let run = |parallel: bool| {
                let mut dst = vec![0f32; m * n];
                pool.install(|| gemm_into(&mut dst, n, Mat::rows(&a, m, k), Mat::rows(&b, k, n), false, 1.0, parallel));
                dst
            };
            assert!(run(true) == run(false), "{m}×{k}×{n}: threaded and single-threaded products differ");
        }
    }

    /// Pooled buffers come back at the asked length whatever they held.
    #[test]
    fn scratch_buffers_are_reused_at_the_asked_length() {
        let big = Scratch::new(1000);
        drop(big);
        let small = Scratch::new(10);
        assert_eq!(small.len(), 10);
        let grown = Scratch::new(5000);
        assert_eq!(grown.len(), 5000);
    }
}
