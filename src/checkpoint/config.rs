//! The `quantization_config` block of a model's `config.json`: which format the checkpoint is
//! in and with what settings. GPTQ's settings are read by [`GptqConfig`], EETQ's checked by
//! [`crate::formats::eetq::check_config`]; this module reads HQQ's as transformers saves it.

use std::fmt;
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::formats::eetq;
use crate::formats::gptq::GptqConfig;

/// A quantized weight format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// HQQ (`quant_method: "hqq"`).
    Hqq,
    /// GPTQ (`quant_method: "gptq"`, or a `quantize_config.json`).
    Gptq,
    /// EETQ int8 (`quant_method: "eetq"`).
    Eetq,
}

impl Format {
    /// `"hqq"`, `"gptq"` or `"eetq"`, as [`crate::formats::QuantFormat::format_name`] says.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hqq => "hqq",
            Self::Gptq => "gptq",
            Self::Eetq => "eetq",
        }
    }

    /// The format named `name` (any case).
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Hqq, Self::Gptq, Self::Eetq]
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// HQQ's `weight_quant_params` as transformers' `HqqConfig` writes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HqqParams {
    /// Bits per code.
    pub nbits: u32,
    /// `None`: `group_size: null`, one group per row (channel-wise).
    pub group_size: Option<usize>,
    /// HQQ grouping axis, 0 or 1.
    pub axis: usize,
}

/// `quantization_config` with `quant_method: "hqq"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HqqCheckpointConfig {
    /// `quant_config.weight_quant_params` (or the block's own `nbits`, `group_size`, `axis`);
    /// `None` when `quant_config` holds one entry per module kind (transformers' dynamic
    /// config): each module's stored meta says then.
    pub weight_quant_params: Option<HqqParams>,
    /// Modules left unquantized (`lm_head`, ...), as written.
    pub skip_modules: Vec<String>,
}

/// What `config.json` (or, for GPTQ, `quantize_config.json`) says the checkpoint holds.
#[derive(Clone, Debug, PartialEq)]
pub enum QuantizationConfig {
    /// HQQ, with its quantization parameters and skipped modules.
    Hqq(HqqCheckpointConfig),
    /// GPTQ, with its bits, group size and ordering.
    Gptq(GptqConfig),
    /// EETQ int8, per output channel; `modules_to_not_convert` as written.
    Eetq {
        /// Modules left unquantized.
        modules_to_not_convert: Vec<String>,
    },
}

impl QuantizationConfig {
    /// Which format the config describes.
    pub fn format(&self) -> Format {
        match self {
            Self::Hqq(_) => Format::Hqq,
            Self::Gptq(_) => Format::Gptq,
            Self::Eetq { .. } => Format::Eetq,
        }
    }

    /// Reads the `quantization_config` of `config.json` (`root`, parsed; `label` names it in
    /// errors) in folder `dir`. `None` without the file or the block, which leaves the format
    /// to the tensors, except that an AutoGPTQ `quantize_config.json` in `dir` says GPTQ.
    pub fn from_model_config(
        root: Option<&Value>,
        dir: &Path,
        label: &str,
    ) -> Result<Option<Self>> {
        let found = root.and_then(|r| r.get("quantization_config").map(|block| (r, block)));
        let Some((root, block)) = found else {
            return match dir.join("quantize_config.json").is_file() {
                true => Ok(Some(Self::Gptq(GptqConfig::from_dir(dir)?))),
                false => Ok(None),
            };
        };
        let method = block.get("quant_method").and_then(Value::as_str);
        match method {
            Some("hqq") => Ok(Some(Self::Hqq(parse_hqq(block, label)?))),
            Some("gptq") => Ok(Some(Self::Gptq(gptq_config(dir, block, label)?))),
            Some("eetq") => {
                eetq::check_config(root, label)?;
                Ok(Some(Self::Eetq {
                    modules_to_not_convert: string_list(block, "modules_to_not_convert", label)?,
                }))
            }
            Some(other) => Err(Error::Unsupported(format!(
                "{label}: quant_method `{other}` (quantadapt reads hqq, gptq and eetq checkpoints)"
            ))),
            None => Err(Error::config(format!(
                "{label}: `quantization_config` has no `quant_method` string"
            ))),
        }
    }
}

/// AutoGPTQ's `quantize_config.json` when present (as [`GptqConfig::from_dir`] prefers it),
/// else the block itself.
fn gptq_config(dir: &Path, block: &Value, label: &str) -> Result<GptqConfig> {
    let quantize_config = dir.join("quantize_config.json");
    if quantize_config.is_file() {
        return GptqConfig::from_quantize_config(&quantize_config);
    }
    GptqConfig::from_json(block).map_err(|e| match e {
        Error::Config(msg) => Error::Config(format!("{label}: {msg}")),
        Error::Unsupported(msg) => Error::Unsupported(format!("{label}: {msg}")),
        other => other,
    })
}

