//! `QuantLinear`: one quantized base weight, named adapters, the active set, merge state and
//! bias, run on the CPU reference or on a GPU.
//!
//! Semantics follow PEFT, with these deliberate differences: the bias survives merges (PEFT
//! 0.21.2 drops it on HQQ); unmerge restores the weight kept aside at merge time, so it is exact
//! (PEFT re-quantizes a second time); a merged layer still applies the active adapters that are
//! not merged (PEFT silently ignores them); disabling adapters unmerges at that moment rather than
//! on the next forward.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::adapters::Adapter;
use crate::adapters::lora::LoraAdapter;
use crate::error::{Error, Result, check_finite};
use crate::formats::hqq::{HqqConfig, HqqWeight};
use crate::formats::{QuantFormat, QuantWeight};
use crate::gpu::{ActDtype, GpuContext, GpuTensor};
use crate::kernels::fused::{EpilogueKind, Fused, oft_prologue_fits, oft_prologue_pays};
use crate::kernels::hqq_quantize::quantize_to_host;
use crate::kernels::lora::GpuLora;
use crate::kernels::merge::{self, MergeDelta};
use crate::kernels::mixed::{self, GpuMixedAdapters, MixedSlot};
use crate::kernels::oft::GpuOft;
use crate::kernels::quant::GpuQuantWeight;
use crate::kernels::{Dispatch, MatmulPath};
use crate::tensor::Matrix;

/// Where a layer runs.
#[derive(Clone, Debug)]
pub enum Backend {
    /// The CPU reference: forwards and merges in f32 on the host.
    Cpu,
    /// A GPU context: the base weight and adapters are uploaded when added.
    Gpu(Box<GpuContext>),
}

/// The adapter name that selects the base alone in [`QuantLinear::forward_mixed`].
pub const BASE_ONLY: &str = "__base__";

enum GpuAdapter {
    Oft(GpuOft),
    Lora(GpuLora),
}

struct GpuState {
    ctx: GpuContext,
    base: GpuQuantWeight,
    adapters: HashMap<String, GpuAdapter>,
    /// Every adapter packed for mixed batches, one slot each in `QuantLinear::adapters` order;
    /// built on first use and dropped when the adapter set changes.
    mixed: Mutex<Option<Arc<GpuMixedAdapters>>>,
    /// Plans of the forwards encoded so far, by tensors and rows; emptied by every change of
    /// the layer's state.
    plans: Mutex<HashMap<PlanKey, Arc<ForwardPlan>>>,
}

/// Plans a layer keeps at most; past that the cache starts over.
const MAX_PLANS: usize = 64;

/// What a forward's plan depends on besides the layer's state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PlanKey {
    x: (wgpu::Buffer, u64),
    y: (wgpu::Buffer, u64),
    rows: usize,
    dtype: ActDtype,
    /// Each row's adapter slot, for a mixed batch.
    row_slots: Option<Vec<u32>>,
}

impl PlanKey {
    fn new(x: &GpuTensor, y: &GpuTensor, row_slots: Option<Vec<u32>>) -> Self {
        Self {
            x: (x.buffer.clone(), x.offset),
            y: (y.buffer.clone(), y.offset),
            rows: x.rows,
            dtype: x.dtype,
            row_slots,
        }
    }
}

/// Everything one forward of a layer needs for given input and output tensors: pipelines, bind
/// groups, uniforms and intermediate buffers, built once. Recording it creates nothing.
#[derive(Debug)]
pub struct ForwardPlan {
    dispatches: Vec<Dispatch>,
}

impl ForwardPlan {
    /// The plan's steps in order (a step may hold several launches, e.g. one per row slice).
    pub fn dispatches(&self) -> &[Dispatch] {
        &self.dispatches
    }

    /// Kernel launches one forward records.
    pub fn launches(&self) -> usize {
        self.dispatches.iter().map(Dispatch::launches).sum()
    }

    /// Records the forward into a compute pass of the caller's.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatches.iter().for_each(|d| d.record(pass));
    }

    /// Records the forward into a compute pass of its own in the caller's encoder.
    pub fn encode(&self, encoder: &mut wgpu::CommandEncoder) {
        Dispatch::encode_all(encoder, &self.dispatches.iter().collect::<Vec<_>>());
    }
}

struct Merged {
    name: String,
    previous: QuantWeight,
}

/// A quantized linear layer with adapters.
pub struct QuantLinear {
    base: QuantWeight,
    adapters: Vec<Adapter>,
    active: Vec<String>,
    enabled: bool,
    merged: Vec<Merged>,
    gpu: Option<GpuState>,
    fusion: Fusion,
}

