//! Quantized checkpoints as `save_pretrained` writes them: a model folder (`config.json` and
//! `model.safetensors`, or `model.safetensors.index.json` and its shards), a single
//! `.safetensors` file, or an index file.
//!
//! [`Checkpoint::open`] reads the safetensors headers (and, for HQQ, each module's few-byte
//! `shape`, `nbits` and `group_size` tensors, which the listing needs); every other tensor is
//! read when asked for, from the exact byte range its header gives, so loading one module
//! costs that module's bytes whatever the size of the files.
//!
//! ```no_run
//! # fn main() -> quantadapt::Result<()> {
//! use quantadapt::checkpoint::Checkpoint;
//! use quantadapt::formats::QuantFormat;
//!
//! let checkpoint = Checkpoint::open("llama_hqq3_g64_sharded/checkpoint")?;
//! for m in checkpoint.modules() {
//!     println!("{} {} {}-bit {}x{}", m.name, m.format, m.bits, m.out_features, m.in_features);
//! }
//! // PEFT's spelling works too: `base_model.model.model.layers.0.self_attn.q_proj.`
//! let q = checkpoint.load_module("model.layers.0.self_attn.q_proj")?;
//! let w = q.dequantize();
//! # Ok(()) }
//! ```

pub mod config;
mod names;
mod shard;
mod table;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

pub use config::{Format, HqqCheckpointConfig, HqqParams, QuantizationConfig};
pub use names::{PEFT_PREFIX, canonical as canonical_module_name};
pub use shard::Shard;

use crate::error::{Error, Result};
use crate::formats::gptq::{GptqConfig, read_json};
use crate::formats::{MARKERS, QuantWeight};
use crate::io::header::TensorEntry;
use crate::io::{HostTensor, TensorFile};

/// The single-file weights of a model folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a sharded model folder.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The model's configuration, beside the weights.
pub const CONFIG_FILE: &str = "config.json";

/// One quantized linear layer of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleInfo {
    /// As the checkpoint writes it, without trailing dot: `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// Its quantization format.
    pub format: Format,
    /// Bits per weight code (8 for EETQ).
    pub bits: u32,
    /// Inputs per quantization group; `None` for one group per output channel (EETQ, GPTQ
    /// `group_size: -1`).
    pub group_size: Option<usize>,
    /// Columns of the dense `[out, in]` weight.
    pub in_features: usize,
    /// Rows of the dense `[out, in]` weight.
    pub out_features: usize,
    /// Bytes of the module's tensors as stored (packed weight, scales, zeros, meta, bias): what
    /// [`Checkpoint::load_module`] reads.
    pub bytes: u64,
    /// The full names of the module's tensors (`<name>.W_q`, ...), in file order.
    pub tensors: Vec<String>,
}

impl ModuleInfo {
    /// The prefix of its tensor names: the name and a dot (empty for a nameless layer).
    pub fn tensor_prefix(&self) -> String {
        match self.name.is_empty() {
            true => String::new(),
            false => format!("{}.", self.name),
        }
    }
}

/// `model.safetensors.index.json`: which shard holds each tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardIndex {
    /// Where the index file was read from.
    pub path: PathBuf,
    /// Tensor name -> shard file name, as written.
    pub weight_map: BTreeMap<String, String>,
    /// The index's `metadata` (`total_size`, ...), as written.
    pub metadata: serde_json::Map<String, Value>,
}

