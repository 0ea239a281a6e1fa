//! The quantized matmul family (`shaders/quant_*.wgsl`), shared by every format: a weight stays
//! packed on the GPU and each kernel decodes it in registers through the format's
//! `dequant_weight(n, k)` (`shaders/formats/<format>.wgsl`).

use crate::error::{Error, Result};
use crate::formats::QuantWeight;
use crate::gpu::buffers::{poisoned_f32, read_f32, storage_from_f32, uniform};
use crate::gpu::shaders::ShaderKey;
use crate::gpu::{ActDtype, GpuContext, GpuTensor};
use crate::kernels::{Dispatch, GEMV_MAX_ROWS, MatmulPath, bind, check_io, grid};
use crate::tensor::Matrix;

const GEMV_WORKGROUP: u32 = 64;
const GEMM_TILE: u32 = 16;
const DEQUANT_WORKGROUP: u32 = 256;

/// Mirrors `MatmulParams` in `shaders/common/matmul_params.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    has_bias: u32,
}

/// Which format's decoder a specialization includes, and its constants.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FormatShader {
    /// `HQQ`, `GPTQ` or `EETQ`: the `#ifdef` that pulls in `shaders/formats/<format>.wgsl`.
    pub flag: &'static str,
    pub consts: Vec<(&'static str, u32)>,
}

impl FormatShader {
    fn key(&self, family: &'static str, act: ActDtype) -> ShaderKey {
        let mut key = ShaderKey::new(family, "main", act).flag(self.flag, true);
        for (name, value) in &self.consts {
            key = key.constant(name, *value);
        }
        key
    }

    fn gemv_key(&self, act: ActDtype) -> ShaderKey {
        self.key("quant_gemv", act)
            .constant("WG", GEMV_WORKGROUP)
            .constant("MAX_M", GEMV_MAX_ROWS as u32)
    }

    fn gemm_key(&self, act: ActDtype) -> ShaderKey {
        self.key("quant_gemm", act).constant("TILE", GEMM_TILE)
    }

    fn dequant_key(&self) -> ShaderKey {
        self.key("quant_dequant", ActDtype::F32)
    }

    /// Every kernel of the family for this format specialization.
    pub fn keys(&self) -> Vec<ShaderKey> {
        let mut keys = vec![self.dequant_key()];
        for act in [ActDtype::F32, ActDtype::F16] {
            keys.push(self.gemv_key(act));
            keys.push(self.gemm_key(act));
        }
        keys
    }
}

/// A quantized weight resident on the GPU, still packed, in any format.
#[derive(Debug)]
pub struct GpuQuantWeight {
    pub out_features: usize,
    pub in_features: usize,
    shader: FormatShader,
    /// Bound from binding 1 on: the format's uniform (if any) and its storage buffers.
    format_bindings: Vec<(u32, wgpu::Buffer)>,
    bias: wgpu::Buffer,
    has_bias: bool,
    resident_bytes: usize,
}

impl GpuQuantWeight {
    /// Assembles a weight from its format's buffers; `bias` of `out_features` values if any.
    pub(crate) fn new(
        ctx: &GpuContext,
        (out_features, in_features): (usize, usize),
        shader: FormatShader,
        format_bindings: Vec<(u32, wgpu::Buffer)>,
        bias: Option<&[f32]>,
    ) -> Result<Self> {
        let numel = out_features
            .checked_mul(in_features)
            .filter(|n| *n <= u32::MAX as usize);
        if numel.is_none() {
            return Err(Error::Unsupported(format!(
                "a {out_features}x{in_features} weight exceeds 32-bit indexing"
            )));
        }
        let bias_values = bias.map(<[f32]>::to_vec).unwrap_or_else(|| vec![0.0]);
        let resident_bytes = format_bindings
            .iter()
            .map(|(_, b)| b.size() as usize)
            .sum::<usize>()
            + 4 * bias_values.len();
        Ok(Self {
            out_features,
            in_features,
            shader,
            format_bindings,
            bias: storage_from_f32(ctx, "bias", &bias_values)?,
            has_bias: bias.is_some(),
            resident_bytes,
        })
    }

