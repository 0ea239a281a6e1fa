//! quantadapt in a browser: golden cases (HQQ 4-bit and GPTQ 4-bit layers with PEFT's OFT and
//! LoRA / DoRA, f32) embedded in the test binary run through [`QuantLinear`] on the browser's
//! WebGPU with the async API, checked against the CPU reference and the outputs PEFT recorded;
//! and layers on fresh random inputs against the CPU reference. Outputs are poisoned first.
//! Runs in headless Chromium through wasm-bindgen-test (`.ci/browser/run`); a browser without a
//! WebGPU adapter fails the suite.

#![cfg(target_arch = "wasm32")]

use std::path::PathBuf;

use quantadapt::Error;
use quantadapt::adapters::Adapter;
use quantadapt::adapters::lora::LoraAdapter;
use quantadapt::adapters::oft::{OftAdapter, Parameterization};
use quantadapt::adapters::peft_dir::PeftAdapterDir;
use quantadapt::formats::gptq::{GptqConfig, GptqWeight, GptqZeros};
use quantadapt::formats::hqq::{HqqConfig, HqqWeight};
use quantadapt::formats::{QuantFormat, QuantWeight};
use quantadapt::gpu::GpuContext;
use quantadapt::io::TensorFile;
use quantadapt::layer::{Backend, QuantLinear};
use quantadapt::tensor::{Matrix, max_rel_error};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use wasm_bindgen_test::{console_log, wasm_bindgen_test, wasm_bindgen_test_configure};

wasm_bindgen_test_configure!(run_in_browser);

/// The golden README's tolerances for f32 forward outputs: `max |ours - y| / max |y|`.
const CPU_TOLERANCE: f64 = 1e-5;
const GPU_TOLERANCE: f64 = 1e-4;

const MANIFEST: &str = include_str!("data/golden/manifest.json");

/// The bytes of `tests/data/golden/<case>/<file>`, embedded in the test binary.
macro_rules! golden {
    ($case:literal, $file:expr) => {
        include_bytes!(concat!("data/golden/", $case, "/", $file)).as_slice()
    };
}

/// A PEFT adapter directory's two files, embedded.
struct AdapterFiles {
    name: &'static str,
    config: &'static [u8],
    weights: &'static [u8],
}

macro_rules! adapter {
    ($case:literal, $name:literal, $dir:literal) => {
        AdapterFiles {
            name: $name,
            config: golden!($case, concat!($dir, "/adapter_config.json")),
            weights: golden!($case, concat!($dir, "/adapter_model.safetensors")),
        }
    };
}

/// A golden layer case: its recorded tensors, the base layer's checkpoint and its adapters.
struct Case {
    name: &'static str,
    tensors: &'static [u8],
    checkpoint: &'static [u8],
    /// GPTQ's `quantize_config.json`; `None` for HQQ, whose checkpoint holds its own meta.
    gptq_config: Option<&'static [u8]>,
    adapters: Vec<AdapterFiles>,
}

/// One forward to check: the active adapters (none: the adapters disabled) and the tensor PEFT
/// recorded for it.
struct Run {
    active: &'static [&'static str],
    expected: &'static str,
}

const OFT_RUNS: &[Run] = &[
    Run {
        active: &["default"],
        expected: "y",
    },
    Run {
        active: &[],
        expected: "y_disabled",
    },
];

const LORA_RUNS: &[Run] = &[
    Run {
        active: &["a"],
        expected: "y_a",
    },
    Run {
        active: &["b"],
        expected: "y_b",
    },
    Run {
        active: &[],
        expected: "y_disabled",
    },
];

/// The manifest's entry for `name`.
fn spec(name: &str) -> Value {
    let manifest: Value = serde_json::from_str(MANIFEST).expect("manifest.json parses");
    manifest["cases"]
        .as_array()
        .expect("manifest has cases")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not in the manifest"))
        .clone()
}