fn parse_hqq(block: &Value, label: &str) -> Result<HqqCheckpointConfig> {
    let bad = |what: String| Error::config(format!("{label}: HQQ quantization_config: {what}"));
    // transformers nests the settings in `quant_config.weight_quant_params`; a flat block
    // (`{"quant_method": "hqq", "nbits": 4, ...}`) carries them itself.
    let params = match block.get("quant_config") {
        Some(quant_config) => quant_config.get("weight_quant_params"),
        None => block.get("nbits").map(|_| block),
    };
    let weight_quant_params = match params {
        None => None,
        Some(params) => {
            let nbits = params.get("nbits").and_then(Value::as_f64);
            let nbits = match nbits {
                Some(n) if n.fract() == 0.0 && (1.0..=8.0).contains(&n) => n as u32,
                _ => {
                    return Err(bad(format!(
                        "`weight_quant_params.nbits` {} is not a bit width of 1 to 8",
                        params.get("nbits").unwrap_or(&Value::Null)
                    )));
                }
            };
            let group_size = match params.get("group_size") {
                None | Some(Value::Null) => None,
                Some(g) => Some(
                    g.as_u64()
                        .filter(|g| *g > 0)
                        .and_then(|g| usize::try_from(g).ok())
                        .ok_or_else(|| {
                            bad(format!(
                                "`weight_quant_params.group_size` {g} is not positive"
                            ))
                        })?,
                ),
            };
            let axis = match params.get("axis") {
                None => 1,
                Some(a) => match a.as_u64() {
                    Some(axis @ (0 | 1)) => axis as usize,
                    _ => return Err(bad(format!("`weight_quant_params.axis` {a} is not 0 or 1"))),
                },
            };
            Some(HqqParams {
                nbits,
                group_size,
                axis,
            })
        }
    };
    Ok(HqqCheckpointConfig {
        weight_quant_params,
        skip_modules: string_list(block, "skip_modules", label)?,
    })
}

/// A list of strings under `key`, empty when absent or null.
fn string_list(block: &Value, key: &str, label: &str) -> Result<Vec<String>> {
    match block.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    Error::config(format!("{label}: `{key}` holds {v}, not a string"))
                })
            })
            .collect(),
        Some(other) => Err(Error::config(format!(
            "{label}: `{key}` is {other}, not a list of strings"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(root: Value) -> Result<Option<QuantizationConfig>> {
        QuantizationConfig::from_model_config(Some(&root), Path::new("/nonexistent"), "config.json")
    }

    #[test]
    fn hqq_as_transformers_saves_it() {
        let config = read(json!({"quantization_config": {
            "quant_method": "hqq",
            "quant_config": {"weight_quant_params": {
                "nbits": 3, "group_size": 64, "axis": 1, "optimize": true}},
            "skip_modules": ["lm_head"]}}))
        .unwrap()
        .unwrap();
        assert_eq!(
            config,
            QuantizationConfig::Hqq(HqqCheckpointConfig {
                weight_quant_params: Some(HqqParams {
                    nbits: 3,
                    group_size: Some(64),
                    axis: 1
                }),
                skip_modules: vec!["lm_head".to_string()],
            })
        );
        assert_eq!(config.format(), Format::Hqq);
    }

    #[test]
    fn other_blocks() {
        assert_eq!(read(json!({"model_type": "llama"})).unwrap(), None);
        let eetq = read(json!({"quantization_config": {
            "quant_method": "eetq", "weights": "int8", "modules_to_not_convert": ["lm_head"]}}));
        assert_eq!(
            eetq.unwrap().unwrap(),
            QuantizationConfig::Eetq {
                modules_to_not_convert: vec!["lm_head".to_string()]
            }
        );
        let err = |root| read(root).unwrap_err().to_string();
        assert!(err(json!({"quantization_config": {"quant_method": "awq"}})).contains("`awq`"));
        assert!(err(json!({"quantization_config": {}})).contains("no `quant_method`"));
        assert!(
            err(
                json!({"quantization_config": {"quant_method": "hqq", "quant_config": {
                "weight_quant_params": {"nbits": 9}}}})
            )
            .contains("nbits")
        );
        assert!(
            err(
                json!({"quantization_config": {"quant_method": "hqq", "quant_config": {},
                "skip_modules": "lm_head"}})
            )
            .contains("`skip_modules`")
        );
        let flat = read(json!({"quantization_config": {
            "quant_method": "hqq", "nbits": 4, "group_size": 64, "axis": 1}}));
        assert!(matches!(flat.unwrap().unwrap(), QuantizationConfig::Hqq(c)
            if c.weight_quant_params.is_some_and(|p| p.nbits == 4)));
        let gptq = read(json!({"quantization_config": {
            "quant_method": "gptq", "bits": 4, "group_size": 128}}));
        assert!(matches!(gptq.unwrap().unwrap(), QuantizationConfig::Gptq(c) if c.bits == 4));
        assert!(
            err(json!({"quantization_config": {"quant_method": "gptq"}}))
                .contains("config.json: GPTQ config has no `bits`")
        );
    }
}
