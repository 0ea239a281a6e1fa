//! A model folder as `save_pretrained` writes it: `config.json`, and `model.safetensors` or
//! `model.safetensors.index.json` with shards (a module's tensors may straddle two shards). Also
//! accepts a single safetensors file or an index file. Lists the quantized modules and loads any
//! of them as a [`QuantWeight`]; the writer of `quantadapt merge` reads shards through it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use safetensors::tensor::{Metadata, TensorInfo};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::formats::QuantWeight;
use crate::formats::gptq::GptqConfig;
use crate::io::{HostTensor, TensorFile};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const CONFIG_FILE: &str = "config.json";

/// The tensor that marks a quantized module of each format.
const MARKERS: [(&str, &str); 3] = [
    ("hqq", ".W_q"),
    ("gptq", ".qweight"),
    ("eetq", ".weight_scales"),
];

/// One safetensors file: its bytes, parsed header and header length.
pub struct Shard {
    pub file_name: String,
    pub path: PathBuf,
    bytes: Vec<u8>,
    header_len: usize,
    metadata: Metadata,
}

impl Shard {
    fn open(path: &Path) -> Result<Self> {
        let bytes = crate::io::read_file(path)?;
        let label = path.display().to_string();
        let (header_len, metadata) =
            SafeTensors::read_metadata(&bytes).map_err(|e| Error::Safetensors {
                file: label.clone(),
                reason: e.to_string(),
            })?;
        // Validates every tensor's offsets against the buffer.
        SafeTensors::deserialize(&bytes).map_err(|e| Error::Safetensors {
            file: label,
            reason: e.to_string(),
        })?;
        Ok(Self {
            file_name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: path.to_path_buf(),
            bytes,
            header_len,
            metadata,
        })
    }

    /// Tensor names in file order.
    pub fn names(&self) -> Vec<String> {
        self.metadata.offset_keys()
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.metadata.info(name)
    }

    /// The header's `__metadata__` (transformers writes `{"format": "pt"}`).
    pub fn header_metadata(&self) -> &Option<HashMap<String, String>> {
        self.metadata.metadata()
    }

    /// The stored bytes of tensor `name`.
    pub fn data(&self, name: &str) -> Option<&[u8]> {
        let info = self.metadata.info(name)?;
        let start = 8 + self.header_len;
        self.bytes
            .get(start + info.data_offsets.0..start + info.data_offsets.1)
    }
}

/// A quantized module of the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleEntry {
    pub name: String,
    /// `"hqq"`, `"gptq"` or `"eetq"`.
    pub format: &'static str,
}

/// The files of one model.
pub struct ModelFiles {
    pub dir: PathBuf,
    /// `config.json`, when the folder has one.
    pub config: Option<Value>,
    /// Shards in the order the index names them (one for a single file).
    pub shards: Vec<Shard>,
    /// Tensor name -> shard index.
    location: HashMap<String, usize>,
    /// Quantized modules in model order (layer indices numerically).
    pub modules: Vec<ModuleEntry>,
    /// Present when the model came with an index.
    pub index: Option<PathBuf>,
}

