//! GPTQ quantization settings, read from AutoGPTQ's `quantize_config.json` or from the
//! `quantization_config` block of a transformers / GPTQModel `config.json`.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// How `qzeros` stores the zero point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GptqZeros {
    /// AutoGPTQ / `checkpoint_format: "gptq"`: each field holds `zero - 1`, decoded per field as
    /// `(field + 1) & mask`.
    V1,
    /// GPTQModel `checkpoint_format: "gptq_v2"`: each field holds the zero itself.
    V2,
}

/// What a GPTQ layer was quantized with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptqConfig {
    /// 2, 3, 4 or 8.
    pub bits: u32,
    /// Inputs per group; `None` (`-1` in the files) is one group spanning all inputs.
    pub group_size: Option<usize>,
    /// Symmetric quantization: each group's range is symmetric about 0 and its zero point is the
    /// middle code `2^(bits-1)`. Only the quantizer reads it; dequantization takes the zeros from
    /// `qzeros`.
    pub sym: bool,
    /// Act-order: groups follow `g_idx`, which is then not monotonic.
    pub desc_act: bool,
    /// How `qzeros` stores the zero points (v1: zero minus one, v2: the zero).
    pub zeros: GptqZeros,
}

const SUPPORTED_BITS: [u32; 4] = [2, 3, 4, 8];

impl GptqConfig {
    /// Fails unless the bit width is packable and the group size is positive.
    pub fn validate(&self) -> Result<()> {
        if !SUPPORTED_BITS.contains(&self.bits) {
            return Err(Error::config(format!(
                "GPTQ bits {} is not one of {SUPPORTED_BITS:?}",
                self.bits
            )));
        }
        if self.group_size == Some(0) {
            return Err(Error::config("GPTQ group_size 0 is not valid"));
        }
        Ok(())
    }

    /// Largest code, `2^bits - 1`.
    pub fn max_code(&self) -> u32 {
        (1u32 << self.bits) - 1
    }

    /// Inputs per group for a layer with `in_features` inputs.
    pub fn group_len(&self, in_features: usize) -> usize {
        self.group_size.unwrap_or(in_features).max(1)
    }

    /// Number of groups, `ceil(in_features / group_size)` (the last group may be short).
    pub fn groups(&self, in_features: usize) -> usize {
        in_features.div_ceil(self.group_len(in_features))
    }

    /// Parses an AutoGPTQ `quantize_config.json` object or a `quantization_config` block.
    ///
    /// Missing keys take AutoGPTQ's defaults: group_size -1, sym true, and format v1. A missing
    /// desc_act reads as false; it only matters for files without `g_idx`.
    ///
    /// Fails with [`Error::Config`] for a `quant_method` other than GPTQ, `bits` missing or not
    /// 2, 3, 4 or 8, `group_size` 0, or a value of the wrong type, and with
    /// [`Error::Unsupported`] for Marlin, BitBLAS, a non-int32 pack dtype or per-module
    /// `dynamic` overrides.
    pub fn from_json(value: &Value) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| Error::config("GPTQ quantization config is not a JSON object"))?;
        check_method(obj)?;
        check_pack_dtype(obj)?;
        check_no_dynamic(obj)?;
        let config = Self {
            bits: parse_bits(obj)?,
            group_size: parse_group_size(obj)?,
            sym: parse_bool(obj, "sym", true)?,
            desc_act: parse_bool(obj, "desc_act", false)?,
            zeros: parse_format(obj)?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads AutoGPTQ's `quantize_config.json`.
    pub fn from_quantize_config(path: &Path) -> Result<Self> {
        Self::from_json(&read_json(path)?).map_err(|e| in_file(path, e))
    }

    /// Reads the `quantization_config` block of a model's `config.json`.
    pub fn from_model_config(path: &Path) -> Result<Self> {
        let root = read_json(path)?;
        let block = root.get("quantization_config").ok_or_else(|| {
            Error::config(format!(
                "{}: no `quantization_config` block",
                path.display()
            ))
        })?;
        Self::from_json(block).map_err(|e| in_file(path, e))
    }

    /// Reads `quantize_config.json` from a checkpoint directory, or else `config.json`; fails
    /// with [`Error::Config`] when neither exists and as [`Self::from_json`] otherwise.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let quantize_config = dir.join("quantize_config.json");
        if quantize_config.is_file() {
            return Self::from_quantize_config(&quantize_config);
        }
        let model_config = dir.join("config.json");
        if model_config.is_file() {
            return Self::from_model_config(&model_config);
        }
        Err(Error::config(format!(
            "{}: neither quantize_config.json nor config.json is present",
            dir.display()
        )))
    }
}