    /// Uploads a base weight of any format, still packed.
    pub fn upload(ctx: &GpuContext, weight: &QuantWeight) -> Result<Self> {
        match weight {
            QuantWeight::Hqq(w) => Self::from_hqq(ctx, w),
            QuantWeight::Gptq(w) => Self::from_gptq(ctx, w),
            QuantWeight::Eetq(w) => Self::from_eetq(ctx, w),
        }
    }

    /// Bytes this layer keeps on the GPU (packed weight, its metadata, bias).
    pub fn resident_bytes(&self) -> usize {
        self.resident_bytes
    }

    /// The bias on the GPU (a single zero when the layer has none).
    pub fn bias_buffer(&self) -> &wgpu::Buffer {
        &self.bias
    }

    fn params(&self, ctx: &GpuContext, m: usize) -> Result<wgpu::Buffer> {
        uniform(
            ctx,
            "matmul params",
            &MatmulParams {
                m: m as u32,
                n: self.out_features as u32,
                k: self.in_features as u32,
                has_bias: self.has_bias as u32,
            },
        )
    }

    fn bind_group(
        &self,
        ctx: &GpuContext,
        pipeline: &wgpu::ComputePipeline,
        params: &wgpu::Buffer,
        tail: &[(u32, &wgpu::Buffer)],
    ) -> Result<wgpu::BindGroup> {
        let mut entries: Vec<(u32, &wgpu::Buffer)> = vec![(0, params)];
        entries.extend(self.format_bindings.iter().map(|(i, b)| (*i, b)));
        entries.extend_from_slice(tail);
        bind(ctx, pipeline, &entries)
    }

    /// The whole weight dequantized to f32 `[out, in]` in a new GPU buffer, for merges; the
    /// layer itself never keeps a dequantized copy.
    pub fn dequantize_buffer(&self, ctx: &GpuContext) -> Result<wgpu::Buffer> {
        let numel = self.out_features * self.in_features;
        let out = poisoned_f32(ctx, "dequantized", numel)?;
        let pipeline = ctx.pipeline(&self.shader.dequant_key())?;
        let params = self.params(ctx, 0)?;
        let bind = self.bind_group(ctx, &pipeline, &params, &[(8, &out)])?;
        let dispatch = Dispatch::new(
            pipeline,
            bind,
            grid((numel as u32).div_ceil(DEQUANT_WORKGROUP)),
        );
        Dispatch::run_all(ctx, &[&dispatch])?;
        Ok(out)
    }

    /// The whole weight dequantized to f32 `[out, in]` on the host, for checks.
    pub fn dequantize(&self, ctx: &GpuContext) -> Result<Matrix> {
        let numel = self.out_features * self.in_features;
        let values = read_f32(ctx, &self.dequantize_buffer(ctx)?, numel)?;
        Matrix::new(self.out_features, self.in_features, values)
    }

    /// `y = x · Wᵀ + bias`, choosing the kernel by the number of rows.
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
        Dispatch::run_all(ctx, &[&self.prepare(ctx, x, &y, path)?])?;
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
        check_io(x, y, self.in_features, self.out_features)?;
        if path == MatmulPath::Gemv && x.rows > GEMV_MAX_ROWS {
            return Err(Error::Unsupported(format!(
                "the GEMV path takes at most {GEMV_MAX_ROWS} rows, got {}",
                x.rows
            )));
        }
        let (key, groups) = match path {
            MatmulPath::Gemv => (
                self.shader.gemv_key(x.dtype),
                grid(self.out_features as u32),
            ),
            MatmulPath::Tiled => (
                self.shader.gemm_key(x.dtype),
                (
                    (self.out_features as u32).div_ceil(GEMM_TILE),
                    (x.rows as u32).div_ceil(GEMM_TILE),
                ),
            ),
        };
        if groups.0 > 65535 || groups.1 > 65535 {
            return Err(Error::Unsupported(format!(
                "a {}x{} tiled matmul exceeds the workgroup grid",
                x.rows, self.out_features
            )));
        }
        let pipeline = ctx.pipeline(&key)?;
        let params = self.params(ctx, x.rows)?;
        let bind = self.bind_group(
            ctx,
            &pipeline,
            &params,
            &[(6, &x.buffer), (7, &self.bias), (8, &y.buffer)],
        )?;
        Ok(Dispatch::new(pipeline, bind, groups))
    }
}