/// How much adapter work a GPU forward fuses into the base matmul launch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fusion {
    /// A launch per adapter kernel: the reference the fused paths are checked against.
    Off,
    /// An OFT rotation as the GEMV's prologue where `kernels::fused::oft_prologue_fits` and
    /// `oft_prologue_pays`, and a
    /// LoRA expand as the matmul's epilogue wherever the device's binding limit allows.
    #[default]
    Auto,
    /// Everything the kernels can fuse, paying or not (for tests and measurements); an OFT
    /// prologue still only where `kernels::fused::oft_prologue_fits`.
    Always,
}

fn adapter_error(name: &str, reason: impl Into<String>) -> Error {
    Error::Adapter {
        adapter: name.to_string(),
        reason: reason.into(),
    }
}

impl QuantLinear {
    /// A layer of `base` with no adapters; on [`Backend::Gpu`] the weight is uploaded now
    /// (failing with a GPU error if the device refuses it).
    pub fn new(base: QuantWeight, backend: Backend) -> Result<Self> {
        let gpu = match backend {
            Backend::Cpu => None,
            Backend::Gpu(ctx) => Some(GpuState {
                base: GpuQuantWeight::upload(&ctx, &base)?,
                ctx: *ctx,
                adapters: HashMap::new(),
                mixed: Mutex::new(None),
                plans: Mutex::new(HashMap::new()),
            }),
        };
        Ok(Self {
            base,
            adapters: Vec::new(),
            active: Vec::new(),
            enabled: true,
            merged: Vec::new(),
            gpu,
            fusion: Fusion::default(),
        })
    }

    /// False once the layer's GPU device is lost: every GPU call then fails with
    /// [`Error::DeviceLost`] and the layer has to be built again on a new context. A CPU layer is
    /// always usable.
    pub fn is_usable(&self) -> bool {
        self.gpu.as_ref().is_none_or(|g| !g.ctx.is_lost())
    }

    /// The current base weight, with any merged adapters folded in.
    pub fn base(&self) -> &QuantWeight {
        &self.base
    }

    /// The adapter added under `name`, merged or not.
    pub fn adapter(&self, name: &str) -> Option<&Adapter> {
        self.adapters.iter().find(|a| a.name() == name)
    }

    /// Names of the active adapters, in the order they apply (merged ones included).
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    /// Names of the adapters merged into the base, oldest first ([`Self::unmerge`] undoes
    /// the last).
    pub fn merged_adapters(&self) -> Vec<&str> {
        self.merged.iter().map(|m| m.name.as_str()).collect()
    }

    /// The base weight before any merge.
    fn original_base(&self) -> &QuantWeight {
        self.merged.first().map_or(&self.base, |m| &m.previous)
    }

    /// Adds an adapter (not yet active). Its shape must match the layer. Fails with
    /// [`Error::Adapter`] for a name already taken (or [`BASE_ONLY`]) or a shape that does not fit.
    pub fn add_adapter(&mut self, adapter: Adapter) -> Result<()> {
        self.check_new_adapter(&adapter)?;
        let uploaded = match &self.gpu {
            Some(gpu) => Some(upload_adapter(&gpu.ctx, &adapter, self.original_base())?),
            None => None,
        };
        self.insert_adapter(adapter, uploaded);
        Ok(())
    }

    /// [`Self::add_adapter`] as a future that never blocks: an OFT adapter's blocks are built
    /// and checked on the GPU, and the check's result is awaited (for any executor, and the web,
    /// where the blocking version cannot wait for it).
    pub async fn add_adapter_async(&mut self, adapter: Adapter) -> Result<()> {
        self.check_new_adapter(&adapter)?;
        let uploaded = match &self.gpu {
            Some(gpu) => {
                Some(upload_adapter_async(&gpu.ctx, &adapter, self.original_base()).await?)
            }
            None => None,
        };
        self.insert_adapter(adapter, uploaded);
        Ok(())
    }

    fn check_new_adapter(&self, adapter: &Adapter) -> Result<()> {
        let name = adapter.name();
        if name == BASE_ONLY || self.adapter(name).is_some() {
            return Err(adapter_error(
                name,
                "an adapter of that name exists (or the name is reserved)",
            ));
        }
        let (inp, out) = (self.base.in_features(), self.base.out_features());
        let fits = match adapter {
            Adapter::Oft(a) => a.in_features() == inp,
            Adapter::Lora(a) => a.in_features() == inp && a.out_features() == out,
        };
        if !fits {
            return Err(adapter_error(
                name,
                format!("does not fit a layer of {inp} inputs and {out} outputs"),
            ));
        }
        Ok(())
    }

    fn insert_adapter(&mut self, adapter: Adapter, uploaded: Option<GpuAdapter>) {
        if let (Some(gpu), Some(g)) = (&mut self.gpu, uploaded) {
            gpu.adapters.insert(adapter.name().to_string(), g);
            gpu.mixed = Mutex::new(None);
        }
        self.adapters.push(adapter);
        self.invalidate_plans();
    }

