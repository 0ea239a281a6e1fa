//! The tiled GEMM (prefill path) against the CPU reference for every format at row counts that
//! are not multiples of its tiles, K of 4096 (several K-slices and packed words per row) and K
//! that ends inside a staged run of inputs, with a fused LoRA epilogue; outputs NaN-poisoned.

mod common;

use common::{gpu, random_matrix};
use quantadapt::adapters::Adapter;
use quantadapt::adapters::lora::LoraAdapter;
use quantadapt::formats::eetq::EetqWeight;
use quantadapt::formats::gptq::{GptqConfig, GptqWeight, GptqZeros};
use quantadapt::formats::hqq::{HqqConfig, HqqWeight};
use quantadapt::formats::{QuantFormat, QuantWeight};
use quantadapt::gpu::{ActDtype, GpuTensor};
use quantadapt::kernels::MatmulPath;
use quantadapt::kernels::quant::GpuQuantWeight;
use quantadapt::layer::{Backend, Fusion, QuantLinear};
use quantadapt::tensor::{Matrix, max_rel_error};
use rand::seq::SliceRandom;

/// Rows of x: one short of a 16-row tile plus one, and around the 64-row blocked tile.
const ROWS: [usize; 3] = [17, 64, 130];
/// Long rows, as real layers have.
const LONG_K: usize = 4096;
/// Not a multiple of the 16-input K-slice nor of the 4-input run.
const ODD_K: usize = 202;

/// Runs `weight` through the tiled GEMM at every row count of `rows` and compares with the
/// CPU; f16 activations too where `both_acts`. Returns whether the GEMM decodes words.
fn check(name: &str, weight: &QuantWeight, rows: &[usize], both_acts: bool) -> bool {
    let ctx = gpu();
    let layer = GpuQuantWeight::upload(ctx, weight).unwrap();
    let acts = if both_acts {
        common::act_dtypes(ctx)
    } else {
        vec![ActDtype::F32]
    };
    for &m in rows {
        for &act in &acts {
            let mut x = random_matrix(m, weight.in_features(), 1.0);
            if act == ActDtype::F16 {
                x.round_to_f16();
            }
            let expected = weight.forward_cpu(&x).unwrap();
            let xg = GpuTensor::upload(ctx, &x, act).unwrap();
            let y: Matrix = layer
                .forward_with(ctx, &xg, MatmulPath::Tiled)
                .unwrap()
                .download(ctx)
                .unwrap();
            let err = max_rel_error(&y.data, &expected.data);
            let tol = if act == ActDtype::F32 { 1e-4 } else { 5e-3 };
            assert!(err < tol, "{name} m={m} {act:?}: error {err}");
        }
    }
    layer.gemm_decodes_words()
}

fn hqq(out: usize, inp: usize, nbits: u32, group: usize, axis: usize) -> QuantWeight {
    let bias = random_matrix(1, out, 0.1).data;
    let w = random_matrix(out, inp, 0.05);
    QuantWeight::Hqq(
        HqqWeight::quantize(&w, Some(bias), &HqqConfig::new(nbits, group, axis)).unwrap(),
    )
}

#[test]
fn hqq_gemm_matches_cpu_for_every_bit_width_and_axis() {
    for nbits in [8, 4, 3, 2, 1] {
        // 24 rows of 4096: slabs of whole rows for every byte-packed width.
        let words = check(
            &format!("hqq {nbits}-bit axis 1, K={LONG_K}"),
            &hqq(24, LONG_K, nbits, 64, 1),
            &ROWS,
            false,
        );
        assert_eq!(
            words,
            [8, 4, 2].contains(&nbits),
            "{nbits}-bit word decoding"
        );
        // Groups of 8 along rows (axis 1) or of 32 along columns (axis 0): 32 x 202 packs into
        // whole bytes either way.
        for (axis, group) in [(0, 32), (1, 8)] {
            check(
                &format!("hqq {nbits}-bit axis {axis}, K={ODD_K}"),
                &hqq(32, ODD_K, nbits, group, axis),
                &ROWS,
                true,
            );
        }
    }
    // Axis 0 with word decoding: a word's four inputs sit in four consecutive groups.
    let w = hqq(24, LONG_K, 4, 64, 0);
    assert!(check("hqq 4-bit axis 0, K=4096", &w, &ROWS, false));
}

