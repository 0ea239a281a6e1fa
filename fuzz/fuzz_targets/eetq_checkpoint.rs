//! An EETQ checkpoint: one byte choosing the layout of the int8 codes (0 CUTLASS, 1 sm70,
//! 2 plain), `config.json`, then `model.safetensors` (framed by `quantadapt_fuzz::parts`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use quantadapt::formats::QuantWeight;
use quantadapt::formats::eetq::{EetqLayout, EetqWeight, check_config};
use quantadapt::io::TensorFile;

fuzz_target!(|data: &[u8]| {
    let Some([layout, config, weights]) = quantadapt_fuzz::parts::<3>(data) else {
        return;
    };
    if let Ok(json) = serde_json::from_slice(config) {
        let _ = check_config(&json, "config.json");
    }
    let Ok(file) = TensorFile::from_bytes(weights, "model.safetensors") else {
        return;
    };
    let layout = match layout.first() {
        Some(1) => EetqLayout::RowMajorOffsetSwizzled,
        Some(2) => EetqLayout::Plain,
        _ => EetqLayout::Cutlass,
    };
    let prefixes: Vec<String> = file
        .names_with_prefix("")
        .filter_map(|k| k.strip_suffix("weight_scales"))
        .map(str::to_string)
        .collect();
    for prefix in prefixes {
        if let Ok(w) = EetqWeight::from_tensors(&file, &prefix, layout) {
            quantadapt_fuzz::exercise(&QuantWeight::Eetq(w));
        }
    }
});
