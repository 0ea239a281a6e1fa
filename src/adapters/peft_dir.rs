//! A PEFT adapter directory as `save_pretrained` writes it: `adapter_config.json` plus
//! `adapter_model.safetensors`, with tensor keys `base_model.model.<module>.<suffix>` (or plain
//! `<module>.<suffix>`, as the transformers and diffusers integrations save them). The adapter name
//! is not stored anywhere inside: PEFT strips it from the keys and names the folder after it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::adapters::peft_config::{ModuleSettings, PeftConfig};
use crate::checkpoint::canonical_module_name as module_name;
use crate::error::{Error, Result};
use crate::io::{HostTensor, TensorFile};

const CONFIG_FILE: &str = "adapter_config.json";
const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PICKLE_FILE: &str = "adapter_model.bin";
use crate::adapters::peft_config::KEY_PREFIX;

/// One loaded adapter directory. Keys are indexed by module path (without `base_model.model.`)
/// and by the suffix that follows it (`oft_R.weight`, `lora_A.weight`, ...).
#[derive(Clone, Debug)]
pub struct PeftAdapterDir {
    path: PathBuf,
    config: PeftConfig,
    tensors: TensorFile,
    /// module path -> suffix -> full tensor key.
    modules: BTreeMap<String, BTreeMap<String, String>>,
}

impl PeftAdapterDir {
    /// Reads `adapter_config.json` and `adapter_model.safetensors` from `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().to_path_buf();
        let config = read_config(&path)?;
        let weights = read_weights(&path)?;
        Self::from_bytes(path, &config, &weights)
    }

    /// The adapter from the bytes of its two files; `dir` names it in messages.
    pub fn from_bytes(dir: PathBuf, config: &[u8], weights: &[u8]) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let config: Value = serde_json::from_slice(config).map_err(|e| {
            Error::config(format!("{}: not valid JSON: {e}", config_path.display()))
        })?;
        let config = PeftConfig::from_json(&config).map_err(|e| match e {
            Error::Config(reason) => Error::config(format!("{}: {reason}", config_path.display())),
            Error::Unsupported(reason) => {
                Error::Unsupported(format!("{}: {reason}", config_path.display()))
            }
            other => other,
        })?;
        let tensors =
            TensorFile::from_bytes(weights, &dir.join(WEIGHTS_FILE).display().to_string())?;
        let modules = index_modules(&tensors)?;
        Ok(Self {
            path: dir,
            config,
            tensors,
            modules,
        })
    }

    /// The adapter directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `"OFT"`, `"LORA"`, ... as written in the config.
    pub fn peft_type(&self) -> &str {
        &self.config.peft_type
    }

    /// `adapter_config.json` as parsed.
    pub fn config(&self) -> &PeftConfig {
        &self.config
    }

    /// The tensors of `adapter_model.safetensors`, keyed as PEFT saved them.
    pub fn tensors(&self) -> &TensorFile {
        &self.tensors
    }

    /// Paths of the modules that carry adapter tensors (keys with a `lora_*`, `oft_*` or
    /// `base_layer` segment), sorted.
    pub fn modules(&self) -> Vec<&str> {
        self.modules.keys().map(String::as_str).collect()
    }

    /// Every suffix stored for `module` (empty when the module is absent).
    pub fn suffixes_of(&self, module: &str) -> Vec<&str> {
        self.modules
            .get(module)
            .map(|s| s.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// `module` itself when given; otherwise the one module whose keys include `suffix`, or,
    /// when none does, the only adapted module (so that its keys can be checked and reported).
    pub fn resolve_module(&self, module: Option<&str>, suffix: &str) -> Result<String> {
        if let Some(m) = module {
            return Ok(module_name(m).to_string());
        }
        let carriers: Vec<&String> = self
            .modules
            .iter()
            .filter(|(_, suffixes)| suffixes.contains_key(suffix))
            .map(|(m, _)| m)
            .collect();
        let only_module = (self.modules.len() == 1)
            .then(|| self.modules.keys().next())
            .flatten();
        match (carriers.as_slice(), only_module) {
            (&[one], _) | (&[], Some(one)) => Ok(one.clone()),
            (&[], None) => Err(Error::MissingTensor {
                name: format!("<module>.{suffix}"),
                file: self.tensors.label.clone(),
            }),
            (many, _) => Err(Error::config(format!(
                "{}: {} modules carry `{suffix}` ({}); name the module to load",
                self.tensors.label,
                many.len(),
                join(many.iter().map(|m| m.as_str())),
            ))),
        }
    }

    /// The tensor `base_model.model.<module>.<suffix>` or `<module>.<suffix>`; with no module,
    /// the one module carrying `suffix` (see [`Self::resolve_module`]).
    pub fn tensor_for(&self, module: Option<&str>, suffix: &str) -> Result<&HostTensor> {
        let module = self.resolve_module(module, suffix)?;
        let key = self
            .modules
            .get(&module)
            .and_then(|s| s.get(suffix))
            .ok_or_else(|| Error::MissingTensor {
                name: format!("{KEY_PREFIX}{module}.{suffix}"),
                file: self.tensors.label.clone(),
            })?;
        self.tensors.get(key)
    }
}

impl PeftAdapterDir {
    /// The modules among `modules` (name, in_features) that this adapter wraps, with their
    /// settings, in the order given. Fails when a module it targets has no tensors in the
    /// adapter file, or when the file holds tensors for a module that is not among `modules`
    /// or that the config does not select (`target_modules`, `exclude_modules`,
    /// `layers_to_transform`).
    pub fn resolve_targets<'a>(
        &self,
        modules: impl IntoIterator<Item = (&'a str, usize)>,
    ) -> Result<Vec<(String, ModuleSettings)>> {
        let label = &self.tensors.label;
        let mut targets = Vec::new();
        let mut known = std::collections::BTreeSet::new();
        for (module, in_features) in modules {
            let module = module_name(module);
            known.insert(module.to_string());
            let Some(settings) = self.config.resolve(module, in_features)? else {
                continue;
            };
            if !self.modules.contains_key(module) {
                let Some(selector) = &self.config.target_modules else {
                    continue;
                };
                return Err(Error::config(format!(
                    "{label}: `target_modules` ({selector}) selects module `{module}`, but the \
                     adapter holds no tensors for it"
                )));
            }
            targets.push((module.to_string(), settings));
        }
        for module in self.modules.keys() {
            if !known.contains(module) {
                return Err(Error::config(format!(
                    "{label}: the adapter holds tensors for `{module}`, which is not a quantized \
                     module of the checkpoint"
                )));
            }
            if !targets.iter().any(|(m, _)| m == module) {
                return Err(Error::config(format!(
                    "{label}: the adapter holds tensors for `{module}`, which its \
                     `target_modules` / `exclude_modules` / `layers_to_transform` do not select"
                )));
            }
        }
        Ok(targets)
    }
}

fn read_config(dir: &Path) -> Result<Vec<u8>> {
    let path = dir.join(CONFIG_FILE);
    std::fs::read(&path).map_err(|source| {
        let hint = (source.kind() == std::io::ErrorKind::NotFound)
            .then(|| named_adapter_hint(dir))
            .flatten();
        match hint {
            Some(hint) => Error::config(format!("{} not found; {hint}", path.display())),
            None => Error::Io {
                path: path.display().to_string(),
                source,
            },
        }
    })
}

/// PEFT saves every adapter not named `default` in a sub-folder named after it.
fn named_adapter_hint(dir: &Path) -> Option<String> {
    let subdirs: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join(CONFIG_FILE).is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    (!subdirs.is_empty()).then(|| {
        format!(
            "named adapters live in sub-folders here: {}",
            join(subdirs.iter().map(String::as_str))
        )
    })
}

fn read_weights(dir: &Path) -> Result<Vec<u8>> {
    let path = dir.join(WEIGHTS_FILE);
    if !path.is_file() && dir.join(PICKLE_FILE).is_file() {
        return Err(Error::Unsupported(format!(
            "{}: {PICKLE_FILE} is a torch pickle, which is not loaded; re-save the adapter with \
             `save_pretrained(..., safe_serialization=True)` to get {WEIGHTS_FILE}",
            dir.display()
        )));
    }
    crate::io::read_file(&path)
}

fn index_modules(tensors: &TensorFile) -> Result<BTreeMap<String, BTreeMap<String, String>>> {
    let mut modules: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for key in tensors.tensors.keys() {
        let Some((module, suffix)) = split_key(key) else {
            continue;
        };
        let suffixes = modules.entry(module.to_string()).or_default();
        if let Some(other) = suffixes.insert(suffix.to_string(), key.clone()) {
            return Err(Error::config(format!(
                "{}: keys `{other}` and `{key}` name the same tensor",
                tensors.label
            )));
        }
    }
    Ok(modules)
}

/// Splits `[base_model.model.]<module>.<suffix>` before the first segment that belongs to an
/// adapter (`lora_*`, `oft_*`) or to a wrapped base layer (`base_layer`). Other keys
/// (`modules_to_save` copies, biases of other layers) are not adapter tensors.
fn split_key(key: &str) -> Option<(&str, &str)> {
    let key = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
    let mut offset = 0;
    for segment in key.split('.') {
        let marks_adapter =
            segment.starts_with("lora_") || segment.starts_with("oft_") || segment == "base_layer";
        if marks_adapter && offset > 0 {
            return Some((&key[..offset - 1], &key[offset..]));
        }
        offset += segment.len() + 1;
    }
    None
}

fn join<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Wraps any error in [`Error::Adapter`] naming `adapter` (an error that already names one is kept).
pub(crate) fn in_adapter(adapter: &str) -> impl Fn(Error) -> Error + '_ {
    move |e| match e {
        Error::Adapter { .. } => e,
        other => Error::Adapter {
            adapter: adapter.to_string(),
            reason: other.to_string(),
        },
    }
}