/// An opened checkpoint: its files' headers, its configuration and its quantized modules.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    dir: PathBuf,
    config_json: Option<Value>,
    quantization: Option<QuantizationConfig>,
    gptq: Option<GptqConfig>,
    index: Option<ShardIndex>,
    shards: Vec<Shard>,
    /// Tensor name -> index of its shard.
    shard_of: HashMap<String, usize>,
    modules: Vec<ModuleInfo>,
    module_index: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens a model folder, a `.safetensors` file or an index file (see the module docs).
    /// `config.json` beside the weights, when present, says the format; without it each
    /// module's format is told by its tensors (`W_q`: HQQ, `qweight`: GPTQ, `weight_scales`:
    /// EETQ). Fails on a header that is not strictly valid, a missing shard, an index that
    /// disagrees with its shards, or a checkpoint without quantized modules.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (dir, weights) = locate_weights(path)?;
        let (index, shards) = match &weights {
            Weights::Single(file) => (None, vec![Shard::open(file)?]),
            Weights::Index(file) => {
                let (index, shards) = open_index(file)?;
                (Some(index), shards)
            }
        };
        let config_path = dir.join(CONFIG_FILE);
        let config_json = match config_path.is_file() {
            true => Some(read_json(&config_path)?),
            false => None,
        };
        let quantization = QuantizationConfig::from_model_config(
            config_json.as_ref(),
            &dir,
            &config_path.display().to_string(),
        )?;
        let mut shard_of = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for t in shard.tensors() {
                if let Some(first) = shard_of.insert(t.name.clone(), i) {
                    return Err(Error::config(format!(
                        "tensor `{}` is in both {} and {}",
                        t.name,
                        shards[first].path().display(),
                        shard.path().display()
                    )));
                }
            }
        }
        let mut checkpoint = Self {
            path: path.to_path_buf(),
            dir,
            config_json,
            quantization,
            gptq: None,
            index,
            shards,
            shard_of,
            modules: Vec::new(),
            module_index: HashMap::new(),
        };
        checkpoint.find_modules()?;
        Ok(checkpoint)
    }

    /// The path given to [`Self::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The folder holding the weights (and `config.json`, when there is one).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `config.json`, parsed, when the folder has one.
    pub fn config_json(&self) -> Option<&Value> {
        self.config_json.as_ref()
    }

    /// What `config.json` (or `quantize_config.json`) says; `None` without either.
    pub fn quantization(&self) -> Option<&QuantizationConfig> {
        self.quantization.as_ref()
    }

    /// Every quantized module, sorted by name with numbers by value (`layers.2` before
    /// `layers.10`).
    pub fn modules(&self) -> &[ModuleInfo] {
        &self.modules
    }

    /// The module `name`, spelled as the checkpoint or PEFT writes it (with or without a
    /// trailing dot or `base_model.model.`). An unknown name is an error listing valid ones.
    pub fn module(&self, name: &str) -> Result<&ModuleInfo> {
        self.module_index
            .get(names::canonical(name))
            .map(|i| &self.modules[*i])
            .ok_or_else(|| self.unknown_module(name))
    }

    /// Loads module `name` (any spelling [`Self::module`] takes), reading its tensors only.
    pub fn load_module(&self, name: &str) -> Result<QuantWeight> {
        let module = self.module(name)?;
        let mut file = TensorFile {
            label: self.path.display().to_string(),
            ..Default::default()
        };
        for tensor in &module.tensors {
            file.insert(self.read_tensor(tensor)?);
        }
        let gptq = self.gptq;
        QuantWeight::from_file(
            &file,
            Some(module.format.name()),
            Some(&module.name),
            || {
                gptq.ok_or_else(|| {
                    Error::config(format!("{}: no GPTQ configuration", self.dir.display()))
                })
            },
        )
    }

    /// The safetensors files, in shard order (one for a single file).
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The index of a sharded checkpoint.
    pub fn index(&self) -> Option<&ShardIndex> {
        self.index.as_ref()
    }

    /// Where tensor `name` lies: its shard and its entry there.
    pub fn locate(&self, name: &str) -> Option<(&Shard, &TensorEntry)> {
        let shard = &self.shards[*self.shard_of.get(name)?];
        shard.entry(name).map(|entry| (shard, entry))
    }

    /// Tensor `name` with its dtype and shape, read from its byte range alone.
    pub fn read_tensor(&self, name: &str) -> Result<HostTensor> {
        match self.shard_of.get(name) {
            Some(i) => self.shards[*i].read_tensor(name),
            None => Err(Error::MissingTensor {
                name: name.to_string(),
                file: self.path.display().to_string(),
            }),
        }
    }

    fn unknown_module(&self, name: &str) -> Error {
        let wanted_kind = names::canonical(name)
            .rsplit('.')
            .next()
            .unwrap_or_default();
        let same_kind: Vec<&str> = self
            .modules
            .iter()
            .map(|m| m.name.as_str())
            .filter(|m| m.rsplit('.').next() == Some(wanted_kind))
            .collect();
        let shown: Vec<&str> = match same_kind.is_empty() {
            true => self.modules.iter().map(|m| m.name.as_str()).collect(),
            false => same_kind,
        };
        let listed: Vec<&str> = shown.iter().copied().take(5).collect();
        Error::config(format!(
            "{}: no quantized module `{name}`; modules include {}{} ({} in all)",
            self.path.display(),
            listed.join(", "),
            if shown.len() > listed.len() {
                ", ..."
            } else {
                ""
            },
            self.modules.len()
        ))
    }

    /// Finds every module by its format's marker tensor and reads what the listing needs.
    fn find_modules(&mut self) -> Result<()> {
        let mut found: BTreeMap<String, Format> = BTreeMap::new();
        for shard in &self.shards {
            for t in shard.tensors() {
                let (prefix, suffix) = t.name.rsplit_once('.').unwrap_or(("", &t.name));
                let Some((format, _)) = MARKERS.iter().find(|(_, marker)| *marker == suffix) else {
                    continue;
                };
                let format = Format::from_name(format).expect("markers name formats");
                if let Some(other) = found.insert(prefix.to_string(), format) {
                    return Err(Error::config(format!(
                        "{}: module `{prefix}` holds the tensors of both {other} and {format}",
                        self.path.display()
                    )));
                }
            }
        }
        if found.is_empty() {
            return Err(Error::config(format!(
                "{}: no quantized module (no HQQ `W_q`, GPTQ `qweight` or EETQ `weight_scales` \
                 tensor)",
                self.path.display()
            )));
        }
        self.check_formats(&found)?;
        if found.values().any(|f| *f == Format::Gptq) {
            self.gptq = Some(match &self.quantization {
                Some(QuantizationConfig::Gptq(c)) => *c,
                _ => GptqConfig::from_dir(&self.dir)?,
            });
        }
        let mut tensors_of: HashMap<&str, Vec<&TensorEntry>> = HashMap::new();
        for shard in &self.shards {
            for t in shard.tensors() {
                let prefix = t.name.rsplit_once('.').map_or("", |(p, _)| p);
                if found.contains_key(prefix) {
                    tensors_of.entry(prefix).or_default().push(t);
                }
            }
        }
        let mut modules = Vec::with_capacity(found.len());
        for (name, format) in &found {
            let tensors = &tensors_of[name.as_str()];
            modules.push(self.module_info(name, *format, tensors)?);
        }
        modules.sort_by(|a, b| names::natural_order(&a.name, &b.name));
        self.module_index = modules
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name.clone(), i))
            .collect();
        self.modules = modules;
        Ok(())
    }

    /// Every module must be of the format `config.json` declares.
    fn check_formats(&self, found: &BTreeMap<String, Format>) -> Result<()> {
        let Some(declared) = self.quantization.as_ref().map(QuantizationConfig::format) else {
            return Ok(());
        };
        match found.iter().find(|(_, f)| **f != declared) {
            Some((name, format)) => Err(Error::config(format!(
                "{}: {CONFIG_FILE} says {declared}, but module `{name}` holds {format} tensors",
                self.dir.display()
            ))),
            None => Ok(()),
        }
    }

    fn module_info(
        &self,
        name: &str,
        format: Format,
        tensors: &[&TensorEntry],
    ) -> Result<ModuleInfo> {
        let prefix = match name.is_empty() {
            true => String::new(),
            false => format!("{name}."),
        };
        let entry = |key: &str| {
            let full = format!("{prefix}{key}");
            tensors
                .iter()
                .find(|t| t.name == full)
                .copied()
                .ok_or_else(|| Error::MissingTensor {
                    name: full,
                    file: self.path.display().to_string(),
                })
        };
        let dims2 = |t: &TensorEntry| match t.shape[..] {
            [a, b] => Ok((a, b)),
            _ => Err(Error::shape(&t.name, "a 2-D shape", &t.shape)),
        };
        let (bits, group_size, in_features, out_features) = match format {
            Format::Hqq => {
                let shape = self.read_tensor(&format!("{prefix}shape"))?;
                let dims = shape.to_i64()?;
                let (out, inp) = match dims[..] {
                    [out, inp] if out > 0 && inp > 0 => (out as usize, inp as usize),
                    _ => return Err(Error::shape(&shape.name, "[out, in] > 0", &shape.shape)),
                };
                let nbits = self.read_tensor(&format!("{prefix}nbits"))?.scalar()?;
                if nbits.fract() != 0.0 || !(1.0..=8.0).contains(&nbits) {
                    return Err(Error::Unsupported(format!(
                        "{prefix}nbits {nbits}: HQQ bit widths 1 to 8 only"
                    )));
                }
                let group = self.read_tensor(&format!("{prefix}group_size"))?.scalar()?;
                (nbits as u32, Some(group as usize), inp, out)
            }
            Format::Gptq => {
                let config = self.gptq.expect("set for GPTQ modules");
                let (rows, out) = dims2(entry("qweight")?)?;
                let inp = match entry("g_idx") {
                    Ok(g_idx) => g_idx.shape.first().copied().unwrap_or_default(),
                    Err(_) => rows * 32 / config.bits as usize,
                };
                (config.bits, config.group_size, inp, out)
            }
            Format::Eetq => {
                let (inp, out) = dims2(entry("weight")?)?;
                (8, None, inp, out)
            }
        };
        Ok(ModuleInfo {
            name: name.to_string(),
            format,
            bits,
            group_size,
            in_features,
            out_features,
            bytes: tensors.iter().map(|t| t.len()).sum(),
            tensors: tensors.iter().map(|t| t.name.clone()).collect(),
        })
    }
}

