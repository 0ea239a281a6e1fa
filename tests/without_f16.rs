//! A device without SHADER_F16 (wgpu's GL backend, Chromium's SwiftShader, many phones) refuses
//! every f16 path with `Error::Unsupported` and still runs f32 right. The device is made from the
//! best adapter with no optional feature, so this runs on any driver.

mod common;

use quantadapt::Error;
use quantadapt::formats::hqq::{HqqConfig, HqqWeight};
use quantadapt::formats::{QuantFormat, QuantWeight};
use quantadapt::gpu::{ActDtype, GpuContext, GpuTensor};
use quantadapt::kernels::catalogue;
use quantadapt::kernels::quant::GpuQuantWeight;
use quantadapt::tensor::max_rel_error;

use common::random_matrix;

fn device_without_optional_features() -> GpuContext {
    pollster::block_on(async {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions::default())
            .await
            .expect("GPU tests need an adapter");
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                required_limits: adapter.limits(),
                ..Default::default()
            })
            .await
            .expect("a device without optional features");
        GpuContext::from_device(device, queue, adapter.get_info())
    })
}

fn assert_unsupported<T>(what: &str, result: quantadapt::Result<T>) {
    match result {
        Err(Error::Unsupported(message)) => assert!(message.contains("F16"), "{what}: {message}"),
        Err(e) => panic!("{what}: expected Error::Unsupported, got {e}"),
        Ok(_) => panic!("{what}: accepted without SHADER_F16"),
    }
}

#[test]
fn f16_is_refused_and_f32_runs() {
    let ctx = device_without_optional_features();
    assert!(!ctx.has_f16());

    let x = random_matrix(3, 256, 1.0);
    assert_unsupported("f16 upload", GpuTensor::upload(&ctx, &x, ActDtype::F16));
    let f16_keys: Vec<_> = catalogue().into_iter().filter(|k| k.needs_f16()).collect();
    assert!(!f16_keys.is_empty());
    for key in &f16_keys {
        assert_unsupported(&format!("{key:?}"), ctx.pipeline(key));
    }

    let config = HqqConfig::new(4, 64, 1);
    let weight = QuantWeight::Hqq(
        HqqWeight::quantize(&random_matrix(96, 256, 0.05), None, &config).unwrap(),
    );
    let layer = GpuQuantWeight::upload(&ctx, &weight).unwrap();
    let y = layer
        .forward(&ctx, &GpuTensor::upload(&ctx, &x, ActDtype::F32).unwrap())
        .unwrap()
        .download(&ctx)
        .unwrap();
    let err = max_rel_error(&y.data, &weight.forward_cpu(&x).unwrap().data);
    assert!(err < 1e-4, "f32 on a device without f16: error {err}");
}
