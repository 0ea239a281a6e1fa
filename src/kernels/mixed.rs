//! Mixed batches on the GPU (`shaders/mixed_adapters.wgsl`): every row picks its own adapter and
//! each kernel (rotate, shrink, expand) runs once for the whole batch, whatever the number of
//! adapters, segmented by a per-row slot index.

use crate::error::{Error, Result};
use crate::gpu::buffers::{scratch_f32, storage_from_bytes, storage_from_f32, uniform};
use crate::gpu::shaders::ShaderKey;
use crate::gpu::{ActDtype, GpuContext, GpuTensor};
use crate::kernels::fused::LoraEpilogue;
use crate::kernels::{Dispatch, bind_resources, check_io, grid};
use crate::tensor::Matrix;

/// Invocations per workgroup of the elementwise kernels (rotate, expand).
const WORKGROUP: u32 = 256;
/// Invocations per workgroup of the shrink, which sum one element of `h` over K together.
const SHRINK_WORKGROUP: u32 = 64;
const TABLE_STRIDE: usize = 8;
const KIND_OFT: u32 = 1;
const KIND_LORA: u32 = 2;
/// Marks "no adapter" in a row's slot and "not DoRA" in a LoRA slot.
pub const NONE: u32 = u32::MAX;

/// Mirrors `MixedParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct MixedParams {
    m: u32,
    k: u32,
    n: u32,
    max_rank: u32,
    has_bias: u32,
    pad: [u32; 3],
}

/// One adapter of a mixed batch.
pub enum MixedSlot<'a> {
    /// The distinct `b x b` blocks, row-major (one when shared).
    Oft {
        /// `stored x b x b` values.
        blocks: &'a [f32],
        /// `b`: rows and columns of each block.
        block_size: usize,
    },
    /// `a: [r, in]`, `b: [out, r]`; `dora_scale` = magnitude / row norm, per output.
    Lora {
        /// The down projection, `[r, in]`.
        a: &'a Matrix,
        /// The up projection, `[out, r]`.
        b: &'a Matrix,
        /// `s` in `s·B·A`.
        scaling: f32,
        /// `[out]`, DoRA only.
        dora_scale: Option<&'a [f32]>,
    },
}

/// The kernel `entry`; the shrink adds across its workgroup with subgroup operations when
/// `subgroups` (workgroup memory otherwise).
fn key(entry: &'static str, act: ActDtype, subgroups: bool) -> ShaderKey {
    // The module declares the shrink's workgroup memory, sized by WG, for every entry point.
    ShaderKey::new("mixed_adapters", entry, act)
        .constant("WG", SHRINK_WORKGROUP)
        .flag("SUBGROUP", entry == "shrink" && subgroups)
}

/// Every specialization of the mixed-batch kernels (rotate, shrink, expand), for f32 and f16
/// activations, for [`catalogue`](super::catalogue).
pub fn shader_keys() -> Vec<ShaderKey> {
    let mut keys = Vec::new();
    for act in [ActDtype::F32, ActDtype::F16] {
        for entry in ["rotate", "expand"] {
            keys.push(key(entry, act, false));
        }
        for subgroups in [false, true] {
            keys.push(key("shrink", act, subgroups));
        }
    }
    keys
}

/// Every adapter of a layer packed into one weights buffer and one slot table.
#[derive(Debug)]
pub struct GpuMixedAdapters {
    in_features: usize,
    out_features: usize,
    max_rank: usize,
    table: wgpu::Buffer,
    weights: wgpu::Buffer,
}

