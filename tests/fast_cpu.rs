//! The fast CPU forward (`QuantWeight::forward_fast`) against the f64 reference
//! (`QuantFormat::forward_cpu`) on fresh random weights and inputs: every format, bit width and
//! axis, act-order and both GPTQ zero formats, M = 1..16, K = 4096 for every format, and shapes
//! that are not a multiple of a group or a packing unit (HQQ groups and slabs straddling rows).
//!
//! Tolerance: the README's CPU tolerance, max |fast - reference| / max |y| below 1e-5. The fast
//! path dequantizes every weight bit-exactly as the reference does (or, for HQQ in f32, factors
//! groups exactly in real arithmetic), so the only difference is f32 against f64 summation: about
//! 1e-7 relative at K = 4096.

use quantadapt::adapters::Adapter;
use quantadapt::adapters::lora::LoraAdapter;
use quantadapt::adapters::oft::{OftAdapter, Parameterization};
use quantadapt::formats::eetq::EetqWeight;
use quantadapt::formats::gptq::{GptqConfig, GptqWeight, GptqZeros};
use quantadapt::formats::hqq::{ComputeDtype, HqqConfig, HqqWeight};
use quantadapt::formats::{QuantFormat, QuantWeight};
use quantadapt::layer::{Backend, QuantLinear};
use quantadapt::tensor::{Matrix, max_rel_error};
use rand::seq::SliceRandom;

const TOLERANCE: f64 = 1e-5;
const MAX_ROWS: usize = 16;

/// Runs the fast path at every M from 1 to 16 against the reference's output for 16 rows. The
/// error of each M is taken relative to max |y| over all 16 rows: with one output (N = M = 1) a
/// single y that happens to lie near zero would otherwise stand for the scale of the layer.
fn check(label: &str, w: &QuantWeight) -> f64 {
    let x = Matrix::random(MAX_ROWS, w.in_features(), 1.0);
    let reference = w.forward_cpu(&x).unwrap();
    let scale = reference
        .data
        .iter()
        .fold(0f64, |m, v| m.max(v.abs() as f64));
    assert!(scale > 0.0, "{label}: all zero");
    let mut worst = 0f64;
    for m in 1..=MAX_ROWS {
        let xm = Matrix::new(m, x.cols, x.data[..m * x.cols].to_vec()).unwrap();
        let fast = w.forward_fast(&xm).unwrap();
        assert_eq!((fast.rows, fast.cols), (m, w.out_features()), "{label}");
        let expected = &reference.data[..m * w.out_features()];
        assert!(
            fast.data.iter().all(|v| v.is_finite()),
            "{label} M={m}: not finite"
        );
        let diff = fast
            .data
            .iter()
            .zip(expected)
            .fold(0f64, |d, (a, b)| d.max((*a as f64 - *b as f64).abs()));
        let err = diff / scale;
        assert!(
            err < TOLERANCE,
            "{label} M={m}: max relative error {err:.3e}"
        );
        worst = worst.max(err);
    }
    worst
}

fn random_bias(n: usize) -> Option<Vec<f32>> {
    Some(Matrix::random(1, n, 0.5).data)
}

/// `(out, in, group)`: K = 4096; groups straddling rows (axis 1) or wrapping inside a row
/// (axis 0); a 4-bit / 2-bit slab boundary inside a row (odd N, N not a multiple of 4); one row
/// spread over several slabs; a 3-bit padded last slab with rows straddling slabs.
const HQQ_SHAPES: [(usize, usize, usize); 7] = [
    (40, 4096, 64),
    (40, 96, 64),
    (40, 96, 32),
    (64, 136, 64),
    (33, 128, 64),
    (30, 128, 64),
    (1, 4096, 64),
];

#[test]
fn hqq_every_bit_width_axis_and_dtype() {
    let (mut worst, mut cases) = (0f64, 0);
    for nbits in [8, 6, 5, 4, 3, 2, 1] {
        for axis in [0, 1] {
            let mut realistic = false;
            for (out, inp, group) in HQQ_SHAPES {
                let mut config = HqqConfig::new(nbits, group, axis);
                config.optimize = false;
                let dense = Matrix::random(out, inp, 0.05);
                // Shapes whose grouped rows HQQ cannot pack at this width are skipped.
                let Ok(base) = HqqWeight::quantize(&dense, random_bias(out), &config) else {
                    continue;
                };
                realistic |= inp >= 4096;
                for dtype in [ComputeDtype::F32, ComputeDtype::F16, ComputeDtype::BF16] {
                    let mut w = base.clone();
                    w.compute_dtype = dtype;
                    let (s, z) = (&mut w.scale, &mut w.zero);
                    s.iter_mut()
                        .chain(z.iter_mut())
                        .for_each(|v| *v = dtype.round(*v));
                    let label =
                        format!("hqq {nbits}-bit axis {axis} {dtype:?} o{out} i{inp} g{group}");
                    worst = worst.max(check(&label, &QuantWeight::Hqq(w)));
                    cases += 1;
                }
            }
            assert!(realistic, "hqq {nbits}-bit axis {axis}: no K = 4096 case");
        }
    }
    println!("hqq: {cases} layers x 16 batch sizes, worst relative error {worst:.2e}");
}

