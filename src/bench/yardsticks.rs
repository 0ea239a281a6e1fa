//! The yardsticks every other figure is a ratio to: streaming-read bandwidth, the f32 FMA
//! ceiling, and a dense f16 matmul at each shape and M.

use crate::bench::entry::{DENSE_F16, Entry, Group, Item};
use crate::bench::matmul::time_matmul;
use crate::bench::plan::Plan;
use crate::bench::rotate::time_rotated;
use crate::error::Result;
use crate::gpu::GpuContext;
use crate::kernels::dense::GpuDenseWeight;
use crate::kernels::fma::GpuFmaPeak;
use crate::kernels::stream::GpuStreamRead;
use crate::tensor::Matrix;

/// The name of the streaming-read bandwidth yardstick.
pub const STREAM_READ: &str = "stream read";
/// The name of the f32 FMA throughput yardstick.
pub const FMA_PEAK: &str = "f32 FMA peak";

/// One read of `plan.stream_bytes` (a buffer big enough to rotate by itself), or of as much as
/// one binding of the device holds.
pub fn stream_read(ctx: &GpuContext, plan: &Plan) -> Result<Entry> {
    let binding = ctx.limits().max_storage_buffer_binding_size as usize;
    let bytes = plan.stream_bytes.min(binding / 16 * 16);
    // Distinct words, so nothing could compress or deduplicate the buffer.
    let words: Vec<u32> = (0..bytes / 4)
        .map(|i| (i as u32).wrapping_mul(0x9e37_79b9))
        .collect();
    let stream = GpuStreamRead::upload(ctx, &words)?;
    let timed = time_rotated(ctx, plan, &[vec![stream.prepare(ctx)?]])?;
    let mut item = Item::new(Group::Yardstick, STREAM_READ, (0, 0), 0);
    item.bytes = stream.bytes() as f64;
    item.resident_bytes = stream.bytes();
    Ok(item.timed(timed))
}

/// FMA chains with no memory traffic.
pub fn fma_peak(ctx: &GpuContext, plan: &Plan) -> Result<Entry> {
    let fma = GpuFmaPeak::new(ctx, plan.fma_invocations, plan.fma_steps)?;
    let timed = time_rotated(ctx, plan, &[vec![fma.prepare(ctx)?]])?;
    let mut item = Item::new(Group::Yardstick, FMA_PEAK, (0, 0), 0);
    item.flops = fma.flops();
    Ok(item.timed(timed))
}

/// Dense f16 `weight` at every M of the plan.
pub fn dense_f16(
    ctx: &GpuContext,
    plan: &Plan,
    weight: &Matrix,
    on_entry: &mut dyn FnMut(&Entry),
) -> Result<Vec<Entry>> {
    time_matmul(
        ctx,
        plan,
        (Group::Yardstick, DENSE_F16),
        (weight.rows, weight.cols),
        || GpuDenseWeight::upload(ctx, weight, None),
        on_entry,
    )
}
