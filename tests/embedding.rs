//! quantadapt as a guest on a host app's device: forwards recorded into the host's encoder
//! between the host's own kernels, on views of the host's buffers at offsets; plans built once
//! (later forwards create nothing); blocking calls that wait only for themselves, with a
//! timeout; async calls; the host's device-lost callback left alone.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{gpu, random_matrix};
use quantadapt::Error;
use quantadapt::adapters::Adapter;
use quantadapt::adapters::lora::LoraAdapter;
use quantadapt::adapters::oft::{OftAdapter, Parameterization};
use quantadapt::formats::hqq::{HqqConfig, HqqWeight};
use quantadapt::formats::{QuantFormat, QuantWeight};
use quantadapt::gpu::{ActDtype, Allocations, GpuContext, GpuTensor};
use quantadapt::layer::{Backend, Fusion, QuantLinear};
use quantadapt::tensor::{Matrix, max_rel_error};

const IN: usize = 256;
const OUT: usize = 96;
const TOLERANCE: f64 = 1e-4;

fn hqq(out: usize, inp: usize) -> QuantWeight {
    let mut config = HqqConfig::new(4, 64, 1);
    config.optimize = false;
    let w = random_matrix(out, inp, 0.1);
    let bias = Some(random_matrix(1, out, 0.2).data);
    QuantWeight::Hqq(HqqWeight::quantize(&w, bias, &config).unwrap())
}

fn oft(inp: usize, b: usize) -> Adapter {
    let params = random_matrix(inp / b, b * (b - 1) / 2, 0.05);
    let oft = OftAdapter::from_params("oft", inp, params, Parameterization::Cayley, None, false);
    Adapter::Oft(oft.unwrap())
}

fn lora(name: &str, inp: usize, out: usize) -> Adapter {
    let (a, b) = (random_matrix(8, inp, 0.1), random_matrix(out, 8, 0.1));
    Adapter::Lora(LoraAdapter::from_matrices(name, inp, out, a, b, 1.5, None).unwrap())
}

/// A GPU layer and its CPU twin with the same OFT (blocks of `b`) and two LoRA adapters.
fn layers_with(ctx: &GpuContext, base: QuantWeight, b: usize) -> (QuantLinear, QuantLinear) {
    let (inp, out) = (base.in_features(), base.out_features());
    let adapters = [oft(inp, b), lora("lora", inp, out), lora("other", inp, out)];
    let mut gpu_layer =
        QuantLinear::new(base.clone(), Backend::Gpu(Box::new(ctx.clone()))).unwrap();
    let mut cpu_layer = QuantLinear::new(base, Backend::Cpu).unwrap();
    for layer in [&mut gpu_layer, &mut cpu_layer] {
        for adapter in &adapters {
            layer.add_adapter(adapter.clone()).unwrap();
        }
        layer.set_active(&["oft", "lora"]).unwrap();
    }
    (gpu_layer, cpu_layer)
}

fn layers(ctx: &GpuContext, base: QuantWeight) -> (QuantLinear, QuantLinear) {
    layers_with(ctx, base, 32)
}

/// A device that refuses storage offsets not a multiple of 256 bytes, as WebGPU's default does.
fn aligned_device() -> GpuContext {
    let mut limits = gpu().limits();
    limits.min_storage_buffer_offset_alignment = 256;
    let ctx = GpuContext::with_limits(limits).unwrap();
    ctx.set_debug_poison(true);
    ctx
}

/// The host's own kernel: `data[i] = data[i] * scale + shift` over a range of a buffer.
struct HostKernel {
    pipeline: wgpu::ComputePipeline,
}

impl HostKernel {
    fn new(device: &wgpu::Device) -> Self {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("host kernel"),
            source: wgpu::ShaderSource::Wgsl(
                "struct P { scale: f32, shift: f32, count: u32, pad: u32 }
                 @group(0) @binding(0) var<uniform> p: P;
                 @group(0) @binding(1) var<storage, read_write> data: array<f32>;
                 @compute @workgroup_size(64)
                 fn main(@builtin(global_invocation_id) id: vec3<u32>) {
                     if id.x < p.count { data[id.x] = data[id.x] * p.scale + p.shift; }
                 }"
                .into(),
            ),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("host kernel"),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        Self { pipeline }
    }

    fn encode(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        tensor: &GpuTensor,
        scale: f32,
        shift: f32,
    ) {
        use wgpu::util::DeviceExt;
        let count = tensor.numel() as u32;
        let params: [u32; 4] = [scale.to_bits(), shift.to_bits(), count, 0];
        let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(&params),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &self.pipeline.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: uniform.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: tensor.binding(),
                },
            ],
        });
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(count.div_ceil(64), 1, 1);
    }
}

