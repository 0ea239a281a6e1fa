//! Runs the golden vectors of `manifest.json` (made by PEFT and HQQ themselves) on a backend and
//! reports one outcome per case. A broken case (missing file, bad tensor) is a failed outcome with
//! its reason, never a crash.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::adapters::Adapter;
use crate::adapters::lora::LoraAdapter;
use crate::adapters::oft::OftAdapter;
use crate::adapters::peft_dir::PeftAdapterDir;
use crate::error::{Error, Result};
use crate::formats::QuantFormat;
use crate::formats::QuantWeight;
use crate::formats::eetq::EetqWeight;
use crate::formats::gptq::GptqWeight;
use crate::formats::hqq::{self, ComputeDtype, Grouping, HqqConfig, HqqWeight};
use crate::gpu::{ActDtype, GpuContext, GpuTensor};
use crate::io::TensorFile;
use crate::kernels::lora::GpuLora;
use crate::kernels::oft::GpuOft;
use crate::kernels::quant::GpuQuantWeight;
use crate::layer::{Backend as LayerBackend, QuantLinear};
use crate::tensor::{Matrix, max_rel_error, rel_frobenius_error};

/// Where a case runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoldenBackend {
    /// The CPU reference path.
    Cpu,
    /// The wgpu kernels.
    Gpu,
}

impl std::fmt::Display for GoldenBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GoldenBackend::Cpu => "cpu",
            GoldenBackend::Gpu => "gpu",
        })
    }
}

/// The result of one case on one backend.
#[derive(Debug)]
pub struct Outcome {
    /// The case's name in the manifest.
    pub case: String,
    /// Where it ran.
    pub backend: GoldenBackend,
    /// `Ok` if every output is within tolerance, else what failed and by how much.
    pub result: std::result::Result<(), String>,
}

/// Tolerances of the golden README for forward outputs.
pub const CPU_TOLERANCE: f64 = 1e-5;
/// Max relative error allowed for f32 GPU outputs.
pub const GPU_TOLERANCE: f64 = 1e-4;
/// Max relative error allowed for f16-activation outputs.
pub const F16_TOLERANCE: f64 = 5e-3;

/// Reads the manifest's case list.
pub fn read_manifest(dir: &Path) -> Result<Vec<Value>> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    let manifest: Value = serde_json::from_str(&text)
        .map_err(|e| Error::config(format!("{}: {e}", path.display())))?;
    manifest["cases"]
        .as_array()
        .cloned()
        .ok_or_else(|| Error::config(format!("{}: no `cases` array", path.display())))
}

/// Runs every case on every backend. `gpu` must be given when `backends` holds [`GoldenBackend::Gpu`];
/// without it those outcomes fail with the reason.
pub fn run(
    dir: &Path,
    backends: &[GoldenBackend],
    gpu: Option<&GpuContext>,
) -> Result<Vec<Outcome>> {
    let cases = read_manifest(dir)?;
    let mut outcomes = Vec::new();
    for case in &cases {
        let name = case["name"].as_str().unwrap_or("<unnamed>").to_string();
        for &backend in backends {
            if case["kind"] == "model" {
                outcomes.extend(model_outcomes(&dir.join(&name), case, backend, gpu));
                continue;
            }
            let result = catch_unwind(AssertUnwindSafe(|| run_case(dir, case, backend, gpu)))
                .unwrap_or_else(|_| Err(Error::config("the check panicked")))
                .map_err(|e| e.to_string());
            outcomes.push(Outcome {
                case: name.clone(),
                backend,
                result,
            });
        }
    }
    Ok(outcomes)
}

/// A model case: one outcome per run, named `<case>/<run>`.
fn model_outcomes(
    case_dir: &Path,
    spec: &Value,
    backend: GoldenBackend,
    gpu: Option<&GpuContext>,
) -> Vec<Outcome> {
    let name = spec["name"].as_str().unwrap_or("<unnamed>");
    let outcome = |case: String, result: Result<()>| Outcome {
        case,
        backend,
        result: result.map_err(|e| e.to_string()),
    };
    let ctx = match (backend, gpu) {
        (GoldenBackend::Cpu, _) => None,
        (GoldenBackend::Gpu, Some(ctx)) => Some(ctx),
        (GoldenBackend::Gpu, None) => {
            let missing = Error::NoGpu("no GPU adapter for this run".into());
            return vec![outcome(name.to_string(), Err(missing))];
        }
    };
    catch_unwind(AssertUnwindSafe(|| {
        crate::golden_model::run_case(case_dir, spec, ctx)
    }))
    .unwrap_or_else(|_| vec![(name.to_string(), Err(Error::config("the check panicked")))])
    .into_iter()
    .map(|(run, result)| outcome(run, result))
    .collect()
}

