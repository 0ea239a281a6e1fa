//! EETQ: int8 weight-only, one scale per output channel. The checkpoint's `weight` is int8
//! `[in, out]` rearranged for EETQ's CUTLASS kernel on the GPU that quantized it; it is decoded
//! once at load into plain row-major codes.
//!
//! Nothing in a checkpoint records which GPU made it. Files from sm75-sm89 GPUs (the only ones
//! EETQ's kernels build for besides sm70) use [`EetqLayout::Cutlass`], the default of
//! [`EetqWeight::load`].

mod fast;

use std::ops::Range;
use std::path::Path;

use safetensors::Dtype;
use serde_json::Value;

use crate::error::{Error, Result, check_finite};
use crate::formats::QuantFormat;
use crate::formats::gptq::{read_json, tensor_prefix};
use crate::formats::split::{
    RowSplit, bias_buffer, check_range, slice_cols, slice_rows, storage_bytes,
};
use crate::io::{HostTensor, TensorFile};
use crate::tensor::{Matrix, round_f16};

/// How the int8 codes are arranged in the stored `[in, out]` tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EetqLayout {
    /// sm75-sm89: rows permuted in blocks of 16, transposed to column-major, 64-row tiles of
    /// column pairs interleaved, then offset by +128 with bytes 1 and 2 of each 4 swapped.
    Cutlass,
    /// sm70: row-major, only offset by +128 with bytes 1 and 2 of each 4 swapped.
    RowMajorOffsetSwizzled,
    /// Plain row-major int8 (EETQ's "unprocessed" weights).
    Plain,
}

/// Position in the 16-row block after the row permutation of input row `k % 16`.
const INV_ROW_PERMUTATION: [usize; 16] = [0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15];

impl EetqLayout {
    /// Fails unless a `[k_in, n_out]` tensor can be stored in this layout.
    fn check_shape(self, name: &str, k_in: usize, n_out: usize) -> Result<()> {
        let ok = match self {
            // The index map tiles K by 64 and pairs columns. EETQ's preprocessor also refuses
            // N % 64 != 0, but files with other even N (the o96 golden vectors) decode without
            // ambiguity, so only what the map needs is checked.
            Self::Cutlass => k_in.is_multiple_of(64) && n_out.is_multiple_of(2),
            Self::RowMajorOffsetSwizzled => (k_in * n_out).is_multiple_of(4),
            Self::Plain => true,
        };
        if ok && k_in > 0 && n_out > 0 {
            return Ok(());
        }
        let rule = match self {
            Self::Cutlass => "in_features a multiple of 64 and out_features even (CUTLASS layout)",
            Self::RowMajorOffsetSwizzled => "a multiple of 4 elements (sm70 layout)",
            Self::Plain => "a non-empty [in, out] shape",
        };
        Err(Error::shape(name, rule, &[k_in, n_out]))
    }

    /// Index in the stored bytes of code `(k, n)` of a `[k_in, n_out]` weight.
    fn stored_index(self, k: usize, n: usize, k_in: usize, n_out: usize) -> usize {
        match self {
            Self::Cutlass => {
                let kp = 16 * (k / 16) + INV_ROW_PERMUTATION[k % 16];
                swap_middle_bytes((n / 2) * 2 * k_in + 128 * (kp / 64) + 64 * (n % 2) + kp % 64)
            }
            Self::RowMajorOffsetSwizzled => swap_middle_bytes(k * n_out + n),
            Self::Plain => k * n_out + n,
        }
    }

    fn is_offset(self) -> bool {
        self != Self::Plain
    }
}

/// Bytes 1 and 2 of every 4 trade places (an involution).
fn swap_middle_bytes(index: usize) -> usize {
    (index & !3) | [0, 2, 1, 3][index & 3]
}

/// An EETQ int8 linear layer with its codes in plain row-major order.
#[derive(Clone, Debug, PartialEq)]
pub struct EetqWeight {
    /// K: inputs per row of x.
    pub in_features: usize,
    /// N: outputs, each with its own scale.
    pub out_features: usize,
    /// Row-major `[in, out]`.
    pub codes: Vec<i8>,
    /// `[out]`, f16 values.
    pub scales: Vec<f32>,
    /// `[out]`, added after the scaling.
    pub bias: Option<Vec<f32>>,
}

