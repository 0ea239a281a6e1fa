//! LoRA, rsLoRA and DoRA on a Linear layer, as PEFT computes them.
//!
//! LoRA adds `s · (x·Aᵀ)·Bᵀ` to the base output, with `A: [r, in]`, `B: [out, r]` and
//! `s = α/r` (`α/√r` for rsLoRA). DoRA rescales every output row by `g = m/n`, where `m` is the
//! stored magnitude and `n` the row norm of `W + s·B·A` (W = the dequantized base weight); the
//! base bias is left out of the rescale.

use serde::Deserialize;
use serde_json::Value;

use crate::adapters::peft_config::Patterns;
use crate::adapters::peft_dir::{PeftAdapterDir, adapter_error, in_adapter, is_set};
use crate::error::{Error, Result, check_finite};
use crate::io::HostTensor;
use crate::tensor::Matrix;

/// Tensor-name suffix of `A: [r, in]` in a PEFT adapter file.
pub const LORA_A_SUFFIX: &str = "lora_A.weight";
/// Tensor-name suffix of `B: [out, r]` in a PEFT adapter file.
pub const LORA_B_SUFFIX: &str = "lora_B.weight";
/// PEFT saves the DoRA magnitude without `.weight`; both spellings are accepted.
pub const MAGNITUDE_SUFFIXES: [&str; 2] = ["lora_magnitude_vector", "lora_magnitude_vector.weight"];

/// LoRA variants that change the math or the tensors; refused when their config key is set.
const UNSUPPORTED_VARIANTS: [&str; 13] = [
    "use_qalora",
    "alora_invocation_tokens",
    "velora_config",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
    "lora_ga_config",
    "corda_config",
    "eva_config",
    "loftq_config",
    "trainable_token_indices",
    "target_parameters",
];

/// The fields of a LoRA `adapter_config.json` that matter for inference.
#[derive(Clone, Debug)]
pub struct LoraConfig {
    /// Default rank `r` (rows of `A`).
    pub r: usize,
    /// Default `lora_alpha`; scaling is `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub lora_alpha: f64,
    /// rsLoRA: scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// DoRA: the adapter also carries a magnitude vector `[out]`.
    pub use_dora: bool,
    /// Accepted and treated as `false`: it describes Conv1D's `[in, out]` storage, and PEFT
    /// forces it off (with a warning) for Linear layers and for HQQ.
    pub fan_in_fan_out: bool,
    /// Always `false` here: a `true` config is refused.
    pub lora_bias: bool,
    /// Per-module rank overrides, matched against module names.
    pub rank_pattern: Patterns<usize>,
    /// Per-module `lora_alpha` overrides, matched against module names.
    pub alpha_pattern: Patterns<f64>,
}

#[derive(Deserialize)]
struct RawLoraConfig {
    #[serde(default = "default_r")]
    r: usize,
    #[serde(default = "default_alpha")]
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    lora_bias: bool,
    #[serde(default)]
    bias: Option<String>,
}

fn default_r() -> usize {
    8
}

fn default_alpha() -> f64 {
    8.0
}

