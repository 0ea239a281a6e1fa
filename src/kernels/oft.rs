//! The OFT rotation of activations on the GPU (`shaders/oft_rotate.wgsl`), and the construction
//! of the rotation blocks from the adapter's generators (`shaders/oft_build.wgsl`).

use crate::adapters::oft::Parameterization;
use crate::error::{Error, Result, check_finite};
use crate::gpu::buffers::{
    create_buffer, nan_f32, read_f32, read_f32_async, scratch_f32, storage_from_bytes,
    storage_from_f32, uniform,
};
use crate::gpu::shaders::ShaderKey;
use crate::gpu::{ActDtype, GpuContext, GpuTensor};
use crate::kernels::fused::OftPrologue;
use crate::kernels::{Dispatch, bind, bind_resources, check_io, grid};

const WORKGROUP: u32 = 256;

/// Mirrors `OftParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct OftParams {
    m: u32,
    k: u32,
    b: u32,
    stored_blocks: u32,
}

fn key(act: ActDtype) -> ShaderKey {
    ShaderKey::new("oft_rotate", "main", act)
}

/// Mirrors `BuildParams` in `shaders/common/oft_blocks.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct BuildParams {
    b: u32,
    rows: u32,
    terms: u32,
    cayley: u32,
}

/// `ELEMENT_WG` in `shaders/common/oft_blocks.wgsl`.
const ELEMENT_WG: u32 = 256;

/// The largest block the GPU builds. No build or check invocation loops much more than b times
/// (`shaders/common/oft_blocks.wgsl`), and llvmpipe silently ends a shader's loops after 65535
/// trips in all; a block this size is 1 GiB of f32 already.
pub const MAX_GPU_BLOCK_SIZE: usize = 16_384;

/// Entry points of `shaders/oft_build.wgsl` (always f32; `Act` is unused there).
const BUILD_ENTRIES: [&str; 6] = [
    "advance",
    "cayley_init",
    "cayley_pivot",
    "cayley_eliminate",
    "neumann_init",
    "neumann_power",
];

/// Entry points of `shaders/oft_check.wgsl`.
const CHECK_ENTRIES: [&str; 4] = ["check_start", "check_cayley", "check_power", "check_finish"];

fn build_key(entry: &'static str) -> ShaderKey {
    ShaderKey::new("oft_build", entry, ActDtype::F32)
}

fn check_key(entry: &'static str) -> ShaderKey {
    ShaderKey::new("oft_check", entry, ActDtype::F32)
}

/// Every shader specialization this module uses (the rotation in f32 and f16, the build and
/// check entries), for [`crate::kernels::catalogue`].
pub fn shader_keys() -> Vec<ShaderKey> {
    let mut keys = vec![key(ActDtype::F32), key(ActDtype::F16)];
    keys.extend(BUILD_ENTRIES.map(build_key));
    keys.extend(CHECK_ENTRIES.map(check_key));
    keys
}

/// The largest defect the post-build check accepts for blocks of `b` (`shaders/oft_check.wgsl`):
/// `max_i |(R v)_i − expected_i| / scale_i`, where `scale_i` sums the magnitudes of every term
/// either side adds up (so it bounds their rounding whatever the generator's size), at 64 ulps ×
/// √b. A correct f32 build and check differ by rounding alone, sums of b terms whose errors
/// grow like √b ulps of `scale` (random-walk accumulation): measured under 0.7 ulp × √b for
/// b = 2 to 512, generators from 0.01 / b to 3 per entry, both parameterizations, so about 1% of
/// the tolerance. A build cut short drops whole terms (a power of Q, an elimination step): measured
/// at 2e-2 to 1e-1 of `scale` with PEFT's init, 200 times the tolerance and more. A dropped term
/// passes only where it is itself under the tolerance, for generators so small that the term
/// hardly moves the block.
pub fn defect_tolerance(block_size: usize) -> f32 {
    DEFECT_ULPS * f32::EPSILON * (block_size.max(1) as f32).sqrt()
}

