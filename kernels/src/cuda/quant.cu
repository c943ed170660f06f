// QAQ quantize + pack and dequantize of token groups, bit-exact with the CPU reference
// (`encode_group` / `decode_group` in kernels/src/simd/portable.rs).
//
// Launch: one warp per group, QAQ_QUANT_WARPS warps per block (see cuda/launch.rs).
// The min / max / sum of a group are computed in the CPU reference's exact order: eight
// strided lane accumulators (lanes 0..7 of the warp), folded in the same tree, so even
// the float sums of the mean-centred scheme agree bit for bit.

#define QAQ_QUANT_WARPS 4
#define QAQ_NONE 0xffffffffu

__device__ __forceinline__ u16 qaq_f16_down(float x) {
    const u16 h = qaq_f2h(x);
    if (qaq_h2f(h) <= x) return h;
    if ((h & 0x7fffu) == 0) return 0x8001u;
    return (h & 0x8000u) == 0 ? (u16)(h - 1) : (u16)(h + 1);
}

__device__ __forceinline__ u16 qaq_f16_up(float x) {
    const u16 h = qaq_f2h(x);
    if (qaq_h2f(h) >= x) return h;
    if ((h & 0x7fffu) == 0) return 0x0001u;
    return (h & 0x8000u) == 0 ? (u16)(h + 1) : (u16)(h - 1);
}

// `lane_min_max` of quant.rs over the values not at `ex0` / `ex1`: lanes 0..7 keep the
// eight strided accumulators, then the (i+4, i), (i+2, i), (1, 0) fold. Every lane
// returns the result.
__device__ __forceinline__ void qaq_lane_min_max(const float* v, u32 d, u32 lane, u32 ex0, u32 ex1, float* out_mn,
                                                 float* out_mx) {
    float mn = __int_as_float(0x7f800000);
    float mx = __int_as_float(0xff800000);
    if (lane < 8) {
        for (u32 i = lane; i < d; i += 8) {
            if (i == ex0 || i == ex1) continue;
            const float c = v[i];
            mn = c < mn ? c : mn;
            mx = c > mx ? c : mx;
        }
    }
    for (u32 step = 4; step > 0; step >>= 1) {
        const float omn = __shfl_down_sync(QAQ_FULL_MASK, mn, step);
        const float omx = __shfl_down_sync(QAQ_FULL_MASK, mx, step);
        if (lane < step) {
            mn = omn < mn ? omn : mn;
            mx = omx > mx ? omx : mx;
        }
    }
    *out_mn = __shfl_sync(QAQ_FULL_MASK, mn, 0);
    *out_mx = __shfl_sync(QAQ_FULL_MASK, mx, 0);
}

// `lane_sum` of quant.rs: eight strided sums from +0, then summed left to right.
__device__ __forceinline__ float qaq_lane_sum(const float* v, u32 d, u32 lane) {
    float acc = 0.0f;
    if (lane < 8) {
        for (u32 i = lane; i < d; i += 8) acc += v[i];
    }
    float total = -0.0f;
    for (int j = 0; j < 8; ++j) total += __shfl_sync(QAQ_FULL_MASK, acc, j);
    return total;
}

