//! HQQ's buffers for the quantized matmul family (`shaders/formats/hqq.wgsl`).

use crate::error::Result;
use crate::formats::hqq::{ComputeDtype, HqqWeight};
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
}

fn shader(field_bits: u32, compute: ComputeDtype) -> FormatShader {
    let compute = match compute {
        ComputeDtype::F32 => 0,
        ComputeDtype::F16 => 1,
        ComputeDtype::BF16 => 2,
    };
    FormatShader {
        flag: "HQQ",
        consts: vec![("FIELD_BITS", field_bits), ("COMPUTE", compute)],
    }
}

/// Every HQQ specialization the library can request.
pub fn shader_keys() -> Vec<ShaderKey> {
    let mut keys = Vec::new();
    for bits in [8, 4, 3, 2, 1] {
        for compute in [ComputeDtype::F32, ComputeDtype::F16, ComputeDtype::BF16] {
            keys.extend(shader(bits, compute).keys());
        }
    }
    keys
}

impl GpuQuantWeight {
    /// Uploads an HQQ weight as stored: packed codes, scale and zero per group.
    pub fn from_hqq(ctx: &GpuContext, w: &HqqWeight) -> Result<Self> {
        let params = HqqParams {
            group_size: w.grouping.group_size as u32,
            groups: w.grouping.groups() as u32,
            axis: w.grouping.axis as u32,
            slab_len: (w.packed_rows * w.packed_cols) as u32,
        };
        let bindings = vec![
            (1, uniform(ctx, "hqq params", &params)),
            (2, storage_from_bytes(ctx, "hqq W_q", &w.packed)?),
            (3, storage_from_f32(ctx, "hqq scale", &w.scale)?),
            (4, storage_from_f32(ctx, "hqq zero", &w.zero)?),
        ];
        Self::new(
            ctx,
            (w.out_features, w.in_features),
            shader(w.packing.field_bits(), w.compute_dtype),
            bindings,
            w.bias.as_deref(),
        )
    }
}
