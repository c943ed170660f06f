// Elementwise and row kernels of the llama forward pass and of sampling. Row kernels run
// one block of QAQ_ROW_THREADS threads per row (see cuda/launch.rs).

#define QAQ_ROW_THREADS 256

struct QaqAdd {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct QaqMax {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Block-wide reduction of `v` with `op` (identity `id`); every thread gets the result.
// `scratch`: 32 floats of shared memory.
template <class Op>
__device__ __forceinline__ float qaq_block_reduce(float v, float* scratch, float id, Op op) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(QAQ_FULL_MASK, v, o));
    const u32 lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = (blockDim.x + 31) / 32;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < n_warps ? scratch[lane] : id;
    for (int o = 16; o > 0; o >>= 1) t = op(t, __shfl_xor_sync(QAQ_FULL_MASK, t, o));
    return t;
}

// y = x / sqrt(mean(x^2) + eps) * w, one row of `n` values per block.
extern "C" __global__ void qaq_rmsnorm(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
                                       u32 n, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * n;
    float* yr = y + (size_t)blockIdx.x * n;
    float ss = 0.0f;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    ss = qaq_block_reduce(ss, scratch, 0.0f, QaqAdd());
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * r * w[i];
}

// Rotate-half RoPE in place on `x` (`rows x n_heads x head_dim`), row r at position
// pos[r]: (x_i, x_{i+h/2}) turns by pos * theta^(-2i/h). One thread per pair.
extern "C" __global__ void qaq_rope(float* __restrict__ x, const u32* __restrict__ pos, u32 rows, u32 n_heads,
                                    u32 head_dim, float theta) {
    const u32 half_d = head_dim / 2;
    const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)rows * n_heads * half_d) return;
    const u32 i = (u32)(e % half_d);
    const size_t rh = e / half_d;
    const u32 r = (u32)(rh / n_heads);
    const float inv_freq = powf(theta, -2.0f * (float)i / (float)head_dim);
    float sn, cs;
    sincosf((float)pos[r] * inv_freq, &sn, &cs);
    float* p = x + rh * head_dim;
    const float a = p[i], b = p[i + half_d];
    p[i] = a * cs - b * sn;
    p[i + half_d] = a * sn + b * cs;
}

// out = silu(gate) * up, elementwise over n values.
extern "C" __global__ void qaq_silu_mul(const float* __restrict__ gate, const float* __restrict__ up,
                                        float* __restrict__ out, u32 n) {
    const u32 e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n) return;
    const float gv = gate[e];
    out[e] = gv / (1.0f + expf(-gv)) * up[e];
}

// out[r] = table[ids[r]] (f16 rows of `dim` values) as f32; a bad id raises
// QAQ_ERR_INDEX and writes zeros. Grid: (rows, ceil(dim / block)).
extern "C" __global__ void qaq_embed_f16(const u16* __restrict__ table, const u32* __restrict__ ids, u32 vocab,
                                         u32 dim, float* __restrict__ out, u32* __restrict__ err) {
    const u32 r = blockIdx.x;
    const u32 i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= dim) return;
    const u32 id = ids[r];
    if (id >= vocab) {
        out[(size_t)r * dim + i] = 0.0f;
        if (i == 0) atomicOr(err, QAQ_ERR_INDEX);
        return;
    }
    out[(size_t)r * dim + i] = qaq_h2f(table[(size_t)id * dim + i]);
}

// In-place softmax of each row of `n` logits divided by the temperature
// (`inv_temp` = 1/T), as `attention::softmax_rows` for inv_temp = 1.
extern "C" __global__ void qaq_softmax_rows(float* __restrict__ x, u32 n, float inv_temp) {
    __shared__ float scratch[32];
    float* row = x + (size_t)blockIdx.x * n;
    float mx = __int_as_float(0xff800000);
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) mx = fmaxf(mx, row[i] * inv_temp);
    mx = qaq_block_reduce(mx, scratch, __int_as_float(0xff800000), QaqMax());
    float sum = 0.0f;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
        const float e = expf(row[i] * inv_temp - mx);
        row[i] = e;
        sum += e;
    }
    sum = qaq_block_reduce(sum, scratch, 0.0f, QaqAdd());
    const float inv = 1.0f / sum;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) row[i] *= inv;
}

// Warp-wide (value, index) maximum, the lower index on ties; every lane gets it.
__device__ __forceinline__ void qaq_warp_argmax(float& best, u32& bi) {
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(QAQ_FULL_MASK, best, o);
        const u32 oi = __shfl_xor_sync(QAQ_FULL_MASK, bi, o);
        if (ov > best || (ov == best && oi < bi)) {
            best = ov;
            bi = oi;
        }
    }
}

// out[r] = the first index of the largest value of row r (greedy sampling).
extern "C" __global__ void qaq_argmax_rows(const float* __restrict__ x, u32 n, u32* __restrict__ out) {
    __shared__ float s_val[32];
    __shared__ u32 s_idx[32];
    const float* row = x + (size_t)blockIdx.x * n;
    float best = __int_as_float(0xff800000);
    u32 bi = 0xffffffffu;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
        if (row[i] > best || bi == 0xffffffffu) {
            best = row[i];
            bi = i;
        }
    }
    qaq_warp_argmax(best, bi);
    const u32 lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = (blockDim.x + 31) / 32;
    if (lane == 0) {
        s_val[warp] = best;
        s_idx[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        best = lane < n_warps ? s_val[lane] : __int_as_float(0xff800000);
        bi = lane < n_warps ? s_idx[lane] : 0xffffffffu;
        qaq_warp_argmax(best, bi);
        if (lane == 0) out[blockIdx.x] = bi;
    }
}

// y = f16(x) (round to nearest even) over n values: the f16 operands of the GEMMs.
extern "C" __global__ void qaq_f32_to_f16(const float* __restrict__ x, u16* __restrict__ y, u32 n) {
    const u32 e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e < n) y[e] = qaq_f2h(x[e]);
}

// x += y over n values (the residual stream).
extern "C" __global__ void qaq_add(float* __restrict__ x, const float* __restrict__ y, u32 n) {
    const u32 e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e < n) x[e] += y[e];
}

// x[h] = s (.) (H x[h]) / sqrt(d) for each head row of d values (d a power of two, at
// most 1024; `signs` holds s / sqrt(d)): the inverse of a KV cache's rotation (a policy's
// `+rot`), applied to the attention outputs, which are in the rotated space of the
// values. One block of d threads per head; the fast Walsh-Hadamard transform in shared
// memory, the same butterflies as the CPU's `Rotation::unrotate`.
extern "C" __global__ void qaq_unrotate_heads(float* __restrict__ x, const float* __restrict__ signs, u32 d) {
    extern __shared__ float sh[];
    float* row = x + (size_t)blockIdx.x * d;
    const u32 i = threadIdx.x;
    sh[i] = row[i];
    __syncthreads();
    for (u32 h = 1; h < d; h *= 2) {
        const float a = sh[i], b = sh[i ^ h];
        __syncthreads();
        sh[i] = (i & h) ? b - a : a + b;
        __syncthreads();
    }
    row[i] = sh[i] * signs[i];
}

// x[r][i] += b[i] for the `total / n` rows of `n` values (a linear layer's bias).
extern "C" __global__ void qaq_add_bias(float* __restrict__ x, const float* __restrict__ b, u32 n, u32 total) {
    const u32 e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e < total) x[e] += b[e % n];
}
