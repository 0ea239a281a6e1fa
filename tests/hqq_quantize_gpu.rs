//! HQQ quantization on the GPU (`kernels::hqq_quantize`) against HQQ 0.2.8's golden vectors and
//! the CPU implementation: min-max exact, the solver within 1% of HQQ's error.

mod common;

use common::{HqqQuantCase as Case, gpu, hqq_quant_cases as cases, random_matrix};
use quantadapt::Error;
use quantadapt::formats::QuantFormat;
use quantadapt::formats::hqq::{self, ComputeDtype, HqqConfig, HqqWeight};
use quantadapt::gpu::{ActDtype, GpuTensor};
use quantadapt::kernels::hqq_quantize::{quantize_on_gpu, quantize_to_host};
use quantadapt::kernels::quant::GpuQuantWeight;
use quantadapt::tensor::{Matrix, max_rel_error, rel_frobenius_error};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `Quantizer.quantize` defaults, as the golden generator called it.
fn golden_config(case: &Case, optimize: bool) -> HqqConfig {
    let mut config = HqqConfig::new(case.nbits, case.group_size, case.axis);
    config.optimize = optimize;
    config.round_zero = false;
    config
}

#[test]
fn golden_min_max_is_exact() {
    let ctx = gpu();
    for case in cases() {
        let f = &case.file;
        let w = Matrix::new(
            case.shape.0,
            case.shape.1,
            f.get("W").unwrap().to_f32().unwrap(),
        )
        .unwrap();
        let ours = quantize_to_host(ctx, &w, None, &golden_config(&case, false))
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let name = &case.name;
        assert_eq!(
            ours.codes(),
            f.get("W_codes_rtn").unwrap().to_u8().unwrap(),
            "{name}: codes"
        );
        assert_eq!(ours.packed, f.get("W_q_rtn").unwrap().bytes, "{name}: W_q");
        assert_eq!(
            bits(&ours.scale),
            bits(&f.get("scale_rtn").unwrap().to_f32().unwrap()),
            "{name}: scale"
        );
        assert_eq!(
            bits(&ours.zero),
            bits(&f.get("zero_rtn").unwrap().to_f32().unwrap()),
            "{name}: zero"
        );
    }
}

#[test]
fn golden_solver_within_one_percent_of_hqq_and_cpu() {
    let ctx = gpu();
    for case in cases() {
        let f = &case.file;
        let data = f.get("W").unwrap().to_f32().unwrap();
        let w = Matrix::new(case.shape.0, case.shape.1, data.clone()).unwrap();
        let config = golden_config(&case, true);
        let ours = quantize_to_host(ctx, &w, None, &config).unwrap();
        let e_gpu = rel_frobenius_error(&ours.dequantize().data, &data);
        let e_ref = rel_frobenius_error(&f.get("W_deq_opt").unwrap().to_f32().unwrap(), &data);
        let cpu = HqqWeight::quantize(&w, None, &config).unwrap();
        let e_cpu = rel_frobenius_error(&cpu.dequantize().data, &data);
        let name = &case.name;
        assert!(
            e_gpu <= e_ref * 1.01 + 1e-7,
            "{name}: GPU solver error {e_gpu} over 1.01 x HQQ's {e_ref}"
        );
        assert!(
            e_gpu <= e_cpu * 1.01 + 1e-7 && e_cpu <= e_gpu * 1.01 + 1e-7,
            "{name}: GPU {e_gpu} and CPU {e_cpu} solver errors differ by over 1%"
        );
        // Same scale (the solver only moves the zero).
        assert_eq!(bits(&ours.scale), bits(&cpu.scale), "{name}: scale");
    }
}

/// At most 1% of the groups (and at least two are allowed) have GPU and CPU solver zeros further
/// apart than 1e-4 (1 + |z|): the sums run in a different order and precision, which can flip a
/// rare rounding tie, and a flipped code moves its group's zero.
fn assert_zeros_close(what: &str, gpu: &[f32], cpu: &[f32]) {
    assert_eq!(gpu.len(), cpu.len());
    let far = gpu
        .iter()
        .zip(cpu)
        .filter(|(a, b)| (*a - *b).abs().is_nan() || (*a - *b).abs() > 1e-4 * (1.0 + b.abs()))
        .count();
    assert!(
        far <= (gpu.len() / 100).max(2),
        "{what}: {far} of {} solver zeros differ from the CPU's",
        gpu.len()
    );
}

