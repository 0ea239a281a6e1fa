//! GPTQ (AutoGPTQ "v1" and GPTQModel "v2" zeros): packed storage exactly as the checkpoints hold
//! it, CPU dequantization, loading, and a round-to-nearest quantizer that packs the same layout.
//!
//! Tensors of one layer with N = out_features, K = in_features, G = ceil(K / group_size):
//! `qweight` int32 `[ceil(K*bits/32), N]` (codes packed down each column, along K), `qzeros`
//! int32 `[G, ceil(N*bits/32)]` (packed along each row, along N), `scales` f16 `[G, N]`,
//! `g_idx` int32 `[K]` (the group of each input; shuffled under act-order) and an optional
//! `bias` `[N]`.

mod config;
mod packing;
mod quantize;

use std::path::Path;

use safetensors::Dtype;

pub(crate) use config::read_json;
pub use config::{GptqConfig, GptqZeros};
use packing::{Stream, words_for};

use crate::error::{Error, Result, check_finite};
use crate::formats::QuantFormat;
use crate::io::{HostTensor, TensorFile};
use crate::tensor::{Matrix, round_f16};

/// A GPTQ-quantized linear layer.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqWeight {
    pub config: GptqConfig,
    pub in_features: usize,
    pub out_features: usize,
    /// Row-major `[ceil(K*bits/32), N]`, the raw bits of the int32 words.
    pub qweight: Vec<u32>,
    /// Row-major `[groups, ceil(N*bits/32)]`, raw bits, zeros stored per `config.zeros`.
    pub qzeros: Vec<u32>,
    /// Row-major `[groups, N]`, f16 values.
    pub scales: Vec<f32>,
    /// `[K]`: the group of each input.
    pub g_idx: Vec<u32>,
    pub bias: Option<Vec<f32>>,
    pub groups: usize,
}

impl GptqWeight {
    /// Loads the layer stored under `prefix` (e.g. `model.layers.0.self_attn.q_proj.`).
    ///
    /// in_features is the length of `g_idx`; without `g_idx` it is `rows * 32 / bits` of
    /// `qweight`, which assumes no padding rows; use [`Self::from_tensors_with_shape`] otherwise.
    pub fn from_tensors(file: &TensorFile, prefix: &str, config: GptqConfig) -> Result<Self> {
        Self::read(file, prefix, config, None)
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
        Self::read(file, prefix, config, Some((in_features, out_features)))
    }

    /// Loads `module_prefix` (with or without its trailing dot) from `dir/model.safetensors`,
    /// with the configuration from `dir/quantize_config.json` or `dir/config.json`.
    pub fn load(dir: &Path, module_prefix: &str) -> Result<Self> {
        let config = GptqConfig::from_dir(dir)?;
        let file = TensorFile::open(dir.join("model.safetensors"))?;
        Self::from_tensors(&file, &tensor_prefix(module_prefix), config)
    }

    fn read(
        file: &TensorFile,
        prefix: &str,
        config: GptqConfig,
        shape: Option<(usize, usize)>,
    ) -> Result<Self> {
        config.validate()?;
        let name = |key: &str| format!("{prefix}{key}");
        let qweight_t = file.get(&name("qweight"))?;
        let [rows, cols] = matrix_shape(qweight_t)?;
        let qweight = exact(qweight_t, qweight_t.to_u32_words()?)?;
        let stored_g_idx = match file.contains(&name("g_idx")) {
            true => Some(read_g_idx(file.get(&name("g_idx"))?)?),
            false => None,
        };
        let (in_features, out_features) = match shape {
            Some((k, n)) if n == cols => (k, n),
            Some((_, n)) => {
                return Err(Error::shape(
                    &qweight_t.name,
                    format!("[_, {n}]"),
                    &qweight_t.shape,
                ));
            }
            None => (
                infer_in_features(qweight_t, rows, stored_g_idx.as_deref(), config.bits)?,
                cols,
            ),
        };
        if in_features == 0 || out_features == 0 {
            return Err(Error::shape(
                &qweight_t.name,
                "a non-empty layer",
                &qweight_t.shape,
            ));
        }
        let k_source = match (shape, &stored_g_idx) {
            (None, Some(_)) => format!(" (the length of `{}`)", name("g_idx")),
            _ => String::new(),
        };
        check_packed_dim(qweight_t, 0, in_features, config.bits, &k_source)?;
        let groups = config.groups(in_features);
        let qzeros_t = file.get(&name("qzeros"))?;
        let [zero_rows, _] = matrix_shape(qzeros_t)?;
        if zero_rows != groups {
            return Err(groups_error(qzeros_t, groups, &config, in_features));
        }
        check_packed_dim(qzeros_t, 1, out_features, config.bits, "")?;
        let qzeros = exact(qzeros_t, qzeros_t.to_u32_words()?)?;
        let scales = read_scales(
            file.get(&name("scales"))?,
            groups,
            out_features,
            &config,
            in_features,
        )?;
        let g_idx = match stored_g_idx {
            Some(g) => {
                check_g_idx(&name("g_idx"), &g, in_features, groups)?;
                g
            }
            None if config.desc_act => {
                return Err(Error::config(format!(
                    "`{}` is missing but desc_act is set, so the groups of the inputs are unknown",
                    name("g_idx")
                )));
            }
            None => default_g_idx(in_features, &config),
        };
        let bias = match file.contains(&name("bias")) {
            true => Some(read_vector(file.get(&name("bias"))?, out_features)?),
            false => None,
        };
        Ok(Self {
            config,
            in_features,
            out_features,
            qweight,
            qzeros,
            scales,
            g_idx,
            bias,
            groups,
        })
    }

