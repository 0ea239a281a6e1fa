//! Weights larger than the storage-binding limit run as row slices, one launch each, and give
//! the same results as one binding: through `upload_split` and through a device asked for a
//! small limit.

mod common;

use common::{gpu, random_matrix};
use quantadapt::adapters::Adapter;
use quantadapt::adapters::lora::LoraAdapter;
use quantadapt::adapters::oft::{OftAdapter, Parameterization};
use quantadapt::formats::QuantWeight;
use quantadapt::formats::eetq::EetqWeight;
use quantadapt::formats::gptq::{GptqConfig, GptqWeight, GptqZeros};
use quantadapt::formats::hqq::{HqqConfig, HqqWeight};
use quantadapt::gpu::{ActDtype, GpuContext, GpuTensor};
use quantadapt::kernels::quant::GpuQuantWeight;
use quantadapt::layer::{Backend, Fusion, QuantLinear};
use quantadapt::tensor::max_rel_error;

const IN: usize = 256;
const OUT: usize = 96;
/// Small enough that every weight below needs several slices.
const MAX_BINDING: usize = 8 << 10;

fn bases() -> Vec<(&'static str, QuantWeight)> {
    let w = || random_matrix(OUT, IN, 0.1);
    let bias = || Some(random_matrix(1, OUT, 0.2).data);
    let gptq_config = GptqConfig {
        bits: 4,
        group_size: Some(32),
        sym: false,
        desc_act: true,
        zeros: GptqZeros::V1,
    };
    let g_idx: Vec<u32> = (0..IN).map(|k| ((k * 7) % IN / 32) as u32).collect();
    let mut gptq = GptqWeight::quantize_rtn(&w(), gptq_config, Some(g_idx)).unwrap();
    gptq.bias = bias();
    let mut eetq = EetqWeight::quantize(&w()).unwrap();
    eetq.bias = bias();
    let hqq = |nbits, group, axis| {
        QuantWeight::Hqq(
            HqqWeight::quantize(&w(), bias(), &HqqConfig::new(nbits, group, axis)).unwrap(),
        )
    };
    vec![
        ("hqq4 axis 1", hqq(4, 64, 1)),
        ("hqq3 axis 1", hqq(3, 64, 1)),
        ("hqq8 axis 0", hqq(8, 32, 0)),
        ("gptq4 act-order", QuantWeight::Gptq(gptq)),
        ("eetq", QuantWeight::Eetq(eetq)),
    ]
}

#[test]
fn split_weights_give_the_results_of_one_binding() {
    let ctx = gpu();
    for (name, base) in bases() {
        let whole = GpuQuantWeight::upload(ctx, &base).unwrap();
        let split = GpuQuantWeight::upload_split(ctx, &base, MAX_BINDING).unwrap();
        assert_eq!(whole.slices(), 1, "{name}");
        assert!(split.slices() > 1, "{name}: {} slices", split.slices());
        let deq = split.dequantize(ctx).unwrap();
        assert_eq!(
            deq.data,
            whole.dequantize(ctx).unwrap().data,
            "{name}: dequant"
        );
        for rows in [1, 8, 19, 70] {
            let x = GpuTensor::upload(ctx, &random_matrix(rows, IN, 1.0), ActDtype::F32).unwrap();
            let a = whole.forward(ctx, &x).unwrap().download(ctx).unwrap();
            let b = split.forward(ctx, &x).unwrap().download(ctx).unwrap();
            assert!(
                b.data.iter().all(|v| v.is_finite()),
                "{name} rows={rows}: unwritten"
            );
            assert_eq!(a.data, b.data, "{name} rows={rows}");
        }
    }
}

#[test]
fn a_device_with_a_small_binding_limit_runs_adapted_layers_in_slices() {
    let mut limits = gpu().limits();
    // The 8-bit weight (24 KB) needs two slices; the OFT blocks, their build scratch and x (up to
    // 12 rows) fit.
    let limit = 20 << 10;
    limits.max_storage_buffer_binding_size = limit;
    let small = GpuContext::with_limits(limits).unwrap();
    small.set_debug_poison(true);
    assert_eq!(small.limits().max_storage_buffer_binding_size, limit);
    let (_, base) = bases().remove(2);
    assert!(GpuQuantWeight::upload(&small, &base).unwrap().slices() > 1);
    let adapters = [
        Adapter::Oft(
            OftAdapter::from_params(
                "o",
                IN,
                random_matrix(IN / 8, 8 * 7 / 2, 0.05),
                Parameterization::Cayley,
                None,
                false,
            )
            .unwrap(),
        ),
        Adapter::Lora(
            LoraAdapter::from_matrices(
                "l",
                IN,
                OUT,
                random_matrix(4, IN, 0.1),
                random_matrix(OUT, 4, 0.1),
                2.0,
                None,
            )
            .unwrap(),
        ),
    ];
    let mut cpu = QuantLinear::new(base.clone(), Backend::Cpu).unwrap();
    let mut layer = QuantLinear::new(base, Backend::Gpu(Box::new(small.clone()))).unwrap();
    for a in &adapters {
        cpu.add_adapter(a.clone()).unwrap();
        layer.add_adapter(a.clone()).unwrap();
    }
    cpu.set_active(&["o", "l"]).unwrap();
    layer.set_active(&["o", "l"]).unwrap();
    // The GPU re-quantizer binds the whole layer: the merge is refused and changes nothing.
    let x = random_matrix(1, IN, 1.0);
    let before = layer.forward(&x).unwrap();
    let err = layer.merge(&["l"], true).unwrap_err();
    assert!(matches!(err, quantadapt::Error::Allocation { .. }), "{err}");
    assert!(layer.merged_adapters().is_empty());
    assert_eq!(layer.forward(&x).unwrap().data, before.data);
    for fusion in [Fusion::Off, Fusion::Always] {
        layer.set_fusion(fusion);
        for rows in [1, 12] {
            let x = random_matrix(rows, IN, 1.0);
            let expected = cpu.forward(&x).unwrap();
            let got = layer.forward(&x).unwrap();
            let err = max_rel_error(&got.data, &expected.data);
            assert!(err <= 1e-4, "{fusion:?} rows={rows}: {err}");
        }
    }
}