/// A host buffer of `bytes` bytes past `offset`, holding `data` there.
fn host_buffer(
    ctx: &GpuContext,
    label: &str,
    offset: u64,
    bytes: usize,
    data: &[f32],
) -> wgpu::Buffer {
    let buffer = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: offset + bytes as u64 + 256,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    ctx.queue
        .write_buffer(&buffer, offset, bytemuck::cast_slice(data));
    buffer
}

fn scaled(m: &Matrix, scale: f32, shift: f32) -> Matrix {
    let data = m.data.iter().map(|v| v * scale + shift).collect();
    Matrix::new(m.rows, m.cols, data).unwrap()
}

#[test]
fn a_forward_recorded_between_host_kernels_in_one_submission_matches_the_cpu() {
    let ctx = &aligned_device();
    let (gpu_layer, cpu_layer) = layers(ctx, hqq(OUT, IN));
    let host = HostKernel::new(&ctx.device);
    for rows in [1, 5, 40] {
        let x = random_matrix(rows, IN, 1.0);
        let (x_offset, y_offset) = (256, 512);
        let x_buffer = host_buffer(ctx, "host x", x_offset, rows * IN * 4, &x.data);
        let y_buffer = host_buffer(ctx, "host y", y_offset, rows * OUT * 4, &[]);
        let xv = GpuTensor::view(ctx, &x_buffer, x_offset, rows, IN, ActDtype::F32).unwrap();
        let yv = GpuTensor::view(ctx, &y_buffer, y_offset, rows, OUT, ActDtype::F32).unwrap();
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        host.encode(&ctx.device, &mut encoder, &xv, 2.0, 0.0);
        gpu_layer.encode_forward(&mut encoder, &xv, &yv).unwrap();
        host.encode(&ctx.device, &mut encoder, &yv, 1.0, 1.0);
        ctx.queue.submit([encoder.finish()]);

        let expected = scaled(&cpu_layer.forward(&scaled(&x, 2.0, 0.0)).unwrap(), 1.0, 1.0);
        let got = yv.download(ctx).unwrap();
        let err = max_rel_error(&got.data, &expected.data);
        assert!(err < TOLERANCE, "{rows} rows: {err}");
        // The bytes around the output are the host's and stay untouched.
        for offset in [0, y_offset + (rows * OUT * 4).next_multiple_of(256) as u64] {
            let around = GpuTensor::view(ctx, &y_buffer, offset, 1, 16, ActDtype::F32).unwrap();
            assert!(around.download(ctx).unwrap().data.iter().all(|v| *v == 0.0));
        }
    }
}

#[test]
fn a_view_at_an_offset_the_device_refuses_is_a_clear_error() {
    let ctx = &aligned_device();
    let x = random_matrix(2, IN, 1.0);
    let buffer = host_buffer(ctx, "host x", 0, 2 * IN * 4, &x.data);
    let err = GpuTensor::view(ctx, &buffer, 128, 1, IN, ActDtype::F32).unwrap_err();
    assert!(
        err.to_string()
            .contains("min_storage_buffer_offset_alignment (256 bytes)"),
        "{err}"
    );
    let err = GpuTensor::view(ctx, &buffer, 0, 1000, IN, ActDtype::F32).unwrap_err();
    assert!(err.to_string().contains("inside the buffer"), "{err}");
    // x and y in one buffer: wgpu forbids binding a buffer for reading and writing in one launch.
    let (layer, _) = layers(ctx, hqq(OUT, IN));
    let xv = GpuTensor::view(ctx, &buffer, 0, 1, IN, ActDtype::F32).unwrap();
    let yv = GpuTensor::view(ctx, &buffer, 1024, 1, OUT, ActDtype::F32).unwrap();
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    let err = layer.encode_forward(&mut encoder, &xv, &yv).unwrap_err();
    assert!(err.to_string().contains("one buffer"), "{err}");
}

/// Records one forward and returns what it created on the context.
fn created_by_one_forward(
    ctx: &GpuContext,
    record: impl Fn(&mut wgpu::CommandEncoder),
) -> Allocations {
    let before = ctx.allocations();
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    record(&mut encoder);
    ctx.queue.submit([encoder.finish()]);
    let after = ctx.allocations();
    Allocations {
        buffers: after.buffers - before.buffers,
        bind_groups: after.bind_groups - before.bind_groups,
        pipelines: after.pipelines - before.pipelines,
    }
}