pub(crate) fn adapter_error(adapter: &str, reason: impl Into<String>) -> Error {
    Error::Adapter {
        adapter: adapter.to_string(),
        reason: reason.into(),
    }
}

/// A config value that counts as "set": anything but null, false, 0, "", [] or {}.
pub(crate) fn is_set(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::Bool(true)) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_key_finds_the_module() {
        assert_eq!(
            split_key("base_model.model.model.layers.0.q_proj.lora_A.weight"),
            Some(("model.layers.0.q_proj", "lora_A.weight"))
        );
        assert_eq!(
            split_key("proj.lora_magnitude_vector"),
            Some(("proj", "lora_magnitude_vector"))
        );
        assert_eq!(
            split_key("base_model.model.proj.base_layer.bias"),
            Some(("proj", "base_layer.bias"))
        );
        assert_eq!(split_key("base_model.model.classifier.weight"), None);
        assert_eq!(split_key("lora_A.weight"), None);
    }

    #[test]
    fn is_set_treats_empty_as_unset() {
        let v: Value =
            serde_json::json!({"a": null, "b": false, "c": {}, "d": [], "e": true, "f": {"k": 1}});
        assert!(!is_set(v.get("a")));
        assert!(!is_set(v.get("b")));
        assert!(!is_set(v.get("c")));
        assert!(!is_set(v.get("d")));
        assert!(!is_set(v.get("missing")));
        assert!(is_set(v.get("e")));
        assert!(is_set(v.get("f")));
    }
}