// Quantizes groups `0..n` of `x` (`n x d` f16) at widths `bits[t]` (0..=8 or 16 = raw),
// writing the codes at `code_off[t]`, the outliers at `out_off[t]` and the metadata.
// `k_lo` / `k_hi`: outliers per side, already capped as in `Outliers::capped`.
extern "C" __global__ void qaq_quantize(const u16* __restrict__ x, u32 n, u32 d, const u8* __restrict__ bits,
                                        const u32* __restrict__ code_off, const u32* __restrict__ out_off, u32 k_lo,
                                        u32 k_hi, u32 scheme, u8* __restrict__ codes, u16* __restrict__ meta_m,
                                        u16* __restrict__ meta_s, u8* __restrict__ meta_bits,
                                        u8* __restrict__ meta_n_out, u8* __restrict__ out_idx,
                                        u16* __restrict__ out_val, u32* __restrict__ err) {
    __shared__ float s_val[QAQ_QUANT_WARPS][QAQ_MAX_GROUP];
    __shared__ u8 s_code[QAQ_QUANT_WARPS][QAQ_MAX_GROUP];
    __shared__ u8 s_idx[QAQ_QUANT_WARPS][QAQ_MAX_GROUP];
    const u32 w = threadIdx.x / 32, lane = threadIdx.x % 32;
    const u32 g = blockIdx.x * QAQ_QUANT_WARPS + w;
    if (g >= n) return;  // the whole warp leaves together; only warp-level syncs below
    float* v = s_val[w];
    u8* c = s_code[w];
    u8* idx = s_idx[w];
    const u16* xg = x + (size_t)g * d;
    bool bad = false;
    for (u32 i = lane; i < d; i += 32) {
        const float f = qaq_h2f(xg[i]);
        v[i] = f;
        c[i] = 0;
        bad |= !(fabsf(f) <= QAQ_F16_MAX);
    }
    __syncwarp();
    const u32 b = bits[g];
    if (__any_sync(QAQ_FULL_MASK, bad)) {
        if (lane == 0) atomicOr(err, QAQ_ERR_NONFINITE);
        return;
    }
    const u32 co = code_off[g];
    if (b == QAQ_RAW) {
        for (u32 i = lane; i < d; i += 32) {
            const u16 h = qaq_f2h(v[i]);
            codes[co + 2 * i] = (u8)(h & 0xff);
            codes[co + 2 * i + 1] = (u8)(h >> 8);
        }
        if (lane == 0) {
            meta_m[g] = 0;
            meta_s[g] = 0;
            meta_bits[g] = (u8)QAQ_RAW;
            meta_n_out[g] = 0;
        }
        return;
    }
    if (b > QAQ_MAX_BITS) {
        if (lane == 0) atomicOr(err, QAQ_ERR_WIDTH);
        return;
    }

    // Outlier selection and the inlier min / max / sum (`select_small` /
    // `select_outliers`).
    float mn, mx, sum;
    u32 n_idx = 0;
    if (k_lo <= 1 && k_hi <= 1) {
        qaq_lane_min_max(v, d, lane, QAQ_NONE, QAQ_NONE, &mn, &mx);
        sum = qaq_lane_sum(v, d, lane);
        if (k_lo + k_hi > 0) {
            // First position of the min, last position of the max (`position` /
            // `rposition`); positions are stored + 1 so that 0 means "none".
            u32 first_min = QAQ_NONE, last_max1 = 0;
            for (u32 i = lane; i < d; i += 32) {
                if (v[i] == mn && first_min == QAQ_NONE) first_min = i;
                if (v[i] == mx) last_max1 = i + 1;
            }
            for (int o = 16; o > 0; o >>= 1) {
                first_min = min(first_min, __shfl_xor_sync(QAQ_FULL_MASK, first_min, o));
                last_max1 = max(last_max1, __shfl_xor_sync(QAQ_FULL_MASK, last_max1, o));
            }
            const u32 imin = first_min == QAQ_NONE ? 0 : first_min;
            u32 imax = last_max1 == 0 ? 0 : last_max1 - 1;
            if (imax == imin && k_lo == 1) imax = imin == 0 ? 1 : 0;
            u32 ex0 = k_lo == 1 ? imin : QAQ_NONE;
            u32 ex1 = k_hi == 1 ? imax : QAQ_NONE;
            if (ex0 != QAQ_NONE) sum -= v[ex0];
            if (ex1 != QAQ_NONE) sum -= v[ex1];
            // The reference's two passes (excluded values set to +inf, then -inf) equal
            // one pass that skips them.
            qaq_lane_min_max(v, d, lane, ex0, ex1, &mn, &mx);
            if (ex0 > ex1) {
                const u32 t = ex0;
                ex0 = ex1;
                ex1 = t;
            }
            if (ex0 != QAQ_NONE) idx[n_idx++] = (u8)ex0;
            if (ex1 != QAQ_NONE) idx[n_idx++] = (u8)ex1;
        }
    } else {
        // General selection, sequential on lane 0 exactly as the reference.
        if (lane == 0) {
            u8* taken = c;  // codes are computed later; reuse the buffer as flags
            for (u32 p = 0; p < k_lo + k_hi; ++p) {
                const bool low = p < k_lo;
                u32 best = QAQ_NONE;
                for (u32 i = 0; i < d; ++i) {
                    if (taken[i]) continue;
                    if (best == QAQ_NONE || (low && v[i] < v[best]) || (!low && v[i] > v[best])) best = i;
                }
                taken[best] = 1;
            }
            mn = __int_as_float(0x7f800000);
            mx = __int_as_float(0xff800000);
            sum = 0.0f;
            for (u32 i = 0; i < d; ++i) {
                if (taken[i]) {
                    idx[n_idx++] = (u8)i;
                    taken[i] = 0;
                    continue;
                }
                mn = fminf(mn, v[i]);
                mx = fmaxf(mx, v[i]);
                sum += v[i];
            }
        }
        __syncwarp();
        mn = __shfl_sync(QAQ_FULL_MASK, mn, 0);
        mx = __shfl_sync(QAQ_FULL_MASK, mx, 0);
        sum = __shfl_sync(QAQ_FULL_MASK, sum, 0);
        n_idx = __shfl_sync(QAQ_FULL_MASK, n_idx, 0);
    }
    __syncwarp();

    // Metadata and codes.
    const float levels = (float)(1u << b);
    u16 m, s;
    if (scheme == QAQ_MIDPOINT) {
        m = qaq_f16_down(mn + 0.0f);
        s = qaq_f16_up(((mx + 0.0f) - qaq_h2f(m)) / levels);
    } else {
        m = qaq_f2h(sum / (float)(d - n_idx));
        s = qaq_f2h((mx - mn) / levels);
    }
    const float mf = qaq_h2f(m), sf = qaq_h2f(s);
    if (!(fabsf(sf) <= QAQ_F16_MAX)) {
        if (lane == 0) atomicOr(err, QAQ_ERR_RANGE);
        return;
    }
    if (b > 0) {
        if (scheme == QAQ_MIDPOINT) {
            if (sf > 0.0f) {
                const float inv = 1.0f / sf;
                const float top = (float)((1u << b) - 1u);
                for (u32 i = lane; i < d; i += 32) {
                    const float q = fminf(fmaxf((v[i] - mf) * inv, 0.0f), top);
                    c[i] = (u8)(int)q;
                }
            }
        } else {
            const float half_lv = (float)(1u << (b - 1));
            const float inv = sf > 0.0f ? 1.0f / sf : 0.0f;
            for (u32 i = lane; i < d; i += 32) {
                float q = rintf((v[i] - mf) * inv);
                q = q < -half_lv ? -half_lv : (q > half_lv - 1.0f ? half_lv - 1.0f : q);
                c[i] = (u8)(int)(q + half_lv);
            }
        }
    }
    __syncwarp();
    const u32 oo = out_off[g];
    for (u32 j = lane; j < n_idx; j += 32) {
        const u32 i = idx[j];
        c[i] = 0;
        out_idx[oo + j] = (u8)i;
        out_val[oo + j] = qaq_f2h(v[i]);
    }
    __syncwarp();
    if (b > 0) {
        // 8 codes of width b fill exactly b bytes, LSB first.
        for (u32 ch = lane; ch < d / 8; ch += 32) {
            u64 acc = 0;
            for (u32 k = 0; k < 8; ++k) acc |= (u64)c[ch * 8 + k] << (k * b);
            for (u32 k = 0; k < b; ++k) codes[co + ch * b + k] = (u8)(acc >> (8 * k));
        }
    }
    if (lane == 0) {
        meta_m[g] = m;
        meta_s[g] = s;
        meta_bits[g] = (u8)b;
        meta_n_out[g] = (u8)n_idx;
    }
}

