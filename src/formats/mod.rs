//! Quantized weight formats. Each one owns its packed storage, validates it at load, and knows its
//! CPU dequantization (the reference); the GPU kernels live in `crate::kernels`.

pub mod eetq;
pub(crate) mod fast_cpu;
pub mod gptq;
pub mod hqq;
pub mod split;

use crate::error::Result;
use crate::tensor::Matrix;

/// What every quantized base weight offers, whatever its packing.
pub trait QuantFormat {
    /// `"hqq"`, `"gptq"` or `"eetq"`.
    fn format_name(&self) -> &'static str;
    /// Rows of the dense `[out, in]` weight.
    fn out_features(&self) -> usize;
    /// Columns of the dense `[out, in]` weight (the input width).
    fn in_features(&self) -> usize;
    /// Bias of length `out_features`, if the layer has one.
    fn bias(&self) -> Option<&[f32]>;
    /// The dequantized `[out, in]` weight, exactly as the format's own library computes it.
    fn dequantize(&self) -> Matrix;
    /// Bytes the packed weight and its metadata occupy (what stays resident on a GPU).
    fn packed_bytes(&self) -> usize;

    /// CPU reference of the base matmul `x · Wᵀ (+ bias)`, `x: [m, in] -> [m, out]`, f64 accumulation.
    fn forward_cpu(&self, x: &Matrix) -> Result<Matrix> {
        let mut y = x.matmul_t(&self.dequantize())?;
        if let Some(b) = self.bias() {
            y.add_row_vector(b);
        }
        Ok(y)
    }
}

/// A base weight in any of the supported formats.
#[derive(Clone, Debug)]
pub enum QuantWeight {
    /// HQQ weight (`HQQLinear` layout).
    Hqq(hqq::HqqWeight),
    /// GPTQ weight (AutoGPTQ / GPTQModel layout).
    Gptq(gptq::GptqWeight),
    /// EETQ int8 per-channel weight.
    Eetq(eetq::EetqWeight),
}

impl QuantWeight {
    /// The base matmul `x · Wᵀ (+ bias)` on the CPU in f32, with threads and SIMD: what a CPU
    /// layer runs. Within the README's CPU tolerance of [`QuantFormat::forward_cpu`], the f64
    /// reference it is tested against.
    pub fn forward_fast(&self, x: &Matrix) -> Result<Matrix> {
        match self {
            Self::Hqq(w) => w.forward_fast(x),
            Self::Gptq(w) => w.forward_fast(x),
            Self::Eetq(w) => w.forward_fast(x),
        }
    }

    fn inner(&self) -> &dyn QuantFormat {
        match self {
            Self::Hqq(w) => w,
            Self::Gptq(w) => w,
            Self::Eetq(w) => w,
        }
    }
}

impl QuantFormat for QuantWeight {
    fn format_name(&self) -> &'static str {
        self.inner().format_name()
    }

    fn out_features(&self) -> usize {
        self.inner().out_features()
    }

    fn in_features(&self) -> usize {
        self.inner().in_features()
    }

    fn bias(&self) -> Option<&[f32]> {
        self.inner().bias()
    }

    fn dequantize(&self) -> Matrix {
        self.inner().dequantize()
    }

    fn packed_bytes(&self) -> usize {
        self.inner().packed_bytes()
    }
}

/// The tensor that marks a layer of each format in a checkpoint, by format name.
pub(crate) const MARKERS: [(&str, &str); 3] = [
    ("hqq", "W_q"),
    ("gptq", "qweight"),
    ("eetq", "weight_scales"),
];

impl QuantWeight {
    /// Loads one quantized layer from a safetensors checkpoint. `format` (`hqq`, `gptq`, `eetq`)
    /// and `module` (e.g. `model.layers.0.self_attn.q_proj`) may be left out when the file holds
    /// exactly one quantized layer. GPTQ's configuration is read from the file's directory
    /// (`quantize_config.json` or `config.json`).
    pub fn load_file(
        path: &std::path::Path,
        format: Option<&str>,
        module: Option<&str>,
    ) -> Result<Self> {
        let file = crate::io::TensorFile::open(path)?;
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        Self::from_file(&file, format, module, || gptq::GptqConfig::from_dir(dir))
    }

    /// [`Self::load_file`] on a file already read; `gptq_config` is called for a GPTQ layer only.
    pub fn from_file(
        file: &crate::io::TensorFile,
        format: Option<&str>,
        module: Option<&str>,
        gptq_config: impl FnOnce() -> Result<gptq::GptqConfig>,
    ) -> Result<Self> {
        use crate::error::Error;
        let mut found: Vec<(&str, String)> = Vec::new();
        for (name, marker) in MARKERS {
            if format.is_some_and(|f| !f.eq_ignore_ascii_case(name)) {
                continue;
            }
            for key in file.tensors.keys() {
                let Some(prefix) = key.strip_suffix(marker) else {
                    continue;
                };
                if prefix.is_empty() || prefix.ends_with('.') {
                    let module_name = prefix.trim_end_matches('.');
                    if module.is_none_or(|m| m == module_name) {
                        found.push((name, prefix.to_string()));
                    }
                }
            }
        }
        let (format, prefix) = match found.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(Error::config(format!(
                    "{}: no {} layer{} found",
                    file.label,
                    format.unwrap_or("HQQ, GPTQ or EETQ"),
                    module.map(|m| format!(" named `{m}`")).unwrap_or_default()
                )));
            }
            many => {
                let names: Vec<String> = many.iter().map(|(f, p)| format!("{p} ({f})")).collect();
                return Err(Error::config(format!(
                    "{}: several quantized layers ({}); name one with a module",
                    file.label,
                    names.join(", ")
                )));
            }
        };
        Ok(match format {
            "hqq" => Self::Hqq(hqq::HqqWeight::from_tensors(file, &prefix)?),
            "gptq" => Self::Gptq(gptq::GptqWeight::from_tensors(
                file,
                &prefix,
                gptq_config()?,
            )?),
            _ => Self::Eetq(eetq::EetqWeight::from_tensors(
                file,
                &prefix,
                eetq::EetqLayout::Cutlass,
            )?),
        })
    }
}
