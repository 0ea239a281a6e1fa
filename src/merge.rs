//! Baking adapters into an HQQ model folder (`quantadapt merge`).
//!
//! The output loads in transformers + HQQ as the input does: every file of the input folder is
//! copied (config, generation config, index), the shards keep their names, tensor names, order,
//! dtypes, shapes and header `__metadata__`; in each module an adapter targets only `W_q`,
//! `scale` and `zero` change (re-quantized with the module's own configuration and HQQ's
//! solver); every other tensor, and every module no adapter targets, is copied byte for byte.
//! Modules are merged one at a time. The folder is written under a temporary name beside the
//! output and renamed only once complete, so an interrupted merge leaves no output behind.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use safetensors::Dtype;
use safetensors::tensor::View;

use crate::adapters::Adapter;
use crate::adapters::peft_config::ModuleSettings;
use crate::adapters::peft_dir::PeftAdapterDir;
use crate::error::{Error, Result};
use crate::formats::hqq::HqqWeight;
use crate::formats::{QuantFormat, QuantWeight};
use crate::layer::{Backend, QuantLinear};
use crate::model_files::ModelFiles;

/// The tensors of an HQQ module a merge rewrites.
const REWRITTEN: [&str; 3] = ["W_q", "scale", "zero"];

/// What a merge reports as it goes.
#[derive(Clone, Debug)]
pub enum MergeEvent {
    /// Before the first module: how many modules the adapters touch (of how many).
    Start { touched: usize, modules: usize },
    /// A touched module is merged and re-quantized.
    Merged { module: String },
    /// A shard file is written.
    Written { file: String, bytes: u64 },
}

/// What a finished merge wrote.
#[derive(Clone, Debug)]
pub struct MergeSummary {
    pub out: PathBuf,
    pub modules: usize,
    pub merged: usize,
    pub files: usize,
    pub bytes: u64,
    pub seconds: f64,
}

/// One adapter to merge, read and resolved against the base.
struct MergeAdapter {
    name: String,
    peft: PeftAdapterDir,
    targets: Vec<(String, ModuleSettings)>,
}

