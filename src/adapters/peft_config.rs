//! `adapter_config.json`, parsed once, and PEFT 0.21.2's reading of it: which modules of a model
//! an adapter wraps (`target_modules`, `exclude_modules`, `layers_to_transform` /
//! `layers_pattern`) and with which settings (`rank_pattern` / `alpha_pattern`, OFT's block size
//! adjusted to a divisor of the layer's inputs).
//!
//! Module names are the model's own (`model.layers.0.self_attn.q_proj`), as PEFT matches them:
//! without the `base_model.model.` prefix of the adapter's tensor keys.

use regex::Regex;
use serde_json::Value;

use crate::adapters::lora::LoraConfig;
use crate::adapters::oft::{OftConfig, Parameterization};
use crate::checkpoint::canonical_module_name as module_name;
use crate::error::{Error, Result};

/// The prefix PEFT puts before module names in adapter tensor keys.
pub const KEY_PREFIX: &str = "base_model.model.";

/// `target_modules` or `exclude_modules`: a list of names matched as the whole name or its
/// `.name` ending, or one regex the whole name must match.
#[derive(Clone, Debug)]
pub enum ModuleSelector {
    /// Module names (or their `.name` endings) to match.
    Names(Vec<String>),
    /// A regex the whole module name must match.
    Regex {
        /// The pattern as written in the config.
        source: String,
        /// The compiled pattern, anchored at both ends.
        regex: Regex,
    },
    /// `"all-linear"`: every linear layer but the output layer (`lm_head`).
    AllLinear,
}

impl ModuleSelector {
    fn parse(key: &str, value: &Value) -> Result<Option<Self>> {
        match value {
            Value::Null => Ok(None),
            Value::String(s) if s == "all-linear" => Ok(Some(Self::AllLinear)),
            Value::String(s) => Ok(Some(Self::Regex {
                source: s.clone(),
                regex: compile(key, s, &format!("^(?:{s})$"))?,
            })),
            Value::Array(items) => {
                let names = items
                    .iter()
                    .map(|v| {
                        v.as_str().map(str::to_string).ok_or_else(|| {
                            Error::config(format!("`{key}`: {v} is not a module name"))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok((!names.is_empty()).then_some(Self::Names(names)))
            }
            other => Err(Error::config(format!(
                "`{key}` must be a list of names or a regex string, found {other}"
            ))),
        }
    }

    /// The exact-name case PEFT tests first (it bypasses `layers_to_transform`).
    fn names_exactly(&self, module: &str) -> bool {
        matches!(self, Self::Names(names) if names.iter().any(|n| n == module))
    }

    fn matches(&self, module: &str) -> bool {
        match self {
            Self::Names(names) => names.iter().any(|n| {
                module == n
                    || module
                        .strip_suffix(n.as_str())
                        .is_some_and(|head| head.ends_with('.'))
            }),
            Self::Regex { regex, .. } => regex.is_match(module),
            Self::AllLinear => module.rsplit('.').next() != Some("lm_head"),
        }
    }
}

impl std::fmt::Display for ModuleSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Names(names) => write!(f, "[{}]", names.join(", ")),
            Self::Regex { source, .. } => write!(f, "regex `{source}`"),
            Self::AllLinear => f.write_str("all-linear"),
        }
    }
}

/// `rank_pattern` or `alpha_pattern`: keys in file order, each a regex that applies to a module
/// when `(.*\.)?(KEY)$` matches its whole name; the first matching key wins.
#[derive(Clone, Debug, Default)]
pub struct Patterns<T> {
    entries: Vec<(String, Regex, T)>,
}

impl<T: Copy> Patterns<T> {
    /// Parses the JSON object `value` (null or absent: no patterns), checking each value with
    /// `value_of`.
    pub fn parse(
        field: &str,
        value: Option<&Value>,
        value_of: impl Fn(&Value) -> Option<T>,
    ) -> Result<Self> {
        let map = match value {
            None | Some(Value::Null) => return Ok(Self { entries: vec![] }),
            Some(Value::Object(map)) => map,
            Some(other) => {
                return Err(Error::config(format!(
                    "`{field}` must be an object, found {other}"
                )));
            }
        };
        let entries = map
            .iter()
            .map(|(key, v)| {
                let value = value_of(v).ok_or_else(|| {
                    Error::config(format!("`{field}` key `{key}`: {v} is not a valid value"))
                })?;
                let regex = compile(
                    &format!("{field}` key `{key}"),
                    key,
                    &format!(r"^(?:.*\.)?(?:{key})$"),
                )?;
                Ok((key.clone(), regex, value))
            })
            .collect::<Result<_>>()?;
        Ok(Self { entries })
    }

