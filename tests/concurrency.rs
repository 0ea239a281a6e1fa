//! Layers and the GPU context are Send + Sync; concurrent forwards give the serial results.

mod common;

use common::{gpu, random_matrix};
use quantadapt::adapters::Adapter;
use quantadapt::adapters::lora::LoraAdapter;
use quantadapt::formats::QuantWeight;
use quantadapt::formats::hqq::{HqqConfig, HqqWeight};
use quantadapt::gpu::GpuContext;
use quantadapt::layer::{Backend, QuantLinear};

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn layers_and_context_are_send_and_sync() {
    assert_send_sync::<GpuContext>();
    assert_send_sync::<QuantLinear>();
}

#[test]
fn concurrent_forwards_match_serial_ones() {
    let base = HqqWeight::quantize(
        &random_matrix(64, 128, 0.1),
        None,
        &HqqConfig::new(4, 64, 1),
    )
    .unwrap();
    let mut layer = QuantLinear::new(
        QuantWeight::Hqq(base),
        Backend::Gpu(Box::new(gpu().clone())),
    )
    .unwrap();
    let lora = LoraAdapter::from_matrices(
        "l",
        128,
        64,
        random_matrix(4, 128, 0.1),
        random_matrix(64, 4, 0.1),
        1.0,
        None,
    )
    .unwrap();
    layer.add_adapter(Adapter::Lora(lora)).unwrap();
    layer.set_active(&["l"]).unwrap();
    let inputs: Vec<_> = (0..8).map(|i| random_matrix(1 + i % 3, 128, 1.0)).collect();
    let serial: Vec<_> = inputs.iter().map(|x| layer.forward(x).unwrap()).collect();
    let concurrent: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = inputs
            .iter()
            .map(|x| s.spawn(|| layer.forward(x).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(serial, concurrent);
}