struct Case<'a> {
    dir: PathBuf,
    spec: &'a Value,
    tensors: TensorFile,
}

impl Case<'_> {
    fn f32(&self, name: &str) -> Result<Vec<f32>> {
        self.tensors.get(name)?.to_f32()
    }

    fn matrix(&self, name: &str) -> Result<Matrix> {
        let t = self.tensors.get(name)?;
        let (rows, cols) = match t.shape[..] {
            [r, c] => (r, c),
            [n] => (1, n),
            _ => return Err(Error::shape(name, "[rows, cols]", &t.shape)),
        };
        Matrix::new(rows, cols, t.to_f32()?)
    }

    /// The base layer's checkpoint directory and module name.
    fn checkpoint(&self) -> Result<(PathBuf, &str)> {
        let dir = self.spec["checkpoint_dir"].as_str().unwrap_or("checkpoint");
        let module = self.spec["module"]
            .as_str()
            .ok_or_else(|| Error::config("manifest: `module` missing"))?;
        Ok((self.dir.join(dir), module))
    }

    /// The directory of the case's PEFT adapter(s).
    fn adapter_dir(&self) -> PathBuf {
        self.dir
            .join(self.spec["adapter_dir"].as_str().unwrap_or("adapter"))
    }

    fn meta_usize(&self, block: &str, key: &str) -> Result<usize> {
        self.spec[block][key]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| Error::config(format!("manifest: `{block}.{key}` missing")))
    }

    fn shape(&self, block: &str) -> Result<(usize, usize)> {
        let s = &self.spec[block]["shape"];
        match (s[0].as_u64(), s[1].as_u64()) {
            (Some(o), Some(i)) => Ok((o as usize, i as usize)),
            _ => Err(Error::config(format!("manifest: `{block}.shape` missing"))),
        }
    }
}

fn run_case(
    dir: &Path,
    spec: &Value,
    backend: GoldenBackend,
    gpu: Option<&GpuContext>,
) -> Result<()> {
    let name = spec["name"]
        .as_str()
        .ok_or_else(|| Error::config("case without a name"))?;
    let case_dir = dir.join(name);
    let case = Case {
        tensors: TensorFile::open(case_dir.join("tensors.safetensors"))?,
        dir: case_dir,
        spec,
    };
    let gpu = match backend {
        GoldenBackend::Cpu => None,
        GoldenBackend::Gpu => {
            Some(gpu.ok_or_else(|| Error::NoGpu("no GPU adapter for this run".into()))?)
        }
    };
    match spec["kind"].as_str().unwrap_or("") {
        "hqq_quant" => hqq_quant(&case, gpu),
        "hqq_f16" => hqq_f16(&case, gpu),
        "oft_hqq" => {
            oft_forward(&case, QuantWeight::Hqq(hqq_base(&case)?), gpu)?;
            layer_checks(&case, gpu, "default", "y", "", "merged")
        }
        "lora_hqq" => {
            lora_hqq_forward(&case, gpu)?;
            layer_checks(&case, gpu, "a", "y_a", "_a", "merged_a")
        }
        "oft_gptq" | "oft_eetq" => oft_forward(&case, forward_only_base(&case)?, gpu),
        other => Err(Error::Unsupported(format!("unknown case kind `{other}`"))),
    }
}

fn exact(what: &str, ours: &[f32], reference: &[f32]) -> Result<()> {
    let bad = ours.len() != reference.len()
        || ours
            .iter()
            .zip(reference)
            .any(|(a, b)| a.to_bits() != b.to_bits());
    if bad {
        return Err(Error::config(format!("{what} differs from the reference")));
    }
    Ok(())
}

