//! GPTQ (AutoGPTQ "v1" and GPTQModel "v2" zeros): packed storage exactly as the checkpoints hold
//! it, CPU dequantization, loading, and a round-to-nearest quantizer that packs the same layout.
//!
//! Tensors of one layer with N = out_features, K = in_features, G = ceil(K / group_size):
//! `qweight` int32 `[ceil(K*bits/32), N]` (codes packed down each column, along K), `qzeros`
//! int32 `[G, ceil(N*bits/32)]` (packed along each row, along N), `scales` f16 `[G, N]`,
//! `g_idx` int32 `[K]` (the group of each input; shuffled under act-order) and an optional
//! `bias` `[N]`.

mod config;
mod fast;
mod hqq_layout;
mod load;
mod packing;
mod quantize;
mod split;

use std::path::Path;

pub(crate) use config::read_json;
pub use config::{GptqConfig, GptqZeros};
use packing::Stream;

use crate::error::{Error, Result};
use crate::formats::QuantFormat;
use crate::io::TensorFile;
use crate::tensor::{Matrix, round_f16};

/// A GPTQ-quantized linear layer.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqWeight {
    /// Bit width, grouping and zero-point convention of the codes.
    pub config: GptqConfig,
    /// K: inputs per row of x.
    pub in_features: usize,
    /// N: outputs.
    pub out_features: usize,
    /// Row-major `[ceil(K*bits/32), N]`, the raw bits of the int32 words.
    pub qweight: Vec<u32>,
    /// Row-major `[groups, ceil(N*bits/32)]`, raw bits, zeros stored per `config.zeros`.
    pub qzeros: Vec<u32>,
    /// Row-major `[groups, N]`, f16 values.
    pub scales: Vec<f32>,
    /// `[K]`: the group of each input.
    pub g_idx: Vec<u32>,
    /// `[N]`, added to the output.
    pub bias: Option<Vec<f32>>,
    /// G: rows of `scales` and `qzeros`, `ceil(K / group_size)` (1 without grouping).
    pub groups: usize,
}

impl GptqWeight {
    /// Loads the layer stored under `prefix` (e.g. `model.layers.0.self_attn.q_proj.`).
    ///
    /// in_features is the length of `g_idx`; without `g_idx` it is `rows * 32 / bits` of
    /// `qweight`, which assumes no padding rows; use [`Self::from_tensors_with_shape`] otherwise.
    ///
    /// Fails with [`Error::MissingTensor`], [`Error::Dtype`] or [`Error::Shape`] when a tensor is
    /// absent or does not agree with `config` and the others, and with [`Error::Config`] for a
    /// `g_idx` naming a group that does not exist, or none under `desc_act`.
    pub fn from_tensors(file: &TensorFile, prefix: &str, config: GptqConfig) -> Result<Self> {
        load::read(file, prefix, config, None)
    }

    /// Like [`Self::from_tensors`] with the layer's shape given, for files whose in_features the
    /// tensors do not tell.
    pub fn from_tensors_with_shape(
        file: &TensorFile,
        prefix: &str,
        config: GptqConfig,
        in_features: usize,
        out_features: usize,
    ) -> Result<Self> {
        load::read(file, prefix, config, Some((in_features, out_features)))
    }

    /// Loads `module_prefix` (with or without its trailing dot) from `dir/model.safetensors`,
    /// with the configuration from `dir/quantize_config.json` or `dir/config.json`. Fails as
    /// [`GptqConfig::from_dir`] and [`Self::from_tensors`] do, or with [`Error::Io`].
    pub fn load(dir: &Path, module_prefix: &str) -> Result<Self> {
        let config = GptqConfig::from_dir(dir)?;
        let file = TensorFile::open(dir.join("model.safetensors"))?;
        Self::from_tensors(&file, &tensor_prefix(module_prefix), config)
    }

    /// Quantizes a dense `[out, in]` weight with round-to-nearest (AutoGPTQ's min-max params per
    /// group and output, no Hessian) and packs it. `g_idx` defaults to `k / group_size`; give a
    /// shuffled one to mimic act-order. No bias.
    pub fn quantize_rtn(w: &Matrix, config: GptqConfig, g_idx: Option<Vec<u32>>) -> Result<Self> {
        quantize::quantize_rtn(w, config, g_idx)
    }

