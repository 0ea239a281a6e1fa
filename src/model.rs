//! [`Model`]: every quantized linear of a checkpoint on one backend, with PEFT adapter folders
//! attached by name across all the modules they target.
//!
//! Everything the layer API does per module ([`QuantLinear`]) is applied model-wide here: the
//! active set, enabling, mixed batches, merge / unmerge, fusion. A module an adapter does not
//! target runs without it, as in PEFT.
//!
//! Stacking: when several adapters are active on one module, the OFT rotations apply to the
//! input, one after the other in active order, and the LoRA-family terms (LoRA, rsLoRA, DoRA) are
//! computed on the unrotated input and added to the output:
//! `y = base(x · R₁ · R₂ …) + Σ LoRA(x)` (DoRA rescales the running output as in PEFT). A merge
//! keeps that meaning: the OFT adapters are merged first (`W · Rᵀ`), then the LoRA family.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::adapters::peft_config::ModuleSettings;
use crate::adapters::peft_dir::PeftAdapterDir;
use crate::adapters::{Adapter, peft_dir::adapter_error};
use crate::checkpoint::{Checkpoint, canonical_module_name as module_name};
use crate::error::{Error, Result};
use crate::formats::{QuantFormat, QuantWeight};
use crate::io::HostTensor;
use crate::layer::{Backend, Fusion, QuantLinear};
use crate::tensor::Matrix;

/// Activations of any leading shape `[..., features]`, f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Activations {
    /// Dimensions, the last one the feature width; their product is `data.len()`.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<f32>,
}

impl Activations {
    /// Checks that `shape` has at least one dimension and holds exactly `data.len()` values (`Error::Shape` otherwise).
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        if shape.is_empty() || shape.iter().product::<usize>() != data.len() {
            return Err(Error::shape(
                "activations",
                format!("{} values in a shape of at least one dimension", data.len()),
                &shape,
            ));
        }
        Ok(Self { shape, data })
    }

    /// A float tensor of a safetensors file (F16 / BF16 / F32 / F64), which must be finite.
    pub fn from_host(t: &HostTensor) -> Result<Self> {
        Self::new(t.shape.clone(), t.to_finite_f32()?)
    }

    /// An F32 safetensors tensor called `name` with these values.
    pub fn to_host(&self, name: &str) -> HostTensor {
        HostTensor::from_f32(name, &self.shape, &self.data)
    }

    /// The last dimension.
    pub fn features(&self) -> usize {
        self.shape.last().copied().unwrap_or(0)
    }

    /// The product of the leading dimensions.
    pub fn rows(&self) -> usize {
        self.shape
            .split_last()
            .map_or(0, |(_, leading)| leading.iter().product())
    }

    fn matrix(&self, in_features: usize, name: &str) -> Result<Matrix> {
        if self.shape.is_empty() || self.shape.iter().product::<usize>() != self.data.len() {
            return Err(Error::shape(
                name,
                format!(
                    "{} values in a shape of at least one dimension",
                    self.data.len()
                ),
                &self.shape,
            ));
        }
        if self.features() != in_features {
            return Err(Error::shape(
                name,
                format!("[..., {in_features}]"),
                &self.shape,
            ));
        }
        Matrix::new(self.rows(), in_features, self.data.clone())
    }

    /// `y` with this input's leading dimensions (the shape was checked by [`Self::matrix`]).
    fn with_features(&self, y: Matrix) -> Self {
        let mut shape = self.shape.clone();
        if let Some(last) = shape.last_mut() {
            *last = y.cols;
        }
        Self {
            shape,
            data: y.data,
        }
    }
}

/// An adapter folder attached to a [`Model`].
#[derive(Clone, Debug)]
pub struct ModelAdapter {
    /// The name it was attached under, unique in the model.
    pub name: String,
    /// The folder, canonicalized (the same folder cannot be attached twice).
    pub dir: PathBuf,
    /// `"OFT"` or `"LORA"`.
    pub peft_type: String,
    /// The modules it wraps, in model order, with their settings.
    pub targets: Vec<(String, ModuleSettings)>,
}

impl ModelAdapter {
    fn is_oft(&self) -> bool {
        self.peft_type == "OFT"
    }
}

/// Every quantized linear of a checkpoint, with adapters attached by name.
pub struct Model {
    names: Vec<String>,
    layers: Vec<QuantLinear>,
    index: HashMap<String, usize>,
    adapters: Vec<ModelAdapter>,
    active: Vec<String>,
}

impl Model {
    /// Loads every quantized module of a model folder, a safetensors file or an index onto
    /// `backend`, in the checkpoint's order (see [`Checkpoint::modules`]).
    pub fn open(path: &Path, backend: Backend) -> Result<Self> {
        let checkpoint = Checkpoint::open(path)?;
        let modules = checkpoint
            .modules()
            .iter()
            .map(|m| Ok((m.name.clone(), checkpoint.load_module(&m.name)?)))
            .collect::<Result<Vec<_>>>()?;
        Self::from_modules(modules, backend)
    }

