//! GPTQ's buffers for the quantized matmul family (`shaders/formats/gptq.wgsl`).

use crate::gpu::shaders::ShaderKey;
use crate::kernels::quant::FormatShader;

/// The dequantized weight is fp16 (`COMPUTE` in `shaders/common/rounding.wgsl`).
const F16_COMPUTE: u32 = 1;

/// The specialization for `bits` (2, 3, 4 or 8) and the zero convention (`v1`: stored minus one).
pub(crate) fn shader(bits: u32, v1: bool) -> FormatShader {
    FormatShader {
        flag: "GPTQ",
        consts: vec![
            ("BITS", bits),
            ("ZERO_OFFSET", v1 as u32),
            ("COMPUTE", F16_COMPUTE),
        ],
    }
}

pub fn shader_keys() -> Vec<ShaderKey> {
    let mut keys = Vec::new();
    for bits in [2, 3, 4, 8] {
        for v1 in [false, true] {
            keys.extend(shader(bits, v1).keys());
        }
    }
    keys
}