impl EetqWeight {
    /// Loads `weight` (int8 `[in, out]` in `layout`), `weight_scales` (f16 `[out]`) and the
    /// optional `bias` stored under `prefix`. Fails with [`Error::MissingTensor`],
    /// [`Error::Dtype`], or [`Error::Shape`] when a tensor is absent, of another dtype, or of
    /// a shape `layout` cannot hold (CUTLASS: `in` a multiple of 64, `out` even), and with
    /// [`Error::NonFinite`] for a NaN or infinite scale or bias.
    pub fn from_tensors(file: &TensorFile, prefix: &str, layout: EetqLayout) -> Result<Self> {
        let weight = file.get(&format!("{prefix}weight"))?;
        let [in_features, out_features] = match weight.shape[..] {
            [k, n] => [k, n],
            _ => return Err(Error::shape(&weight.name, "[in, out]", &weight.shape)),
        };
        layout.check_shape(&weight.name, in_features, out_features)?;
        let stored = weight.to_i8()?;
        if stored.len() != in_features * out_features {
            return Err(Error::shape(
                &weight.name,
                "as many bytes as its shape",
                &[stored.len()],
            ));
        }
        let scales = read_scales(file.get(&format!("{prefix}weight_scales"))?, out_features)?;
        let bias_name = format!("{prefix}bias");
        let bias = match file.contains(&bias_name) {
            true => Some(read_bias(file.get(&bias_name)?, out_features)?),
            false => None,
        };
        Ok(Self {
            in_features,
            out_features,
            codes: decode_layout(&stored, layout, in_features, out_features),
            scales,
            bias,
        })
    }

    /// Loads `module_prefix` (with or without its trailing dot) from `dir/model.safetensors`
    /// after checking `dir/config.json` says EETQ, assuming the sm75-sm89 layout. Fails with
    /// [`Error::Io`], [`Error::Config`] for a config that is not EETQ, or as
    /// [`Self::from_tensors`].
    pub fn load(dir: &Path, module_prefix: &str) -> Result<Self> {
        let config = dir.join("config.json");
        check_config(&read_json(&config)?, &config.display().to_string())?;
        let file = TensorFile::open(dir.join("model.safetensors"))?;
        Self::from_tensors(&file, &tensor_prefix(module_prefix), EetqLayout::Cutlass)
    }

    /// EETQ's quantizer on a dense `[out, in]` weight: per output channel `amax` over the inputs,
    /// `scale = f16(amax / 128)`, `q = clamp(round(w / (amax / 128)), -128, 127)` in f32 with
    /// rounding half away from zero. No bias. Fails with [`Error::NonFinite`] for NaN or
    /// infinite weights and [`Error::Shape`] for an empty matrix.
    pub fn quantize(w: &Matrix) -> Result<Self> {
        check_finite("weight", &w.data)?;
        let (out_features, in_features) = (w.rows, w.cols);
        if in_features == 0 || out_features == 0 || w.data.len() != in_features * out_features {
            return Err(Error::shape(
                "weight",
                "a non-empty [out, in] matrix",
                &[w.rows, w.cols],
            ));
        }
        let mut codes = vec![0i8; in_features * out_features];
        let mut scales = Vec::with_capacity(out_features);
        for n in 0..out_features {
            let row = w.row(n);
            let step = row.iter().fold(0f32, |m, v| m.max(v.abs())) / 128.0;
            let scale = round_f16(step);
            if !scale.is_finite() {
                return Err(Error::NonFinite {
                    name: "weight_scales".to_string(),
                    index: n,
                    value: scale,
                });
            }
            scales.push(scale);
            for (k, v) in row.iter().enumerate() {
                codes[k * out_features + n] = quantize_value(*v, step);
            }
        }
        Ok(Self {
            in_features,
            out_features,
            codes,
            scales,
            bias: None,
        })
    }

    /// The stored `[in, out]` bytes of these codes in `layout` (EETQ's preprocessing).
    pub fn encode_layout(&self, layout: EetqLayout) -> Result<Vec<i8>> {
        let (k_in, n_out) = (self.in_features, self.out_features);
        if k_in.checked_mul(n_out) != Some(self.codes.len()) {
            return Err(Error::shape(
                "codes",
                format!("[{k_in}, {n_out}]"),
                &[self.codes.len()],
            ));
        }
        layout.check_shape("weight", k_in, n_out)?;
        let mut stored = vec![0i8; self.codes.len()];
        for k in 0..k_in {
            for n in 0..n_out {
                let q = self.codes[k * n_out + n];
                let byte = if layout.is_offset() {
                    flip_sign_bit(q)
                } else {
                    q
                };
                stored[layout.stored_index(k, n, k_in, n_out)] = byte;
            }
        }
        Ok(stored)
    }
}