/// Reads and parses a JSON file.
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text)
        .map_err(|e| Error::config(format!("{}: not valid JSON: {e}", path.display())))
}

fn in_file(path: &Path, error: Error) -> Error {
    match error {
        Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
        Error::Unsupported(msg) => Error::Unsupported(format!("{}: {msg}", path.display())),
        other => other,
    }
}

/// The first of `keys` that is present (the canonical name, then its aliases).
fn lookup<'a>(
    obj: &'a Map<String, Value>,
    keys: &[&'static str],
) -> Option<(&'static str, &'a Value)> {
    keys.iter()
        .find_map(|k| obj.get(*k).filter(|v| !v.is_null()).map(|v| (*k, v)))
}

fn check_method(obj: &Map<String, Value>) -> Result<()> {
    if obj.get("is_marlin_format").and_then(Value::as_bool) == Some(true) {
        return Err(marlin_unsupported());
    }
    match lookup(obj, &["quant_method"]).map(|(_, v)| v.as_str()) {
        None | Some(Some("gptq")) => Ok(()),
        Some(Some("marlin")) => Err(marlin_unsupported()),
        Some(other) => Err(Error::config(format!(
            "quant_method {} is not GPTQ",
            other.map_or("(not a string)".to_string(), |s| format!("`{s}`"))
        ))),
    }
}

fn marlin_unsupported() -> Error {
    Error::Unsupported(
        "GPTQ Marlin checkpoints (tensors `B` and `s` in Marlin's tile order); \
         re-save the model in the `gptq` format"
            .to_string(),
    )
}

fn check_pack_dtype(obj: &Map<String, Value>) -> Result<()> {
    match lookup(obj, &["pack_dtype"]).map(|(_, v)| v.as_str()) {
        None | Some(Some("int32" | "torch.int32")) => Ok(()),
        Some(other) => Err(Error::Unsupported(format!(
            "GPTQ pack_dtype {other:?}: only int32 words are supported"
        ))),
    }
}

/// GPTQModel's per-module `dynamic` overrides would change bits or group size per layer.
fn check_no_dynamic(obj: &Map<String, Value>) -> Result<()> {
    match obj.get("dynamic") {
        Some(Value::Object(map)) if !map.is_empty() => Err(Error::Unsupported(
            "GPTQ `dynamic` per-module overrides".to_string(),
        )),
        _ => Ok(()),
    }
}

fn parse_bits(obj: &Map<String, Value>) -> Result<u32> {
    let (key, value) = lookup(obj, &["bits", "w_bit"])
        .ok_or_else(|| Error::config("GPTQ config has no `bits`"))?;
    value
        .as_u64()
        .and_then(|b| u32::try_from(b).ok())
        .ok_or_else(|| Error::config(format!("GPTQ `{key}` must be an integer, got {value}")))
}

fn parse_group_size(obj: &Map<String, Value>) -> Result<Option<usize>> {
    let Some((key, value)) = lookup(obj, &["group_size", "q_group_size"]) else {
        return Ok(None);
    };
    match value.as_i64() {
        Some(-1) => Ok(None),
        Some(g) if g > 0 => usize::try_from(g)
            .map(Some)
            .map_err(|_| Error::config(format!("GPTQ `{key}` {g} is too large"))),
        _ => Err(Error::config(format!(
            "GPTQ `{key}` must be -1 or a positive integer, got {value}"
        ))),
    }
}

fn parse_bool(obj: &Map<String, Value>, key: &'static str, default: bool) -> Result<bool> {
    match lookup(obj, &[key]) {
        None => Ok(default),
        Some((_, value)) => value.as_bool().ok_or_else(|| {
            Error::config(format!("GPTQ `{key}` must be true or false, got {value}"))
        }),
    }
}

