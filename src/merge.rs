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
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use safetensors::Dtype;
use safetensors::tensor::View;

use crate::adapters::Adapter;
use crate::adapters::peft_config::ModuleSettings;
use crate::adapters::peft_dir::PeftAdapterDir;
use crate::checkpoint::{Checkpoint, Format, Shard};
use crate::error::{Error, Result};
use crate::formats::hqq::HqqWeight;
use crate::formats::{QuantFormat, QuantWeight};
use crate::layer::{Backend, QuantLinear};

/// The tensors of an HQQ module a merge rewrites.
const REWRITTEN: [&str; 3] = ["W_q", "scale", "zero"];

/// What a merge reports as it goes.
#[derive(Clone, Debug)]
pub enum MergeEvent {
    /// Before the first module: how many modules the adapters touch (of how many).
    Start {
        /// Modules at least one adapter targets.
        touched: usize,
        /// Quantized modules in the checkpoint.
        modules: usize,
    },
    /// A touched module is merged and re-quantized.
    Merged {
        /// The module's name in the checkpoint.
        module: String,
    },
    /// A shard file is written.
    Written {
        /// The shard's file name.
        file: String,
        /// Size of the written file in bytes.
        bytes: u64,
    },
}

/// What a finished merge wrote.
#[derive(Clone, Debug)]
pub struct MergeSummary {
    /// The output checkpoint directory.
    pub out: PathBuf,
    /// Quantized modules in the checkpoint.
    pub modules: usize,
    /// Modules merged and re-quantized.
    pub merged: usize,
    /// Shard files written.
    pub files: usize,
    /// Total bytes of the written shards.
    pub bytes: u64,
    /// Wall-clock duration of the merge.
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
    let checkpoint = Checkpoint::open(base)?;
    check_mergeable(&checkpoint)?;
    let adapters = resolve_adapters(&checkpoint, adapters)?;
    let touched: Vec<String> = checkpoint
        .modules()
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
        modules: checkpoint.modules().len(),
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
        .map_err(io_error(parent))?;
    let mut bytes = copy_other_files(&checkpoint, staging.path())?;

