//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use quantadapt::Error;
use quantadapt::gpu::{ActDtype, GpuContext, GpuTensor};
use quantadapt::tensor::Matrix;

/// The GPU every GPU test runs on, with outputs NaN-poisoned so that unwritten elements show.
/// A missing adapter fails the test: it is never skipped.
pub fn gpu() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| match GpuContext::new() {
        Ok(ctx) => {
            ctx.set_debug_poison(true);
            ctx
        }
        Err(e) => panic!("GPU tests need an adapter (install mesa-vulkan-drivers): {e}"),
    })
}

/// The activation dtypes the GPU tests run on `ctx`: f32, and f16 where the device has
/// SHADER_F16. Where it lacks it (wgpu's GL backend) f16 activations must be refused with
/// `Error::Unsupported`, which this asserts and says on stderr, so the f16 half is never
/// counted as passed without running.
pub fn act_dtypes(ctx: &GpuContext) -> Vec<ActDtype> {
    if ctx.has_f16() {
        return vec![ActDtype::F32, ActDtype::F16];
    }
    match GpuTensor::upload(ctx, &random_matrix(2, 8, 1.0), ActDtype::F16) {
        Err(Error::Unsupported(_)) => {}
        Err(e) => panic!("f16 on a device without SHADER_F16: expected Unsupported, got {e}"),
        Ok(_) => panic!("f16 activations accepted by a device without SHADER_F16"),
    }
    eprintln!(
        "{}: no SHADER_F16; f16 activations refused as they must be, f32 tested only",
        ctx.describe()
    );
    vec![ActDtype::F32]
}

/// The best adapter as a device without SUBGROUP (its other optional features kept), so that
/// kernels take their workgroup-memory reductions; outputs NaN-poisoned as in [`gpu`].
pub fn gpu_without_subgroups() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| {
        let ctx = pollster::block_on(async {
            let instance = wgpu::Instance::new(
                wgpu::InstanceDescriptor::new_without_display_handle_from_env(),
            );
            let adapter = instance
                .request_adapter(&wgpu::RequestAdapterOptions::default())
                .await
                .expect("GPU tests need an adapter");
            let features =
                adapter.features() & (wgpu::Features::SHADER_F16 | wgpu::Features::TIMESTAMP_QUERY);
            let (device, queue) = adapter
                .request_device(&wgpu::DeviceDescriptor {
                    required_features: features,
                    required_limits: adapter.limits(),
                    ..Default::default()
                })
                .await
                .expect("a device without SUBGROUP");
            GpuContext::from_device(device, queue, adapter.get_info())
        });
        assert!(!ctx.has_subgroups());
        ctx.set_debug_poison(true);
        ctx
    })
}

/// The contexts a kernel with both reduction kinds runs on: [`gpu`] with subgroup operations
/// and [`gpu_without_subgroups`]. Where the adapter has no subgroups, this says so on stderr and
/// returns the second only, so the subgroup half is never counted as passed without running.
pub fn reduction_contexts() -> Vec<&'static GpuContext> {
    if gpu().has_subgroups() {
        vec![gpu(), gpu_without_subgroups()]
    } else {
        eprintln!(
            "{}: no SUBGROUP; workgroup-memory reductions tested only",
            gpu().describe()
        );
        vec![gpu()]
    }
}

pub fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden")
}

/// Whole-model golden data: real checkpoint folders and PEFT adapter folders.
pub fn golden_model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden-model")
}

/// The whole-model golden case `name` of the manifest.
pub fn golden_model_case(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(golden_model_dir().join("manifest.json")).unwrap();
    let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    manifest["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no golden model case {name}"))
        .clone()
}

/// The modules of a whole-model golden case, as its manifest lists them (model order).
pub fn golden_model_modules(case: &str) -> Vec<String> {
    serde_json::from_value(golden_model_case(case)["modules"].clone()).unwrap()
}

/// A matrix of fresh random values in [-scale, scale), never all zeros.
pub fn random_matrix(rows: usize, cols: usize, scale: f32) -> Matrix {
    let m = Matrix::random(rows, cols, scale);
    assert!(m.data.iter().any(|v| *v != 0.0));
    m
}