fn parse_format(obj: &Map<String, Value>) -> Result<GptqZeros> {
    let Some((key, value)) = lookup(obj, &["checkpoint_format", "format"]) else {
        return Ok(GptqZeros::V1);
    };
    match value.as_str() {
        Some("gptq") => Ok(GptqZeros::V1),
        Some("gptq_v2") => Ok(GptqZeros::V2),
        Some("marlin") => Err(marlin_unsupported()),
        Some("bitblas") => Err(Error::Unsupported(
            "GPTQ BitBLAS checkpoints (BitBLAS's own weight layout); re-save in the `gptq` format"
                .to_string(),
        )),
        Some(other) => Err(Error::Unsupported(format!(
            "GPTQ `{key}` `{other}`: only `gptq` (v1 zeros) and `gptq_v2` are supported"
        ))),
        None => Err(Error::config(format!(
            "GPTQ `{key}` must be a string, got {value}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn autogptq_file_defaults_to_v1() {
        let c = GptqConfig::from_json(&json!({
            "bits": 4, "group_size": 128, "desc_act": true, "sym": true,
            "damp_percent": 0.01, "quant_method": "gptq"
        }))
        .unwrap();
        assert_eq!(
            c,
            GptqConfig {
                bits: 4,
                group_size: Some(128),
                sym: true,
                desc_act: true,
                zeros: GptqZeros::V1
            }
        );
    }

    #[test]
    fn aliases_and_gptqmodel_format_key() {
        let c = GptqConfig::from_json(&json!({
            "w_bit": 8, "q_group_size": -1, "sym": false, "format": "gptq_v2",
            "pack_dtype": "int32", "dynamic": null
        }))
        .unwrap();
        assert_eq!((c.bits, c.group_size, c.sym), (8, None, false));
        assert_eq!(c.zeros, GptqZeros::V2);
    }

    #[test]
    fn checkpoint_format_wins_over_format() {
        let c = GptqConfig::from_json(&json!({
            "bits": 3, "checkpoint_format": "gptq", "format": "gptq_v2"
        }))
        .unwrap();
        assert_eq!(c.zeros, GptqZeros::V1);
    }

    fn err(value: Value) -> String {
        GptqConfig::from_json(&value).unwrap_err().to_string()
    }

    #[test]
    fn rejects_what_it_cannot_decode() {
        assert!(err(json!({"bits": 5})).contains("bits 5"));
        assert!(err(json!({"bits": "4"})).contains("`bits` must be an integer"));
        assert!(err(json!({"group_size": 64})).contains("no `bits`"));
        assert!(err(json!({"bits": 4, "group_size": 0})).contains("group_size"));
        assert!(err(json!({"bits": 4, "group_size": -2})).contains("group_size"));
        assert!(err(json!({"bits": 4, "checkpoint_format": "marlin"})).contains("Marlin"));
        assert!(err(json!({"bits": 4, "is_marlin_format": true})).contains("Marlin"));
        assert!(err(json!({"bits": 4, "checkpoint_format": "bitblas"})).contains("BitBLAS"));
        assert!(err(json!({"bits": 4, "format": "gptq_p"})).contains("`gptq_p`"));
        assert!(err(json!({"bits": 4, "quant_method": "awq"})).contains("`awq` is not GPTQ"));
        assert!(err(json!({"bits": 4, "pack_dtype": "int8"})).contains("pack_dtype"));
        assert!(err(json!({"bits": 4, "dynamic": {"-:lm_head": {}}})).contains("dynamic"));
        assert!(err(json!({"bits": 4, "sym": 1})).contains("`sym`"));
    }

    #[test]
    fn groups_round_up() {
        let mut c = GptqConfig::from_json(&json!({"bits": 4, "group_size": 128})).unwrap();
        assert_eq!(c.groups(192), 2);
        assert_eq!(c.groups(64), 1);
        c.group_size = None;
        assert_eq!((c.group_len(100), c.groups(100)), (100, 1));
    }
}