fn check_random(
    out: usize,
    inp: usize,
    nbits: u32,
    group_size: usize,
    axis: usize,
    round_zero: bool,
) {
    let ctx = gpu();
    let w = random_matrix(out, inp, 1.0);
    let mut config = HqqConfig::new(nbits, group_size, axis);
    config.round_zero = round_zero;
    let what = format!("{out}x{inp} b{nbits} g{group_size} ax{axis} round_zero {round_zero}");
    // Min-max: bit-exact with the CPU.
    config.optimize = false;
    let gpu_rtn = quantize_to_host(ctx, &w, None, &config).unwrap();
    let cpu_rtn = HqqWeight::quantize(&w, None, &config).unwrap();
    assert_eq!(gpu_rtn.packed, cpu_rtn.packed, "{what}: min-max W_q");
    assert_eq!(bits(&gpu_rtn.scale), bits(&cpu_rtn.scale), "{what}: scale");
    assert_eq!(bits(&gpu_rtn.zero), bits(&cpu_rtn.zero), "{what}: zero");
    // Solver: within 1% of the CPU's error.
    config.optimize = true;
    let gpu_opt = quantize_to_host(ctx, &w, None, &config).unwrap();
    let cpu_opt = HqqWeight::quantize(&w, None, &config).unwrap();
    let e_gpu = rel_frobenius_error(&gpu_opt.dequantize().data, &w.data);
    let e_cpu = rel_frobenius_error(&cpu_opt.dequantize().data, &w.data);
    assert!(
        e_gpu <= e_cpu * 1.01 + 1e-7 && e_cpu <= e_gpu * 1.01 + 1e-7,
        "{what}: GPU {e_gpu} vs CPU {e_cpu}"
    );
    assert_zeros_close(&what, &gpu_opt.zero, &cpu_opt.zero);
    let e_rtn = rel_frobenius_error(&cpu_rtn.dequantize().data, &w.data);
    assert!(
        e_gpu <= e_rtn * 1.01 + 1e-7,
        "{what}: solver {e_gpu} worse than min-max {e_rtn}"
    );
}

#[test]
fn random_shapes_every_nbits_both_axes() {
    // 24x40 with groups of 64 / 32: groups straddle rows (axis 1) and wrap (axis 0).
    for nbits in [8, 4, 3, 2, 1] {
        for axis in [0, 1] {
            for (out, inp, g) in [(24, 40, 64), (24, 40, 32), (8, 96, 48)] {
                let rows = if axis == 1 { out * inp / g } else { g };
                if hqq::Packing::for_bits(nbits)
                    .unwrap()
                    .packed_rows(rows)
                    .is_err()
                {
                    continue;
                }
                check_random(out, inp, nbits, g, axis, nbits == 4);
            }
        }
    }
    // Groups bigger than a workgroup and more than 65535 groups (2-D grid).
    check_random(16, 1280, 4, 320, 1, true);
    check_random(512, 256, 4, 2, 1, false);
}

#[test]
fn solver_steps_match_cpu() {
    let ctx = gpu();
    for (out, inp, nbits, g, axis) in [
        (64, 128, 4, 64, 1),
        (40, 96, 2, 32, 0),
        (32, 256, 8, 128, 0),
    ] {
        let w = random_matrix(out, inp, 1.0);
        for iters in [1, 2, 3, 20] {
            let mut config = HqqConfig::new(nbits, g, axis);
            config.solver.iters = iters;
            let ours = quantize_to_host(ctx, &w, None, &config).unwrap();
            let cpu = HqqWeight::quantize(&w, None, &config).unwrap();
            let what = format!("{out}x{inp} b{nbits} g{g} ax{axis}, {iters} iterations");
            assert_zeros_close(&what, &ours.zero, &cpu.zero);
        }
    }
}

#[test]
fn gpu_resident_layer_matches_downloaded_weight() {
    let ctx = gpu();
    let w = random_matrix(48, 96, 0.5);
    let bias: Vec<f32> = (0..48).map(|i| i as f32 * 0.01).collect();
    for (nbits, axis, compute) in [
        (4, 1, ComputeDtype::F32),
        (3, 0, ComputeDtype::F16),
        (2, 1, ComputeDtype::BF16),
        (8, 0, ComputeDtype::F32),
    ] {
        let mut config = HqqConfig::new(nbits, 32, axis);
        config.compute_dtype = compute;
        let host = quantize_to_host(ctx, &w, Some(&bias), &config).unwrap();
        // Scale and zero in the compute dtype, codes computed in f32: as the CPU path.
        let mut f32_config = config;
        f32_config.compute_dtype = ComputeDtype::F32;
        let host_f32 = quantize_to_host(ctx, &w, Some(&bias), &f32_config).unwrap();
        assert_eq!(host.packed, host_f32.packed);
        for (a, b) in host.scale.iter().zip(&host_f32.scale) {
            assert_eq!(a.to_bits(), compute.round(*b).to_bits());
        }
        for (a, b) in host.zero.iter().zip(&host_f32.zero) {
            assert_eq!(a.to_bits(), compute.round(*b).to_bits());
        }
        let layer = quantize_on_gpu(ctx, &w, Some(&bias), &config).unwrap();
        let uploaded = GpuQuantWeight::from_hqq(ctx, &host).unwrap();
        let deq = layer.dequantize(ctx).unwrap();
        assert_eq!(
            bits(&deq.data),
            bits(&uploaded.dequantize(ctx).unwrap().data)
        );
        assert_eq!(bits(&deq.data), bits(&host.dequantize().data));
        let x = random_matrix(3, 96, 1.0);
        let xg = GpuTensor::upload(ctx, &x, ActDtype::F32).unwrap();
        let y = layer.forward(ctx, &xg).unwrap().download(ctx).unwrap();
        let y_ref = uploaded.forward(ctx, &xg).unwrap().download(ctx).unwrap();
        assert!(max_rel_error(&y.data, &y_ref.data) < 1e-6);
        // The GPU quantizer keeps scale and zero as f32; an upload stores values of an f16 /
        // bf16 compute dtype as halves, two to a word.
        let groups = host.scale.len();
        let halves_saved = match compute {
            ComputeDtype::F32 => 0,
            _ => 2 * 4 * (groups - groups.div_ceil(2)),
        };
        assert_eq!(
            layer.resident_bytes(),
            uploaded.resident_bytes() + halves_saved
        );
    }
}

