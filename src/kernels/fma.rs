//! The compute-ceiling yardstick (`shaders/fma_peak.wgsl`): chains of f32 multiply-adds with no
//! memory traffic, whose rate is the f32 FMA ceiling a WGSL kernel can reach on the device.

use crate::error::{Error, Result};
use crate::gpu::buffers::{read_f32, scratch_f32, uniform};
use crate::gpu::shaders::ShaderKey;
use crate::gpu::{ActDtype, GpuContext};
use crate::kernels::{Dispatch, bind, grid};

const WORKGROUP: u32 = 256;
/// Independent vec4 chains per invocation (`a`..`d` in the shader).
const CHAINS: usize = 4;
/// FMAs per step of one invocation: four vec4 chains.
const FMAS_PER_STEP: f64 = (CHAINS * 4) as f64;
/// `x -> x * MUL + ADD` converges to 1, so long chains stay finite.
const MUL: f32 = 0.999;
const ADD: f32 = 0.001;

/// Mirrors `FmaParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct FmaParams {
    iterations: u32,
    invocations: u32,
    mul: f32,
    add: f32,
}

fn key() -> ShaderKey {
    ShaderKey::new("fma_peak", "main", ActDtype::F32).constant("WG", WORKGROUP)
}

/// Every specialization of the FMA yardstick, for [`catalogue`](super::catalogue).
pub fn shader_keys() -> Vec<ShaderKey> {
    vec![key()]
}

/// One launch of `invocations` FMA chains, `iterations` steps long, and its output.
#[derive(Debug)]
pub struct GpuFmaPeak {
    invocations: u32,
    iterations: u32,
    params: wgpu::Buffer,
    out: wgpu::Buffer,
}

impl GpuFmaPeak {
    /// Allocates the parameters and one f32 output per invocation. Fails with
    /// [`Error::Config`] for zero invocations or steps and [`Error::Unsupported`] past
    /// `u32::MAX`.
    pub fn new(ctx: &GpuContext, invocations: usize, iterations: usize) -> Result<Self> {
        let (Ok(inv), Ok(iters)) = (u32::try_from(invocations), u32::try_from(iterations)) else {
            return Err(Error::Unsupported(format!(
                "{invocations} invocations of {iterations} FMA steps exceed 32-bit counters"
            )));
        };
        if inv == 0 || iters == 0 {
            return Err(Error::config(
                "the FMA yardstick needs at least one invocation and one step",
            ));
        }
        let params = FmaParams {
            iterations: iters,
            invocations: inv,
            mul: MUL,
            add: ADD,
        };
        Ok(Self {
            invocations: inv,
            iterations: iters,
            params: uniform(ctx, "fma params", &params)?,
            out: scratch_f32(ctx, "fma sums", invocations)?,
        })
    }

    /// Floating-point operations of one launch (an FMA counts two).
    pub fn flops(&self) -> f64 {
        2.0 * FMAS_PER_STEP * self.iterations as f64 * self.invocations as f64
    }

    /// The launch, ready to record (all chains at once, 256 invocations per workgroup).
    pub fn prepare(&self, ctx: &GpuContext) -> Result<Dispatch> {
        let pipeline = ctx.pipeline(&key())?;
        let bind = bind(ctx, &pipeline, &[(0, &self.params), (1, &self.out)])?;
        Ok(Dispatch::new(
            pipeline,
            bind,
            grid(self.invocations.div_ceil(WORKGROUP)),
        ))
    }

    /// Each invocation's sum of its chains, as last written.
    pub fn read_sums(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        read_f32(ctx, &self.out, self.invocations as usize)
    }
}

/// The CPU twin: each invocation's sum of its four vec4 chains after `iterations` steps.
pub fn fma_peak_cpu(invocations: usize, iterations: usize) -> Vec<f32> {
    (0..invocations)
        .map(|i| {
            let seed = (i % 1024) as f32 * 0.001;
            let mut sum = 0f32;
            let mut lanes = [0f32; CHAINS * 4];
            for (i, lane) in lanes.iter_mut().enumerate() {
                // Component l of chain c (a, b, c, d in the shader) starts at seed + c + 0.25 l.
                *lane = seed + (i / 4) as f32 + (i % 4) as f32 * 0.25;
            }
            for lane in lanes.iter_mut() {
                for _ in 0..iterations {
                    *lane = lane.mul_add(MUL, ADD);
                }
            }
            // The shader adds the chains as vectors, then the four components.
            for component in 0..4 {
                let v: f32 = (0..CHAINS).map(|c| lanes[c * 4 + component]).sum();
                sum += v;
            }
            sum
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::layout::{assert_matches_shader, rust_layout};

    #[test]
    fn params_match_the_shader() {
        let layout = rust_layout!(FmaParams {
            iterations,
            invocations,
            mul,
            add
        });
        assert_matches_shader(&shader_keys(), "FmaParams", layout);
    }
}
