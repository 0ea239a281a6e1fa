//! HQQ's buffers for the quantized matmul family (`shaders/formats/hqq.wgsl`).

use crate::error::Result;
use crate::formats::hqq::{ComputeDtype, Grouping, HqqWeight, Packing};
use crate::gpu::GpuContext;
use crate::gpu::buffers::{storage_from_bytes, uniform};
use crate::gpu::shaders::ShaderKey;
use crate::kernels::gemv::{GroupedLayout, grouped_keys};
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
    meta_storage: u32,
    pad: [u32; 2],
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
                let word_shader = shader(bits, compute, true);
                keys.extend(word_shader.keys());
                let layout = GroupedLayout {
                    slabs: 8 / bits,
                    group_size: 64,
                    rounds_weights: compute != ComputeDtype::F32,
                };
                keys.extend(grouped_keys(&word_shader, layout));
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

/// The grouped GEMV's view of a layout the word-at-a-time GEMV can read, where groups run along
/// rows (axis 1) in whole 16-input units and never straddle rows.
fn grouped_layout(b: &HqqBuffers<'_>, word_units: bool) -> Option<GroupedLayout> {
    let group_size = b.grouping.group_size;
    let fits = word_units
        && b.grouping.axis == 1
        && group_size.is_multiple_of(16)
        && b.shape.1.is_multiple_of(group_size);
    fits.then(|| GroupedLayout {
        slabs: 8 / b.packing.field_bits(),
        group_size: group_size as u32,
        rounds_weights: b.compute != ComputeDtype::F32,
    })
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
    /// How `scale` and `zero` are stored (`meta_storage` in `shaders/formats/hqq.wgsl`).
    pub meta: MetaStorage,
}

/// How an HQQ weight's scale and zero are stored on the GPU: as the checkpoint holds them where
/// that is exact, so a GEMV moves 2 bytes per value instead of 4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MetaStorage {
    /// One f32 per group.
    F32,
    /// Two f16 per u32 (the even group in the low half).
    F16,
    /// Two bf16 per u32, widened exactly by a shift.
    Bf16,
}

impl MetaStorage {
    /// `meta_storage` in `shaders/formats/hqq.wgsl`.
    fn code(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Bf16 => 2,
        }
    }

    /// The narrowest storage that holds every value of `scale` and `zero` exactly: the
    /// checkpoint's f16 / bf16 when the compute dtype says the values are in it.
    fn for_values(compute: ComputeDtype, scale: &[f32], zero: &[f32]) -> Self {
        let all = |exact: fn(f32) -> bool| scale.iter().chain(zero).all(|v| exact(*v));
        let f16_exact = |v: f32| half::f16::from_f32(v).to_f32().to_bits() == v.to_bits();
        let bf16_exact = |v: f32| v.to_bits() & 0xffff == 0;
        match compute {
            ComputeDtype::F16 if all(f16_exact) => Self::F16,
            ComputeDtype::BF16 if all(bf16_exact) => Self::Bf16,
            _ => Self::F32,
        }
    }

    /// `values` in this storage, as bytes to upload.
    fn encode(self, values: &[f32]) -> Vec<u8> {
        let halves = |bits: fn(f32) -> u16| {
            let mut out: Vec<u8> = values.iter().flat_map(|v| bits(*v).to_le_bytes()).collect();
            // Whole u32 words, whatever the count.
            out.resize(out.len().div_ceil(4) * 4, 0);
            out
        };
        match self {
            Self::F32 => bytemuck::cast_slice(values).to_vec(),
            Self::F16 => halves(|v| half::f16::from_f32(v).to_bits()),
            Self::Bf16 => halves(|v| (v.to_bits() >> 16) as u16),
        }
    }
}

impl GpuQuantWeight {
    /// Uploads an HQQ weight as stored: packed codes, scale and zero per group.
    pub fn from_hqq(ctx: &GpuContext, w: &HqqWeight) -> Result<Self> {
        let meta = MetaStorage::for_values(w.compute_dtype, &w.scale, &w.zero);
        let buffers = HqqBuffers {
            shape: (w.out_features, w.in_features),
            grouping: &w.grouping,
            packing: &w.packing,
            slab_len: w.packed_rows * w.packed_cols,
            compute: w.compute_dtype,
            packed: storage_from_bytes(ctx, "hqq W_q", &w.packed)?,
            scale: storage_from_bytes(ctx, "hqq scale", &meta.encode(&w.scale))?,
            zero: storage_from_bytes(ctx, "hqq zero", &meta.encode(&w.zero))?,
            meta,
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
        let grouped = grouped_layout(&b, slab_rows.is_some());
        let params = HqqParams {
            group_size: b.grouping.group_size as u32,
            groups: b.grouping.groups() as u32,
            axis: b.grouping.axis as u32,
            slab_len: b.slab_len as u32,
            slab_rows: slab_rows.unwrap_or(0) as u32,
            meta_storage: b.meta.code(),
            pad: [0; 2],
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
        .map(|w| w.with_grouped_layout(grouped))
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
            meta_storage,
            pad
        });
        assert_matches_shader(&shader_keys(), "FormatParams", layout);
    }
}
