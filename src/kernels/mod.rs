//! One module per shader family: GPU-resident weights, bind groups and dispatch.

#[cfg(feature = "bench")]
pub mod dense;
pub mod eetq;
#[cfg(feature = "bench")]
pub mod fma;
pub mod fused;
pub mod gemv;
pub mod gptq;
pub mod hqq;
pub mod hqq_quantize;
#[cfg(test)]
mod layout;
pub mod lora;
pub mod merge;
pub mod mixed;
pub mod oft;
pub mod quant;
#[cfg(feature = "bench")]
pub mod stream;

use crate::error::{Error, Result};
use crate::gpu::shaders::ShaderKey;
use crate::gpu::{GpuContext, GpuTensor};

/// Every shader specialization the library can ask for (for ahead-of-time checks such as the
/// cross-compilation tests).
pub fn catalogue() -> Vec<ShaderKey> {
    let mut keys = hqq::shader_keys();
    keys.extend(gptq::shader_keys());
    keys.extend(eetq::shader_keys());
    keys.extend(oft::shader_keys());
    keys.extend(lora::shader_keys());
    keys.extend(mixed::shader_keys());
    keys.extend(merge::shader_keys());
    keys.extend(hqq_quantize::shader_keys());
    #[cfg(feature = "bench")]
    {
        keys.extend(dense::shader_keys());
        keys.extend(stream::shader_keys());
        keys.extend(fma::shader_keys());
    }
    // Word-decoding format variants share their non-GEMV kernels with the element ones.
    let mut seen = std::collections::HashSet::new();
    keys.retain(|key| seen.insert(key.clone()));
    keys
}

/// Workgroups per grid dimension a launch may ask for.
const MAX_GRID: u32 = 65535;

/// Workgroup grid for `count` workgroups, split over x and y past the 65535-per-dimension limit.
pub(crate) fn grid(count: u32) -> (u32, u32) {
    if count <= MAX_GRID {
        (count.max(1), 1)
    } else {
        (MAX_GRID, count.div_ceil(MAX_GRID))
    }
}

/// Which matmul kernel runs: a GEMV for a few rows, a tiled GEMM for many.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPath {
    /// One workgroup per [`GEMV_ROWS_PER_WORKGROUP`](quant::GEMV_ROWS_PER_WORKGROUP) output
    /// rows, reading the weight once for up to [`GEMV_MAX_ROWS`] rows of x: the decode path.
    Gemv,
    /// Tiled GEMM over output tiles, for any number of rows: the prefill path.
    Tiled,
}

/// Rows of x up to which the GEMV runs (each invocation keeps one accumulator per row).
pub const GEMV_MAX_ROWS: usize = 16;

/// Invocations per side of a tiled-GEMM workgroup (`shaders/common/gemm_tiles.wgsl`).
pub(crate) const GEMM_TILE: u32 = 16;

/// Outputs per side each tiled-GEMM invocation computes (`BLOCK`): one for fewer than
/// [`GEMM_BLOCKED_ROWS`] rows of x, where a 64-row tile would sit mostly idle and leave too few
/// workgroups, 4 x 4 from there on, so each staged value feeds 4 multiply-adds.
pub(crate) const GEMM_BLOCKS: [u32; 2] = [1, 4];
pub(crate) const GEMM_BLOCKED_ROWS: usize = 64;

pub(crate) fn gemm_block(rows: usize) -> u32 {
    if rows >= GEMM_BLOCKED_ROWS { 4 } else { 1 }
}

/// Workgroups of a tiled GEMM of `rows` rows of x and `out_features` outputs; fails where they
/// exceed the grid.
pub(crate) fn gemm_grid(out_features: usize, rows: usize) -> Result<(u32, u32)> {
    let tile = (GEMM_TILE * gemm_block(rows)) as usize;
    let (x, y) = (out_features.div_ceil(tile), rows.div_ceil(tile));
    if x > MAX_GRID as usize || y > MAX_GRID as usize {
        return Err(Error::Unsupported(format!(
            "a {rows}x{out_features} tiled matmul exceeds the workgroup grid"
        )));
    }
    Ok((x as u32, y as u32))
}

/// Fails unless `rows` rows of x may run on `path`.
pub(crate) fn check_path_rows(path: MatmulPath, rows: usize) -> Result<()> {
    if path == MatmulPath::Gemv && rows > GEMV_MAX_ROWS {
        return Err(Error::Unsupported(format!(
            "the GEMV path takes at most {GEMV_MAX_ROWS} rows, got {rows}"
        )));
    }
    Ok(())
}

/// The GEMV is specialized for its row count rounded up to a power of two (`MAX_M`), so its
/// loops over rows have constant bounds and the accumulators stay in registers.
pub const GEMV_ROW_SPECIALIZATIONS: [usize; 5] = [1, 2, 4, 8, 16];

