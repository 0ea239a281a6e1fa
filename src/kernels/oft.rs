//! The OFT rotation of activations on the GPU (`shaders/oft_rotate.wgsl`), and the construction
//! of the rotation blocks from the adapter's generators (`shaders/oft_build.wgsl`).

use crate::adapters::oft::Parameterization;
use crate::error::{Error, Result, check_finite};
use crate::gpu::buffers::{create_buffer, read_f32, scratch_f32, storage_from_f32, uniform};
use crate::gpu::shaders::ShaderKey;
use crate::gpu::{ActDtype, GpuContext, GpuTensor};
use crate::kernels::fused::OftPrologue;
use crate::kernels::{Dispatch, bind, bind_resources, check_io, grid};

const WORKGROUP: u32 = 256;

/// Mirrors `OftParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct OftParams {
    m: u32,
    k: u32,
    b: u32,
    stored_blocks: u32,
}

fn key(act: ActDtype) -> ShaderKey {
    ShaderKey::new("oft_rotate", "main", act)
}

/// Mirrors `BuildParams` in `oft_build.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct BuildParams {
    b: u32,
    rows: u32,
    terms: u32,
    _pad: u32,
}

/// The build kernel of a parameterization (always f32; `Act` is unused there).
fn build_key(parameterization: Parameterization) -> ShaderKey {
    let entry = match parameterization {
        Parameterization::Cayley => "cayley",
        Parameterization::Neumann { .. } => "neumann",
    };
    ShaderKey::new("oft_build", entry, ActDtype::F32)
}

pub fn shader_keys() -> Vec<ShaderKey> {
    vec![
        key(ActDtype::F32),
        key(ActDtype::F16),
        build_key(Parameterization::Cayley),
        build_key(Parameterization::Neumann { terms: 0 }),
    ]
}

/// A block-diagonal rotation resident on the GPU.
#[derive(Debug)]
pub struct GpuOft {
    pub in_features: usize,
    pub block_size: usize,
    stored_blocks: usize,
    blocks: wgpu::Buffer,
}

impl GpuOft {
    /// `blocks`: the distinct `b x b` blocks, row-major, one after another (one when shared).
    pub fn upload(
        ctx: &GpuContext,
        blocks: &[f32],
        block_size: usize,
        in_features: usize,
    ) -> Result<Self> {
        let per_block = block_size * block_size;
        if block_size == 0
            || blocks.is_empty()
            || !blocks.len().is_multiple_of(per_block)
            || !in_features.is_multiple_of(block_size)
        {
            return Err(Error::shape(
                "OFT blocks",
                format!("a multiple of {block_size}x{block_size}, dividing {in_features} inputs"),
                &[blocks.len()],
            ));
        }
        let stored_blocks = blocks.len() / per_block;
        if stored_blocks != 1 && stored_blocks != in_features / block_size {
            return Err(Error::shape(
                "OFT blocks",
                format!("1 or {} blocks", in_features / block_size),
                &[stored_blocks],
            ));
        }
        Ok(Self {
            in_features,
            block_size,
            stored_blocks,
            blocks: storage_from_f32(ctx, "oft blocks", blocks)?,
        })
    }

