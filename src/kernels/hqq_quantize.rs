//! HQQ quantization on the GPU (`shaders/hqq_quantize.wgsl`): min-max init, the half-quadratic
//! zero solver, rounding and packing, with the packed result left on the GPU as a layer for the
//! quantized matmul family. Mirrors [`crate::formats::hqq::quantize_codes`] and
//! [`crate::formats::hqq::solver::optimize_zero`]:
//!
//! - min-max init, scale and zero are bit-exact with the CPU (the reciprocals are computed with
//!   integer long division, since WGSL's `/` may be off by 2.5 ulp, and `w * s + z` is kept from
//!   being fused into an fma);
//! - the solver runs in f32 with tree-ordered sums (the CPU sums in f64) and WGSL's `pow` and
//!   `/`, so its zeros agree with the CPU's to rounding, not bit for bit;
//! - the early stop is decided on the GPU: every iteration is one `iterate` dispatch and one
//!   single-workgroup `reduce_error` dispatch that sets a stop flag; all iterations are recorded
//!   in one compute pass and nothing is read back.

use crate::error::{Error, Result, check_finite};
use crate::formats::hqq::{ComputeDtype, Grouping, HqqConfig, HqqWeight, Packing};
use crate::gpu::buffers::{
    read_buffer, read_f32, scratch_f32, storage_from_bytes, storage_from_f32, uniform,
};
use crate::gpu::shaders::ShaderKey;
use crate::gpu::{ActDtype, GpuContext};
use crate::kernels::hqq::{HqqBuffers, MetaStorage, compute_code};
use crate::kernels::quant::GpuQuantWeight;
use crate::kernels::{Dispatch, bind, grid};
use crate::tensor::Matrix;

/// Invocations per workgroup of the per-group entries (`init`, `iterate`, `reduce_error`).
const WG: u32 = 64;
/// Workgroup size of `pack` and `finalize` (fixed in the shader).
const ELEMENTWISE_WG: u32 = 256;
const FAMILY: &str = "hqq_quantize";
const ENTRIES: [&str; 5] = ["init", "iterate", "reduce_error", "pack", "finalize"];

/// Mirrors `QuantParams` in `shaders/hqq_quantize.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct QuantParams {
    numel: u32,
    group_size: u32,
    groups: u32,
    axis: u32,
    max_code: f32,
    round_zero: u32,
    slab_len: u32,
    words: u32,
    field_bits: u32,
    per_element: u32,
    three_bit: u32,
    lp_norm: f32,
    kappa: f32,
    grow_beta: u32,
    opaque: u32,
    _pad: u32,
}

/// Mirrors `SolverState` in the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct SolverState {
    stopped: u32,
    beta: f32,
    best: f32,
    iterations: u32,
}

fn key(entry: &'static str, compute: ComputeDtype) -> ShaderKey {
    // Only `finalize` depends on the compute dtype; the others always use the F32 variant.
    let compute = if entry == "finalize" {
        compute_code(compute)
    } else {
        0
    };
    ShaderKey::new(FAMILY, entry, ActDtype::F32)
        .constant("WG", WG)
        .constant("COMPUTE", compute)
}

/// Every specialization this module can request.
pub fn shader_keys() -> Vec<ShaderKey> {
    let mut keys: Vec<ShaderKey> = ENTRIES
        .iter()
        .filter(|e| **e != "finalize")
        .map(|e| key(e, ComputeDtype::F32))
        .collect();
    for d in [ComputeDtype::F16, ComputeDtype::BF16] {
        keys.push(key("finalize", d));
    }
    keys
}

/// The validated sizes of one quantization.
struct Plan {
    out_features: usize,
    in_features: usize,
    grouping: Grouping,
    packing: Packing,
    packed_rows: usize,
    packed_cols: usize,
    packed_bytes: usize,
    params: QuantParams,
}

