//! The GEMV shaped for bandwidth (`kernels::gemv`) against the CPU reference: every candidate
//! variant, both reductions, split-K, K of 4096 and more, every row count from 1 to 16, the
//! rounding policy, fused OFT and LoRA, and the kernel it leaves other layouts to.

mod common;

use common::{gpu, random_matrix};
use quantadapt::Error;
use quantadapt::adapters::Adapter;
use quantadapt::adapters::lora::LoraAdapter;
use quantadapt::adapters::oft::{OftAdapter, Parameterization};
use quantadapt::formats::eetq::EetqWeight;
use quantadapt::formats::gptq::{GptqConfig, GptqWeight, GptqZeros};
use quantadapt::formats::hqq::{ComputeDtype, HqqConfig, HqqWeight};
use quantadapt::formats::{QuantFormat, QuantWeight};
use quantadapt::gpu::{ActDtype, GpuContext, GpuTensor};
use quantadapt::kernels::fused::Fused;
use quantadapt::kernels::gemv::{GemvVariant, LEGACY_GEMV, Reduction};
use quantadapt::kernels::quant::GpuQuantWeight;
use quantadapt::layer::{Backend, Fusion, QuantLinear};
use quantadapt::tensor::{Matrix, max_rel_error};

fn hqq(out: usize, inp: usize, nbits: u32, group: usize, compute: ComputeDtype) -> HqqWeight {
    let mut config = HqqConfig::new(nbits, group, 1);
    config.compute_dtype = compute;
    let bias = Some(random_matrix(1, out, 0.1).data);
    HqqWeight::quantize(&random_matrix(out, inp, 0.05), bias, &config).unwrap()
}

/// `x` in `act`, and the CPU reference's output for exactly those values.
fn input(w: &impl QuantFormat, rows: usize, act: ActDtype) -> (Matrix, Matrix) {
    let mut x = random_matrix(rows, w.in_features(), 1.0);
    if act == ActDtype::F16 {
        x.round_to_f16();
    }
    let expected = w.forward_cpu(&x).unwrap();
    (x, expected)
}

fn tolerance(act: ActDtype) -> f64 {
    match act {
        ActDtype::F32 => 1e-4,
        ActDtype::F16 => 5e-3,
    }
}

/// Runs one variant and checks it against `expected`; `case` names it in failures.
fn check_variant(
    ctx: &GpuContext,
    gw: &GpuQuantWeight,
    x: &Matrix,
    expected: &Matrix,
    act: ActDtype,
    variant: GemvVariant,
    case: &str,
) {
    let xt = GpuTensor::upload(ctx, x, act).unwrap();
    let y = GpuTensor::output(ctx, x.rows, gw.out_features, act).unwrap();
    let dispatch = gw
        .prepare_gemv(ctx, &xt, &y, variant, &Fused::default())
        .unwrap();
    assert_eq!(dispatch.launches(), if variant.split_k > 1 { 2 } else { 1 });
    quantadapt::kernels::Dispatch::submit_all(ctx, &[&dispatch]).unwrap();
    let out = y.download(ctx).unwrap();
    assert!(out.data.iter().all(|v| v.is_finite()), "{case}: unwritten");
    let err = max_rel_error(&out.data, &expected.data);
    assert!(err < tolerance(act), "{case} {variant:?}: error {err}");
}

#[test]
fn every_candidate_matches_the_cpu() {
    let ctx = gpu();
    // (bits, rows of x): 16 groups per row, so every split fits.
    for (nbits, rows) in [(4, &[1, 16][..]), (8, &[3]), (2, &[5])] {
        let w = hqq(40, 1024, nbits, 64, ComputeDtype::F32);
        let gw = GpuQuantWeight::from_hqq(ctx, &w).unwrap();
        for &m in rows {
            let candidates = gw.gemv_candidates(ctx, m, &Fused::default());
            assert!(candidates.len() >= 8, "{nbits}-bit m={m}: {candidates:?}");
            let (x, expected) = input(&w, m, ActDtype::F32);
            for variant in candidates {
                let case = format!("{nbits}-bit m={m}");
                check_variant(ctx, &gw, &x, &expected, ActDtype::F32, variant, &case);
            }
        }
    }
}

