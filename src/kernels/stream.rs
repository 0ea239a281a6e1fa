//! The streaming-read yardstick (`shaders/stream_read.wgsl`): a grid-stride xor-reduction of a
//! whole buffer whose time over its bytes is the device's streaming-read bandwidth.

use crate::error::{Error, Result};
use crate::gpu::buffers::{POISON_F32, read_buffer, storage_from_bytes, uniform};
use crate::gpu::shaders::ShaderKey;
use crate::gpu::{ActDtype, GpuContext};
use crate::kernels::{Dispatch, bind};

const WORKGROUP: u32 = 256;
/// Enough workgroups to fill any current GPU; past that each invocation reads more elements.
const MAX_WORKGROUPS: u32 = 8192;

/// Mirrors `StreamParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct StreamParams {
    len: u32,
    invocations: u32,
}

fn key() -> ShaderKey {
    ShaderKey::new("stream_read", "main", ActDtype::F32).constant("WG", WORKGROUP)
}

/// Every specialization of the streaming-read yardstick, for [`catalogue`](super::catalogue).
pub fn shader_keys() -> Vec<ShaderKey> {
    vec![key()]
}

/// Invocations the kernel launches over `vec4s` elements (whole workgroups).
fn invocations_for(vec4s: usize) -> u32 {
    let groups = (vec4s as u64)
        .div_ceil(WORKGROUP as u64)
        .clamp(1, MAX_WORKGROUPS as u64) as u32;
    groups * WORKGROUP
}

/// A buffer to stream through, and the per-invocation xor it reduces to.
#[derive(Debug)]
pub struct GpuStreamRead {
    data: wgpu::Buffer,
    bytes: usize,
    invocations: u32,
    params: wgpu::Buffer,
    out: wgpu::Buffer,
}

impl GpuStreamRead {
    /// Uploads `words` (a non-zero multiple of 4 u32: whole vec4s) and a poisoned output.
    pub fn upload(ctx: &GpuContext, words: &[u32]) -> Result<Self> {
        if words.is_empty() || !words.len().is_multiple_of(4) {
            return Err(Error::shape(
                "stream-read data",
                "a non-zero multiple of 4 u32 words",
                &[words.len()],
            ));
        }
        let vec4s = words.len() / 4;
        let len = u32::try_from(vec4s).map_err(|_| {
            Error::Unsupported(format!("{vec4s} vec4 elements exceed 32-bit indexing"))
        })?;
        let invocations = invocations_for(vec4s);
        Ok(Self {
            data: storage_from_bytes(ctx, "stream data", bytemuck::cast_slice(words))?,
            bytes: words.len() * 4,
            invocations,
            params: uniform(ctx, "stream params", &StreamParams { len, invocations })?,
            out: storage_from_bytes(
                ctx,
                "stream xor",
                &POISON_F32.to_le_bytes().repeat(invocations as usize),
            )?,
        })
    }

    /// Bytes one launch reads.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Invocations of one launch (the length of [`Self::read_xor`]).
    pub fn invocations(&self) -> usize {
        self.invocations as usize
    }

    /// Binds one read of the whole buffer.
    pub fn prepare(&self, ctx: &GpuContext) -> Result<Dispatch> {
        let pipeline = ctx.pipeline(&key())?;
        let bind = bind(
            ctx,
            &pipeline,
            &[(0, &self.params), (1, &self.data), (2, &self.out)],
        )?;
        Ok(Dispatch::new(
            pipeline,
            bind,
            (self.invocations / WORKGROUP, 1),
        ))
    }

    /// The xor of each invocation, as last written.
    pub fn read_xor(&self, ctx: &GpuContext) -> Result<Vec<u32>> {
        let bytes = read_buffer(ctx, &self.out, self.invocations() * 4)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}

/// The CPU twin: the xor each of `invocations` invocations computes over `words` read as vec4s
/// with a grid stride.
pub fn stream_read_cpu(words: &[u32], invocations: usize) -> Vec<u32> {
    let vec4s: Vec<&[u32]> = words.chunks_exact(4).collect();
    (0..invocations)
        .map(|i| {
            vec4s
                .iter()
                .skip(i)
                .step_by(invocations)
                .fold(0u32, |acc, v| acc ^ v[0] ^ v[1] ^ v[2] ^ v[3])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::layout::{assert_matches_shader, rust_layout};

    #[test]
    fn params_match_the_shader() {
        let layout = rust_layout!(StreamParams { len, invocations });
        assert_matches_shader(&shader_keys(), "StreamParams", layout);
    }
}
