//! The performance suite behind `quantadapt bench` and `cargo bench`: GPU time from timestamp
//! queries (back-to-back runs over rotated weight copies, median of trials after warm-up) of
//! every kernel family and of whole layers, next to two yardsticks measured in the same run
//! (the streaming-read bandwidth and the f32 FMA ceiling) and a dense f16 matmul at every shape,
//! so that every figure is also a ratio.

mod base;
mod entry;
mod layers;
mod matmul;
mod merge;
mod mixed;
mod plan;
mod report;
mod roofline;
mod rotate;
mod targets;
mod yardsticks;

use std::time::SystemTime;

pub use base::{BASE_FORMATS, BaseFormat};
pub use entry::{DENSE_F16, Entry, Group, Timing};
pub use layers::{BARE_LAYER, lora_layer, oft_layer};
pub use merge::{MERGE_UNMERGE, REQUANTIZE};
pub use mixed::{MIXED_MANY, MIXED_ONE};
pub use plan::{Plan, Scale};
pub use report::{Report, utc_date};
pub use roofline::write_svg;
pub use targets::{TargetCheck, Verdict};
pub use yardsticks::{FMA_PEAK, STREAM_READ};

use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::tensor::Matrix;

/// The names of the quantized base matmul items, in the order they run.
pub fn base_names() -> Vec<&'static str> {
    base::BASE_FORMATS.iter().map(|f| f.name()).collect()
}

/// Runs every item of `plan` on `ctx` and calls `on_entry` as each one is measured. `command`
/// is recorded in the report as the way to reproduce it.
pub fn run(
    ctx: &GpuContext,
    plan: &Plan,
    command: &str,
    on_entry: &mut dyn FnMut(&Entry),
) -> Result<Report> {
    if !ctx.has_timestamps() {
        return Err(Error::Unsupported(
            "the bench times kernels with TIMESTAMP_QUERY, which this device does not offer".into(),
        ));
    }
    let stream = yardsticks::stream_read(ctx, plan)?;
    on_entry(&stream);
    let fma = yardsticks::fma_peak(ctx, plan)?;
    on_entry(&fma);
    let (Some(read_gbps), Some(fma_gflops)) = (stream.gb_per_s, fma.gflop_per_s) else {
        return Err(Error::Gpu("the yardsticks measured no rate".into()));
    };
    let mut entries = vec![stream, fma];
    for &(out, inp) in &plan.shapes {
        let weight = Matrix::random(out, inp, 0.05);
        entries.extend(yardsticks::dense_f16(ctx, plan, &weight, on_entry)?);
        for format in base::BASE_FORMATS {
            entries.extend(base::quantized(ctx, plan, format, &weight, on_entry)?);
        }
        entries.extend(layers::layers(ctx, plan, &weight, on_entry)?);
    }
    let (out, inp) = plan.first_shape();
    let weight = Matrix::random(out, inp, 0.05);
    entries.extend(mixed::mixed_batches(ctx, plan, &weight, on_entry)?);
    entries.extend(merge::merges(ctx, plan, &weight, on_entry)?);
    entry::fill_ratios(&mut entries, read_gbps, fma_gflops);
    let software_adapter = ctx.is_software();
    Ok(Report {
        device: ctx.describe(),
        software_adapter,
        date: utc_date(SystemTime::now()),
        command: command.to_string(),
        scale: plan.scale,
        read_gb_per_s: read_gbps,
        fma_gflop_per_s: fma_gflops,
        targets: targets::check_targets(&entries, !software_adapter),
        entries,
    })
}