/// The tolerance's factor in ulps of `scale` (see [`defect_tolerance`]).
const DEFECT_ULPS: f32 = 64.0;

/// Launches recorded in order, each distinct one created once.
#[derive(Default)]
struct Chain {
    launches: Vec<Dispatch>,
    order: Vec<usize>,
}

impl Chain {
    fn add(&mut self, launch: Dispatch) -> usize {
        self.launches.push(launch);
        self.launches.len() - 1
    }

    fn then(&mut self, launch: usize) {
        self.order.push(launch);
    }

    fn sequence(&self) -> Vec<&Dispatch> {
        self.order.iter().map(|&i| &self.launches[i]).collect()
    }
}

/// The launch that moves a chain (`step`) to its next step.
fn advance(ctx: &GpuContext, step: &wgpu::Buffer) -> Result<Dispatch> {
    let pipeline = ctx.pipeline(&build_key("advance"))?;
    let group = bind(ctx, &pipeline, &[(4, step)])?;
    Ok(Dispatch::new(pipeline, group, (1, 1)))
}

/// The buffers of one GPU build of OFT blocks and its check (`shaders/oft_build.wgsl`,
/// `shaders/oft_check.wgsl`).
struct BlockBuild {
    b: usize,
    rows: usize,
    in_features: usize,
    parameterization: Parameterization,
    /// The last power of Q the Cayley-Neumann series adds (0 when it stops at Q).
    last_power: usize,
    uniforms: wgpu::Buffer,
    params: wgpu::Buffer,
    blocks: wgpu::Buffer,
    scratch: wgpu::Buffer,
    build_step: wgpu::Buffer,
    check_step: wgpu::Buffer,
    defects: wgpu::Buffer,
}

impl BlockBuild {
    fn new(
        ctx: &GpuContext,
        params: &[f32],
        b: usize,
        rows: usize,
        in_features: usize,
        parameterization: Parameterization,
    ) -> Result<Self> {
        let tri = b.saturating_sub(1) * b / 2;
        if b == 0 || in_features == 0 || !in_features.is_multiple_of(b) {
            return Err(Error::shape(
                "OFT block size",
                format!("a non-zero size dividing {in_features} inputs"),
                &[b],
            ));
        }
        if b > MAX_GPU_BLOCK_SIZE {
            return Err(Error::Unsupported(format!(
                "OFT blocks of {b} x {b} on the GPU (at most {MAX_GPU_BLOCK_SIZE}): build them \
                 on the CPU and upload them"
            )));
        }
        let n_blocks = in_features / b;
        if rows != 1 && rows != n_blocks {
            return Err(Error::shape(
                "OFT parameter rows",
                format!("1 (shared) or {n_blocks} for {in_features} inputs in blocks of {b}"),
                &[rows],
            ));
        }
        if Some(params.len()) != rows.checked_mul(tri) {
            return Err(Error::shape(
                "OFT parameter",
                format!("[{rows}, {tri}] (b(b-1)/2 = {tri} values per row for b = {b})"),
                &[params.len()],
            ));
        }
        check_finite("OFT parameter", params)?;
        let (terms, last_power) = match parameterization {
            Parameterization::Cayley => (0, 0),
            Parameterization::Neumann { terms } => (
                u32::try_from(terms).map_err(|_| {
                    Error::config(format!("{terms} Cayley-Neumann terms do not fit in u32"))
                })?,
                if terms > 2 { (terms - 1).max(3) } else { 0 },
            ),
        };
        let too_big = || Error::Unsupported(format!("OFT blocks of {b} x {b}, {rows} rows"));
        // Per block: the build's scratch (see oft_build.wgsl) or the check's (5b), the larger.
        let per_block = match parameterization {
            Parameterization::Cayley => b * b + 5 * b + 1,
            Parameterization::Neumann { .. } => 3 * b * b,
        }
        .max(5 * b);
        let scratch_floats = per_block.checked_mul(rows).ok_or_else(too_big)?;
        // The shaders index elements (fewer than rows x 2b² per launch) and scratch with u32.
        let elements = (2 * b * b).checked_mul(rows).ok_or_else(too_big)?;
        if u32::try_from(scratch_floats).is_err() || u32::try_from(elements).is_err() {
            return Err(too_big());
        }
        let scratch_bytes = scratch_floats * 4;
        let limit = ctx.limits().max_storage_buffer_binding_size as usize;
        if scratch_bytes > limit {
            return Err(Error::Unsupported(format!(
                "OFT build scratch needs {scratch_bytes} bytes, over this device's storage \
                 binding limit of {limit}"
            )));
        }
        let uniforms = uniform(
            ctx,
            "oft build params",
            &BuildParams {
                b: b as u32,
                rows: rows as u32,
                terms,
                cayley: u32::from(parameterization == Parameterization::Cayley),
            },
        )?;
        let scratch = create_buffer(
            ctx,
            &wgpu::BufferDescriptor {
                label: Some("oft build scratch"),
                size: scratch_bytes.max(4) as u64,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            },
        )?;
        Ok(Self {
            b,
            rows,
            in_features,
            parameterization,
            last_power,
            uniforms,
            params: storage_from_f32(ctx, "oft generator", params)?,
            blocks: scratch_f32(ctx, "oft blocks", rows * b * b)?,
            scratch,
            build_step: storage_from_bytes(ctx, "oft build step", &[0; 4])?,
            check_step: storage_from_bytes(ctx, "oft check step", &[0; 4])?,
            defects: nan_f32(ctx, "oft build defects", rows)?,
        })
    }