impl Case {
    /// The base layer, read from its checkpoint by the library's loaders.
    fn base(&self, spec: &Value) -> QuantWeight {
        let label = format!("{}/checkpoint/model.safetensors", self.name);
        let file = TensorFile::from_bytes(self.checkpoint, &label).unwrap();
        let prefix = format!(
            "{}.",
            spec["module"].as_str().expect("case names its module")
        );
        match self.gptq_config {
            None => QuantWeight::Hqq(HqqWeight::from_tensors(&file, &prefix).unwrap()),
            Some(json) => {
                let config = GptqConfig::from_json(&serde_json::from_slice(json).unwrap());
                let weight = GptqWeight::from_tensors(&file, &prefix, config.unwrap());
                QuantWeight::Gptq(weight.unwrap())
            }
        }
    }

    fn adapters(&self, inp: usize, out: usize) -> Vec<Adapter> {
        self.adapters
            .iter()
            .map(|files| {
                let dir = PathBuf::from(format!("{}/adapter/{}", self.name, files.name));
                let peft = PeftAdapterDir::from_bytes(dir, files.config, files.weights).unwrap();
                Adapter::from_peft(files.name, &peft, None, inp, out).unwrap()
            })
            .collect()
    }
}

/// The browser's WebGPU device, poisoning outputs; no adapter fails the test.
async fn gpu() -> GpuContext {
    let ctx = GpuContext::new_async()
        .await
        .unwrap_or_else(|e| panic!("no WebGPU device: {e}"));
    assert_eq!(
        ctx.info.backend,
        wgpu::Backend::BrowserWebGpu,
        "{}",
        ctx.describe()
    );
    ctx.set_debug_poison(true);
    console_log!("WebGPU adapter: {}", ctx.describe());
    ctx
}

fn within(what: &str, ours: &Matrix, reference: &[f32], tolerance: f64) {
    let err = max_rel_error(&ours.data, reference);
    assert!(
        err < tolerance,
        "{what}: max relative error {err:.3e} over the tolerance {tolerance:.0e}"
    );
}

/// A GPU layer and its CPU twin of `base` with `adapters`, added with the async API.
async fn layers(ctx: &GpuContext, base: QuantWeight, adapters: Vec<Adapter>) -> [QuantLinear; 2] {
    let gpu_backend = Backend::Gpu(Box::new(ctx.clone()));
    let mut gpu = QuantLinear::new(base.clone(), gpu_backend).unwrap();
    let mut cpu = QuantLinear::new(base, Backend::Cpu).unwrap();
    for adapter in adapters {
        gpu.add_adapter_async(adapter.clone()).await.unwrap();
        cpu.add_adapter(adapter).unwrap();
    }
    [gpu, cpu]
}

/// Every run of `case` on WebGPU and the CPU, each against PEFT's output and the GPU against the
/// CPU.
async fn check(case: Case, runs: &[Run]) {
    let ctx = gpu().await;
    let spec = spec(case.name);
    let tensors = TensorFile::from_bytes(case.tensors, case.name).unwrap();
    let recorded = |name: &str| tensors.get(name).unwrap().to_f32().unwrap();
    let x = tensors.get("x").unwrap();
    let x = Matrix::new(x.shape[0], x.shape[1], x.to_f32().unwrap()).unwrap();
    let base = case.base(&spec);
    let adapters = case.adapters(base.in_features(), base.out_features());
    let [mut gpu, mut cpu] = layers(&ctx, base, adapters).await;
    for run in runs {
        for layer in [&mut gpu, &mut cpu] {
            layer.set_enabled(!run.active.is_empty()).unwrap();
            layer.set_active(run.active).unwrap();
        }
        let on_gpu = gpu.forward_async(&x).await.unwrap();
        let on_cpu = cpu.forward(&x).unwrap();
        let what = |on: &str| format!("{} {} on {on}", case.name, run.expected);
        within(
            &what("the CPU"),
            &on_cpu,
            &recorded(run.expected),
            CPU_TOLERANCE,
        );
        within(
            &what("WebGPU"),
            &on_gpu,
            &recorded(run.expected),
            GPU_TOLERANCE,
        );
        within(
            &what("WebGPU vs the CPU"),
            &on_gpu,
            &on_cpu.data,
            GPU_TOLERANCE,
        );
        console_log!("{} {}: passed", case.name, run.expected);
    }
}

