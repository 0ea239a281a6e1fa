//! Adapter work a quantized matmul launch does around the base product
//! (`shaders/common/fused_ops.wgsl`): an OFT rotation of x as the GEMV's prologue and one LoRA /
//! DoRA term as the epilogue of the GEMV or the tiled GEMM. The separate launches of
//! `kernels::{oft, lora}` stay the reference the fused paths are tested against.

use crate::error::Result;
use crate::gpu::GpuContext;
use crate::gpu::buffers::uniform;
use crate::gpu::shaders::ShaderKey;

/// Mirrors `FusedParams` in `shaders/common/fused_ops.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct FusedParams {
    oft_b: u32,
    oft_stored_blocks: u32,
    lora_r: u32,
    lora_scaling: f32,
    lora_dora: u32,
    pad: [u32; 3],
}

/// One OFT adapter's rotation, applied to x inside the GEMV.
#[derive(Clone, Copy, Debug)]
pub struct OftPrologue<'a> {
    /// The distinct `b x b` blocks, row-major (one when shared).
    pub blocks: &'a wgpu::Buffer,
    /// `b`: rows and columns of each block; x's columns rotate in consecutive runs of `b`.
    pub block_size: usize,
    /// Blocks in `blocks`: 1 when one block is shared by every run, else `in / b`.
    pub stored_blocks: usize,
}

/// LoRA / DoRA terms added to the matmul's output before it is written.
#[derive(Clone, Copy, Debug)]
pub enum LoraEpilogue<'a> {
    /// One adapter for every row.
    Single {
        /// `x · Aᵀ`, `[m, rank]` f32, from the adapter's shrink launch.
        h: &'a wgpu::Buffer,
        /// `[out, rank]`.
        b: &'a wgpu::Buffer,
        /// `[out]` f32, DoRA's per-output rescale (magnitude / row norm of `W + s·B·A`);
        /// `None` for plain LoRA.
        dora_scale: Option<&'a wgpu::Buffer>,
        /// `r`: columns of `h` and of `b`.
        rank: usize,
        /// `s` in `s·(h·Bᵀ)` (`alpha / r`, or `alpha / sqrt(r)` for rsLoRA).
        scaling: f32,
    },
    /// Each row's own adapter (or none) in a mixed batch, from its slot table (`kernels::mixed`).
    PerRow {
        /// `[m, max_rank]` f32, from the mixed batch's shrink launch.
        h: &'a wgpu::Buffer,
        /// `[m]` u32: each row's slot in `table`, or `kernels::mixed::NONE` for the base alone.
        row_slots: &'a wgpu::Buffer,
        /// The slot table of the layer's packed adapters (kind, offsets, rank, scaling, DoRA).
        table: &'a wgpu::Buffer,
        /// Every adapter's f32 parameters, packed; `table` holds the offsets into it.
        weights: &'a wgpu::Buffer,
        /// The largest rank among the slots: the row stride of `h`.
        max_rank: usize,
    },
}

/// Which kind of LoRA epilogue a specialization carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpilogueKind {
    /// [`LoraEpilogue::Single`].
    Single,
    /// [`LoraEpilogue::PerRow`].
    PerRow,
}

impl EpilogueKind {
    /// Every kind, for enumerating specializations.
    pub const ALL: [Self; 2] = [Self::Single, Self::PerRow];

    /// Storage buffers the epilogue adds to a launch.
    pub fn storage_bindings(self) -> u32 {
        match self {
            Self::Single => 3,
            Self::PerRow => 4,
        }
    }
}

impl LoraEpilogue<'_> {
    /// Which specialization this epilogue needs.
    pub fn kind(&self) -> EpilogueKind {
        match self {
            Self::Single { .. } => EpilogueKind::Single,
            Self::PerRow { .. } => EpilogueKind::PerRow,
        }
    }
}

/// What one matmul launch fuses; the default fuses nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fused<'a> {
    /// A rotation of x before the product (GEMV path only).
    pub oft: Option<OftPrologue<'a>>,
    /// LoRA / DoRA terms added to the product before it is written.
    pub lora: Option<LoraEpilogue<'a>>,
}