    /// Removes an adapter; a merged one must be unmerged first. Fails with [`Error::Adapter`]
    /// for an unknown or merged adapter.
    pub fn remove_adapter(&mut self, name: &str) -> Result<()> {
        if self.merged.iter().any(|m| m.name == name) {
            return Err(adapter_error(
                name,
                "is merged; unmerge it before removing it",
            ));
        }
        let before = self.adapters.len();
        self.adapters.retain(|a| a.name() != name);
        if self.adapters.len() == before {
            return Err(adapter_error(name, "no such adapter"));
        }
        self.active.retain(|a| a != name);
        if let Some(gpu) = &mut self.gpu {
            gpu.adapters.remove(name);
            gpu.mixed = Mutex::new(None);
        }
        self.invalidate_plans();
        Ok(())
    }

    /// Sets the active adapters, in order: OFT rotations compose in this order on the input,
    /// LoRA terms add on the output. Fails with [`Error::Adapter`] for an unknown name, leaving
    /// the active set as it was.
    pub fn set_active(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            if self.adapter(n).is_none() {
                return Err(adapter_error(n, "no such adapter"));
            }
        }
        self.active = names.iter().map(|n| n.to_string()).collect();
        self.invalidate_plans();
        Ok(())
    }

    /// Disabling runs the original base alone; merged adapters are unmerged first.
    pub fn set_enabled(&mut self, enabled: bool) -> Result<()> {
        if !enabled {
            self.unmerge_all()?;
        }
        self.enabled = enabled;
        self.invalidate_plans();
        Ok(())
    }

    fn unmerged_active(&self) -> Vec<&Adapter> {
        if !self.enabled {
            return Vec::new();
        }
        self.active
            .iter()
            .filter(|n| !self.merged.iter().any(|m| &m.name == *n))
            .filter_map(|n| self.adapter(n))
            .collect()
    }

    /// `y = base(x · R…) + Σ LoRA(x)` for the active, unmerged adapters; host in, host out.
    /// On a GPU this uploads `x`, submits the forward and waits for it (at most the context's
    /// timeout, then [`Error::Timeout`]); embedding apps record into their own encoder with
    /// [`Self::encode_forward`] instead.
    pub fn forward(&self, x: &Matrix) -> Result<Matrix> {
        match &self.gpu {
            None => self.forward_cpu(x, &self.unmerged_active()),
            Some(gpu) => {
                let xg = GpuTensor::upload(&gpu.ctx, x, ActDtype::F32)?;
                self.forward_gpu(&xg)?.download(&gpu.ctx)
            }
        }
    }

    /// [`Self::forward`] as a future that never blocks (for any executor, and the web).
    pub async fn forward_async(&self, x: &Matrix) -> Result<Matrix> {
        match &self.gpu {
            None => self.forward_cpu(x, &self.unmerged_active()),
            Some(gpu) => {
                let xg = GpuTensor::upload(&gpu.ctx, x, ActDtype::F32)?;
                self.forward_gpu(&xg)?.download_async(&gpu.ctx).await
            }
        }
    }

    fn forward_cpu(&self, x: &Matrix, adapters: &[&Adapter]) -> Result<Matrix> {
        let mut rotated = x.clone();
        for a in adapters {
            if let Adapter::Oft(oft) = a {
                rotated = oft.rotate_fast(&rotated)?;
            }
        }
        let mut y = self.base.forward_fast(&rotated)?;
        // Only DoRA reads the dequantized base; plain LoRA gets an empty stand-in.
        let mut dora_weight = None;
        let no_weight = Matrix::zeros(0, 0);
        for a in adapters {
            if let Adapter::Lora(lora) = a {
                let weight = match lora.is_dora() {
                    true => &*dora_weight.get_or_insert_with(|| self.original_base().dequantize()),
                    false => &no_weight,
                };
                lora.apply_cpu(x, &mut y, self.base.bias(), weight)?;
            }
        }
        Ok(y)
    }

    /// The forward on GPU-resident activations (f32 or f16) into a new tensor; the work is
    /// submitted, not waited for (a download of the result waits for it).
    pub fn forward_gpu(&self, x: &GpuTensor) -> Result<GpuTensor> {
        let gpu = self.gpu_state()?;
        let y = GpuTensor::output(&gpu.ctx, x.rows, self.base.out_features(), x.dtype)?;
        let plan = self.build_plan(gpu, x, &y)?;
        Dispatch::submit_all(&gpu.ctx, &plan.dispatches.iter().collect::<Vec<_>>())?;
        Ok(y)
    }

    fn gpu_state(&self) -> Result<&GpuState> {
        self.gpu.as_ref().ok_or_else(|| {
            Error::Unsupported("a GPU forward on a layer built for the CPU backend".into())
        })
    }

    /// Records the forward of `x` into `y` (tensors of the caller's or the library's, at any
    /// aligned offset) into a compute pass of its own in the caller's encoder. Nothing is
    /// submitted or waited for: the app submits the encoder with its own work around ours.
    /// The plan is built on first use for these tensors and reused: later calls create no
    /// buffer, bind group or uniform.
    pub fn encode_forward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        y: &GpuTensor,
    ) -> Result<()> {
        self.prepare_forward(x, y)?.encode(encoder);
        Ok(())
    }

    /// [`Self::encode_forward`] into a compute pass the caller has begun.
    pub fn record_forward(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        x: &GpuTensor,
        y: &GpuTensor,
    ) -> Result<()> {
        self.prepare_forward(x, y)?.record(pass);
        Ok(())
    }

    /// The plan of one forward of `x` into `y` with the active adapters: built once for these
    /// tensors and the layer's state, then reused until the state changes (adapters, active
    /// set, enabling, fusion, merges). The layer holds its plans, and with them the tensors'
    /// buffers, until then or [`Self::clear_plans`]. Fails with [`Error::Shape`] unless
    /// `x: [m, in]` and `y: [m, out]` share rows and dtype, and with [`Error::Unsupported`] on a
    /// CPU layer or when `x` and `y` are views of one buffer.
    pub fn prepare_forward(&self, x: &GpuTensor, y: &GpuTensor) -> Result<Arc<ForwardPlan>> {
        let gpu = self.gpu_state()?;
        check_distinct_buffers(x, y)?;
        self.cached_plan(gpu, PlanKey::new(x, y, None), || self.build_plan(gpu, x, y))
    }

    /// Compiles the pipelines the layer's forwards of these row counts will use, in `dtype`,
    /// so that the first forward does not pay for it (and an app can do it at load time).
    pub fn prewarm(&self, rows: &[usize], dtype: ActDtype) -> Result<()> {
        let gpu = self.gpu_state()?;
        let ctx = &gpu.ctx;
        for &m in rows {
            let x = GpuTensor::output(ctx, m, self.base.in_features(), dtype)?;
            let y = GpuTensor::output(ctx, m, self.base.out_features(), dtype)?;
            self.build_plan(gpu, &x, &y)?;
        }
        Ok(())
    }

    /// Drops the plans the layer holds (and their references to tensors' buffers).
    pub fn clear_plans(&self) {
        if let Some(gpu) = &self.gpu {
            if let Ok(mut plans) = gpu.plans.lock() {
                plans.clear();
            }
        }
    }

    fn invalidate_plans(&mut self) {
        if let Some(gpu) = &mut self.gpu {
            gpu.plans = Mutex::new(HashMap::new());
        }
    }

    /// The plan under `key`, built by `build` outside the cache's lock if there is none.
    fn cached_plan(
        &self,
        gpu: &GpuState,
        key: PlanKey,
        build: impl FnOnce() -> Result<ForwardPlan>,
    ) -> Result<Arc<ForwardPlan>> {
        if let Some(plan) = lock_plans(gpu)?.get(&key) {
            return Ok(plan.clone());
        }
        let plan = Arc::new(build()?);
        let mut plans = lock_plans(gpu)?;
        if plans.len() >= MAX_PLANS {
            plans.clear();
        }
        Ok(plans.entry(key).or_insert(plan).clone())
    }

    fn build_plan(&self, gpu: &GpuState, x: &GpuTensor, y: &GpuTensor) -> Result<ForwardPlan> {
        Ok(ForwardPlan {
            dispatches: self.prepare_with(gpu, x, y, &self.unmerged_active())?,
        })
    }

    /// How much adapter work the GPU forward fuses into the base matmul.
    pub fn set_fusion(&mut self, fusion: Fusion) {
        self.fusion = fusion;
        self.invalidate_plans();
    }

    /// The fusion setting GPU forwards use (default [`Fusion::Auto`]).
    pub fn fusion(&self) -> Fusion {
        self.fusion
    }

    fn prepare_with(
        &self,
        gpu: &GpuState,
        x: &GpuTensor,
        y: &GpuTensor,
        adapters: &[&Adapter],
    ) -> Result<Vec<Dispatch>> {
        let ctx = &gpu.ctx;
        let path = MatmulPath::for_rows(x.rows);
        let mut ofts = Vec::new();
        let mut loras = Vec::new();
        for a in adapters {
            match gpu.adapters.get(a.name()) {
                Some(GpuAdapter::Oft(oft)) => ofts.push(oft),
                Some(GpuAdapter::Lora(lora)) => loras.push(lora),
                None => {}
            }
        }
        let (fuse_oft, fuse_lora) =
            self.fusion_plan(gpu, x.rows, ofts.last().copied(), !loras.is_empty());
        // The last rotation can be the GEMV's prologue and the first LoRA's expand the matmul's
        // epilogue; the others keep launches of their own, in the same order.
        let (separate_ofts, fused_oft) = match fuse_oft {
            true => (&ofts[..ofts.len() - 1], ofts.last()),
            false => (&ofts[..], None),
        };
        let mut steps = Vec::new();
        let mut rotated = x.clone();
        for oft in separate_ofts {
            let next = GpuTensor::output(ctx, x.rows, x.cols, x.dtype)?;
            steps.push(oft.prepare(ctx, &rotated, &next)?);
            rotated = next;
        }
        let mut fused_lora = None;
        if fuse_lora {
            let (shrink, h) = loras[0].prepare_shrink(ctx, x)?;
            steps.push(shrink);
            fused_lora = Some((loras[0], h));
        }
        let fused = Fused {
            oft: fused_oft.map(|oft| oft.prologue()),
            lora: fused_lora.as_ref().map(|(lora, h)| lora.epilogue(h)),
        };
        steps.push(gpu.base.prepare_fused(ctx, &rotated, y, path, &fused)?);
        for lora in &loras[fuse_lora as usize..] {
            steps.extend(lora.prepare(ctx, x, y, Some(gpu.base.bias_buffer()))?);
        }
        Ok(steps)
    }

    /// Whether to fuse the last OFT rotation and the first LoRA term into the base matmul.
    fn fusion_plan(
        &self,
        gpu: &GpuState,
        rows: usize,
        oft: Option<&GpuOft>,
        lora: bool,
    ) -> (bool, bool) {
        if self.fusion == Fusion::Off {
            return (false, false);
        }
        let path = MatmulPath::for_rows(rows);
        let oft_wanted = oft.is_some_and(|oft| {
            let prologue = oft.prologue();
            let k = self.base.in_features();
            // Every workgroup along N rotates x (its own K-slice of it, where K is split), so
            // the rotation is redone once per tile of outputs the fused GEMV would run with.
            let fused = Fused {
                oft: Some(prologue),
                lora: None,
            };
            let outputs_per_tile = gpu
                .base
                .gemv_default(&gpu.ctx, rows, &fused)
                .rows_per_workgroup;
            oft_prologue_fits(rows, k, prologue.block_size)
                && (self.fusion == Fusion::Always
                    || oft_prologue_pays(
                        self.base.out_features().div_ceil(outputs_per_tile as usize),
                        rows,
                        k,
                        prologue.block_size,
                        prologue.stored_blocks == 1,
                    ))
        });
        let block = oft.map(|o| o.block_size);
        let fits = |fuse_oft: bool, fuse_lora: bool| {
            gpu.base.can_fuse(
                &gpu.ctx,
                path,
                block.filter(|_| fuse_oft),
                fuse_lora.then_some(EpilogueKind::Single),
            )
        };
        [(true, true), (false, true), (true, false)]
            .into_iter()
            .find(|&(o, l)| (!o || oft_wanted) && (!l || lora) && fits(o, l))
            .unwrap_or((false, false))
    }

    /// One adapter name per row of `x` (`__base__` = the base alone; names this layer does not
    /// hold also get the base alone, as in PEFT). Refused while adapters are merged.
    pub fn forward_mixed(&self, x: &Matrix, names: &[&str]) -> Result<Matrix> {
        self.check_mixed(x.rows, names)?;
        match &self.gpu {
            None => {
                let mut y = Matrix::zeros(x.rows, self.base.out_features());
                for (row, name) in names.iter().enumerate() {
                    let xr = Matrix::new(1, x.cols, x.row(row).to_vec())?;
                    let adapters: Vec<&Adapter> = self.adapter(name).into_iter().collect();
                    y.row_mut(row)
                        .copy_from_slice(self.forward_cpu(&xr, &adapters)?.row(0));
                }
                Ok(y)
            }
            Some(gpu) => {
                let xg = GpuTensor::upload(&gpu.ctx, x, ActDtype::F32)?;
                self.forward_mixed_gpu(&xg, names)?.download(&gpu.ctx)
            }
        }
    }

    /// [`Self::forward_mixed`] on GPU tensors, into a new tensor (submitted, not waited for).
    pub fn forward_mixed_gpu(&self, x: &GpuTensor, names: &[&str]) -> Result<GpuTensor> {
        let gpu = self.gpu_state()?;
        let y = GpuTensor::output(&gpu.ctx, x.rows, self.base.out_features(), x.dtype)?;
        let plan = self.build_mixed_plan(gpu, x, &self.row_slots(x, names)?, &y)?;
        Dispatch::submit_all(&gpu.ctx, &plan.dispatches.iter().collect::<Vec<_>>())?;
        Ok(y)
    }

    /// [`Self::encode_forward`] for a mixed batch: one adapter name per row of `x`.
    pub fn encode_forward_mixed(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        names: &[&str],
        y: &GpuTensor,
    ) -> Result<()> {
        self.prepare_forward_mixed(x, names, y)?.encode(encoder);
        Ok(())
    }

    /// [`Self::encode_forward_mixed`] into a compute pass the caller has begun.
    pub fn record_forward_mixed(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        x: &GpuTensor,
        names: &[&str],
        y: &GpuTensor,
    ) -> Result<()> {
        self.prepare_forward_mixed(x, names, y)?.record(pass);
        Ok(())
    }

    /// The plan of a mixed batch (see [`Self::prepare_forward`]), one launch per kernel for
    /// the whole batch: rotate (per-row OFT), shrink (per-row LoRA / DoRA), the base matmul
    /// with the per-row expand as its epilogue (or, with `Fusion::Off` or past the device's
    /// binding limit, as a launch of its own).
    pub fn prepare_forward_mixed(
        &self,
        x: &GpuTensor,
        names: &[&str],
        y: &GpuTensor,
    ) -> Result<Arc<ForwardPlan>> {
        let gpu = self.gpu_state()?;
        check_distinct_buffers(x, y)?;
        let slots = self.row_slots(x, names)?;
        self.cached_plan(gpu, PlanKey::new(x, y, Some(slots.clone())), || {
            self.build_mixed_plan(gpu, x, &slots, y)
        })
    }

    /// Fails unless a mixed batch of `rows` rows may run with these names.
    fn check_mixed(&self, rows: usize, names: &[&str]) -> Result<()> {
        if names.len() != rows {
            return Err(Error::shape(
                "adapter names",
                format!("{rows} names, one per row"),
                &[names.len()],
            ));
        }
        if !self.merged.is_empty() {
            return Err(Error::Unsupported(
                "mixed batches while adapters are merged: unmerge first".into(),
            ));
        }
        Ok(())
    }

    /// Each row's adapter slot (its index in `self.adapters`, or `mixed::NONE`).
    fn row_slots(&self, x: &GpuTensor, names: &[&str]) -> Result<Vec<u32>> {
        self.check_mixed(x.rows, names)?;
        Ok(names
            .iter()
            .map(|n| {
                self.adapters
                    .iter()
                    .position(|a| a.name() == *n)
                    .map_or(mixed::NONE, |i| i as u32)
            })
            .collect())
    }

    fn build_mixed_plan(
        &self,
        gpu: &GpuState,
        x: &GpuTensor,
        slots: &[u32],
        y: &GpuTensor,
    ) -> Result<ForwardPlan> {
        let ctx = &gpu.ctx;
        let mixed = self.mixed_adapters(gpu)?;
        let row_slots = mixed.row_slots(ctx, slots)?;
        // Launches only for the adapter kinds some row asks for.
        let rows_use = |oft: bool| {
            slots.iter().any(|&slot| {
                self.adapters
                    .get(slot as usize)
                    .is_some_and(|a| matches!(a, Adapter::Oft(_)) == oft)
            })
        };
        let mut steps = Vec::new();
        let mut rotated = x.clone();
        if rows_use(true) {
            rotated = GpuTensor::output(ctx, x.rows, x.cols, x.dtype)?;
            steps.push(mixed.prepare_rotate(ctx, &row_slots, x, &rotated)?);
        }
        let path = MatmulPath::for_rows(x.rows);
        let fuse_lora = self.fusion != Fusion::Off
            && gpu
                .base
                .can_fuse(ctx, path, None, Some(EpilogueKind::PerRow));
        if !rows_use(false) {
            steps.push(gpu.base.prepare(ctx, &rotated, y, path)?);
        } else if fuse_lora {
            let (shrink, h) = mixed.prepare_shrink(ctx, &row_slots, x)?;
            steps.push(shrink);
            let fused = Fused {
                oft: None,
                lora: Some(mixed.epilogue(&row_slots, &h)),
            };
            steps.push(gpu.base.prepare_fused(ctx, &rotated, y, path, &fused)?);
        } else {
            steps.push(gpu.base.prepare(ctx, &rotated, y, path)?);
            let bias = Some(gpu.base.bias_buffer());
            steps.extend(mixed.prepare_lora(ctx, &row_slots, x, y, bias)?);
        }
        Ok(ForwardPlan { dispatches: steps })
    }

    fn mixed_adapters(&self, gpu: &GpuState) -> Result<Arc<GpuMixedAdapters>> {
        let mut cached = gpu
            .mixed
            .lock()
            .map_err(|_| Error::Gpu("mixed-batch cache poisoned".into()))?;
        if let Some(m) = cached.as_ref() {
            return Ok(m.clone());
        }
        let mut oft_blocks = Vec::new();
        let mut dora_scales = Vec::new();
        for adapter in &self.adapters {
            match (adapter, gpu.adapters.get(adapter.name())) {
                (Adapter::Oft(_), Some(GpuAdapter::Oft(g))) => {
                    oft_blocks.push(g.download_blocks(&gpu.ctx)?)
                }
                (Adapter::Lora(lora), _) => {
                    dora_scales.push(dora_scale(lora, self.original_base())?)
                }
                _ => {
                    return Err(Error::Gpu(format!(
                        "adapter `{}` is missing on the GPU",
                        adapter.name()
                    )));
                }
            }
        }
        let (mut oft_iter, mut dora_iter) = (oft_blocks.iter(), dora_scales.iter());
        let mut slots = Vec::new();
        for adapter in &self.adapters {
            slots.push(match adapter {
                Adapter::Oft(oft) => MixedSlot::Oft {
                    blocks: oft_iter.next().map(Vec::as_slice).unwrap_or_default(),
                    block_size: oft.block_size(),
                },
                Adapter::Lora(lora) => MixedSlot::Lora {
                    a: lora.a(),
                    b: lora.b(),
                    scaling: lora.scaling(),
                    dora_scale: dora_iter.next().and_then(|d| d.as_deref()),
                },
            });
        }
        let built = Arc::new(GpuMixedAdapters::upload(
            &gpu.ctx,
            self.base.in_features(),
            self.base.out_features(),
            &slots,
        )?);
        *cached = Some(built.clone());
        Ok(built)
    }

    /// Merges the named adapters into an HQQ base, in order: dequantize, apply (`W·Rᵀ` for OFT,
    /// `+ s·B·A` for LoRA, DoRA's rescale), re-quantize with the layer's own configuration and
    /// the half-quadratic solver (all three on the GPU for a GPU layer). With `safe`, non-finite results are refused. On any error the
    /// layer is left as it was.
    pub fn merge(&mut self, names: &[&str], safe: bool) -> Result<()> {
        let QuantWeight::Hqq(_) = &self.base else {
            let kind = names
                .first()
                .and_then(|n| self.adapter(n))
                .map_or("adapter", |a| a.kind());
            return Err(Error::Merge(format!(
                "merging an {kind} adapter into a {} layer is not possible: the format is forward-only (no re-quantization)",
                self.base.format_name().to_uppercase()
            )));
        };
        let mut base = self.base.clone();
        let mut stack = Vec::new();
        for name in names {
            if self.merged.iter().any(|m| m.name == *name)
                || stack.iter().any(|m: &Merged| m.name == *name)
            {
                continue;
            }
            let adapter = self
                .adapter(name)
                .ok_or_else(|| adapter_error(name, "no such adapter"))?;
            let QuantWeight::Hqq(hqq) = &base else {
                return Err(Error::Merge("the base stopped being HQQ".into()));
            };
            let merged_weight = match &self.gpu {
                Some(gpu) => self.merged_weight_gpu(&gpu.ctx, &base, adapter)?,
                None => merged_dense_weight(&base, adapter, self.original_base())?,
            };
            if safe {
                check_finite("merged weight", &merged_weight.data)
                    .map_err(|e| adapter_error(name, format!("NaNs detected in the merged weights ({e}); the adapter seems to be broken")))?;
            }
            let config = hqq_config(hqq);
            let requantized = match &self.gpu {
                Some(gpu) => {
                    quantize_to_host(&gpu.ctx, &merged_weight, hqq.bias.as_deref(), &config)?
                }
                None => HqqWeight::quantize(&merged_weight, hqq.bias.clone(), &config)?,
            };
            stack.push(Merged {
                name: name.to_string(),
                previous: std::mem::replace(&mut base, QuantWeight::Hqq(requantized)),
            });
        }
        self.replace_base(base)?;
        self.merged.extend(stack);
        Ok(())
    }

    /// `base` with `adapter` applied, dequantized and merged on the GPU.
    fn merged_weight_gpu(
        &self,
        ctx: &GpuContext,
        base: &QuantWeight,
        adapter: &Adapter,
    ) -> Result<Matrix> {
        let gpu_base = GpuQuantWeight::upload(ctx, base)?;
        match adapter {
            Adapter::Oft(oft) => {
                let blocks = oft.blocks_flat();
                merge::merged_weight(
                    ctx,
                    &gpu_base,
                    &MergeDelta::Oft {
                        blocks: &blocks,
                        block_size: oft.block_size(),
                    },
                )
            }
            Adapter::Lora(lora) => {
                let dora = dora_scale(lora, self.original_base())?;
                let delta = MergeDelta::Lora {
                    a: lora.a(),
                    b: lora.b(),
                    scaling: lora.scaling(),
                    dora_scale: dora.as_deref(),
                };
                merge::merged_weight(ctx, &gpu_base, &delta)
            }
        }
    }

    /// Unmerges the most recently merged adapter (exactly: the weight kept aside is restored).
    pub fn unmerge(&mut self) -> Result<Option<String>> {
        let Some(last) = self.merged.last() else {
            return Ok(None);
        };
        self.replace_base(last.previous.clone())?;
        Ok(self.merged.pop().map(|m| m.name))
    }

    /// Unmerges every merged adapter, newest first, restoring the original base.
    pub fn unmerge_all(&mut self) -> Result<()> {
        while self.unmerge()?.is_some() {}
        Ok(())
    }

    fn replace_base(&mut self, base: QuantWeight) -> Result<()> {
        if let Some(gpu) = &mut self.gpu {
            gpu.base = GpuQuantWeight::upload(&gpu.ctx, &base)?;
        }
        self.base = base;
        self.invalidate_plans();
        Ok(())
    }
}

