//! The fused paths (OFT rotation as the GEMV's prologue, LoRA / DoRA as the matmul's epilogue)
//! against the separate launches they replace and against the CPU layer, for every format.

mod common;

use common::{gpu, random_matrix};
use quantadapt::adapters::Adapter;
use quantadapt::adapters::lora::LoraAdapter;
use quantadapt::adapters::oft::{OftAdapter, Parameterization};
use quantadapt::formats::QuantWeight;
use quantadapt::formats::eetq::EetqWeight;
use quantadapt::formats::gptq::{GptqConfig, GptqWeight, GptqZeros};
use quantadapt::formats::hqq::{HqqConfig, HqqWeight};
use quantadapt::gpu::{ActDtype, GpuTensor};
use quantadapt::kernels::fused::{oft_prologue_fits, oft_prologue_pays};
use quantadapt::layer::{Backend, Fusion, QuantLinear};
use quantadapt::tensor::max_rel_error;

const IN: usize = 320;
const OUT: usize = 70;

fn bases() -> Vec<(&'static str, QuantWeight)> {
    let w = || random_matrix(OUT, IN, 0.1);
    let bias = || Some(random_matrix(1, OUT, 0.2).data);
    let mut gptq = GptqWeight::quantize_rtn(
        &w(),
        GptqConfig {
            bits: 4,
            group_size: Some(64),
            sym: false,
            desc_act: false,
            zeros: GptqZeros::V2,
        },
        None,
    )
    .unwrap();
    gptq.bias = bias();
    let mut eetq = EetqWeight::quantize(&w()).unwrap();
    eetq.bias = bias();
    vec![
        (
            "hqq4",
            QuantWeight::Hqq(HqqWeight::quantize(&w(), bias(), &HqqConfig::new(4, 64, 1)).unwrap()),
        ),
        ("gptq4", QuantWeight::Gptq(gptq)),
        ("eetq", QuantWeight::Eetq(eetq)),
    ]
}

fn oft(name: &str, b: usize, shared: bool) -> Adapter {
    let blocks = if shared { 1 } else { IN / b };
    Adapter::Oft(
        OftAdapter::from_params(
            name,
            IN,
            random_matrix(blocks, b * (b - 1) / 2, 0.05),
            Parameterization::Cayley,
            None,
            shared,
        )
        .unwrap(),
    )
}

fn lora(name: &str, rank: usize, dora: bool) -> Adapter {
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
            random_matrix(rank, IN, 0.1),
            random_matrix(OUT, rank, 0.1),
            1.5,
            magnitude,
        )
        .unwrap(),
    )
}

/// The adapter sets each base runs with, by name.
fn adapter_sets() -> Vec<(&'static str, Vec<Adapter>)> {
    vec![
        ("oft", vec![oft("o", 32, false)]),
        ("shared oft", vec![oft("o", 16, true)]),
        ("lora", vec![lora("l", 8, false)]),
        ("dora", vec![lora("l", 4, true)]),
        (
            "oft + lora",
            vec![oft("o", 10, false), lora("l", 16, false)],
        ),
        (
            "two of each",
            vec![
                oft("o1", 32, false),
                oft("o2", 8, false),
                lora("l1", 8, true),
                lora("l2", 2, false),
            ],
        ),
    ]
}

fn layer(base: &QuantWeight, adapters: &[Adapter], backend: Backend) -> QuantLinear {
    let mut layer = QuantLinear::new(base.clone(), backend).unwrap();
    for a in adapters {
        layer.add_adapter(a.clone()).unwrap();
    }
    let names: Vec<&str> = adapters.iter().map(Adapter::name).collect();
    layer.set_active(&names).unwrap();
    layer
}