enum Weights {
    Single(PathBuf),
    Index(PathBuf),
}

/// The folder and the weights of `path`. A folder's `model.safetensors` wins over its index,
/// as in transformers.
fn locate_weights(path: &Path) -> Result<(PathBuf, Weights)> {
    let missing = |what: String| Error::Io {
        path: path.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, what),
    };
    if path.is_dir() {
        let single = path.join(WEIGHTS_FILE);
        let index = path.join(INDEX_FILE);
        return match (single.is_file(), index.is_file()) {
            (true, _) => Ok((path.to_path_buf(), Weights::Single(single))),
            (false, true) => Ok((path.to_path_buf(), Weights::Index(index))),
            (false, false) => Err(missing(format!(
                "a model folder needs {WEIGHTS_FILE} or {INDEX_FILE}"
            ))),
        };
    }
    if !path.is_file() {
        return Err(missing("no such file or folder".to_string()));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let is_index = path.to_string_lossy().ends_with(".json");
    Ok((
        dir,
        match is_index {
            true => Weights::Index(path.to_path_buf()),
            false => Weights::Single(path.to_path_buf()),
        },
    ))
}

/// Reads an index and opens its shards (sorted by file name), checking that the index and the
/// shards' headers agree tensor for tensor.
fn open_index(path: &Path) -> Result<(ShardIndex, Vec<Shard>)> {
    let label = path.display().to_string();
    let bad = |what: String| Error::config(format!("{label}: {what}"));
    let root = read_json(path)?;
    let weight_map: BTreeMap<String, String> = match root.get("weight_map") {
        Some(map) => serde_json::from_value(map.clone())
            .map_err(|e| bad(format!("`weight_map` is not a map of tensor to file: {e}")))?,
        None => return Err(bad("no `weight_map`".to_string())),
    };
    let metadata = match root.get("metadata") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => return Err(bad(format!("`metadata` is {other}, not an object"))),
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let files: BTreeSet<&str> = weight_map.values().map(String::as_str).collect();
    let mut shards = Vec::with_capacity(files.len());
    for file in files {
        if Path::new(file).components().count() != 1 || file == ".." {
            return Err(bad(format!("shard `{file}` is not a file name")));
        }
        let shard_path = dir.join(file);
        if !shard_path.is_file() {
            return Err(bad(format!(
                "shard `{file}` is missing ({} is not a file)",
                shard_path.display()
            )));
        }
        let shard = Shard::open(&shard_path)?;
        for t in shard.tensors() {
            if weight_map.get(&t.name).map(String::as_str) != Some(file) {
                return Err(bad(format!(
                    "shard `{file}` holds tensor `{}`, which `weight_map` {}",
                    t.name,
                    match weight_map.get(&t.name) {
                        Some(other) => format!("puts in `{other}`"),
                        None => "does not list".to_string(),
                    }
                )));
            }
        }
        shards.push(shard);
    }
    for (tensor, file) in &weight_map {
        let shard = shards.iter().find(|s| s.file_name() == *file);
        if shard.is_none_or(|s| s.entry(tensor).is_none()) {
            return Err(bad(format!(
                "`weight_map` puts tensor `{tensor}` in `{file}`, which does not hold it"
            )));
        }
    }
    Ok((
        ShardIndex {
            path: path.to_path_buf(),
            weight_map,
            metadata,
        },
        shards,
    ))
}
