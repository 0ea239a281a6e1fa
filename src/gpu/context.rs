//! Adapter choice (headless) or a host app's own device, capability detection, the pipeline cache.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Result};
use crate::gpu::shaders::ShaderKey;

/// Optional features the kernels use when the device offers them.
const WANTED_FEATURES: wgpu::Features = wgpu::Features::SHADER_F16
    .union(wgpu::Features::SUBGROUP)
    .union(wgpu::Features::TIMESTAMP_QUERY)
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS);

/// A wgpu device and queue with what quantadapt knows about them. Cheap to clone.
#[derive(Clone)]
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pipelines: Arc<Mutex<HashMap<ShaderKey, wgpu::ComputePipeline>>>,
    /// Why the device was lost, set once by wgpu's device-lost callback.
    lost: Arc<OnceLock<String>>,
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
    /// `WGPU_BACKEND` narrow the choice.
    pub fn new() -> Result<Self> {
        pollster::block_on(Self::new_async())
    }

    pub async fn new_async() -> Result<Self> {
        Self::with_limits_async(None).await
    }

    /// [`Self::new`] asking the device for `limits` instead of everything the adapter offers
    /// (to run as a device with smaller limits would, e.g. a smaller storage-binding size).
    pub fn with_limits(limits: wgpu::Limits) -> Result<Self> {
        pollster::block_on(Self::with_limits_async(Some(limits)))
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
        Ok(Self::from_device(device, queue, adapter.get_info()))
    }

    /// Uses a device and queue the host application already owns. The kernels adapt to the
    /// features and limits the device was created with. This sets the device's lost callback
    /// (wgpu keeps one), through which [`Self::is_lost`] learns of a loss.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue, info: wgpu::AdapterInfo) -> Self {
        let lost = Arc::new(OnceLock::new());
        let flag = Arc::clone(&lost);
        device.set_device_lost_callback(move |reason, message| {
            let _ = flag.set(match message.is_empty() {
                true => format!("{reason:?}"),
                false => format!("{reason:?}: {message}"),
            });
        });
        Self {
            device,
            queue,
            info,
            pipelines: Arc::new(Mutex::new(HashMap::new())),
            lost,
        }
    }

    /// Whether the device is lost (destroyed, reset or removed): nothing runs on it any more,
    /// and every call that needs it fails with [`Error::DeviceLost`].
    pub fn is_lost(&self) -> bool {
        self.check_alive().is_err()
    }

    /// Fails with [`Error::DeviceLost`] once the device is lost. wgpu reports a loss through
    /// its callback only while polling, so this polls without blocking first.
    pub fn check_alive(&self) -> Result<()> {
        if self.lost.get().is_none() {
            self.poll(wgpu::PollType::Poll)?;
        }
        self.lost_error()
    }

    fn lost_error(&self) -> Result<()> {
        match self.lost.get() {
            None => Ok(()),
            Some(reason) => Err(Error::DeviceLost(format!(
                "{} ({reason}); create a new context",
                self.info.name
            ))),
        }
    }

    /// Polls the device, then reports a loss the poll revealed.
    fn poll(&self, poll_type: wgpu::PollType) -> Result<()> {
        // wgpu panics when the driver fails a wait for any reason but a timeout, which is how a
        // device lost in flight shows; that panic means the device is gone.
        match catch_unwind(AssertUnwindSafe(|| self.device.poll(poll_type))) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(Error::Gpu(format!("device poll: {e}"))),
            Err(_) => {
                let _ = self
                    .lost
                    .set("the driver failed while waiting for the GPU".into());
            }
        }
        self.lost_error()
    }

    pub fn features(&self) -> wgpu::Features {
        self.device.features()
    }

    pub fn limits(&self) -> wgpu::Limits {
        self.device.limits()
    }

    pub fn has_f16(&self) -> bool {
        self.features().contains(wgpu::Features::SHADER_F16)
    }

    pub fn has_subgroups(&self) -> bool {
        self.features().contains(wgpu::Features::SUBGROUP)
    }

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
    /// [`Error::Gpu`] rather than through wgpu's uncaptured-error handler.
    pub fn pipeline(&self, key: &ShaderKey) -> Result<wgpu::ComputePipeline> {
        let mut cache = self
            .pipelines
            .lock()
            .map_err(|_| Error::Gpu("pipeline cache poisoned".into()))?;
        if let Some(p) = cache.get(key) {
            return Ok(p.clone());
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
        let source = key.source()?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(key.family),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(key.family),
                layout: None,
                module: &module,
                entry_point: Some(key.entry),
                compilation_options: Default::default(),
                cache: None,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu(format!("pipeline {}: {e}", key.family)));
        }
        // A pipeline made while the device was being lost is invalid without an error.
        self.check_alive()?;
        cache.insert(key.clone(), pipeline.clone());
        Ok(pipeline)
    }

    /// Runs `record` in one command buffer, submits it and waits. Validation and out-of-memory
    /// errors raised meanwhile come back as values, and so does a lost device (reported first,
    /// since it explains any other error).
    pub fn submit(&self, record: impl FnOnce(&mut wgpu::CommandEncoder)) -> Result<()> {
        self.check_alive()?;
        let ((), validation, oom) = self.capture(|| {
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            record(&mut encoder);
            self.queue.submit([encoder.finish()]);
        });
        self.wait()?;
        if let Some(e) = validation {
            return Err(Error::Gpu(e.to_string()));
        }
        if let Some(e) = oom {
            return Err(Error::OutOfMemory(e.to_string()));
        }
        Ok(())
    }

    /// Runs `f` with its validation and out-of-memory errors captured (in that order) rather
    /// than sent to wgpu's uncaptured-error handler, which panics by default.
    pub(crate) fn capture<T>(
        &self,
        f: impl FnOnce() -> T,
    ) -> (T, Option<wgpu::Error>, Option<wgpu::Error>) {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f();
        let validation = pollster::block_on(validation.pop());
        (value, validation, pollster::block_on(oom.pop()))
    }

    /// Blocks until the queue is idle; fails if the device is lost meanwhile.
    pub fn wait(&self) -> Result<()> {
        self.poll(wgpu::PollType::wait_indefinitely())
    }
}
