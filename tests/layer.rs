//! QuantLinear: adapter management, mixed batches, merge / unmerge, and refusals that leave the
//! layer as it was; on the CPU and the GPU.

mod common;

use common::{gpu, random_matrix};
use quantadapt::adapters::Adapter;
use quantadapt::adapters::lora::LoraAdapter;
use quantadapt::adapters::oft::{OftAdapter, Parameterization};
use quantadapt::formats::eetq::EetqWeight;
use quantadapt::formats::hqq::{HqqConfig, HqqWeight};
use quantadapt::formats::{QuantFormat, QuantWeight};
use quantadapt::layer::{Backend, QuantLinear};
use quantadapt::tensor::{Matrix, max_rel_error, rel_frobenius_error};

const IN: usize = 128;
const OUT: usize = 64;

fn hqq_base() -> QuantWeight {
    QuantWeight::Hqq(
        HqqWeight::quantize(
            &random_matrix(OUT, IN, 0.1),
            Some(random_matrix(1, OUT, 0.2).data),
            &HqqConfig::new(8, 64, 1),
        )
        .unwrap(),
    )
}

fn oft(name: &str, parameterization: Parameterization) -> Adapter {
    let b = 16;
    Adapter::Oft(
        OftAdapter::from_params(
            name,
            IN,
            random_matrix(IN / b, b * (b - 1) / 2, 0.02),
            parameterization,
            None,
            false,
        )
        .unwrap(),
    )
}

fn lora(name: &str, dora: bool) -> Adapter {
    let magnitude = dora.then(|| {
        random_matrix(1, OUT, 1.0)
            .data
            .iter()
            .map(|v| v.abs() + 0.5)
            .collect()
    });
    Adapter::Lora(
        LoraAdapter::from_matrices(
            name,
            IN,
            OUT,
            random_matrix(8, IN, 0.1),
            random_matrix(OUT, 8, 0.1),
            2.0,
            magnitude,
        )
        .unwrap(),
    )
}

fn layers() -> Vec<(&'static str, QuantLinear)> {
    let base = hqq_base();
    vec![
        ("cpu", QuantLinear::new(base.clone(), Backend::Cpu).unwrap()),
        (
            "gpu",
            QuantLinear::new(base, Backend::Gpu(Box::new(gpu().clone()))).unwrap(),
        ),
    ]
}

fn with_adapters(layer: &mut QuantLinear) {
    layer
        .add_adapter(oft("rot", Parameterization::Cayley))
        .unwrap();
    layer
        .add_adapter(oft("neu", Parameterization::Neumann { terms: 5 }))
        .unwrap();
    layer.add_adapter(lora("lo", false)).unwrap();
    layer.add_adapter(lora("do", true)).unwrap();
}

#[test]
fn mixed_batches_match_per_row_forwards_for_oft_lora_and_dora() {
    for (backend, mut layer) in layers() {
        with_adapters(&mut layer);
        let names = ["rot", "do", "__base__", "lo", "neu", "do", "rot", "unknown"];
        let x = random_matrix(names.len(), IN, 1.0);
        let y = layer.forward_mixed(&x, &names).unwrap();
        for (row, name) in names.iter().enumerate() {
            let active: Vec<&str> = if layer.adapter(name).is_some() {
                vec![name]
            } else {
                vec![]
            };
            layer.set_active(&active).unwrap();
            let xr = Matrix::new(1, IN, x.row(row).to_vec()).unwrap();
            let expected = layer.forward(&xr).unwrap();
            let err = max_rel_error(y.row(row), &expected.data);
            assert!(err < 1e-5, "{backend} row {row} ({name}): {err}");
        }
    }
}

#[test]
fn merge_then_unmerge_restores_the_layer_exactly_in_reverse_order() {
    for (backend, mut layer) in layers() {
        with_adapters(&mut layer);
        layer.set_active(&["rot", "lo"]).unwrap();
        let x = random_matrix(3, IN, 1.0);
        let before = layer.forward(&x).unwrap();
        let packed_before = layer.base().dequantize();
        layer.merge(&["rot", "lo"], true).unwrap();
        assert_eq!(layer.merged_adapters(), vec!["rot", "lo"]);
        let merged = layer.forward(&x).unwrap();
        // Merging re-quantizes (8-bit here): close to the unmerged forward, not equal.
        let err = rel_frobenius_error(&merged.data, &before.data);
        assert!(err < 0.02, "{backend}: merged forward off by {err}");
        assert_eq!(layer.unmerge().unwrap().as_deref(), Some("lo"));
        assert_eq!(layer.unmerge().unwrap().as_deref(), Some("rot"));
        assert_eq!(layer.unmerge().unwrap(), None);
        assert_eq!(layer.base().dequantize(), packed_before, "{backend}");
        assert_eq!(layer.forward(&x).unwrap(), before, "{backend}");
    }
}