impl LoraConfig {
    /// Parses a LoRA `adapter_config.json`; unknown keys are ignored (every PEFT release adds
    /// some), but the variants this crate does not implement are refused.
    pub fn from_json(config: &Value) -> Result<Self> {
        if let Some(key) = UNSUPPORTED_VARIANTS
            .iter()
            .find(|k| is_set(config.get(**k)))
        {
            return Err(Error::Unsupported(format!(
                "LoRA variant `{key}` is set; only LoRA, rsLoRA and DoRA are supported"
            )));
        }
        let raw: RawLoraConfig = serde_json::from_value(config.clone())
            .map_err(|e| Error::config(format!("LoRA adapter_config.json: {e}")))?;
        if raw.lora_bias {
            return Err(Error::Unsupported(
                "lora_bias = true is not supported on quantized bases, as PEFT refuses it for HQQ"
                    .into(),
            ));
        }
        if let Some(bias) = raw.bias.filter(|b| b != "none") {
            return Err(Error::Unsupported(format!(
                "LoRA with bias = \"{bias}\" trains base-layer biases, which an adapter cannot carry"
            )));
        }
        let rank_pattern = Patterns::parse("rank_pattern", config.get("rank_pattern"), |v| {
            v.as_u64().map(|r| r as usize)
        })?;
        let alpha_pattern =
            Patterns::parse("alpha_pattern", config.get("alpha_pattern"), Value::as_f64)?;
        if raw.r == 0 || rank_pattern.values().any(|r| *r == 0) {
            return Err(Error::config("LoRA rank r must be positive"));
        }
        if !raw.lora_alpha.is_finite() || alpha_pattern.values().any(|a| !a.is_finite()) {
            return Err(Error::config("LoRA lora_alpha must be finite"));
        }
        Ok(Self {
            r: raw.r,
            lora_alpha: raw.lora_alpha,
            use_rslora: raw.use_rslora,
            use_dora: raw.use_dora,
            fan_in_fan_out: raw.fan_in_fan_out,
            lora_bias: raw.lora_bias,
            rank_pattern,
            alpha_pattern,
        })
    }

    /// `(r, scaling)` for the module at `module_path` (see [`Self::rank_alpha_scaling`]).
    pub fn rank_and_scaling(&self, module_path: &str) -> Result<(usize, f32)> {
        let (r, _, scaling) = self.rank_alpha_scaling(module_path);
        Ok((r, scaling))
    }

    /// `(r, alpha, scaling)` for the module at `module_path`, with `rank_pattern` and
    /// `alpha_pattern` applied as PEFT does: the first key in file order whose
    /// `(.*\.)?(KEY)$` matches the whole path.
    pub fn rank_alpha_scaling(&self, module_path: &str) -> (usize, f64, f32) {
        let r = self.rank_pattern.get(module_path).unwrap_or(self.r);
        let alpha = self
            .alpha_pattern
            .get(module_path)
            .unwrap_or(self.lora_alpha);
        (r, alpha, lora_scaling(alpha, r, self.use_rslora))
    }
}

/// `α/r`, or `α/√r` for rsLoRA.
pub fn lora_scaling(alpha: f64, r: usize, use_rslora: bool) -> f32 {
    let r = r as f64;
    (if use_rslora {
        alpha / r.sqrt()
    } else {
        alpha / r
    }) as f32
}

/// One LoRA (or DoRA) adapter on one Linear layer, validated.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    name: String,
    in_features: usize,
    out_features: usize,
    rank: usize,
    a: Matrix,
    b: Matrix,
    scaling: f32,
    magnitude: Option<Vec<f32>>,
}

impl LoraAdapter {
    /// Loads the adapter of `module` (or of the only module carrying `lora_A.weight`) from a PEFT
    /// directory, for a layer `[out_features, in_features]`.
    pub fn from_peft_dir(
        name: &str,
        dir: &PeftAdapterDir,
        module: Option<&str>,
        in_features: usize,
        out_features: usize,
    ) -> Result<Self> {
        load(name, dir, module, in_features, out_features).map_err(in_adapter(name))
    }

    /// Builds the adapter from `A: [r, in]`, `B: [out, r]`, the scaling, and DoRA's magnitude `[out]`.
    pub fn from_matrices(
        name: &str,
        in_features: usize,
        out_features: usize,
        a: Matrix,
        b: Matrix,
        scaling: f32,
        magnitude: Option<Vec<f32>>,
    ) -> Result<Self> {
        validate(
            in_features,
            out_features,
            &a,
            &b,
            scaling,
            magnitude.as_deref(),
        )
        .map_err(in_adapter(name))?;
        Ok(Self {
            name: name.to_string(),
            in_features,
            out_features,
            rank: a.rows,
            a,
            b,
            scaling,
            magnitude,
        })
    }