fn eetq(out: usize, inp: usize) -> EetqWeight {
    let mut w = EetqWeight::quantize(&random_matrix(out, inp, 0.05)).unwrap();
    w.bias = Some(random_matrix(1, out, 0.1).data);
    w
}

/// EETQ's codes are repacked along K at load: the grouped GEMV reads them as 8-bit words with
/// the row's scale for every group, rounding each weight to f16 with f32 activations.
#[test]
fn eetq_every_candidate_and_every_row_count_at_k_4096() {
    let ctx = gpu();
    let w = eetq(36, 512);
    let gw = GpuQuantWeight::from_eetq(ctx, &w).unwrap();
    for m in [1, 6] {
        let candidates = gw.gemv_candidates(ctx, m, &Fused::default());
        assert!(candidates.len() >= 8, "m={m}: {candidates:?}");
        let (x, expected) = input(&w, m, ActDtype::F32);
        for variant in candidates {
            let case = format!("eetq m={m}");
            check_variant(ctx, &gw, &x, &expected, ActDtype::F32, variant, &case);
        }
    }
    let w = eetq(20, 4096);
    let gw = GpuQuantWeight::from_eetq(ctx, &w).unwrap();
    assert_eq!(gw.dequantize(ctx).unwrap().data, w.dequantize().data);
    for m in 1..=16 {
        for act in common::act_dtypes(ctx) {
            let (x, expected) = input(&w, m, act);
            let default = gw.gemv_default(ctx, m, &Fused::default());
            check_variant(
                ctx,
                &gw,
                &x,
                &expected,
                act,
                default,
                &format!("eetq m={m}"),
            );
        }
    }
}

#[test]
fn both_reductions_and_split_k_at_k_4096_for_every_row_count() {
    let ctx = gpu();
    let w = hqq(24, 4096, 4, 64, ComputeDtype::F32);
    let gw = GpuQuantWeight::from_hqq(ctx, &w).unwrap();
    let subgroups = ctx.has_subgroups()
        && ctx.info.subgroup_min_size == ctx.info.subgroup_max_size
        && ctx.info.subgroup_min_size >= 8;
    for m in 1..=16 {
        for act in common::act_dtypes(ctx) {
            let (x, expected) = input(&w, m, act);
            let candidates = gw.gemv_candidates(ctx, m, &Fused::default());
            let default = gw.gemv_default(ctx, m, &Fused::default());
            assert!(candidates.contains(&default));
            let mut chosen = vec![default];
            for reduction in [Reduction::Workgroup, Reduction::Subgroup] {
                let split = 1 << (m % 4);
                let variant = GemvVariant {
                    split_k: split,
                    reduction,
                    ..default
                };
                assert_eq!(
                    candidates.contains(&variant),
                    reduction == Reduction::Workgroup || subgroups,
                    "{variant:?}"
                );
                if candidates.contains(&variant) {
                    chosen.push(variant);
                }
            }
            for variant in chosen {
                check_variant(
                    ctx,
                    &gw,
                    &x,
                    &expected,
                    act,
                    variant,
                    &format!("m={m} {act:?}"),
                );
            }
            // The forward path picks the default.
            let xt = GpuTensor::upload(ctx, &x, act).unwrap();
            let y = gw.forward(ctx, &xt).unwrap().download(ctx).unwrap();
            assert!(max_rel_error(&y.data, &expected.data) < tolerance(act));
        }
    }
}

