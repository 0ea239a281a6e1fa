//! GPTQ's buffers for the quantized matmul family (`shaders/formats/gptq.wgsl`).

use crate::error::Result;
use crate::formats::gptq::{GptqWeight, GptqZeros};
use crate::gpu::GpuContext;
use crate::gpu::buffers::{storage_from_bytes, storage_from_f32, uniform};
use crate::gpu::shaders::ShaderKey;
use crate::kernels::quant::{FormatShader, GEMV_ROWS_PER_WORKGROUP, GpuQuantWeight};

/// The dequantized weight is fp16 (`COMPUTE` in `shaders/common/rounding.wgsl`).
const F16_COMPUTE: u32 = 1;

/// Mirrors `FormatParams` in `shaders/formats/gptq.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct GptqParams {
    zero_words: u32,
    pad: [u32; 3],
}

/// Bit widths whose GEMV can decode a qweight word at a time: fields never straddle words.
const WORD_BITS: [u32; 3] = [2, 4, 8];

/// The specialization for `bits` (2, 3, 4 or 8) and the zero convention (`v1`: stored minus one).
pub(crate) fn shader(bits: u32, v1: bool, word_units: bool) -> FormatShader {
    FormatShader {
        flag: "GPTQ",
        consts: vec![
            ("BITS", bits),
            ("ZERO_OFFSET", v1 as u32),
            ("COMPUTE", F16_COMPUTE),
        ],
        word_units,
    }
}

/// Every specialization of GPTQ's quantized matmul family (every bit width and zero convention),
/// for [`catalogue`](super::catalogue).
pub fn shader_keys() -> Vec<ShaderKey> {
    let mut keys = Vec::new();
    for bits in [2, 3, 4, 8] {
        for v1 in [false, true] {
            keys.extend(shader(bits, v1, false).keys());
            if WORD_BITS.contains(&bits) {
                keys.extend(shader(bits, v1, true).keys());
            }
        }
    }
    keys
}

impl GpuQuantWeight {
    /// Uploads a GPTQ weight as stored: packed qweight and qzeros words, scales, g_idx.
    pub fn from_gptq(ctx: &GpuContext, w: &GptqWeight) -> Result<Self> {
        let bits = w.config.bits;
        // A word holds 32 / bits consecutive inputs, the last one must be whole; a GEMV tile's
        // four rows' words are read as one vec4.
        let word_units = WORD_BITS.contains(&bits)
            && w.in_features.is_multiple_of((32 / bits) as usize)
            && w.out_features.is_multiple_of(GEMV_ROWS_PER_WORKGROUP);
        let params = GptqParams {
            zero_words: w.qzeros_cols() as u32,
            pad: [0; 3],
        };
        let bindings = vec![
            (1, uniform(ctx, "gptq params", &params)?),
            (
                2,
                storage_from_bytes(ctx, "gptq qweight", bytemuck::cast_slice(&w.qweight))?,
            ),
            (
                3,
                storage_from_bytes(ctx, "gptq qzeros", bytemuck::cast_slice(&w.qzeros))?,
            ),
            (4, storage_from_f32(ctx, "gptq scales", &w.scales)?),
            (
                5,
                storage_from_bytes(ctx, "gptq g_idx", bytemuck::cast_slice(&w.g_idx))?,
            ),
        ];
        Self::new(
            ctx,
            (w.out_features, w.in_features),
            shader(bits, w.config.zeros == GptqZeros::V1, word_units),
            bindings,
            w.bias.as_deref(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::layout::{assert_matches_shader, rust_layout};

    #[test]
    fn params_match_the_shader() {
        let layout = rust_layout!(GptqParams { zero_words, pad });
        assert_matches_shader(&shader_keys(), "FormatParams", layout);
    }
}
