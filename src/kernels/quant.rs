//! The quantized matmul family (`shaders/quant_*.wgsl`), shared by every format: a weight stays
//! packed on the GPU and each kernel decodes it in registers through the format's
//! `dequant_weight(n, k)` (`shaders/formats/<format>.wgsl`), or a packed word at a time where
//! the format provides `gemv_unit` (GEMV) or `gemm_decode_run` (tiled GEMM) and the weight's
//! shape allows it.

use crate::error::{Error, Result};
use crate::formats::split::{RowSplit, plan_row_splits};
use crate::formats::{QuantFormat, QuantWeight};
use crate::gpu::buffers::{read_f32, scratch_f32, storage_from_f32, uniform};
use crate::gpu::shaders::ShaderKey;
use crate::gpu::{ActDtype, GpuContext, GpuTensor};
use crate::kernels::fused::{EpilogueKind, Fused, extra_storage_bindings, with_fused_flags};
use crate::kernels::gemv::GroupedLayout;
use crate::kernels::{
    Dispatch, GEMM_BLOCKS, GEMM_TILE, GEMV_ROW_SPECIALIZATIONS, MatmulPath, bind_resources,
    check_io, check_path_rows, gemm_block, gemm_grid, gemv_max_m, grid,
};
use crate::tensor::Matrix;

/// Invocations of a GEMV workgroup.
pub(crate) const GEMV_WORKGROUP: u32 = 64;
/// Output features one GEMV workgroup owns.
pub const GEMV_ROWS_PER_WORKGROUP: usize = 4;
/// Values of x (columns x rows) the GEMV's OFT prologue rotates into workgroup memory at a time:
/// 2048 columns at M = 1, 256 at M = 8 (8 KiB).
const GEMV_OFT_CHUNK_VALUES: u32 = 2048;
/// Partial sums the GEMV reduces in workgroup memory at a time (8 KiB, which with the OFT
/// prologue's chunk keeps within the portable 16 KiB).
const GEMV_REDUCE_VALUES: u32 = 2048;

/// Tile rows the GEMV reduces per pass: all of them up to M = 8, half at M = 16.
fn gemv_reduce_rows(rows: usize) -> u32 {
    let per_pass = GEMV_REDUCE_VALUES / (GEMV_WORKGROUP * gemv_max_m(rows));
    per_pass.clamp(1, GEMV_ROWS_PER_WORKGROUP as u32)
}
const DEQUANT_WORKGROUP: u32 = 256;

/// Mirrors `MatmulParams` in `shaders/common/matmul_params.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    has_bias: u32,
    n_offset: u32,
    y_cols: u32,
    split_k: u32,
    pad: u32,
}

/// Formats whose shader provides the tiled GEMM's word decoder `gemm_decode_run`; the others
/// stage their weight an element at a time through `dequant_weight`.
const GEMM_WORD_FORMATS: [&str; 1] = ["HQQ"];

/// Which format's decoder a specialization includes, and its constants.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FormatShader {
    /// `HQQ`, `GPTQ` or `EETQ`: the `#ifdef` that pulls in `shaders/formats/<format>.wgsl`.
    pub flag: &'static str,
    /// The format's `const` values (bit width, zero convention, rounding), prepended to the
    /// source.
    pub consts: Vec<(&'static str, u32)>,
    /// The GEMV decodes a packed word at a time (`WORD_UNITS`): the format's layout and this
    /// weight's shape allow it.
    pub word_units: bool,
}

impl FormatShader {
    pub(crate) fn key(&self, family: &'static str, act: ActDtype) -> ShaderKey {
        let mut key = ShaderKey::new(family, "main", act).flag(self.flag, true);
        for (name, value) in &self.consts {
            key = key.constant(name, *value);
        }
        key
    }