fn within(what: &str, ours: &[f32], reference: &[f32], tolerance: f64) -> Result<()> {
    let err = max_rel_error(ours, reference);
    if err.is_nan() || err >= tolerance {
        return Err(Error::config(format!(
            "{what}: max relative error {err:.3e} over the tolerance {tolerance:.0e}"
        )));
    }
    Ok(())
}

/// HQQ packing, dequantization and quantization against `Quantizer.quantize`/`dequantize`.
fn hqq_quant(case: &Case, gpu: Option<&GpuContext>) -> Result<()> {
    let (out, inp) = case.shape("meta")?;
    let nbits = case.meta_usize("meta", "nbits")? as u32;
    let group_size = case.meta_usize("meta", "group_size")?;
    let axis = case.meta_usize("meta", "axis")?;
    let w = case.f32("W")?;
    for suffix in ["rtn", "opt"] {
        let weight = HqqWeight::from_parts(
            out,
            inp,
            nbits,
            group_size,
            axis,
            case.tensors.get(&format!("W_q_{suffix}"))?.bytes.clone(),
            case.f32(&format!("scale_{suffix}"))?,
            case.f32(&format!("zero_{suffix}"))?,
            None,
            ComputeDtype::F32,
        )?;
        let reference = case.f32(&format!("W_deq_{suffix}"))?;
        match gpu {
            None => {
                let codes = case.tensors.get(&format!("W_codes_{suffix}"))?.to_u8()?;
                if weight.codes() != codes {
                    return Err(Error::config(format!(
                        "unpacked W_q_{suffix} differs from W_codes_{suffix}"
                    )));
                }
                let (rows, cols) = weight.grouping.grouped_shape();
                if hqq::packing::pack(&weight.packing, &codes, rows, cols)? != weight.packed {
                    return Err(Error::config(format!(
                        "packing W_codes_{suffix} differs from W_q_{suffix}"
                    )));
                }
                exact(
                    &format!("W_deq_{suffix}"),
                    &weight.dequantize().data,
                    &reference,
                )?;
            }
            Some(ctx) => {
                let deq = GpuQuantWeight::from_hqq(ctx, &weight)?.dequantize(ctx)?;
                exact(&format!("GPU W_deq_{suffix}"), &deq.data, &reference)?;
            }
        }
    }
    if gpu.is_none() {
        let grouping = Grouping::new(w.len(), group_size, axis)?;
        let mut config = HqqConfig::new(nbits, group_size, axis);
        config.optimize = false;
        config.round_zero = false;
        let (codes, scale, zero) = hqq::quantize_codes(&w, &grouping, &config);
        if codes != case.tensors.get("W_codes_rtn")?.to_u8()? {
            return Err(Error::config("min-max codes differ from W_codes_rtn"));
        }
        exact("scale_rtn", &scale, &case.f32("scale_rtn")?)?;
        exact("zero_rtn", &zero, &case.f32("zero_rtn")?)?;
        config.optimize = true;
        let ours = HqqWeight::quantize(&Matrix::new(out, inp, w.clone())?, None, &config)?;
        let e_ours = rel_frobenius_error(&ours.dequantize().data, &w);
        let e_ref = rel_frobenius_error(&case.f32("W_deq_opt")?, &w);
        if e_ours > e_ref * 1.01 + 1e-7 {
            return Err(Error::config(format!(
                "solver error {e_ours:.5} is over 1.01 x HQQ's {e_ref:.5}"
            )));
        }
    }
    if let Some(ctx) = gpu {
        // The GPU quantizer: min-max exact, the solver within 1% of HQQ's error.
        let weight = Matrix::new(out, inp, w.clone())?;
        let mut config = HqqConfig::new(nbits, group_size, axis);
        config.optimize = false;
        config.round_zero = false;
        let rtn = crate::kernels::hqq_quantize::quantize_to_host(ctx, &weight, None, &config)?;
        if rtn.packed != case.tensors.get("W_q_rtn")?.bytes {
            return Err(Error::config("GPU min-max W_q differs from W_q_rtn"));
        }
        exact("GPU scale_rtn", &rtn.scale, &case.f32("scale_rtn")?)?;
        exact("GPU zero_rtn", &rtn.zero, &case.f32("zero_rtn")?)?;
        config.optimize = true;
        let layer = crate::kernels::hqq_quantize::quantize_on_gpu(ctx, &weight, None, &config)?;
        let e_ours = rel_frobenius_error(&layer.dequantize(ctx)?.data, &w);
        let e_ref = rel_frobenius_error(&case.f32("W_deq_opt")?, &w);
        if e_ours > e_ref * 1.01 + 1e-7 {
            return Err(Error::config(format!(
                "GPU solver error {e_ours:.5} is over 1.01 x HQQ's {e_ref:.5}"
            )));
        }
    }
    Ok(())
}

