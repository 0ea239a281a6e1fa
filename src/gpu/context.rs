//! Adapter choice (headless) or a host app's own device, capability detection, the pipeline
//! cache, and the waits of the blocking conveniences.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::gpu::ready::ready_now;
use crate::gpu::shaders::ShaderKey;
use crate::kernels::gemv::GemvVariant;
use crate::tune::{DeviceKey, GemvKey, TuneCache};

/// Optional features the kernels use when the device offers them.
const WANTED_FEATURES: wgpu::Features = wgpu::Features::SHADER_F16
    .union(wgpu::Features::SUBGROUP)
    .union(wgpu::Features::TIMESTAMP_QUERY)
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS);

/// How long a blocking call waits for its own submission unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A wgpu device and queue with what quantadapt knows about them. Cheap to clone: clones share
/// the pipeline cache, the loss flag, the timeout and the allocation counts.
#[derive(Clone)]
pub struct GpuContext {
    /// The device every buffer, pipeline and bind group of this context is created on.
    pub device: wgpu::Device,
    /// The queue the blocking conveniences submit to.
    pub queue: wgpu::Queue,
    /// The adapter the device came from.
    pub info: wgpu::AdapterInfo,
    shared: Arc<Shared>,
}

struct Shared {
    pipelines: Mutex<HashMap<ShaderKey, wgpu::ComputePipeline>>,
    /// Why the device was lost, set once (by wgpu's callback on a device of our own, or by the
    /// host through [`GpuContext::mark_lost`]).
    lost: OnceLock<String>,
    timeout_nanos: AtomicU64,
    poison: AtomicBool,
    buffers_created: AtomicU64,
    bind_groups_created: AtomicU64,
    pipelines_created: AtomicU64,
    /// Tuned GEMV variants; read at each plan (see [`crate::tune`]).
    tuning: RwLock<Arc<TuneCache>>,
}

/// How many GPU objects a context has created so far (see [`GpuContext::allocations`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allocations {
    /// Buffers: weights, uniforms, scratch, outputs and readback staging.
    pub buffers: u64,
    /// Bind groups.
    pub bind_groups: u64,
    /// Compute pipelines compiled.
    pub pipelines: u64,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .finish()
    }
}

fn adapter_rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let device = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    let backend = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    };
    (device, backend)
}

impl GpuContext {
    /// Picks the best adapter without a surface: discrete before integrated before software,
    /// native APIs before GL. `QUANTADAPT_ADAPTER` (a substring of the adapter name) and wgpu's
    /// `WGPU_BACKEND` narrow the choice. Native only; on the web use [`Self::new_async`].
    pub fn new() -> Result<Self> {
        ready_now(Self::new_async(), "GpuContext::new")?
    }

    /// [`Self::new`] as a future, for any executor (and the web, where adapters arrive later).
    pub async fn new_async() -> Result<Self> {
        Self::with_limits_async(None).await
    }

    /// [`Self::new`] asking the device for `limits` instead of everything the adapter offers
    /// (to run as a device with smaller limits would, e.g. a smaller storage-binding size).
    pub fn with_limits(limits: wgpu::Limits) -> Result<Self> {
        ready_now(
            Self::with_limits_async(Some(limits)),
            "GpuContext::with_limits",
        )?
    }

