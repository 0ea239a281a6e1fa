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

/// Invocations of the GEMV per output feature without subgroups (a power of two), and the
/// features per workgroup then.
const GEMV_ROW_LANES: u32 = 16;
const GEMV_ROWS: u32 = 8;

/// Subgroup sizes the GEMV has a subgroup specialization for (one subgroup per feature).
const GEMV_SUBGROUP_SIZES: [u32; 6] = [4, 8, 16, 32, 64, 128];

/// Invocations per GEMV workgroup with subgroups (at least one subgroup).
const GEMV_SUBGROUP_WORKGROUP: u32 = 128;

/// f16 values per 16-byte chunk of a weight row.
const CHUNK: usize = 8;

/// Mirrors `DenseParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct DenseParams {
    m: u32,
    n: u32,
    k: u32,
    has_bias: u32,
}

/// How the GEMV adds across the invocations of a feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reduction {
    /// One subgroup of this size per feature, `subgroupAdd`.
    Subgroup(u32),
    /// [`GEMV_ROW_LANES`] invocations per feature, a tree in workgroup memory.
    Workgroup,
}

impl Reduction {
    /// Subgroups where the device has them at one size the GEMV is specialized for.
    fn for_device(ctx: &GpuContext) -> Self {
        let (min, max) = (ctx.info.subgroup_min_size, ctx.info.subgroup_max_size);
        if ctx.has_subgroups() && min == max && GEMV_SUBGROUP_SIZES.contains(&min) {
            Self::Subgroup(min)
        } else {
            Self::Workgroup
        }
    }

    /// Invocations per feature and features per workgroup.
    fn lanes_and_rows(self) -> (u32, u32) {
        match self {
            Self::Subgroup(size) => (size, (GEMV_SUBGROUP_WORKGROUP / size).max(1)),
            Self::Workgroup => (GEMV_ROW_LANES, GEMV_ROWS),
        }
    }
}

/// The kernel for `rows` rows of x on `path`; the GEMV is specialized for its row count as the
/// quantized one is, for its reduction, and for x read as `vec4`s when `x_vec4` (K a multiple of
/// 4).
fn key(
    path: MatmulPath,
    act: ActDtype,
    rows: usize,
    reduction: Reduction,
    x_vec4: bool,
) -> ShaderKey {
    // Both entry points share one module, so each key sets every constant.
    let (entry, max_m, block) = match path {
        MatmulPath::Gemv => ("gemv", gemv_max_m(rows), 1),
        MatmulPath::Tiled => ("gemm", GEMV_MAX_ROWS as u32, gemm_block(rows)),
    };
    let (row_lanes, features) = reduction.lanes_and_rows();
    let gemv = path == MatmulPath::Gemv;
    ShaderKey::new("dense_matmul", entry, act)
        .constant("ROW_LANES", row_lanes)
        .constant("ROWS", features)
        .constant("MAX_M", max_m)
        .constant("TILE", GEMM_TILE)
        .constant("BLOCK", block)
        .flag(
            "SUBGROUP",
            gemv && matches!(reduction, Reduction::Subgroup(_)),
        )
        .flag("X_VEC4", gemv && x_vec4)
}

/// Every specialization of the dense f16 yardstick matmul (GEMV and tiled, f32 and f16
/// activations), for [`catalogue`](super::catalogue).
pub fn shader_keys() -> Vec<ShaderKey> {
    let reductions: Vec<Reduction> = GEMV_SUBGROUP_SIZES
        .into_iter()
        .map(Reduction::Subgroup)
        .chain([Reduction::Workgroup])
        .collect();
    let mut keys = Vec::new();
    for act in [ActDtype::F32, ActDtype::F16] {
        for rows in GEMV_ROW_SPECIALIZATIONS {
            for &reduction in &reductions {
                for x_vec4 in [false, true] {
                    keys.push(key(MatmulPath::Gemv, act, rows, reduction, x_vec4));
                }
            }
        }
        for rows in [GEMV_MAX_ROWS + 1, GEMM_BLOCKED_ROWS] {
            keys.push(key(
                MatmulPath::Tiled,
                act,
                rows,
                Reduction::Workgroup,
                false,
            ));
        }
    }
    keys
}

/// A dense weight resident on the GPU as f16, rows padded with zeros to whole 16-byte chunks.
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
        let row_halves = inp.next_multiple_of(CHUNK);
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
        let reduction = Reduction::for_device(ctx);
        let groups = match path {
            MatmulPath::Gemv => {
                let (_, features) = reduction.lanes_and_rows();
                grid((self.out_features as u32).div_ceil(features))
            }
            MatmulPath::Tiled => gemm_grid(self.out_features, x.rows)?,
        };
        let x_vec4 = self.in_features.is_multiple_of(4);
        let pipeline = ctx.pipeline(&key(path, x.dtype, x.rows, reduction, x_vec4))?;
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
