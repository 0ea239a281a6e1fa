//! The bench's yardstick kernels against their CPU twins, the suite at its tiny scale, and the
//! `quantadapt bench` command.

mod common;

use std::process::Command;

use approx::assert_relative_eq;
use common::{gpu, random_matrix};
use quantadapt::bench::{
    self, BARE_LAYER, DENSE_F16, Entry, FMA_PEAK, MERGE_UNMERGE, MIXED_MANY, MIXED_ONE, Plan,
    REQUANTIZE, Report, STREAM_READ, Scale, Timing, Verdict, lora_layer, oft_layer,
};
use quantadapt::gpu::timing::{Trials, time_runs};
use quantadapt::gpu::{ActDtype, GpuTensor};
use quantadapt::kernels::dense::{GpuDenseWeight, dense_f16_cpu};
use quantadapt::kernels::fma::{GpuFmaPeak, fma_peak_cpu};
use quantadapt::kernels::stream::{GpuStreamRead, stream_read_cpu};
use quantadapt::kernels::{Dispatch, GEMV_MAX_ROWS, MatmulPath};
use quantadapt::layer::Fusion;
use quantadapt::tensor::max_rel_error;
use quantadapt::{Error, Matrix};
use rand::Rng;

#[test]
fn stream_read_xor_matches_the_host() {
    let ctx = gpu();
    // 1037 vec4s leave most invocations idle; 2^21 + 12345 vec4s (about 34 MB) make every
    // invocation stride over several.
    for vec4s in [1037, (1 << 21) + 12345] {
        let mut rng = rand::rng();
        let words: Vec<u32> = (0..vec4s * 4).map(|_| rng.random()).collect();
        let stream = GpuStreamRead::upload(ctx, &words).unwrap();
        assert_eq!(stream.bytes(), words.len() * 4);
        Dispatch::submit_all(ctx, &[&stream.prepare(ctx).unwrap()]).unwrap();
        let ours = stream.read_xor(ctx).unwrap();
        assert_eq!(
            ours,
            stream_read_cpu(&words, stream.invocations()),
            "{vec4s}"
        );
        let host = words.iter().fold(0, |a, w| a ^ w);
        assert_eq!(ours.iter().fold(0, |a, w| a ^ w), host, "{vec4s}");
        assert!(ours.iter().any(|v| *v != 0));
    }
}

#[test]
fn stream_read_refuses_partial_vec4s() {
    for words in [&[][..], &[1, 2, 3][..]] {
        match GpuStreamRead::upload(gpu(), words) {
            Err(Error::Shape { name, .. }) => assert_eq!(name, "stream-read data"),
            other => panic!("{} words: {other:?}", words.len()),
        }
    }
}

#[test]
fn fma_peak_matches_the_cpu() {
    let ctx = gpu();
    // Not a multiple of the workgroup size, so the bounds check is exercised.
    let (invocations, steps) = (1000, 64);
    let fma = GpuFmaPeak::new(ctx, invocations, steps).unwrap();
    assert_eq!(fma.flops(), 2.0 * 16.0 * (invocations * steps) as f64);
    Dispatch::submit_all(ctx, &[&fma.prepare(ctx).unwrap()]).unwrap();
    let ours = fma.read_sums(ctx).unwrap();
    let reference = fma_peak_cpu(invocations, steps);
    // The shader's fma may round once or twice; the CPU's mul_add rounds once.
    let err = max_rel_error(&ours, &reference);
    assert!(err < 1e-5, "error {err}");
    assert!(matches!(
        GpuFmaPeak::new(ctx, 0, steps),
        Err(Error::Config(_))
    ));
}

