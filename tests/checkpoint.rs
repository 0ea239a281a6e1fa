//! Checkpoints as `save_pretrained` writes them: a model folder, a single file, an index with
//! shards. Modules listed and loaded from the real tiny-Llama HQQ checkpoints, checked against
//! the single-file loader and against PEFT's base outputs; broken checkpoints refused clearly.

mod common;

use std::path::{Path, PathBuf};

use common::golden_model_dir;
use quantadapt::checkpoint::{Checkpoint, Format, INDEX_FILE, QuantizationConfig};
use quantadapt::formats::{QuantFormat, QuantWeight};
use quantadapt::io::TensorFile;
use quantadapt::tensor::{Matrix, max_rel_error};

fn case_dir(case: &str) -> PathBuf {
    golden_model_dir().join(case).join("checkpoint")
}

/// A fresh scratch folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "quantadapt-checkpoint-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// A copy of every file of `src`.
    fn copy_of(name: &str, src: &Path) -> Self {
        let scratch = Self::new(name);
        for entry in std::fs::read_dir(src).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, scratch.0.join(path.file_name().unwrap())).unwrap();
        }
        scratch
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open_error(path: &Path) -> String {
    Checkpoint::open(path).unwrap_err().to_string()
}

/// Checks the listing against the manifest and each module against PEFT's base output
/// (`runs/base.safetensors`: `<module>.x`, `<module>.y` of the unadapted model).
fn check_against_peft(checkpoint: &Checkpoint, case: &str, bits: u32) {
    let mut listed: Vec<String> = checkpoint
        .modules()
        .iter()
        .map(|m| m.name.clone())
        .collect();
    let layers: Vec<u32> = listed
        .iter()
        .map(|n| n.split('.').nth(2).unwrap().parse().unwrap())
        .collect();
    assert!(layers.is_sorted(), "{layers:?}");
    let mut expected = common::golden_model_modules(case);
    listed.sort();
    expected.sort();
    assert_eq!(listed, expected);
    let runs =
        TensorFile::open(golden_model_dir().join(case).join("runs/base.safetensors")).unwrap();
    for m in checkpoint.modules() {
        assert_eq!(m.format, Format::Hqq);
        assert_eq!((m.bits, m.group_size), (bits, Some(64)), "{}", m.name);
        assert!(!m.name.ends_with('.'));
        let weight = checkpoint.load_module(&m.name).unwrap();
        assert_eq!(
            (weight.in_features(), weight.out_features()),
            (m.in_features, m.out_features)
        );
        let stored: u64 = m
            .tensors
            .iter()
            .map(|t| checkpoint.locate(t).unwrap().1.len())
            .sum();
        assert_eq!(m.bytes, stored);
        assert!(m.bytes as usize >= weight.packed_bytes(), "{}", m.name);
        let x = runs.get(&format!("{}.x", m.name)).unwrap();
        let y = runs.get(&format!("{}.y", m.name)).unwrap();
        let rows = x.numel() / m.in_features;
        let x = Matrix::new(rows, m.in_features, x.to_f32().unwrap()).unwrap();
        let ours = weight.forward_cpu(&x).unwrap();
        let err = max_rel_error(&ours.data, &y.to_f32().unwrap());
        assert!(err < 1e-5, "{}: {err:.2e}", m.name);
    }
}

#[test]
fn single_file_and_folder_list_and_load_every_module() {
    let dir = case_dir("llama_hqq4_g64");
    let file = dir.join("model.safetensors");
    let from_file = Checkpoint::open(&file).unwrap();
    let from_folder = Checkpoint::open(&dir).unwrap();
    assert_eq!(from_file.modules(), from_folder.modules());
    assert!(from_folder.index().is_none());
    assert_eq!(from_folder.shards().len(), 1);
    match from_folder.quantization() {
        Some(QuantizationConfig::Hqq(c)) => {
            assert_eq!(c.skip_modules, ["lm_head"]);
            assert_eq!(c.weight_quant_params.map(|p| p.nbits), Some(4));
        }
        other => panic!("{other:?}"),
    }
    check_against_peft(&from_folder, "llama_hqq4_g64", 4);
    for m in from_folder.modules() {
        let ours = from_folder.load_module(&m.name).unwrap();
        let whole_file = QuantWeight::load_file(&file, None, Some(&m.name)).unwrap();
        assert_eq!(ours.dequantize(), whole_file.dequantize(), "{}", m.name);
        assert_eq!(ours.packed_bytes(), whole_file.packed_bytes());
    }
}

