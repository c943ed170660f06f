// Shared by every qaq CUDA source: the Rust side prepends this text to each `.cu` file
// before handing it to NVRTC (no include paths, no CUDA headers needed).
//
// f16 values travel as raw 16-bit patterns (`u16`) and are converted with PTX `cvt`
// (round to nearest even, like the `half` crate), so the device reproduces the CPU
// reference's bytes exactly.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define QAQ_RAW 16u
#define QAQ_MAX_BITS 8u
#define QAQ_MAX_GROUP 256u
#define QAQ_FULL_MASK 0xffffffffu
#define QAQ_F16_MAX 65504.0f

// Error bits raised through the `err` word of a launch.
#define QAQ_ERR_NONFINITE 1u
#define QAQ_ERR_RANGE 2u
#define QAQ_ERR_WIDTH 4u
#define QAQ_ERR_INDEX 8u

// Reconstruction schemes (`Scheme` in kernels/src/quant.rs).
#define QAQ_MIDPOINT 0u
#define QAQ_MEAN_CENTRED 1u

__device__ __forceinline__ float qaq_h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 qaq_f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float qaq_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(QAQ_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float qaq_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(QAQ_FULL_MASK, v, o));
    return v;
}

// `x_hat = m + (code + offset) * s`: `Scheme::offset`.
__device__ __forceinline__ float qaq_offset(u32 scheme, u32 bits) {
    if (scheme == QAQ_MIDPOINT) return 0.5f;
    if (bits == 0) return -0.5f;
    return -(float)(1u << (bits - 1));
}

// One group of a QaqStream: `value(i)` is what `simd::portable::decode_group` reconstructs.
struct QaqGroup {
    const u8* codes;
    const u8* out_idx;
    const u16* out_val;
    u32 bits;
    u32 n_out;
    float base;
    float s;

    __device__ __forceinline__ float value(u32 i) const {
        if (bits == QAQ_RAW) return qaq_h2f((u16)(codes[2 * i] | ((u32)codes[2 * i + 1] << 8)));
        for (u32 j = 0; j < n_out; ++j) {
            if (out_idx[j] == i) return qaq_h2f(out_val[j]);
        }
        if (bits == 0) return base;
        const u32 bit = i * bits;
        const u32 sh = bit & 7u;
        u32 w = codes[bit >> 3];
        if (sh + bits > 8u) w |= (u32)codes[(bit >> 3) + 1] << 8;
        return base + (float)((w >> sh) & ((1u << bits) - 1u)) * s;
    }
};

// One stream of groups (one layer, KV head, K or V) in the device layout of
// kernels/src/cuda/layout.rs: per-group metadata arrays, each group's codes at
// `code_off[t]` in one byte buffer (LSB-first bit packing, byte aligned, raw groups as
// little-endian f16), its outliers at `out_off[t]` in the index / value buffers.
struct QaqStream {
    const u8* codes;
    const u32* code_off;
    const u16* m;
    const u16* s;
    const u8* bits;
    const u8* n_out;
    const u32* out_off;
    const u8* out_idx;
    const u16* out_val;
    u32 scheme;

    // Group `t`'s metadata, read once for all its values.
    __device__ __forceinline__ QaqGroup group(u32 t) const {
        QaqGroup g;
        g.bits = bits[t];
        g.codes = codes + code_off[t];
        g.n_out = g.bits == QAQ_RAW ? 0 : n_out[t];
        g.out_idx = out_idx + out_off[t];
        g.out_val = out_val + out_off[t];
        g.s = qaq_h2f(s[t]);
        g.base = g.bits == QAQ_RAW ? 0.0f : qaq_h2f(m[t]) + qaq_offset(scheme, g.bits) * g.s;
        return g;
    }
};

// A dense token-major f16 cache (`T x d`), the baseline the packed kernels race.
struct QaqDense16Row {
    const u16* x;
    __device__ __forceinline__ float value(u32 i) const { return qaq_h2f(x[i]); }
};

struct QaqDense16 {
    const u16* x;
    u32 d;
    __device__ __forceinline__ QaqDense16Row group(u32 t) const { return QaqDense16Row{x + (size_t)t * d}; }
};