impl ModelFiles {
    /// Opens a model folder, a safetensors file or an index file.
    pub fn open(path: &Path) -> Result<Self> {
        let (dir, index) = match path.is_dir() {
            true => (
                path.to_path_buf(),
                Some(path.join(INDEX_FILE)).filter(|i| i.is_file()),
            ),
            false => {
                let dir = path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .to_path_buf();
                let index = path.to_string_lossy().ends_with(".json");
                (dir, index.then(|| path.to_path_buf()))
            }
        };
        let shard_paths = match (&index, path.is_dir()) {
            (Some(index), _) => shard_files(index, &dir)?,
            (None, true) => vec![dir.join(SINGLE_FILE)],
            (None, false) => vec![path.to_path_buf()],
        };
        let shards = shard_paths
            .iter()
            .map(|p| Shard::open(p))
            .collect::<Result<Vec<_>>>()?;
        let mut location = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for name in shard.names() {
                if let Some(other) = location.insert(name.clone(), i) {
                    return Err(Error::config(format!(
                        "tensor `{name}` is in both {} and {}",
                        shards[other].file_name, shard.file_name
                    )));
                }
            }
        }
        let config_path = dir.join(CONFIG_FILE);
        let config = match config_path.is_file() {
            true => Some(
                serde_json::from_slice(&crate::io::read_file(&config_path)?).map_err(|e| {
                    Error::config(format!("{}: not valid JSON: {e}", config_path.display()))
                })?,
            ),
            false => None,
        };
        let modules = list_modules(location.keys().map(String::as_str));
        Ok(Self {
            dir,
            config,
            shards,
            location,
            modules,
            index,
        })
    }

    /// `quantization_config.quant_method` of `config.json` (`"hqq"`, `"gptq"`, ...).
    pub fn quant_method(&self) -> Option<&str> {
        self.config.as_ref()?["quantization_config"]["quant_method"].as_str()
    }

    /// The module's entry, for any spelling of its name (see
    /// [`crate::adapters::peft_config::module_name`]).
    pub fn module(&self, name: &str) -> Result<&ModuleEntry> {
        let name = crate::adapters::peft_config::module_name(name);
        self.modules.iter().find(|m| m.name == name).ok_or_else(|| {
            Error::config(format!(
                "{}: no quantized module `{name}` (modules: {})",
                self.dir.display(),
                self.modules
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// The shard holding tensor `name`.
    pub fn shard_of(&self, name: &str) -> Option<usize> {
        self.location.get(name).copied()
    }

    /// The tensors under `<module>.`, copied out of whichever shards hold them.
    pub fn module_tensors(&self, module: &str) -> Result<TensorFile> {
        let prefix = format!("{module}.");
        let mut file = TensorFile {
            label: format!("{} ({module})", self.dir.display()),
            ..Default::default()
        };
        for (name, &shard) in &self.location {
            if !name.starts_with(&prefix) {
                continue;
            }
            let s = &self.shards[shard];
            let (Some(info), Some(bytes)) = (s.info(name), s.data(name)) else {
                continue;
            };
            file.insert(HostTensor::from_raw(
                name,
                info.dtype,
                &info.shape,
                bytes.to_vec(),
            ));
        }
        Ok(file)
    }

    /// Loads one quantized module.
    pub fn load_module(&self, name: &str) -> Result<QuantWeight> {
        let entry = self.module(name)?;
        let file = self.module_tensors(&entry.name)?;
        QuantWeight::from_file(&file, Some(entry.format), Some(&entry.name), || {
            GptqConfig::from_dir(&self.dir)
        })
    }
}

/// The shard files an index names, in the order they first appear in its `weight_map`.
fn shard_files(index: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let text = crate::io::read_file(index)?;
    let value: Value = serde_json::from_slice(&text)
        .map_err(|e| Error::config(format!("{}: not valid JSON: {e}", index.display())))?;
    let map = value["weight_map"]
        .as_object()
        .ok_or_else(|| Error::config(format!("{}: no `weight_map` object", index.display())))?;
    let mut files: Vec<String> = Vec::new();
    for file in map.values() {
        let file = file.as_str().ok_or_else(|| {
            Error::config(format!(
                "{}: a `weight_map` value is not a file name",
                index.display()
            ))
        })?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(Error::config(format!(
                "{}: shard `{file}` is not a file name in the model folder",
                index.display()
            )));
        }
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
    }
    files.sort();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Quantized modules among tensor names, in model order: sorted by name with digit runs compared
/// as numbers, so `layers.2` comes before `layers.10`; within a layer, attention before MLP and
/// the projections in Llama's order (q, k, v, o, gate, up, down).
fn list_modules<'a>(names: impl Iterator<Item = &'a str>) -> Vec<ModuleEntry> {
    let mut modules: BTreeMap<Vec<SortKey>, ModuleEntry> = BTreeMap::new();
    for name in names {
        for (format, marker) in MARKERS {
            if let Some(module) = name.strip_suffix(marker) {
                modules.insert(
                    sort_key(module),
                    ModuleEntry {
                        name: module.to_string(),
                        format,
                    },
                );
            }
        }
    }
    modules.into_values().collect()
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SortKey {
    Number(u64),
    Known(usize),
    Text(String),
}

fn sort_key(module: &str) -> Vec<SortKey> {
    const ORDER: [&str; 9] = [
        "self_attn",
        "mlp",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    module
        .split('.')
        .map(
            |seg| match (seg.parse(), ORDER.iter().position(|o| *o == seg)) {
                (Ok(n), _) => SortKey::Number(n),
                (_, Some(i)) => SortKey::Known(i),
                _ => SortKey::Text(seg.to_string()),
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_come_in_model_order() {
        let names = [
            "model.layers.10.mlp.down_proj.W_q",
            "model.layers.2.self_attn.q_proj.W_q",
            "model.layers.2.mlp.gate_proj.W_q",
            "model.layers.2.self_attn.o_proj.W_q",
            "model.layers.2.self_attn.k_proj.qweight",
            "model.layers.2.self_attn.q_proj.scale",
        ];
        let listed: Vec<(String, &str)> = list_modules(names.into_iter())
            .into_iter()
            .map(|m| (m.name, m.format))
            .collect();
        assert_eq!(
            listed,
            [
                ("model.layers.2.self_attn.q_proj".to_string(), "hqq"),
                ("model.layers.2.self_attn.k_proj".to_string(), "gptq"),
                ("model.layers.2.self_attn.o_proj".to_string(), "hqq"),
                ("model.layers.2.mlp.gate_proj".to_string(), "hqq"),
                ("model.layers.10.mlp.down_proj".to_string(), "hqq"),
            ]
        );
    }
}
