//! The whole-model golden cases (`kind: "model"`): a transformers + HQQ checkpoint folder, PEFT
//! adapter folders, forward runs with every module's `x` and `y`, and merge runs. One outcome per
//! run (plus one for the adapters' resolved targets), named `<case>/<run>`.
//!
//! Forward runs: every module, untargeted ones included, within the README's tolerance. Merge
//! runs go through [`crate::merge::merge_model`], as `quantadapt merge` does: the merged folder
//! is written to a temporary folder, reloaded, and each module's output must satisfy
//! `err(ours) <= 1.05 err(y_merged) + 1e-6` with `err(z) = max |z - y_float| / max |y_float|`;
//! the modules the adapters do not touch must come out byte-identical, and the folder must hold
//! the same files, tensor names, dtypes and shapes as the input.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::io::TensorFile;
use crate::layer::Backend as LayerBackend;
use crate::model::{Activations, Model};
use crate::tensor::max_rel_error;

/// One run's name and result.
pub type RunOutcome = (String, Result<()>);

/// Runs every run of a model case on the CPU (`gpu` None) or a GPU.
pub fn run_case(case_dir: &Path, spec: &Value, gpu: Option<&GpuContext>) -> Vec<RunOutcome> {
    let case = spec["name"].as_str().unwrap_or("<unnamed>");
    let runs = spec["runs"].as_array().cloned().unwrap_or_default();
    let tolerance = match gpu {
        Some(_) => crate::golden::GPU_TOLERANCE,
        None => crate::golden::CPU_TOLERANCE,
    };
    let backend = || match gpu {
        Some(ctx) => LayerBackend::Gpu(Box::new(ctx.clone())),
        None => LayerBackend::Cpu,
    };
    let setup = ModelCase::open(case_dir, spec, backend());
    let mut outcomes = Vec::new();
    let mut model_case = match setup {
        Ok(c) => c,
        Err(e) => {
            outcomes.push((format!("{case}/load"), Err(e)));
            return outcomes;
        }
    };
    outcomes.push((format!("{case}/targets"), model_case.check_targets()));
    for run in &runs {
        let name = run["name"].as_str().unwrap_or("<unnamed>");
        let result = match run.get("merge") {
            Some(_) => model_case.merge_run(run, &backend(), tolerance),
            None => model_case.forward_run(run, tolerance),
        };
        outcomes.push((format!("{case}/{name}"), result));
    }
    outcomes
}

struct ModelCase<'a> {
    dir: PathBuf,
    spec: &'a Value,
    checkpoint: PathBuf,
    model: Model,
}