#[test]
fn index_and_four_shards_list_and_load_every_module() {
    let dir = case_dir("llama_hqq3_g64_sharded");
    let from_folder = Checkpoint::open(&dir).unwrap();
    let from_index = Checkpoint::open(dir.join(INDEX_FILE)).unwrap();
    assert_eq!(from_folder.modules(), from_index.modules());
    assert_eq!(from_folder.shards().len(), 4);
    check_against_peft(&from_folder, "llama_hqq3_g64_sharded", 3);

    // Every tensor of every shard, gathered into one in-memory file: the single-file loader
    // must agree with the shard-by-shard reads.
    let mut whole = TensorFile::default();
    for shard in from_folder.shards() {
        for (name, t) in TensorFile::open(shard.path()).unwrap().tensors {
            whole.tensors.insert(name, t);
        }
    }
    let spans_shards = from_folder.modules().iter().any(|m| {
        let shards: std::collections::BTreeSet<_> = m
            .tensors
            .iter()
            .map(|t| from_folder.locate(t).unwrap().0.path())
            .collect();
        shards.len() > 1
    });
    assert!(spans_shards, "the case should split a module across shards");
    for m in from_folder.modules() {
        let ours = from_folder.load_module(&m.name).unwrap();
        let reference = QuantWeight::from_file(&whole, Some("hqq"), Some(&m.name), || {
            unreachable!("HQQ needs no GPTQ config")
        })
        .unwrap();
        assert_eq!(ours.dequantize(), reference.dequantize(), "{}", m.name);
    }
}

#[test]
fn raw_access_gives_each_tensor_where_the_index_says() {
    let dir = case_dir("llama_hqq3_g64_sharded");
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let index = checkpoint.index().unwrap();
    let mut total = 0;
    let mut count = 0;
    for shard in checkpoint.shards() {
        assert_eq!(
            shard.metadata().get("format").map(String::as_str),
            Some("pt")
        );
        let bytes = std::fs::read(shard.path()).unwrap();
        for entry in shard.tensors() {
            assert_eq!(index.weight_map[&entry.name], shard.file_name());
            let (located, same) = checkpoint.locate(&entry.name).unwrap();
            assert_eq!((located.path(), same), (shard.path(), entry));
            let range = entry.range.start as usize..entry.range.end as usize;
            assert_eq!(shard.read_bytes(&entry.name).unwrap(), bytes[range]);
            total += entry.len();
            count += 1;
        }
    }
    assert_eq!(count, index.weight_map.len());
    assert_eq!(index.metadata["total_size"], total);
    assert!(checkpoint.locate("model.nonexistent").is_none());
    let e = checkpoint.read_tensor("model.nonexistent").unwrap_err();
    assert!(e.to_string().contains("`model.nonexistent`"), "{e}");
}

#[test]
fn module_names_as_peft_or_the_checkpoint_writes_them() {
    let checkpoint = Checkpoint::open(case_dir("llama_hqq4_g64")).unwrap();
    let name = "model.layers.1.mlp.down_proj";
    let reference = checkpoint.load_module(name).unwrap().dequantize();
    for spelling in [
        "model.layers.1.mlp.down_proj.",
        "base_model.model.model.layers.1.mlp.down_proj",
        "base_model.model.model.layers.1.mlp.down_proj.",
    ] {
        assert_eq!(checkpoint.module(spelling).unwrap().name, name);
        let w = checkpoint.load_module(spelling).unwrap();
        assert_eq!(w.dequantize(), reference, "{spelling}");
    }
    let e = checkpoint
        .load_module("model.layers.7.mlp.down_proj")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no quantized module `model.layers.7.mlp.down_proj`"),
        "{e}"
    );
    assert!(
        e.contains("model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj"),
        "{e}"
    );
    assert!(e.contains("(14 in all)"), "{e}");
    assert!(
        !e.contains("proj."),
        "names listed without trailing dots: {e}"
    );
    let e = checkpoint.module("lm_head").unwrap_err().to_string();
    assert!(e.contains("model.layers.0.mlp.down_proj, "), "{e}");
}