    /// Quantizes a dense `[out, in]` weight with round-to-nearest (AutoGPTQ's min-max params per
    /// group and output, no Hessian) and packs it. `g_idx` defaults to `k / group_size`; give a
    /// shuffled one to mimic act-order. No bias.
    pub fn quantize_rtn(w: &Matrix, config: GptqConfig, g_idx: Option<Vec<u32>>) -> Result<Self> {
        config.validate()?;
        check_finite("weight", &w.data)?;
        let (out_features, in_features) = (w.rows, w.cols);
        if in_features == 0 || out_features == 0 || w.data.len() != in_features * out_features {
            return Err(Error::shape(
                "weight",
                "a non-empty [out, in] matrix",
                &[w.rows, w.cols],
            ));
        }
        let groups = config.groups(in_features);
        let g_idx = match g_idx {
            Some(g) => {
                check_g_idx("g_idx", &g, in_features, groups)?;
                g
            }
            None => default_g_idx(in_features, &config),
        };
        let params = quantize::find_params(w, &g_idx, groups, &config)?;
        let max_code = config.max_code();
        let mut qweight = vec![0u32; words_for(in_features, config.bits)? * out_features];
        for n in 0..out_features {
            let column = qweight_stream(n, out_features, config.bits);
            for (k, (v, g)) in w.row(n).iter().zip(&g_idx).enumerate() {
                let p = *g as usize * out_features + n;
                let q = quantize::code(*v, params.scales[p], params.zeros[p], max_code);
                column.put(&mut qweight, k, q);
            }
        }
        let zero_cols = words_for(out_features, config.bits)?;
        let mut qzeros = vec![0u32; groups * zero_cols];
        for (g, zeros) in params.zeros.chunks_exact(out_features).enumerate() {
            let row = qzeros_stream(g, zero_cols, config.bits);
            for (n, z) in zeros.iter().enumerate() {
                let stored = match config.zeros {
                    // Masked by `put`: a zero of 0 is stored as all ones, as AutoGPTQ's v1 does.
                    GptqZeros::V1 => z.wrapping_sub(1),
                    GptqZeros::V2 => *z,
                };
                row.put(&mut qzeros, n, stored);
            }
        }
        Ok(Self {
            config,
            in_features,
            out_features,
            qweight,
            qzeros,
            scales: params.scales,
            g_idx,
            bias: None,
            groups,
        })
    }

    /// The code of input `k`, output `n`. Panics if either is out of range.
    pub fn code(&self, k: usize, n: usize) -> u32 {
        assert!(
            k < self.in_features && n < self.out_features,
            "code ({k}, {n}) out of range"
        );
        qweight_stream(n, self.out_features, self.config.bits).get(&self.qweight, k)
    }