/// An fp16 HQQ layer loaded from its checkpoint directory, run on fp16 activations.
fn hqq_f16(case: &Case, gpu: Option<&GpuContext>) -> Result<()> {
    let (checkpoint, module) = case.checkpoint()?;
    let layer = HqqWeight::load(&checkpoint, module)?;
    if layer.packed != case.tensors.get("base.W_q")?.bytes {
        return Err(Error::config("checkpoint W_q differs from base.W_q"));
    }
    exact(
        "base.W_deq",
        &layer.dequantize().data,
        &case.f32("base.W_deq")?,
    )?;
    let x = case.matrix("x")?;
    let y = case.f32("y")?;
    let ours = match gpu {
        None => {
            let mut y = layer.forward_cpu(&x)?;
            y.round_to_f16();
            y
        }
        Some(ctx) => {
            let act = if ctx.has_f16() {
                ActDtype::F16
            } else {
                ActDtype::F32
            };
            let gw = GpuQuantWeight::from_hqq(ctx, &layer)?;
            gw.forward(ctx, &GpuTensor::upload(ctx, &x, act)?)?
                .download(ctx)?
        }
    };
    within("y", &ours.data, &y, F16_TOLERANCE)
}

/// The HQQ base layer of an adapter case, from its checkpoint directory.
fn hqq_base(case: &Case) -> Result<HqqWeight> {
    let (checkpoint, module) = case.checkpoint()?;
    let base = HqqWeight::load(&checkpoint, module)?;
    exact(
        "base.W_deq",
        &base.dequantize().data,
        &case.f32("base.W_deq")?,
    )?;
    Ok(base)
}

fn tolerance(gpu: Option<&GpuContext>) -> f64 {
    if gpu.is_some() {
        GPU_TOLERANCE
    } else {
        CPU_TOLERANCE
    }
}

/// The GPTQ or EETQ base of a forward-only case, from its checkpoint directory, checked against
/// the codes and dequantized weight the case records.
fn forward_only_base(case: &Case) -> Result<QuantWeight> {
    let (checkpoint, module) = case.checkpoint()?;
    let base = if case.spec["kind"] == "oft_gptq" {
        let w = GptqWeight::load(&checkpoint, module)?;
        if w.codes() != case.tensors.get("base.codes")?.to_u8()? {
            return Err(Error::config("GPTQ codes differ from base.codes"));
        }
        QuantWeight::Gptq(w)
    } else {
        let w = EetqWeight::load(&checkpoint, module)?;
        let plain = case.tensors.get("base.weight_unprocessed")?.to_i8()?;
        if w.codes != plain {
            return Err(Error::config(
                "decoded EETQ codes differ from base.weight_unprocessed",
            ));
        }
        QuantWeight::Eetq(w)
    };
    exact(
        "base.W_deq",
        &base.dequantize().data,
        &case.f32("base.W_deq")?,
    )?;
    Ok(base)
}