#[wasm_bindgen_test]
async fn hqq4_oft_cayley() {
    let case = Case {
        name: "oft_hqq_o96_i128_b4_v1",
        tensors: golden!("oft_hqq_o96_i128_b4_v1", "tensors.safetensors"),
        checkpoint: golden!("oft_hqq_o96_i128_b4_v1", "checkpoint/model.safetensors"),
        gptq_config: None,
        adapters: vec![adapter!("oft_hqq_o96_i128_b4_v1", "default", "adapter")],
    };
    check(case, OFT_RUNS).await;
}

#[wasm_bindgen_test]
async fn hqq4_oft_coft_cayley_neumann() {
    let case = Case {
        name: "oft_hqq_o96_i128_b4_v3",
        tensors: golden!("oft_hqq_o96_i128_b4_v3", "tensors.safetensors"),
        checkpoint: golden!("oft_hqq_o96_i128_b4_v3", "checkpoint/model.safetensors"),
        gptq_config: None,
        adapters: vec![adapter!("oft_hqq_o96_i128_b4_v3", "default", "adapter")],
    };
    check(case, OFT_RUNS).await;
}

#[wasm_bindgen_test]
async fn hqq4_lora() {
    let case = Case {
        name: "lora_hqq_o96_i128_b4_v1",
        tensors: golden!("lora_hqq_o96_i128_b4_v1", "tensors.safetensors"),
        checkpoint: golden!("lora_hqq_o96_i128_b4_v1", "checkpoint/model.safetensors"),
        gptq_config: None,
        adapters: vec![
            adapter!("lora_hqq_o96_i128_b4_v1", "a", "adapter/a"),
            adapter!("lora_hqq_o96_i128_b4_v1", "b", "adapter/b"),
        ],
    };
    check(case, LORA_RUNS).await;
}

#[wasm_bindgen_test]
async fn hqq4_dora() {
    let case = Case {
        name: "lora_hqq_o96_i128_b4_v3",
        tensors: golden!("lora_hqq_o96_i128_b4_v3", "tensors.safetensors"),
        checkpoint: golden!("lora_hqq_o96_i128_b4_v3", "checkpoint/model.safetensors"),
        gptq_config: None,
        adapters: vec![
            adapter!("lora_hqq_o96_i128_b4_v3", "a", "adapter/a"),
            adapter!("lora_hqq_o96_i128_b4_v3", "b", "adapter/b"),
        ],
    };
    check(case, LORA_RUNS).await;
}

#[wasm_bindgen_test]
async fn gptq4_oft_cayley() {
    let case = Case {
        name: "oft_gptq4_o96_i128",
        tensors: golden!("oft_gptq4_o96_i128", "tensors.safetensors"),
        checkpoint: golden!("oft_gptq4_o96_i128", "checkpoint/model.safetensors"),
        gptq_config: Some(golden!(
            "oft_gptq4_o96_i128",
            "checkpoint/quantize_config.json"
        )),
        adapters: vec![adapter!("oft_gptq4_o96_i128", "default", "adapter")],
    };
    check(case, OFT_RUNS).await;
}

#[wasm_bindgen_test]
async fn gptq4_act_order_oft_cayley_neumann() {
    let case = Case {
        name: "oft_gptq4_actorder_o96_i128",
        tensors: golden!("oft_gptq4_actorder_o96_i128", "tensors.safetensors"),
        checkpoint: golden!(
            "oft_gptq4_actorder_o96_i128",
            "checkpoint/model.safetensors"
        ),
        gptq_config: Some(golden!(
            "oft_gptq4_actorder_o96_i128",
            "checkpoint/quantize_config.json"
        )),
        adapters: vec![adapter!(
            "oft_gptq4_actorder_o96_i128",
            "default",
            "adapter"
        )],
    };
    check(case, OFT_RUNS).await;
}

/// Uniform values in `[-scale, scale)`.
fn random_matrix(rng: &mut SmallRng, rows: usize, cols: usize, scale: f32) -> Matrix {
    let data = (0..rows * cols)
        .map(|_| rng.random_range(-scale..scale))
        .collect();
    Matrix::new(rows, cols, data).unwrap()
}