    /// The value of the first key (in file order) that applies to `module`.
    pub fn get(&self, module: &str) -> Option<T> {
        self.entries
            .iter()
            .find(|(_, regex, _)| regex.is_match(module))
            .map(|(_, _, v)| *v)
    }

    /// Every override value, in config order.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.entries.iter().map(|(_, _, v)| v)
    }
}

/// Compiles `pattern` (built from the user's `source`), naming `key` when the syntax is beyond
/// what the `regex` crate accepts (look-around, back-references).
fn compile(key: &str, source: &str, pattern: &str) -> Result<Regex> {
    Regex::new(pattern).map_err(|e| {
        Error::Unsupported(format!(
            "`{key}`: the pattern `{source}` cannot be used: {e}"
        ))
    })
}

/// Which adapter method the folder holds, with its method-specific settings.
#[derive(Clone, Debug)]
pub enum Method {
    /// An OFT adapter's config.
    Oft(OftConfig),
    /// A LoRA (rsLoRA, DoRA) adapter's config.
    Lora(LoraConfig),
}

/// What an adapter does to one module, as PEFT resolves it.
#[derive(Clone, Debug, PartialEq)]
pub enum ModuleSettings {
    /// Block rotations on the module's input.
    Oft {
        /// Number of diagonal blocks (`in_features / block_size`).
        blocks: usize,
        /// Rows and columns of one block.
        block_size: usize,
        /// How each generator becomes a rotation.
        parameterization: Parameterization,
        /// COFT's radius, if COFT is on.
        coft_eps: Option<f32>,
        /// Whether all blocks share one parameter row.
        block_share: bool,
    },
    /// A low-rank update on the module's output.
    Lora {
        /// Rank `r` after `rank_pattern`.
        rank: usize,
        /// `lora_alpha` after `alpha_pattern`.
        alpha: f64,
        /// Scale applied to `B·A`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
        scaling: f32,
        /// Whether rsLoRA scaling is used.
        rslora: bool,
        /// Whether the adapter is DoRA.
        dora: bool,
    },
}

impl std::fmt::Display for ModuleSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Oft {
                blocks,
                block_size,
                parameterization,
                coft_eps,
                block_share,
            } => {
                write!(f, "OFT {blocks} blocks of {block_size}, ")?;
                match parameterization {
                    Parameterization::Cayley => f.write_str("exact Cayley")?,
                    Parameterization::Neumann { terms } => {
                        write!(f, "Cayley-Neumann {terms} terms")?
                    }
                }
                if let Some(eps) = coft_eps {
                    write!(f, ", COFT eps {eps}")?;
                }
                if *block_share {
                    f.write_str(", block sharing")?;
                }
                Ok(())
            }
            Self::Lora {
                rank,
                alpha,
                scaling,
                rslora,
                dora,
            } => {
                let kind = match (dora, rslora) {
                    (true, _) => "DoRA",
                    (false, true) => "rsLoRA",
                    (false, false) => "LoRA",
                };
                write!(f, "{kind} r {rank}, alpha {alpha}, scaling {scaling}")?;
                if *dora && *rslora {
                    f.write_str(" (rsLoRA scaling)")?;
                }
                Ok(())
            }
        }
    }
}

/// A parsed `adapter_config.json`.
#[derive(Clone, Debug)]
pub struct PeftConfig {
    /// `"OFT"` or `"LORA"`.
    pub peft_type: String,
    /// The method and its own settings.
    pub method: Method,
    /// `None` when the config has none (PEFT then uses its per-architecture defaults, which
    /// the adapter's tensors reflect): the modules holding tensors are the targets.
    pub target_modules: Option<ModuleSelector>,
    /// Modules never adapted, even when targeted.
    pub exclude_modules: Option<ModuleSelector>,
    /// Only adapt layers with these indices (`None`: every layer).
    pub layers_to_transform: Option<Vec<i64>>,
    /// Names after which a module name carries its layer index (`model.layers.3.` for `layers`);
    /// empty: the number after any `.<name>.`.
    pub layers_pattern: Vec<String>,
}