fn hqq_config(w: &HqqWeight) -> HqqConfig {
    let mut config = HqqConfig::new(w.nbits(), w.grouping.group_size, w.grouping.axis);
    config.compute_dtype = w.compute_dtype;
    config
}

/// The float weight of merging `adapter` into `base` (what a re-quantization approximates);
/// DoRA's norm comes from `original`, the base before any merge.
pub fn merged_dense_weight(
    base: &QuantWeight,
    adapter: &Adapter,
    original: &QuantWeight,
) -> Result<Matrix> {
    let mut weight = base.dequantize();
    match adapter {
        Adapter::Oft(oft) => {
            let b = oft.block_size();
            let blocks = oft.rotation_blocks();
            let mut out = Matrix::zeros(weight.rows, weight.cols);
            for n in 0..weight.rows {
                let (src, dst) = (weight.row(n), out.row_mut(n));
                for blk in 0..weight.cols / b {
                    let r = &blocks[blk.min(blocks.len() - 1)];
                    for c in 0..b {
                        let acc: f64 = (0..b)
                            .map(|k| src[blk * b + k] as f64 * r.at(c, k) as f64)
                            .sum();
                        dst[blk * b + c] = acc as f32;
                    }
                }
            }
            weight = out;
        }
        Adapter::Lora(lora) => {
            let delta = lora.delta_weight();
            let scale = dora_scale(lora, original)?.unwrap_or_else(|| vec![1.0; weight.rows]);
            for (n, g) in scale.iter().enumerate() {
                for (w, d) in weight.row_mut(n).iter_mut().zip(delta.row(n)) {
                    *w = (*w + d) * g;
                }
            }
        }
    }
    Ok(weight)
}