/// Merges the adapter folders `adapters` (in this order, OFT adapters first: see
/// [`crate::model`]) into the HQQ model folder `base`, writing the merged folder `out`, which
/// must not exist. `backend` runs the dequantize / merge / re-quantize steps.
pub fn merge_model(
    base: &Path,
    adapters: &[PathBuf],
    out: &Path,
    backend: &Backend,
    progress: &mut dyn FnMut(MergeEvent),
) -> Result<MergeSummary> {
    let started = Instant::now();
    if out.exists() {
        return Err(Error::Io {
            path: out.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the output exists; it is never overwritten (remove it or choose another)",
            ),
        });
    }
    if !base.is_dir() {
        return Err(Error::config(format!(
            "--base {}: a model folder (config.json and its safetensors) is expected",
            base.display()
        )));
    }
    let files = ModelFiles::open(base)?;
    check_mergeable(&files)?;
    let adapters = resolve_adapters(&files, adapters)?;
    let touched: Vec<String> = files
        .modules
        .iter()
        .filter(|m| {
            adapters
                .iter()
                .any(|a| a.targets.iter().any(|(t, _)| *t == m.name))
        })
        .map(|m| m.name.clone())
        .collect();
    progress(MergeEvent::Start {
        touched: touched.len(),
        modules: files.modules.len(),
    });

    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let out_name = out
        .file_name()
        .ok_or_else(|| Error::config(format!("--out {}: not a folder name", out.display())))?
        .to_string_lossy()
        .into_owned();
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{out_name}.partial-"))
        .tempdir_in(parent)
        .map_err(|source| Error::Io {
            path: parent.display().to_string(),
            source,
        })?;
    copy_other_files(&files, staging.path())?;

    let mut pending: HashMap<String, Rewritten> = HashMap::new();
    let mut bytes = 0;
    for shard in &files.shards {
        let names = shard.names();
        for name in &names {
            let Some(module) = rewritten_module(name, &touched) else {
                continue;
            };
            if !pending.contains_key(module) {
                let merged = merge_module(&files, module, &adapters, backend)?;
                pending.insert(module.to_string(), Rewritten::new(&files, module, &merged)?);
                progress(MergeEvent::Merged {
                    module: module.to_string(),
                });
            }
        }
        let mut views = Vec::with_capacity(names.len());
        for name in &names {
            let missing = || Error::MissingTensor {
                name: name.clone(),
                file: shard.path.display().to_string(),
            };
            let info = shard.info(name).ok_or_else(missing)?;
            let data: &[u8] = match rewritten_module(name, &touched) {
                Some(module) => pending
                    .get(module)
                    .and_then(|r| r.tensors.get(name))
                    .ok_or_else(missing)?,
                None => shard.data(name).ok_or_else(missing)?,
            };
            let raw = Raw {
                dtype: info.dtype,
                shape: &info.shape,
                data,
            };
            views.push((name.clone(), raw));
        }
        let target = staging.path().join(&shard.file_name);
        safetensors::serialize_to_file(views, shard.header_metadata().clone(), &target).map_err(
            |e| Error::Safetensors {
                file: target.display().to_string(),
                reason: e.to_string(),
            },
        )?;
        let written = file_size(&target)?;
        bytes += written;
        progress(MergeEvent::Written {
            file: shard.file_name.clone(),
            bytes: written,
        });
        // A module straddling shards stays until its last rewritten tensor is written.
        for name in &names {
            if let Some(module) = rewritten_module(name, &touched) {
                if let Some(r) = pending.get_mut(module) {
                    r.unwritten -= 1;
                }
            }
        }
        pending.retain(|_, r| r.unwritten > 0);
    }
    for entry in std::fs::read_dir(staging.path()).map_err(io_error(staging.path()))? {
        let path = entry.map_err(io_error(staging.path()))?.path();
        if !files.shards.iter().any(|s| path.ends_with(&s.file_name)) {
            bytes += file_size(&path)?;
        }
    }
    let kept = staging.keep();
    std::fs::rename(&kept, out).map_err(|source| {
        let _ = std::fs::remove_dir_all(&kept);
        Error::Io {
            path: out.display().to_string(),
            source,
        }
    })?;
    Ok(MergeSummary {
        out: out.to_path_buf(),
        modules: files.modules.len(),
        merged: touched.len(),
        files: files.shards.len(),
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Only HQQ can be re-quantized after a merge.
fn check_mergeable(files: &ModelFiles) -> Result<()> {
    let method = files.quant_method();
    let forward_only = |name: &str| {
        Error::Merge(format!(
            "{}: a {name} base cannot take a merge: {name} is forward-only here (its weights \
             cannot be re-quantized after adding the adapter's change, and PEFT refuses the same \
             merge); run the adapters unmerged (`quantadapt run`) instead",
            files.dir.display()
        ))
    };
    match method {
        Some("gptq") => return Err(forward_only("GPTQ")),
        Some("eetq") => return Err(forward_only("EETQ")),
        Some("hqq") | None => {}
        Some(other) => {
            return Err(Error::Merge(format!(
                "{}: quant_method `{other}` is not supported (HQQ bases can be merged)",
                files.dir.display()
            )));
        }
    }
    if let Some(m) = files.modules.iter().find(|m| m.format != "hqq") {
        return Err(forward_only(&m.format.to_uppercase()));
    }
    if files.modules.is_empty() {
        return Err(Error::Merge(format!(
            "{}: no HQQ module found",
            files.dir.display()
        )));
    }
    Ok(())
}

/// Reads every adapter folder and resolves it against the base's modules; the same folder
/// given twice is refused.
fn resolve_adapters(files: &ModelFiles, dirs: &[PathBuf]) -> Result<Vec<MergeAdapter>> {
    if dirs.is_empty() {
        return Err(Error::config("no --adapter given: nothing to merge"));
    }
    let mut modules = Vec::new();
    for m in &files.modules {
        modules.push((m.name.as_str(), module_in_features(files, &m.name)?));
    }
    let mut seen: Vec<PathBuf> = Vec::new();
    let mut adapters = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let canonical = std::fs::canonicalize(dir).map_err(io_error(dir))?;
        if seen.contains(&canonical) {
            return Err(Error::config(format!(
                "--adapter {} is given twice; merging it twice would apply it twice",
                dir.display()
            )));
        }
        seen.push(canonical);
        let name = format!("adapter{i}");
        let peft = PeftAdapterDir::open(dir)?;
        let targets = peft.resolve_targets(modules.iter().copied())?;
        adapters.push(MergeAdapter {
            name,
            peft,
            targets,
        });
    }
    // OFT first, then the LoRA family, each in the order given.
    adapters.sort_by_key(|a| a.peft.peft_type() != "OFT");
    Ok(adapters)
}

fn module_in_features(files: &ModelFiles, module: &str) -> Result<usize> {
    let tensors = files.module_tensors(module)?;
    let shape = tensors.get(&format!("{module}.shape"))?.to_i64()?;
    match shape[..] {
        [_, inp] if inp > 0 => Ok(inp as usize),
        _ => Err(Error::shape(
            &format!("{module}.shape"),
            "[out, in]",
            &[shape.len()],
        )),
    }
}

/// Loads `module`, attaches the adapters that target it and merges them.
fn merge_module(
    files: &ModelFiles,
    module: &str,
    adapters: &[MergeAdapter],
    backend: &Backend,
) -> Result<HqqWeight> {
    let base = files.load_module(module)?;
    let (inp, out) = (base.in_features(), base.out_features());
    let mut layer = QuantLinear::new(base, backend.clone())?;
    let mut names = Vec::new();
    for a in adapters {
        if a.targets.iter().any(|(t, _)| t == module) {
            layer.add_adapter(Adapter::from_peft(
                &a.name,
                &a.peft,
                Some(module),
                inp,
                out,
            )?)?;
            names.push(a.name.as_str());
        }
    }
    layer.merge(&names, true)?;
    match layer.base() {
        QuantWeight::Hqq(w) => Ok(w.clone()),
        _ => Err(Error::Merge(format!("module `{module}` is not HQQ"))),
    }
}

/// The module whose `W_q` / `scale` / `zero` tensor `name` is, when that module is touched.
fn rewritten_module<'a>(name: &str, touched: &'a [String]) -> Option<&'a str> {
    let (module, leaf) = name.rsplit_once('.')?;
    if !REWRITTEN.contains(&leaf) {
        return None;
    }
    touched
        .iter()
        .find(|t| t.as_str() == module)
        .map(String::as_str)
}

