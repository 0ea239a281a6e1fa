//! The dense f16 yardstick (`shaders/dense_matmul.wgsl`): an unquantized `[out, in]` weight in
//! f16, run through a GEMV and a tiled GEMM shaped like the quantized family's, so every
//! quantized figure can also be read as a speed-up over dense f16.

use crate::error::{Error, Result};
use crate::gpu::buffers::{storage_from_bytes, storage_from_f32, uniform};
use crate::gpu::shaders::ShaderKey;
use crate::gpu::{ActDtype, GpuContext, GpuTensor};
use crate::kernels::{
    Dispatch, GEMM_BLOCKED_ROWS, GEMM_TILE, GEMV_MAX_ROWS, GEMV_ROW_SPECIALIZATIONS, MatmulPath,
    bind_resources, check_io, check_path_rows, gemm_block, gemm_grid, gemv_max_m, grid,
};
use crate::tensor::Matrix;

const GEMV_WORKGROUP: u32 = 64;

/// Mirrors `DenseParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct DenseParams {
    m: u32,
    n: u32,
    k: u32,
    has_bias: u32,
}

/// The kernel for `rows` rows of x on `path`; the GEMV is specialized for its row count as the
/// quantized one is.
fn key(path: MatmulPath, act: ActDtype, rows: usize) -> ShaderKey {
    // Both entry points share one module, so each key sets every constant.
    let (entry, max_m, block) = match path {
        MatmulPath::Gemv => ("gemv", gemv_max_m(rows), 1),
        MatmulPath::Tiled => ("gemm", GEMV_MAX_ROWS as u32, gemm_block(rows)),
    };
    ShaderKey::new("dense_matmul", entry, act)
        .constant("WG", GEMV_WORKGROUP)
        .constant("MAX_M", max_m)
        .constant("TILE", GEMM_TILE)
        .constant("BLOCK", block)
}

/// Every specialization of the dense f16 yardstick matmul (GEMV and tiled, f32 and f16
/// activations), for [`catalogue`](super::catalogue).
pub fn shader_keys() -> Vec<ShaderKey> {
    let mut keys = Vec::new();
    for act in [ActDtype::F32, ActDtype::F16] {
        for rows in GEMV_ROW_SPECIALIZATIONS {
            keys.push(key(MatmulPath::Gemv, act, rows));
        }
        keys.push(key(MatmulPath::Tiled, act, GEMV_MAX_ROWS + 1));
        keys.push(key(MatmulPath::Tiled, act, GEMM_BLOCKED_ROWS));
    }
    keys
}

/// A dense weight resident on the GPU as f16, two values per word, rows padded to whole words.
#[derive(Debug)]
pub struct GpuDenseWeight {
    /// Rows of the weight and columns of y.
    pub out_features: usize,
    /// Columns of the weight and of x.
    pub in_features: usize,
    weight: wgpu::Buffer,
    bias: wgpu::Buffer,
    has_bias: bool,
    resident_bytes: usize,
}

impl GpuDenseWeight {
    /// Rounds `weight` (`[out, in]`) to f16 and uploads it with `bias` (`out` values) if any.
    pub fn upload(ctx: &GpuContext, weight: &Matrix, bias: Option<&[f32]>) -> Result<Self> {
        let (out, inp) = (weight.rows, weight.cols);
        let numel = out
            .checked_mul(inp)
            .filter(|n| *n > 0 && *n <= u32::MAX as usize);
        if numel.is_none() || weight.data.len() != out * inp {
            return Err(Error::shape(
                "dense weight",
                "a non-empty [out, in] matrix within 32-bit indexing",
                &[out, inp],
            ));
        }
        if let Some(b) = bias {
            if b.len() != out {
                return Err(Error::shape("dense bias", format!("[{out}]"), &[b.len()]));
            }
        }
        let row_halves = inp.next_multiple_of(2);
        let mut halves = vec![half::f16::ZERO; out * row_halves];
        for (n, row) in halves.chunks_exact_mut(row_halves).enumerate() {
            for (h, v) in row.iter_mut().zip(weight.row(n)) {
                *h = half::f16::from_f32(*v);
            }
        }
        let bias_values = bias.map(<[f32]>::to_vec).unwrap_or_else(|| vec![0.0]);
        let weight = storage_from_bytes(ctx, "dense f16 weight", bytemuck::cast_slice(&halves))?;
        Ok(Self {
            out_features: out,
            in_features: inp,
            resident_bytes: weight.size() as usize + 4 * bias_values.len(),
            weight,
            bias: storage_from_f32(ctx, "dense bias", &bias_values)?,
            has_bias: bias.is_some(),
        })
    }

    /// Bytes this layer keeps on the GPU (the f16 weight and the bias).
    pub fn resident_bytes(&self) -> usize {
        self.resident_bytes
    }

    /// Binds `y = x · Wᵀ + bias` for `x: [m, in]`, `y: [m, out]` on `path`. Fails with
    /// [`Error::Shape`] when `x` or `y` does not fit, and with [`Error::Unsupported`] for the
    /// GEMV past its row limit or a grid too large.
    pub fn prepare(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
        y: &GpuTensor,
        path: MatmulPath,
    ) -> Result<Dispatch> {
        check_io(x, y, self.in_features, self.out_features)?;
        check_path_rows(path, x.rows)?;
        let groups = match path {
            MatmulPath::Gemv => grid(self.out_features as u32),
            MatmulPath::Tiled => gemm_grid(self.out_features, x.rows)?,
        };
        let pipeline = ctx.pipeline(&key(path, x.dtype, x.rows))?;
        let params = uniform(
            ctx,
            "dense params",
            &DenseParams {
                m: x.rows as u32,
                n: self.out_features as u32,
                k: self.in_features as u32,
                has_bias: self.has_bias as u32,
            },
        )?;
        let bind = bind_resources(
            ctx,
            &pipeline,
            vec![
                (0, params.as_entire_binding()),
                (1, self.weight.as_entire_binding()),
                (2, x.binding()),
                (3, self.bias.as_entire_binding()),
                (4, y.binding()),
            ],
        )?;
        Ok(Dispatch::new(pipeline, bind, groups))
    }

    /// `y = x · Wᵀ + bias` on `path`, into a new tensor.
    pub fn forward_with(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
        path: MatmulPath,
    ) -> Result<GpuTensor> {
        let y = GpuTensor::output(ctx, x.rows, self.out_features, x.dtype)?;
        Dispatch::submit_all(ctx, &[&self.prepare(ctx, x, &y, path)?])?;
        Ok(y)
    }
}

/// The CPU twin: `x · f16(W)ᵀ + bias`, accumulated in f64.
pub fn dense_f16_cpu(x: &Matrix, weight: &Matrix, bias: Option<&[f32]>) -> Result<Matrix> {
    let mut rounded = weight.clone();
    rounded.round_to_f16();
    let mut y = x.matmul_t(&rounded)?;
    if let Some(b) = bias {
        y.add_row_vector(b);
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::layout::{assert_matches_shader, rust_layout};

    #[test]
    fn params_match_the_shader() {
        let layout = rust_layout!(DenseParams { m, n, k, has_bias });
        assert_matches_shader(&shader_keys(), "DenseParams", layout);
    }
}
