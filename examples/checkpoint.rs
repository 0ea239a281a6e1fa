//! Loads a quantized model folder as transformers + HQQ save it and a PEFT adapter folder as
//! PEFT saves it, runs one module with the adapter on the best adapter (or the CPU), and checks
//! the result against PEFT's own output for the same input.
//!
//! `cargo run --example checkpoint [MODEL_DIR ADAPTER_DIR RUN_FILE MODULE]`, by default on the
//! tiny Llama of `tests/data/golden-model` with its OFT adapter.

use std::path::PathBuf;

use quantadapt::gpu::GpuContext;
use quantadapt::io::TensorFile;
use quantadapt::layer::Backend;
use quantadapt::model::{Activations, Model};
use quantadapt::tensor::max_rel_error;
use quantadapt::{Error, Result};

fn main() -> Result<()> {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden-model");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model_dir, adapter_dir, run_file, module) = match args.as_slice() {
        [m, a, r, name] => (m.into(), a.into(), r.into(), name.clone()),
        [] => (
            data.join("llama_hqq4_g64/checkpoint"),
            data.join("adapters/oft"),
            data.join("llama_hqq4_g64/runs/oft.safetensors"),
            "model.layers.1.mlp.down_proj".to_string(),
        ),
        _ => {
            return Err(Error::Config(
                "usage: checkpoint [MODEL_DIR ADAPTER_DIR RUN_FILE MODULE]".into(),
            ));
        }
    };
    let backend = match GpuContext::new() {
        Ok(ctx) => {
            println!("GPU: {}", ctx.describe());
            Backend::Gpu(Box::new(ctx))
        }
        Err(e) => {
            println!("no GPU ({e}); running on the CPU");
            Backend::Cpu
        }
    };
    let mut model = Model::open(&model_dir, backend)?;
    let targets = model.add_adapter_dir("oft", &adapter_dir)?.targets.len();
    println!(
        "{} modules; the adapter targets {targets} of them",
        model.module_names().len()
    );
    model.set_active(&["oft"])?;

    let run = TensorFile::open(&run_file)?;
    let x = Activations::from_host(run.get(&format!("{module}.x"))?)?;
    let expected = Activations::from_host(run.get(&format!("{module}.y"))?)?;
    let y = model.forward(&module, &x)?;
    let err = max_rel_error(&y.data, &expected.data);
    println!("{module}: x {:?} -> y {:?}", x.shape, y.shape);
    println!("max relative error against PEFT: {err:.2e}");
    if err > 1e-4 {
        return Err(Error::Gpu(format!(
            "the output disagrees with PEFT's: {err}"
        )));
    }
    Ok(())
}