/// `q + 128` (mod 256) and its inverse: the offset-binary form EETQ stores.
fn flip_sign_bit(v: i8) -> i8 {
    v ^ i8::MIN
}

/// Row-major codes from the stored bytes; the shape was checked for `layout`.
fn decode_layout(stored: &[i8], layout: EetqLayout, k_in: usize, n_out: usize) -> Vec<i8> {
    let mut codes = Vec::with_capacity(stored.len());
    for k in 0..k_in {
        for n in 0..n_out {
            let byte = stored[layout.stored_index(k, n, k_in, n_out)];
            codes.push(if layout.is_offset() {
                flip_sign_bit(byte)
            } else {
                byte
            });
        }
    }
    codes
}

/// One code as EETQ computes it. An all-zero channel gives 0/0 = NaN, which EETQ's clamp
/// (`std::max(-128, std::min(127, x))`) turns into 127; the scale is 0 there.
fn quantize_value(w: f32, step: f32) -> i8 {
    let v = w / step;
    if v.is_nan() {
        return i8::MAX;
    }
    v.round().clamp(-128.0, 127.0) as i8
}

/// Fails unless a model's `config.json` (parsed; `label` names it) declares EETQ int8 weights.
pub fn check_config(root: &Value, label: &str) -> Result<()> {
    let block = root
        .get("quantization_config")
        .ok_or_else(|| Error::config(format!("{label}: no `quantization_config` block")))?;
    let method = block.get("quant_method");
    if method.and_then(|m| m.as_str()) != Some("eetq") {
        return Err(Error::config(format!(
            "{label}: quant_method {} is not \"eetq\"",
            method.map_or("(missing)".to_string(), |m| m.to_string())
        )));
    }
    match block.get("weights") {
        None => Ok(()),
        Some(w) if w == "int8" => Ok(()),
        Some(other) => Err(Error::Unsupported(format!(
            "{label}: EETQ weights {other} (only \"int8\" exists)"
        ))),
    }
}

fn read_scales(t: &HostTensor, out_features: usize) -> Result<Vec<f32>> {
    if t.dtype != Dtype::F16 {
        return Err(Error::Dtype {
            name: t.name.clone(),
            expected: "F16".to_string(),
            found: format!("{:?}", t.dtype),
        });
    }
    t.expect_shape(&[out_features])?;
    let scales = t.to_finite_f32()?;
    if scales.len() != out_features {
        return Err(Error::shape(
            &t.name,
            format!("[{out_features}]"),
            &[scales.len()],
        ));
    }
    Ok(scales)
}

fn read_bias(t: &HostTensor, out_features: usize) -> Result<Vec<f32>> {
    t.expect_shape(&[out_features])?;
    let bias = t.to_finite_f32()?;
    if bias.len() != out_features {
        return Err(Error::shape(
            &t.name,
            format!("[{out_features}]"),
            &[bias.len()],
        ));
    }
    Ok(bias)
}

impl QuantFormat for EetqWeight {
    fn format_name(&self) -> &'static str {
        "eetq"
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

    /// `w[n][k] = f16(q[k][n] * scale[n])`, rounded once as EETQ's kernel does in fp16;
    /// transposed to `[out, in]`.
    fn dequantize(&self) -> Matrix {
        let (k_in, n_out) = (self.in_features, self.out_features);
        let mut data = Vec::with_capacity(k_in * n_out);
        for (n, scale) in self.scales.iter().enumerate() {
            for k in 0..k_in {
                data.push(round_f16(self.codes[k * n_out + n] as f32 * scale));
            }
        }
        Matrix {
            rows: n_out,
            cols: k_in,
            data,
        }
    }

    fn packed_bytes(&self) -> usize {
        self.codes.len() + 2 * self.scales.len()
    }
}

/// Output `n` is column `n` of the `[in, out]` codes and entry `n` of the scales, so any row
/// boundary is legal.
impl RowSplit for EetqWeight {
    fn row_split_granularity(&self) -> usize {
        1
    }

