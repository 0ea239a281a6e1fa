//! `quantadapt merge`'s writer on the sharded 3-bit golden model, on the CPU: a module whose
//! tensors straddle two shards, every file and tensor of the input in the output, only the
//! re-quantized tensors changed, and the merged modules close to the adapter's forward.

mod common;

use common::golden_model_dir;
use quantadapt::checkpoint::Checkpoint;
use quantadapt::formats::QuantFormat;
use quantadapt::layer::Backend;
use quantadapt::merge::{MergeEvent, merge_model};
use quantadapt::model::{Activations, Model};
use quantadapt::tensor::max_rel_error;

#[test]
fn merging_into_a_sharded_model_rewrites_only_the_requantized_tensors() {
    let root = golden_model_dir();
    let base = root.join("llama_hqq3_g64_sharded/checkpoint");
    let adapter = root.join("adapters/lora_regex");
    let scratch = std::env::temp_dir().join(format!("quantadapt-merge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let out = scratch.join("merged");
    let mut events = Vec::new();
    let summary = merge_model(
        &base,
        std::slice::from_ref(&adapter),
        &out,
        &Backend::Cpu,
        &mut |e| events.push(e),
    )
    .unwrap();
    assert_eq!(
        (summary.merged, summary.modules, summary.files),
        (14, 14, 4)
    );
    let merged_events = events
        .iter()
        .filter(|e| matches!(e, MergeEvent::Merged { .. }))
        .count();
    assert_eq!(
        merged_events, 14,
        "each module merged once, straddling or not"
    );

    let input = Checkpoint::open(&base).unwrap();
    let output = Checkpoint::open(&out).unwrap();
    let straddling = "model.layers.0.mlp.down_proj";
    let shards_of = |c: &Checkpoint| {
        let mut files: Vec<String> = c
            .module(straddling)
            .unwrap()
            .tensors
            .iter()
            .map(|t| c.locate(t).unwrap().0.file_name())
            .collect();
        files.sort();
        files.dedup();
        files
    };
    assert_eq!(
        shards_of(&input).len(),
        2,
        "the golden model has a straddling module"
    );
    assert_eq!(shards_of(&input), shards_of(&output));
    let mut written_bytes = 0;
    for (a, b) in input.shards().iter().zip(output.shards()) {
        assert_eq!(a.file_name(), b.file_name());
        assert_eq!(a.metadata(), b.metadata());
        let names: Vec<&str> = a.tensors().iter().map(|t| t.name.as_str()).collect();
        let names_out: Vec<&str> = b.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, names_out);
        for t in a.tensors() {
            let (x, y) = (
                a.read_tensor(&t.name).unwrap(),
                b.read_tensor(&t.name).unwrap(),
            );
            assert_eq!((x.dtype, &x.shape), (y.dtype, &y.shape), "{}", t.name);
            let leaf = t.name.rsplit('.').next().unwrap();
            let requantized = ["W_q", "scale", "zero"].contains(&leaf);
            if !requantized {
                assert_eq!(x.bytes, y.bytes, "{} copied byte for byte", t.name);
            } else if leaf == "W_q" {
                assert_ne!(x.bytes, y.bytes, "{} re-quantized", t.name);
            }
        }
        written_bytes += std::fs::metadata(b.path()).unwrap().len();
    }
    for file in [
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
    ] {
        let (a, b) = (base.join(file), out.join(file));
        assert_eq!(
            std::fs::read(a).unwrap(),
            std::fs::read(&b).unwrap(),
            "{file}"
        );
        written_bytes += std::fs::metadata(b).unwrap().len();
    }
    assert_eq!(summary.bytes, written_bytes);

    // The merged model against the adapter run unmerged: 3-bit re-quantization error only.
    let mut unmerged = Model::open(&base, Backend::Cpu).unwrap();
    unmerged.add_adapter_dir("a", &adapter).unwrap();
    unmerged.set_active(&["a"]).unwrap();
    let merged = Model::open(&out, Backend::Cpu).unwrap();
    for module in merged.module_names() {
        let features = merged.module(module).unwrap().base().in_features();
        let x = Activations::new(
            vec![2, features],
            (0..2 * features)
                .map(|i| ((i * 7919 % 199) as f32 - 99.0) / 50.0)
                .collect(),
        )
        .unwrap();
        let (ours, reference) = (
            merged.forward(module, &x).unwrap(),
            unmerged.forward(module, &x).unwrap(),
        );
        let err = max_rel_error(&ours.data, &reference.data);
        assert!(err > 0.0 && err < 0.5, "{module}: {err}");
    }
    std::fs::remove_dir_all(&scratch).unwrap();
}