#[test]
fn fused_paths_equal_the_separate_launches_and_the_cpu() {
    let ctx = gpu();
    let acts = common::act_dtypes(ctx);
    for (format, base) in bases() {
        for (set, adapters) in adapter_sets() {
            let cpu = layer(&base, &adapters, Backend::Cpu);
            let mut gpu_layer = layer(&base, &adapters, Backend::Gpu(Box::new(ctx.clone())));
            for rows in [1, 8, 13, 19, 66] {
                let x = random_matrix(rows, IN, 1.0);
                let expected = cpu.forward(&x).unwrap();
                for &act in &acts {
                    let xg = GpuTensor::upload(ctx, &x, act).unwrap();
                    let case = format!("{format} {set} rows={rows} {act:?}");
                    gpu_layer.set_fusion(Fusion::Off);
                    let separate = gpu_layer.forward_gpu(&xg).unwrap().download(ctx).unwrap();
                    gpu_layer.set_fusion(Fusion::Always);
                    let fused = gpu_layer.forward_gpu(&xg).unwrap().download(ctx).unwrap();
                    assert!(
                        fused.data.iter().all(|v| v.is_finite()),
                        "{case}: unwritten"
                    );
                    // Same sums in the same order, rounded where PEFT rounds: equal up to the
                    // compiler's choice of fused multiply-adds, which can move an f16 output
                    // across one rounding step.
                    if act == ActDtype::F16 {
                        for (a, b) in fused.data.iter().zip(&separate.data) {
                            let step = a.abs().max(b.abs()).max(6.1e-5) / 1024.0;
                            assert!((a - b).abs() <= step, "{case}: fused {a} vs separate {b}");
                        }
                    } else {
                        let err = max_rel_error(&fused.data, &separate.data);
                        assert!(err <= 1e-6, "{case}: fused vs separate {err}");
                    }
                    let tol = if act == ActDtype::F16 { 2e-2 } else { 1e-4 };
                    let err = max_rel_error(&fused.data, &expected.data);
                    assert!(err <= tol, "{case}: fused vs CPU {err}");
                }
            }
        }
    }
}

/// A prologue whose rotation would take one GEMV invocation past llvmpipe's 65535 loop trips
/// (m·k·b / 64 = 65536 at 16 rows, 4096 inputs, blocks of 64; 118336 at 11008 inputs, blocks
/// of 43) used to come back unwritten there: such layers rotate in a launch of their own.
#[test]
fn rotations_too_long_for_one_gemv_invocation_run_apart() {
    let ctx = gpu();
    for (inp, b) in [(4096usize, 64usize), (11008, 43)] {
        assert!(!oft_prologue_fits(16, inp, b));
        assert!(oft_prologue_fits(1, inp, b));
        let w = random_matrix(8, inp, 0.1);
        let base =
            QuantWeight::Hqq(HqqWeight::quantize(&w, None, &HqqConfig::new(4, 64, 1)).unwrap());
        let params = random_matrix(inp / b, b * (b - 1) / 2, 0.1);
        let rotation = Parameterization::Neumann { terms: 5 };
        let oft = OftAdapter::from_params("o", inp, params, rotation, None, false).unwrap();
        let adapters = [Adapter::Oft(oft)];
        let cpu = layer(&base, &adapters, Backend::Cpu);
        let mut gpu_layer = layer(&base, &adapters, Backend::Gpu(Box::new(ctx.clone())));
        for rows in [1, 16] {
            let x = random_matrix(rows, inp, 1.0);
            let expected = cpu.forward(&x).unwrap();
            for fusion in [Fusion::Auto, Fusion::Always] {
                gpu_layer.set_fusion(fusion);
                let y = gpu_layer.forward(&x).unwrap();
                let err = max_rel_error(&y.data, &expected.data);
                assert!(err <= 1e-4, "k={inp} b={b} rows={rows} {fusion:?}: {err}");
            }
        }
    }
}

fn launches(layer: &QuantLinear, rows: usize) -> usize {
    let ctx = gpu();
    let x = GpuTensor::upload(ctx, &random_matrix(rows, IN, 1.0), ActDtype::F32).unwrap();
    let y = GpuTensor::output(ctx, rows, OUT, ActDtype::F32).unwrap();
    layer.prepare_forward(&x, &y).unwrap().dispatches().len()
}