/// HQQ 4-bit and GPTQ 4-bit layers of 1024 inputs with an OFT rotation (blocks of 32, about
/// PEFT's N(0, 0.1) init) and a LoRA, both active, on fresh inputs: WebGPU against the CPU.
#[wasm_bindgen_test]
async fn fresh_layers_match_the_cpu() {
    const IN: usize = 1024;
    const OUT: usize = 192;
    const B: usize = 32;
    let ctx = gpu().await;
    let seed = (js_sys::Math::random() * 2f64.powi(53)) as u64;
    console_log!("seed {seed}");
    let rng = &mut SmallRng::seed_from_u64(seed);
    let w = random_matrix(rng, OUT, IN, 0.1);
    let hqq = HqqWeight::quantize(
        &w,
        Some(random_matrix(rng, 1, OUT, 0.2).data),
        &HqqConfig::new(4, 64, 1),
    )
    .unwrap();
    let gptq_config = GptqConfig {
        bits: 4,
        group_size: Some(128),
        sym: true,
        desc_act: false,
        zeros: GptqZeros::V1,
    };
    let gptq = GptqWeight::quantize_rtn(&w, gptq_config, None).unwrap();
    for base in [QuantWeight::Hqq(hqq), QuantWeight::Gptq(gptq)] {
        let format = base.format_name();
        let params = random_matrix(rng, IN / B, B * (B - 1) / 2, 0.17);
        let oft = OftAdapter::from_params("oft", IN, params, Parameterization::Cayley, None, false);
        let (a, b) = (
            random_matrix(rng, 8, IN, 0.1),
            random_matrix(rng, OUT, 8, 0.1),
        );
        let lora = LoraAdapter::from_matrices("lora", IN, OUT, a, b, 2.0, None);
        let adapters = vec![Adapter::Oft(oft.unwrap()), Adapter::Lora(lora.unwrap())];
        let [mut gpu, mut cpu] = layers(&ctx, base, adapters).await;
        for layer in [&mut gpu, &mut cpu] {
            layer.set_active(&["oft", "lora"]).unwrap();
        }
        let x = random_matrix(rng, 5, IN, 1.0);
        let on_gpu = gpu.forward_async(&x).await.unwrap();
        let on_cpu = cpu.forward(&x).unwrap();
        assert!(on_cpu.data.iter().any(|v| *v != 0.0));
        within(
            &format!("{format} on WebGPU"),
            &on_gpu,
            &on_cpu.data,
            GPU_TOLERANCE,
        );
        console_log!("{format} with OFT and LoRA, {IN} inputs: passed");
    }
}

/// The blocking conveniences cannot wait in a browser: they fail with a clear error naming the
/// async version, and leave the layer as it was.
#[wasm_bindgen_test]
async fn blocking_calls_are_refused() {
    let ctx = gpu().await;
    let rng = &mut SmallRng::seed_from_u64(7);
    let w = random_matrix(rng, 64, 128, 0.1);
    let base = HqqWeight::quantize(&w, None, &HqqConfig::new(4, 64, 1)).unwrap();
    let layer = QuantLinear::new(QuantWeight::Hqq(base), Backend::Gpu(Box::new(ctx)));
    let mut layer = layer.unwrap();
    let params = random_matrix(rng, 4, 32 * 31 / 2, 0.17);
    let oft = OftAdapter::from_params("oft", 128, params, Parameterization::Cayley, None, false);
    let refusal = layer.add_adapter(Adapter::Oft(oft.unwrap())).unwrap_err();
    assert!(
        matches!(&refusal, Error::Unsupported(m) if m.contains("async")),
        "{refusal}"
    );
    assert!(layer.adapter("oft").is_none());
    let x = random_matrix(rng, 2, 128, 1.0);
    let refusal = layer.forward(&x).unwrap_err();
    assert!(
        matches!(&refusal, Error::Unsupported(m) if m.contains("async")),
        "{refusal}"
    );
    assert_eq!(layer.forward_async(&x).await.unwrap().cols, 64);
}