    fn gemv_key(
        &self,
        act: ActDtype,
        rows: usize,
        oft: bool,
        lora: Option<EpilogueKind>,
    ) -> ShaderKey {
        let key = self
            .key("quant_gemv", act)
            .constant("WG", GEMV_WORKGROUP)
            .constant("MAX_M", gemv_max_m(rows))
            .constant("ROWS", GEMV_ROWS_PER_WORKGROUP as u32)
            .constant("CHUNK", GEMV_OFT_CHUNK_VALUES / gemv_max_m(rows))
            .constant("REDUCE_ROWS", gemv_reduce_rows(rows))
            .flag("WORD_UNITS", self.word_units)
            .flag("VEC4_WORDS", self.word_units);
        with_fused_flags(key, oft, lora)
    }

    /// The tiled GEMM decodes a packed word per run of inputs (`GEMM_WORDS`): the format's
    /// shader has `gemm_decode_run` and this weight's layout allows word decoding.
    fn gemm_words(&self) -> bool {
        self.word_units && GEMM_WORD_FORMATS.contains(&self.flag)
    }

    fn gemm_key(&self, act: ActDtype, block: u32, lora: Option<EpilogueKind>) -> ShaderKey {
        let key = self
            .key("quant_gemm", act)
            .constant("TILE", GEMM_TILE)
            .constant("BLOCK", block)
            .flag("GEMM_WORDS", self.gemm_words());
        with_fused_flags(key, false, lora)
    }

    fn dequant_key(&self) -> ShaderKey {
        self.key("quant_dequant", ActDtype::F32)
    }

    /// Every kernel of the family for this format specialization.
    pub fn keys(&self) -> Vec<ShaderKey> {
        let mut keys = vec![self.dequant_key()];
        for act in [ActDtype::F32, ActDtype::F16] {
            let epilogues = [None, Some(EpilogueKind::Single), Some(EpilogueKind::PerRow)];
            for lora in epilogues {
                for rows in GEMV_ROW_SPECIALIZATIONS {
                    keys.push(self.gemv_key(act, rows, false, lora));
                    keys.push(self.gemv_key(act, rows, true, lora));
                }
                for block in GEMM_BLOCKS {
                    keys.push(self.gemm_key(act, block, lora));
                }
            }
        }
        keys
    }
}

/// A quantized weight resident on the GPU, still packed, in any format: one slice of output
/// rows per set of bindings, several when the weight is larger than one binding may be.
#[derive(Debug)]
pub struct GpuQuantWeight {
    /// Rows of `W` and columns of y.
    pub out_features: usize,
    /// Columns of `W` and of x.
    pub in_features: usize,
    pub(crate) slices: Vec<RowSlice>,
    /// The whole layer's bias (a single zero when it has none), for adapters' epilogues.
    bias: wgpu::Buffer,
}

/// Output rows `[row_offset, row_offset + rows)` of a weight with their own bindings.
#[derive(Debug)]
pub(crate) struct RowSlice {
    row_offset: usize,
    pub(crate) rows: usize,
    pub(crate) shader: FormatShader,
    /// Bound from binding 1 on: the format's uniform (if any) and its storage buffers.
    format_bindings: Vec<(u32, wgpu::Buffer)>,
    pub(crate) bias: wgpu::Buffer,
    has_bias: bool,
    resident_bytes: usize,
    /// The layout `kernels::gemv`'s grouped GEMV reads, where it serves this slice.
    pub(crate) grouped: Option<GroupedLayout>,
}