impl Fused<'_> {
    /// True when nothing is fused: the plain matmul.
    pub fn is_empty(&self) -> bool {
        self.oft.is_none() && self.lora.is_none()
    }

    /// The kind of the LoRA epilogue, if there is one.
    pub fn epilogue_kind(&self) -> Option<EpilogueKind> {
        self.lora.map(|l| l.kind())
    }

    /// What is fused, for messages.
    pub fn describe(&self) -> &'static str {
        match (self.oft.is_some(), self.lora.is_some()) {
            (true, true) => "an OFT prologue and a LoRA epilogue",
            (true, false) => "an OFT prologue",
            (false, true) => "a LoRA epilogue",
            (false, false) => "nothing",
        }
    }

    /// The fused operations' parameters, bound at 9.
    pub(crate) fn uniform(&self, ctx: &GpuContext) -> Result<wgpu::Buffer> {
        let mut params = FusedParams::default();
        if let Some(oft) = &self.oft {
            params.oft_b = oft.block_size as u32;
            params.oft_stored_blocks = oft.stored_blocks as u32;
        }
        match self.lora {
            Some(LoraEpilogue::Single {
                dora_scale,
                rank,
                scaling,
                ..
            }) => {
                params.lora_r = rank as u32;
                params.lora_scaling = scaling;
                params.lora_dora = dora_scale.is_some() as u32;
            }
            Some(LoraEpilogue::PerRow { max_rank, .. }) => params.lora_r = max_rank as u32,
            None => {}
        }
        uniform(ctx, "fused params", &params)
    }

    /// Every buffer to bind next to the matmul's own, `params` from [`Self::uniform`].
    pub(crate) fn bindings<'b>(&'b self, params: &'b wgpu::Buffer) -> Vec<(u32, &'b wgpu::Buffer)> {
        let mut entries = vec![(9, params)];
        if let Some(oft) = &self.oft {
            entries.push((10, oft.blocks));
        }
        match self.lora {
            Some(LoraEpilogue::Single {
                h, b, dora_scale, ..
            }) => {
                entries.push((11, h));
                entries.push((12, b));
                // Without DoRA the scale is never read; B stands in for it.
                entries.push((13, dora_scale.unwrap_or(b)));
            }
            Some(LoraEpilogue::PerRow {
                h,
                row_slots,
                table,
                weights,
                ..
            }) => {
                entries.push((11, h));
                entries.push((12, row_slots));
                entries.push((13, table));
                entries.push((14, weights));
            }
            None => {}
        }
        entries
    }
}

/// Storage buffers an OFT prologue and a LoRA epilogue add to a matmul launch.
pub fn extra_storage_bindings(oft: bool, lora: Option<EpilogueKind>) -> u32 {
    oft as u32 + lora.map_or(0, EpilogueKind::storage_bindings)
}

/// `key` with the flags that switch an OFT prologue and a LoRA epilogue on.
pub(crate) fn with_fused_flags(key: ShaderKey, oft: bool, lora: Option<EpilogueKind>) -> ShaderKey {
    key.flag("FUSED", oft || lora.is_some())
        .flag("OFT_PROLOGUE", oft)
        .flag("LORA_EPILOGUE", lora.is_some())
        .flag("PER_ROW_LORA", lora == Some(EpilogueKind::PerRow))
}

/// The most loop trips a GEMV invocation may spend rotating x in the OFT prologue: each rotates
/// `m·k / WG` elements of x, b trips each, and llvmpipe silently ends an invocation's loops after
/// 65535 trips in all (the GEMV's own loops need some of them).
const OFT_PROLOGUE_TRIPS: usize = 16_384;

/// Whether the OFT prologue's loops stay short enough for every driver at `m` rows, `k` inputs
/// and blocks of `b` (`m·k·b / GEMV_WORKGROUP` trips, at most 16384); where they do not, the
/// rotation runs as a launch of its own, whatever the fusion setting.
pub fn oft_prologue_fits(m: usize, k: usize, b: usize) -> bool {
    m.saturating_mul(k).saturating_mul(b) / crate::kernels::quant::GEMV_WORKGROUP as usize
        <= OFT_PROLOGUE_TRIPS
}

/// What the cost model weighs, as measured on an H100 through wgpu/Vulkan: one more launch
/// (1.6-2.2 us), the streaming read (3.0 TB/s) and f32 multiply-adds (36 TFLOP/s).
const LAUNCH_SECONDS: f64 = 2.0e-6;
const READ_BYTES_PER_SECOND: f64 = 3.0e12;
const FMA_PER_SECOND: f64 = 18.0e12;

/// Whether rotating x inside the GEMV's workgroups costs less than a launch of its own: each of
/// `tiles` tiles of outputs (its workgroups together, one per slice of K where K is split)
/// re-reads the blocks and redoes `m·k·b` multiply-adds, where the separate launch does them once.
pub fn oft_prologue_pays(tiles: usize, m: usize, k: usize, b: usize, shared: bool) -> bool {
    let block_bytes = if shared { b * b * 4 } else { k * b * 4 };
    let extra_bytes = (tiles.saturating_sub(1) * block_bytes) as f64;
    let extra_fma = (tiles.saturating_sub(1) * m * k * b) as f64;
    extra_bytes / READ_BYTES_PER_SECOND + extra_fma / FMA_PER_SECOND < LAUNCH_SECONDS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::layout::{assert_matches_shader, rust_layout};

    #[test]
    fn params_match_the_shader() {
        let layout = rust_layout!(FusedParams {
            oft_b,
            oft_stored_blocks,
            lora_r,
            lora_scaling,
            lora_dora,
            pad
        });
        assert_matches_shader(&crate::kernels::hqq::shader_keys(), "FusedParams", layout);
    }
}
