//! Peak host memory of loading one module of a checkpoint, counted by dhat's allocator: about
//! that module's bytes, not the file's. A test binary of its own, since the allocator is global.

mod common;

use common::hqq_module_tensors;
use quantadapt::checkpoint::Checkpoint;
use quantadapt::formats::hqq::{HqqConfig, HqqWeight};
use quantadapt::formats::{QuantFormat, QuantWeight};
use quantadapt::io::{HostTensor, TensorFile};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

#[test]
fn loading_one_module_costs_that_module_not_the_file() {
    let dir = std::env::temp_dir().join(format!("quantadapt-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");

    // 16 modules of 1024 x 2048, 4-bit, group 64 (1.3 MB each) and a 8 MB embedding: ~29 MB.
    let config = HqqConfig {
        optimize: false,
        ..HqqConfig::new(4, 64, 1)
    };
    let dense = common::random_matrix(1024, 2048, 0.05);
    let source = HqqWeight::quantize(&dense, None, &config).unwrap();
    let mut file = TensorFile::default();
    let embedding = common::random_matrix(4096, 512, 1.0);
    file.insert(HostTensor::from_f32(
        "model.embed_tokens.weight",
        &[4096, 512],
        &embedding.data,
    ));
    for layer in 0..4 {
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            let prefix = format!("model.layers.{layer}.self_attn.{proj}.");
            hqq_module_tensors(&prefix, &source)
                .into_iter()
                .for_each(|t| file.insert(t));
        }
    }
    file.save(&path).unwrap();
    drop(file);
    let file_bytes = std::fs::metadata(&path).unwrap().len();

    let checkpoint = Checkpoint::open(&dir).unwrap();
    assert_eq!(checkpoint.modules().len(), 16);
    let name = "model.layers.2.self_attn.v_proj";
    let module_bytes = checkpoint.module(name).unwrap().bytes;

    let profiler = dhat::Profiler::builder().testing().build();
    let loaded = checkpoint.load_module(name).unwrap();
    let stats = dhat::HeapStats::get();
    drop(profiler);

    println!(
        "file {file_bytes} B, module {module_bytes} B, peak heap while loading {} B ({:.2}x the \
         module), {} B kept",
        stats.max_bytes,
        stats.max_bytes as f64 / module_bytes as f64,
        stats.curr_bytes
    );
    assert!(file_bytes > 20 * module_bytes, "the file dwarfs the module");
    // The tensors as read, and the weight built from them (the packed codes copied, scale and
    // zero widened to f32): at most twice the module, plus small change.
    assert!(
        stats.max_bytes as u64 <= 2 * module_bytes + 64 * 1024,
        "peak {} B for a {module_bytes}-byte module",
        stats.max_bytes
    );
    let QuantWeight::Hqq(loaded) = loaded else {
        panic!("an HQQ module")
    };
    assert_eq!(loaded.packed, source.packed);
    assert_eq!(loaded.dequantize(), source.dequantize());
    std::fs::remove_dir_all(&dir).unwrap();
}
