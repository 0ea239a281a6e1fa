//! LoRA and DoRA on the GPU (`shaders/lora.wgsl`): a shrink to rank r, then an expand that adds
//! the scaled product into the base output in place (and rescales it for DoRA).

use crate::error::{Error, Result};
use crate::gpu::buffers::{scratch_f32, storage_from_f32, uniform};
use crate::gpu::shaders::ShaderKey;
use crate::gpu::{ActDtype, GpuContext, GpuTensor};
use crate::kernels::fused::LoraEpilogue;
use crate::kernels::{Dispatch, bind_resources, check_io};
use crate::tensor::Matrix;

const WORKGROUP: u32 = 256;

/// Mirrors `LoraParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct LoraParams {
    m: u32,
    k: u32,
    n: u32,
    r: u32,
    scaling: f32,
    dora: u32,
    has_bias: u32,
    pad: u32,
}

fn key(entry: &'static str, act: ActDtype) -> ShaderKey {
    ShaderKey::new("lora", entry, act)
}

/// Every specialization of the LoRA shrink and expand kernels, for f32 and f16 activations, for
/// [`catalogue`](super::catalogue).
pub fn shader_keys() -> Vec<ShaderKey> {
    let mut keys = Vec::new();
    for act in [ActDtype::F32, ActDtype::F16] {
        keys.push(key("shrink", act));
        keys.push(key("expand", act));
    }
    keys
}

/// A LoRA (or DoRA) adapter resident on the GPU.
#[derive(Debug)]
pub struct GpuLora {
    /// Columns of `A` (the layer's inputs).
    pub in_features: usize,
    /// Rows of `B` (the layer's outputs).
    pub out_features: usize,
    /// `r`: rows of `A`, columns of `B`.
    pub rank: usize,
    scaling: f32,
    a: wgpu::Buffer,
    b: wgpu::Buffer,
    dora_scale: Option<wgpu::Buffer>,
}

impl GpuLora {
    /// `a: [r, in]`, `b: [out, r]`; `dora_scale` = magnitude / row norm of `W + s·B·A`, per
    /// output. Fails with [`Error::Shape`] for rank 0, `b` without `r` columns, or a DoRA
    /// scale that is not `[out]`.
    pub fn upload(
        ctx: &GpuContext,
        a: &Matrix,
        b: &Matrix,
        scaling: f32,
        dora_scale: Option<&[f32]>,
    ) -> Result<Self> {
        if b.cols != a.rows || a.rows == 0 {
            return Err(Error::shape(
                "lora_B",
                format!("[out, {}]", a.rows),
                &[b.rows, b.cols],
            ));
        }
        if let Some(g) = dora_scale {
            if g.len() != b.rows {
                return Err(Error::shape(
                    "DoRA scale",
                    format!("[{}]", b.rows),
                    &[g.len()],
                ));
            }
        }
        Ok(Self {
            in_features: a.cols,
            out_features: b.rows,
            rank: a.rows,
            scaling,
            a: storage_from_f32(ctx, "lora A", &a.data)?,
            b: storage_from_f32(ctx, "lora B", &b.data)?,
            dora_scale: dora_scale
                .map(|g| storage_from_f32(ctx, "dora scale", g))
                .transpose()?,
        })
    }

    fn params(&self, m: usize, has_bias: bool) -> LoraParams {
        LoraParams {
            m: m as u32,
            k: self.in_features as u32,
            n: self.out_features as u32,
            r: self.rank as u32,
            scaling: self.scaling,
            dora: self.dora_scale.is_some() as u32,
            has_bias: has_bias as u32,
            pad: 0,
        }
    }

    /// Binds the shrink `h = x · Aᵀ` (`[m, rank]` f32, returned with the launch).
    pub fn prepare_shrink(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
    ) -> Result<(Dispatch, wgpu::Buffer)> {
        if x.cols != self.in_features {
            return Err(Error::shape(
                "x",
                format!("[m, {}]", self.in_features),
                &[x.rows, x.cols],
            ));
        }
        let m = x.rows;
        let h = scratch_f32(ctx, "lora h", m * self.rank)?;
        let params = uniform(ctx, "lora params", &self.params(m, false))?;
        let shrink = ctx.pipeline(&key("shrink", x.dtype))?;
        let bind = bind_resources(
            ctx,
            &shrink,
            vec![
                (0, params.as_entire_binding()),
                (1, self.a.as_entire_binding()),
                (3, x.binding()),
                (4, h.as_entire_binding()),
            ],
        )?;
        let dispatch = Dispatch::elementwise(shrink, bind, m * self.rank, WORKGROUP);
        Ok((dispatch, h))
    }

    /// The expand as a matmul epilogue (`kernels::fused`), `h` from [`Self::prepare_shrink`].
    pub fn epilogue<'a>(&'a self, h: &'a wgpu::Buffer) -> LoraEpilogue<'a> {
        LoraEpilogue::Single {
            h,
            b: &self.b,
            dora_scale: self.dora_scale.as_ref(),
            rank: self.rank,
            scaling: self.scaling,
        }
    }

    /// Binds `y += s · (x Aᵀ) Bᵀ` (or DoRA's rescale) for `x: [m, in]`, `y: [m, out]`.
    /// `bias` is the base layer's bias buffer (DoRA leaves it out of the rescale). Returns the
    /// shrink and expand launches, in order. Fails with [`Error::Shape`] when `x` or `y` does
    /// not fit the adapter.
    pub fn prepare(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
        y: &GpuTensor,
        bias: Option<&wgpu::Buffer>,
    ) -> Result<[Dispatch; 2]> {
        check_io(x, y, self.in_features, self.out_features)?;
        let (shrink, h) = self.prepare_shrink(ctx, x)?;
        let params = uniform(ctx, "lora params", &self.params(x.rows, bias.is_some()))?;
        let expand = ctx.pipeline(&key("expand", x.dtype))?;
        let unused = &self.b;
        let expand_bind = bind_resources(
            ctx,
            &expand,
            vec![
                (0, params.as_entire_binding()),
                (2, self.b.as_entire_binding()),
                (4, h.as_entire_binding()),
                (
                    5,
                    self.dora_scale
                        .as_ref()
                        .unwrap_or(unused)
                        .as_entire_binding(),
                ),
                (6, bias.unwrap_or(unused).as_entire_binding()),
                (7, y.binding()),
            ],
        )?;
        Ok([
            shrink,
            Dispatch::elementwise(expand, expand_bind, x.rows * self.out_features, WORKGROUP),
        ])
    }

    /// Adds the adapter's term into `y` in place (submitted, not waited for).
    pub fn apply(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
        y: &GpuTensor,
        bias: Option<&wgpu::Buffer>,
    ) -> Result<()> {
        let [shrink, expand] = self.prepare(ctx, x, y, bias)?;
        Dispatch::submit_all(ctx, &[&shrink, &expand]).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::layout::{assert_matches_shader, rust_layout};

    #[test]
    fn params_match_the_shader() {
        let layout = rust_layout!(LoraParams {
            m,
            k,
            n,
            r,
            scaling,
            dora,
            has_bias,
            pad
        });
        assert_matches_shader(&shader_keys(), "LoraParams", layout);
    }
}
