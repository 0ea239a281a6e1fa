//! HQQ kernels on the GPU against the CPU reference: golden dequantization, and random layers
//! through both matmul paths.

mod common;

use common::{gpu, hqq_quant_cases, random_matrix};
use quantadapt::formats::QuantFormat;
use quantadapt::formats::hqq::{ComputeDtype, HqqConfig, HqqWeight};
use quantadapt::gpu::{ActDtype, GpuTensor};
use quantadapt::kernels::quant::GpuQuantWeight;
use quantadapt::kernels::{GEMV_MAX_ROWS, MatmulPath};
use quantadapt::tensor::{Matrix, max_rel_error};

#[test]
fn gpu_dequant_matches_hqq_golden_bit_for_bit() {
    let mut checked = 0;
    for case in &hqq_quant_cases() {
        let (name, file) = (&case.name, &case.file);
        let w = HqqWeight::from_parts(
            case.shape.0,
            case.shape.1,
            case.nbits,
            case.group_size,
            case.axis,
            file.get("W_q_opt").unwrap().bytes.clone(),
            file.get("scale_opt").unwrap().to_f32().unwrap(),
            file.get("zero_opt").unwrap().to_f32().unwrap(),
            None,
            ComputeDtype::F32,
        )
        .unwrap();
        let ours = GpuQuantWeight::from_hqq(gpu(), &w)
            .unwrap()
            .dequantize(gpu())
            .unwrap();
        let reference = file.get("W_deq_opt").unwrap().to_f32().unwrap();
        let bad = ours
            .data
            .iter()
            .zip(&reference)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(bad, 0, "{name}: {bad} dequantized values differ");
        checked += 1;
    }
    assert!(checked >= 80);
}

fn check_layer(out: usize, inp: usize, config: HqqConfig, rows: &[usize]) {
    let ctx = gpu();
    let weight = random_matrix(out, inp, 0.05);
    let bias = random_matrix(1, out, 0.1).data;
    let w = HqqWeight::quantize(&weight, Some(bias), &config).unwrap();
    let gw = GpuQuantWeight::from_hqq(ctx, &w).unwrap();
    let deq = gw.dequantize(ctx).unwrap();
    assert_eq!(deq.data, w.dequantize().data, "dequant {config:?}");
    for &m in rows {
        let x = random_matrix(m, inp, 1.0);
        let expected = w.forward_cpu(&x).unwrap();
        for act in common::act_dtypes(ctx) {
            let xin = match act {
                ActDtype::F32 => x.clone(),
                ActDtype::F16 => {
                    let mut r = x.clone();
                    r.round_to_f16();
                    r
                }
            };
            let expected = match act {
                ActDtype::F32 => expected.clone(),
                ActDtype::F16 => w.forward_cpu(&xin).unwrap(),
            };
            let tol = if act == ActDtype::F32 { 1e-4 } else { 5e-3 };
            let paths: &[MatmulPath] = if m <= GEMV_MAX_ROWS {
                &[MatmulPath::Gemv, MatmulPath::Tiled]
            } else {
                &[MatmulPath::Tiled]
            };
            for &path in paths {
                let xt = GpuTensor::upload(ctx, &xin, act).unwrap();
                let y: Matrix = gw
                    .forward_with(ctx, &xt, path)
                    .unwrap()
                    .download(ctx)
                    .unwrap();
                let err = max_rel_error(&y.data, &expected.data);
                assert!(err < tol, "{config:?} m={m} {act:?} {path:?}: error {err}");
            }
        }
    }
}

#[test]
fn gpu_matmul_matches_cpu_for_every_bit_width_and_axis() {
    for nbits in [8, 4, 3, 2, 1] {
        for axis in [0, 1] {
            // 32 x 80 with groups of 32: groups straddle rows on axis 1.
            let mut config = HqqConfig::new(nbits, 32, axis);
            config.optimize = nbits == 4;
            check_layer(32, 80, config, &[1, 5, 12, 19]);
        }
    }
}

#[test]
fn gemv_decodes_a_word_at_a_time_where_the_layout_allows() {
    let ctx = gpu();
    // (out, in, nbits, group, axis, word decoder expected)
    let cases = [
        (32, 80, 8, 32, 1, true),
        (32, 80, 4, 32, 0, true),
        (32, 80, 2, 16, 1, true),
        (36, 96, 2, 4, 1, true),
        // Fields that are not whole bytes' quarters, or a K that splits a 16-byte unit.
        (32, 80, 3, 32, 1, false),
        (32, 80, 1, 32, 1, false),
        (32, 78, 4, 16, 1, false),
        (32, 72, 4, 8, 1, false),
        // Groups of 2 put a word's elements in two groups; 18 axis-0 groups wrap inside a word.
        (32, 80, 4, 2, 1, false),
        (12, 48, 8, 32, 0, false),
    ];
    for (out, inp, nbits, group, axis, words) in cases {
        let w = HqqWeight::quantize(
            &random_matrix(out, inp, 0.05),
            None,
            &HqqConfig::new(nbits, group, axis),
        )
        .unwrap();
        let gw = GpuQuantWeight::from_hqq(ctx, &w).unwrap();
        assert_eq!(
            gw.gemv_decodes_words(),
            words,
            "{out}x{inp} {nbits}-bit group {group} axis {axis}"
        );
    }
    // Both decoders against the CPU on these layouts.
    check_layer(32, 80, HqqConfig::new(4, 2, 1), &[1, 3]);
    check_layer(12, 48, HqqConfig::new(8, 32, 0), &[1, 3]);
    check_layer(36, 96, HqqConfig::new(2, 4, 1), &[2, 8]);
    check_layer(32, 72, HqqConfig::new(4, 8, 1), &[1, 4]);
}

#[test]
fn gpu_matmul_rounds_like_f16_and_bf16_compute() {
    for dtype in [ComputeDtype::F16, ComputeDtype::BF16] {
        let mut config = HqqConfig::new(4, 64, 1);
        config.compute_dtype = dtype;
        check_layer(40, 128, config, &[2, 17]);
    }
}

#[test]
fn gpu_matmul_at_larger_shapes() {
    check_layer(256, 512, HqqConfig::new(4, 64, 1), &[1, 8, 16, 70]);
}

#[test]
fn mismatched_input_is_an_error_not_a_panic() {
    let ctx = gpu();
    let w =
        HqqWeight::quantize(&random_matrix(16, 64, 0.1), None, &HqqConfig::new(4, 64, 1)).unwrap();
    let gw = GpuQuantWeight::from_hqq(ctx, &w).unwrap();
    let x = GpuTensor::upload(ctx, &random_matrix(2, 32, 1.0), ActDtype::F32).unwrap();
    assert!(gw.forward(ctx, &x).is_err());
}