    /// A launch of the entry point `key` with `bindings` (exactly those its layout uses): one
    /// invocation per unit of work for `Some(units)`, or one workgroup per block for `None`.
    fn launch(
        &self,
        ctx: &GpuContext,
        key: ShaderKey,
        bindings: &[(u32, &wgpu::Buffer)],
        elements: Option<usize>,
    ) -> Result<Dispatch> {
        let pipeline = ctx.pipeline(&key)?;
        let group = bind(ctx, &pipeline, bindings)?;
        Ok(match elements {
            Some(n) => Dispatch::elementwise(pipeline, group, n, ELEMENT_WG),
            None => Dispatch::new(pipeline, group, grid(self.rows as u32)),
        })
    }

    /// The build: every block at once, one Gauss-Jordan column or one power of Q per step.
    fn build_chain(&self, ctx: &GpuContext) -> Result<Chain> {
        let (b, rows) = (self.b, self.rows);
        let (p, q, blocks, scratch, step) = (
            &self.uniforms,
            &self.params,
            &self.blocks,
            &self.scratch,
            &self.build_step,
        );
        let mut chain = Chain::default();
        let advance = chain.add(advance(ctx, step)?);
        match self.parameterization {
            Parameterization::Cayley => {
                let init = chain.add(self.launch(
                    ctx,
                    build_key("cayley_init"),
                    &[(0, p), (1, q), (2, blocks), (3, scratch)],
                    Some(rows * b * b),
                )?);
                let pivot = chain.add(self.launch(
                    ctx,
                    build_key("cayley_pivot"),
                    &[(0, p), (2, blocks), (3, scratch), (4, step)],
                    None,
                )?);
                // ELIMINATE_COLUMNS (4) elements of a row per invocation.
                let eliminate = chain.add(self.launch(
                    ctx,
                    build_key("cayley_eliminate"),
                    &[(0, p), (2, blocks), (3, scratch), (4, step)],
                    Some(rows * b * (2 * b).div_ceil(4)),
                )?);
                chain.then(init);
                for col in 0..b {
                    if col > 0 {
                        chain.then(advance);
                    }
                    chain.then(pivot);
                    chain.then(eliminate);
                }
            }
            Parameterization::Neumann { .. } => {
                let init = chain.add(self.launch(
                    ctx,
                    build_key("neumann_init"),
                    &[(0, p), (1, q), (2, blocks), (3, scratch)],
                    Some(rows * b * b),
                )?);
                // A TILE x TILE (4 x 4) tile per invocation.
                let power = chain.add(self.launch(
                    ctx,
                    build_key("neumann_power"),
                    &[(0, p), (2, blocks), (3, scratch), (4, step)],
                    Some(rows * b.div_ceil(4).pow(2)),
                )?);
                chain.then(init);
                for k in 2..=self.last_power {
                    if k > 2 {
                        chain.then(advance);
                    }
                    chain.then(power);
                }
            }
        }
        Ok(chain)
    }

