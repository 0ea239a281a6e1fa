//! EETQ's buffers for the quantized matmul family (`shaders/formats/eetq.wgsl`).

use crate::gpu::shaders::ShaderKey;
use crate::kernels::quant::FormatShader;

/// The dequantized weight is fp16 (`COMPUTE` in `shaders/common/rounding.wgsl`).
const F16_COMPUTE: u32 = 1;

pub(crate) fn shader() -> FormatShader {
    FormatShader {
        flag: "EETQ",
        consts: vec![("COMPUTE", F16_COMPUTE)],
    }
}

pub fn shader_keys() -> Vec<ShaderKey> {
    shader().keys()
}
