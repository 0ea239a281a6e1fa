//! HQQ on the GPU: the packed weight stays packed; dequantization and matmuls decode it in
//! registers (`shaders/hqq_*.wgsl`).

use crate::error::{Error, Result};
use crate::formats::hqq::{ComputeDtype, HqqWeight};
use crate::gpu::buffers::{POISON_F32, read_buffer, storage_from_bytes, storage_from_f32, uniform};
use crate::gpu::shaders::ShaderKey;
use crate::gpu::{ActDtype, GpuContext, GpuTensor};
use crate::kernels::{Dispatch, GEMV_MAX_ROWS, MatmulPath, bind, grid};
use crate::tensor::Matrix;

const GEMV_WORKGROUP: u32 = 64;
const GEMM_TILE: u32 = 16;
const DEQUANT_WORKGROUP: u32 = 256;

/// Mirrors `HqqParams` in `shaders/common/hqq_codes.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct HqqParams {
    m: u32,
    n: u32,
    k: u32,
    group_size: u32,
    groups: u32,
    axis: u32,
    slab_len: u32,
    has_bias: u32,
}

/// An HQQ weight resident on the GPU, still packed.
#[derive(Debug)]
pub struct GpuHqq {
    pub out_features: usize,
    pub in_features: usize,
    field_bits: u32,
    compute: u32,
    params: HqqParams,
    packed: wgpu::Buffer,
    scale: wgpu::Buffer,
    zero: wgpu::Buffer,
    bias: wgpu::Buffer,
    resident_bytes: usize,
}

fn compute_code(dtype: ComputeDtype) -> u32 {
    match dtype {
        ComputeDtype::F32 => 0,
        ComputeDtype::F16 => 1,
        ComputeDtype::BF16 => 2,
    }
}

fn base_key(family: &'static str, field_bits: u32, compute: u32, act: ActDtype) -> ShaderKey {
    ShaderKey::new(family, "main", act)
        .constant("FIELD_BITS", field_bits)
        .constant("COMPUTE", compute)
}

fn gemv_key(field_bits: u32, compute: u32, act: ActDtype) -> ShaderKey {
    base_key("hqq_gemv", field_bits, compute, act)
        .constant("WG", GEMV_WORKGROUP)
        .constant("MAX_M", GEMV_MAX_ROWS as u32)
}

fn gemm_key(field_bits: u32, compute: u32, act: ActDtype) -> ShaderKey {
    base_key("hqq_gemm", field_bits, compute, act).constant("TILE", GEMM_TILE)
}

fn dequant_key(field_bits: u32, compute: u32) -> ShaderKey {
    base_key("hqq_dequant", field_bits, compute, ActDtype::F32)
}

/// Every HQQ specialization the library can request.
pub fn shader_keys() -> Vec<ShaderKey> {
    let mut keys = Vec::new();
    for bits in [8, 4, 3, 2, 1] {
        for compute in 0..3 {
            keys.push(dequant_key(bits, compute));
            for act in [ActDtype::F32, ActDtype::F16] {
                keys.push(gemv_key(bits, compute, act));
                keys.push(gemm_key(bits, compute, act));
            }
        }
    }
    keys
}

impl GpuHqq {
    pub fn upload(ctx: &GpuContext, w: &HqqWeight) -> Result<Self> {
        let numel = w.grouping.numel;
        if numel > u32::MAX as usize {
            return Err(Error::Unsupported(format!(
                "HQQ weight of {numel} elements exceeds 32-bit indexing"
            )));
        }
        let bias_values = w.bias.clone().unwrap_or_else(|| vec![0.0]);
        let params = HqqParams {
            m: 0,
            n: w.out_features as u32,
            k: w.in_features as u32,
            group_size: w.grouping.group_size as u32,
            groups: w.grouping.groups() as u32,
            axis: w.grouping.axis as u32,
            slab_len: (w.packed_rows * w.packed_cols) as u32,
            has_bias: w.bias.is_some() as u32,
        };
        Ok(Self {
            out_features: w.out_features,
            in_features: w.in_features,
            field_bits: w.packing.field_bits(),
            compute: compute_code(w.compute_dtype),
            params,
            packed: storage_from_bytes(ctx, "hqq W_q", &w.packed)?,
            scale: storage_from_f32(ctx, "hqq scale", &w.scale)?,
            zero: storage_from_f32(ctx, "hqq zero", &w.zero)?,
            bias: storage_from_f32(ctx, "hqq bias", &bias_values)?,
            resident_bytes: w.packed.len() + 8 * w.scale.len() + 4 * bias_values.len(),
        })
    }

