// Row softmax over the last dim with half-precision input and output and F32
// arithmetic: the attention probabilities of the MM-DiT on CUDA. One block
// per row; the input row is read three times (max, sum of exponentials,
// normalise), which L2 serves after the first read. Same numbers as casting
// the scores to F32, taking the softmax and casting back, without writing
// and reading the F32 copies. No CUDA headers: conversions are spelled out.

typedef unsigned short u16;

__device__ __forceinline__ float load(const float *p, long i) { return p[i]; }
__device__ __forceinline__ void store(float *p, long i, float v) { p[i] = v; }

struct bf16 { u16 bits; };
__device__ __forceinline__ float load(const bf16 *p, long i) {
    return __uint_as_float(((unsigned)p[i].bits) << 16);
}
__device__ __forceinline__ void store(bf16 *p, long i, float v) {
    unsigned u = __float_as_uint(v);
    // Round to nearest, ties to even; NaN stays NaN.
    u16 out = (v != v) ? (u16)0x7fc0 : (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    p[i].bits = out;
}

struct f16 { u16 bits; };
__device__ __forceinline__ float load(const f16 *p, long i) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p[i].bits));
    return f;
}
__device__ __forceinline__ void store(f16 *p, long i, float v) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p[i].bits = h;
}

// Reduces over the block (blockDim.x a multiple of 32, at most 1024).
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float *scratch) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        float other = __shfl_xor_sync(0xffffffff, v, offset);
        v = MAX ? fmaxf(v, other) : v + other;
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = blockDim.x / 32;
    v = lane < warps ? scratch[lane] : (MAX ? -INFINITY : 0.0f);
    for (int offset = 16; offset > 0; offset >>= 1) {
        float other = __shfl_xor_sync(0xffffffff, v, offset);
        v = MAX ? fmaxf(v, other) : v + other;
    }
    __syncthreads();
    return v;
}

template <typename T>
__device__ void softmax_rows(const T *x, T *y, int cols) {
    __shared__ float scratch[32];
    long base = (long)blockIdx.x * cols;
    float m = -INFINITY;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, load(x, base + c));
    m = block_reduce<true>(m, scratch);
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += expf(load(x, base + c) - m);
    s = block_reduce<false>(s, scratch);
    float inv = 1.0f / s;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) store(y, base + c, expf(load(x, base + c) - m) * inv);
}

extern "C" __global__ void softmax_rows_f32(const float *x, float *y, int cols) { softmax_rows(x, y, cols); }
extern "C" __global__ void softmax_rows_bf16(const bf16 *x, bf16 *y, int cols) { softmax_rows(x, y, cols); }
extern "C" __global__ void softmax_rows_f16(const f16 *x, f16 *y, int cols) { softmax_rows(x, y, cols); }