impl<'a> ModelCase<'a> {
    fn open(dir: &Path, spec: &'a Value, backend: LayerBackend) -> Result<Self> {
        let checkpoint = dir.join(str_field(spec, "checkpoint_dir")?);
        let mut model = Model::open(&checkpoint, backend)?;
        let adapters = spec["adapters"]
            .as_object()
            .ok_or_else(|| Error::config("manifest: `adapters` missing"))?;
        for (name, path) in adapters {
            let path = path
                .as_str()
                .ok_or_else(|| Error::config(format!("manifest: adapter `{name}` path")))?;
            model.add_adapter_dir(name, &dir.join(path))?;
        }
        let expected = sorted(&spec["modules"]);
        let mut ours: Vec<&str> = model.module_names().iter().map(String::as_str).collect();
        ours.sort();
        if ours != expected {
            return Err(Error::config(format!(
                "modules {ours:?} differ from the manifest's {expected:?}"
            )));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            spec,
            checkpoint,
            model,
        })
    }

    /// Each adapter's resolved modules equal the ones PEFT wrapped.
    fn check_targets(&self) -> Result<()> {
        let targets = self.spec["targets"]
            .as_object()
            .ok_or_else(|| Error::config("manifest: `targets` missing"))?;
        for (name, expected) in targets {
            let expected = sorted(expected);
            let mut ours: Vec<&str> = self
                .model
                .adapter(name)
                .ok_or_else(|| Error::config(format!("adapter `{name}` not attached")))?
                .targets
                .iter()
                .map(|(m, _)| m.as_str())
                .collect();
            ours.sort();
            if ours != expected {
                return Err(Error::config(format!(
                    "adapter `{name}` targets {ours:?}, PEFT wrapped {expected:?}"
                )));
            }
        }
        Ok(())
    }

    fn tensors(&self, run: &Value) -> Result<TensorFile> {
        TensorFile::open(self.dir.join(str_field(run, "tensors")?))
    }

    fn forward_run(&mut self, run: &Value, tolerance: f64) -> Result<()> {
        let active: Vec<&str> = run["active"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        self.model.set_active(&active)?;
        let tensors = self.tensors(run)?;
        let mut failures = Vec::new();
        for module in self.model.module_names() {
            let x = Activations::from_host(tensors.get(&format!("{module}.x"))?)?;
            let y = tensors.get(&format!("{module}.y"))?;
            let ours = self.model.forward(module, &x)?;
            if ours.shape != y.shape {
                failures.push(format!(
                    "{module}: shape {:?}, PEFT {:?}",
                    ours.shape, y.shape
                ));
                continue;
            }
            let err = max_rel_error(&ours.data, &y.to_f32()?);
            if err.is_nan() || err >= tolerance {
                failures.push(format!("{module}: {err:.2e}"));
            }
        }
        match failures.is_empty() {
            true => Ok(()),
            false => Err(Error::config(format!(
                "over the tolerance {tolerance:.0e}: {}",
                failures.join(", ")
            ))),
        }
    }

    fn merge_run(&self, run: &Value, backend: &LayerBackend, tolerance: f64) -> Result<()> {
        let names: Vec<&str> = run["merge"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let dirs = names
            .iter()
            .map(|n| {
                self.model
                    .adapter(n)
                    .map(|a| a.dir.clone())
                    .ok_or_else(|| Error::config(format!("adapter `{n}` not attached")))
            })
            .collect::<Result<Vec<_>>>()?;
        let scratch = tempfile::tempdir().map_err(|source| Error::Io {
            path: std::env::temp_dir().display().to_string(),
            source,
        })?;
        let out = scratch.path().join("merged");
        crate::merge::merge_model(&self.checkpoint, &dirs, &out, backend, &mut |_| {})?;
        let merged = Model::open(&out, backend.clone())?;
        let tensors = self.tensors(run)?;
        let touched: Vec<&str> = names
            .iter()
            .filter_map(|n| self.model.adapter(n))
            .flat_map(|a| a.targets.iter().map(|(m, _)| m.as_str()))
            .collect();
        let input = Checkpoint::open(&self.checkpoint)?;
        let output = Checkpoint::open(&out)?;
        same_layout(&input, &output)?;
        if let Some(peft_dir) = run["merged_checkpoint_dir"].as_str() {
            same_layout(&Checkpoint::open(self.dir.join(peft_dir))?, &output)?;
        }
        let mut failures = Vec::new();
        for module in self.model.module_names() {
            let x = Activations::from_host(tensors.get(&format!("{module}.x"))?)?;
            let y_float = tensors.get(&format!("{module}.y_float"))?.to_f32()?;
            let y_merged = tensors.get(&format!("{module}.y_merged"))?.to_f32()?;
            let ours = merged.forward(module, &x)?;
            let (e_ours, e_peft) = (
                max_rel_error(&ours.data, &y_float),
                max_rel_error(&y_merged, &y_float),
            );
            if e_ours.is_nan() || e_ours > 1.05 * e_peft + 1e-6 {
                failures.push(format!("{module}: error {e_ours:.3e}, PEFT's {e_peft:.3e}"));
            }
            if !touched.contains(&module.as_str()) {
                if module_tensors(&input, module)? != module_tensors(&output, module)? {
                    failures.push(format!("{module}: untouched but not byte-identical"));
                }
                // Untouched modules: y_merged is the base output.
                let err = max_rel_error(&ours.data, &y_merged);
                if err >= tolerance {
                    failures.push(format!("{module}: untouched output off by {err:.2e}"));
                }
            }
        }
        match failures.is_empty() {
            true => Ok(()),
            false => Err(Error::config(failures.join("; "))),
        }
    }
}

/// A tensor's name, dtype, shape and bytes.
type StoredTensor = (String, String, Vec<usize>, Vec<u8>);
/// A shard's file name, its tensors' names, dtypes and shapes in file order, and its metadata.
type ShardLayout = (String, Vec<(String, String, Vec<usize>)>, String);

/// Every tensor of `module`.
fn module_tensors(checkpoint: &Checkpoint, module: &str) -> Result<Vec<StoredTensor>> {
    checkpoint
        .module(module)?
        .tensors
        .iter()
        .map(|name| {
            let t = checkpoint.read_tensor(name)?;
            Ok((t.name, format!("{:?}", t.dtype), t.shape, t.bytes))
        })
        .collect()
}

/// The same files, and in each shard the same tensor names, order, dtypes, shapes and header
/// metadata.
fn same_layout(input: &Checkpoint, output: &Checkpoint) -> Result<()> {
    let listing = |dir: &Path| -> Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map_err(|source| Error::Io {
                path: dir.display().to_string(),
                source,
            })?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names)
    };
    let (a, b) = (listing(input.dir())?, listing(output.dir())?);
    if a != b {
        return Err(Error::config(format!(
            "merged folder holds {b:?}, the input {a:?}"
        )));
    }
    let layout = |c: &Checkpoint| -> Vec<ShardLayout> {
        c.shards()
            .iter()
            .map(|s| {
                let tensors = s
                    .tensors()
                    .iter()
                    .map(|t| (t.name.clone(), format!("{:?}", t.dtype), t.shape.clone()))
                    .collect();
                (s.file_name(), tensors, format!("{:?}", s.metadata()))
            })
            .collect()
    };
    if layout(input) != layout(output) {
        return Err(Error::config(
            "the merged shards' tensor names, order, dtypes, shapes or metadata differ from the input",
        ));
    }
    Ok(())
}

/// A JSON list of names, sorted.
fn sorted(list: &Value) -> Vec<&str> {
    let mut names: Vec<&str> = list
        .as_array()
        .map(|m| m.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn str_field<'v>(v: &'v Value, key: &str) -> Result<&'v str> {
    v[key]
        .as_str()
        .ok_or_else(|| Error::config(format!("manifest: `{key}` missing")))
}