impl PeftConfig {
    /// Parses the config as PEFT 0.21.2 reads it. Unknown keys are ignored (every PEFT release
    /// adds some); what cannot be applied is refused naming its key.
    pub fn from_json(config: &Value) -> Result<Self> {
        let peft_type = config
            .get("peft_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::config("`peft_type` is missing or not a string"))?
            .to_string();
        let method = match peft_type.as_str() {
            "OFT" => Method::Oft(OftConfig::from_json(config)?),
            "LORA" => Method::Lora(LoraConfig::from_json(config)?),
            other => {
                return Err(Error::Unsupported(format!(
                    "`peft_type` `{other}` (OFT and LORA are supported)"
                )));
            }
        };
        if crate::adapters::peft_dir::is_set(config.get("modules_to_save")) {
            return Err(Error::Unsupported(format!(
                "`modules_to_save` ({}): the adapter carries full copies of those modules, \
                 which quantadapt does not apply",
                config["modules_to_save"]
            )));
        }
        let target_modules = ModuleSelector::parse(
            "target_modules",
            config.get("target_modules").unwrap_or(&Value::Null),
        )?;
        let exclude_modules = ModuleSelector::parse(
            "exclude_modules",
            config.get("exclude_modules").unwrap_or(&Value::Null),
        )?;
        let layers_to_transform = match config.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(vec![n.as_i64().ok_or_else(|| {
                Error::config(format!("`layers_to_transform`: {n} is not a layer index"))
            })?]),
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| {
                        v.as_i64().ok_or_else(|| {
                            Error::config(format!(
                                "`layers_to_transform`: {v} is not a layer index"
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
            )
            .filter(|l| !l.is_empty()),
            Some(other) => {
                return Err(Error::config(format!(
                    "`layers_to_transform` must be an index or a list, found {other}"
                )));
            }
        };
        let layers_pattern = match config.get("layers_pattern") {
            None | Some(Value::Null) => vec![],
            Some(Value::String(s)) if s.is_empty() => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        Error::config(format!("`layers_pattern`: {v} is not a name"))
                    })
                })
                .collect::<Result<_>>()?,
            Some(other) => {
                return Err(Error::config(format!(
                    "`layers_pattern` must be a name or a list, found {other}"
                )));
            }
        };
        if layers_to_transform.is_some()
            && matches!(target_modules, Some(ModuleSelector::Regex { .. }))
        {
            return Err(Error::config(
                "`layers_to_transform` cannot be used when `target_modules` is a str",
            ));
        }
        if !layers_pattern.is_empty() && layers_to_transform.is_none() {
            return Err(Error::config(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified",
            ));
        }
        for pattern in &layers_pattern {
            compile("layers_pattern", pattern, pattern)?;
        }
        Ok(Self {
            peft_type,
            method,
            target_modules,
            exclude_modules,
            layers_to_transform,
            layers_pattern,
        })
    }

    /// Whether PEFT wraps `module` (any spelling the checkpoint takes: `base_model.model.` prefix, trailing dot) with this adapter. Without
    /// `target_modules` every module not excluded qualifies (the adapter's tensors decide).
    pub fn targets(&self, module: &str) -> bool {
        let module = module_name(module);
        if self
            .exclude_modules
            .as_ref()
            .is_some_and(|ex| ex.names_exactly(module) || ex.matches(module))
        {
            return false;
        }
        let Some(target_modules) = &self.target_modules else {
            return true;
        };
        if target_modules.names_exactly(module) {
            return true;
        }
        if !target_modules.matches(module) {
            return false;
        }
        match &self.layers_to_transform {
            Some(layers) => self
                .layer_index(module)
                .is_some_and(|i| layers.contains(&i)),
            None => true,
        }
    }

    /// The layer index PEFT reads from a module name: the number after `.<layers_pattern>.`
    /// (or after any `.<name>.` without a pattern), followed by a dot.
    fn layer_index(&self, module: &str) -> Option<i64> {
        let patterns: Vec<String> = match self.layers_pattern.is_empty() {
            true => vec![r"[^.]*".to_string()],
            false => self.layers_pattern.clone(),
        };
        patterns.iter().find_map(|p| {
            // Compiled and checked at parse time; a pattern that fails here matches nothing.
            let regex = Regex::new(&format!(r"^.*\.{p}\.(\d+)\.")).ok()?;
            regex.captures(module)?.get(1)?.as_str().parse().ok()
        })
    }

    /// What this adapter does to `module`, a layer of `in_features` inputs; `None` when it does
    /// not target the module.
    pub fn resolve(&self, module: &str, in_features: usize) -> Result<Option<ModuleSettings>> {
        let module = module_name(module);
        if !self.targets(module) {
            return Ok(None);
        }
        Ok(Some(match &self.method {
            Method::Oft(cfg) => {
                let (blocks, block_size) = cfg.blocks_for(in_features)?;
                ModuleSettings::Oft {
                    blocks,
                    block_size,
                    parameterization: cfg.parameterization(),
                    coft_eps: cfg.coft_eps(),
                    block_share: cfg.block_share,
                }
            }
            Method::Lora(cfg) => {
                let (rank, alpha, scaling) = cfg.rank_alpha_scaling(module);
                ModuleSettings::Lora {
                    rank,
                    alpha,
                    scaling,
                    rslora: cfg.use_rslora,
                    dora: cfg.use_dora,
                }
            }
        }))
    }

    /// The OFT settings, or `None` for a LoRA config.
    pub fn oft(&self) -> Option<&OftConfig> {
        match &self.method {
            Method::Oft(c) => Some(c),
            Method::Lora(_) => None,
        }
    }