    /// The adapter's name, as used in error messages and adapter selection.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Input width of the adapted layer (columns of `A`).
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output width of the adapted layer (rows of `B`).
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Rank `r`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// `A: [r, in]`.
    pub fn a(&self) -> &Matrix {
        &self.a
    }

    /// `B: [out, r]`.
    pub fn b(&self) -> &Matrix {
        &self.b
    }

    /// Scale `s` applied to `B·A`.
    pub fn scaling(&self) -> f32 {
        self.scaling
    }

    /// DoRA's magnitude `m: [out]`; `None` for plain LoRA.
    pub fn magnitude(&self) -> Option<&[f32]> {
        self.magnitude.as_deref()
    }

    /// Whether the adapter is DoRA (has a magnitude vector).
    pub fn is_dora(&self) -> bool {
        self.magnitude.is_some()
    }

    /// `ΔW = s·B·A`, `[out, in]`, f64 accumulation.
    pub fn delta_weight(&self) -> Matrix {
        let mut delta = Matrix::zeros(self.out_features, self.in_features);
        for o in 0..self.out_features {
            let row = self.delta_row(o);
            delta
                .row_mut(o)
                .iter_mut()
                .zip(row)
                .for_each(|(d, v)| *d = v as f32);
        }
        delta
    }

    /// `h = x·Aᵀ`, `[m, in] → [m, r]`.
    pub fn shrink_cpu(&self, x: &Matrix) -> Result<Matrix> {
        self.expect_cols("input", x, self.in_features)?;
        x.matmul_t(&self.a)
    }

    /// `y += scale · h·Bᵀ` for `h: [m, r]`, `y: [m, out]`, f64 accumulation.
    pub fn expand_add_cpu(&self, h: &Matrix, scale: f32, y: &mut Matrix) -> Result<()> {
        self.expect_cols("shrunk input", h, self.rank)?;
        self.expect_output(y, h.rows)?;
        for m in 0..h.rows {
            let hm = h.row(m);
            for (o, v) in y.row_mut(m).iter_mut().enumerate() {
                *v = (*v as f64 + scale as f64 * dot(hm, self.b.row(o))) as f32;
            }
        }
        Ok(())
    }

    /// DoRA's `n`: the row norms of `W + s·B·A` for the dequantized base `W: [out, in]`, f64.
    pub fn dora_norms(&self, base_weight: &Matrix) -> Result<Vec<f32>> {
        if (base_weight.rows, base_weight.cols) != (self.out_features, self.in_features) {
            return Err(adapter_error(
                &self.name,
                format!(
                    "base weight is [{}, {}], the adapter's layer is [{}, {}]",
                    base_weight.rows, base_weight.cols, self.out_features, self.in_features
                ),
            ));
        }
        Ok((0..self.out_features)
            .map(|o| {
                let sum: f64 = base_weight
                    .row(o)
                    .iter()
                    .zip(self.delta_row(o))
                    .map(|(w, d)| (*w as f64 + d).powi(2))
                    .sum();
                sum.sqrt() as f32
            })
            .collect())
    }

    /// DoRA's per-output scale `g = m / n` with `n` from [`Self::dora_norms`] of `base_weight`;
    /// `None` for a plain LoRA adapter.
    pub fn dora_scale(&self, base_weight: &Matrix) -> Result<Option<Vec<f32>>> {
        let Some(magnitude) = &self.magnitude else {
            return Ok(None);
        };
        let norms = self.dora_norms(base_weight)?;
        Ok(Some(
            magnitude.iter().zip(norms).map(|(m, n)| m / n).collect(),
        ))
    }