/// `MAX_M` of the GEMV specialization for `rows` rows (at most [`GEMV_MAX_ROWS`]).
pub(crate) fn gemv_max_m(rows: usize) -> u32 {
    rows.max(1).next_power_of_two() as u32
}

impl MatmulPath {
    /// The path a forward of `rows` rows of x takes: GEMV up to [`GEMV_MAX_ROWS`], tiled beyond.
    pub fn for_rows(rows: usize) -> Self {
        if rows <= GEMV_MAX_ROWS {
            Self::Gemv
        } else {
            Self::Tiled
        }
    }
}

/// Fails unless `x: [m, inputs]` and `y: [m, outputs]` have the same rows and dtype.
pub(crate) fn check_io(x: &GpuTensor, y: &GpuTensor, inputs: usize, outputs: usize) -> Result<()> {
    if x.cols != inputs || y.cols != outputs || y.rows != x.rows || y.dtype != x.dtype {
        return Err(Error::shape(
            "x",
            format!("[m, {inputs}] -> [m, {outputs}] of one dtype"),
            &[x.rows, x.cols, y.rows, y.cols],
        ));
    }
    Ok(())
}

/// Bound kernel launches (usually one) that can be recorded into any compute pass, any number
/// of times.
#[derive(Clone, Debug)]
pub struct Dispatch {
    launches: Vec<Launch>,
}

#[derive(Clone, Debug)]
struct Launch {
    pipeline: wgpu::ComputePipeline,
    bind: wgpu::BindGroup,
    groups: (u32, u32),
}

impl Dispatch {
    pub(crate) fn new(
        pipeline: wgpu::ComputePipeline,
        bind: wgpu::BindGroup,
        groups: (u32, u32),
    ) -> Self {
        Self {
            launches: vec![Launch {
                pipeline,
                bind,
                groups,
            }],
        }
    }

    /// A launch of one invocation per element, `workgroup` invocations per workgroup.
    pub(crate) fn elementwise(
        pipeline: wgpu::ComputePipeline,
        bind: wgpu::BindGroup,
        elements: usize,
        workgroup: u32,
    ) -> Self {
        let groups = grid((elements as u32).div_ceil(workgroup));
        Self::new(pipeline, bind, groups)
    }

    /// The launches of `parts`, one after another.
    pub(crate) fn chain(parts: Vec<Dispatch>) -> Self {
        Self {
            launches: parts.into_iter().flat_map(|d| d.launches).collect(),
        }
    }

    /// Kernel launches this records.
    pub fn launches(&self) -> usize {
        self.launches.len()
    }

    /// Records every launch, in order, into a compute pass the caller has begun.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        for launch in &self.launches {
            pass.set_pipeline(&launch.pipeline);
            pass.set_bind_group(0, &launch.bind, &[]);
            pass.dispatch_workgroups(launch.groups.0, launch.groups.1, 1);
        }
    }

    /// Records the launches in one pass of a host encoder (nothing is submitted).
    pub fn encode_all(encoder: &mut wgpu::CommandEncoder, dispatches: &[&Dispatch]) {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("quantadapt"),
            timestamp_writes: None,
        });
        for d in dispatches {
            d.record(&mut pass);
        }
    }

    /// Records the launches in one pass and submits them, without waiting.
    pub fn submit_all(ctx: &GpuContext, dispatches: &[&Dispatch]) -> Result<wgpu::SubmissionIndex> {
        ctx.submit(|enc| Self::encode_all(enc, dispatches))
    }
}

/// A bind group for group 0 of `pipeline` from `(binding, buffer)` pairs, each buffer bound
/// whole; a binding the device refuses comes back as an error.
pub(crate) fn bind(
    ctx: &GpuContext,
    pipeline: &wgpu::ComputePipeline,
    entries: &[(u32, &wgpu::Buffer)],
) -> Result<wgpu::BindGroup> {
    let resources: Vec<(u32, wgpu::BindingResource<'_>)> = entries
        .iter()
        .map(|(binding, buffer)| (*binding, buffer.as_entire_binding()))
        .collect();
    bind_resources(ctx, pipeline, resources)
}

/// [`bind`] with any resources: tensors bind their own range ([`GpuTensor::binding`]).
pub(crate) fn bind_resources(
    ctx: &GpuContext,
    pipeline: &wgpu::ComputePipeline,
    entries: Vec<(u32, wgpu::BindingResource<'_>)>,
) -> Result<wgpu::BindGroup> {
    let entries: Vec<wgpu::BindGroupEntry<'_>> = entries
        .into_iter()
        .map(|(binding, resource)| wgpu::BindGroupEntry { binding, resource })
        .collect();
    ctx.count_bind_group();
    let (group, validation, _) = ctx.capture(|| {
        ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        })
    });
    match validation {
        None => Ok(group),
        Some(e) => {
            ctx.check_alive()?;
            Err(Error::wgpu("bind group", e))
        }
    }
}