    /// A model from named base weights, in the order given.
    pub fn from_modules(modules: Vec<(String, QuantWeight)>, backend: Backend) -> Result<Self> {
        let mut model = Self {
            names: Vec::new(),
            layers: Vec::new(),
            index: HashMap::new(),
            adapters: Vec::new(),
            active: Vec::new(),
        };
        for (name, weight) in modules {
            let name = module_name(&name).to_string();
            if model
                .index
                .insert(name.clone(), model.names.len())
                .is_some()
            {
                return Err(Error::config(format!("module `{name}` is given twice")));
            }
            model
                .layers
                .push(QuantLinear::new(weight, backend.clone())?);
            model.names.push(name);
        }
        Ok(model)
    }

    /// Module names, in the order the model was built with.
    pub fn module_names(&self) -> &[String] {
        &self.names
    }

    fn position(&self, name: &str) -> Result<usize> {
        let name = module_name(name);
        self.index.get(name).copied().ok_or_else(|| {
            Error::config(format!(
                "no quantized module `{name}` in the model (modules: {})",
                self.names.join(", ")
            ))
        })
    }

    /// The module named `name` (`model.layers.0.self_attn.q_proj`, with or without PEFT's
    /// `base_model.model.` prefix or a trailing dot).
    pub fn module(&self, name: &str) -> Result<&QuantLinear> {
        Ok(&self.layers[self.position(name)?])
    }

    /// [`Self::module`], mutable. Changing a module's adapters through it bypasses the model's
    /// bookkeeping; the model-wide calls below are the ones to use for that.
    pub fn module_mut(&mut self, name: &str) -> Result<&mut QuantLinear> {
        let i = self.position(name)?;
        Ok(&mut self.layers[i])
    }

    /// Attached adapters, in attach order.
    pub fn adapters(&self) -> &[ModelAdapter] {
        &self.adapters
    }

    /// The adapter attached as `name`, if any.
    pub fn adapter(&self, name: &str) -> Option<&ModelAdapter> {
        self.adapters.iter().find(|a| a.name == name)
    }

    /// Names of the active adapters, in the order they apply.
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    /// Attaches the PEFT adapter folder `dir` under `name` to every module it targets (not yet
    /// active). Refused, with nothing attached, when the name is taken, when the same folder is
    /// already attached under another name, or when the adapter does not fit the model (see
    /// [`PeftAdapterDir::resolve_targets`]).
    pub fn add_adapter_dir(&mut self, name: &str, dir: &Path) -> Result<&ModelAdapter> {
        let canonical = std::fs::canonicalize(dir).map_err(|source| Error::Io {
            path: dir.display().to_string(),
            source,
        })?;
        if let Some(other) = self.adapters.iter().find(|a| a.dir == canonical) {
            return Err(adapter_error(
                name,
                format!(
                    "the folder {} is already attached as `{}`; attaching it twice would apply \
                     it twice",
                    dir.display(),
                    other.name
                ),
            ));
        }
        let peft = PeftAdapterDir::open(&canonical)
            .map_err(crate::adapters::peft_dir::in_adapter(name))?;
        self.add_adapter(name, &peft, canonical)
    }

    /// [`Self::add_adapter_dir`] on a folder already read; `dir` identifies it.
    pub fn add_adapter(
        &mut self,
        name: &str,
        peft: &PeftAdapterDir,
        dir: PathBuf,
    ) -> Result<&ModelAdapter> {
        if self.adapter(name).is_some() || name == crate::layer::BASE_ONLY {
            return Err(adapter_error(
                name,
                "an adapter of that name exists (or the name is reserved)",
            ));
        }
        let modules: Vec<(&str, usize)> = self
            .names
            .iter()
            .zip(&self.layers)
            .map(|(n, l)| (n.as_str(), l.base().in_features()))
            .collect();
        let targets = peft
            .resolve_targets(modules)
            .map_err(crate::adapters::peft_dir::in_adapter(name))?;
        let mut added = Vec::new();
        let attached = targets.iter().try_for_each(|(module, _)| {
            let i = self.index[module.as_str()];
            let base = self.layers[i].base();
            let adapter = Adapter::from_peft(
                name,
                peft,
                Some(module),
                base.in_features(),
                base.out_features(),
            )?;
            self.layers[i].add_adapter(adapter)?;
            added.push(i);
            Ok(())
        });
        if let Err(e) = attached {
            for i in added {
                // Just added, never merged: removal cannot fail.
                let _ = self.layers[i].remove_adapter(name);
            }
            return Err(e);
        }
        self.adapters.push(ModelAdapter {
            name: name.to_string(),
            dir,
            peft_type: peft.peft_type().to_string(),
            targets,
        });
        Ok(&self.adapters[self.adapters.len() - 1])
    }