/// `(out, in)`: K = 4096, K not a multiple of a group or of a 32-bit word of codes, and N not a
/// multiple of the 16 outputs a task decodes at once.
const GPTQ_SHAPES: [(usize, usize); 3] = [(40, 4096), (37, 100), (53, 200)];

#[test]
fn gptq_every_bit_width_zeros_and_act_order() {
    let mut rng = rand::rng();
    let (mut worst, mut cases) = (0f64, 0);
    for bits in [2, 3, 4, 8] {
        for zeros in [GptqZeros::V1, GptqZeros::V2] {
            for desc_act in [false, true] {
                for (out, inp) in GPTQ_SHAPES {
                    for group_size in [Some(128), Some(64), None] {
                        let config = GptqConfig {
                            bits,
                            group_size,
                            sym: false,
                            desc_act,
                            zeros,
                        };
                        let len = config.group_len(inp);
                        let mut g_idx: Vec<u32> = (0..inp).map(|k| (k / len) as u32).collect();
                        if desc_act {
                            g_idx.shuffle(&mut rng);
                        }
                        let dense = Matrix::random(out, inp, 0.05);
                        let mut w = GptqWeight::quantize_rtn(&dense, config, Some(g_idx)).unwrap();
                        w.bias = random_bias(out);
                        let label = format!(
                            "gptq {bits}-bit {zeros:?} act-order {desc_act} o{out} i{inp} g{group_size:?}"
                        );
                        worst = worst.max(check(&label, &QuantWeight::Gptq(w)));
                        cases += 1;
                    }
                }
            }
        }
    }
    println!("gptq: {cases} layers x 16 batch sizes, worst relative error {worst:.2e}");
}

#[test]
fn eetq_int8() {
    let mut worst = 0f64;
    for (out, inp) in [(40, 4096), (37, 100), (1, 7)] {
        let dense = Matrix::random(out, inp, 0.05);
        let mut w = EetqWeight::quantize(&dense).unwrap();
        w.bias = random_bias(out);
        worst = worst.max(check(&format!("eetq o{out} i{inp}"), &QuantWeight::Eetq(w)));
    }
    println!("eetq: 3 layers x 16 batch sizes, worst relative error {worst:.2e}");
}

#[test]
fn wrong_input_width_is_an_error() {
    let dense = Matrix::random(8, 64, 0.05);
    let w = QuantWeight::Eetq(EetqWeight::quantize(&dense).unwrap());
    let err = w.forward_fast(&Matrix::random(2, 63, 1.0)).unwrap_err();
    assert!(err.to_string().contains("x"), "{err}");
}

#[test]
fn an_empty_batch_gives_an_empty_output() {
    let dense = Matrix::random(8, 64, 0.05);
    let w = QuantWeight::Eetq(EetqWeight::quantize(&dense).unwrap());
    let y = w.forward_fast(&Matrix::zeros(0, 64)).unwrap();
    assert_eq!((y.rows, y.cols), (0, 8));
}

fn oft(inp: usize, block_share: bool) -> OftAdapter {
    let rows = if block_share { 1 } else { inp / 32 };
    let params = Matrix::random(rows, 32 * 31 / 2, 0.05);
    OftAdapter::from_params(
        "oft",
        inp,
        params,
        Parameterization::Cayley,
        None,
        block_share,
    )
    .unwrap()
}

#[test]
fn oft_rotation_in_f32_matches_the_reference() {
    for block_share in [false, true] {
        let oft = oft(4096, block_share);
        for m in [1, 5, 16] {
            let x = Matrix::random(m, 4096, 1.0);
            let err = max_rel_error(
                &oft.rotate_fast(&x).unwrap().data,
                &oft.rotate_cpu(&x).unwrap().data,
            );
            assert!(err < TOLERANCE, "share {block_share} M={m}: {err:.3e}");
        }
    }
}

/// A CPU layer (fast base, f32 rotation) against the references composed by hand: OFT, then the
/// base, then LoRA on the unrotated input.
#[test]
fn cpu_layer_with_oft_and_lora_matches_the_references() {
    let (out, inp) = (48, 4096);
    let mut config = HqqConfig::new(4, 64, 1);
    config.optimize = false;
    let dense = Matrix::random(out, inp, 0.05);
    let base = QuantWeight::Hqq(HqqWeight::quantize(&dense, random_bias(out), &config).unwrap());
    let oft = oft(inp, false);
    let (a, b) = (Matrix::random(16, inp, 0.05), Matrix::random(out, 16, 0.05));
    let lora = LoraAdapter::from_matrices("lora", inp, out, a, b, 2.0, None).unwrap();
    let mut layer = QuantLinear::new(base.clone(), Backend::Cpu).unwrap();
    layer.add_adapter(Adapter::Oft(oft.clone())).unwrap();
    layer.add_adapter(Adapter::Lora(lora.clone())).unwrap();
    layer.set_active(&["oft", "lora"]).unwrap();
    let x = Matrix::random(16, inp, 1.0);
    let mut expected = base.forward_cpu(&oft.rotate_cpu(&x).unwrap()).unwrap();
    lora.apply_cpu(&x, &mut expected, base.bias(), &Matrix::zeros(0, 0))
        .unwrap();
    let err = max_rel_error(&layer.forward(&x).unwrap().data, &expected.data);
    assert!(err < TOLERANCE, "{err:.3e}");
}