#[test]
fn broken_index_and_missing_shard_are_named() {
    let src = case_dir("llama_hqq3_g64_sharded");
    let scratch = Scratch::copy_of("index", &src);
    let index_path = scratch.0.join(INDEX_FILE);
    let original = std::fs::read_to_string(&index_path).unwrap();

    std::fs::write(&index_path, &original[..original.len() / 2]).unwrap();
    let e = open_error(&scratch.0);
    assert!(
        e.contains(INDEX_FILE) && e.contains("not valid JSON"),
        "{e}"
    );

    std::fs::write(&index_path, r#"{"metadata": {}}"#).unwrap();
    assert!(open_error(&scratch.0).contains("no `weight_map`"));

    let moved = original.replacen(
        r#""model.layers.0.mlp.down_proj.W_q": "model-00002-of-00004.safetensors""#,
        r#""model.layers.0.mlp.down_proj.W_q": "model-00001-of-00004.safetensors""#,
        1,
    );
    assert_ne!(moved, original);
    std::fs::write(&index_path, &moved).unwrap();
    let e = open_error(&scratch.0);
    assert!(
        e.contains("`model.layers.0.mlp.down_proj.W_q`") && e.contains("model-0000"),
        "{e}"
    );

    let escaping = original.replace("model-00004-of-00004.safetensors", "../x.safetensors");
    std::fs::write(&index_path, &escaping).unwrap();
    assert!(open_error(&scratch.0).contains("`../x.safetensors` is not a file name"));

    std::fs::write(&index_path, &original).unwrap();
    assert!(Checkpoint::open(&scratch.0).is_ok());
    std::fs::remove_file(scratch.0.join("model-00003-of-00004.safetensors")).unwrap();
    let e = open_error(&scratch.0);
    assert!(
        e.contains("shard `model-00003-of-00004.safetensors` is missing"),
        "{e}"
    );
}

/// The 4-bit checkpoint's file with its header rewritten by `edit`, same data bytes.
fn with_header(scratch: &Scratch, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let bytes = std::fs::read(case_dir("llama_hqq4_g64").join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    let path = scratch.0.join("model.safetensors");
    std::fs::write(&path, out).unwrap();
    path
}

#[test]
fn bad_headers_name_the_file_and_the_tensor() {
    let scratch = Scratch::new("header");
    let w_q = "model.layers.0.self_attn.q_proj.W_q";
    let path = with_header(&scratch, |h| {
        let end = h[w_q]["data_offsets"][1].as_u64().unwrap();
        h[w_q]["data_offsets"] = serde_json::json!([end + 1_000_000, end + 1_032_768]);
    });
    let e = open_error(&path);
    assert!(e.contains(&path.display().to_string()), "{e}");
    assert!(
        e.contains(&format!("tensor `{w_q}`")) && e.contains("outside"),
        "{e}"
    );

    let path = with_header(&scratch, |h| {
        h[w_q]["shape"] = serde_json::json!([512, 65]);
    });
    let e = open_error(&path);
    assert!(
        e.contains(&format!("tensor `{w_q}`: U8 [512, 65] needs")),
        "{e}"
    );

    let path = with_header(&scratch, |_| {});
    assert!(Checkpoint::open(&path).is_ok());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let e = open_error(&path);
    assert!(e.contains("outside"), "{e}");

    let mut past_the_end = 1000u64.to_le_bytes().to_vec();
    past_the_end.extend_from_slice(b"{}");
    std::fs::write(&path, past_the_end).unwrap();
    assert!(open_error(&path).contains("runs past the end"));
    assert!(open_error(&scratch.0.join("absent.safetensors")).contains("absent.safetensors"));
    let e = open_error(&std::env::temp_dir().join(format!("qa-empty-{}", std::process::id())));
    assert!(e.contains("no such file or folder"), "{e}");
    std::fs::remove_file(&path).unwrap();
    let e = open_error(&scratch.0);
    assert!(
        e.contains("needs model.safetensors or model.safetensors.index.json"),
        "{e}"
    );
}

#[test]
fn config_decides_the_format_and_gptq_needs_one() {
    let gptq_case = common::golden_dir().join("oft_gptq4_actorder_o96_i128/checkpoint");
    let with_config = Checkpoint::open(&gptq_case).unwrap();
    let [m] = with_config.modules() else {
        panic!("{:?}", with_config.modules())
    };
    assert_eq!(
        (m.format, m.bits, m.group_size),
        (Format::Gptq, 4, Some(64))
    );
    assert_eq!((m.in_features, m.out_features), (128, 96));
    let reference = QuantWeight::load_file(&gptq_case.join("model.safetensors"), None, None)
        .unwrap()
        .dequantize();
    assert_eq!(
        with_config.load_module(&m.name).unwrap().dequantize(),
        reference
    );

    let scratch = Scratch::new("config");
    std::fs::copy(
        gptq_case.join("model.safetensors"),
        scratch.0.join("model.safetensors"),
    )
    .unwrap();
    let e = open_error(&scratch.0);
    assert!(
        e.contains("neither quantize_config.json nor config.json"),
        "{e}"
    );

    // An HQQ file needs no config: its tensors say the format.
    let hqq = case_dir("llama_hqq4_g64").join("model.safetensors");
    std::fs::copy(&hqq, scratch.0.join("model.safetensors")).unwrap();
    let bare = Checkpoint::open(&scratch.0).unwrap();
    assert!(bare.quantization().is_none() && bare.config_json().is_none());
    assert_eq!(bare.modules().len(), 14);

    let config = |text: &str| std::fs::write(scratch.0.join("config.json"), text).unwrap();
    config(r#"{"quantization_config": {"quant_method": "eetq", "weights": "int8"}}"#);
    let e = open_error(&scratch.0);
    assert!(
        e.contains("says eetq, but module `model.layers.0.mlp.down_proj` holds hqq"),
        "{e}"
    );
    config(r#"{"quantization_config": {"quant_method": "bitsandbytes"}}"#);
    assert!(open_error(&scratch.0).contains("quant_method `bitsandbytes`"));
    config("{ not json");
    assert!(open_error(&scratch.0).contains("config.json: not valid JSON"));
}
