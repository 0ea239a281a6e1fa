//! LoRA and DoRA on the GPU (`shaders/lora.wgsl`): a shrink to rank r, then an expand that adds
//! the scaled product into the base output in place (and rescales it for DoRA).

use crate::error::{Error, Result};
use crate::gpu::buffers::{scratch_f32, storage_from_f32, uniform};
use crate::gpu::shaders::ShaderKey;
use crate::gpu::{ActDtype, GpuContext, GpuTensor};
use crate::kernels::fused::LoraEpilogue;
use crate::kernels::{Dispatch, bind_resources, check_io, grid};
use crate::tensor::Matrix;

/// Invocations per workgroup of the expand (one per output element).
const WORKGROUP: u32 = 256;

/// Invocations per workgroup of the shrink, which sum one element of `h` over K together.
const SHRINK_WORKGROUP: u32 = 64;

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

/// How a shrink specialization reads x and adds across its workgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ShrinkVariant {
    /// x bound as `vec4`s: K is a multiple of 4.
    x_vec4: bool,
    /// The workgroup adds with subgroup operations (workgroup memory otherwise).
    subgroups: bool,
}

impl ShrinkVariant {
    fn for_input(ctx: &GpuContext, in_features: usize) -> Self {
        Self {
            x_vec4: in_features.is_multiple_of(4),
            subgroups: ctx.has_subgroups(),
        }
    }

    fn all() -> impl Iterator<Item = Self> {
        [false, true].into_iter().flat_map(|x_vec4| {
            [false, true]
                .into_iter()
                .map(move |subgroups| Self { x_vec4, subgroups })
        })
    }
}

fn expand_key(act: ActDtype) -> ShaderKey {
    // The module declares the shrink's workgroup memory, sized by WG, for both entry points.
    ShaderKey::new("lora", "expand", act).constant("WG", SHRINK_WORKGROUP)
}

fn shrink_key(act: ActDtype, variant: ShrinkVariant) -> ShaderKey {
    ShaderKey::new("lora", "shrink", act)
        .constant("WG", SHRINK_WORKGROUP)
        .flag("X_VEC4", variant.x_vec4)
        .flag("SUBGROUP", variant.subgroups)
}

/// Every specialization of the LoRA shrink and expand kernels, for f32 and f16 activations, for
/// [`catalogue`](super::catalogue).
pub fn shader_keys() -> Vec<ShaderKey> {
    let mut keys = Vec::new();
    for act in [ActDtype::F32, ActDtype::F16] {
        keys.extend(ShrinkVariant::all().map(|variant| shrink_key(act, variant)));
        keys.push(expand_key(act));
    }
    keys
}

/// `a` (`[r, in]`) with each row padded with zeros to a multiple of 4 columns, as the shrink
/// reads it in `vec4`s.
fn padded_rows_of_4(a: &Matrix) -> Vec<f32> {
    let width = a.cols.next_multiple_of(4);
    let mut padded = vec![0.0; a.rows * width];
    for (r, row) in padded.chunks_exact_mut(width).enumerate() {
        row[..a.cols].copy_from_slice(a.row(r));
    }
    padded
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
            a: storage_from_f32(ctx, "lora A", &padded_rows_of_4(a))?,
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
        let variant = ShrinkVariant::for_input(ctx, self.in_features);
        let shrink = ctx.pipeline(&shrink_key(x.dtype, variant))?;
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
        let dispatch = Dispatch::new(shrink, bind, grid((m * self.rank) as u32));
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
        let expand = ctx.pipeline(&expand_key(x.dtype))?;
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