    /// Bytes this layer keeps on the GPU (packed codes, f32 scale and zero, bias).
    pub fn resident_bytes(&self) -> usize {
        self.resident_bytes
    }

    /// The bias on the GPU (a single zero when the layer has none).
    pub fn bias_buffer(&self) -> &wgpu::Buffer {
        &self.bias
    }

    /// The whole weight dequantized to f32 `[out, in]` (for checks: the layer never keeps it).
    pub fn dequantize(&self, ctx: &GpuContext) -> Result<Matrix> {
        let numel = self.out_features * self.in_features;
        let out = storage_from_bytes(ctx, "hqq dequant", &POISON_F32.to_le_bytes().repeat(numel))?;
        let pipeline = ctx.pipeline(&dequant_key(self.field_bits, self.compute))?;
        let params = uniform(ctx, "hqq params", &self.params);
        let bind = bind(
            ctx,
            &pipeline,
            &[
                (0, &params),
                (1, &self.packed),
                (2, &self.scale),
                (3, &self.zero),
                (6, &out),
            ],
        );
        let (gx, gy) = grid((numel as u32).div_ceil(DEQUANT_WORKGROUP));
        ctx.submit(|enc| {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(gx, gy, 1);
        })?;
        let bytes = read_buffer(ctx, &out, numel * 4)?;
        Matrix::new(
            self.out_features,
            self.in_features,
            bytemuck::cast_slice(&bytes).to_vec(),
        )
    }

    /// `y = x · Wᵀ + bias` on the GPU, choosing the kernel by the number of rows.
    pub fn forward(&self, ctx: &GpuContext, x: &GpuTensor) -> Result<GpuTensor> {
        self.forward_with(ctx, x, MatmulPath::for_rows(x.rows))
    }

    pub fn forward_with(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
        path: MatmulPath,
    ) -> Result<GpuTensor> {
        let y = GpuTensor::poisoned(ctx, x.rows, self.out_features, x.dtype)?;
        let dispatch = self.prepare(ctx, x, &y, path)?;
        ctx.submit(|enc| {
            let mut pass = enc.begin_compute_pass(&Default::default());
            dispatch.record(&mut pass);
        })?;
        Ok(y)
    }

    /// Binds `x` and `y` for one matmul, ready to record into any compute pass.
    pub fn prepare(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
        y: &GpuTensor,
        path: MatmulPath,
    ) -> Result<Dispatch> {
        if x.cols != self.in_features || y.cols != self.out_features || y.rows != x.rows {
            return Err(Error::shape(
                "x",
                format!("[m, {}] -> [m, {}]", self.in_features, self.out_features),
                &[x.rows, x.cols, y.rows, y.cols],
            ));
        }
        if path == MatmulPath::Gemv && x.rows > GEMV_MAX_ROWS {
            return Err(Error::Unsupported(format!(
                "the GEMV path takes at most {GEMV_MAX_ROWS} rows, got {}",
                x.rows
            )));
        }
        let (key, groups) = match path {
            MatmulPath::Gemv => (
                gemv_key(self.field_bits, self.compute, x.dtype),
                grid(self.out_features as u32),
            ),
            MatmulPath::Tiled => (
                gemm_key(self.field_bits, self.compute, x.dtype),
                (
                    (self.out_features as u32).div_ceil(GEMM_TILE),
                    (x.rows as u32).div_ceil(GEMM_TILE),
                ),
            ),
        };
        if groups.1 > 65535 {
            return Err(Error::Unsupported(format!(
                "{} rows in one tiled matmul",
                x.rows
            )));
        }
        let pipeline = ctx.pipeline(&key)?;
        let params = uniform(
            ctx,
            "hqq params",
            &HqqParams {
                m: x.rows as u32,
                ..self.params
            },
        );
        let bind = bind(
            ctx,
            &pipeline,
            &[
                (0, &params),
                (1, &self.packed),
                (2, &self.scale),
                (3, &self.zero),
                (4, &x.buffer),
                (5, &self.bias),
                (6, &y.buffer),
            ],
        );
        Ok(Dispatch::new(pipeline, bind, groups))
    }
}