    let mut pending: HashMap<String, Rewritten> = HashMap::new();
    for shard in checkpoint.shards() {
        for entry in shard.tensors() {
            let Some(module) = rewritten_module(&entry.name, &touched) else {
                continue;
            };
            if !pending.contains_key(module) {
                let merged = merge_module(&checkpoint, module, &adapters, backend)?;
                let rewritten = Rewritten::new(&checkpoint, module, &merged)?;
                pending.insert(module.to_string(), rewritten);
                progress(MergeEvent::Merged {
                    module: module.to_string(),
                });
            }
        }
        let target = staging.path().join(shard.file_name());
        write_shard(shard, &pending, &touched, &target)?;
        let written = file_size(&target)?;
        bytes += written;
        progress(MergeEvent::Written {
            file: shard.file_name(),
            bytes: written,
        });
        // A module straddling shards stays until its last rewritten tensor is written.
        for entry in shard.tensors() {
            if let Some(module) = rewritten_module(&entry.name, &touched) {
                if let Some(r) = pending.get_mut(module) {
                    r.unwritten -= 1;
                }
            }
        }
        pending.retain(|_, r| r.unwritten > 0);
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
        modules: checkpoint.modules().len(),
        merged: touched.len(),
        files: checkpoint.shards().len(),
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Writes `shard` to `target` with the same tensors, order and header metadata: the rewritten
/// tensors from `pending`, every other one read from the input as it is written.
fn write_shard(
    shard: &Shard,
    pending: &HashMap<String, Rewritten>,
    touched: &[String],
    target: &Path,
) -> Result<()> {
    let read_error = RefCell::new(None);
    let mut views = Vec::with_capacity(shard.tensors().len());
    for entry in shard.tensors() {
        let data = match rewritten_module(&entry.name, touched) {
            Some(module) => Source::Merged(
                pending
                    .get(module)
                    .and_then(|r| r.tensors.get(&entry.name))
                    .ok_or_else(|| Error::MissingTensor {
                        name: entry.name.clone(),
                        file: target.display().to_string(),
                    })?,
            ),
            None => Source::Input {
                shard,
                error: &read_error,
            },
        };
        let view = Tensor {
            name: &entry.name,
            dtype: entry.dtype,
            shape: &entry.shape,
            len: entry.len() as usize,
            data,
        };
        views.push((entry.name.clone(), view));
    }
    let metadata: HashMap<String, String> = shard
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let metadata = (!metadata.is_empty()).then_some(metadata);
    let written = safetensors::serialize_to_file(views, metadata, target);
    if let Some(e) = read_error.into_inner() {
        return Err(e);
    }
    written.map_err(|e| Error::Safetensors {
        file: target.display().to_string(),
        reason: e.to_string(),
    })
}

/// Only HQQ can be re-quantized after a merge.
fn check_mergeable(checkpoint: &Checkpoint) -> Result<()> {
    let forward_only = |name: &str| {
        Error::Merge(format!(
            "{}: a {name} base cannot take a merge: {name} is forward-only here (its weights \
             cannot be re-quantized after adding the adapter's change, and PEFT refuses the same \
             merge); run the adapters unmerged (`quantadapt run`) instead",
            checkpoint.dir().display()
        ))
    };
    match checkpoint
        .modules()
        .iter()
        .find(|m| m.format != Format::Hqq)
    {
        Some(m) => Err(forward_only(&m.format.name().to_uppercase())),
        None => Ok(()),
    }
}

/// Reads every adapter folder and resolves it against the base's modules; the same folder
/// given twice is refused.
fn resolve_adapters(checkpoint: &Checkpoint, dirs: &[PathBuf]) -> Result<Vec<MergeAdapter>> {
    if dirs.is_empty() {
        return Err(Error::config("no --adapter given: nothing to merge"));
    }
    let modules: Vec<(&str, usize)> = checkpoint
        .modules()
        .iter()
        .map(|m| (m.name.as_str(), m.in_features))
        .collect();
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

/// Loads `module`, attaches the adapters that target it and merges them.
fn merge_module(
    checkpoint: &Checkpoint,
    module: &str,
    adapters: &[MergeAdapter],
    backend: &Backend,
) -> Result<HqqWeight> {
    let base = checkpoint.load_module(module)?;
    let (inp, out) = (base.in_features(), base.out_features());
    let mut layer = QuantLinear::new(base, backend.clone())?;
    let mut names = Vec::new();
    for a in adapters {
        if a.targets.iter().any(|(t, _)| t == module) {
            let adapter = Adapter::from_peft(&a.name, &a.peft, Some(module), inp, out)?;
            layer.add_adapter(adapter)?;
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
    fn new(checkpoint: &Checkpoint, module: &str, merged: &HqqWeight) -> Result<Self> {
        let mut tensors = HashMap::new();
        for leaf in REWRITTEN {
            let name = format!("{module}.{leaf}");
            let (_, stored) = checkpoint
                .locate(&name)
                .ok_or_else(|| Error::MissingTensor {
                    name: name.clone(),
                    file: checkpoint.path().display().to_string(),
                })?;
            let bytes = match leaf {
                "W_q" => merged.packed.clone(),
                "scale" => encode_floats(&name, stored.dtype, &merged.scale)?,
                _ => encode_floats(&name, stored.dtype, &merged.zero)?,
            };
            if bytes.len() as u64 != stored.len() {
                return Err(Error::Merge(format!(
                    "`{name}`: the merged tensor has {} bytes, the input {}",
                    bytes.len(),
                    stored.len()
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

/// Where a written tensor's bytes come from.
enum Source<'a> {
    Merged(&'a [u8]),
    /// Read from the input when written (one tensor in memory at a time); a read error is kept
    /// in `error` and fails the write.
    Input {
        shard: &'a Shard,
        error: &'a RefCell<Option<Error>>,
    },
}

/// One tensor to write.
struct Tensor<'a> {
    name: &'a str,
    dtype: Dtype,
    shape: &'a [usize],
    len: usize,
    data: Source<'a>,
}

impl View for Tensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match &self.data {
            Source::Merged(bytes) => Cow::Borrowed(bytes),
            Source::Input { shard, error } => match shard.read_bytes(self.name) {
                Ok(bytes) => Cow::Owned(bytes),
                Err(e) => {
                    error.borrow_mut().get_or_insert(e);
                    // Keeps the file's layout; the write is failed afterwards.
                    Cow::Owned(vec![0; self.len])
                }
            },
        }
    }

    fn data_len(&self) -> usize {
        self.len
    }
}

/// Copies every file of the input folder that is not a shard (config.json, the index, ...);
/// returns the bytes copied.
fn copy_other_files(checkpoint: &Checkpoint, to: &Path) -> Result<u64> {
    let dir = checkpoint.dir();
    let mut bytes = 0;
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_shard = checkpoint.shards().iter().any(|s| s.file_name() == name);
        if path.is_file() && !is_shard {
            bytes += std::fs::copy(&path, to.join(&name)).map_err(io_error(&path))?;
        }
    }
    Ok(bytes)
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