/// A merged module's new tensors, encoded as the input stored them.
struct Rewritten {
    tensors: HashMap<String, Vec<u8>>,
    /// How many of them are still to be written.
    unwritten: usize,
}

impl Rewritten {
    fn new(files: &ModelFiles, module: &str, merged: &HqqWeight) -> Result<Self> {
        let original = files.module_tensors(module)?;
        let mut tensors = HashMap::new();
        for leaf in REWRITTEN {
            let name = format!("{module}.{leaf}");
            let stored = original.get(&name)?;
            let bytes = match leaf {
                "W_q" => merged.packed.clone(),
                "scale" => encode_floats(&name, stored.dtype, &merged.scale)?,
                _ => encode_floats(&name, stored.dtype, &merged.zero)?,
            };
            if bytes.len() != stored.bytes.len() {
                return Err(Error::Merge(format!(
                    "`{name}`: the merged tensor has {} bytes, the input {}",
                    bytes.len(),
                    stored.bytes.len()
                )));
            }
            tensors.insert(name, bytes);
        }
        Ok(Self {
            tensors,
            unwritten: REWRITTEN.len(),
        })
    }
}

fn encode_floats(name: &str, dtype: Dtype, values: &[f32]) -> Result<Vec<u8>> {
    Ok(match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        other => {
            return Err(Error::Dtype {
                name: name.to_string(),
                expected: "F32, F16 or BF16".into(),
                found: format!("{other:?}"),
            });
        }
    })
}

/// A tensor to write, borrowed from the input or from a merged module.
struct Raw<'a> {
    dtype: Dtype,
    shape: &'a [usize],
    data: &'a [u8],
}

impl View for Raw<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data)
    }

    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Copies every file of the input folder that is not a shard (config.json, the index, ...).
fn copy_other_files(files: &ModelFiles, to: &Path) -> Result<()> {
    for entry in std::fs::read_dir(&files.dir).map_err(io_error(&files.dir))? {
        let entry = entry.map_err(io_error(&files.dir))?;
        let path = entry.path();
        let is_shard = files.shards.iter().any(|s| s.path == path);
        if path.is_file() && !is_shard {
            let target = to.join(entry.file_name());
            std::fs::copy(&path, &target).map_err(io_error(&path))?;
        }
    }
    Ok(())
}

fn file_size(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path).map_err(io_error(path))?.len())
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}
