//! An HQQ checkpoint (`model.safetensors`), loaded as `quantadapt run --format hqq` loads it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quantadapt::formats::QuantWeight;
use quantadapt::io::TensorFile;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = TensorFile::from_bytes(data, "model.safetensors") else {
        return;
    };
    let no_gptq = || Err(quantadapt::Error::Config("not GPTQ".into()));
    if let Ok(w) = QuantWeight::from_file(&file, Some("hqq"), None, no_gptq) {
        quantadapt_fuzz::exercise(&w);
    }
});