#[test]
fn a_failed_safe_merge_leaves_the_layer_as_it_was() {
    for (backend, mut layer) in layers() {
        let a = random_matrix(8, IN, 0.1);
        let mut b = random_matrix(OUT, 8, 0.1);
        b.data[5] = 1e38;
        let broken =
            LoraAdapter::from_matrices("broken", IN, OUT, a, b.clone(), 1e3, None).unwrap();
        layer.add_adapter(lora("fine", false)).unwrap();
        layer.add_adapter(Adapter::Lora(broken)).unwrap();
        let before = layer.base().dequantize();
        let err = layer
            .merge(&["fine", "broken"], true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("broken") && err.contains("NaN"),
            "{backend}: {err}"
        );
        assert!(layer.merged_adapters().is_empty(), "{backend}");
        assert_eq!(layer.base().dequantize(), before, "{backend}");
    }
}

#[test]
fn forward_only_formats_refuse_merges_naming_the_adapter_kind() {
    let base = QuantWeight::Eetq(EetqWeight::quantize(&random_matrix(OUT, IN, 0.1)).unwrap());
    let mut layer = QuantLinear::new(base, Backend::Cpu).unwrap();
    layer
        .add_adapter(oft("rot", Parameterization::Cayley))
        .unwrap();
    let err = layer.merge(&["rot"], false).unwrap_err().to_string();
    assert!(err.contains("OFT") && err.contains("EETQ"), "{err}");
}

#[test]
fn adapter_management_errors() {
    let mut layer = QuantLinear::new(hqq_base(), Backend::Cpu).unwrap();
    layer.add_adapter(lora("a", false)).unwrap();
    assert!(layer.add_adapter(lora("a", false)).is_err());
    assert!(layer.set_active(&["missing"]).is_err());
    let wrong = LoraAdapter::from_matrices(
        "w",
        IN + 1,
        OUT,
        random_matrix(4, IN + 1, 0.1),
        random_matrix(OUT, 4, 0.1),
        1.0,
        None,
    )
    .unwrap();
    assert!(layer.add_adapter(Adapter::Lora(wrong)).is_err());
    assert!(
        layer
            .forward_mixed(&random_matrix(2, IN, 1.0), &["a"])
            .is_err()
    );
    layer.set_active(&["a"]).unwrap();
    layer.merge(&["a"], true).unwrap();
    assert!(layer.remove_adapter("a").is_err());
    assert!(
        layer
            .forward_mixed(&random_matrix(1, IN, 1.0), &["a"])
            .is_err()
    );
    layer.set_enabled(false).unwrap();
    assert!(layer.merged_adapters().is_empty());
    let x = random_matrix(2, IN, 1.0);
    // A CPU layer runs the base's fast forward: disabled, it gives exactly that.
    assert_eq!(
        layer.forward(&x).unwrap(),
        layer.base().forward_fast(&x).unwrap()
    );
    layer.remove_adapter("a").unwrap();
}

#[test]
fn merge_apply_on_the_gpu_matches_the_cpu() {
    use quantadapt::kernels::merge::{MergeDelta, merged_weight};
    use quantadapt::kernels::quant::GpuQuantWeight;
    use quantadapt::layer::merged_dense_weight;
    let ctx = gpu();
    let base = hqq_base();
    let gpu_base = GpuQuantWeight::upload(ctx, &base).unwrap();
    for adapter in [
        oft("o", Parameterization::Cayley),
        lora("l", false),
        lora("d", true),
    ] {
        let expected = merged_dense_weight(&base, &adapter, &base).unwrap();
        let got = match &adapter {
            Adapter::Oft(o) => merged_weight(
                ctx,
                &gpu_base,
                &MergeDelta::Oft {
                    blocks: &o.blocks_flat(),
                    block_size: o.block_size(),
                },
            ),
            Adapter::Lora(l) => {
                let g = l.dora_scale(&base.dequantize()).unwrap();
                merged_weight(
                    ctx,
                    &gpu_base,
                    &MergeDelta::Lora {
                        a: l.a(),
                        b: l.b(),
                        scaling: l.scaling(),
                        dora_scale: g.as_deref(),
                    },
                )
            }
        }
        .unwrap();
        let err = max_rel_error(&got.data, &expected.data);
        assert!(err < 1e-5, "{}: {err}", adapter.kind());
    }
}
