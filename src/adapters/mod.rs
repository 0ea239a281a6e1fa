//! PEFT adapters (OFT, LoRA, rsLoRA, DoRA): parameters, PEFT directory loading, CPU math.
//! Adapters never look inside a base format.

pub mod lora;
pub mod oft;
pub mod peft_config;
pub mod peft_dir;

use std::path::Path;

use crate::error::{Error, Result};
use lora::LoraAdapter;
use oft::OftAdapter;
use peft_dir::PeftAdapterDir;

/// One named adapter: OFT rotates the input, LoRA / DoRA add to the output.
#[derive(Clone, Debug)]
pub enum Adapter {
    /// Orthogonal fine-tuning: block rotations applied to the input.
    Oft(OftAdapter),
    /// LoRA, rsLoRA or DoRA: a low-rank update added to the output.
    Lora(LoraAdapter),
}

impl Adapter {
    /// The adapter's name, as used in error messages and adapter selection.
    pub fn name(&self) -> &str {
        match self {
            Adapter::Oft(a) => a.name(),
            Adapter::Lora(a) => a.name(),
        }
    }

    /// `"OFT"`, `"LoRA"` or `"DoRA"`, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Adapter::Oft(_) => "OFT",
            Adapter::Lora(a) if a.is_dora() => "DoRA",
            Adapter::Lora(_) => "LoRA",
        }
    }

    /// Loads a PEFT adapter directory of either kind, for a layer of the given shape;
    /// `module` picks the adapted module when the file holds several.
    pub fn from_peft_dir(
        name: &str,
        dir: &Path,
        module: Option<&str>,
        in_features: usize,
        out_features: usize,
    ) -> Result<Self> {
        let peft = PeftAdapterDir::open(dir).map_err(peft_dir::in_adapter(name))?;
        Self::from_peft(name, &peft, module, in_features, out_features)
    }

    /// [`Self::from_peft_dir`] on an adapter directory already read.
    pub fn from_peft(
        name: &str,
        peft: &PeftAdapterDir,
        module: Option<&str>,
        in_features: usize,
        out_features: usize,
    ) -> Result<Self> {
        match peft.peft_type() {
            "OFT" => Ok(Adapter::Oft(OftAdapter::from_peft_dir(
                name,
                peft,
                module,
                in_features,
            )?)),
            "LORA" => Ok(Adapter::Lora(LoraAdapter::from_peft_dir(
                name,
                peft,
                module,
                in_features,
                out_features,
            )?)),
            other => Err(Error::Adapter {
                adapter: name.to_string(),
                reason: format!("peft_type `{other}` is not supported (OFT, LORA)"),
            }),
        }
    }
}