    /// The true zero point of group `g`, output `n` (v1 fields decoded as `(field + 1) & mask`).
    /// Panics if either is out of range.
    pub fn zero(&self, g: usize, n: usize) -> u32 {
        assert!(
            g < self.groups && n < self.out_features,
            "zero ({g}, {n}) out of range"
        );
        let field = qzeros_stream(g, self.qzeros_cols(), self.config.bits).get(&self.qzeros, n);
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

fn qweight_stream(n: usize, out_features: usize, bits: u32) -> Stream {
    Stream {
        first: n,
        stride: out_features,
        bits,
    }
}

fn qzeros_stream(g: usize, cols: usize, bits: u32) -> Stream {
    Stream {
        first: g * cols,
        stride: 1,
        bits,
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

fn matrix_shape(t: &HostTensor) -> Result<[usize; 2]> {
    match t.shape[..] {
        [rows, cols] => Ok([rows, cols]),
        _ => Err(Error::shape(&t.name, "a 2-D shape", &t.shape)),
    }
}

/// Values decoded from `t`, checked to be exactly as many as its shape says.
fn exact<T>(t: &HostTensor, values: Vec<T>) -> Result<Vec<T>> {
    if values.len() != t.numel() {
        return Err(Error::shape(
            &t.name,
            format!("{} values for its shape", t.numel()),
            &[values.len()],
        ));
    }
    Ok(values)
}

/// in_features when no shape is given: the length of `g_idx`, else what the qweight rows hold.
fn infer_in_features(
    qweight: &HostTensor,
    rows: usize,
    g_idx: Option<&[u32]>,
    bits: u32,
) -> Result<usize> {
    if let Some(g) = g_idx {
        return Ok(g.len());
    }
    let stored_bits = rows * 32;
    if !stored_bits.is_multiple_of(bits as usize) {
        return Err(Error::config(format!(
            "cannot tell in_features of `{}`: {rows} rows of {bits}-bit codes and no g_idx; \
             give the layer's shape (from_tensors_with_shape)",
            qweight.name
        )));
    }
    Ok(stored_bits / bits as usize)
}

/// Checks the packed dimension `dim` of `t`, which holds `count` codes. AutoGPTQ sizes it
/// `count / 32 * bits`, dropping codes when `count % 32 != 0`; that loss is reported as such.
fn check_packed_dim(t: &HostTensor, dim: usize, count: usize, bits: u32, note: &str) -> Result<()> {
    let expected = words_for(count, bits)?;
    let found = t.shape[dim];
    if found == expected {
        return Ok(());
    }
    let mut want = t.shape.clone();
    want[dim] = expected;
    let what = if dim == 0 {
        "in_features"
    } else {
        "out_features"
    };
    let detail = if !count.is_multiple_of(32) && found == count / 32 * bits as usize {
        format!(
            "; {found} is AutoGPTQ's truncation, which drops the codes of {what} {}..{count}",
            count / 32 * 32
        )
    } else {
        String::new()
    };
    Err(Error::shape(
        &t.name,
        format!("{want:?} for {what} {count}{note}{detail}"),
        &t.shape,
    ))
}

fn groups_error(t: &HostTensor, groups: usize, config: &GptqConfig, in_features: usize) -> Error {
    let group = config
        .group_size
        .map_or("-1".to_string(), |g| g.to_string());
    Error::shape(
        &t.name,
        format!("{groups} rows (in_features {in_features}, group_size {group})"),
        &t.shape,
    )
}

fn read_scales(
    t: &HostTensor,
    groups: usize,
    out_features: usize,
    config: &GptqConfig,
    in_features: usize,
) -> Result<Vec<f32>> {
    if t.dtype != Dtype::F16 {
        return Err(Error::Dtype {
            name: t.name.clone(),
            expected: "F16".to_string(),
            found: format!("{:?}", t.dtype),
        });
    }
    let [rows, _] = matrix_shape(t)?;
    if rows != groups {
        return Err(groups_error(t, groups, config, in_features));
    }
    t.expect_shape(&[groups, out_features])?;
    exact(t, t.to_finite_f32()?)
}

fn read_g_idx(t: &HostTensor) -> Result<Vec<u32>> {
    if !matches!(t.dtype, Dtype::I32 | Dtype::I64) {
        return Err(Error::Dtype {
            name: t.name.clone(),
            expected: "I32".to_string(),
            found: format!("{:?}", t.dtype),
        });
    }
    if t.shape.len() != 1 {
        return Err(Error::shape(&t.name, "[in_features]", &t.shape));
    }
    exact(t, t.to_i64()?)?
        .into_iter()
        .enumerate()
        .map(|(k, g)| {
            u32::try_from(g).map_err(|_| {
                Error::config(format!(
                    "tensor `{}`: input {k} has group index {g}",
                    t.name
                ))
            })
        })
        .collect()
}

fn read_vector(t: &HostTensor, len: usize) -> Result<Vec<f32>> {
    t.expect_shape(&[len])?;
    exact(t, t.to_finite_f32()?)
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