/// PEFT's OFT forward on a quantized base: `y = base(x · R)`, and the base alone when disabled.
/// On the GPU the base's dequantization is checked bit-exact too.
fn oft_forward(case: &Case, base: QuantWeight, gpu: Option<&GpuContext>) -> Result<()> {
    let adapter_dir = case.adapter_dir();
    let dir = PeftAdapterDir::open(&adapter_dir)?;
    let oft = OftAdapter::from_peft_dir("default", &dir, None, base.in_features())?;
    within(
        "R",
        &oft.full_rotation().data,
        &case.f32("R")?,
        CPU_TOLERANCE,
    )?;
    if case.tensors.contains("oft_R_weight_after_coft") {
        let reference = case.f32("oft_R_weight_after_coft")?;
        within(
            "oft_R_weight_after_coft",
            oft.params(),
            &reference,
            CPU_TOLERANCE,
        )?;
    }
    let x = case.matrix("x")?;
    let (y, y_disabled) = match gpu {
        None => (
            base.forward_cpu(&oft.rotate_cpu(&x)?)?,
            base.forward_cpu(&x)?,
        ),
        Some(ctx) => {
            let layer = GpuQuantWeight::upload(ctx, &base)?;
            exact(
                "GPU base.W_deq",
                &layer.dequantize(ctx)?.data,
                &case.f32("base.W_deq")?,
            )?;
            let rotation = GpuOft::build(
                ctx,
                oft.params(),
                oft.block_size(),
                oft.param_rows(),
                base.in_features(),
                oft.parameterization(),
            )?;
            let blocks = rotation.download_blocks(ctx)?;
            within(
                "GPU-built R blocks",
                &blocks,
                &oft.blocks_flat(),
                CPU_TOLERANCE,
            )?;
            let xg = GpuTensor::upload(ctx, &x, ActDtype::F32)?;
            let rotated = rotation.rotate(ctx, &xg)?;
            (
                layer.forward(ctx, &rotated)?.download(ctx)?,
                layer.forward(ctx, &xg)?.download(ctx)?,
            )
        }
    };
    within("y", &y.data, &case.f32("y")?, tolerance(gpu))?;
    within(
        "y_disabled",
        &y_disabled.data,
        &case.f32("y_disabled")?,
        tolerance(gpu),
    )
}

/// PEFT's LoRA / rsLoRA / DoRA forward on an HQQ base, each of the two adapters alone.
fn lora_hqq_forward(case: &Case, gpu: Option<&GpuContext>) -> Result<()> {
    let base = hqq_base(case)?;
    let adapter_dir = case.adapter_dir();
    let x = case.matrix("x")?;
    let weight = base.dequantize();
    let gpu_base = gpu
        .map(|ctx| GpuQuantWeight::from_hqq(ctx, &base))
        .transpose()?;
    for name in ["a", "b"] {
        let dir = PeftAdapterDir::open(adapter_dir.join(name))?;
        let lora =
            LoraAdapter::from_peft_dir(name, &dir, None, base.in_features, base.out_features)?;
        let y = match (gpu, &gpu_base) {
            (Some(ctx), Some(layer)) => {
                let dora_scale = lora.dora_scale(&weight)?;
                let adapter = GpuLora::upload(
                    ctx,
                    lora.a(),
                    lora.b(),
                    lora.scaling(),
                    dora_scale.as_deref(),
                )?;
                let xg = GpuTensor::upload(ctx, &x, ActDtype::F32)?;
                let y = layer.forward(ctx, &xg)?;
                adapter.apply(ctx, &xg, &y, Some(layer.bias_buffer()))?;
                y.download(ctx)?
            }
            _ => {
                let mut y = base.forward_cpu(&x)?;
                lora.apply_cpu(&x, &mut y, base.bias(), &weight)?;
                y
            }
        };
        within(
            &format!("y_{name}"),
            &y.data,
            &case.f32(&format!("y_{name}"))?,
            tolerance(gpu),
        )?;
    }
    let y_disabled = match (gpu, &gpu_base) {
        (Some(ctx), Some(layer)) => layer
            .forward(ctx, &GpuTensor::upload(ctx, &x, ActDtype::F32)?)?
            .download(ctx)?,
        _ => base.forward_cpu(&x)?,
    };
    within(
        "y_disabled",
        &y_disabled.data,
        &case.f32("y_disabled")?,
        tolerance(gpu),
    )
}