    /// Adds this adapter to the running base output `y: [m, out]` for input `x: [m, in]`, as
    /// PEFT's forward does. LoRA: `y += s·(x·Aᵀ)·Bᵀ`. DoRA, with `g = m/n` from
    /// [`Self::dora_norms`] of `base_weight`: `y += (g − 1)·(y − bias) + g·s·(x·Aᵀ)·Bᵀ`, which
    /// rescales everything accumulated in `y` except the bias. `base_weight` is only read by DoRA.
    pub fn apply_cpu(
        &self,
        x: &Matrix,
        y: &mut Matrix,
        bias: Option<&[f32]>,
        base_weight: &Matrix,
    ) -> Result<()> {
        let h = self.shrink_cpu(x)?;
        let Some(magnitude) = &self.magnitude else {
            return self.expand_add_cpu(&h, self.scaling, y);
        };
        self.expect_output(y, x.rows)?;
        if let Some(bias) = bias.filter(|b| b.len() != self.out_features) {
            return Err(adapter_error(
                &self.name,
                format!(
                    "bias has {} values, the layer has {} outputs",
                    bias.len(),
                    self.out_features
                ),
            ));
        }
        let norms = self.dora_norms(base_weight)?;
        if let Some(o) = norms.iter().position(|n| *n == 0.0) {
            return Err(adapter_error(
                &self.name,
                format!("DoRA: row {o} of W + s·B·A has norm 0, so m/n is undefined"),
            ));
        }
        let s = self.scaling as f64;
        for m in 0..x.rows {
            let hm = h.row(m);
            for (o, v) in y.row_mut(m).iter_mut().enumerate() {
                let g = magnitude[o] as f64 / norms[o] as f64;
                let b0 = bias.map_or(0.0, |b| b[o] as f64);
                let lora = s * dot(hm, self.b.row(o));
                let y0 = *v as f64;
                *v = (y0 + (g - 1.0) * (y0 - b0) + g * lora) as f32;
            }
        }
        Ok(())
    }

    /// Row `o` of `s·B·A`, in f64.
    fn delta_row(&self, o: usize) -> Vec<f64> {
        let s = self.scaling as f64;
        let b_row = self.b.row(o);
        (0..self.in_features)
            .map(|i| {
                let acc: f64 = b_row
                    .iter()
                    .enumerate()
                    .map(|(k, bk)| *bk as f64 * self.a.at(k, i) as f64)
                    .sum();
                s * acc
            })
            .collect()
    }

    fn expect_cols(&self, what: &str, m: &Matrix, cols: usize) -> Result<()> {
        if m.cols != cols {
            return Err(adapter_error(
                &self.name,
                format!("{what} has {} columns, expected {cols}", m.cols),
            ));
        }
        Ok(())
    }