#[test]
fn fusion_removes_the_adapter_launches_it_replaces() {
    let (_, base) = bases().remove(0);
    let adapters = [oft("o", 32, false), lora("l", 8, false)];
    let mut layer = layer(&base, &adapters, Backend::Gpu(Box::new(gpu().clone())));
    layer.set_fusion(Fusion::Off);
    // rotate, matmul, shrink, expand
    assert_eq!(launches(&layer, 1), 4);
    assert_eq!(launches(&layer, 19), 4);
    layer.set_fusion(Fusion::Always);
    // shrink, matmul with both fused
    assert_eq!(launches(&layer, 1), 2);
    // the tiled GEMM takes the LoRA epilogue only: rotate, shrink, matmul
    assert_eq!(launches(&layer, 19), 3);
}

#[test]
fn auto_fuses_the_rotation_only_where_the_cost_model_says_it_pays() {
    // A small layer: a few workgroups re-read a few kilobytes.
    assert!(oft_prologue_pays(18, 1, 320, 16, true));
    // 4096x4096 with b = 32: 1024 workgroups would each re-read 512 KB of blocks.
    assert!(!oft_prologue_pays(1024, 1, 4096, 32, false));
    let (_, base) = bases().remove(0);
    let layer = layer(
        &base,
        &[oft("o", 16, true)],
        Backend::Gpu(Box::new(gpu().clone())),
    );
    assert_eq!(layer.fusion(), Fusion::Auto);
    assert_eq!(launches(&layer, 1), 1);
    // The GEMM has no OFT prologue.
    assert_eq!(launches(&layer, 19), 2);
}

#[test]
fn mixed_batches_fuse_the_per_row_expand_and_launch_only_what_their_rows_need() {
    let ctx = gpu();
    let (_, base) = bases().remove(0);
    let adapters = [
        oft("o", 32, false),
        lora("l1", 8, false),
        lora("l2", 4, true),
    ];
    let cpu = layer(&base, &adapters, Backend::Cpu);
    let mut gpu_layer = layer(&base, &adapters, Backend::Gpu(Box::new(ctx.clone())));
    // (row adapters, launches unfused, launches fused)
    let cases: [(&[&str], usize, usize); 5] = [
        (&["__base__", "__base__", "__base__"], 1, 1),
        (&["l1", "__base__", "l2"], 3, 2),
        (&["o", "__base__", "o"], 2, 2),
        (&["o", "l2", "l1"], 4, 3),
        (
            &[
                "l2", "l1", "o", "l1", "__base__", "l2", "o", "l1", "l2", "o", "l1",
            ],
            4,
            3,
        ),
    ];
    for (names, unfused, fused) in cases {
        let x = random_matrix(names.len(), IN, 1.0);
        let expected = cpu.forward_mixed(&x, names).unwrap();
        let xg = GpuTensor::upload(ctx, &x, ActDtype::F32).unwrap();
        let y = GpuTensor::output(ctx, names.len(), OUT, ActDtype::F32).unwrap();
        gpu_layer.set_fusion(Fusion::Off);
        assert_eq!(
            gpu_layer
                .prepare_forward_mixed(&xg, names, &y)
                .unwrap()
                .dispatches()
                .len(),
            unfused
        );
        let separate = gpu_layer
            .forward_mixed_gpu(&xg, names)
            .unwrap()
            .download(ctx)
            .unwrap();
        gpu_layer.set_fusion(Fusion::Auto);
        assert_eq!(
            gpu_layer
                .prepare_forward_mixed(&xg, names, &y)
                .unwrap()
                .dispatches()
                .len(),
            fused
        );
        let got = gpu_layer
            .forward_mixed_gpu(&xg, names)
            .unwrap()
            .download(ctx)
            .unwrap();
        assert!(
            got.data.iter().all(|v| v.is_finite()),
            "{names:?}: unwritten"
        );
        let err = max_rel_error(&got.data, &separate.data);
        assert!(err <= 1e-6, "{names:?}: fused vs separate {err}");
        let err = max_rel_error(&got.data, &expected.data);
        assert!(err <= 1e-4, "{names:?}: fused vs CPU {err}");
    }
}
