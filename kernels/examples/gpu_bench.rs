//! GPU kernel benchmark (feature `cuda`, run by `scripts/gpu-check.sh`):
//! quantize / dequantize throughput against a device-to-device copy of the same f16
//! data, and fused packed attention against the same split-K attention over a dense
//! f16 cache at T = 4k, 16k, 64k (SmolLM2 shapes: 3 query heads per KV head, d = 64).
//!
//! `cargo run --release -p qaq-kernels --features cuda --example gpu_bench [ordinal]`

use half::f16;
use qaq_kernels::cuda::{DeviceStream, Gpu};
use qaq_kernels::quant::QuantSpec;
use std::time::Instant;

fn lcg(state: &mut u64) -> f32 {
    *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

/// Mean seconds of `f` over `iters` runs after one warm-up, the device synchronized.
fn time(gpu: &Gpu, iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    gpu.synchronize().unwrap();
    let t0 = Instant::now();
    for _ in 0..iters {
        f();
    }
    gpu.synchronize().unwrap();
    t0.elapsed().as_secs_f64() / iters as f64
}

fn main() {
    let ordinal = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(0);
    let gpu = Gpu::open(ordinal).unwrap_or_else(|e| panic!("gpu_bench needs a GPU: {e}"));
    println!("device: {} (cuda:{ordinal})", gpu.name().unwrap_or_default());
    let spec = QuantSpec::default();
    let d = 64;
    let mut rng = 8u64;

    // Throughput: 2^20 groups of 64 f16 values (128 MiB), widths cycling 0..=8.
    let n = 1 << 20;
    let x: Vec<u16> = (0..n * d).map(|_| f16::from_f32(lcg(&mut rng) * 4.0).to_bits()).collect();
    let bits: Vec<u8> = (0..n).map(|t| (t % 9) as u8).collect();
    let dx = gpu.upload(&x).unwrap();
    let mut copy = gpu.zeros::<u16>(n * d).unwrap();
    let bytes = (2 * n * d) as f64;
    let t_copy = time(&gpu, 20, || gpu.stream().memcpy_dtod(&dx, &mut copy).unwrap());
    let mut s = DeviceStream::for_widths(&gpu, d, &spec, &bits).unwrap();
    let t_q = time(&gpu, 20, || gpu.quantize_into(&dx, &spec, &mut s).unwrap());
    let t_dq = time(&gpu, 20, || drop(gpu.dequantize(&s).unwrap()));
    let gbs = |t: f64| bytes / t / 1e9;
    println!(
        "memcpy d2d      {:8.1} GB/s ({:.3} ms for {:.0} MiB of f16)",
        gbs(t_copy),
        t_copy * 1e3,
        bytes / 1048576.0
    );
    println!("quantize        {:8.1} GB/s of f16 input ({:.2}x memcpy)", gbs(t_q), t_copy / t_q);
    println!(
        "dequantize      {:8.1} GB/s of f16-equivalent output ({:.2}x memcpy; writes f32, allocation included)",
        gbs(t_dq),
        t_copy / t_dq
    );

    // Attention: one KV head, 3 query heads, mixed widths 2..=8 (mean 5).
    let g = 3;
    let q: Vec<f32> = (0..g * d).map(|_| lcg(&mut rng) * 0.5).collect();
    let dq = gpu.upload(&q).unwrap();
    println!("attention (g = {g}, d = {d})       packed QAQ      f16   packed/f16 time");
    for t in [4096usize, 16_384, 65_536] {
        let kx: Vec<u16> = (0..t * d).map(|_| f16::from_f32(lcg(&mut rng) * 4.0).to_bits()).collect();
        let vx: Vec<u16> = (0..t * d).map(|_| f16::from_f32(lcg(&mut rng) * 4.0).to_bits()).collect();
        let wb: Vec<u8> = (0..t).map(|i| 2 + (i % 7) as u8).collect();
        let (dk, dv) = (gpu.upload(&kx).unwrap(), gpu.upload(&vx).unwrap());
        let kq = gpu.quantize_f16(&dk, d, &wb, &spec).unwrap();
        let vq = gpu.quantize_f16(&dv, d, &wb, &spec).unwrap();
        let mut buf = gpu.attn_buffers(t, g, d).unwrap();
        let tp = time(&gpu, 50, || gpu.attend_packed(&kq, &vq, &dq, &mut buf).unwrap());
        let tf = time(&gpu, 50, || gpu.attend_f16(&dk, &dv, &dq, &mut buf).unwrap());
        println!(
            "  T = {t:6}  ({:5.1} MiB vs {:5.1} MiB)  {:8.1} us {:8.1} us   {:.2}",
            (kq.device_bytes() + vq.device_bytes()) as f64 / 1048576.0,
            (4 * t * d) as f64 / 1048576.0,
            tp * 1e6,
            tf * 1e6,
            tp / tf
        );
    }
}
