//! The OFT rotation of activations on the GPU (`shaders/oft_rotate.wgsl`).

use crate::error::{Error, Result};
use crate::gpu::buffers::{storage_from_f32, uniform};
use crate::gpu::shaders::ShaderKey;
use crate::gpu::{ActDtype, GpuContext, GpuTensor};
use crate::kernels::{Dispatch, bind};

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

pub fn shader_keys() -> Vec<ShaderKey> {
    vec![key(ActDtype::F32), key(ActDtype::F16)]
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

    /// Binds one rotation `x -> y` (both `[m, in]`).
    pub fn prepare(&self, ctx: &GpuContext, x: &GpuTensor, y: &GpuTensor) -> Result<Dispatch> {
        if x.cols != self.in_features || y.cols != x.cols || y.rows != x.rows || y.dtype != x.dtype
        {
            return Err(Error::shape(
                "x",
                format!("[m, {}] in and out", self.in_features),
                &[x.rows, x.cols, y.rows, y.cols],
            ));
        }
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
        );
        let bind = bind(
            ctx,
            &pipeline,
            &[
                (0, &params),
                (1, &self.blocks),
                (2, &x.buffer),
                (3, &y.buffer),
            ],
        );
        Ok(Dispatch::elementwise(pipeline, bind, x.numel(), WORKGROUP))
    }

    /// `x · blockdiag(R)`, rounded to the activation dtype.
    pub fn rotate(&self, ctx: &GpuContext, x: &GpuTensor) -> Result<GpuTensor> {
        let y = GpuTensor::poisoned(ctx, x.rows, x.cols, x.dtype)?;
        Dispatch::run_all(ctx, &[&self.prepare(ctx, x, &y)?])?;
        Ok(y)
    }
}