    /// The check of what the build wrote: one defect per block (`shaders/oft_check.wgsl`).
    fn check_chain(&self, ctx: &GpuContext) -> Result<Chain> {
        let (b, rows) = (self.b, self.rows);
        let (p, q, blocks, scratch, step) = (
            &self.uniforms,
            &self.params,
            &self.blocks,
            &self.scratch,
            &self.check_step,
        );
        let mut chain = Chain::default();
        let start = chain.add(self.launch(
            ctx,
            check_key("check_start"),
            &[(0, p), (1, q), (2, blocks), (3, scratch)],
            Some(rows * b),
        )?);
        chain.then(start);
        match self.parameterization {
            Parameterization::Cayley => {
                let cayley = chain.add(self.launch(
                    ctx,
                    check_key("check_cayley"),
                    &[(0, p), (1, q), (3, scratch)],
                    Some(rows * b),
                )?);
                chain.then(cayley);
            }
            Parameterization::Neumann { .. } if self.last_power >= 2 => {
                let advance = chain.add(advance(ctx, step)?);
                let power = chain.add(self.launch(
                    ctx,
                    check_key("check_power"),
                    &[(0, p), (1, q), (3, scratch), (4, step)],
                    Some(rows * b),
                )?);
                for k in 2..=self.last_power {
                    if k > 2 {
                        chain.then(advance);
                    }
                    chain.then(power);
                }
            }
            Parameterization::Neumann { .. } => {}
        }
        let finish = chain.add(self.launch(
            ctx,
            check_key("check_finish"),
            &[(0, p), (3, scratch), (5, &self.defects)],
            None,
        )?);
        chain.then(finish);
        Ok(chain)
    }

    /// Runs `build` then `check` (one submission) and turns blocks the check finds wrong into an
    /// error.
    fn run(self, ctx: &GpuContext, build: &[&Dispatch], check: &[&Dispatch]) -> Result<GpuOft> {
        Self::submit(ctx, build, check)?;
        let defects = read_f32(ctx, &self.defects, self.rows)?;
        self.judge(ctx, &defects)
    }

    /// [`Self::run`] as a future that never blocks.
    async fn run_async(
        self,
        ctx: &GpuContext,
        build: &[&Dispatch],
        check: &[&Dispatch],
    ) -> Result<GpuOft> {
        Self::submit(ctx, build, check)?;
        let defects = read_f32_async(ctx, &self.defects, self.rows).await?;
        self.judge(ctx, &defects)
    }

    fn submit(ctx: &GpuContext, build: &[&Dispatch], check: &[&Dispatch]) -> Result<()> {
        let all: Vec<&Dispatch> = build.iter().chain(check).copied().collect();
        Dispatch::submit_all(ctx, &all).map(drop)
    }

    /// The built blocks, or an error when the check's `defects` (one per stored block) show one
    /// built wrong.
    fn judge(self, ctx: &GpuContext, defects: &[f32]) -> Result<GpuOft> {
        // A NaN (an unwritten defect) counts as the worst.
        let rank = |d: f32| if d.is_nan() { f32::INFINITY } else { d };
        let (block, defect) = defects
            .iter()
            .copied()
            .enumerate()
            .max_by(|(_, a), (_, b)| rank(*a).total_cmp(&rank(*b)))
            .unwrap_or((0, f32::NAN));
        let tolerance = defect_tolerance(self.b);
        if defect.is_nan() || defect > tolerance {
            let what = match self.parameterization {
                Parameterization::Cayley => "exact Cayley".to_string(),
                Parameterization::Neumann { terms } => format!("Cayley-Neumann, {terms} terms"),
            };
            return Err(Error::Gpu(format!(
                "OFT blocks of {b} x {b} ({what}) built on {adapter} are wrong: block {block} \
                 misses its defining equation by {defect:.3e} of its scale, over the {tolerance:.1e} \
                 rounding allows (the driver cut the build short?)",
                b = self.b,
                adapter = ctx.info.name,
            )));
        }
        Ok(GpuOft {
            in_features: self.in_features,
            block_size: self.b,
            stored_blocks: self.rows,
            blocks: self.blocks,
            build_defect: Some(defect),
        })
    }
}