    /// Builds the rotation blocks on the GPU from the adapter's parameter `[param_rows,
    /// b(b−1)/2]` (row-major, `triu_indices(b, b, 1)` order per row), exactly as
    /// [`crate::adapters::oft::OftAdapter`] does on the CPU: `param_rows` is `in_features / b`, or
    /// 1 under `block_share`. COFT is not applied here: pass the already projected parameter
    /// (`OftAdapter::params()`); the projection is a per-row rescale of a tiny tensor and stays on
    /// the CPU. The blocks are computed in f32. The exact Cayley solve cannot fail for a skew
    /// generator (`I + Q` is always invertible) and is pivoted anyway.
    pub fn build(
        ctx: &GpuContext,
        params: &[f32],
        block_size: usize,
        param_rows: usize,
        in_features: usize,
        parameterization: Parameterization,
    ) -> Result<Self> {
        let b = block_size;
        let tri = b.saturating_sub(1) * b / 2;
        if b == 0 || in_features == 0 || !in_features.is_multiple_of(b) {
            return Err(Error::shape(
                "OFT block size",
                format!("a non-zero size dividing {in_features} inputs"),
                &[b],
            ));
        }
        let n_blocks = in_features / b;
        if param_rows != 1 && param_rows != n_blocks {
            return Err(Error::shape(
                "OFT parameter rows",
                format!("1 (shared) or {n_blocks} for {in_features} inputs in blocks of {b}"),
                &[param_rows],
            ));
        }
        if Some(params.len()) != param_rows.checked_mul(tri) {
            return Err(Error::shape(
                "OFT parameter",
                format!("[{param_rows}, {tri}] (b(b-1)/2 = {tri} values per row for b = {b})"),
                &[params.len()],
            ));
        }
        check_finite("OFT parameter", params)?;
        let terms = match parameterization {
            Parameterization::Cayley => 0,
            Parameterization::Neumann { terms } => u32::try_from(terms).map_err(|_| {
                Error::config(format!("{terms} Cayley-Neumann terms do not fit in u32"))
            })?,
        };
        let too_big = || Error::Unsupported(format!("OFT blocks of {b} x {b}, {param_rows} rows"));
        let block_floats = b.checked_mul(b).ok_or_else(too_big)?;
        let out_floats = param_rows.checked_mul(block_floats).ok_or_else(too_big)?;
        // Per block: 2b² + 3b floats (see oft_build.wgsl).
        let scratch_floats = block_floats
            .checked_mul(2)
            .and_then(|v| v.checked_add(3 * b))
            .and_then(|v| v.checked_mul(param_rows))
            .ok_or_else(too_big)?;
        if u32::try_from(scratch_floats).is_err() || u32::try_from(params.len()).is_err() {
            return Err(too_big());
        }
        let pipeline = ctx.pipeline(&build_key(parameterization))?;
        let uniforms = uniform(
            ctx,
            "oft build params",
            &BuildParams {
                b: b as u32,
                rows: param_rows as u32,
                terms,
                _pad: 0,
            },
        )?;
        let params_buf = storage_from_f32(ctx, "oft generator", params)?;
        let blocks = scratch_f32(ctx, "oft blocks", out_floats)?;
        let scratch_bytes = scratch_floats.checked_mul(4).ok_or_else(too_big)?;
        let limit = ctx.limits().max_storage_buffer_binding_size as usize;
        if scratch_bytes > limit {
            return Err(Error::Unsupported(format!(
                "OFT build scratch needs {scratch_bytes} bytes, over this device's storage \
                 binding limit of {limit}"
            )));
        }
        let scratch = create_buffer(
            ctx,
            &wgpu::BufferDescriptor {
                label: Some("oft build scratch"),
                size: scratch_bytes.max(4) as u64,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            },
        )?;
        let bind_group = bind(
            ctx,
            &pipeline,
            &[
                (0, &uniforms),
                (1, &params_buf),
                (2, &blocks),
                (3, &scratch),
            ],
        )?;
        let dispatch = Dispatch::new(pipeline, bind_group, grid(param_rows as u32));
        Dispatch::submit_all(ctx, &[&dispatch])?;
        Ok(Self {
            in_features,
            block_size: b,
            stored_blocks: param_rows,
            blocks,
        })
    }

    /// The stored blocks, `[stored, b, b]` row-major (one block when shared), copied to the host.
    pub fn download_blocks(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        let count = self.stored_blocks * self.block_size * self.block_size;
        read_f32(ctx, &self.blocks, count)
    }

    /// The rotation as a GEMV prologue (`kernels::fused`).
    pub fn prologue(&self) -> OftPrologue<'_> {
        OftPrologue {
            blocks: &self.blocks,
            block_size: self.block_size,
            stored_blocks: self.stored_blocks,
        }
    }

    /// Binds one rotation `x -> y` (both `[m, in]`).
    pub fn prepare(&self, ctx: &GpuContext, x: &GpuTensor, y: &GpuTensor) -> Result<Dispatch> {
        check_io(x, y, self.in_features, self.in_features)?;
        let pipeline = ctx.pipeline(&key(x.dtype))?;
        let params = uniform(
            ctx,
            "oft params",
            &OftParams {
                m: x.rows as u32,
                k: x.cols as u32,
                b: self.block_size as u32,
                stored_blocks: self.stored_blocks as u32,
            },
        )?;
        let bind = bind_resources(
            ctx,
            &pipeline,
            vec![
                (0, params.as_entire_binding()),
                (1, self.blocks.as_entire_binding()),
                (2, x.binding()),
                (3, y.binding()),
            ],
        )?;
        Ok(Dispatch::elementwise(pipeline, bind, x.numel(), WORKGROUP))
    }

    /// `x · blockdiag(R)`, rounded to the activation dtype.
    pub fn rotate(&self, ctx: &GpuContext, x: &GpuTensor) -> Result<GpuTensor> {
        let y = GpuTensor::output(ctx, x.rows, x.cols, x.dtype)?;
        Dispatch::submit_all(ctx, &[&self.prepare(ctx, x, &y)?])?;
        Ok(y)
    }
}
