//! GPTQ and EETQ through the shared quantized-matmul kernels on the GPU, against the CPU
//! reference, on fresh random layers: every GPTQ bit width, both zero conventions, act-order,
//! a short last group, both matmul paths, f32 and f16 activations; LoRA on top of both.

mod common;

use common::{gpu, random_matrix};
use quantadapt::adapters::lora::LoraAdapter;
use quantadapt::formats::eetq::EetqWeight;
use quantadapt::formats::gptq::{GptqConfig, GptqWeight, GptqZeros};
use quantadapt::formats::{QuantFormat, QuantWeight};
use quantadapt::gpu::{ActDtype, GpuTensor};
use quantadapt::kernels::MatmulPath;
use quantadapt::kernels::lora::GpuLora;
use quantadapt::kernels::quant::GpuQuantWeight;
use quantadapt::tensor::{Matrix, max_rel_error};
use rand::seq::SliceRandom;

fn check(weight: &QuantWeight) {
    let ctx = gpu();
    let layer = GpuQuantWeight::upload(ctx, weight).unwrap();
    let deq = layer.dequantize(ctx).unwrap();
    assert_eq!(deq.data, weight.dequantize().data, "GPU dequant");
    for (m, paths) in [
        (3, &[MatmulPath::Gemv, MatmulPath::Tiled][..]),
        (13, &[MatmulPath::Gemv, MatmulPath::Tiled][..]),
        (21, &[MatmulPath::Tiled][..]),
        // 64 rows and more: each invocation computes a 4 x 4 block of a 64 x 64 tile.
        (67, &[MatmulPath::Tiled][..]),
    ] {
        for act in common::act_dtypes(ctx) {
            let mut x = random_matrix(m, weight.in_features(), 1.0);
            if act == ActDtype::F16 {
                x.round_to_f16();
            }
            let expected = weight.forward_cpu(&x).unwrap();
            let tol = if act == ActDtype::F32 { 1e-4 } else { 5e-3 };
            for &path in paths {
                let xg = GpuTensor::upload(ctx, &x, act).unwrap();
                let y = layer
                    .forward_with(ctx, &xg, path)
                    .unwrap()
                    .download(ctx)
                    .unwrap();
                let err = max_rel_error(&y.data, &expected.data);
                assert!(err < tol, "m={m} {act:?} {path:?}: {err}");
            }
        }
    }
}

fn gptq(
    bits: u32,
    (out, inp): (usize, usize),
    group_size: Option<usize>,
    zeros: GptqZeros,
    act_order: bool,
) -> GptqWeight {
    let config = GptqConfig {
        bits,
        group_size,
        sym: zeros == GptqZeros::V1,
        desc_act: act_order,
        zeros,
    };
    let g_idx = act_order.then(|| {
        let len = group_size.unwrap_or(inp);
        let mut g: Vec<u32> = (0..inp).map(|k| (k / len) as u32).collect();
        g.shuffle(&mut rand::rng());
        g
    });
    let mut w = GptqWeight::quantize_rtn(&random_matrix(out, inp, 0.1), config, g_idx).unwrap();
    w.bias = Some(random_matrix(1, out, 0.2).data);
    w
}

#[test]
fn gptq_matches_cpu_for_every_bit_width_zero_convention_and_act_order() {
    for bits in [2, 3, 4, 8] {
        for zeros in [GptqZeros::V1, GptqZeros::V2] {
            for act_order in [false, true] {
                // Inputs in groups of 64: the last group is short. A qweight word holds
                // 32 / bits inputs: 200 leaves 2-bit's last word partial, 208 does not.
                for inp in [200, 208] {
                    let w = QuantWeight::Gptq(gptq(bits, (40, inp), Some(64), zeros, act_order));
                    let words = bits != 3 && inp.is_multiple_of(32 / bits as usize);
                    let gw = GpuQuantWeight::upload(gpu(), &w).unwrap();
                    assert_eq!(gw.gemv_decodes_words(), words, "{bits}-bit, {inp} inputs");
                    check(&w);
                }
            }
        }
    }
    check(&QuantWeight::Gptq(gptq(
        4,
        (40, 200),
        None,
        GptqZeros::V1,
        false,
    )));
    // A GEMV tile reads its four rows' words as one vec4: 42 outputs leave the last tile short.
    let w = QuantWeight::Gptq(gptq(4, (42, 208), Some(64), GptqZeros::V2, true));
    assert!(
        !GpuQuantWeight::upload(gpu(), &w)
            .unwrap()
            .gemv_decodes_words()
    );
    check(&w);
}

#[test]
fn eetq_matches_cpu() {
    // Codes repacked along K: the grouped GEMV reads words where 64 | K, at any number of
    // outputs; elsewhere an element at a time.
    for (out, inp, words) in [(96, 128, true), (94, 128, true), (94, 120, false)] {
        let mut w = EetqWeight::quantize(&random_matrix(out, inp, 0.1)).unwrap();
        w.bias = Some(random_matrix(1, out, 0.2).data);
        let w = QuantWeight::Eetq(w);
        let gw = GpuQuantWeight::upload(gpu(), &w).unwrap();
        assert_eq!(gw.gemv_decodes_words(), words, "{out}x{inp}");
        check(&w);
    }
}

#[test]
fn lora_runs_on_gptq_and_eetq_bases() {
    let ctx = gpu();
    let bases = [
        QuantWeight::Gptq(gptq(4, (40, 200), Some(64), GptqZeros::V1, true)),
        QuantWeight::Eetq(EetqWeight::quantize(&random_matrix(64, 128, 0.1)).unwrap()),
    ];
    for base in bases {
        let (inp, out) = (base.in_features(), base.out_features());
        let lora = LoraAdapter::from_matrices(
            "l",
            inp,
            out,
            random_matrix(8, inp, 0.2),
            random_matrix(out, 8, 0.2),
            2.0,
            None,
        )
        .unwrap();
        let x = random_matrix(4, inp, 1.0);
        let weight = base.dequantize();
        let mut expected = base.forward_cpu(&x).unwrap();
        lora.apply_cpu(&x, &mut expected, base.bias(), &weight)
            .unwrap();
        let layer = GpuQuantWeight::upload(ctx, &base).unwrap();
        let gl = GpuLora::upload(ctx, lora.a(), lora.b(), lora.scaling(), None).unwrap();
        let xg = GpuTensor::upload(ctx, &x, ActDtype::F32).unwrap();
        let y = layer.forward(ctx, &xg).unwrap();
        gl.apply(ctx, &xg, &y, Some(layer.bias_buffer())).unwrap();
        let got: Matrix = y.download(ctx).unwrap();
        let err = max_rel_error(&got.data, &expected.data);
        assert!(err < 1e-4, "{}: {err}", base.format_name());
    }
}
