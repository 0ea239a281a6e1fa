//! HQQ on the CPU against HQQ 0.2.8's own packing, dequantization and solver (golden `hqq_quant`).

mod common;

use common::{HqqQuantCase as Case, hqq_quant_cases as cases};
use quantadapt::formats::QuantFormat;
use quantadapt::formats::hqq::{self, Grouping, HqqConfig, HqqWeight, Packing};
use quantadapt::tensor::{Matrix, rel_frobenius_error};

fn weight_from(case: &Case, suffix: &str) -> HqqWeight {
    let f = &case.file;
    HqqWeight::from_parts(
        case.shape.0,
        case.shape.1,
        case.nbits,
        case.group_size,
        case.axis,
        f.get(&format!("W_q_{suffix}")).unwrap().bytes.clone(),
        f.get(&format!("scale_{suffix}")).unwrap().to_f32().unwrap(),
        f.get(&format!("zero_{suffix}")).unwrap().to_f32().unwrap(),
        None,
        hqq::ComputeDtype::F32,
    )
    .unwrap()
}

#[test]
fn unpack_pack_and_dequant_match_hqq_exactly() {
    for case in cases() {
        for suffix in ["rtn", "opt"] {
            let w = weight_from(&case, suffix);
            let codes = case
                .file
                .get(&format!("W_codes_{suffix}"))
                .unwrap()
                .to_u8()
                .unwrap();
            assert_eq!(w.codes(), codes, "{} {suffix}: unpacked codes", case.name);
            let (rows, cols) = w.grouping.grouped_shape();
            let repacked = hqq::packing::pack(&w.packing, &codes, rows, cols).unwrap();
            assert_eq!(repacked, w.packed, "{} {suffix}: packed words", case.name);
            let deq = case
                .file
                .get(&format!("W_deq_{suffix}"))
                .unwrap()
                .to_f32()
                .unwrap();
            let ours = w.dequantize().data;
            let mismatches = ours
                .iter()
                .zip(&deq)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(mismatches, 0, "{} {suffix}: dequantized values", case.name);
        }
    }
}

#[test]
fn min_max_quantization_matches_hqq_exactly() {
    for case in cases() {
        let w = case.file.get("W").unwrap().to_f32().unwrap();
        let grouping = Grouping::new(w.len(), case.group_size, case.axis).unwrap();
        let mut config = HqqConfig::new(case.nbits, case.group_size, case.axis);
        config.optimize = false;
        config.round_zero = false;
        let (codes, scale, zero) = hqq::quantize_codes(&w, &grouping, &config);
        let f = &case.file;
        assert_eq!(
            codes,
            f.get("W_codes_rtn").unwrap().to_u8().unwrap(),
            "{}: codes",
            case.name
        );
        assert_eq!(
            scale,
            f.get("scale_rtn").unwrap().to_f32().unwrap(),
            "{}: scale",
            case.name
        );
        assert_eq!(
            zero,
            f.get("zero_rtn").unwrap().to_f32().unwrap(),
            "{}: zero",
            case.name
        );
    }
}

#[test]
fn solver_error_is_within_one_percent_of_hqq() {
    for case in cases() {
        let w = case.file.get("W").unwrap().to_f32().unwrap();
        let weight = Matrix::new(case.shape.0, case.shape.1, w.clone()).unwrap();
        let mut config = HqqConfig::new(case.nbits, case.group_size, case.axis);
        config.round_zero = false;
        let ours = HqqWeight::quantize(&weight, None, &config)
            .unwrap()
            .dequantize()
            .data;
        let reference = case.file.get("W_deq_opt").unwrap().to_f32().unwrap();
        let (e_ours, e_ref) = (
            rel_frobenius_error(&ours, &w),
            rel_frobenius_error(&reference, &w),
        );
        assert!(
            e_ours <= e_ref * 1.01 + 1e-7,
            "{}: solver error {e_ours} vs HQQ {e_ref}",
            case.name
        );
    }
}

#[test]
fn packing_rejects_what_hqq_cannot_round_trip() {
    let p = Packing::for_bits(4).unwrap();
    assert!(hqq::packing::pack(&p, &[1, 2, 3], 3, 1).is_err());
    assert!(Packing::for_bits(7).is_err());
    assert!(hqq::packing::pack(&p, &[16, 0], 2, 1).is_err());
}

#[test]
fn quantize_rejects_non_finite_weights_and_bad_groups() {
    let mut m = Matrix::new(2, 8, (0..16).map(|v| v as f32 * 0.1 - 0.7).collect()).unwrap();
    assert!(HqqWeight::quantize(&m, None, &HqqConfig::new(4, 5, 1)).is_err());
    m.data[3] = f32::NAN;
    let err = HqqWeight::quantize(&m, None, &HqqConfig::new(4, 8, 1)).unwrap_err();
    assert!(err.to_string().contains("weight"), "{err}");
}

#[test]
fn forward_cpu_adds_the_bias() {
    let m = Matrix::new(4, 8, (0..32).map(|v| (v as f32 * 0.37).sin()).collect()).unwrap();
    let w =
        HqqWeight::quantize(&m, Some(vec![1.0, 2.0, 3.0, 4.0]), &HqqConfig::new(8, 8, 1)).unwrap();
    let x = Matrix::new(1, 8, vec![0.0; 8]).unwrap();
    assert_eq!(w.forward_cpu(&x).unwrap().data, vec![1.0, 2.0, 3.0, 4.0]);
    let ones = Matrix::new(1, 8, vec![1.0; 8]).unwrap();
    let y = w.forward_cpu(&ones).unwrap();
    let deq = w.dequantize();
    for (n, v) in y.data.iter().enumerate() {
        let expected = deq.row(n).iter().sum::<f32>() + (n + 1) as f32;
        approx::assert_relative_eq!(*v, expected, max_relative = 1e-6);
    }
}
