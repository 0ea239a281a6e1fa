//! A mixed batch: 16 rows through one 4-bit HQQ layer, each row with its own LoRA adapter
//! (`prepare_forward_mixed`), against the same rows all on one adapter.

use crate::bench::base::hqq_min_max;
use crate::bench::entry::{Entry, Group, Item, f32_bytes};
use crate::bench::layers::{AdapterCost, gpu_layer, lora_adapter, lora_layer};
use crate::bench::plan::{MIXED_ROWS, Plan};
use crate::bench::rotate::{build_copies, launches, time_rotated};
use crate::error::Result;
use crate::formats::QuantWeight;
use crate::gpu::{ActDtype, GpuContext, GpuTensor};
use crate::kernels::quant::GpuQuantWeight;
use crate::layer::Fusion;
use crate::tensor::Matrix;

/// The name of the mixed batch whose 16 rows each use their own LoRA adapter.
pub const MIXED_MANY: &str = "mixed batch, 16 lora r16 adapters";
/// The name of the same mixed batch with every row on one LoRA adapter.
pub const MIXED_ONE: &str = "mixed batch, 1 lora r16 adapter";

/// Both mixed batches over a 4-bit HQQ quantization of `weight`; their baseline is the plain
/// forward with one LoRA adapter at the same M, as a layer runs it by default (fusion auto).
pub fn mixed_batches(
    ctx: &GpuContext,
    plan: &Plan,
    weight: &Matrix,
    on_entry: &mut dyn FnMut(&Entry),
) -> Result<Vec<Entry>> {
    let shape = (weight.rows, weight.cols);
    let (out, inp) = shape;
    let m = MIXED_ROWS;
    let base = QuantWeight::Hqq(hqq_min_max(weight, 4)?);
    let base_resident = GpuQuantWeight::upload(ctx, &base)?.resident_bytes();
    let adapters = (0..m)
        .map(|i| lora_adapter(&format!("lora{i}"), shape))
        .collect::<Result<Vec<_>>>()?;
    let all = AdapterCost::lora(m, shape, m);
    let resident = base_resident + all.resident;
    let layers = build_copies(plan.copies(resident), || gpu_layer(ctx, &base, &adapters))?;
    let distinct: Vec<&str> = adapters.iter().map(|a| a.name()).collect();
    let same = vec![distinct[0]; m];
    let mut entries = Vec::new();
    for (name, names, used) in [(MIXED_MANY, &distinct, m), (MIXED_ONE, &same, 1)] {
        let mut runs = Vec::with_capacity(layers.len());
        for layer in &layers {
            let x = GpuTensor::upload(ctx, &Matrix::random(m, inp, 1.0), ActDtype::F32)?;
            let y = GpuTensor::output(ctx, m, out, ActDtype::F32)?;
            runs.push(
                layer
                    .prepare_forward_mixed(&x, names, &y)?
                    .dispatches()
                    .to_vec(),
            );
        }
        let extra = AdapterCost::lora(m, shape, used);
        let mut item = Item::new(Group::Mixed, name, shape, m);
        item.launches = launches(&runs[0]);
        // The rotate launch copies x for rows without OFT: written and read back.
        item.bytes =
            base_resident as f64 + 3.0 * f32_bytes(m, inp) + f32_bytes(m, out) + extra.bytes;
        item.flops = 2.0 * (m * out * inp) as f64 + extra.flops;
        item.resident_bytes = resident;
        item.baseline = Some(lora_layer(Fusion::Auto));
        let entry = item.timed(time_rotated(ctx, plan, &runs)?);
        on_entry(&entry);
        entries.push(entry);
    }
    Ok(entries)
}