/// Every path (GEMV, tiled, unfused, fused, and mixed batches if `mixed`) records a second
/// forward with nothing new.
fn assert_second_forwards_allocate_nothing(ctx: &GpuContext, layer: &mut QuantLinear, mixed: bool) {
    let (inp, out) = (layer.base().in_features(), layer.base().out_features());
    for rows in [3, 20] {
        let x = GpuTensor::upload(ctx, &random_matrix(rows, inp, 1.0), ActDtype::F32).unwrap();
        let y = GpuTensor::output(ctx, rows, out, ActDtype::F32).unwrap();
        for fusion in [Fusion::Off, Fusion::Always] {
            layer.set_fusion(fusion);
            let forward =
                |enc: &mut wgpu::CommandEncoder| layer.encode_forward(enc, &x, &y).unwrap();
            let first = created_by_one_forward(ctx, forward);
            assert!(first.bind_groups > 0, "the first forward builds its plan");
            let second = created_by_one_forward(ctx, forward);
            assert_eq!(second, Default::default(), "{rows} rows, {fusion:?}");
        }
        if !mixed {
            continue;
        }
        let names: Vec<&str> = ["oft", "lora", "__base__"]
            .into_iter()
            .cycle()
            .take(rows)
            .collect();
        let mixed = |enc: &mut wgpu::CommandEncoder| {
            layer.encode_forward_mixed(enc, &x, &names, &y).unwrap()
        };
        created_by_one_forward(ctx, mixed);
        assert_eq!(created_by_one_forward(ctx, mixed), Default::default());
    }
}

#[test]
fn after_warm_up_a_forward_creates_no_buffer_bind_group_or_pipeline() {
    let ctx = gpu();
    let (mut layer, _) = layers(ctx, hqq(OUT, IN));
    assert_second_forwards_allocate_nothing(ctx, &mut layer, true);
}

#[test]
fn a_row_split_weight_also_forwards_without_allocating_after_warm_up() {
    let mut limits = gpu().limits();
    limits.max_storage_buffer_binding_size = 24 * 1024;
    let ctx = GpuContext::with_limits(limits).unwrap();
    ctx.set_debug_poison(true);
    // 4-bit codes of 256 x 256: 32 KiB of W_q, over the 24 KiB limit; 20 rows of x fit, the
    // packed adapters of a mixed batch do not.
    let (mut layer, cpu) = layers_with(&ctx, hqq(256, 256), 8);
    assert_second_forwards_allocate_nothing(&ctx, &mut layer, false);
    layer.set_fusion(Fusion::Auto);
    for rows in [3, 20] {
        let x = random_matrix(rows, 256, 1.0);
        let got = layer.forward(&x).unwrap();
        let err = max_rel_error(&got.data, &cpu.forward(&x).unwrap().data);
        assert!(err < TOLERANCE, "{rows} rows: {err}");
    }
}

#[test]
fn changing_the_layer_state_rebuilds_the_plan() {
    let ctx = gpu();
    let (mut gpu_layer, mut cpu_layer) = layers(ctx, hqq(OUT, IN));
    let x = random_matrix(4, IN, 1.0);
    let xg = GpuTensor::upload(ctx, &x, ActDtype::F32).unwrap();
    let y = GpuTensor::output(ctx, 4, OUT, ActDtype::F32).unwrap();
    let run = |layer: &QuantLinear| {
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        layer.encode_forward(&mut encoder, &xg, &y).unwrap();
        ctx.queue.submit([encoder.finish()]);
        y.download(ctx).unwrap()
    };
    let states: [&[&str]; 3] = [&["oft", "lora"], &["other"], &[]];
    for active in states {
        gpu_layer.set_active(active).unwrap();
        cpu_layer.set_active(active).unwrap();
        let err = max_rel_error(&run(&gpu_layer).data, &cpu_layer.forward(&x).unwrap().data);
        assert!(err < TOLERANCE, "{active:?}: {err}");
    }
    gpu_layer.set_enabled(false).unwrap();
    let base = cpu_layer.base().forward_cpu(&x).unwrap();
    assert!(max_rel_error(&run(&gpu_layer).data, &base.data) < TOLERANCE);
}

#[test]
fn prewarm_compiles_what_the_first_forward_needs() {
    let ctx = gpu();
    let (layer, _) = layers(ctx, hqq(OUT, IN));
    layer.prewarm(&[2], ActDtype::F32).unwrap();
    let x = GpuTensor::upload(ctx, &random_matrix(2, IN, 1.0), ActDtype::F32).unwrap();
    let y = GpuTensor::output(ctx, 2, OUT, ActDtype::F32).unwrap();
    let first = created_by_one_forward(ctx, |enc| layer.encode_forward(enc, &x, &y).unwrap());
    assert_eq!(first.pipelines, 0);
}

