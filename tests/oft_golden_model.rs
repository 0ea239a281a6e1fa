//! The OFT adapters PEFT made for the whole-model golden set (tests/data/golden-model): `oft`
//! (Cayley-Neumann, 5 terms, blocks of 32, and 43 on `down_proj`) and `oft_cayley` (exact Cayley
//! with COFT, blocks of 64, and 172 on `down_proj`), on every module they target in the HQQ 4-bit
//! checkpoint, with the rotation blocks built on the GPU, against PEFT's outputs (and the CPU
//! reference on the same inputs).

mod common;

use std::path::PathBuf;

use common::gpu;
use quantadapt::adapters::Adapter;
use quantadapt::formats::{QuantFormat, QuantWeight};
use quantadapt::io::TensorFile;
use quantadapt::layer::{Backend, QuantLinear};
use quantadapt::tensor::{Matrix, max_rel_error};

const CASE: &str = "llama_hqq4_g64";

fn golden_model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden-model")
}

/// The modules PEFT wrapped with `adapter` in the case, in model order.
fn targets(adapter: &str) -> Vec<String> {
    common::golden_model_case(CASE)["targets"][adapter]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect()
}

/// A run's tensor as `[rows, cols]` (the leading dims of x and y flattened).
fn run_matrix(run: &TensorFile, name: &str, cols: usize) -> Matrix {
    let data = run.get(name).unwrap().to_f32().unwrap();
    Matrix::new(data.len() / cols, cols, data).unwrap()
}

fn layer(module: &str, adapter: &str, backend: Backend) -> QuantLinear {
    let case = golden_model_dir().join(CASE);
    let base = QuantWeight::load_file(
        &case.join("checkpoint/model.safetensors"),
        None,
        Some(module),
    )
    .unwrap();
    let (inp, out) = (base.in_features(), base.out_features());
    let oft = Adapter::from_peft_dir(
        adapter,
        &golden_model_dir().join("adapters").join(adapter),
        Some(module),
        inp,
        out,
    )
    .unwrap();
    let mut layer = QuantLinear::new(base, backend).unwrap();
    layer.add_adapter(oft).unwrap();
    layer.set_active(&[adapter]).unwrap();
    layer
}

/// Every targeted module's forward against PEFT's `y`: below 1e-4 relative on the GPU, 1e-5 on
/// the CPU (`golden-model/README.md`).
fn matches_peft(adapter: &str) {
    let run =
        TensorFile::open(golden_model_dir().join(format!("{CASE}/runs/{adapter}.safetensors")))
            .unwrap();
    let modules = targets(adapter);
    assert!(modules.iter().any(|m| m.ends_with("down_proj")));
    for module in &modules {
        let gpu_layer = layer(module, adapter, Backend::Gpu(Box::new(gpu().clone())));
        let cpu_layer = layer(module, adapter, Backend::Cpu);
        let Some(Adapter::Oft(oft)) = gpu_layer.adapter(adapter) else {
            panic!("{module}: `{adapter}` is not an OFT adapter");
        };
        let b = oft.block_size();
        let (inp, out) = (oft.in_features(), gpu_layer.base().out_features());
        let x = run_matrix(&run, &format!("{module}.x"), inp);
        let y = run_matrix(&run, &format!("{module}.y"), out);
        let gpu_err = max_rel_error(&gpu_layer.forward(&x).unwrap().data, &y.data);
        let cpu_err = max_rel_error(&cpu_layer.forward(&x).unwrap().data, &y.data);
        println!("{adapter} {module} (blocks of {b}): GPU {gpu_err:.2e}, CPU {cpu_err:.2e}");
        assert!(gpu_err < 1e-4, "{adapter} {module} b={b}: GPU {gpu_err}");
        assert!(cpu_err < 1e-5, "{adapter} {module} b={b}: CPU {cpu_err}");
    }
}

#[test]
fn peft_cayley_neumann_adapter_in_blocks_of_32_and_43() {
    matches_peft("oft");
}

#[test]
fn peft_exact_cayley_coft_adapter_in_blocks_of_64_and_172() {
    matches_peft("oft_cayley");
}