impl GpuMixedAdapters {
    /// Packs `slots` (slot `i` is table entry `i`) for a layer of `in_features` inputs and
    /// `out_features` outputs. Fails with [`Error::Shape`] when a slot's blocks or matrices do
    /// not fit those.
    pub fn upload(
        ctx: &GpuContext,
        in_features: usize,
        out_features: usize,
        slots: &[MixedSlot<'_>],
    ) -> Result<Self> {
        let mut table = Vec::with_capacity(slots.len() * TABLE_STRIDE);
        let mut weights: Vec<f32> = Vec::new();
        let mut max_rank = 1;
        for slot in slots {
            let offset = weights.len() as u32;
            let mut row = match slot {
                MixedSlot::Oft { blocks, block_size } => {
                    let per_block = block_size * block_size;
                    if *block_size == 0
                        || blocks.is_empty()
                        || !blocks.len().is_multiple_of(per_block)
                    {
                        return Err(Error::shape(
                            "mixed OFT blocks",
                            format!("multiples of {block_size}x{block_size}"),
                            &[blocks.len()],
                        ));
                    }
                    weights.extend_from_slice(blocks);
                    vec![
                        KIND_OFT,
                        offset,
                        *block_size as u32,
                        (blocks.len() / per_block) as u32,
                    ]
                }
                MixedSlot::Lora {
                    a,
                    b,
                    scaling,
                    dora_scale,
                } => {
                    if a.cols != in_features || b.rows != out_features || b.cols != a.rows {
                        return Err(Error::shape(
                            "mixed LoRA",
                            format!("A [r, {in_features}], B [{out_features}, r]"),
                            &[a.rows, a.cols, b.rows, b.cols],
                        ));
                    }
                    max_rank = max_rank.max(a.rows);
                    weights.extend_from_slice(&a.data);
                    let b_offset = weights.len() as u32;
                    weights.extend_from_slice(&b.data);
                    let dora = match dora_scale {
                        Some(g) if g.len() == out_features => {
                            let at = weights.len() as u32;
                            weights.extend_from_slice(g);
                            at
                        }
                        Some(g) => {
                            return Err(Error::shape(
                                "DoRA scale",
                                format!("[{out_features}]"),
                                &[g.len()],
                            ));
                        }
                        None => NONE,
                    };
                    vec![
                        KIND_LORA,
                        offset,
                        b_offset,
                        a.rows as u32,
                        scaling.to_bits(),
                        dora,
                    ]
                }
            };
            row.resize(TABLE_STRIDE, 0);
            table.extend(row);
        }
        if table.is_empty() {
            table.resize(TABLE_STRIDE, 0);
        }
        Ok(Self {
            in_features,
            out_features,
            max_rank,
            table: storage_from_bytes(ctx, "mixed table", bytemuck::cast_slice(&table))?,
            weights: storage_from_f32(ctx, "mixed weights", &weights)?,
        })
    }

    /// The slot index of each row ([`NONE`] for the base alone), on the GPU.
    pub fn row_slots(&self, ctx: &GpuContext, slots: &[u32]) -> Result<wgpu::Buffer> {
        storage_from_bytes(ctx, "row slots", bytemuck::cast_slice(slots))
    }

    fn params(&self, ctx: &GpuContext, m: usize, has_bias: bool) -> Result<wgpu::Buffer> {
        uniform(
            ctx,
            "mixed params",
            &MixedParams {
                m: m as u32,
                k: self.in_features as u32,
                n: self.out_features as u32,
                max_rank: self.max_rank as u32,
                has_bias: has_bias as u32,
                pad: [0; 3],
            },
        )
    }

    /// Binds the per-row OFT rotation `x -> rotated` (rows without an OFT slot are copied).
    /// Fails with [`Error::Shape`] unless both are `[m, in]` of one dtype.
    pub fn prepare_rotate(
        &self,
        ctx: &GpuContext,
        row_slots: &wgpu::Buffer,
        x: &GpuTensor,
        rotated: &GpuTensor,
    ) -> Result<Dispatch> {
        check_io(x, rotated, self.in_features, self.in_features)?;
        let pipeline = ctx.pipeline(&key("rotate", x.dtype, false))?;
        let params = self.params(ctx, x.rows, false)?;
        let bind = bind_resources(
            ctx,
            &pipeline,
            vec![
                (0, params.as_entire_binding()),
                (1, row_slots.as_entire_binding()),
                (2, self.table.as_entire_binding()),
                (3, self.weights.as_entire_binding()),
                (4, x.binding()),
                (7, rotated.binding()),
            ],
        )?;
        Ok(Dispatch::elementwise(pipeline, bind, x.numel(), WORKGROUP))
    }

    /// Binds the per-row shrink `h = x · Aᵀ` of the rows' LoRA slots (`[m, max_rank]` f32,
    /// returned with the launch).
    pub fn prepare_shrink(
        &self,
        ctx: &GpuContext,
        row_slots: &wgpu::Buffer,
        x: &GpuTensor,
    ) -> Result<(Dispatch, wgpu::Buffer)> {
        if x.cols != self.in_features {
            return Err(Error::shape(
                "x",
                format!("[m, {}]", self.in_features),
                &[x.rows, x.cols],
            ));
        }
        let m = x.rows;
        let h = scratch_f32(ctx, "mixed h", m * self.max_rank)?;
        let params = self.params(ctx, m, false)?;
        let shrink = ctx.pipeline(&key("shrink", x.dtype, ctx.has_subgroups()))?;
        let bind = bind_resources(
            ctx,
            &shrink,
            vec![
                (0, params.as_entire_binding()),
                (1, row_slots.as_entire_binding()),
                (2, self.table.as_entire_binding()),
                (3, self.weights.as_entire_binding()),
                (4, x.binding()),
                (5, h.as_entire_binding()),
            ],
        )?;
        let dispatch = Dispatch::new(shrink, bind, grid((m * self.max_rank) as u32));
        Ok((dispatch, h))
    }

    /// The per-row expand as a matmul epilogue (`kernels::fused`), `h` from
    /// [`Self::prepare_shrink`].
    pub fn epilogue<'a>(
        &'a self,
        row_slots: &'a wgpu::Buffer,
        h: &'a wgpu::Buffer,
    ) -> LoraEpilogue<'a> {
        LoraEpilogue::PerRow {
            h,
            row_slots,
            table: &self.table,
            weights: &self.weights,
            max_rank: self.max_rank,
        }
    }

    /// Binds the per-row LoRA / DoRA terms added into `y` (rows without a LoRA slot untouched):
    /// the shrink and expand launches, in order. Fails with [`Error::Shape`] unless `x: [m, in]`
    /// and `y: [m, out]` share rows and dtype.
    pub fn prepare_lora(
        &self,
        ctx: &GpuContext,
        row_slots: &wgpu::Buffer,
        x: &GpuTensor,
        y: &GpuTensor,
        bias: Option<&wgpu::Buffer>,
    ) -> Result<[Dispatch; 2]> {
        check_io(x, y, self.in_features, self.out_features)?;
        let (shrink, h) = self.prepare_shrink(ctx, row_slots, x)?;
        let params = self.params(ctx, x.rows, bias.is_some())?;
        let expand = ctx.pipeline(&key("expand", x.dtype, false))?;
        let expand_bind = bind_resources(
            ctx,
            &expand,
            vec![
                (0, params.as_entire_binding()),
                (1, row_slots.as_entire_binding()),
                (2, self.table.as_entire_binding()),
                (3, self.weights.as_entire_binding()),
                (5, h.as_entire_binding()),
                (6, bias.unwrap_or(&self.weights).as_entire_binding()),
                (7, y.binding()),
            ],
        )?;
        Ok([
            shrink,
            Dispatch::elementwise(expand, expand_bind, x.rows * self.out_features, WORKGROUP),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::layout::{assert_matches_shader, rust_layout};

    #[test]
    fn params_match_the_shader() {
        let layout = rust_layout!(MixedParams {
            m,
            k,
            n,
            max_rank,
            has_bias,
            pad
        });
        assert_matches_shader(&shader_keys(), "MixedParams", layout);
    }
}