fn bias_buffer(ctx: &GpuContext, bias: Option<&[f32]>) -> Result<wgpu::Buffer> {
    let values = bias.map(<[f32]>::to_vec).unwrap_or_else(|| vec![0.0]);
    storage_from_f32(ctx, "bias", &values)
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
        let bias_bytes = 4 * bias.map_or(1, <[f32]>::len);
        let resident_bytes = format_bindings
            .iter()
            .map(|(_, b)| b.size() as usize)
            .sum::<usize>()
            + bias_bytes;
        let slice = RowSlice {
            row_offset: 0,
            rows: out_features,
            shader,
            format_bindings,
            bias: bias_buffer(ctx, bias)?,
            has_bias: bias.is_some(),
            resident_bytes,
            grouped: None,
        };
        Ok(Self {
            out_features,
            in_features,
            bias: slice.bias.clone(),
            slices: vec![slice],
        })
    }

    /// This weight with the layout the grouped GEMV reads (`kernels::gemv`), where it has one.
    pub(crate) fn with_grouped_layout(mut self, layout: Option<GroupedLayout>) -> Self {
        for slice in &mut self.slices {
            slice.grouped = layout;
        }
        self
    }

    /// Uploads a base weight of any format, still packed, split by output rows where a buffer
    /// of it would exceed the device's storage-binding limit. Fails with [`Error::Allocation`]
    /// when even the smallest legal row slice has a buffer over that limit.
    pub fn upload(ctx: &GpuContext, weight: &QuantWeight) -> Result<Self> {
        let limits = ctx.limits();
        let max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        Self::upload_split(
            ctx,
            weight,
            usize::try_from(max_binding).unwrap_or(usize::MAX),
        )
    }

    /// [`Self::upload`] with at most `max_binding_bytes` in any one buffer.
    pub fn upload_split(
        ctx: &GpuContext,
        weight: &QuantWeight,
        max_binding_bytes: usize,
    ) -> Result<Self> {
        let ranges = plan_row_splits(weight, max_binding_bytes)?;
        if ranges.len() == 1 {
            return Self::upload_whole(ctx, weight);
        }
        let mut slices = Vec::with_capacity(ranges.len());
        for range in ranges {
            let part = Self::upload_whole(ctx, &weight.rows(range.clone())?)?;
            for mut slice in part.slices {
                slice.row_offset += range.start;
                slices.push(slice);
            }
        }
        Ok(Self {
            out_features: weight.out_features(),
            in_features: weight.in_features(),
            slices,
            bias: bias_buffer(ctx, weight.bias())?,
        })
    }

    fn upload_whole(ctx: &GpuContext, weight: &QuantWeight) -> Result<Self> {
        match weight {
            QuantWeight::Hqq(w) => Self::from_hqq(ctx, w),
            // HQQ's kernels serve GPTQ's 2/4/8-bit layers without act-order, bit for bit.
            QuantWeight::Gptq(w) => match w.to_hqq_layout()? {
                Some(hqq) => Self::from_hqq(ctx, &hqq),
                None => Self::from_gptq(ctx, w),
            },
            QuantWeight::Eetq(w) => Self::from_eetq(ctx, w),
        }
    }

    /// Bytes this layer keeps on the GPU (packed weight, its metadata, bias).
    pub fn resident_bytes(&self) -> usize {
        let slices: usize = self.slices.iter().map(|s| s.resident_bytes).sum();
        // A split weight also keeps the whole bias for the adapters' launches.
        let whole_bias = if self.slices.len() > 1 {
            self.bias.size() as usize
        } else {
            0
        };
        slices + whole_bias
    }

    /// Whether the GEMV decodes this weight a packed word at a time (in every row slice) rather
    /// than an element at a time.
    pub fn gemv_decodes_words(&self) -> bool {
        self.slices
            .iter()
            .all(|s| s.shader.word_units || s.grouped.is_some())
    }

    /// Whether the tiled GEMM stages this weight a packed word at a time (in every row slice)
    /// rather than an element at a time.
    pub fn gemm_decodes_words(&self) -> bool {
        self.slices.iter().all(|s| s.shader.gemm_words())
    }

    /// The format specialization of the first row slice, e.g. `HQQ FIELD_BITS=4 COMPUTE=0
    /// words` (every slice of a weight shares it unless the split changes word decoding).
    pub fn format_label(&self) -> String {
        let shader = &self.slices[0].shader;
        let mut label = shader.flag.to_string();
        for (name, value) in &shader.consts {
            label += &format!(" {name}={value}");
        }
        if shader.word_units {
            label += " words";
        }
        label
    }

    /// Row slices the weight is bound as (one unless it exceeds a binding).
    pub fn slices(&self) -> usize {
        self.slices.len()
    }

    /// The bias on the GPU (a single zero when the layer has none).
    pub fn bias_buffer(&self) -> &wgpu::Buffer {
        &self.bias
    }

    /// The whole weight dequantized to f32 `[out, in]` in a new GPU buffer, for merges; the
    /// layer itself never keeps a dequantized copy.
    pub fn dequantize_buffer(&self, ctx: &GpuContext) -> Result<wgpu::Buffer> {
        let out = scratch_f32(ctx, "dequantized", self.out_features * self.in_features)?;
        let mut launches = Vec::new();
        for slice in &self.slices {
            let pipeline = ctx.pipeline(&slice.shader.dequant_key())?;
            let params = slice.params(ctx, 0, self.in_features, self.out_features, 1)?;
            let bind =
                slice.bind_group(ctx, &pipeline, &params, vec![(8, out.as_entire_binding())])?;
            let numel = (slice.rows * self.in_features) as u32;
            launches.push(Dispatch::new(
                pipeline,
                bind,
                grid(numel.div_ceil(DEQUANT_WORKGROUP)),
            ));
        }
        Dispatch::submit_all(ctx, &[&Dispatch::chain(launches)])?;
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

    /// [`Self::forward`] on a given kernel path. Fails with [`Error::Unsupported`] for
    /// [`MatmulPath::Gemv`] on more than [`GEMV_MAX_ROWS`](super::GEMV_MAX_ROWS) rows.
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

    /// Binds `x: [m, in]` and `y: [m, out]` for one matmul, ready to record into any compute
    /// pass. Fails with [`Error::Shape`] when their shapes or dtypes do not match the weight,
    /// and with [`Error::Unsupported`] for the GEMV past its row limit or a grid too large.
    pub fn prepare(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
        y: &GpuTensor,
        path: MatmulPath,
    ) -> Result<Dispatch> {
        self.prepare_fused(ctx, x, y, path, &Fused::default())
    }

    /// Whether the kernels can fuse an OFT prologue of block size `oft_block` and a LoRA
    /// epilogue of kind `lora` into a matmul on `path` within this device's binding limit.
    pub fn can_fuse(
        &self,
        ctx: &GpuContext,
        path: MatmulPath,
        oft_block: Option<usize>,
        lora: Option<EpilogueKind>,
    ) -> bool {
        let oft_fits = oft_block
            .is_none_or(|b| path == MatmulPath::Gemv && self.in_features.is_multiple_of(b));
        let extra = extra_storage_bindings(oft_block.is_some(), lora);
        let limit = ctx.limits().max_storage_buffers_per_shader_stage;
        oft_fits
            && self
                .slices
                .iter()
                .all(|s| s.storage_bindings() + extra <= limit)
    }

    /// [`Self::prepare`] with adapter work fused into the launch: an OFT rotation of `x`
    /// (GEMV only) and one LoRA / DoRA term added to `y`.
    pub fn prepare_fused(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
        y: &GpuTensor,
        path: MatmulPath,
        fused: &Fused,
    ) -> Result<Dispatch> {
        check_io(x, y, self.in_features, self.out_features)?;
        check_path_rows(path, x.rows)?;
        match path {
            MatmulPath::Gemv => {
                let variant = self.gemv_choice(ctx, x.rows, x.dtype, fused);
                self.prepare_gemv(ctx, x, y, variant, fused)
            }
            MatmulPath::Tiled => {
                self.check_fusable(ctx, path, x.rows, fused)?;
                self.prepare_launches(ctx, x, y, fused, |slice| {
                    Ok((
                        slice
                            .shader
                            .gemm_key(x.dtype, gemm_block(x.rows), fused.epilogue_kind()),
                        gemm_grid(slice.rows, x.rows)?,
                    ))
                })
            }
        }
    }

    /// Fails with [`Error::Unsupported`] unless `fused` can join a matmul on `path`.
    pub(crate) fn check_fusable(
        &self,
        ctx: &GpuContext,
        path: MatmulPath,
        rows: usize,
        fused: &Fused,
    ) -> Result<()> {
        let oft_block = fused.oft.map(|o| o.block_size);
        if !fused.is_empty() && !self.can_fuse(ctx, path, oft_block, fused.epilogue_kind()) {
            return Err(Error::Unsupported(format!(
                "fusing {} into a {}-row matmul of a {}x{} layer on this device",
                fused.describe(),
                rows,
                self.out_features,
                self.in_features
            )));
        }
        Ok(())
    }

    /// The GEMV of `quant_gemv.wgsl` ([`LEGACY_GEMV`](super::gemv::LEGACY_GEMV)), for weights
    /// the grouped GEMV does not serve.
    pub(crate) fn prepare_legacy_gemv(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
        y: &GpuTensor,
        fused: &Fused,
    ) -> Result<Dispatch> {
        self.prepare_launches(ctx, x, y, fused, |slice| {
            Ok((
                slice
                    .shader
                    .gemv_key(x.dtype, x.rows, fused.oft.is_some(), fused.epilogue_kind()),
                grid(slice.rows.div_ceil(GEMV_ROWS_PER_WORKGROUP) as u32),
            ))
        })
    }

    /// One launch per row slice of the kernel `choose` names, binding x, bias, y and `fused`.
    fn prepare_launches(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
        y: &GpuTensor,
        fused: &Fused,
        choose: impl Fn(&RowSlice) -> Result<(ShaderKey, (u32, u32))>,
    ) -> Result<Dispatch> {
        let fused_params = fused.uniform(ctx)?;
        let mut launches = Vec::new();
        for slice in &self.slices {
            let (key, groups) = choose(slice)?;
            let pipeline = ctx.pipeline(&key)?;
            let params = slice.params(ctx, x.rows, self.in_features, self.out_features, 1)?;
            let mut tail = vec![
                (6, x.binding()),
                (7, slice.bias.as_entire_binding()),
                (8, y.binding()),
            ];
            if !fused.is_empty() {
                let fused_buffers = fused.bindings(&fused_params);
                tail.extend(
                    fused_buffers
                        .iter()
                        .map(|(i, b)| (*i, b.as_entire_binding())),
                );
            }
            let bind = slice.bind_group(ctx, &pipeline, &params, tail)?;
            launches.push(Dispatch::new(pipeline, bind, groups));
        }
        Ok(Dispatch::chain(launches))
    }
}