/// DoRA's per-output scale `magnitude / ‖W + s·B·A‖` from the unmerged base, or None for LoRA.
/// wgpu refuses a launch that binds one buffer both for reading and for writing, even at
/// disjoint ranges, so the input and the output of a forward must live in different buffers.
fn check_distinct_buffers(x: &GpuTensor, y: &GpuTensor) -> Result<()> {
    if x.buffer == y.buffer {
        return Err(Error::Unsupported(
            "x and y in one buffer: a launch cannot read and write one buffer; give y a buffer of its own".into(),
        ));
    }
    Ok(())
}

fn lock_plans(gpu: &GpuState) -> Result<MutexGuard<'_, HashMap<PlanKey, Arc<ForwardPlan>>>> {
    gpu.plans
        .lock()
        .map_err(|_| Error::Gpu("plan cache poisoned".into()))
}

fn dora_scale(lora: &LoraAdapter, base: &QuantWeight) -> Result<Option<Vec<f32>>> {
    if !lora.is_dora() {
        return Ok(None);
    }
    lora.dora_scale(&base.dequantize())
}

/// [`upload_adapter`] without blocking: only an OFT build waits (for its check's readback).
async fn upload_adapter_async(
    ctx: &GpuContext,
    adapter: &Adapter,
    base: &QuantWeight,
) -> Result<GpuAdapter> {
    match adapter {
        Adapter::Oft(oft) => Ok(GpuAdapter::Oft(
            GpuOft::build_async(
                ctx,
                oft.params(),
                oft.block_size(),
                oft.param_rows(),
                oft.in_features(),
                oft.parameterization(),
            )
            .await?,
        )),
        Adapter::Lora(_) => upload_adapter(ctx, adapter, base),
    }
}

fn upload_adapter(ctx: &GpuContext, adapter: &Adapter, base: &QuantWeight) -> Result<GpuAdapter> {
    Ok(match adapter {
        // COFT's projection is already in `params()`; the blocks are built on the GPU.
        Adapter::Oft(oft) => GpuAdapter::Oft(GpuOft::build(
            ctx,
            oft.params(),
            oft.block_size(),
            oft.param_rows(),
            oft.in_features(),
            oft.parameterization(),
        )?),
        Adapter::Lora(lora) => {
            let dora_scale = dora_scale(lora, base)?;
            GpuAdapter::Lora(GpuLora::upload(
                ctx,
                lora.a(),
                lora.b(),
                lora.scaling(),
                dora_scale.as_deref(),
            )?)
        }
    })
}
