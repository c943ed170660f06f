// Decode-step attention of the `g` query heads sharing one KV head, over packed QAQ
// keys and values (QaqStream) or a dense f16 cache (QaqDense16, the baseline), in the
// split-K ("flash decoding") form:
//
// 1. qaq_attn_split_{packed,f16}: one block per chunk of QAQ_ATT_CHUNK tokens reads the
//    chunk's keys and values once: raw scores (written to `scores`, `g x T`), the chunk's
//    max and sum of exp per head, and the chunk's exp-weighted value sums.
// 2. qaq_attn_combine: one block per head merges the chunks into the output row and
//    the softmax statistics (max, sum).
// 3. qaq_attn_probs: one thread per token turns the raw scores into probabilities in
//    place and writes the max over the heads (the QAQ window statistic).
//
// Queries are already scaled by 1/sqrt(d). Dynamic shared memory of the split kernel:
// (g*d + g*CHUNK + g*THREADS) floats, `launch::attention_split` computes it.

#define QAQ_ATT_CHUNK 64
#define QAQ_ATT_THREADS 256
#define QAQ_ATT_MAX_G 8

template <class K, class V>
__device__ __forceinline__ void qaq_attn_split(const K& keys, const V& vals, const float* __restrict__ q, u32 t_total,
                                               u32 g, u32 d, float* __restrict__ scores, float* __restrict__ part_m,
                                               float* __restrict__ part_l, float* __restrict__ part_acc) {
    extern __shared__ float smem[];
    float* q_sh = smem;                      // g * d
    float* p_sh = q_sh + g * d;              // g * CHUNK
    float* red = p_sh + g * QAQ_ATT_CHUNK;   // g * THREADS
    const u32 tid = threadIdx.x, lane = tid % 32, warp = tid / 32, n_warps = blockDim.x / 32;
    const u32 chunk = blockIdx.x;
    const u32 t0 = chunk * QAQ_ATT_CHUNK;
    const u32 len = min((u32)QAQ_ATT_CHUNK, t_total - t0);
    for (u32 e = tid; e < g * d; e += blockDim.x) q_sh[e] = q[e];
    __syncthreads();

    // Scores: one warp per token, lanes across the head dimension.
    for (u32 tt = warp; tt < len; tt += n_warps) {
        float acc[QAQ_ATT_MAX_G];
#pragma unroll
        for (u32 j = 0; j < QAQ_ATT_MAX_G; ++j) acc[j] = 0.0f;
        const auto kg = keys.group(t0 + tt);
        for (u32 i = lane; i < d; i += 32) {
            const float k = kg.value(i);
#pragma unroll
            for (u32 j = 0; j < QAQ_ATT_MAX_G; ++j)
                if (j < g) acc[j] += q_sh[j * d + i] * k;
        }
#pragma unroll
        for (u32 j = 0; j < QAQ_ATT_MAX_G; ++j) {
            if (j < g) {
                const float sj = qaq_warp_sum(acc[j]);
                if (lane == 0) {
                    p_sh[j * QAQ_ATT_CHUNK + tt] = sj;
                    scores[(size_t)j * t_total + t0 + tt] = sj;
                }
            }
        }
    }
    __syncthreads();

    // Chunk max and sum of exp per head; p_sh becomes exp(score - chunk max).
    for (u32 j = warp; j < g; j += n_warps) {
        float* row = p_sh + j * QAQ_ATT_CHUNK;
        float mx = __int_as_float(0xff800000);
        for (u32 tt = lane; tt < len; tt += 32) mx = fmaxf(mx, row[tt]);
        mx = qaq_warp_max(mx);
        float l = 0.0f;
        for (u32 tt = lane; tt < len; tt += 32) {
            const float e = expf(row[tt] - mx);
            row[tt] = e;
            l += e;
        }
        l = qaq_warp_sum(l);
        if (lane == 0) {
            part_m[chunk * g + j] = mx;
            part_l[chunk * g + j] = l;
        }
    }
    __syncthreads();

    // Values: thread (sub, i) accumulates dimension i over tokens sub, sub + n_sub, ...
    const u32 n_sub = blockDim.x / d;
    const u32 sub = tid / d, i = tid % d;
    if (sub < n_sub) {
        float acc[QAQ_ATT_MAX_G];
#pragma unroll
        for (u32 j = 0; j < QAQ_ATT_MAX_G; ++j) acc[j] = 0.0f;
        for (u32 tt = sub; tt < len; tt += n_sub) {
            const float v = vals.group(t0 + tt).value(i);
#pragma unroll
            for (u32 j = 0; j < QAQ_ATT_MAX_G; ++j)
                if (j < g) acc[j] += p_sh[j * QAQ_ATT_CHUNK + tt] * v;
        }
#pragma unroll
        for (u32 j = 0; j < QAQ_ATT_MAX_G; ++j)
            if (j < g) red[(sub * g + j) * d + i] = acc[j];
    }
    __syncthreads();
    for (u32 e = tid; e < g * d; e += blockDim.x) {
        const u32 j = e / d, ii = e % d;
        float s = 0.0f;
        for (u32 k = 0; k < n_sub; ++k) s += red[(k * g + j) * d + ii];
        part_acc[((size_t)chunk * g + j) * d + ii] = s;
    }
}

