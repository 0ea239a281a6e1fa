//! A GPTQ checkpoint: `quantize_config.json` then `model.safetensors` (framed by
//! `quantadapt_fuzz::parts`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use quantadapt::formats::QuantWeight;
use quantadapt::formats::gptq::GptqConfig;
use quantadapt::io::TensorFile;

fuzz_target!(|data: &[u8]| {
    let Some([config, weights]) = quantadapt_fuzz::parts::<2>(data) else {
        return;
    };
    let config = serde_json::from_slice(config)
        .map_err(|e| quantadapt::Error::Config(e.to_string()))
        .and_then(|json| GptqConfig::from_json(&json));
    let Ok(file) = TensorFile::from_bytes(weights, "model.safetensors") else {
        return;
    };
    if let Ok(w) = QuantWeight::from_file(&file, Some("gptq"), None, || config) {
        quantadapt_fuzz::exercise(&w);
    }
});
