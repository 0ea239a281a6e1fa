//! HQQ merges on the GPU, wall clock: re-quantizing a 4-bit layer (min-max, the half-quadratic
//! solver and packing), and merging then unmerging an OFT adapter on a GPU `QuantLinear`.

use crate::bench::base::hqq_min_max;
use crate::bench::entry::{Entry, Group, Item};
use crate::bench::layers::{AdapterCost, gpu_layer, oft_adapter};
use crate::bench::plan::Plan;
use crate::bench::rotate::wall_clock;
use crate::error::Result;
use crate::formats::QuantWeight;
use crate::formats::hqq::HqqConfig;
use crate::gpu::GpuContext;
use crate::kernels::hqq_quantize::quantize_on_gpu;
use crate::tensor::Matrix;

/// The name of the wall-clock GPU re-quantization of a 4-bit HQQ weight.
pub const REQUANTIZE: &str = "hqq4 re-quantization (GPU solver)";
/// The name of the wall-clock merge then unmerge of an OFT adapter (b = 32) on a GPU layer.
pub const MERGE_UNMERGE: &str = "hqq4 merge + unmerge oft b32";

pub fn merges(
    ctx: &GpuContext,
    plan: &Plan,
    weight: &Matrix,
    on_entry: &mut dyn FnMut(&Entry),
) -> Result<Vec<Entry>> {
    let shape = (weight.rows, weight.cols);
    let config = HqqConfig::new(4, 64, 1);
    let mut resident = 0;
    let us = wall_clock(plan.wall_trials, || {
        resident = quantize_on_gpu(ctx, weight, None, &config)?.resident_bytes();
        Ok(())
    })?;
    let mut item = Item::new(Group::Merge, REQUANTIZE, shape, 0);
    item.resident_bytes = resident;
    let requantize = item.wall_clock(us);
    on_entry(&requantize);

    let base = QuantWeight::Hqq(hqq_min_max(weight, 4)?);
    let oft = oft_adapter("oft", shape.1)?;
    let mut layer = gpu_layer(ctx, &base, std::slice::from_ref(&oft))?;
    let us = wall_clock(plan.wall_trials, || {
        layer.merge(&[oft.name()], false)?;
        layer.unmerge()?;
        Ok(())
    })?;
    let mut item = Item::new(Group::Merge, MERGE_UNMERGE, shape, 0);
    item.resident_bytes = resident + AdapterCost::oft(0, shape.1).resident;
    let merge = item.wall_clock(us);
    on_entry(&merge);
    Ok(vec![requantize, merge])
}
