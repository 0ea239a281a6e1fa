//! Merging an adapter into a dequantized weight on the GPU (`shaders/merge_apply.wgsl`); the
//! result is then re-quantized by `kernels::hqq_quantize`.

use crate::error::{Error, Result};
use crate::gpu::buffers::{read_f32, scratch_f32, storage_from_f32, uniform};
use crate::gpu::shaders::ShaderKey;
use crate::gpu::{ActDtype, GpuContext};
use crate::kernels::quant::GpuQuantWeight;
use crate::kernels::{Dispatch, bind};
use crate::tensor::Matrix;

const WORKGROUP: u32 = 256;

/// Mirrors `MergeParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct MergeParams {
    n: u32,
    k: u32,
    b: u32,
    stored_blocks: u32,
    rank: u32,
    scaling: f32,
    dora: u32,
    pad: u32,
}

/// What is merged.
pub enum MergeDelta<'a> {
    /// `W · blockdiag(R)ᵀ`: the distinct `b x b` blocks, row-major (one when shared).
    Oft {
        /// `stored x b x b` values; `stored` is 1 or `in / b`.
        blocks: &'a [f32],
        /// `b`: rows and columns of each block; must divide `in`.
        block_size: usize,
    },
    /// `g ⊙ (W + s·B·A)`, `g` = DoRA's magnitude / norm per output row (1 for LoRA).
    Lora {
        /// The down projection, `[r, in]`.
        a: &'a Matrix,
        /// The up projection, `[out, r]`.
        b: &'a Matrix,
        /// `s`.
        scaling: f32,
        /// `g`, `[out]`; `None` for plain LoRA.
        dora_scale: Option<&'a [f32]>,
    },
}

fn key(entry: &'static str) -> ShaderKey {
    ShaderKey::new("merge_apply", entry, ActDtype::F32)
}

/// Every specialization of the merge kernels (OFT and LoRA), for
/// [`catalogue`](super::catalogue).
pub fn shader_keys() -> Vec<ShaderKey> {
    vec![key("oft"), key("lora")]
}

/// The dense merged weight `[out, in]`: `base` dequantized and `delta` applied on the GPU,
/// then downloaded. Fails with [`Error::Shape`] when `delta` does not fit `base` (OFT blocks
/// that do not tile the inputs, LoRA factors or DoRA scale of other sizes).
pub fn merged_weight(
    ctx: &GpuContext,
    base: &GpuQuantWeight,
    delta: &MergeDelta<'_>,
) -> Result<Matrix> {
    let (n, k) = (base.out_features, base.in_features);
    let w = base.dequantize_buffer(ctx)?;
    let out = scratch_f32(ctx, "merged weight", n * k)?;
    let mut params = MergeParams {
        n: n as u32,
        k: k as u32,
        b: 0,
        stored_blocks: 0,
        rank: 0,
        scaling: 0.0,
        dora: 0,
        pad: 0,
    };
    let (entry, first, second, dora) = match delta {
        MergeDelta::Oft { blocks, block_size } => {
            let per_block = block_size * block_size;
            if *block_size == 0
                || blocks.is_empty()
                || !blocks.len().is_multiple_of(per_block)
                || !k.is_multiple_of(*block_size)
            {
                return Err(Error::shape(
                    "OFT blocks",
                    format!("{block_size}x{block_size} blocks over {k} inputs"),
                    &[blocks.len()],
                ));
            }
            params.b = *block_size as u32;
            params.stored_blocks = (blocks.len() / per_block) as u32;
            let blocks = storage_from_f32(ctx, "merge blocks", blocks)?;
            ("oft", blocks.clone(), blocks.clone(), blocks)
        }
        MergeDelta::Lora {
            a,
            b,
            scaling,
            dora_scale,
        } => {
            if a.cols != k
                || b.rows != n
                || b.cols != a.rows
                || dora_scale.is_some_and(|g| g.len() != n)
            {
                return Err(Error::shape(
                    "merged LoRA",
                    format!("A [r, {k}], B [{n}, r]"),
                    &[a.rows, a.cols, b.rows, b.cols],
                ));
            }
            params.rank = a.rows as u32;
            params.scaling = *scaling;
            params.dora = dora_scale.is_some() as u32;
            let a_buf = storage_from_f32(ctx, "merge A", &a.data)?;
            let b_buf = storage_from_f32(ctx, "merge B", &b.data)?;
            let g = storage_from_f32(ctx, "merge DoRA scale", dora_scale.unwrap_or(&[1.0]))?;
            ("lora", a_buf, b_buf, g)
        }
    };
    let pipeline = ctx.pipeline(&key(entry))?;
    let params = uniform(ctx, "merge params", &params)?;
    let entries: Vec<(u32, &wgpu::Buffer)> = match entry {
        "oft" => vec![(0, &params), (1, &w), (2, &first), (5, &out)],
        _ => vec![
            (0, &params),
            (1, &w),
            (2, &first),
            (3, &second),
            (4, &dora),
            (5, &out),
        ],
    };
    let bind = bind(ctx, &pipeline, &entries)?;
    Dispatch::submit_all(
        ctx,
        &[&Dispatch::elementwise(pipeline, bind, n * k, WORKGROUP)],
    )?;
    Matrix::new(n, k, read_f32(ctx, &out, n * k)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::layout::{assert_matches_shader, rust_layout};

    #[test]
    fn params_match_the_shader() {
        let layout = rust_layout!(MergeParams {
            n,
            k,
            b,
            stored_blocks,
            rank,
            scaling,
            dora,
            pad
        });
        assert_matches_shader(&shader_keys(), "MergeParams", layout);
    }
}