    /// Detaches an adapter from every module; a merged one must be unmerged first.
    pub fn remove_adapter(&mut self, name: &str) -> Result<()> {
        let Some(pos) = self.adapters.iter().position(|a| a.name == name) else {
            return Err(adapter_error(name, "no such adapter"));
        };
        if self.merged_adapters().contains(&name.to_string()) {
            return Err(adapter_error(
                name,
                "is merged; unmerge it before removing it",
            ));
        }
        for (module, _) in &self.adapters[pos].targets {
            self.layers[self.index[module.as_str()]].remove_adapter(name)?;
        }
        self.adapters.remove(pos);
        self.active.retain(|a| a != name);
        Ok(())
    }

    /// Sets the active adapters, in order, on every module (each module keeps those it holds).
    pub fn set_active(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            if self.adapter(n).is_none() {
                return Err(adapter_error(n, "no such adapter"));
            }
        }
        for layer in &mut self.layers {
            let held: Vec<&str> = names
                .iter()
                .copied()
                .filter(|n| layer.adapter(n).is_some())
                .collect();
            layer.set_active(&held)?;
        }
        self.active = names.iter().map(|n| n.to_string()).collect();
        Ok(())
    }

    /// Disabling runs every module's original base; merged adapters are unmerged first.
    pub fn set_enabled(&mut self, enabled: bool) -> Result<()> {
        self.layers
            .iter_mut()
            .try_for_each(|l| l.set_enabled(enabled))
    }

    /// Sets how much adapter work each module's GPU forward fuses (see [`Fusion`]).
    pub fn set_fusion(&mut self, fusion: Fusion) {
        self.layers.iter_mut().for_each(|l| l.set_fusion(fusion));
    }

    /// Merges the named adapters into every module they target (HQQ bases only): the OFT
    /// adapters first, then the LoRA family, each group in the order given (see the module
    /// documentation). On an error the modules merged so far are unmerged again.
    pub fn merge(&mut self, names: &[&str], safe: bool) -> Result<()> {
        let ordered = self.merge_order(names)?;
        let before: Vec<usize> = self
            .layers
            .iter()
            .map(|l| l.merged_adapters().len())
            .collect();
        for i in 0..self.layers.len() {
            let held: Vec<&str> = ordered
                .iter()
                .copied()
                .filter(|n| self.layers[i].adapter(n).is_some())
                .collect();
            if held.is_empty() {
                continue;
            }
            if let Err(e) = self.layers[i].merge(&held, safe) {
                for (layer, &count) in self.layers[..i].iter_mut().zip(&before) {
                    while layer.merged_adapters().len() > count {
                        layer.unmerge()?;
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// `names` with the OFT adapters first, the rest after, each group in the given order.
    pub fn merge_order<'a>(&self, names: &[&'a str]) -> Result<Vec<&'a str>> {
        let mut ofts = Vec::new();
        let mut others = Vec::new();
        for n in names {
            let adapter = self
                .adapter(n)
                .ok_or_else(|| adapter_error(n, "no such adapter"))?;
            match adapter.is_oft() {
                true => ofts.push(*n),
                false => others.push(*n),
            }
        }
        ofts.extend(others);
        Ok(ofts)
    }

    /// Unmerges everything merged, on every module (exactly: the weights kept aside are restored).
    pub fn unmerge_all(&mut self) -> Result<()> {
        self.layers
            .iter_mut()
            .try_for_each(QuantLinear::unmerge_all)
    }

    /// Adapters merged into at least one module.
    pub fn merged_adapters(&self) -> Vec<String> {
        let mut merged: Vec<String> = Vec::new();
        for layer in &self.layers {
            for m in layer.merged_adapters() {
                if !merged.iter().any(|n| n == m) {
                    merged.push(m.to_string());
                }
            }
        }
        merged
    }

    /// The forward of module `name` on `x: [..., in]`, giving `[..., out]`.
    pub fn forward(&self, name: &str, x: &Activations) -> Result<Activations> {
        let layer = self.module(name)?;
        let xm = x.matrix(
            layer.base().in_features(),
            &format!("{}.x", module_name(name)),
        )?;
        Ok(x.with_features(layer.forward(&xm)?))
    }

    /// A mixed batch on module `name`: one adapter name per row of `x` (rows = the leading
    /// dimensions flattened); `__base__` selects the base, and a name the module does not hold
    /// runs the base there, as in PEFT. Names the model does not hold are refused.
    pub fn forward_mixed(
        &self,
        name: &str,
        x: &Activations,
        names: &[&str],
    ) -> Result<Activations> {
        if let Some(unknown) = names
            .iter()
            .find(|n| **n != crate::layer::BASE_ONLY && self.adapter(n).is_none())
        {
            return Err(adapter_error(unknown, "no such adapter in the model"));
        }
        let layer = self.module(name)?;
        let xm = x.matrix(
            layer.base().in_features(),
            &format!("{}.x", module_name(name)),
        )?;
        Ok(x.with_features(layer.forward_mixed(&xm, names)?))
    }
}
