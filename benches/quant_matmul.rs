//! GPU time of the quantized matmul kernels (timestamp queries, median of repeated runs after a
//! warm-up), with a dense streaming-read kernel in the same run as the bandwidth yardstick.
//! `cargo bench --bench quant_matmul`; shapes are kept small enough for a software adapter.

use quantadapt::formats::hqq::{HqqConfig, HqqWeight};
use quantadapt::gpu::timing::{median, time_pass};
use quantadapt::gpu::{ActDtype, GpuContext, GpuTensor};
use quantadapt::kernels::MatmulPath;
use quantadapt::kernels::hqq_quantize::quantize_on_gpu;
use quantadapt::kernels::quant::GpuQuantWeight;
use quantadapt::tensor::Matrix;

const REPEATS: usize = 9;

fn main() -> quantadapt::Result<()> {
    let ctx = GpuContext::new()?;
    println!("device: {}", ctx.describe());
    let (out, inp) = (1024, 1024);
    for nbits in [4, 8] {
        let mut config = HqqConfig::new(nbits, 64, 1);
        config.optimize = false;
        let layer = HqqWeight::quantize(&Matrix::random(out, inp, 0.05), None, &config)?;
        let gpu_layer = GpuQuantWeight::from_hqq(&ctx, &layer)?;
        for (m, path) in [
            (1, MatmulPath::Gemv),
            (16, MatmulPath::Tiled),
            (64, MatmulPath::Tiled),
        ] {
            let x = GpuTensor::upload(&ctx, &Matrix::random(m, inp, 1.0), ActDtype::F32)?;
            let y = GpuTensor::poisoned(&ctx, m, out, ActDtype::F32)?;
            let dispatch = gpu_layer.prepare(&ctx, &x, &y, path)?;
            time_pass(&ctx, 2, |pass| dispatch.record(pass))?;
            let us = median(&time_pass(&ctx, REPEATS, |pass| dispatch.record(pass))?);
            let bytes = gpu_layer.resident_bytes() as f64 + (m * (inp + out) * 4) as f64;
            let flops = 2.0 * (m * out * inp) as f64;
            println!(
                "hqq{nbits} {out}x{inp} M={m:<3} {path:?}: {us:9.1} us  {:7.2} GB/s  {:7.3} GFLOP/s",
                bytes / us / 1e3,
                flops / us / 1e3
            );
        }
    }
    requantize(&ctx)
}

/// HQQ re-quantization (min-max + 20 solver iterations + packing) on the GPU, wall-clock from
/// upload to the resident packed layer, median of 5.
fn requantize(ctx: &GpuContext) -> quantadapt::Result<()> {
    let (out, inp) = (1024, 1024);
    let weight = Matrix::random(out, inp, 0.05);
    let config = HqqConfig::new(4, 64, 1);
    let mut times = Vec::new();
    for _ in 0..5 {
        let start = std::time::Instant::now();
        quantize_on_gpu(ctx, &weight, None, &config)?;
        times.push(start.elapsed().as_secs_f64() * 1e6);
    }
    println!(
        "hqq4 re-quantize {out}x{inp} (solver, GPU, wall clock): {:9.1} us",
        median(&times)
    );
    Ok(())
}
