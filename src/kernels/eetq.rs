//! EETQ's buffers for the quantized matmul family (`shaders/formats/eetq.wgsl`).

use crate::error::Result;
use crate::formats::eetq::EetqWeight;
use crate::gpu::GpuContext;
use crate::gpu::buffers::{storage_from_bytes, storage_from_f32};
use crate::gpu::shaders::ShaderKey;
use crate::kernels::quant::{FormatShader, GpuQuantWeight};

/// The dequantized weight is fp16 (`COMPUTE` in `shaders/common/rounding.wgsl`).
const F16_COMPUTE: u32 = 1;

pub(crate) fn shader(word_units: bool) -> FormatShader {
    FormatShader {
        flag: "EETQ",
        consts: vec![("COMPUTE", F16_COMPUTE)],
        word_units,
    }
}

/// Every specialization of EETQ's quantized matmul family (element and word decoding), for
/// [`catalogue`](super::catalogue).
pub fn shader_keys() -> Vec<ShaderKey> {
    let mut keys = shader(false).keys();
    keys.extend(shader(true).keys());
    keys
}

impl GpuQuantWeight {
    /// Uploads an EETQ weight: int8 codes (plain `[in, out]`) and one scale per output.
    pub fn from_eetq(ctx: &GpuContext, w: &EetqWeight) -> Result<Self> {
        let codes: Vec<u8> = w.codes.iter().map(|c| *c as u8).collect();
        let bindings = vec![
            (2, storage_from_bytes(ctx, "eetq codes", &codes)?),
            (3, storage_from_f32(ctx, "eetq scales", &w.scales)?),
        ];
        Self::new(
            ctx,
            (w.out_features, w.in_features),
            // A code word holds four outputs of one input when every row of codes is whole words.
            shader(w.out_features.is_multiple_of(4)),
            bindings,
            w.bias.as_deref(),
        )
    }
}