fn gptq(bits: u32, (out, inp): (usize, usize), act_order: bool) -> QuantWeight {
    let config = GptqConfig {
        bits,
        group_size: Some(128),
        sym: false,
        desc_act: act_order,
        zeros: GptqZeros::V2,
    };
    let g_idx = act_order.then(|| {
        let mut g: Vec<u32> = (0..inp).map(|k| (k / 128) as u32).collect();
        g.shuffle(&mut rand::rng());
        g
    });
    let mut w = GptqWeight::quantize_rtn(&random_matrix(out, inp, 0.1), config, g_idx).unwrap();
    w.bias = Some(random_matrix(1, out, 0.2).data);
    QuantWeight::Gptq(w)
}

#[test]
fn gptq_gemm_matches_cpu_for_every_bit_width_with_act_order() {
    for bits in [2, 3, 4, 8] {
        let name = format!("gptq {bits}-bit act-order, K={LONG_K}");
        check(&name, &gptq(bits, (24, LONG_K), true), &ROWS, false);
        for act_order in [false, true] {
            let name = format!("gptq {bits}-bit act-order {act_order}, K={ODD_K}");
            check(&name, &gptq(bits, (40, ODD_K), act_order), &ROWS, true);
        }
    }
}

#[test]
fn eetq_gemm_matches_cpu() {
    for (out, inp, both_acts) in [(24, LONG_K, false), (40, ODD_K, true), (38, ODD_K, true)] {
        let mut w = EetqWeight::quantize(&random_matrix(out, inp, 0.1)).unwrap();
        w.bias = Some(random_matrix(1, out, 0.2).data);
        check(
            &format!("eetq {out}x{inp}"),
            &QuantWeight::Eetq(w),
            &ROWS,
            both_acts,
        );
    }
}

#[test]
fn gemm_with_a_fused_lora_epilogue_matches_cpu() {
    let ctx = gpu();
    let bases = [
        ("hqq 4-bit words", hqq(48, 256, 4, 64, 1)),
        ("hqq 3-bit", hqq(40, ODD_K, 3, 8, 1)),
        ("gptq 4-bit act-order", gptq(4, (40, ODD_K), true)),
    ];
    for (name, base) in bases {
        let (inp, out) = (base.in_features(), base.out_features());
        let lora = Adapter::Lora(
            LoraAdapter::from_matrices(
                "l",
                inp,
                out,
                random_matrix(8, inp, 0.2),
                random_matrix(out, 8, 0.2),
                2.0,
                None,
            )
            .unwrap(),
        );
        let mut cpu = QuantLinear::new(base.clone(), Backend::Cpu).unwrap();
        let mut layer = QuantLinear::new(base, Backend::Gpu(Box::new(ctx.clone()))).unwrap();
        for l in [&mut cpu, &mut layer] {
            l.add_adapter(lora.clone()).unwrap();
            l.set_active(&["l"]).unwrap();
        }
        for m in ROWS {
            let xg = GpuTensor::upload(ctx, &random_matrix(m, inp, 1.0), ActDtype::F32).unwrap();
            let y = GpuTensor::output(ctx, m, out, ActDtype::F32).unwrap();
            let mut launches = Vec::new();
            for fusion in [Fusion::Off, Fusion::Always] {
                layer.set_fusion(fusion);
                launches.push(layer.prepare_forward(&xg, &y).unwrap().dispatches().len());
            }
            assert!(
                launches[1] < launches[0],
                "{name} m={m}: not fused ({launches:?})"
            );
        }
        for m in ROWS {
            let x = random_matrix(m, inp, 1.0);
            let expected = cpu.forward(&x).unwrap();
            let xg = GpuTensor::upload(ctx, &x, ActDtype::F32).unwrap();
            let y: Matrix = layer.forward_gpu(&xg).unwrap().download(ctx).unwrap();
            let err = max_rel_error(&y.data, &expected.data);
            assert!(err < 1e-4, "{name} + lora m={m}: error {err}");
        }
    }
}