/// A block-diagonal rotation resident on the GPU.
#[derive(Debug)]
pub struct GpuOft {
    /// Width of the rotated input (`blocks * block_size`).
    pub in_features: usize,
    /// Rows and columns of one rotation block.
    pub block_size: usize,
    stored_blocks: usize,
    blocks: wgpu::Buffer,
    build_defect: Option<f32>,
}

impl GpuOft {
    /// `blocks`: the distinct `b x b` blocks, row-major, one after another (one when shared).
    pub fn upload(
        ctx: &GpuContext,
        blocks: &[f32],
        block_size: usize,
        in_features: usize,
    ) -> Result<Self> {
        let per_block = block_size * block_size;
        if block_size == 0
            || blocks.is_empty()
            || !blocks.len().is_multiple_of(per_block)
            || !in_features.is_multiple_of(block_size)
        {
            return Err(Error::shape(
                "OFT blocks",
                format!("a multiple of {block_size}x{block_size}, dividing {in_features} inputs"),
                &[blocks.len()],
            ));
        }
        let stored_blocks = blocks.len() / per_block;
        if stored_blocks != 1 && stored_blocks != in_features / block_size {
            return Err(Error::shape(
                "OFT blocks",
                format!("1 or {} blocks", in_features / block_size),
                &[stored_blocks],
            ));
        }
        Ok(Self {
            in_features,
            block_size,
            stored_blocks,
            blocks: storage_from_f32(ctx, "oft blocks", blocks)?,
            build_defect: None,
        })
    }

    /// Builds the rotation blocks on the GPU from the adapter's parameter `[param_rows,
    /// b(b−1)/2]` (row-major, `triu_indices(b, b, 1)` order per row), exactly as
    /// [`crate::adapters::oft::OftAdapter`] does on the CPU: `param_rows` is `in_features / b`, or
    /// 1 under `block_share`. COFT is not applied here: pass the already projected parameter
    /// (`OftAdapter::params()`); the projection is a per-row rescale of a tiny tensor and stays on
    /// the CPU. The blocks are computed in f32. The exact Cayley solve cannot fail for a skew
    /// generator (`I + Q` is always invertible) and is pivoted anyway.
    ///
    /// Then every block is checked on the GPU against the equation that defines it (O(b²) per
    /// block, see [`defect_tolerance`]): blocks the driver built wrong fail with [`Error::Gpu`]
    /// naming the block size and the defect, rather than rotating wrongly.
    pub fn build(
        ctx: &GpuContext,
        params: &[f32],
        block_size: usize,
        param_rows: usize,
        in_features: usize,
        parameterization: Parameterization,
    ) -> Result<Self> {
        let job = BlockBuild::new(
            ctx,
            params,
            block_size,
            param_rows,
            in_features,
            parameterization,
        )?;
        let build = job.build_chain(ctx)?;
        let check = job.check_chain(ctx)?;
        job.run(ctx, &build.sequence(), &check.sequence())
    }

    /// [`Self::build`] as a future that never blocks on the check's readback (for any executor,
    /// and the web, where only this one works).
    pub async fn build_async(
        ctx: &GpuContext,
        params: &[f32],
        block_size: usize,
        param_rows: usize,
        in_features: usize,
        parameterization: Parameterization,
    ) -> Result<Self> {
        let job = BlockBuild::new(
            ctx,
            params,
            block_size,
            param_rows,
            in_features,
            parameterization,
        )?;
        let build = job.build_chain(ctx)?;
        let check = job.check_chain(ctx)?;
        job.run_async(ctx, &build.sequence(), &check.sequence())
            .await
    }