impl RowSlice {
    pub(crate) fn params(
        &self,
        ctx: &GpuContext,
        m: usize,
        k: usize,
        y_cols: usize,
        split_k: u32,
    ) -> Result<wgpu::Buffer> {
        uniform(
            ctx,
            "matmul params",
            &MatmulParams {
                m: m as u32,
                n: self.rows as u32,
                k: k as u32,
                has_bias: self.has_bias as u32,
                n_offset: self.row_offset as u32,
                y_cols: y_cols as u32,
                split_k,
                pad: 0,
            },
        )
    }

    pub(crate) fn bind_group(
        &self,
        ctx: &GpuContext,
        pipeline: &wgpu::ComputePipeline,
        params: &wgpu::Buffer,
        tail: Vec<(u32, wgpu::BindingResource<'_>)>,
    ) -> Result<wgpu::BindGroup> {
        let mut entries = vec![(0, params.as_entire_binding())];
        entries.extend(
            self.format_bindings
                .iter()
                .map(|(i, b)| (*i, b.as_entire_binding())),
        );
        entries.extend(tail);
        bind_resources(ctx, pipeline, entries)
    }

    /// Storage buffers a launch on this slice binds: the format's, x, bias and y.
    fn storage_bindings(&self) -> u32 {
        let format = self
            .format_bindings
            .iter()
            .filter(|(_, b)| b.usage().contains(wgpu::BufferUsages::STORAGE))
            .count() as u32;
        format + 3
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::layout::{assert_matches_shader, rust_layout};

    #[test]
    fn params_match_the_shader() {
        let layout = rust_layout!(MatmulParams {
            m,
            n,
            k,
            has_bias,
            n_offset,
            y_cols,
            split_k,
            pad
        });
        assert_matches_shader(&crate::kernels::hqq::shader_keys(), "MatmulParams", layout);
    }
}
