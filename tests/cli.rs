//! The `quantadapt` command as users and checks call it.

mod common;

use std::process::Command;

use common::golden_dir;
use quantadapt::io::TensorFile;
use quantadapt::tensor::max_rel_error;

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
fn run_reproduces_peft_on_golden_checkpoints() {
    for (case, backend) in [
        ("oft_hqq_o96_i128_b4_v1", "gpu"),
        ("oft_gptq4_actorder_o96_i128", "cpu"),
        ("oft_eetq_o96_i128", "gpu"),
    ] {
        let dir = golden_dir().join(case);
        let output = std::env::temp_dir().join(format!(
            "quantadapt-cli-{case}-{}.safetensors",
            std::process::id()
        ));
        let (code, text) = quantadapt(&[
            "run",
            "--base",
            dir.join("checkpoint/model.safetensors").to_str().unwrap(),
            "--adapter",
            dir.join("adapter").to_str().unwrap(),
            "--input",
            dir.join("tensors.safetensors").to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--backend",
            backend,
        ]);
        assert_eq!(code, 0, "{case}: {text}");
        let y = TensorFile::open(&output)
            .unwrap()
            .get("y")
            .unwrap()
            .to_f32()
            .unwrap();
        let reference = TensorFile::open(dir.join("tensors.safetensors"))
            .unwrap()
            .get("y")
            .unwrap()
            .to_f32()
            .unwrap();
        let err = max_rel_error(&y, &reference);
        assert!(err < 1e-4, "{case}: {err}");
        std::fs::remove_file(output).unwrap();
    }
}

#[test]
fn bad_inputs_exit_1_with_a_message() {
    let (code, text) = quantadapt(&[
        "run",
        "--base",
        "/nonexistent/model.safetensors",
        "--input",
        "x",
    ]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("/nonexistent/model.safetensors"), "{text}");
    let junk = std::env::temp_dir().join(format!(
        "quantadapt-junk-{}.safetensors",
        std::process::id()
    ));
    std::fs::write(&junk, b"not a safetensors file at all").unwrap();
    let (code, text) = quantadapt(&[
        "run",
        "--base",
        junk.to_str().unwrap(),
        "--input",
        junk.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("safetensors"), "{text}");
    std::fs::remove_file(junk).unwrap();
}

#[test]
fn verify_golden_reports_broken_cases_and_counts() {
    let dir = std::env::temp_dir().join(format!("quantadapt-golden-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = golden_dir().join("hqq_quant_o40_i96_b4_ax1_g32");
    let case_dir = dir.join("hqq_quant_o40_i96_b4_ax1_g32");
    std::fs::create_dir_all(&case_dir).unwrap();
    std::fs::copy(
        src.join("tensors.safetensors"),
        case_dir.join("tensors.safetensors"),
    )
    .unwrap();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden_dir().join("manifest.json")).unwrap())
            .unwrap();
    let good = manifest["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "hqq_quant_o40_i96_b4_ax1_g32")
        .unwrap()
        .clone();
    let mut missing = good.clone();
    missing["name"] = "missing_case".into();
    let cases = serde_json::json!({ "cases": [good, missing] });
    std::fs::write(dir.join("manifest.json"), cases.to_string()).unwrap();
    let (code, text) = quantadapt(&["verify-golden", dir.to_str().unwrap(), "--backend", "cpu"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("FAIL missing_case [cpu]"), "{text}");
    assert_eq!(
        text.lines().rfind(|l| !l.contains("XDG")).unwrap(),
        "1 passed, 1 failed"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bench_takes_its_shapes_and_rows_from_the_command_line() {
    let json = std::env::temp_dir().join(format!("quantadapt-bench-{}.json", std::process::id()));
    let (code, text) = quantadapt(&[
        "bench",
        "--scale",
        "tiny",
        "--shapes",
        "40x64",
        "--rows",
        "1,3",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).unwrap();
    let base_items: Vec<(u64, u64, u64)> = report["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["group"] == "base")
        .map(|e| {
            let dim = |k: &str| e[k].as_u64().unwrap();
            (dim("out_features"), dim("in_features"), dim("m"))
        })
        .collect();
    assert!(!base_items.is_empty());
    for (out, inp, m) in base_items {
        assert_eq!((out, inp), (40, 64));
        assert!(m == 1 || m == 3, "m = {m}");
    }
    for bad in ["40by64", "0x64", "40x"] {
        let (code, text) = quantadapt(&["bench", "--shapes", bad]);
        assert_ne!(code, 0, "{bad}");
        assert!(text.contains(bad), "{bad}: {text}");
    }
    let (code, _) = quantadapt(&["bench", "--rows", "0"]);
    assert_ne!(code, 0);
}