extern "C" __global__ void qaq_attn_split_packed(
    const u8* k_codes, const u32* k_code_off, const u16* k_m, const u16* k_s, const u8* k_bits, const u8* k_n_out,
    const u32* k_out_off, const u8* k_out_idx, const u16* k_out_val, const u8* v_codes, const u32* v_code_off,
    const u16* v_m, const u16* v_s, const u8* v_bits, const u8* v_n_out, const u32* v_out_off, const u8* v_out_idx,
    const u16* v_out_val, u32 scheme, const float* q, u32 t_total, u32 g, u32 d, float* scores, float* part_m,
    float* part_l, float* part_acc) {
    const QaqStream keys = {k_codes, k_code_off, k_m, k_s, k_bits, k_n_out, k_out_off, k_out_idx, k_out_val, scheme};
    const QaqStream vals = {v_codes, v_code_off, v_m, v_s, v_bits, v_n_out, v_out_off, v_out_idx, v_out_val, scheme};
    qaq_attn_split(keys, vals, q, t_total, g, d, scores, part_m, part_l, part_acc);
}

extern "C" __global__ void qaq_attn_split_f16(const u16* k, const u16* v, const float* q, u32 t_total, u32 g, u32 d,
                                              float* scores, float* part_m, float* part_l, float* part_acc) {
    const QaqDense16 keys = {k, d};
    const QaqDense16 vals = {v, d};
    qaq_attn_split(keys, vals, q, t_total, g, d, scores, part_m, part_l, part_acc);
}

// One block per head: out[j] = sum_c acc_c e^(m_c - M) / L, stats[2j] = M, stats[2j+1] = L.
extern "C" __global__ void qaq_attn_combine(const float* __restrict__ part_m, const float* __restrict__ part_l,
                                            const float* __restrict__ part_acc, u32 n_chunks, u32 g, u32 d,
                                            float* __restrict__ out, float* __restrict__ stats) {
    const u32 j = blockIdx.x;
    float mx = __int_as_float(0xff800000);
    for (u32 c = 0; c < n_chunks; ++c) mx = fmaxf(mx, part_m[c * g + j]);
    float l = 0.0f;
    for (u32 c = 0; c < n_chunks; ++c) l += part_l[c * g + j] * expf(part_m[c * g + j] - mx);
    for (u32 i = threadIdx.x; i < d; i += blockDim.x) {
        float o = 0.0f;
        for (u32 c = 0; c < n_chunks; ++c) o += part_acc[((size_t)c * g + j) * d + i] * expf(part_m[c * g + j] - mx);
        out[j * d + i] = o / l;
    }
    if (threadIdx.x == 0) {
        stats[2 * j] = mx;
        stats[2 * j + 1] = l;
    }
}

// probs[j*T + t] = exp(score - M_j) / L_j in place; window[t] = max over heads.
extern "C" __global__ void qaq_attn_probs(float* __restrict__ probs, const float* __restrict__ stats, u32 t_total,
                                          u32 g, float* __restrict__ window) {
    const u32 t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= t_total) return;
    float mx = 0.0f;
    for (u32 j = 0; j < g; ++j) {
        const float p = expf(probs[(size_t)j * t_total + t] - stats[2 * j]) * (1.0f / stats[2 * j + 1]);
        probs[(size_t)j * t_total + t] = p;
        mx = fmaxf(mx, p);
    }
    window[t] = mx;
}