    /// The LoRA settings, or `None` for an OFT config.
    pub fn lora(&self) -> Option<&LoraConfig> {
        match &self.method {
            Method::Lora(c) => Some(c),
            Method::Oft(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(extra: Value) -> PeftConfig {
        let mut cfg = json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16});
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        PeftConfig::from_json(&cfg).unwrap()
    }

    #[test]
    fn list_targets_match_names_and_endings() {
        let c = config(json!({"target_modules": ["q_proj", "mlp.up_proj"]}));
        assert!(c.targets("model.layers.0.self_attn.q_proj"));
        assert!(c.targets("base_model.model.model.layers.0.self_attn.q_proj."));
        assert!(c.targets("q_proj"));
        assert!(c.targets("model.layers.3.mlp.up_proj"));
        assert!(!c.targets("model.layers.0.self_attn.xq_proj"));
        assert!(!c.targets("model.layers.0.self_attn.k_proj"));
    }

    #[test]
    fn regex_targets_must_match_the_whole_name() {
        let c = config(json!({"target_modules": r".*\.(q|v)_proj"}));
        assert!(c.targets("model.layers.0.self_attn.q_proj"));
        assert!(!c.targets("model.layers.0.self_attn.q_proj_extra"));
        assert!(!c.targets("q_proj"));
        let mut bad =
            json!({"peft_type": "LORA", "target_modules": "q_proj", "layers_to_transform": [0]});
        let err = PeftConfig::from_json(&bad).unwrap_err().to_string();
        assert!(err.contains("layers_to_transform"), "{err}");
        bad["target_modules"] = json!("(?<=a)q_proj");
        bad["layers_to_transform"] = Value::Null;
        let err = PeftConfig::from_json(&bad).unwrap_err().to_string();
        assert!(err.contains("target_modules"), "{err}");
    }

    #[test]
    fn layers_and_exclusions() {
        let c = config(
            json!({"target_modules": ["q_proj", "model.layers.0.mlp.down_proj"],
                              "layers_to_transform": [1], "exclude_modules": ["layers.1.self_attn.q_proj"]}),
        );
        assert!(!c.targets("model.layers.0.self_attn.q_proj"));
        assert!(!c.targets("model.layers.1.self_attn.q_proj"));
        assert!(!c.targets("model.layers.2.self_attn.q_proj"));
        // An exact name bypasses layers_to_transform, as in PEFT.
        assert!(c.targets("model.layers.0.mlp.down_proj"));
        let p = config(
            json!({"target_modules": ["q_proj"], "layers_to_transform": 2,
                              "layers_pattern": ["blocks", "layers"]}),
        );
        assert!(p.targets("model.layers.2.self_attn.q_proj"));
        assert!(p.targets("encoder.blocks.2.attn.q_proj"));
        assert!(!p.targets("encoder.h.2.attn.q_proj"));
        assert!(!p.targets("layers.2.q_proj"));
        let err = PeftConfig::from_json(
            &json!({"peft_type": "LORA", "target_modules": ["q"], "layers_pattern": "layers"}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("layers_pattern"), "{err}");
    }

    #[test]
    fn patterns_take_the_first_key_in_file_order() {
        let text = r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "down_proj"],
            "rank_pattern": {"layers\\.1\\..*": 2, "q_proj": 4, "^model.layers.0.mlp.down_proj": 16},
            "alpha_pattern": {"down_proj": 8}}"#;
        let c = PeftConfig::from_json(&serde_json::from_str(text).unwrap()).unwrap();
        let lora = |m: &str| match c.resolve(m, 64).unwrap() {
            Some(ModuleSettings::Lora { rank, alpha, .. }) => (rank, alpha),
            other => panic!("{other:?}"),
        };
        assert_eq!(lora("model.layers.1.self_attn.q_proj"), (2, 16.0));
        assert_eq!(lora("model.layers.0.self_attn.q_proj"), (4, 16.0));
        assert_eq!(lora("model.layers.0.mlp.down_proj"), (16, 8.0));
        assert_eq!(lora("model.layers.2.mlp.down_proj"), (8, 8.0));
        assert_eq!(c.resolve("model.layers.0.mlp.up_proj", 64).unwrap(), None);
    }

    #[test]
    fn refusals_name_their_key() {
        for (extra, key) in [
            (json!({"modules_to_save": ["lm_head"]}), "modules_to_save"),
            (json!({"bias": "all"}), "bias"),
            (json!({"rank_pattern": {"(?=x)q": 2}}), "rank_pattern"),
        ] {
            let mut cfg = json!({"peft_type": "LORA", "target_modules": ["q_proj"]});
            for (k, v) in extra.as_object().unwrap() {
                cfg[k] = v.clone();
            }
            let err = PeftConfig::from_json(&cfg).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }
}