/// A matrix of fresh N(0, std²) values (Box-Muller), as PEFT's `init_weights=False` draws OFT
/// generators (std 0.1).
pub fn random_normal(rows: usize, cols: usize, std: f32) -> Matrix {
    use rand::Rng;
    let mut rng = rand::rng();
    let data = (0..rows * cols)
        .map(|_| {
            let u1: f64 = rng.random_range(f64::EPSILON..1.0);
            let u2: f64 = rng.random();
            (std as f64 * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect();
    let m = Matrix::new(rows, cols, data).unwrap();
    assert!(m.data.iter().any(|v| *v != 0.0));
    m
}

/// One golden `hqq_quant` case: HQQ's own packing, dequantization and solver outputs.
pub struct HqqQuantCase {
    pub name: String,
    pub file: quantadapt::io::TensorFile,
    pub shape: (usize, usize),
    pub nbits: u32,
    pub group_size: usize,
    pub axis: usize,
}

/// Every golden `hqq_quant` case (there are more than 80).
pub fn hqq_quant_cases() -> Vec<HqqQuantCase> {
    let text = std::fs::read_to_string(golden_dir().join("manifest.json")).unwrap();
    let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases: Vec<HqqQuantCase> = manifest["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "hqq_quant")
        .map(|c| {
            let meta = &c["meta"];
            let name = c["name"].as_str().unwrap().to_string();
            let number = |key: &str| meta[key].as_u64().unwrap() as usize;
            HqqQuantCase {
                file: quantadapt::io::TensorFile::open(
                    golden_dir().join(&name).join("tensors.safetensors"),
                )
                .unwrap(),
                name,
                shape: (
                    meta["shape"][0].as_u64().unwrap() as usize,
                    meta["shape"][1].as_u64().unwrap() as usize,
                ),
                nbits: number("nbits") as u32,
                group_size: number("group_size"),
                axis: number("axis"),
            }
        })
        .collect();
    assert!(cases.len() >= 80, "expected the golden hqq_quant cases");
    cases
}

/// An HQQ layer's tensors under `prefix` (`model.layers.0.self_attn.q_proj.`) as transformers
/// saves `HQQLinear.state_dict()`: packed `W_q`, `scale` and `zero` per group, and the meta as
/// small tensors.
pub fn hqq_module_tensors(
    prefix: &str,
    w: &quantadapt::formats::hqq::HqqWeight,
) -> Vec<quantadapt::io::HostTensor> {
    use quantadapt::formats::hqq::ComputeDtype;
    use quantadapt::io::HostTensor;
    use safetensors::Dtype;
    let name = |key: &str| format!("{prefix}{key}");
    let scalar = |key: &str, v: i32| {
        HostTensor::from_raw(&name(key), Dtype::I32, &[], v.to_le_bytes().to_vec())
    };
    let ascii = |key: &str, text: &str| {
        HostTensor::from_raw(
            &name(key),
            Dtype::U8,
            &[text.len()],
            text.as_bytes().to_vec(),
        )
    };
    let packed_dtype = match w.packing.element_bytes {
        4 => Dtype::I32,
        _ => Dtype::U8,
    };
    let compute_dtype = match w.compute_dtype {
        ComputeDtype::F16 => "torch.float16",
        ComputeDtype::BF16 => "torch.bfloat16",
        ComputeDtype::F32 => "torch.float32",
    };
    let meta_shape = w.grouping.meta_shape();
    let shape = [w.out_features as i64, w.in_features as i64];
    vec![
        HostTensor::from_raw(
            &name("W_q"),
            packed_dtype,
            &[w.packed_rows, w.packed_cols],
            w.packed.clone(),
        ),
        HostTensor::from_f32(&name("scale"), &meta_shape, &w.scale),
        HostTensor::from_f32(&name("zero"), &meta_shape, &w.zero),
        HostTensor::from_raw(
            &name("shape"),
            Dtype::I64,
            &[2],
            bytemuck::cast_slice(&shape).to_vec(),
        ),
        scalar("nbits", w.nbits() as i32),
        scalar("group_size", w.grouping.group_size as i32),
        scalar("axis", w.grouping.axis as i32),
        ascii("packing", w.packing.name()),
        ascii("compute_dtype", compute_dtype),
    ]
}
