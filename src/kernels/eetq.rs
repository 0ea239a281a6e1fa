//! EETQ's buffers for the quantized matmul family (`shaders/formats/eetq.wgsl`).
//!
//! GPU layout: the int8 codes are repacked at load from EETQ's `[in, out]` to row-major
//! `[out, in]` bytes, each code stored as `code + 128`, so an output's codes run along K in
//! whole words: the grouped GEMV (`kernels::gemv`) reads them as HQQ's 8-bit words with a zero of
//! 128 and the row's scale for every group; the dequant kernel and the tiled GEMM read the same
//! buffer. Nothing dequantized is kept.

use crate::error::Result;
use crate::formats::eetq::EetqWeight;
use crate::gpu::GpuContext;
use crate::gpu::buffers::{storage_from_bytes, storage_from_f32};
use crate::gpu::shaders::ShaderKey;
use crate::kernels::gemv::{GroupedLayout, grouped_keys};
use crate::kernels::quant::{FormatShader, GpuQuantWeight};

/// The dequantized weight is fp16 (`COMPUTE` in `shaders/common/rounding.wgsl`).
const F16_COMPUTE: u32 = 1;

/// Inputs per group of the grouped GEMV (`GEMV_GROUP` in `shaders/formats/eetq.wgsl`): the
/// scale is per row, so any divisor of K serves; 64 gives a 4096-input row 64 groups to spread
/// over a workgroup.
const GEMV_GROUP: usize = 64;

pub(crate) fn shader() -> FormatShader {
    FormatShader {
        flag: "EETQ",
        consts: vec![("COMPUTE", F16_COMPUTE), ("FIELD_BITS", 8)],
        word_units: false,
    }
}

const LAYOUT: GroupedLayout = GroupedLayout {
    slabs: 1,
    group_size: GEMV_GROUP as u32,
    rounds_weights: true,
};

/// Every specialization of EETQ's quantized matmul family, for
/// [`catalogue`](super::catalogue).
pub fn shader_keys() -> Vec<ShaderKey> {
    let mut keys = shader().keys();
    keys.extend(grouped_keys(&shader(), LAYOUT));
    keys
}

impl GpuQuantWeight {
    /// Uploads an EETQ weight: int8 codes repacked to `[out, in]` (offset by 128) and one scale
    /// per output.
    pub fn from_eetq(ctx: &GpuContext, w: &EetqWeight) -> Result<Self> {
        let (n, k) = (w.out_features, w.in_features);
        let mut codes = vec![0u8; n * k];
        for (i, row) in w.codes.chunks_exact(n).enumerate() {
            for (j, c) in row.iter().enumerate() {
                codes[j * k + i] = (*c as u8) ^ 0x80;
            }
        }
        let bindings = vec![
            (2, storage_from_bytes(ctx, "eetq codes", &codes)?),
            (3, storage_from_f32(ctx, "eetq scales", &w.scales)?),
        ];
        let grouped = k.is_multiple_of(GEMV_GROUP).then_some(LAYOUT);
        Ok(
            Self::new(ctx, (n, k), shader(), bindings, w.bias.as_deref())?
                .with_grouped_layout(grouped),
        )
    }
}