#[test]
fn a_blocking_call_times_out_instead_of_hanging_and_the_layer_stays_usable() {
    // A context of its own: the timeout is shared by its clones.
    let ctx = GpuContext::new().unwrap();
    let (out, inp) = (2048, 4096);
    let base = hqq(out, inp);
    let layer = QuantLinear::new(base.clone(), Backend::Gpu(Box::new(ctx.clone()))).unwrap();
    let x = GpuTensor::upload(&ctx, &random_matrix(64, inp, 1.0), ActDtype::F32).unwrap();
    let y = GpuTensor::output(&ctx, 64, out, ActDtype::F32).unwrap();
    layer.prewarm(&[64], ActDtype::F32).unwrap();
    // Tens of seconds of work on lavapipe (fewer forwards can finish inside the submission
    // there), then a blocking download allowed 1 ns.
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    for _ in 0..24 {
        layer.encode_forward(&mut encoder, &x, &y).unwrap();
    }
    ctx.queue.submit([encoder.finish()]);
    ctx.set_timeout(Duration::from_nanos(1));
    let err = y.download(&ctx).unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
    ctx.set_timeout(Duration::from_secs(120));
    assert!(layer.is_usable());
    let small = random_matrix(2, inp, 1.0);
    let expected = base.forward_cpu(&small).unwrap();
    let err = max_rel_error(&layer.forward(&small).unwrap().data, &expected.data);
    assert!(err < TOLERANCE, "{err}");
}

#[test]
fn async_forward_and_download_complete_on_any_executor() {
    let ctx = gpu();
    let (gpu_layer, cpu_layer) = layers(ctx, hqq(OUT, IN));
    let x = random_matrix(3, IN, 1.0);
    let got = pollster::block_on(gpu_layer.forward_async(&x)).unwrap();
    let err = max_rel_error(&got.data, &cpu_layer.forward(&x).unwrap().data);
    assert!(err < TOLERANCE, "{err}");
    let xg = GpuTensor::upload(ctx, &x, ActDtype::F32).unwrap();
    let back = pollster::block_on(xg.download_async(ctx)).unwrap();
    assert_eq!(back.data, x.data);
}

/// Adapters added with the async API (an OFT build awaits its check) give what the blocking
/// `add_adapter` gives on the CPU.
#[test]
fn adapters_added_async_match_the_cpu() {
    let ctx = gpu();
    let base = hqq(OUT, IN);
    let mut gpu_layer =
        QuantLinear::new(base.clone(), Backend::Gpu(Box::new(ctx.clone()))).unwrap();
    let mut cpu_layer = QuantLinear::new(base, Backend::Cpu).unwrap();
    for adapter in [oft(IN, 32), lora("lora", IN, OUT)] {
        pollster::block_on(gpu_layer.add_adapter_async(adapter.clone())).unwrap();
        cpu_layer.add_adapter(adapter).unwrap();
    }
    let refused = pollster::block_on(gpu_layer.add_adapter_async(oft(IN, 16)));
    assert!(matches!(refused, Err(Error::Adapter { .. })), "{refused:?}");
    let x = random_matrix(3, IN, 1.0);
    for layer in [&mut gpu_layer, &mut cpu_layer] {
        layer.set_active(&["oft", "lora"]).unwrap();
    }
    let got = pollster::block_on(gpu_layer.forward_async(&x)).unwrap();
    let err = max_rel_error(&got.data, &cpu_layer.forward(&x).unwrap().data);
    assert!(err < TOLERANCE, "{err}");
}

#[test]
fn a_host_device_keeps_its_lost_callback_and_tells_the_context() {
    let own = GpuContext::new().unwrap();
    let (device, queue) = (own.device.clone(), own.queue.clone());
    let host_saw_loss = Arc::new(AtomicBool::new(false));
    let ctx = GpuContext::from_device(device.clone(), queue, own.info.clone());
    let (seen, guest) = (Arc::clone(&host_saw_loss), ctx.clone());
    device.set_device_lost_callback(move |_, message| {
        seen.store(true, Ordering::SeqCst);
        guest.mark_lost(&format!("host: {message}"));
    });
    let layer = QuantLinear::new(hqq(OUT, IN), Backend::Gpu(Box::new(ctx.clone()))).unwrap();
    layer.forward(&random_matrix(1, IN, 1.0)).unwrap();
    device.destroy();
    let err = layer.forward(&random_matrix(1, IN, 1.0)).unwrap_err();
    assert!(host_saw_loss.load(Ordering::SeqCst));
    assert!(matches!(err, Error::DeviceLost(_)), "{err}");
    assert!(err.to_string().contains("host:"), "{err}");
    assert!(!layer.is_usable());
}