/// Loads the adapters of a case into a [`QuantLinear`] on the chosen backend.
fn case_layer(case: &Case, gpu: Option<&GpuContext>) -> Result<QuantLinear> {
    let base = hqq_base(case)?;
    let (inp, out) = (base.in_features, base.out_features);
    let backend = gpu.map_or(LayerBackend::Cpu, |ctx| {
        LayerBackend::Gpu(Box::new(ctx.clone()))
    });
    let mut layer = QuantLinear::new(QuantWeight::Hqq(base), backend)?;
    let adapter_dir = case.adapter_dir();
    if case.spec["kind"] == "lora_hqq" {
        for name in ["a", "b"] {
            layer.add_adapter(Adapter::from_peft_dir(
                name,
                &adapter_dir.join(name),
                None,
                inp,
                out,
            )?)?;
        }
    } else {
        layer.add_adapter(Adapter::from_peft_dir(
            "default",
            &adapter_dir,
            None,
            inp,
            out,
        )?)?;
    }
    Ok(layer)
}

/// `|ours - float| <= 1.05 |reference - float| + 1e-6` (relative Frobenius errors): the golden
/// README's rule for anything that went through the solver.
fn no_worse(what: &str, ours: &[f32], reference: &[f32], float: &[f32]) -> Result<()> {
    let (e_ours, e_ref) = (
        rel_frobenius_error(ours, float),
        rel_frobenius_error(reference, float),
    );
    if e_ours.is_nan() || e_ours > 1.05 * e_ref + 1e-6 {
        return Err(Error::config(format!(
            "{what}: error {e_ours:.3e} against the float result, over 1.05 x the reference's {e_ref:.3e}"
        )));
    }
    Ok(())
}

/// Mixed batches, merge (`merged.*`, `y_merged`) and unmerge (`y_unmerged`) through
/// [`QuantLinear`], for the adapter `name` whose unmerged output is the tensor `y_name`.
fn layer_checks(
    case: &Case,
    gpu: Option<&GpuContext>,
    name: &str,
    y_name: &str,
    sfx: &str,
    merged: &str,
) -> Result<()> {
    let mut layer = case_layer(case, gpu)?;
    let x = case.matrix("x")?;
    if case.tensors.contains("y_mixed") {
        let names: Vec<&str> = case.spec["mixed_adapter_names"]
            .as_array()
            .ok_or_else(|| Error::config("manifest: `mixed_adapter_names` missing"))?
            .iter()
            .map(|v| v.as_str().unwrap_or(""))
            .collect();
        let y = layer.forward_mixed(&x, &names)?;
        within("y_mixed", &y.data, &case.f32("y_mixed")?, tolerance(gpu))?;
    }
    layer.set_active(&[name])?;
    let unmerged = layer.forward(&x)?;
    within(y_name, &unmerged.data, &case.f32(y_name)?, tolerance(gpu))?;
    let float_weight = match layer.adapter(name) {
        Some(adapter) => crate::layer::merged_dense_weight(layer.base(), adapter, layer.base())?,
        None => return Err(Error::config("adapter missing after loading")),
    };
    layer.merge(&[name], true)?;
    let meta_block = if case.spec["merged_meta"].is_object() {
        "merged_meta"
    } else {
        "base_meta"
    };
    let (out, inp) = case.shape(meta_block)?;
    let reference = HqqWeight::from_parts(
        out,
        inp,
        case.meta_usize(meta_block, "nbits")? as u32,
        case.meta_usize(meta_block, "group_size")?,
        case.meta_usize(meta_block, "axis")?,
        case.tensors.get(&format!("{merged}.W_q"))?.bytes.clone(),
        case.f32(&format!("{merged}.scale"))?,
        case.f32(&format!("{merged}.zero"))?,
        None,
        ComputeDtype::F32,
    )?;
    no_worse(
        &format!("{merged}.* dequantized"),
        &layer.base().dequantize().data,
        &reference.dequantize().data,
        &float_weight.data,
    )?;
    let y_float = case.f32(y_name)?;
    let y_merged = layer.forward(&x)?;
    no_worse(
        &format!("y_merged{sfx}"),
        &y_merged.data,
        &case.f32(&format!("y_merged{sfx}"))?,
        &y_float,
    )?;
    layer.unmerge()?;
    let y_unmerged = layer.forward(&x)?;
    no_worse(
        &format!("y_unmerged{sfx}"),
        &y_unmerged.data,
        &case.f32(&format!("y_unmerged{sfx}"))?,
        &y_float,
    )
}