#[test]
fn dense_f16_matches_the_cpu_on_both_paths() {
    // An odd K and one 4 past a whole chunk of 8 pad each row; K = 4096 loops over K many times.
    for ctx in common::reduction_contexts() {
        for (out, inp) in [(37, 71), (19, 1028), (70, 4096)] {
            let weight = random_matrix(out, inp, 0.5);
            let bias = random_matrix(1, out, 0.1).data;
            let dense = GpuDenseWeight::upload(ctx, &weight, Some(&bias)).unwrap();
            assert_eq!(
                dense.resident_bytes(),
                out * inp.next_multiple_of(8) * 2 + out * 4
            );
            // The tiled GEMM's 4 x 4 register blocks (M >= 64) at the small shapes only.
            let rows: &[usize] = if inp < 4096 {
                &[1, 3, 8, 9, 16, 20, 65]
            } else {
                &[1, 3, 8, 16, 20]
            };
            for &m in rows {
                let x = random_matrix(m, inp, 1.0);
                for act in common::act_dtypes(ctx) {
                    let mut xin = x.clone();
                    if act == ActDtype::F16 {
                        xin.round_to_f16();
                    }
                    let expected = dense_f16_cpu(&xin, &weight, Some(&bias)).unwrap();
                    let tol = if act == ActDtype::F32 { 1e-5 } else { 5e-3 };
                    let paths: &[MatmulPath] = if m <= GEMV_MAX_ROWS {
                        &[MatmulPath::Gemv, MatmulPath::Tiled]
                    } else {
                        &[MatmulPath::Tiled]
                    };
                    for &path in paths {
                        let xt = GpuTensor::upload(ctx, &xin, act).unwrap();
                        let y = dense.forward_with(ctx, &xt, path).unwrap();
                        let err = max_rel_error(&y.download(ctx).unwrap().data, &expected.data);
                        assert!(
                            err < tol,
                            "{}: {out}x{inp} m={m} {act:?} {path:?}: error {err}",
                            ctx.describe()
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn dense_f16_refuses_bad_shapes() {
    let ctx = gpu();
    let weight = random_matrix(8, 16, 0.5);
    assert!(matches!(
        GpuDenseWeight::upload(ctx, &weight, Some(&[0.0; 7])),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        GpuDenseWeight::upload(ctx, &Matrix::zeros(0, 16), None),
        Err(Error::Shape { .. })
    ));
    let dense = GpuDenseWeight::upload(ctx, &weight, None).unwrap();
    let x = GpuTensor::upload(ctx, &random_matrix(2, 15, 1.0), ActDtype::F32).unwrap();
    assert!(matches!(
        dense.forward_with(ctx, &x, MatmulPath::Tiled),
        Err(Error::Shape { .. })
    ));
    let rows = GEMV_MAX_ROWS + 1;
    let x = GpuTensor::upload(ctx, &random_matrix(rows, 16, 1.0), ActDtype::F32).unwrap();
    assert!(matches!(
        dense.forward_with(ctx, &x, MatmulPath::Gemv),
        Err(Error::Unsupported(_))
    ));
}

#[test]
fn timing_refuses_zero_runs_or_trials() {
    let none = Trials {
        warmup: 0,
        trials: 0,
    };
    let one = Trials {
        warmup: 0,
        trials: 1,
    };
    assert!(time_runs(gpu(), 0, one, |_, _| {}).is_err());
    assert!(time_runs(gpu(), 1, none, |_, _| {}).is_err());
}

fn find<'a>(report: &'a Report, name: &str, shape: (usize, usize), m: usize) -> &'a Entry {
    report
        .entries
        .iter()
        .find(|e| e.name == name && (e.out_features, e.in_features) == shape && e.m == m)
        .unwrap_or_else(|| panic!("no entry {name} {shape:?} M={m}"))
}

#[test]
fn tiny_suite_measures_every_item_with_ratios_from_the_same_run() {
    let ctx = gpu();
    let plan = Plan::new(Scale::Tiny);
    let mut reported = 0;
    let report = bench::run(ctx, &plan, "test", &mut |_| reported += 1).unwrap();
    assert_eq!(reported, report.entries.len());
    for e in &report.entries {
        assert!(
            e.us.is_finite() && e.us > 0.0,
            "{} M={}: {} us",
            e.name,
            e.m,
            e.us
        );
        for ratio in [
            e.pct_read_roofline,
            e.pct_fma_ceiling,
            e.speedup_vs_dense_f16,
            e.ratio_to_baseline,
        ]
        .into_iter()
        .flatten()
        {
            assert!(ratio.is_finite() && ratio > 0.0, "{}: {ratio}", e.name);
        }
    }

    let stream = find(&report, STREAM_READ, (0, 0), 0);
    let fma = find(&report, FMA_PEAK, (0, 0), 0);
    assert_eq!(stream.gb_per_s, Some(report.read_gb_per_s));
    assert_eq!(fma.gflop_per_s, Some(report.fma_gflop_per_s));

    let shape = plan.first_shape();
    for &m in &plan.rows {
        let dense = find(&report, DENSE_F16, shape, m);
        for name in bench::base_names() {
            let e = find(&report, name, shape, m);
            assert_eq!(e.timing, Timing::GpuTimestamps);
            assert_relative_eq!(e.speedup_vs_dense_f16.unwrap(), dense.us / e.us);
            let gbps = e.bytes / e.us / 1e3;
            assert_relative_eq!(e.gb_per_s.unwrap(), gbps);
            assert_relative_eq!(
                e.pct_read_roofline.unwrap(),
                100.0 * gbps / report.read_gb_per_s
            );
            let gflops = e.flops / e.us / 1e3;
            assert_relative_eq!(e.gflop_per_s.unwrap(), gflops);
            assert_relative_eq!(
                e.pct_fma_ceiling.unwrap(),
                100.0 * gflops / report.fma_gflop_per_s
            );
            assert!(e.resident_bytes > 0 && e.resident_bytes < dense.resident_bytes);
            let weights = (shape.0 * shape.1) as f64;
            assert_relative_eq!(
                e.bytes_per_weight.unwrap(),
                e.resident_bytes as f64 / weights
            );
        }
        // f16, rows padded to whole 16-byte chunks, and the bias.
        assert!(dense.bytes_per_weight.unwrap() >= 2.0);
    }
    assert_eq!(stream.bytes_per_weight, None);
    for &m in &plan.layer_rows {
        let bare = find(&report, BARE_LAYER, shape, m);
        assert_eq!(bare.ratio_to_baseline, None);
        // Unfused: a rotation before the matmul; a shrink and an expand after it.
        for (name, unfused_launches) in [(oft_layer as fn(Fusion) -> String, 2), (lora_layer, 3)] {
            let off = find(&report, &name(Fusion::Off), shape, m);
            assert_eq!(off.launches, unfused_launches, "{}", off.name);
            let auto = find(&report, &name(Fusion::Auto), shape, m);
            let always = find(&report, &name(Fusion::Always), shape, m);
            assert!(always.launches <= auto.launches && auto.launches <= off.launches);
            for e in [off, auto, always] {
                assert_relative_eq!(e.ratio_to_baseline.unwrap(), e.us / bare.us);
            }
        }
        let lora_fused = find(&report, &lora_layer(Fusion::Always), shape, m);
        assert_eq!(
            lora_fused.launches, 2,
            "the expand is the matmul's epilogue"
        );
    }
    let single = find(&report, &lora_layer(Fusion::Auto), shape, 16);
    for name in [MIXED_MANY, MIXED_ONE] {
        let e = find(&report, name, shape, 16);
        assert_relative_eq!(e.ratio_to_baseline.unwrap(), e.us / single.us);
    }
    for name in [REQUANTIZE, MERGE_UNMERGE] {
        assert_eq!(find(&report, name, shape, 0).timing, Timing::WallClock);
    }

    assert_eq!(report.targets.len(), 5, "{:?}", report.targets);
    for t in &report.targets {
        let judged = t.verdict != Verdict::NotJudged;
        assert_eq!(judged, !report.software_adapter, "{t:?}");
    }
    let table = report.table();
    for e in &report.entries {
        assert!(table.contains(&e.name), "{table}");
    }
    assert!(report.markdown().contains("| item | shape | M |"));

    let svg = std::env::temp_dir().join(format!("quantadapt-roofline-{}.svg", std::process::id()));
    bench::write_svg(&report, &svg).unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    assert!(text.contains("streaming read"), "the roof's legend");
    std::fs::remove_file(svg).unwrap();
}

#[test]
fn roofline_refuses_a_report_without_points() {
    let report = Report {
        device: "none".into(),
        software_adapter: true,
        date: "2026-11-23".into(),
        command: "test".into(),
        scale: Scale::Tiny,
        read_gb_per_s: 1.0,
        fma_gflop_per_s: 1.0,
        entries: Vec::new(),
        targets: Vec::new(),
    };
    let path = std::env::temp_dir().join(format!("quantadapt-empty-{}.svg", std::process::id()));
    assert!(matches!(
        bench::write_svg(&report, &path),
        Err(Error::Io { .. })
    ));
    assert!(!path.exists());
}

fn quantadapt(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_quantadapt"))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn bench_command_writes_json_svg_and_markdown() {
    let dir = std::env::temp_dir().join(format!("quantadapt-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, svg, md) = (dir.join("b.json"), dir.join("b.svg"), dir.join("b.md"));
    let (code, text) = quantadapt(&[
        "bench",
        "--scale",
        "tiny",
        "--json",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
        "--markdown",
        md.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("scale: tiny"), "{text}");
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(value["scale"], "tiny");
    assert!(value["command"].as_str().unwrap().contains("--scale tiny"));
    let entries = value["entries"].as_array().unwrap();
    assert!(entries.iter().any(|e| e["name"] == MIXED_MANY));
    assert!(entries.iter().all(|e| e["us"].as_f64().unwrap() > 0.0));
    assert!(value["read_gb_per_s"].as_f64().unwrap() > 0.0);
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    assert!(std::fs::read_to_string(&md).unwrap().contains("| target |"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bench_command_fails_with_a_message_on_an_unwritable_path() {
    let (code, text) = quantadapt(&[
        "bench",
        "--scale",
        "tiny",
        "--json",
        "/nonexistent/dir/bench.json",
    ]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("/nonexistent/dir/bench.json"), "{text}");
}
