//! The input file of `quantadapt run --input` (a safetensors file holding `x`), for a layer of
//! 1 to 256 inputs taken from the first byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quantadapt::io::TensorFile;

fuzz_target!(|data: &[u8]| {
    let Some((features, file)) = data.split_first() else {
        return;
    };
    if let Ok(file) = TensorFile::from_bytes(file, "input.safetensors") {
        let _ = file.input_matrix(*features as usize + 1);
    }
});