fn plan(weight: &Matrix, bias: Option<&[f32]>, config: &HqqConfig) -> Result<Plan> {
    if weight.rows.checked_mul(weight.cols) != Some(weight.data.len()) {
        return Err(Error::shape(
            "weight",
            format!("[{}, {}]", weight.rows, weight.cols),
            &[weight.data.len()],
        ));
    }
    check_finite("weight", &weight.data)?;
    if let Some(b) = bias {
        if b.len() != weight.rows {
            return Err(Error::shape(
                "bias",
                format!("[{}]", weight.rows),
                &[b.len()],
            ));
        }
        check_finite("bias", b)?;
    }
    let packing = Packing::for_bits(config.nbits)?;
    let grouping = Grouping::new(weight.data.len(), config.group_size, config.axis)?;
    let (rows, cols) = grouping.grouped_shape();
    let packed_rows = packing.packed_rows(rows)?;
    let slab_len = packed_rows * cols;
    let packed_bytes = slab_len * packing.element_bytes;
    // Flat indices up to per_element * slab_len (3-bit padding included) must fit in u32.
    if packing.per_element * slab_len > u32::MAX as usize {
        return Err(Error::Unsupported(format!(
            "a {}x{} weight exceeds 32-bit indexing",
            weight.rows, weight.cols
        )));
    }
    let s = &config.solver;
    if config.optimize && !(s.beta.is_finite() && s.beta > 0.0 && s.lp_norm.is_finite()) {
        return Err(Error::config(format!(
            "HQQ solver needs a positive finite beta and a finite lp_norm, got beta {} lp_norm {}",
            s.beta, s.lp_norm
        )));
    }
    if config.optimize && s.grow_beta && !s.kappa.is_finite() {
        return Err(Error::config(format!(
            "HQQ solver kappa {} is not finite",
            s.kappa
        )));
    }
    let params = QuantParams {
        numel: grouping.numel as u32,
        group_size: grouping.group_size as u32,
        groups: grouping.groups() as u32,
        axis: grouping.axis as u32,
        max_code: config.max_code(),
        round_zero: config.round_zero as u32,
        slab_len: slab_len as u32,
        words: packed_bytes.div_ceil(4) as u32,
        field_bits: packing.field_bits(),
        per_element: packing.per_element as u32,
        three_bit: (packing.nbits == 3) as u32,
        lp_norm: s.lp_norm,
        kappa: s.kappa,
        grow_beta: s.grow_beta as u32,
        opaque: 0,
        _pad: 0,
    };
    Ok(Plan {
        out_features: weight.rows,
        in_features: weight.cols,
        grouping,
        packing,
        packed_rows,
        packed_cols: cols,
        packed_bytes,
        params,
    })
}

/// The GPU buffers a quantization leaves behind.
struct Quantized {
    plan: Plan,
    packed: wgpu::Buffer,
    scale: wgpu::Buffer,
    zero: wgpu::Buffer,
}

fn run(
    ctx: &GpuContext,
    weight: &Matrix,
    bias: Option<&[f32]>,
    config: &HqqConfig,
) -> Result<Quantized> {
    let plan = plan(weight, bias, config)?;
    let groups = plan.grouping.groups();
    let params = uniform(ctx, "hqq quantize params", &plan.params)?;
    let w = storage_from_f32(ctx, "hqq quantize W", &weight.data)?;
    let inv_scale = scratch_f32(ctx, "hqq inv_scale", groups)?;
    let scale = scratch_f32(ctx, "hqq scale", groups)?;
    let zero = scratch_f32(ctx, "hqq zero", groups)?;
    let packed = scratch_f32(ctx, "hqq W_q", plan.params.words as usize)?;
    let state = SolverState {
        stopped: 0,
        beta: config.solver.beta,
        best: 1e4,
        iterations: 0,
    };
    let state = storage_from_bytes(ctx, "hqq solver state", bytemuck::bytes_of(&state))?;

    let per_group = grid(groups as u32);
    let stage = |entry: &'static str,
                 compute: ComputeDtype,
                 entries: &[(u32, &wgpu::Buffer)]|
     -> Result<(wgpu::ComputePipeline, wgpu::BindGroup)> {
        let pipeline = ctx.pipeline(&key(entry, compute))?;
        let group = bind(ctx, &pipeline, entries)?;
        Ok((pipeline, group))
    };
    let f32 = ComputeDtype::F32;
    let (p, b) = stage(
        "init",
        f32,
        &[
            (0, &params),
            (1, &w),
            (2, &inv_scale),
            (3, &scale),
            (4, &zero),
        ],
    )?;
    let init = Dispatch::new(p, b, per_group);
    let solver = if config.optimize && config.solver.iters > 0 {
        let group_error = scratch_f32(ctx, "hqq group error", groups)?;
        let (p, b) = stage(
            "iterate",
            f32,
            &[
                (0, &params),
                (1, &w),
                (2, &inv_scale),
                (4, &zero),
                (5, &group_error),
                (6, &state),
            ],
        )?;
        let iterate = Dispatch::new(p, b, per_group);
        let (p, b) = stage(
            "reduce_error",
            f32,
            &[(0, &params), (5, &group_error), (6, &state)],
        )?;
        Some((iterate, Dispatch::new(p, b, (1, 1))))
    } else {
        None
    };
    let (p, b) = stage(
        "pack",
        f32,
        &[
            (0, &params),
            (1, &w),
            (2, &inv_scale),
            (4, &zero),
            (7, &packed),
        ],
    )?;
    let pack = Dispatch::elementwise(p, b, plan.params.words as usize, ELEMENTWISE_WG);
    let finalize = if config.compute_dtype != f32 {
        let (p, b) = stage(
            "finalize",
            config.compute_dtype,
            &[(0, &params), (3, &scale), (4, &zero)],
        )?;
        Some(Dispatch::elementwise(p, b, groups, ELEMENTWISE_WG))
    } else {
        None
    };

    let mut order: Vec<&Dispatch> = vec![&init];
    if let Some((iterate, reduce)) = &solver {
        for _ in 0..config.solver.iters {
            order.push(iterate);
            order.push(reduce);
        }
    }
    order.push(&pack);
    order.extend(&finalize);
    Dispatch::submit_all(ctx, &order)?;
    Ok(Quantized {
        plan,
        packed,
        scale,
        zero,
    })
}