// Reconstructs groups `0..n` into `out` (`n x d` f32), as `simd::portable::decode_group`.
extern "C" __global__ void qaq_dequantize(const u8* __restrict__ codes, const u32* __restrict__ code_off,
                                          const u16* __restrict__ meta_m, const u16* __restrict__ meta_s,
                                          const u8* __restrict__ meta_bits, const u8* __restrict__ meta_n_out,
                                          const u32* __restrict__ out_off, const u8* __restrict__ out_idx,
                                          const u16* __restrict__ out_val, u32 scheme, u32 n, u32 d,
                                          float* __restrict__ out) {
    const u32 w = threadIdx.x / 32, lane = threadIdx.x % 32;
    const u32 g = blockIdx.x * QAQ_QUANT_WARPS + w;
    if (g >= n) return;
    const QaqStream st = {codes, code_off, meta_m, meta_s, meta_bits, meta_n_out, out_off, out_idx, out_val, scheme};
    const QaqGroup grp = st.group(g);
    for (u32 i = lane; i < d; i += 32) out[(size_t)g * d + i] = grp.value(i);
}

// Writes the metadata of mirrored groups (`cache::mirror::Update::records`): record `i`
// is 5 words (slot, m | s << 16, bits | n_out << 8, code offset, outlier offset). One
// thread per record; a slot past `slots` raises QAQ_ERR_INDEX and writes nothing.
extern "C" __global__ void qaq_kv_scatter(const u32* __restrict__ rec, u32 n, u32 slots, u16* __restrict__ meta_m,
                                          u16* __restrict__ meta_s, u8* __restrict__ meta_bits,
                                          u8* __restrict__ meta_n_out, u32* __restrict__ code_off,
                                          u32* __restrict__ out_off, u32* __restrict__ err) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const u32* r = rec + 5 * (size_t)i;
    const u32 slot = r[0];
    if (slot >= slots) {
        atomicOr(err, QAQ_ERR_INDEX);
        return;
    }
    meta_m[slot] = (u16)(r[1] & 0xffffu);
    meta_s[slot] = (u16)(r[1] >> 16);
    meta_bits[slot] = (u8)(r[2] & 0xffu);
    meta_n_out[slot] = (u8)((r[2] >> 8) & 0xffu);
    code_off[slot] = r[3];
    out_off[slot] = r[4];
}