#[test]
fn rounding_compute_dtypes_keep_the_tolerance_and_store_half_metadata() {
    let ctx = gpu();
    for compute in [ComputeDtype::F16, ComputeDtype::BF16] {
        for nbits in [8, 4, 2] {
            let w = hqq(32, 4096 + 128, nbits, 128, compute);
            let gw = GpuQuantWeight::from_hqq(ctx, &w).unwrap();
            // Packed codes, scale and zero as 2-byte halves in whole words, the bias and the
            // format's 32-byte uniform.
            let groups = w.scale.len();
            let metadata = 2 * (groups * 2).div_ceil(4) * 4;
            assert_eq!(gw.resident_bytes(), w.packed.len() + metadata + 4 * 32 + 32);
            // The dequant kernel keeps PyTorch's rounding bit for bit.
            assert_eq!(gw.dequantize(ctx).unwrap().data, w.dequantize().data);
            for m in [1, 7] {
                for act in common::act_dtypes(ctx) {
                    let (x, expected) = input(&w, m, act);
                    let default = gw.gemv_default(ctx, m, &Fused::default());
                    for reduction in [Reduction::Workgroup, Reduction::Subgroup] {
                        let variant = GemvVariant {
                            reduction,
                            split_k: 2,
                            ..default
                        };
                        let candidates = gw.gemv_candidates(ctx, m, &Fused::default());
                        for variant in [default, variant] {
                            if candidates.contains(&variant) {
                                let case = format!("{compute:?} {nbits}-bit m={m} {act:?}");
                                check_variant(ctx, &gw, &x, &expected, act, variant, &case);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn other_layouts_keep_the_word_or_element_kernel() {
    let ctx = gpu();
    // 3 and 1 bits, groups that straddle rows, K not a multiple of the 16-input unit, axis 0.
    let cases = [
        (32, 256, 3, 64, 1),
        (32, 256, 1, 64, 1),
        (32, 80, 4, 32, 1),
        (32, 4104, 4, 8, 1),
        (32, 256, 4, 64, 0),
    ];
    for (out, inp, nbits, group, axis) in cases {
        let w = HqqWeight::quantize(
            &random_matrix(out, inp, 0.05),
            None,
            &HqqConfig::new(nbits, group, axis),
        )
        .unwrap();
        let gw = GpuQuantWeight::from_hqq(ctx, &w).unwrap();
        let case = format!("{out}x{inp} {nbits}-bit g{group} axis {axis}");
        for m in [1, 3] {
            assert_eq!(gw.gemv_candidates(ctx, m, &Fused::default()), [LEGACY_GEMV]);
            assert_eq!(gw.gemv_default(ctx, m, &Fused::default()), LEGACY_GEMV);
            let (x, expected) = input(&w, m, ActDtype::F32);
            check_variant(ctx, &gw, &x, &expected, ActDtype::F32, LEGACY_GEMV, &case);
        }
    }
}

#[test]
fn a_variant_that_is_not_a_candidate_is_refused() {
    let ctx = gpu();
    let w = hqq(16, 256, 4, 64, ComputeDtype::F32);
    let gw = GpuQuantWeight::from_hqq(ctx, &w).unwrap();
    let x = GpuTensor::upload(ctx, &random_matrix(2, 256, 1.0), ActDtype::F32).unwrap();
    let y = GpuTensor::output(ctx, 2, 16, ActDtype::F32).unwrap();
    let default = gw.gemv_default(ctx, 2, &Fused::default());
    for variant in [
        GemvVariant {
            rows_per_workgroup: 3,
            ..default
        },
        GemvVariant {
            workgroup_size: 96,
            ..default
        },
        // 4 groups per row: no fifth slice.
        GemvVariant {
            split_k: 8,
            ..default
        },
    ] {
        let result = gw.prepare_gemv(ctx, &x, &y, variant, &Fused::default());
        assert!(
            matches!(result, Err(Error::Unsupported(_))),
            "{variant:?}: {result:?}"
        );
    }
}

fn fused_layer(base: &QuantWeight, adapters: &[Adapter], backend: Backend) -> QuantLinear {
    let mut layer = QuantLinear::new(base.clone(), backend).unwrap();
    for a in adapters {
        layer.add_adapter(a.clone()).unwrap();
    }
    let names: Vec<&str> = adapters.iter().map(Adapter::name).collect();
    layer.set_active(&names).unwrap();
    layer
}

/// K = 16384: the default splits K, so the OFT prologue rotates one slice per workgroup and the
/// sum launch carries the LoRA epilogue.
#[test]
fn fused_oft_and_lora_on_split_k() {
    let ctx = gpu();
    let (out, inp) = (24, 16384);
    let w = hqq(out, inp, 4, 64, ComputeDtype::F32);
    let gw = GpuQuantWeight::from_hqq(ctx, &w).unwrap();
    assert!(gw.gemv_default(ctx, 1, &Fused::default()).split_k > 1);
    let b = 16;
    let oft = OftAdapter::from_params(
        "o",
        inp,
        random_matrix(inp / b, b * (b - 1) / 2, 0.05),
        Parameterization::Cayley,
        None,
        false,
    )
    .unwrap();
    let lora = LoraAdapter::from_matrices(
        "l",
        inp,
        out,
        random_matrix(8, inp, 0.02),
        random_matrix(out, 8, 0.1),
        1.5,
        None,
    )
    .unwrap();
    let base = QuantWeight::Hqq(w);
    let adapters = [Adapter::Oft(oft), Adapter::Lora(lora)];
    let cpu = fused_layer(&base, &adapters, Backend::Cpu);
    let mut layer = fused_layer(&base, &adapters, Backend::Gpu(Box::new(ctx.clone())));
    layer.set_fusion(Fusion::Always);
    for rows in [1, 3] {
        let x = random_matrix(rows, inp, 1.0);
        let expected = cpu.forward(&x).unwrap();
        let y = layer.forward(&x).unwrap();
        let err = max_rel_error(&y.data, &expected.data);
        assert!(err <= 1e-4, "rows={rows}: {err}");
    }
}

fn gptq(out: usize, inp: usize, bits: u32, group: Option<usize>, zeros: GptqZeros) -> GptqWeight {
    let config = GptqConfig {
        bits,
        group_size: group,
        sym: false,
        desc_act: false,
        zeros,
    };
    let mut w = GptqWeight::quantize_rtn(&random_matrix(out, inp, 0.05), config, None).unwrap();
    w.bias = Some(random_matrix(1, out, 0.1).data);
    w
}

/// GPTQ 2/4/8-bit layers without act-order upload in HQQ's layout and take the grouped GEMV:
/// the same dequantized bits, every candidate on a small layer, and every row count at K = 4096.
#[test]
fn gptq_without_act_order_takes_the_grouped_gemv() {
    let ctx = gpu();
    for (bits, group, zeros) in [
        (4, Some(128), GptqZeros::V1),
        (2, Some(64), GptqZeros::V2),
        (8, None, GptqZeros::V1),
    ] {
        let w = gptq(24, 512, bits, group, zeros);
        let gw = GpuQuantWeight::upload(ctx, &QuantWeight::Gptq(w.clone())).unwrap();
        assert_eq!(gw.dequantize(ctx).unwrap().data, w.dequantize().data);
        let candidates = gw.gemv_candidates(ctx, 2, &Fused::default());
        // The element / word kernel offers one variant; the grouped GEMV offers many.
        assert!(candidates.len() > 1, "{bits}-bit: {candidates:?}");
        let (x, expected) = input(&w, 2, ActDtype::F32);
        for variant in candidates {
            let case = format!("gptq {bits}-bit m=2");
            check_variant(ctx, &gw, &x, &expected, ActDtype::F32, variant, &case);
        }
    }
    let w = gptq(40, 4096, 4, Some(128), GptqZeros::V1);
    let gw = GpuQuantWeight::upload(ctx, &QuantWeight::Gptq(w.clone())).unwrap();
    for m in 1..=16 {
        for act in common::act_dtypes(ctx) {
            let (x, expected) = input(&w, m, act);
            let default = gw.gemv_default(ctx, m, &Fused::default());
            assert!(gw.gemv_candidates(ctx, m, &Fused::default()).len() > 1);
            let case = format!("gptq 4-bit k=4096 m={m}");
            check_variant(ctx, &gw, &x, &expected, act, default, &case);
        }
    }
}