    async fn with_limits_async(limits: Option<wgpu::Limits>) -> Result<Self> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let wanted_name = std::env::var("QUANTADAPT_ADAPTER").ok();
        let mut adapters: Vec<wgpu::Adapter> = instance
            .enumerate_adapters(wgpu::Backends::all())
            .await
            .into_iter()
            .filter(|a| {
                let info = a.get_info();
                let compute = a
                    .get_downlevel_capabilities()
                    .flags
                    .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS);
                let named = wanted_name
                    .as_ref()
                    .is_none_or(|n| info.name.to_lowercase().contains(&n.to_lowercase()));
                compute && named
            })
            .collect();
        adapters.sort_by_key(|a| adapter_rank(&a.get_info()));
        let adapter = adapters.into_iter().next().ok_or_else(|| {
            Error::NoGpu(match wanted_name {
                Some(n) => format!("no adapter with compute shaders matches QUANTADAPT_ADAPTER={n}"),
                None if cfg!(target_arch = "wasm32") => "the browser offers no WebGPU adapter (no navigator.gpu, or requestAdapter found none; Chromium on Linux needs --enable-unsafe-webgpu)".into(),
                None => "wgpu found no adapter with compute shaders (install a Vulkan, Metal or DX12 driver, e.g. Mesa's lavapipe)".into(),
            })
        })?;
        let features = adapter.features() & WANTED_FEATURES;
        let descriptor = wgpu::DeviceDescriptor {
            label: Some("quantadapt"),
            required_features: features,
            required_limits: limits.unwrap_or_else(|| adapter.limits()),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) = adapter
            .request_device(&descriptor)
            .await
            .map_err(|e| Error::Gpu(format!("request_device: {e}")))?;
        let ctx = Self::from_device(device, queue, adapter.get_info());
        // The device is ours, so its one lost callback is ours too.
        let shared = Arc::downgrade(&ctx.shared);
        ctx.device.set_device_lost_callback(move |reason, message| {
            if let Some(shared) = shared.upgrade() {
                let _ = shared.lost.set(loss_reason(reason, &message));
            }
        });
        Ok(ctx)
    }

    /// Uses a device and queue the host application already owns. The kernels adapt to the
    /// features and limits the device was created with.
    ///
    /// The host keeps its device-lost callback (wgpu keeps one per device): this context does
    /// not replace it. Call [`Self::mark_lost`] from it so that this context, and every layer on
    /// it, fails with [`Error::DeviceLost`] instead of using a dead device.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue, info: wgpu::AdapterInfo) -> Self {
        Self {
            device,
            queue,
            info,
            shared: Arc::new(Shared {
                pipelines: Mutex::new(HashMap::new()),
                lost: OnceLock::new(),
                tuning: RwLock::default(),
                timeout_nanos: AtomicU64::new(DEFAULT_TIMEOUT.as_nanos() as u64),
                poison: AtomicBool::new(false),
                buffers_created: AtomicU64::new(0),
                bind_groups_created: AtomicU64::new(0),
                pipelines_created: AtomicU64::new(0),
            }),
        }
    }

    /// Tells the context its device is lost (for a host device, from the host's own device-lost
    /// callback). The first reason given is kept.
    pub fn mark_lost(&self, reason: &str) {
        let _ = self.shared.lost.set(reason.to_string());
    }

    /// Whether the device is known to be lost: nothing runs on it any more, and every call that
    /// needs it fails with [`Error::DeviceLost`].
    pub fn is_lost(&self) -> bool {
        self.check_alive().is_err()
    }

    /// Fails with [`Error::DeviceLost`] once the device is known to be lost. wgpu reports the
    /// loss of a device of our own through its callback only while polling, so this polls
    /// without blocking first.
    pub fn check_alive(&self) -> Result<()> {
        if self.shared.lost.get().is_none() {
            self.poll(wgpu::PollType::Poll)?;
        }
        self.lost_error()
    }

    fn lost_error(&self) -> Result<()> {
        match self.shared.lost.get() {
            None => Ok(()),
            Some(reason) => Err(Error::DeviceLost(format!(
                "{} ({reason}); create a new context",
                self.info.name
            ))),
        }
    }

    /// Polls the device, then reports a loss the poll revealed.
    fn poll(&self, poll_type: wgpu::PollType) -> Result<()> {
        let timeout = match poll_type {
            wgpu::PollType::Wait { timeout, .. } => timeout,
            wgpu::PollType::Poll => None,
        };
        match self.device.poll(poll_type) {
            Ok(_) => {}
            Err(wgpu::PollError::Timeout) => {
                self.lost_error()?;
                return Err(Error::Timeout(timeout.unwrap_or_default()));
            }
            Err(e) => return Err(Error::Gpu(format!("device poll: {e}"))),
        }
        self.lost_error()
    }

    /// How long the blocking conveniences ([`Self::wait_for`], downloads, blocking forwards and
    /// merges) wait for their own submission before failing with [`Error::Timeout`]; shared by
    /// every clone of this context. [`DEFAULT_TIMEOUT`] unless set.
    pub fn timeout(&self) -> Duration {
        Duration::from_nanos(self.shared.timeout_nanos.load(Ordering::Relaxed))
    }

    /// Sets [`Self::timeout`] for this context and its clones.
    pub fn set_timeout(&self, timeout: Duration) {
        let nanos = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        self.shared.timeout_nanos.store(nanos, Ordering::Relaxed);
    }

    /// Whether buffers the library creates for outputs and scratch are filled with NaN first.
    pub fn debug_poison(&self) -> bool {
        self.shared.poison.load(Ordering::Relaxed)
    }

    /// Fills every output and scratch buffer the library creates from now on with NaN, so that
    /// elements a kernel fails to write show up in tests. Costs an upload per buffer: for tests.
    pub fn set_debug_poison(&self, on: bool) {
        self.shared.poison.store(on, Ordering::Relaxed);
    }

    /// How many buffers, bind groups and pipelines this context has created (a forward with a
    /// built plan creates none).
    pub fn allocations(&self) -> Allocations {
        Allocations {
            buffers: self.shared.buffers_created.load(Ordering::Relaxed),
            bind_groups: self.shared.bind_groups_created.load(Ordering::Relaxed),
            pipelines: self.shared.pipelines_created.load(Ordering::Relaxed),
        }
    }

    /// Makes `cache` the tuning this context's kernels consult when they plan a GEMV (layers'
    /// plans built before keep their variants until [`clear_plans`]). Starts empty: without an
    /// entry for this adapter the kernels take their heuristic defaults.
    ///
    /// [`clear_plans`]: crate::layer::QuantLinear::clear_plans
    pub fn set_tuning(&self, cache: TuneCache) {
        *self
            .shared
            .tuning
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(cache);
    }

    /// The tuning in force (see [`Self::set_tuning`]).
    pub fn tuning(&self) -> Arc<TuneCache> {
        self.shared
            .tuning
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The tuned variant of `gemv` on this adapter, if the tuning has one.
    pub fn tuned_gemv(&self, gemv: &GemvKey) -> Option<GemvVariant> {
        self.tuning().lookup(&DeviceKey::of(self), gemv)
    }

    pub(crate) fn count_buffer(&self) {
        self.shared.buffers_created.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_bind_group(&self) {
        self.shared
            .bind_groups_created
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The device's features.
    pub fn features(&self) -> wgpu::Features {
        self.device.features()
    }

    /// The device's limits.
    pub fn limits(&self) -> wgpu::Limits {
        self.device.limits()
    }

    /// Whether f16 activations (and f16 arithmetic in kernels) are available.
    pub fn has_f16(&self) -> bool {
        self.features().contains(wgpu::Features::SHADER_F16)
    }

    /// Whether subgroup operations are available.
    pub fn has_subgroups(&self) -> bool {
        self.features().contains(wgpu::Features::SUBGROUP)
    }

    /// Whether GPU timing with timestamp queries is available.
    pub fn has_timestamps(&self) -> bool {
        self.features().contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// Whether the adapter is a software rasterizer on the CPU (lavapipe, WARP, SwiftShader).
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// One line naming the adapter, its backend and the optional features in use.
    pub fn describe(&self) -> String {
        let mut features = Vec::new();
        for (flag, name) in [
            (self.has_f16(), "SHADER_F16"),
            (self.has_subgroups(), "SUBGROUP"),
            (self.has_timestamps(), "TIMESTAMP_QUERY"),
        ] {
            if flag {
                features.push(name);
            }
        }
        format!(
            "{} ({:?}, {:?}, driver {}) [{}]",
            self.info.name,
            self.info.backend,
            self.info.device_type,
            self.info.driver_info,
            features.join(", ")
        )
    }

    /// The compute pipeline for `key`, compiled once and cached. Shader errors come back as
    /// [`Error::Gpu`] rather than through wgpu's uncaptured-error handler. The cache's lock is
    /// not held while compiling, so a thread compiling a new pipeline stalls no other thread.
    pub fn pipeline(&self, key: &ShaderKey) -> Result<wgpu::ComputePipeline> {
        if let Some(p) = self.cached_pipeline(key)? {
            return Ok(p);
        }
        self.check_alive()?;
        for (needed, has, feature) in [
            (key.needs_f16(), self.has_f16(), "SHADER_F16"),
            (key.needs_subgroups(), self.has_subgroups(), "SUBGROUP"),
        ] {
            if needed && !has {
                return Err(Error::Unsupported(format!(
                    "{} ({}) needs {feature}, which {} ({:?}) lacks",
                    key.family, key.entry, self.info.name, self.info.backend
                )));
            }
        }
        let source = if self.info.backend == wgpu::Backend::BrowserWebGpu {
            key.webgpu_source()?
        } else {
            key.source()?
        };
        self.shared
            .pipelines_created
            .fetch_add(1, Ordering::Relaxed);
        let (pipeline, validation, _) = self.capture(|| {
            let module = self
                .device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(key.family),
                    source: wgpu::ShaderSource::Wgsl(source.into()),
                });
            self.device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(key.family),
                    layout: None,
                    module: &module,
                    entry_point: Some(key.entry),
                    compilation_options: Default::default(),
                    cache: None,
                })
        });
        if let Some(e) = validation {
            return Err(Error::wgpu(format!("pipeline {}", key.family), e));
        }
        // A pipeline made while the device was being lost is invalid without an error.
        self.check_alive()?;
        let mut cache = self.lock_pipelines()?;
        Ok(cache.entry(key.clone()).or_insert(pipeline).clone())
    }

    fn cached_pipeline(&self, key: &ShaderKey) -> Result<Option<wgpu::ComputePipeline>> {
        Ok(self.lock_pipelines()?.get(key).cloned())
    }

    fn lock_pipelines(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, HashMap<ShaderKey, wgpu::ComputePipeline>>> {
        self.shared
            .pipelines
            .lock()
            .map_err(|_| Error::Gpu("pipeline cache poisoned".into()))
    }

    /// Records `record` into one command buffer and submits it, without waiting. Validation
    /// and out-of-memory errors raised meanwhile come back as values, and so does a lost device
    /// (reported first, since it explains any other error).
    pub fn submit(
        &self,
        record: impl FnOnce(&mut wgpu::CommandEncoder),
    ) -> Result<wgpu::SubmissionIndex> {
        self.check_alive()?;
        let (index, validation, oom) = self.capture(|| {
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            record(&mut encoder);
            self.queue.submit([encoder.finish()])
        });
        if let Some(e) = validation {
            self.lost_error()?;
            return Err(Error::wgpu("submission", e));
        }
        if let Some(e) = oom {
            return Err(Error::OutOfMemory(e.to_string()));
        }
        Ok(index)
    }

    /// [`Self::submit`], then [`Self::wait_for`] that submission.
    pub fn run(&self, record: impl FnOnce(&mut wgpu::CommandEncoder)) -> Result<()> {
        let index = self.submit(record)?;
        self.wait_for(index)
    }

    /// Blocks until the submission `index` (and the ones before it on this queue) has finished,
    /// at most [`Self::timeout`]: then [`Error::Timeout`], and the work goes on. Work submitted
    /// after `index` by anyone is not waited for. Native only: on the web, await instead.
    pub fn wait_for(&self, index: wgpu::SubmissionIndex) -> Result<()> {
        self.poll(wgpu::PollType::Wait {
            submission_index: Some(index),
            timeout: Some(self.timeout()),
        })
    }

    /// Blocks until everything submitted to the device so far has finished, at most
    /// [`Self::timeout`]. Prefer [`Self::wait_for`], which waits only for one's own work.
    pub fn wait(&self) -> Result<()> {
        self.poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: Some(self.timeout()),
        })
    }

    /// Polls the device once without blocking, so that finished work's callbacks run (what a
    /// host's frame loop does; the futures of this crate do it themselves when polled).
    pub fn poll_once(&self) -> Result<()> {
        self.poll(wgpu::PollType::Poll)
    }

    /// Runs `f` with its validation and out-of-memory errors captured (in that order) rather
    /// than sent to wgpu's uncaptured-error handler, which panics by default. Native backends
    /// report them at once; where a backend reports them later (the web), they are not captured
    /// here and reach the device's handler.
    pub(crate) fn capture<T>(
        &self,
        f: impl FnOnce() -> T,
    ) -> (T, Option<wgpu::Error>, Option<wgpu::Error>) {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f();
        let validation = ready_now(validation.pop(), "").ok().flatten();
        let oom = ready_now(oom.pop(), "").ok().flatten();
        (value, validation, oom)
    }
}

fn loss_reason(reason: wgpu::DeviceLostReason, message: &str) -> String {
    match message.is_empty() {
        true => format!("{reason:?}"),
        false => format!("{reason:?}: {message}"),
    }
}
