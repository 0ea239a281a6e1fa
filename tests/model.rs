//! The model-level handle on the whole-model golden set (a tiny Llama quantized by transformers +
//! HQQ, PEFT 0.21.2 adapter folders), on the CPU: adapter resolution as PEFT wraps modules,
//! name spellings, leading shapes, the model-wide switches and the refusals.

mod common;

use std::path::{Path, PathBuf};

use common::golden_model_dir;
use quantadapt::adapters::Adapter;
use quantadapt::adapters::peft_dir::PeftAdapterDir;
use quantadapt::formats::QuantFormat;
use quantadapt::io::TensorFile;
use quantadapt::layer::Backend;
use quantadapt::model::{Activations, Model};
use quantadapt::tensor::max_rel_error;
use serde_json::Value;

const ADAPTERS: [&str; 6] = ["oft", "oft_cayley", "lora", "lora_regex", "dora", "rslora"];
const CASES: [&str; 2] = ["llama_hqq4_g64", "llama_hqq3_g64_sharded"];

fn manifest_case(name: &str) -> Value {
    let text = std::fs::read_to_string(golden_model_dir().join("manifest.json")).unwrap();
    let manifest: Value = serde_json::from_str(&text).unwrap();
    manifest["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone()
}

/// A manifest list of module names, sorted (the model lists modules in the checkpoint's order).
fn sorted(list: &Value) -> Vec<&str> {
    let mut names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    names.sort();
    names
}

fn adapter_dir(name: &str) -> PathBuf {
    golden_model_dir().join("adapters").join(name)
}

fn open(case: &str) -> Model {
    let dir = golden_model_dir().join(case).join("checkpoint");
    Model::open(&dir, Backend::Cpu).unwrap()
}

fn run_file(case: &str, run: &str) -> TensorFile {
    TensorFile::open(
        golden_model_dir()
            .join(case)
            .join("runs")
            .join(format!("{run}.safetensors")),
    )
    .unwrap()
}

fn x_of(file: &TensorFile, module: &str) -> Activations {
    Activations::from_host(file.get(&format!("{module}.x")).unwrap()).unwrap()
}

fn y_of(file: &TensorFile, module: &str) -> Vec<f32> {
    file.get(&format!("{module}.y")).unwrap().to_f32().unwrap()
}

#[test]
fn targets_are_the_modules_peft_wrapped_for_every_adapter_and_model() {
    for case in CASES {
        let spec = manifest_case(case);
        let mut model = open(case);
        let mut ours: Vec<&str> = model.module_names().iter().map(String::as_str).collect();
        ours.sort();
        assert_eq!(ours, sorted(&spec["modules"]), "{case}");
        for name in ADAPTERS {
            let adapter = model.add_adapter_dir(name, &adapter_dir(name)).unwrap();
            let mut ours: Vec<&str> = adapter.targets.iter().map(|(m, _)| m.as_str()).collect();
            ours.sort();
            let peft = sorted(&spec["targets"][name]);
            assert!(!peft.is_empty());
            assert_eq!(ours, peft, "{case}: adapter {name}");
        }
    }
}

/// The settings PEFT applies per module: pattern keys (plain and regex) and OFT's adjusted block.
#[test]
fn per_module_settings_follow_peft() {
    let model_dir = golden_model_dir().join("llama_hqq4_g64/checkpoint");
    let mut model = Model::open(&model_dir, Backend::Cpu).unwrap();
    for name in ["oft", "lora", "lora_regex", "rslora"] {
        model.add_adapter_dir(name, &adapter_dir(name)).unwrap();
    }
    let lora =
        |adapter: &str, module: &str| match model.module(module).unwrap().adapter(adapter).unwrap()
        {
            Adapter::Lora(l) => (l.rank(), l.scaling()),
            Adapter::Oft(_) => panic!("{adapter} on {module} is OFT"),
        };
    // lora: rank_pattern {"q_proj": 4, "model.layers.1.mlp.down_proj": 16},
    // alpha_pattern {"v_proj": 32, "down_proj": 8}, r 8, alpha 16.
    assert_eq!(lora("lora", "model.layers.1.self_attn.q_proj"), (4, 4.0));
    assert_eq!(lora("lora", "model.layers.1.mlp.down_proj"), (16, 0.5));
    assert_eq!(lora("lora", "model.layers.1.self_attn.v_proj"), (8, 4.0));
    assert_eq!(lora("lora", "model.layers.1.self_attn.k_proj"), (8, 2.0));
    // lora_regex: rank {"^model.layers.0.self_attn.q_proj": 4, "layers\\.1\\.mlp\\..*": 2},
    // alpha {"layers\\.1\\..*proj": 4}.
    assert_eq!(
        lora("lora_regex", "model.layers.0.self_attn.q_proj"),
        (4, 4.0)
    );
    assert_eq!(
        lora("lora_regex", "model.layers.1.self_attn.q_proj"),
        (8, 0.5)
    );
    assert_eq!(lora("lora_regex", "model.layers.1.mlp.up_proj"), (2, 2.0));
    assert_eq!(lora("lora_regex", "model.layers.0.mlp.up_proj"), (8, 2.0));
    // rslora: alpha / sqrt(r) = 8 / 4.
    assert_eq!(lora("rslora", "model.layers.0.mlp.down_proj"), (16, 2.0));
    match model
        .module("model.layers.0.mlp.down_proj")
        .unwrap()
        .adapter("oft")
    {
        Some(Adapter::Oft(oft)) => assert_eq!((oft.block_size(), oft.n_blocks()), (43, 16)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn forward_runs_every_module_with_any_leading_shape_and_name_spelling() {
    let case = "llama_hqq4_g64";
    let mut model = open(case);
    model.add_adapter_dir("oft", &adapter_dir("oft")).unwrap();
    model.set_active(&["oft"]).unwrap();
    let run = run_file(case, "oft");
    let base = run_file(case, "base");
    for module in model.module_names().to_vec() {
        let x = x_of(&run, &module);
        assert_eq!(x.shape.len(), 3, "the oft run has [2, 3, in] inputs");
        let y = model.forward(&module, &x).unwrap();
        assert_eq!(y.shape[..2], x.shape[..2]);
        assert!(
            max_rel_error(&y.data, &y_of(&run, &module)) < 1e-5,
            "{module}"
        );
        // The same module by PEFT's spelling and with a trailing dot.
        for spelling in [format!("base_model.model.{module}"), format!("{module}.")] {
            assert_eq!(model.forward(&spelling, &x).unwrap(), y);
        }
    }
    // k_proj is not targeted: the base output, as PEFT gives it.
    let k = "model.layers.0.self_attn.k_proj";
    let y = model.forward(k, &x_of(&run, k)).unwrap();
    assert_eq!(
        y.data,
        model
            .module(k)
            .unwrap()
            .forward(&flat(&x_of(&run, k)))
            .unwrap()
            .data
    );
    // A targeted module's output moved away from the base (the check is not vacuous).
    let q = "model.layers.0.self_attn.q_proj";
    let moved = model.forward(q, &x_of(&base, q)).unwrap();
    assert!(max_rel_error(&moved.data, &y_of(&base, q)) > 1e-2);
    // Wrong feature count, unknown module.
    let bad = Activations::new(vec![2, 7], vec![0.5; 14]).unwrap();
    let err = model.forward(q, &bad).unwrap_err().to_string();
    assert!(err.contains(q) && err.contains("256"), "{err}");
    let err = model
        .forward("model.layers.9.self_attn.q_proj", &x_of(&run, q))
        .unwrap_err()
        .to_string();
    assert!(err.contains("layers.9"), "{err}");
}

fn flat(x: &Activations) -> quantadapt::Matrix {
    quantadapt::Matrix::new(x.rows(), x.features(), x.data.clone()).unwrap()
}

#[test]
fn model_wide_switches() {
    let case = "llama_hqq4_g64";
    let mut model = open(case);
    model.add_adapter_dir("lora", &adapter_dir("lora")).unwrap();
    model
        .add_adapter_dir("rslora", &adapter_dir("rslora"))
        .unwrap();
    let both = run_file(case, "lora+rslora");
    let lora = run_file(case, "lora");
    let base = run_file(case, "base");
    let check = |model: &Model, file: &TensorFile, x_file: &TensorFile, what: &str| {
        for module in model.module_names() {
            let y = model.forward(module, &x_of(x_file, module)).unwrap();
            let err = max_rel_error(&y.data, &y_of(file, module));
            assert!(err < 1e-5, "{what}: {module}: {err}");
        }
    };
    model.set_active(&["lora", "rslora"]).unwrap();
    check(&model, &both, &both, "both active");
    model.set_enabled(false).unwrap();
    check(&model, &base, &base, "disabled");
    model.set_enabled(true).unwrap();
    model.set_active(&["lora"]).unwrap();
    check(&model, &lora, &lora, "lora");

    // Mixed batch: rows of lora, rslora and the base, each equal to its single-adapter run.
    let module = "model.layers.1.mlp.down_proj";
    let x = x_of(&lora, module);
    let names = ["lora", "rslora", "__base__"];
    let y = model.forward_mixed(module, &x, &names).unwrap();
    let (features, inputs) = (y.features(), x.features());
    for (row, name) in names.iter().enumerate() {
        let active: &[&str] = match *name {
            "__base__" => &[],
            _ => std::slice::from_ref(name),
        };
        model.set_active(active).unwrap();
        let x_row = x.data[row * inputs..][..inputs].to_vec();
        let expected = model
            .forward(module, &Activations::new(vec![1, inputs], x_row).unwrap())
            .unwrap();
        let got = &y.data[row * features..][..features];
        assert!(
            max_rel_error(got, &expected.data) < 1e-5,
            "mixed row {row} ({name})"
        );
    }
    let err = model
        .forward_mixed(module, &x, &["lora", "nope", "lora"])
        .unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");

    // Merge model-wide, then unmerge exactly.
    model.set_active(&["lora"]).unwrap();
    let before: Vec<Vec<f32>> = model
        .module_names()
        .iter()
        .map(|m| model.forward(m, &x_of(&lora, m)).unwrap().data)
        .collect();
    model.merge(&["lora"], true).unwrap();
    assert_eq!(model.merged_adapters(), ["lora"]);
    for (m, unmerged) in model.module_names().iter().zip(&before) {
        let y = model.forward(m, &x_of(&lora, m)).unwrap();
        // Re-quantizing costs about 10 % at 4 bits on the targeted modules; the others are exact.
        let err = max_rel_error(&y.data, unmerged);
        match m.contains("layers.1.") {
            true => assert!(err > 0.0 && err < 0.3, "merged {m}: {err}"),
            false => assert_eq!(err, 0.0, "untouched {m}"),
        }
    }
    assert!(model.remove_adapter("lora").is_err());
    model.unmerge_all().unwrap();
    for (m, unmerged) in model.module_names().iter().zip(&before) {
        assert_eq!(&model.forward(m, &x_of(&lora, m)).unwrap().data, unmerged);
    }
    model.remove_adapter("lora").unwrap();
    assert!(model.adapter("lora").is_none());
    assert_eq!(model.active_adapters(), [] as [&str; 0]);
    check(&model, &base, &base, "after removal");
}

/// OFT and a LoRA-family adapter active on one module: `base(x · R) + LoRA(x)`.
#[test]
fn stacked_oft_and_lora_rotate_the_input_and_add_on_the_output() {
    let case = "llama_hqq4_g64";
    let mut model = open(case);
    model.add_adapter_dir("oft", &adapter_dir("oft")).unwrap();
    model
        .add_adapter_dir("rslora", &adapter_dir("rslora"))
        .unwrap();
    model.set_active(&["oft", "rslora"]).unwrap();
    let module = "model.layers.0.self_attn.q_proj";
    let x = x_of(&run_file(case, "base"), module);
    let y = model.forward(module, &x).unwrap();
    let layer = model.module(module).unwrap();
    let (Some(Adapter::Oft(oft)), Some(Adapter::Lora(lora))) =
        (layer.adapter("oft"), layer.adapter("rslora"))
    else {
        panic!("both adapters sit on {module}");
    };
    let xm = flat(&x);
    let mut expected = layer
        .base()
        .forward_cpu(&oft.rotate_cpu(&xm).unwrap())
        .unwrap();
    let weight = layer.base().dequantize();
    lora.apply_cpu(&xm, &mut expected, layer.base().bias(), &weight)
        .unwrap();
    assert!(max_rel_error(&y.data, &expected.data) < 1e-6);
}

/// Copies a golden adapter folder with some config keys replaced (and its tensors filtered).
fn edited_adapter(name: &str, label: &str, edit: Value, keep: impl Fn(&str) -> bool) -> PathBuf {
    let src = adapter_dir(name);
    let dst = std::env::temp_dir().join(format!("quantadapt-model-{}-{label}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    for (k, v) in edit.as_object().unwrap() {
        config[k] = v.clone();
    }
    std::fs::write(dst.join("adapter_config.json"), config.to_string()).unwrap();
    let mut tensors = TensorFile::open(src.join("adapter_model.safetensors")).unwrap();
    tensors.tensors.retain(|k, _| keep(k));
    tensors.save(dst.join("adapter_model.safetensors")).unwrap();
    dst
}

fn refusal(model: &mut Model, dir: &Path, hints: &[&str]) {
    let before = model.adapters().len();
    let err = model.add_adapter_dir("bad", dir).unwrap_err().to_string();
    for hint in hints {
        assert!(err.contains(hint), "error lacks `{hint}`: {err}");
    }
    assert_eq!(model.adapters().len(), before, "nothing attached");
    for m in model.module_names() {
        assert!(model.module(m).unwrap().adapter("bad").is_none());
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn what_cannot_be_applied_is_refused_naming_the_key() {
    let mut model = open("llama_hqq4_g64");
    model.add_adapter_dir("oft", &adapter_dir("oft")).unwrap();
    // The same folder twice, under any name.
    let err = model
        .add_adapter_dir("again", &adapter_dir("oft").join("."))
        .unwrap_err()
        .to_string();
    assert!(err.contains("already attached as `oft`"), "{err}");
    refusal(
        &mut model,
        &edited_adapter(
            "lora",
            "mts",
            serde_json::json!({"modules_to_save": ["lm_head"]}),
            |_| true,
        ),
        &["modules_to_save"],
    );
    refusal(
        &mut model,
        &edited_adapter("lora", "bias", serde_json::json!({"bias": "all"}), |_| true),
        &["bias"],
    );
    // A targeted module whose tensors are missing.
    refusal(
        &mut model,
        &edited_adapter("lora", "missing", serde_json::json!({}), |k| {
            !k.contains("layers.1.mlp.up_proj")
        }),
        &["bad", "model.layers.1.mlp.up_proj", "no tensors"],
    );
    // Tensors for a module the config does not select.
    refusal(
        &mut model,
        &edited_adapter(
            "lora",
            "extra",
            serde_json::json!({"exclude_modules": ["k_proj"]}),
            |_| true,
        ),
        &["bad", "model.layers.1.self_attn.k_proj", "do not select"],
    );
    refusal(
        &mut model,
        &edited_adapter(
            "lora",
            "str",
            serde_json::json!({"target_modules": ".*proj"}),
            |_| true,
        ),
        &["layers_to_transform", "target_modules"],
    );
    refusal(
        &mut model,
        &edited_adapter(
            "lora",
            "lookaround",
            serde_json::json!({"rank_pattern": {"(?<!x)q_proj": 2}}),
            |_| true,
        ),
        &["rank_pattern", "(?<!x)q_proj"],
    );
    assert!(model.add_adapter_dir("oft", &adapter_dir("lora")).is_err());
    assert_eq!(model.adapters().len(), 1);
}

#[test]
fn adapter_folders_resolve_against_module_lists() {
    let peft = PeftAdapterDir::open(adapter_dir("rslora")).unwrap();
    let modules = [
        ("model.layers.0.self_attn.q_proj", 256),
        ("model.layers.0.mlp.down_proj", 688),
    ];
    let err = peft
        .resolve_targets(modules.iter().copied())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a quantized module"), "{err}");
}

#[test]
fn activations_that_do_not_hold_their_shape_are_errors() {
    assert!(Activations::new(vec![2, 3], vec![1.0; 5]).is_err());
    assert!(Activations::new(vec![], vec![]).is_err());
    let model = open("llama_hqq4_g64");
    let q = "model.layers.0.self_attn.q_proj";
    for (shape, rows) in [(vec![], 0), (vec![2, 256], 2)] {
        let x = Activations {
            shape,
            data: vec![0.5; 256],
        };
        assert_eq!(x.rows(), rows);
        let err = model.forward(q, &x).unwrap_err().to_string();
        assert!(err.contains("256 values"), "{err}");
    }
}
