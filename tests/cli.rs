//! The `quantadapt` command as users and checks call it.

mod common;

use std::process::Command;

use common::{golden_dir, golden_model_dir};
use quantadapt::io::{HostTensor, TensorFile};
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

/// A fresh, empty folder for one test.
fn scratch_dir(label: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("quantadapt-cli-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn arg(path: &std::path::Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn run_all_modules_writes_one_y_per_module() {
    let root = golden_model_dir();
    let case = root.join("llama_hqq3_g64_sharded");
    let run = TensorFile::open(case.join("runs/lora+rslora.safetensors")).unwrap();
    let dir = scratch_dir("all-modules");
    let mut input = TensorFile::default();
    for (name, t) in &run.tensors {
        if name.ends_with(".x") {
            input.insert(t.clone());
        }
    }
    assert_eq!(input.tensors.len(), 14);
    input.save(dir.join("x.safetensors")).unwrap();
    let (code, text) = quantadapt(&[
        "run",
        "--all-modules",
        "--base",
        arg(&case.join("checkpoint")),
        "--adapter",
        arg(&root.join("adapters/lora")),
        "--adapter",
        arg(&root.join("adapters/rslora")),
        "--input",
        arg(&dir.join("x.safetensors")),
        "--output",
        arg(&dir.join("y.safetensors")),
        "--backend",
        "cpu",
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("14 outputs"), "{text}");
    let ours = TensorFile::open(dir.join("y.safetensors")).unwrap();
    assert_eq!(ours.tensors.len(), 14);
    for (name, y) in &ours.tensors {
        let reference = run.get(name).unwrap();
        assert_eq!(y.shape, reference.shape, "{name}");
        let err = max_rel_error(&y.to_f32().unwrap(), &reference.to_f32().unwrap());
        assert!(err < 1e-5, "{name}: {err}");
    }
    // An input tensor that names no module is refused, naming it.
    let mut stray = input.clone();
    stray.insert(HostTensor::from_f32("model.layers.7.q.x", &[1], &[1.0]));
    stray.save(dir.join("stray.safetensors")).unwrap();
    let (code, text) = quantadapt(&[
        "run",
        "--all-modules",
        "--base",
        arg(&case.join("checkpoint")),
        "--input",
        arg(&dir.join("stray.safetensors")),
        "--output",
        arg(&dir.join("y2.safetensors")),
        "--backend",
        "cpu",
    ]);
    assert_ne!(code, 0);
    assert!(text.contains("model.layers.7.q.x"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn merge_writes_the_input_layout_and_refuses_what_it_cannot_merge() {
    let root = golden_model_dir();
    let base = root.join("llama_hqq4_g64/checkpoint");
    let dir = scratch_dir("merge");
    let out = dir.join("merged");
    let merge = |base: &std::path::Path, adapters: &[&str], out: &std::path::Path| {
        let mut args = vec![
            "merge",
            "--base",
            arg(base),
            "--out",
            arg(out),
            "--backend",
            "cpu",
        ];
        for a in adapters {
            args.extend(["--adapter", a]);
        }
        quantadapt(&args)
    };
    let lora = root.join("adapters/lora");
    let (code, text) = merge(&base, &[arg(&lora)], &out);
    assert_eq!(code, 0, "{text}");
    let last = text
        .lines()
        .find(|l| l.starts_with("merged 7 of 14 modules into"))
        .unwrap_or_else(|| panic!("no final line: {text}"));
    assert!(
        last.contains(" s:") && last.contains("bytes written"),
        "{text}"
    );
    let listing = |d: &std::path::Path| {
        let mut names: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(listing(&out), listing(&base));
    assert_eq!(
        std::fs::read(out.join("config.json")).unwrap(),
        std::fs::read(base.join("config.json")).unwrap()
    );
    // Nothing is left beside the output.
    assert_eq!(listing(&dir), ["merged"]);

    // An existing output is never overwritten.
    let (code, text) = merge(&base, &[arg(&lora)], &out);
    assert_ne!(code, 0);
    assert!(text.contains("exists"), "{text}");
    // The same adapter twice.
    let (code, text) = merge(&base, &[arg(&lora), arg(&lora)], &dir.join("twice"));
    assert_ne!(code, 0);
    assert!(text.contains("twice"), "{text}");
    // A GPTQ base: refused with the reason.
    let gptq = golden_dir().join("oft_gptq4_actorder_o96_i128");
    let (code, text) = merge(
        &gptq.join("checkpoint"),
        &[arg(&gptq.join("adapter"))],
        &dir.join("gptq"),
    );
    assert_ne!(code, 0);
    assert!(
        text.contains("GPTQ") && text.contains("forward-only"),
        "{text}"
    );
    assert_eq!(listing(&dir), ["merged"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A merge killed mid-way (right after its start, and after it reported a merged module) leaves
/// no output folder.
#[test]
fn an_interrupted_merge_leaves_no_output() {
    use std::io::BufRead;
    let root = golden_model_dir();
    let dir = scratch_dir("killed");
    let out = dir.join("merged");
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_quantadapt"))
            .args([
                "merge",
                "--base",
                arg(&root.join("llama_hqq3_g64_sharded/checkpoint")),
                "--adapter",
                arg(&root.join("adapters/oft")),
                "--adapter",
                arg(&root.join("adapters/lora_regex")),
                "--out",
                arg(&out),
                "--backend",
                "cpu",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut child = spawn();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.exists());

    let mut child = spawn();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        let done = line.starts_with("merged model.");
        seen.push(line);
        if done {
            break;
        }
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        seen.last().is_some_and(|l| l.contains("(1/14)")),
        "the merge reported no module: {seen:?}"
    );
    assert!(!status.success(), "the merge finished before it was killed");
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn inspect_lists_every_module_and_what_each_adapter_config_says() {
    let case = golden_model_dir().join("llama_hqq3_g64_sharded/checkpoint");
    let (code, text) = quantadapt(&[
        "inspect",
        case.join("checkpoint").to_str().unwrap(),
        "--adapter",
        golden_model_dir().join("adapters/lora").to_str().unwrap(),
        "--adapter",
        golden_model_dir().join("adapters/oft").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("model.safetensors.index.json (4 shards)"),
        "{text}"
    );
    assert!(text.contains("quantization: hqq 3-bit, group 64, axis 1; not quantized: lm_head"));
    for module in common::golden_model_modules("llama_hqq3_g64_sharded") {
        let row = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&module))
            .unwrap_or_else(|| panic!("no row for {module}: {text}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[1..4], ["hqq", "3", "64"], "{row}");
        let (out, inp) = match module.rsplit('.').next().unwrap() {
            "gate_proj" | "up_proj" => ("688", "256"),
            "down_proj" => ("256", "688"),
            _ => ("256", "256"),
        };
        assert_eq!(cells[4..7], [out, "x", inp], "{row}");
        assert!(cells[7].parse::<u64>().unwrap() > 0, "{row}");
    }
    assert!(text.contains("total: 14 modules (14 hqq)"), "{text}");
    assert!(
        text.contains("  peft_type: \"LORA\"\n  r: 8\n  lora_alpha: 16\n"),
        "{text}"
    );
    assert!(text.contains("  layers_to_transform: [1]"), "{text}");
    assert!(text.contains("  peft_type: \"OFT\""), "{text}");
    assert!(text.contains("  oft_block_size: 32"), "{text}");
    // What each adapter touches, as PEFT resolves it.
    assert!(text.contains("  touches 7 of 14 modules:"), "{text}");
    assert!(
        text.contains("    model.layers.1.mlp.down_proj: LoRA r 16, alpha 8, scaling 0.5"),
        "{text}"
    );
    assert!(text.contains("  touches 12 of 14 modules:"), "{text}");
    assert!(
        text.contains(
            "    model.layers.0.mlp.down_proj: OFT 16 blocks of 43, Cayley-Neumann 5 terms"
        ),
        "{text}"
    );

    let file = golden_model_dir().join("llama_hqq4_g64/checkpoint/model.safetensors");
    let (code, text) = quantadapt(&["inspect", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("hqq 4-bit, group 64"), "{text}");
    assert!(text.contains("total: 14 modules (14 hqq)"), "{text}");

    let (code, text) = quantadapt(&["inspect", golden_model_dir().to_str().unwrap()]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("needs model.safetensors or model.safetensors.index.json"),
        "{text}"
    );
}

/// `quantadapt run` on a golden model's module with the run's `x` (in its own shape), `module`
/// spelled as given: the y it wrote (its shape checked against PEFT's) and PEFT's y.
fn run_model_module(
    case: &str,
    base: &str,
    module: &str,
    spelling: &str,
    run: &str,
    adapter: Option<&str>,
    backend: &str,
) -> (HostTensor, Vec<f32>) {
    let case_dir = golden_model_dir().join(case);
    let tensors = TensorFile::open(case_dir.join(format!("runs/{run}.safetensors"))).unwrap();
    let x = tensors.get(&format!("{module}.x")).unwrap();
    let tag = format!("{case}-{run}-{}", std::process::id());
    let input = std::env::temp_dir().join(format!("quantadapt-cli-x-{tag}.safetensors"));
    let output = std::env::temp_dir().join(format!("quantadapt-cli-y-{tag}.safetensors"));
    let mut file = TensorFile::default();
    file.insert(HostTensor::from_raw(
        "x",
        x.dtype,
        &x.shape,
        x.bytes.clone(),
    ));
    file.save(&input).unwrap();
    let base = case_dir.join(base);
    let mut args = vec![
        "run",
        "--base",
        base.to_str().unwrap(),
        "--module",
        spelling,
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--backend",
        backend,
    ];
    let adapter_dir = adapter.map(|a| golden_model_dir().join("adapters").join(a));
    if let Some(dir) = &adapter_dir {
        args.extend(["--adapter", dir.to_str().unwrap()]);
    }
    let (code, text) = quantadapt(&args);
    std::fs::remove_file(&input).unwrap();
    assert_eq!(code, 0, "{case} {module}: {text}");
    let y = TensorFile::open(&output).unwrap().get("y").unwrap().clone();
    std::fs::remove_file(&output).unwrap();
    let expected = tensors.get(&format!("{module}.y")).unwrap();
    assert_eq!(y.shape, expected.shape, "y keeps x's leading dims");
    (y, expected.to_f32().unwrap())
}

#[test]
fn run_takes_model_folders_indexes_and_peft_module_names() {
    // A folder, the module with a trailing dot, x [3, in].
    let (y, expected) = run_model_module(
        "llama_hqq4_g64",
        "checkpoint",
        "model.layers.0.mlp.down_proj",
        "model.layers.0.mlp.down_proj.",
        "base",
        None,
        "cpu",
    );
    let err = max_rel_error(&y.to_f32().unwrap(), &expected);
    assert!(err < 1e-5, "{err}");
    // An index and its shards, PEFT's spelling, x [2, 3, in], an OFT adapter, on the GPU.
    let (y, expected) = run_model_module(
        "llama_hqq3_g64_sharded",
        "checkpoint/model.safetensors.index.json",
        "model.layers.1.self_attn.q_proj",
        "base_model.model.model.layers.1.self_attn.q_proj.",
        "oft_cayley",
        Some("oft_cayley"),
        "gpu",
    );
    assert_eq!(y.shape, [2, 3, 256]);
    let err = max_rel_error(&y.to_f32().unwrap(), &expected);
    assert!(err < 1e-4, "{err}");
}

#[test]
fn run_without_a_module_lists_names_that_can_be_pasted_back() {
    let folder = golden_model_dir().join("llama_hqq4_g64/checkpoint");
    let (code, text) = quantadapt(&[
        "run",
        "--base",
        folder.to_str().unwrap(),
        "--input",
        "unused.safetensors",
    ]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("14 quantized modules (model.layers.0.mlp.down_proj, "),
        "{text}"
    );
    assert!(text.contains("name one with --module"), "{text}");
    assert!(
        !text.contains("proj.,") && !text.contains("proj. "),
        "{text}"
    );
    let (code, text) = quantadapt(&[
        "run",
        "--base",
        folder.to_str().unwrap(),
        "--module",
        "model.layers.9.mlp.up_proj",
        "--input",
        "unused.safetensors",
    ]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("no quantized module `model.layers.9.mlp.up_proj`"),
        "{text}"
    );
    assert!(
        text.contains("model.layers.0.mlp.up_proj, model.layers.1.mlp.up_proj"),
        "{text}"
    );
}

#[test]
fn tune_writes_a_cache_that_the_next_command_loads() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("tune.json");
    let cache_arg = cache.to_str().unwrap();
    let (code, text) = quantadapt(&[
        "tune",
        "--cache",
        cache_arg,
        "--shapes",
        "64x256",
        "--rows",
        "1,3",
        "--formats",
        "hqq4,eetq",
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("hqq 4-bit g64 64x256 M=1 f32:"), "{text}");
    assert!(text.contains("eetq int8 64x256 M=3 f32:"), "{text}");
    assert!(text.contains("(4 entries for this adapter)"), "{text}");
    let written = quantadapt::tune::TuneCache::load(&cache).unwrap();
    assert_eq!(written.entries().len(), 4);

    let out = Command::new(env!("CARGO_BIN_EXE_quantadapt"))
        .arg("info")
        .env("QUANTADAPT_TUNE_CACHE", &cache)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("tuning: {cache_arg} (4 entries for this adapter)")),
        "{text}"
    );

    let model = golden_model_dir().join("llama_hqq3_g64_sharded/checkpoint");
    let (code, text) = quantadapt(&[
        "tune",
        "--cache",
        cache_arg,
        "--model",
        model.to_str().unwrap(),
        "--rows",
        "1",
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("model.layers.0.mlp.down_proj 256x688 M=1"),
        "{text}"
    );
    assert!(
        text.contains("model.layers.0.mlp.gate_proj 688x256 M=1"),
        "{text}"
    );
    let kernels = text.lines().filter(|l| l.contains(" M=1 f32: ")).count();
    assert!(kernels >= 2, "{text}");
    assert_eq!(
        quantadapt::tune::TuneCache::load(&cache)
            .unwrap()
            .entries()
            .len(),
        4 + kernels
    );

    std::fs::write(&cache, "not json").unwrap();
    let (code, text) = quantadapt(&[
        "tune", "--cache", cache_arg, "--shapes", "64x256", "--rows", "1",
    ]);
    assert_ne!(code, 0);
    assert!(text.contains("is not a tuning cache"), "{text}");
    assert_eq!(std::fs::read_to_string(&cache).unwrap(), "not json");
}
