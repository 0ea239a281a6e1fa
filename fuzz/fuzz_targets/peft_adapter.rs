//! A PEFT adapter directory: the layer's shape (u16 in, u16 out), `adapter_config.json`, then
//! `adapter_model.safetensors` (framed by `quantadapt_fuzz::parts`). A loaded adapter runs in a
//! CPU layer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quantadapt::adapters::Adapter;
use quantadapt::adapters::peft_dir::PeftAdapterDir;
use quantadapt::formats::QuantWeight;
use quantadapt::formats::eetq::EetqWeight;
use quantadapt::layer::{Backend, QuantLinear};
use quantadapt_fuzz::input;

/// Layers stay small: the shape only has to match the adapter's tensors.
const MAX_FEATURES: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let Some([shape, config, weights]) = quantadapt_fuzz::parts::<3>(data) else {
        return;
    };
    let Some([i0, i1, o0, o1]) = shape.first_chunk::<4>().copied() else {
        return;
    };
    let inp = u16::from_le_bytes([i0, i1]) as usize % MAX_FEATURES + 1;
    let out = u16::from_le_bytes([o0, o1]) as usize % MAX_FEATURES + 1;
    let Ok(peft) = PeftAdapterDir::from_bytes("adapter".into(), config, weights) else {
        return;
    };
    let Ok(adapter) = Adapter::from_peft("fuzz", &peft, None, inp, out) else {
        return;
    };
    let Ok(base) = EetqWeight::quantize(&input(out, inp)) else {
        return;
    };
    let Ok(mut layer) = QuantLinear::new(QuantWeight::Eetq(base), Backend::Cpu) else {
        return;
    };
    if layer.add_adapter(adapter).is_ok() && layer.set_active(&["fuzz"]).is_ok() {
        let _ = layer.forward(&input(2, inp));
    }
});