    /// The code of input `k`, output `n`. Panics if either is out of range.
    pub fn code(&self, k: usize, n: usize) -> u32 {
        assert!(
            k < self.in_features && n < self.out_features,
            "code ({k}, {n}) out of range"
        );
        Stream::qweight_column(n, self.out_features, self.config.bits).get(&self.qweight, k)
    }

    /// The true zero point of group `g`, output `n` (v1 fields decoded as `(field + 1) & mask`).
    /// Panics if either is out of range.
    pub fn zero(&self, g: usize, n: usize) -> u32 {
        assert!(
            g < self.groups && n < self.out_features,
            "zero ({g}, {n}) out of range"
        );
        let field =
            Stream::qzeros_row(g, self.qzeros_cols(), self.config.bits).get(&self.qzeros, n);
        match self.config.zeros {
            GptqZeros::V1 => (field + 1) & self.config.max_code(),
            GptqZeros::V2 => field,
        }
    }

    /// All codes, row-major `[out, in]` like the dense weight.
    pub fn codes(&self) -> Vec<u8> {
        (0..self.out_features)
            .flat_map(|n| (0..self.in_features).map(move |k| self.code(k, n) as u8))
            .collect()
    }

    /// Words per row of `qzeros`.
    pub fn qzeros_cols(&self) -> usize {
        self.qzeros.len() / self.groups.max(1)
    }

    /// Rows of `qweight`.
    pub fn qweight_rows(&self) -> usize {
        self.qweight.len() / self.out_features.max(1)
    }
}

impl QuantFormat for GptqWeight {
    fn format_name(&self) -> &'static str {
        "gptq"
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// `w[n][k] = f16(scale[g][n] * (q - z))` with `g = g_idx[k]`: PyTorch's fp16 product,
    /// which rounds once (the f32 product of an f16 and a small integer is exact).
    fn dequantize(&self) -> Matrix {
        let (n_out, k_in) = (self.out_features, self.in_features);
        let mut data = Vec::with_capacity(n_out * k_in);
        for n in 0..n_out {
            for (k, g) in self.g_idx.iter().enumerate() {
                let g = *g as usize;
                let q = self.code(k, n) as f32 - self.zero(g, n) as f32;
                data.push(round_f16(self.scales[g * n_out + n] * q));
            }
        }
        Matrix {
            rows: n_out,
            cols: k_in,
            data,
        }
    }

    fn packed_bytes(&self) -> usize {
        4 * (self.qweight.len() + self.qzeros.len() + self.g_idx.len()) + 2 * self.scales.len()
    }
}

/// `model.layers.0.self_attn.q_proj` or `model.layers.0.self_attn.q_proj.` to the tensor-name
/// prefix `model.layers.0.self_attn.q_proj.`.
pub(crate) fn tensor_prefix(module: &str) -> String {
    if module.is_empty() || module.ends_with('.') {
        module.to_string()
    } else {
        format!("{module}.")
    }
}

fn default_g_idx(in_features: usize, config: &GptqConfig) -> Vec<u32> {
    let len = config.group_len(in_features);
    (0..in_features).map(|k| (k / len) as u32).collect()
}

fn check_g_idx(name: &str, g_idx: &[u32], in_features: usize, groups: usize) -> Result<()> {
    if g_idx.len() != in_features {
        return Err(Error::shape(
            name,
            format!("[{in_features}]"),
            &[g_idx.len()],
        ));
    }
    match g_idx.iter().position(|g| *g as usize >= groups) {
        None => Ok(()),
        Some(k) => Err(Error::config(format!(
            "tensor `{name}`: input {k} is in group {}, but there are only {groups} groups",
            g_idx[k]
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_gets_one_trailing_dot() {
        assert_eq!(tensor_prefix("a.b"), "a.b.");
        assert_eq!(tensor_prefix("a.b."), "a.b.");
        assert_eq!(tensor_prefix(""), "");
    }
}