    fn rows(&self, range: Range<usize>) -> Result<Self> {
        check_range(&range, self.out_features, 1, String::new)?;
        Ok(Self {
            in_features: self.in_features,
            out_features: range.len(),
            codes: slice_cols(&self.codes, self.out_features, &range),
            scales: slice_rows(&self.scales, 1, &range),
            bias: self.bias.as_ref().map(|b| slice_rows(b, 1, &range)),
        })
    }

    fn row_split_buffers(&self, rows: usize) -> Vec<(&'static str, usize)> {
        vec![
            ("eetq codes", storage_bytes(self.in_features * rows)),
            ("eetq scales", storage_bytes(4 * rows)),
            bias_buffer(self.bias.is_some(), rows),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// EETQ's sm75-sm89 preprocessing restated step by step (not through the closed form):
    /// 16-row permutation, transpose, 64x2 column interleave, +128 and byte swap.
    fn cutlass_steps(q: &[i8], k_in: usize, n_out: usize) -> Vec<i8> {
        const P: [usize; 16] = [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15];
        let permuted: Vec<i8> = (0..k_in * n_out)
            .map(|i| {
                let (row, col) = (i / n_out, i % n_out);
                q[(16 * (row / 16) + P[row % 16]) * n_out + col]
            })
            .collect();
        let column_major: Vec<i8> = (0..k_in * n_out)
            .map(|i| permuted[(i % k_in) * n_out + i / k_in])
            .collect();
        // Words of 4 bytes; a tile is 64 rows = 16 words of one column.
        let words = k_in / 4;
        let mut interleaved = vec![0i8; k_in * n_out];
        for col in 0..n_out {
            for word in 0..words {
                let tile = word / 16;
                let write_word = (col / 2) * words * 2 + tile * 32 + 16 * (col % 2) + word % 16;
                for b in 0..4 {
                    interleaved[write_word * 4 + b] = column_major[(col * words + word) * 4 + b];
                }
            }
        }
        let mut stored: Vec<i8> = interleaved.iter().map(|v| flip_sign_bit(*v)).collect();
        for chunk in stored.chunks_exact_mut(4) {
            chunk.swap(1, 2);
        }
        stored
    }

    fn sample_codes(len: usize) -> Vec<i8> {
        (0..len)
            .map(|i| ((i * 37 + i / 7) % 256) as u8 as i8)
            .collect()
    }

    #[test]
    fn closed_form_matches_the_preprocessing_steps() {
        for (k_in, n_out) in [(64, 64), (128, 96), (192, 160), (320, 64)] {
            let codes = sample_codes(k_in * n_out);
            let w = EetqWeight {
                in_features: k_in,
                out_features: n_out,
                codes: codes.clone(),
                scales: vec![1.0; n_out],
                bias: None,
            };
            let stored = w.encode_layout(EetqLayout::Cutlass).unwrap();
            assert_eq!(stored, cutlass_steps(&codes, k_in, n_out), "{k_in}x{n_out}");
            assert_eq!(
                decode_layout(&stored, EetqLayout::Cutlass, k_in, n_out),
                codes
            );
        }
    }

    #[test]
    fn sm70_and_plain_layouts_round_trip() {
        let codes = sample_codes(8 * 6);
        let w = EetqWeight {
            in_features: 8,
            out_features: 6,
            codes: codes.clone(),
            scales: vec![1.0; 6],
            bias: None,
        };
        let sm70 = w.encode_layout(EetqLayout::RowMajorOffsetSwizzled).unwrap();
        assert_eq!(sm70[1], flip_sign_bit(codes[2]));
        assert_eq!(sm70[0], flip_sign_bit(codes[0]));
        let back = decode_layout(&sm70, EetqLayout::RowMajorOffsetSwizzled, 8, 6);
        assert_eq!(back, codes);
        assert_eq!(w.encode_layout(EetqLayout::Plain).unwrap(), codes);
    }

    #[test]
    fn quantize_value_follows_eetq() {
        assert_eq!(quantize_value(0.5, 1.0), 1); // half away from zero
        assert_eq!(quantize_value(-2.5, 1.0), -3);
        assert_eq!(quantize_value(128.0, 1.0), 127); // the positive extreme saturates
        assert_eq!(quantize_value(-128.0, 1.0), -128);
        assert_eq!(quantize_value(0.0, 0.0), 127); // all-zero channel
    }
}
