//! An app that owns its wgpu device and buffers runs a quantadapt layer inside its own frame:
//! its kernel scales x, quantadapt's forward (a 4-bit HQQ layer with an OFT and a LoRA adapter)
//! reads x and writes y, its second kernel adds one to y, all in one encoder and one submission,
//! on views of the app's buffers at aligned offsets. The result is checked against the CPU.
//!
//! `cargo run --example embed`

use quantadapt::adapters::Adapter;
use quantadapt::adapters::lora::LoraAdapter;
use quantadapt::adapters::oft::{OftAdapter, Parameterization};
use quantadapt::formats::QuantWeight;
use quantadapt::formats::hqq::{HqqConfig, HqqWeight};
use quantadapt::gpu::{ActDtype, GpuContext, GpuTensor};
use quantadapt::layer::{Backend, QuantLinear};
use quantadapt::tensor::max_rel_error;
use quantadapt::{Matrix, Result};
use wgpu::util::DeviceExt;

const IN: usize = 1024;
const OUT: usize = 512;
const ROWS: usize = 4;

/// A deterministic stand-in for real weights and inputs.
fn matrix(rows: usize, cols: usize, scale: f32, seed: f32) -> Result<Matrix> {
    let data = (0..rows * cols)
        .map(|i| scale * ((i as f32 * 0.618 + seed) * 12.9898).sin())
        .collect();
    Matrix::new(rows, cols, data)
}

/// The app's own kernel: `data[i] = data[i] * scale + shift`.
const HOST_KERNEL: &str = "
struct P { scale: f32, shift: f32, count: u32, pad: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> data: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if id.x < p.count { data[id.x] = data[id.x] * p.scale + p.shift; }
}";

fn host_pass(
    device: &wgpu::Device,
    pipeline: &wgpu::ComputePipeline,
    encoder: &mut wgpu::CommandEncoder,
    tensor: &GpuTensor,
    scale: f32,
    shift: f32,
) {
    let count = tensor.numel() as u32;
    let params = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("host params"),
        contents: bytemuck::cast_slice(&[scale.to_bits(), shift.to_bits(), count, 0]),
        usage: wgpu::BufferUsages::UNIFORM,
    });
    let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("host bind group"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: params.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: tensor.binding(),
            },
        ],
    });
    let mut pass = encoder.begin_compute_pass(&Default::default());
    pass.set_pipeline(pipeline);
    pass.set_bind_group(0, &bind, &[]);
    pass.dispatch_workgroups(count.div_ceil(64), 1, 1);
}

fn main() -> Result<()> {
    // The app's device. Any device works; quantadapt adapts to its features and limits. Here
    // the library's adapter choice stands in for the app's own device creation.
    let app = GpuContext::new()?;
    let (device, queue) = (app.device.clone(), app.queue.clone());
    let ctx = GpuContext::from_device(device.clone(), queue.clone(), app.info.clone());
    // The app keeps its device-lost callback and tells quantadapt from it.
    let guest = ctx.clone();
    device.set_device_lost_callback(move |reason, message| {
        eprintln!("device lost: {reason:?} {message}");
        guest.mark_lost(&message);
    });

    let weight = matrix(OUT, IN, 0.05, 1.0)?;
    let base = QuantWeight::Hqq(HqqWeight::quantize(
        &weight,
        None,
        &HqqConfig::new(4, 64, 1),
    )?);
    let oft = OftAdapter::from_params(
        "oft",
        IN,
        matrix(IN / 32, 32 * 31 / 2, 0.01, 2.0)?,
        Parameterization::Cayley,
        None,
        false,
    )?;
    let (a, b) = (matrix(16, IN, 0.05, 3.0)?, matrix(OUT, 16, 0.05, 4.0)?);
    let lora = LoraAdapter::from_matrices("lora", IN, OUT, a, b, 2.0, None)?;
    let mut layer = QuantLinear::new(base.clone(), Backend::Gpu(Box::new(ctx.clone())))?;
    let mut reference = QuantLinear::new(base, Backend::Cpu)?;
    for l in [&mut layer, &mut reference] {
        l.add_adapter(Adapter::Oft(oft.clone()))?;
        l.add_adapter(Adapter::Lora(lora.clone()))?;
        l.set_active(&["oft", "lora"])?;
    }
    layer.prewarm(&[ROWS], ActDtype::F32)?;

    // The app's activation buffers, x and y each after some data of the app's own, at offsets
    // the device accepts. (x and y need buffers of their own: wgpu refuses a launch that reads
    // and writes one buffer.)
    let offset = 4 * ctx.limits().min_storage_buffer_offset_alignment as u64;
    let app_buffer = |label, elements: usize| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: offset + (elements * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    };
    let (x_buffer, y_buffer) = (
        app_buffer("app x", ROWS * IN),
        app_buffer("app y", ROWS * OUT),
    );
    let x = matrix(ROWS, IN, 1.0, 5.0)?;
    queue.write_buffer(&x_buffer, offset, bytemuck::cast_slice(&x.data));
    let xv = GpuTensor::view(&ctx, &x_buffer, offset, ROWS, IN, ActDtype::F32)?;
    let yv = GpuTensor::view(&ctx, &y_buffer, offset, ROWS, OUT, ActDtype::F32)?;

    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("host kernel"),
        source: wgpu::ShaderSource::Wgsl(HOST_KERNEL.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("host kernel"),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });

    let mut encoder = device.create_command_encoder(&Default::default());
    host_pass(&device, &pipeline, &mut encoder, &xv, 0.5, 0.0);
    layer.encode_forward(&mut encoder, &xv, &yv)?;
    host_pass(&device, &pipeline, &mut encoder, &yv, 1.0, 1.0);
    queue.submit([encoder.finish()]);

    let got = yv.download(&ctx)?;
    let half_x = Matrix::new(ROWS, IN, x.data.iter().map(|v| v * 0.5).collect())?;
    let mut expected = reference.forward(&half_x)?;
    expected.data.iter_mut().for_each(|v| *v += 1.0);
    let err = max_rel_error(&got.data, &expected.data);
    println!(
        "{}: host kernel -> quantadapt forward ({ROWS}x{IN} -> {OUT}, HQQ 4-bit + OFT + LoRA) -> host kernel, one submission",
        ctx.describe()
    );
    println!("y[0][..4] = {:?}", &got.data[..4]);
    println!("max relative error against the CPU reference: {err:.2e}");
    if err > 1e-4 {
        return Err(quantadapt::Error::Gpu(format!(
            "the recorded forward disagrees with the CPU: {err}"
        )));
    }
    Ok(())
}
