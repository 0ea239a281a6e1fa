//! Device limits, allocation failures and device loss come back as errors, never as panics or
//! hangs: a refused tensor leaves the context usable, and a destroyed device makes every later
//! call fail with `Error::DeviceLost`. Each test owns its device, since one destroys it.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use quantadapt::Error;
use quantadapt::formats::hqq::{HqqConfig, HqqWeight};
use quantadapt::formats::split::plan_row_splits;
use quantadapt::formats::{QuantFormat, QuantWeight};
use quantadapt::gpu::buffers::create_buffer;
use quantadapt::gpu::{ActDtype, GpuContext, GpuTensor};
use quantadapt::layer::{Backend, QuantLinear};
use quantadapt::tensor::{Matrix, max_rel_error};

use common::random_matrix;

const TOLERANCE: f64 = 1e-4;

/// A device of the best adapter with its storage binding limit lowered to `binding_limit` bytes.
fn small_device(binding_limit: u64) -> GpuContext {
    let mut limits = common::gpu().limits();
    limits.max_storage_buffer_binding_size = binding_limit;
    GpuContext::with_limits(limits).expect("a device with lower limits")
}

fn hqq_weight(out: usize, inp: usize, nbits: u32) -> QuantWeight {
    let mut config = HqqConfig::new(nbits, 64, 1);
    config.optimize = false;
    let w = random_matrix(out, inp, 1.0);
    let bias = random_matrix(1, out, 1.0).data;
    QuantWeight::Hqq(HqqWeight::quantize(&w, Some(bias), &config).unwrap())
}

fn gpu_layer(ctx: &GpuContext, w: QuantWeight) -> quantadapt::Result<QuantLinear> {
    QuantLinear::new(w, Backend::Gpu(Box::new(ctx.clone())))
}

fn assert_matches_cpu(layer: &QuantLinear, x: &Matrix) {
    let got = layer.forward(x).unwrap();
    let expected = layer.base().forward_cpu(x).unwrap();
    let err = max_rel_error(&got.data, &expected.data);
    assert!(err < TOLERANCE, "GPU vs CPU: {err}");
}

/// Runs `f` on another thread and fails if it takes longer than a minute (a hang).
fn within_a_minute<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the call neither returned nor failed within a minute")
}

#[test]
fn a_weight_over_the_binding_limit_runs_in_row_slices() {
    let limit = 64 * 1024;
    let ctx = small_device(limit);
    // 8-bit codes of 128 x 1024: 128 KiB of W_q, twice the limit.
    let big = hqq_weight(128, 1024, 8);
    assert!(plan_row_splits(&big, limit as usize).unwrap().len() >= 2);
    let layer = gpu_layer(&ctx, big).unwrap();
    assert_matches_cpu(&layer, &random_matrix(3, 1024, 1.0));
    assert_matches_cpu(&layer, &random_matrix(12, 1024, 1.0));
}

#[test]
fn a_weight_whose_smallest_slice_is_over_the_limit_is_refused_and_the_context_stays_usable() {
    let limit = 512;
    let ctx = small_device(limit);
    // One row of 8-bit codes is 1 KiB: no row split fits.
    let big = hqq_weight(16, 1024, 8);
    let Err(err) = gpu_layer(&ctx, big.clone()) else {
        panic!("a weight over the binding limit was uploaded");
    };
    match &err {
        Error::Allocation { buffer, bytes, .. } => {
            assert!(buffer.contains("W_q"), "{err}");
            assert_eq!(*bytes, 1024);
        }
        other => panic!("expected an allocation error, got {other}"),
    }
    assert!(err.to_string().contains("binding limit"), "{err}");
    assert!(!ctx.is_lost());
    // A layer within the limit still runs on the same context.
    let small = gpu_layer(&ctx, hqq_weight(4, 64, 4)).unwrap();
    assert_matches_cpu(&small, &random_matrix(1, 64, 1.0));
}

#[test]
fn an_activation_over_the_binding_limit_is_refused_and_the_layer_stays_usable() {
    let ctx = small_device(64 * 1024);
    let layer = gpu_layer(&ctx, hqq_weight(64, 256, 4)).unwrap();
    let x = random_matrix(2, 256, 1.0);
    assert_matches_cpu(&layer, &x);
    // 80 rows of 256 f32 inputs: 80 KiB.
    let err = layer.forward(&random_matrix(80, 256, 1.0)).unwrap_err();
    assert!(
        matches!(&err, Error::Allocation { buffer, bytes, .. } if buffer == "activation" && *bytes == 80 * 1024),
        "{err}"
    );
    assert!(layer.is_usable());
    assert_matches_cpu(&layer, &x);
}

#[test]
fn a_buffer_over_max_buffer_size_is_an_error_naming_it() {
    let ctx = GpuContext::new().unwrap();
    let too_big = ctx.limits().max_buffer_size + 4;
    let err = create_buffer(
        &ctx,
        &wgpu::BufferDescriptor {
            label: Some("huge scratch"),
            size: too_big,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        },
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::Allocation { buffer, bytes, .. } if buffer == "huge scratch" && *bytes == too_big),
        "{err}"
    );
    let layer = gpu_layer(&ctx, hqq_weight(64, 256, 4)).unwrap();
    assert_matches_cpu(&layer, &random_matrix(2, 256, 1.0));
}

#[test]
fn after_the_device_is_destroyed_every_call_fails_saying_it_is_lost() {
    let ctx = GpuContext::new().unwrap();
    let layer = gpu_layer(&ctx, hqq_weight(64, 256, 4)).unwrap();
    let x = random_matrix(2, 256, 1.0);
    assert_matches_cpu(&layer, &x);
    let resident = GpuTensor::upload(&ctx, &x, ActDtype::F32).unwrap();
    assert!(layer.is_usable() && !ctx.is_lost());

    ctx.device.destroy();
    let (layer, ctx) = within_a_minute(move || {
        let err = layer.forward(&x).unwrap_err();
        assert!(matches!(err, Error::DeviceLost(_)), "{err}");
        assert!(err.to_string().contains("device lost"), "{err}");
        // On resident tensors, and again: the same error, not a panic.
        for _ in 0..2 {
            let err = layer.forward_gpu(&resident).unwrap_err();
            assert!(matches!(err, Error::DeviceLost(_)), "{err}");
        }
        let err = resident.download(&ctx).unwrap_err();
        assert!(matches!(err, Error::DeviceLost(_)), "{err}");
        (layer, ctx)
    });
    assert!(ctx.is_lost());
    assert!(!layer.is_usable());
    let Err(err) = gpu_layer(&ctx, hqq_weight(64, 256, 4)) else {
        panic!("a layer was uploaded to a lost device");
    };
    assert!(matches!(err, Error::DeviceLost(_)), "{err}");
    let err = ctx.wait().unwrap_err();
    assert!(matches!(err, Error::DeviceLost(_)), "{err}");
}

#[test]
fn a_cpu_layer_is_always_usable() {
    let layer = QuantLinear::new(hqq_weight(64, 256, 4), Backend::Cpu).unwrap();
    assert!(layer.is_usable());
}