    /// The worst defect the post-build check measured (relative to its scale; under
    /// [`defect_tolerance`]), or `None` for uploaded blocks.
    pub fn build_defect(&self) -> Option<f32> {
        self.build_defect
    }

    /// The stored blocks, `[stored, b, b]` row-major (one block when shared), copied to the host.
    pub fn download_blocks(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        let count = self.stored_blocks * self.block_size * self.block_size;
        read_f32(ctx, &self.blocks, count)
    }

    /// The rotation as a GEMV prologue (`kernels::fused`).
    pub fn prologue(&self) -> OftPrologue<'_> {
        OftPrologue {
            blocks: &self.blocks,
            block_size: self.block_size,
            stored_blocks: self.stored_blocks,
        }
    }

    /// Binds one rotation `x -> y` (both `[m, in]`).
    pub fn prepare(&self, ctx: &GpuContext, x: &GpuTensor, y: &GpuTensor) -> Result<Dispatch> {
        check_io(x, y, self.in_features, self.in_features)?;
        let pipeline = ctx.pipeline(&key(x.dtype))?;
        let params = uniform(
            ctx,
            "oft params",
            &OftParams {
                m: x.rows as u32,
                k: x.cols as u32,
                b: self.block_size as u32,
                stored_blocks: self.stored_blocks as u32,
            },
        )?;
        let bind = bind_resources(
            ctx,
            &pipeline,
            vec![
                (0, params.as_entire_binding()),
                (1, self.blocks.as_entire_binding()),
                (2, x.binding()),
                (3, y.binding()),
            ],
        )?;
        Ok(Dispatch::elementwise(pipeline, bind, x.numel(), WORKGROUP))
    }

    /// `x · blockdiag(R)`, rounded to the activation dtype.
    pub fn rotate(&self, ctx: &GpuContext, x: &GpuTensor) -> Result<GpuTensor> {
        let y = GpuTensor::output(ctx, x.rows, x.cols, x.dtype)?;
        Dispatch::submit_all(ctx, &[&self.prepare(ctx, x, &y)?])?;
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Matrix;

    /// A build whose last step is left out, as a driver that cuts the loops of a build short
    /// leaves it (lavapipe dropped the last power of Q): the check refuses it, and accepts the
    /// whole build of the same generator.
    #[test]
    fn the_check_refuses_a_truncated_build() {
        let ctx = GpuContext::new().expect("GPU tests need an adapter");
        for (b, parameterization) in [
            (43, Parameterization::Neumann { terms: 5 }),
            (172, Parameterization::Neumann { terms: 5 }),
            (16, Parameterization::Cayley),
            (172, Parameterization::Cayley),
        ] {
            let rows = 2;
            // Uniform in ±0.17: about PEFT's N(0, 0.1) init.
            let params = Matrix::random(rows, b * (b - 1) / 2, 0.17).data;
            let job = || BlockBuild::new(&ctx, &params, b, rows, rows * b, parameterization);

            let whole = job().unwrap();
            let (build, check) = (whole.build_chain(&ctx).unwrap(), whole.check_chain(&ctx));
            let built = whole.run(&ctx, &build.sequence(), &check.unwrap().sequence());
            assert!(built.is_ok(), "b={b} {parameterization:?}: {built:?}");

            let cut = job().unwrap();
            let (build, check) = (cut.build_chain(&ctx).unwrap(), cut.check_chain(&ctx));
            // The last power of Q, or the last column's elimination.
            let mut steps = build.sequence();
            steps.pop();
            match cut.run(&ctx, &steps, &check.unwrap().sequence()) {
                Err(Error::Gpu(message)) => {
                    println!("{message}");
                    assert!(
                        message.contains(&format!("blocks of {b} x {b}")),
                        "{message}"
                    );
                }
                other => panic!("b={b} {parameterization:?}: a truncated build gave {other:?}"),
            }
        }
    }
}