/// Quantizes a dense `[out, in]` weight on the GPU as [`HqqWeight::quantize`] does and keeps
/// the packed result there, as a layer for the quantized matmul kernels. Scale and zero are
/// rounded to `config.compute_dtype` on the GPU after the codes are computed in f32, as the
/// CPU path does. Invalid input (non-finite weight or bias, a group size that does not divide
/// the element count, unsupported nbits, a grouped row count the packing cannot take) fails
/// before anything is uploaded.
pub fn quantize_on_gpu(
    ctx: &GpuContext,
    weight: &Matrix,
    bias: Option<&[f32]>,
    config: &HqqConfig,
) -> Result<GpuQuantWeight> {
    let q = run(ctx, weight, bias, config)?;
    let plan = &q.plan;
    let buffers = HqqBuffers {
        shape: (plan.out_features, plan.in_features),
        grouping: &plan.grouping,
        packing: &plan.packing,
        slab_len: plan.packed_rows * plan.packed_cols,
        compute: config.compute_dtype,
        packed: q.packed,
        scale: q.scale,
        zero: q.zero,
        // The quantizer writes f32; narrowing them would need another pass.
        meta: MetaStorage::F32,
    };
    GpuQuantWeight::from_hqq_buffers(ctx, buffers, bias)
}

/// [`quantize_on_gpu`], then the packed bytes, scale and zero downloaded into an [`HqqWeight`].
pub fn quantize_to_host(
    ctx: &GpuContext,
    weight: &Matrix,
    bias: Option<&[f32]>,
    config: &HqqConfig,
) -> Result<HqqWeight> {
    let q = run(ctx, weight, bias, config)?;
    let plan = &q.plan;
    let groups = plan.grouping.groups();
    let packed = read_buffer(ctx, &q.packed, plan.packed_bytes)?;
    let scale = read_f32(ctx, &q.scale, groups)?;
    let zero = read_f32(ctx, &q.zero, groups)?;
    HqqWeight::from_parts(
        plan.out_features,
        plan.in_features,
        config.nbits,
        config.group_size,
        config.axis,
        packed,
        scale,
        zero,
        bias.map(<[f32]>::to_vec),
        config.compute_dtype,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::layout::{assert_matches_shader, rust_layout};

    #[test]
    fn params_match_the_shader() {
        let layout = rust_layout!(QuantParams {
            numel,
            group_size,
            groups,
            axis,
            max_code,
            round_zero,
            slab_len,
            words,
            field_bits,
            per_element,
            three_bit,
            lp_norm,
            kappa,
            grow_beta,
            opaque,
            _pad
        });
        assert_matches_shader(&shader_keys(), "QuantParams", layout);
    }
}
