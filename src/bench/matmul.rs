//! Timing of a single weight matmul (dense f16 or quantized) at every M of the plan, over
//! rotated copies of the weight.

use crate::bench::entry::{Entry, Group, Item, f32_bytes};
use crate::bench::plan::Plan;
use crate::bench::rotate::{build_copies, launches, time_rotated};
use crate::error::Result;
use crate::gpu::{ActDtype, GpuContext, GpuTensor};
use crate::kernels::dense::GpuDenseWeight;
use crate::kernels::quant::GpuQuantWeight;
use crate::kernels::{Dispatch, MatmulPath};
use crate::tensor::Matrix;

/// A weight resident on the GPU that binds `y = x · Wᵀ (+ bias)`.
pub trait GpuMatmul {
    fn prepare_matmul(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
        y: &GpuTensor,
        path: MatmulPath,
    ) -> Result<Dispatch>;
    fn resident(&self) -> usize;
}

impl GpuMatmul for GpuDenseWeight {
    fn prepare_matmul(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
        y: &GpuTensor,
        path: MatmulPath,
    ) -> Result<Dispatch> {
        self.prepare(ctx, x, y, path)
    }

    fn resident(&self) -> usize {
        self.resident_bytes()
    }
}

impl GpuMatmul for GpuQuantWeight {
    fn prepare_matmul(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
        y: &GpuTensor,
        path: MatmulPath,
    ) -> Result<Dispatch> {
        self.prepare(ctx, x, y, path)
    }

    fn resident(&self) -> usize {
        self.resident_bytes()
    }
}

/// Uploads enough copies of one weight for the rotation (`upload` makes one) and times `name`
/// at every M of the plan; each M rotates through as many copies as its x and y allow.
pub fn time_matmul<W: GpuMatmul>(
    ctx: &GpuContext,
    plan: &Plan,
    (group, name): (Group, &str),
    shape: (usize, usize),
    mut upload: impl FnMut() -> Result<W>,
    on_entry: &mut dyn FnMut(&Entry),
) -> Result<Vec<Entry>> {
    let (out, inp) = shape;
    let first = upload()?;
    let resident = first.resident();
    let per_copy = |m: usize| resident + (f32_bytes(m, inp) + f32_bytes(m, out)) as usize;
    let mut weights = vec![first];
    weights.extend(build_copies(plan.copies(per_copy(1)) - 1, &mut upload)?);
    let mut entries = Vec::new();
    for &m in &plan.rows {
        let copies = plan.copies(per_copy(m)).min(weights.len());
        let path = MatmulPath::for_rows(m);
        let mut runs = Vec::with_capacity(copies);
        for w in &weights[..copies] {
            // The launch's bind group keeps x and y alive.
            let x = GpuTensor::upload(ctx, &Matrix::random(m, inp, 1.0), ActDtype::F32)?;
            let y = GpuTensor::output(ctx, m, out, ActDtype::F32)?;
            runs.push(vec![w.prepare_matmul(ctx, &x, &y, path)?]);
        }
        let mut item = Item::new(group, name, shape, m);
        item.launches = launches(&runs[0]);
        item.bytes = resident as f64 + f32_bytes(m, inp) + f32_bytes(m, out);
        item.flops = 2.0 * (m * out * inp) as f64;
        item.resident_bytes = resident;
        let entry = item.timed(time_rotated(ctx, plan, &runs)?);
        on_entry(&entry);
        entries.push(entry);
    }
    Ok(entries)
}