    fn expect_output(&self, y: &Matrix, rows: usize) -> Result<()> {
        if (y.rows, y.cols) != (rows, self.out_features) {
            return Err(adapter_error(
                &self.name,
                format!(
                    "output is [{}, {}], expected [{rows}, {}]",
                    y.rows, y.cols, self.out_features
                ),
            ));
        }
        Ok(())
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

fn validate(
    in_features: usize,
    out_features: usize,
    a: &Matrix,
    b: &Matrix,
    scaling: f32,
    magnitude: Option<&[f32]>,
) -> Result<()> {
    let rank = a.rows;
    if rank == 0 {
        return Err(Error::config("LoRA rank must be positive (A has 0 rows)"));
    }
    if a.cols != in_features {
        return Err(Error::shape(
            LORA_A_SUFFIX,
            format!("[{rank}, {in_features}]"),
            &[a.rows, a.cols],
        ));
    }
    if (b.rows, b.cols) != (out_features, rank) {
        return Err(Error::shape(
            LORA_B_SUFFIX,
            format!("[{out_features}, {rank}] (rank {rank} from lora_A)"),
            &[b.rows, b.cols],
        ));
    }
    check_finite(LORA_A_SUFFIX, &a.data)?;
    check_finite(LORA_B_SUFFIX, &b.data)?;
    if !scaling.is_finite() {
        return Err(Error::config(format!("scaling {scaling} is not finite")));
    }
    if let Some(m) = magnitude {
        if m.len() != out_features {
            return Err(Error::shape(
                MAGNITUDE_SUFFIXES[0],
                format!("[{out_features}]"),
                &[m.len()],
            ));
        }
        check_finite(MAGNITUDE_SUFFIXES[0], m)?;
    }
    Ok(())
}

fn load(
    name: &str,
    dir: &PeftAdapterDir,
    module: Option<&str>,
    in_features: usize,
    out_features: usize,
) -> Result<LoraAdapter> {
    if dir.peft_type() != "LORA" {
        return Err(Error::config(format!(
            "{} holds a {} adapter, not LORA",
            dir.path().display(),
            dir.peft_type()
        )));
    }
    let config = dir
        .config()
        .lora()
        .ok_or_else(|| Error::config("not a LoRA config"))?;
    let module = dir.resolve_module(module, LORA_A_SUFFIX)?;
    check_module_keys(dir, &module)?;
    let (rank, scaling) = config.rank_and_scaling(&module)?;
    let a = matrix(dir.tensor_for(Some(&module), LORA_A_SUFFIX)?)?;
    let b = matrix(dir.tensor_for(Some(&module), LORA_B_SUFFIX)?)?;
    if a.rows != rank {
        return Err(Error::config(format!(
            "`{LORA_A_SUFFIX}` of `{module}` has rank {}, the config gives r = {rank}",
            a.rows
        )));
    }
    let magnitude = magnitude(dir, &module, config.use_dora)?;
    LoraAdapter::from_matrices(name, in_features, out_features, a, b, scaling, magnitude)
}

fn matrix(t: &HostTensor) -> Result<Matrix> {
    let &[rows, cols] = t.shape.as_slice() else {
        return Err(Error::shape(&t.name, "a matrix", &t.shape));
    };
    Matrix::new(rows, cols, t.to_f32()?)
}

fn magnitude(dir: &PeftAdapterDir, module: &str, use_dora: bool) -> Result<Option<Vec<f32>>> {
    let stored: Vec<&str> = dir
        .suffixes_of(module)
        .into_iter()
        .filter(|s| MAGNITUDE_SUFFIXES.contains(s))
        .collect();
    match (stored.as_slice(), use_dora) {
        ([], false) => Ok(None),
        ([], true) => Err(Error::config(format!(
            "use_dora is set but module `{module}` has no `{}`",
            MAGNITUDE_SUFFIXES[0]
        ))),
        ([suffix], true) => {
            let t = dir.tensor_for(Some(module), suffix)?;
            if t.shape.len() != 1 {
                return Err(Error::shape(&t.name, "[out]", &t.shape));
            }
            Ok(Some(t.to_f32()?))
        }
        ([_], false) => Err(Error::config(format!(
            "module `{module}` has a DoRA magnitude vector but use_dora is false"
        ))),
        _ => Err(Error::config(format!(
            "module `{module}` has both `{}` and `{}`",
            MAGNITUDE_SUFFIXES[0], MAGNITUDE_SUFFIXES[1]
        ))),
    }
}

fn check_module_keys(dir: &PeftAdapterDir, module: &str) -> Result<()> {
    for suffix in dir.suffixes_of(module) {
        let reason = match suffix {
            LORA_A_SUFFIX | LORA_B_SUFFIX => continue,
            s if MAGNITUDE_SUFFIXES.contains(&s) => continue,
            "lora_B.bias" => "`lora_B.bias` (lora_bias) is not supported on quantized bases, as \
                 PEFT refuses it for HQQ"
                .to_string(),
            s if s.starts_with("lora_embedding_") => {
                "LoRA on an embedding layer is not supported".to_string()
            }
            s if s.starts_with("base_layer.") => format!(
                "a trained base-layer tensor (`{s}`, saved with bias != \"none\") is not supported"
            ),
            s => format!("unknown key `{s}`"),
        };
        return Err(Error::config(format!("module `{module}`: {reason}")));
    }
    Ok(())
}