#[test]
fn bad_input_is_refused() {
    let ctx = gpu();
    let good = random_matrix(8, 64, 1.0);
    let config = HqqConfig::new(4, 64, 1);
    let mut nan = good.clone();
    nan.data[77] = f32::NAN;
    let mut inf = good.clone();
    inf.data[3] = f32::NEG_INFINITY;
    for w in [&nan, &inf] {
        match quantize_on_gpu(ctx, w, None, &config) {
            Err(Error::NonFinite { name, .. }) => assert_eq!(name, "weight"),
            other => panic!("expected NonFinite, got {other:?}"),
        }
    }
    let bad_bias = [f32::NAN; 8];
    assert!(matches!(
        quantize_to_host(ctx, &good, Some(&bad_bias), &config),
        Err(Error::NonFinite { .. })
    ));
    assert!(matches!(
        quantize_to_host(ctx, &good, Some(&[0.0; 3]), &config),
        Err(Error::Shape { .. })
    ));
    // Group size not dividing the element count.
    let e = quantize_on_gpu(ctx, &good, None, &HqqConfig::new(4, 48, 1)).unwrap_err();
    assert!(e.to_string().contains("must divide"), "{e}");
    // Unsupported nbits.
    for nbits in [0, 7, 9, 16] {
        let e = quantize_on_gpu(ctx, &good, None, &HqqConfig::new(nbits, 64, 1)).unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");
    }
    // Grouped row count not packable: 4 groups of 64 (axis 1) cannot take 1-bit's 8 per byte.
    let small = random_matrix(4, 64, 1.0);
    let e = quantize_on_gpu(ctx, &small, None, &HqqConfig::new(1, 64, 1)).unwrap_err();
    assert!(e.to_string().contains("multiple of 8"), "{e}");
    let ok = quantize_on_gpu(ctx, &small, None, &HqqConfig::new(2, 64, 0)).is_ok();
    assert!(ok, "axis 0: 64 grouped rows pack into 2-bit");
    // Solver parameters.
    let mut bad = config;
    bad.solver.beta = 0.0;
    assert!(matches!(
        quantize_on_gpu(ctx, &good, None, &bad),
        Err(Error::Config(_))
    ));
    // Nothing is left half-done: a good call after the failures still matches the CPU.
    let mut rtn = config;
    rtn.optimize = false;
    let ours = quantize_to_host(ctx, &good, None, &rtn).unwrap();
    assert_eq!(
        ours.packed,
        HqqWeight::quantize(&good, None, &rtn).unwrap().packed
    );
}

#[test]
fn zero_iterations_and_constant_groups() {
    let ctx = gpu();
    // Constant groups (range 0: inv_scale 1) and a group of exact zeros.
    let mut data = vec![0.25f32; 64 * 4];
    data[64..128].iter_mut().for_each(|v| *v = 0.0);
    data[128..192]
        .iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = i as f32 * 1e-3 - 0.03);
    let w = Matrix::new(4, 64, data).unwrap();
    for iters in [0, 1, 20] {
        let mut config = HqqConfig::new(4, 64, 1);
        config.solver.iters = iters;
        let gpu = quantize_to_host(ctx, &w, None, &config).unwrap();
        let cpu = HqqWeight::quantize(&w, None, &config).unwrap();
        assert_eq!(bits(&gpu.scale), bits(&cpu.scale));
        if iters == 0 {
            assert_eq!(gpu.packed, cpu.packed);
            assert_eq!(bits(&gpu.zero), bits(&cpu.zero));
        }
        let e_gpu = rel_frobenius_error(&gpu.dequantize().data, &w.data);
        let e_cpu = rel_frobenius_error(&cpu.dequantize().data, &w.data);
        assert!(
            e_gpu <= e_cpu * 1.01 + 1e-7,
            "iters {iters}: {e_gpu} vs {e_cpu}"
        );
    }
}
