//! HQQ's buffers for the quantized matmul family (`shaders/formats/hqq.wgsl`).

use crate::error::Result;
use crate::formats::hqq::{ComputeDtype, Grouping, HqqWeight, Packing};
use crate::gpu::GpuContext;
use crate::gpu::buffers::{storage_from_bytes, storage_from_f32, uniform};
use crate::gpu::shaders::ShaderKey;
use crate::kernels::quant::{FormatShader, GpuQuantWeight};

/// Mirrors `FormatParams` in `shaders/formats/hqq.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct HqqParams {
    group_size: u32,
    groups: u32,
    axis: u32,
    slab_len: u32,
    slab_rows: u32,
    pad: [u32; 3],
}

/// `COMPUTE` in `shaders/common/rounding.wgsl`.
pub(crate) fn compute_code(compute: ComputeDtype) -> u32 {
    match compute {
        ComputeDtype::F32 => 0,
        ComputeDtype::F16 => 1,
        ComputeDtype::BF16 => 2,
    }
}

fn shader(field_bits: u32, compute: ComputeDtype, word_units: bool) -> FormatShader {
    FormatShader {
        flag: "HQQ",
        consts: vec![
            ("FIELD_BITS", field_bits),
            ("COMPUTE", compute_code(compute)),
        ],
        word_units,
    }
}

/// Field widths whose GEMV can decode a packed word at a time: four byte-packed elements.
const WORD_FIELD_BITS: [u32; 3] = [8, 4, 2];

/// Every HQQ specialization the library can request.
pub fn shader_keys() -> Vec<ShaderKey> {
    let mut keys = Vec::new();
    for bits in [8, 4, 3, 2, 1] {
        for compute in [ComputeDtype::F32, ComputeDtype::F16, ComputeDtype::BF16] {
            keys.extend(shader(bits, compute, false).keys());
            if WORD_FIELD_BITS.contains(&bits) {
                keys.extend(shader(bits, compute, true).keys());
            }
        }
    }
    keys
}

/// Rows of W per slab when the GEMV can decode this layout a word at a time
/// (`WORD_UNITS` in `shaders/formats/hqq.wgsl`): byte-packed fields, slabs of whole rows with
/// no padding, 16 | K (a unit is 16 bytes of a packed row), and a word's four elements in one group (axis 1) or in four consecutive
/// groups that do not wrap (axis 0).
fn word_unit_slab_rows(b: &HqqBuffers<'_>) -> Option<usize> {
    let (out_features, in_features) = b.shape;
    let field_bits = b.packing.field_bits();
    let slabs = (8 / field_bits) as usize;
    let groups_aligned = match b.grouping.axis {
        1 => b.grouping.group_size.is_multiple_of(4),
        _ => b.grouping.groups().is_multiple_of(4),
    };
    let fits = WORD_FIELD_BITS.contains(&field_bits)
        && in_features.is_multiple_of(16)
        && b.slab_len * slabs == out_features * in_features
        && b.slab_len.is_multiple_of(in_features)
        && groups_aligned;
    fits.then(|| b.slab_len / in_features)
}

/// Where an HQQ weight's packed codes, scale and zero sit on the GPU, and how they are laid out.
pub(crate) struct HqqBuffers<'a> {
    pub shape: (usize, usize),
    pub grouping: &'a Grouping,
    pub packing: &'a Packing,
    /// Stored elements per slab: packed rows x packed cols.
    pub slab_len: usize,
    pub compute: ComputeDtype,
    pub packed: wgpu::Buffer,
    pub scale: wgpu::Buffer,
    pub zero: wgpu::Buffer,
}

impl GpuQuantWeight {
    /// Uploads an HQQ weight as stored: packed codes, scale and zero per group.
    pub fn from_hqq(ctx: &GpuContext, w: &HqqWeight) -> Result<Self> {
        let buffers = HqqBuffers {
            shape: (w.out_features, w.in_features),
            grouping: &w.grouping,
            packing: &w.packing,
            slab_len: w.packed_rows * w.packed_cols,
            compute: w.compute_dtype,
            packed: storage_from_bytes(ctx, "hqq W_q", &w.packed)?,
            scale: storage_from_f32(ctx, "hqq scale", &w.scale)?,
            zero: storage_from_f32(ctx, "hqq zero", &w.zero)?,
        };
        Self::from_hqq_buffers(ctx, buffers, w.bias.as_deref())
    }

    /// An HQQ layer from buffers already on the GPU (uploaded, or written by the GPU quantizer).
    pub(crate) fn from_hqq_buffers(
        ctx: &GpuContext,
        b: HqqBuffers<'_>,
        bias: Option<&[f32]>,
    ) -> Result<Self> {
        let slab_rows = word_unit_slab_rows(&b);
        let params = HqqParams {
            group_size: b.grouping.group_size as u32,
            groups: b.grouping.groups() as u32,
            axis: b.grouping.axis as u32,
            slab_len: b.slab_len as u32,
            slab_rows: slab_rows.unwrap_or(0) as u32,
            pad: [0; 3],
        };
        let bindings = vec![
            (1, uniform(ctx, "hqq params", &params)?),
            (2, b.packed),
            (3, b.scale),
            (4, b.zero),
        ];
        Self::new(
            ctx,
            b.shape,
            shader(b.packing.field_bits(), b.compute, slab_rows.is_some()),
            bindings,
            bias,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::layout::{assert_matches_shader, rust_layout};

    #[test]
    fn params_match_the_shader() {
        let layout = rust_layout!(HqqParams {
            group_size,
            groups,
            axis,
            slab_len,
            slab_rows,
            pad
        });
        assert_matches_shader(&shader_keys(), "FormatParams", layout);
    }
}
