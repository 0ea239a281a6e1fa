//! HQQ (half-quadratic quantization): packed storage exactly as `HQQLinear` keeps it, CPU
//! dequantization, min-max quantization with the half-quadratic zero solver, and loading from
//! the safetensors form that transformers and hqq save.

mod fast;
pub mod packing;
pub mod solver;
mod split;

use std::path::Path;

use crate::error::{Error, Result, check_finite};
use crate::formats::QuantFormat;
use crate::io::TensorFile;
use crate::tensor::Matrix;
pub use packing::Packing;
pub use solver::SolverParams;

/// The dtype HQQ computes in: scale, zero, bias and the dequantized weight are rounded to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComputeDtype {
    /// IEEE half precision (`torch.float16`).
    F16,
    /// bfloat16 (`torch.bfloat16`).
    BF16,
    /// f32 (`torch.float32`): no rounding.
    F32,
}

impl ComputeDtype {
    fn parse(text: &str) -> Result<Self> {
        match text {
            "torch.float16" | "float16" => Ok(Self::F16),
            "torch.bfloat16" | "bfloat16" => Ok(Self::BF16),
            "torch.float32" | "float32" => Ok(Self::F32),
            other => Err(Error::config(format!(
                "HQQ compute_dtype `{other}` is not supported"
            ))),
        }
    }

    /// Rounds an f32 to this dtype (round half to even), as a PyTorch op result is.
    pub fn round(self, v: f32) -> f32 {
        match self {
            Self::F16 => half::f16::from_f32(v).to_f32(),
            Self::BF16 => half::bf16::from_f32(v).to_f32(),
            Self::F32 => v,
        }
    }
}

/// How quantization groups are laid over the flattened `[out, in]` weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grouping {
    /// Elements in the whole weight (`out * in`).
    pub numel: usize,
    /// Elements per quantization group.
    pub group_size: usize,
    /// 1: group of flat index f is `f / group_size`; 0: `f % (numel / group_size)` (strided).
    pub axis: usize,
}

impl Grouping {
    /// Checks that `group_size` divides `numel` and that `axis` is 0 or 1; `Error::Config` otherwise.
    pub fn new(numel: usize, group_size: usize, axis: usize) -> Result<Self> {
        if group_size == 0 || numel == 0 || !numel.is_multiple_of(group_size) {
            return Err(Error::config(format!(
                "HQQ group_size {group_size} must divide the element count {numel}"
            )));
        }
        if axis > 1 {
            return Err(Error::config(format!(
                "HQQ axis must be 0 or 1, got {axis}"
            )));
        }
        Ok(Self {
            numel,
            group_size,
            axis,
        })
    }

    /// Number of groups (`numel / group_size`): one scale and one zero each.
    pub fn groups(&self) -> usize {
        self.numel / self.group_size
    }

    /// Group index of flat weight index `flat` (row-major `[out, in]`).
    pub fn group_of(&self, flat: usize) -> usize {
        if self.axis == 1 {
            flat / self.group_size
        } else {
            flat % self.groups()
        }
    }

    /// Shape of HQQ's grouped 2-D tensor: `[T/g, g]` for axis 1, `[g, T/g]` for axis 0.
    pub fn grouped_shape(&self) -> (usize, usize) {
        if self.axis == 1 {
            (self.groups(), self.group_size)
        } else {
            (self.group_size, self.groups())
        }
    }

    /// Shape of the stored scale and zero tensors.
    pub fn meta_shape(&self) -> [usize; 2] {
        if self.axis == 1 {
            [self.groups(), 1]
        } else {
            [1, self.groups()]
        }
    }
}

/// How to quantize a dense weight into HQQ.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HqqConfig {
    /// Bits per code: 8, 6, 5, 4, 3, 2 or 1.
    pub nbits: u32,
    /// Elements per group; must divide `out * in`.
    pub group_size: usize,
    /// Grouping axis, 0 or 1 (see [`Grouping::axis`]).
    pub axis: usize,
    /// Run the half-quadratic solver (HQQLinear's default) or stop at min-max.
    pub optimize: bool,
    /// Round the initial zero (HQQLinear does so for 4-bit only).
    pub round_zero: bool,
    /// Half-quadratic solver settings, used when `optimize` is set.
    pub solver: SolverParams,
    /// Dtype the scale, zero and dequantized weight are rounded to.
    pub compute_dtype: ComputeDtype,
}

impl HqqConfig {
    /// `BaseQuantizeConfig(nbits, group_size, axis)` as HQQLinear applies it.
    pub fn new(nbits: u32, group_size: usize, axis: usize) -> Self {
        Self {
            nbits,
            group_size,
            axis,
            optimize: true,
            round_zero: nbits == 4,
            solver: SolverParams::default(),
            compute_dtype: ComputeDtype::F32,
        }
    }

    /// Largest code, `2^nbits - 1`.
    pub fn max_code(&self) -> f32 {
        ((1u32 << self.nbits) - 1) as f32
    }
}

/// An HQQ-quantized `[out, in]` weight, packed as HQQ stores it.
#[derive(Clone, Debug)]
pub struct HqqWeight {
    /// Rows of the dense weight.
    pub out_features: usize,
    /// Columns of the dense weight.
    pub in_features: usize,
    /// Bit layout of `packed`.
    pub packing: Packing,
    /// How groups map onto the flattened weight.
    pub grouping: Grouping,
    /// `W_q` bytes as stored (uint8, or little-endian int32 words for 3-bit).
    pub packed: Vec<u8>,
    /// Rows of the stored `W_q` tensor (grouped rows / codes per element).
    pub packed_rows: usize,
    /// Columns of the stored `W_q` tensor.
    pub packed_cols: usize,
    /// Multiplicative scale and float zero per group, as stored (already in compute dtype).
    pub scale: Vec<f32>,
    /// Float zero per group, in code units (`w = (q - zero) * scale`).
    pub zero: Vec<f32>,
    /// Optional bias of length `out_features`.
    pub bias: Option<Vec<f32>>,
    /// Dtype the stored metadata is in and dequantization rounds to.
    pub compute_dtype: ComputeDtype,
}

impl HqqWeight {
    /// Assembles a weight from its stored parts, checking every size.
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        out_features: usize,
        in_features: usize,
        nbits: u32,
        group_size: usize,
        axis: usize,
        packed: Vec<u8>,
        scale: Vec<f32>,
        zero: Vec<f32>,
        bias: Option<Vec<f32>>,
        compute_dtype: ComputeDtype,
    ) -> Result<Self> {
        let numel = out_features
            .checked_mul(in_features)
            .ok_or_else(|| Error::config("HQQ shape overflows"))?;
        let packing = Packing::for_bits(nbits)?;
        let grouping = Grouping::new(numel, group_size, axis)?;
        let (rows, cols) = grouping.grouped_shape();
        let packed_rows = packing.packed_rows(rows)?;
        let expected = packed_rows * cols * packing.element_bytes;
        if packed.len() != expected {
            return Err(Error::shape(
                "W_q",
                format!("[{packed_rows}, {cols}] ({expected} bytes)"),
                &[packed.len()],
            ));
        }
        for (name, v) in [("scale", &scale), ("zero", &zero)] {
            if v.len() != grouping.groups() {
                return Err(Error::shape(
                    name,
                    format!("{:?}", grouping.meta_shape()),
                    &[v.len()],
                ));
            }
            check_finite(name, v)?;
        }
        if let Some(b) = &bias {
            if b.len() != out_features {
                return Err(Error::shape(
                    "bias",
                    format!("[{out_features}]"),
                    &[b.len()],
                ));
            }
            check_finite("bias", b)?;
        }
        Ok(Self {
            out_features,
            in_features,
            packing,
            grouping,
            packed,
            packed_rows,
            packed_cols: cols,
            scale,
            zero,
            bias,
            compute_dtype,
        })
    }

    /// Bits per code.
    pub fn nbits(&self) -> u32 {
        self.packing.nbits
    }

    /// The integer codes in flat `[out, in]` order (HQQ's `W_codes`).
    pub fn codes(&self) -> Vec<u8> {
        packing::unpack(
            &self.packing,
            &self.packed,
            self.packed_rows,
            self.packed_cols,
            0..self.grouping.numel,
        )
    }

    /// Dequantizes one code as HQQ does: `(q - zero) * scale`, each op rounded to compute dtype.
    pub fn dequant_value(&self, code: u8, group: usize) -> f32 {
        let d = self.compute_dtype;
        d.round(d.round(code as f32 - self.zero[group]) * self.scale[group])
    }

    /// Quantizes a dense `[out, in]` weight (HQQ's `Quantizer.quantize` then `HQQLinear` storage).
    pub fn quantize(weight: &Matrix, bias: Option<Vec<f32>>, config: &HqqConfig) -> Result<Self> {
        check_finite("weight", &weight.data)?;
        let grouping = Grouping::new(weight.data.len(), config.group_size, config.axis)?;
        let packing = Packing::for_bits(config.nbits)?;
        let (codes, scale, zero) = quantize_codes(&weight.data, &grouping, config);
        let (rows, cols) = grouping.grouped_shape();
        let packed = packing::pack(&packing, &codes, rows, cols)?;
        let d = config.compute_dtype;
        Self::from_parts(
            weight.rows,
            weight.cols,
            config.nbits,
            config.group_size,
            config.axis,
            packed,
            scale.iter().map(|v| d.round(*v)).collect(),
            zero.iter().map(|v| d.round(*v)).collect(),
            bias,
            d,
        )
    }

    /// Loads the layer saved under `prefix` (e.g. `model.layers.0.self_attn.q_proj.`) in
    /// `HQQLinear.state_dict()`'s encoded form.
    pub fn from_tensors(file: &TensorFile, prefix: &str) -> Result<Self> {
        let get = |key: &str| file.get(&format!("{prefix}{key}"));
        let shape = get("shape")?.to_i64()?;
        let [out_features, in_features] = shape[..] else {
            return Err(Error::shape(
                &format!("{prefix}shape"),
                "[2]",
                &[shape.len()],
            ));
        };
        if out_features <= 0 || in_features <= 0 {
            return Err(Error::config(format!(
                "{prefix}shape {shape:?} is not positive"
            )));
        }
        let nbits = get("nbits")?.scalar()?;
        if nbits.fract() != 0.0 {
            return Err(Error::Unsupported(format!(
                "HQQ nbits {nbits} (ternary 1.58-bit)"
            )));
        }
        let group_size = get("group_size")?.scalar()?;
        let axis = get("axis")?.scalar()?;
        if group_size < 1.0 || !(axis == 0.0 || axis == 1.0) {
            return Err(Error::config(format!(
                "{prefix}: group_size {group_size} / axis {axis} are not valid HQQ values"
            )));
        }
        let packing = Packing::for_bits(nbits as u32)?;
        if file.contains(&format!("{prefix}packing")) {
            let stored = get("packing")?.ascii()?;
            if stored != packing.name() {
                return Err(Error::config(format!(
                    "{prefix}packing `{stored}` does not match nbits {nbits} (`{}`)",
                    packing.name()
                )));
            }
        }
        let compute_dtype = match file.contains(&format!("{prefix}compute_dtype")) {
            true => ComputeDtype::parse(&get("compute_dtype")?.ascii()?)?,
            false => ComputeDtype::F16,
        };
        let w_q = get("W_q")?;
        let view_as_float = file.contains(&format!("{prefix}view_as_float"))
            && get("view_as_float")?.scalar()? != 0.0;
        let expected_dtype = if view_as_float {
            None
        } else if packing.element_bytes == 4 {
            Some(safetensors::Dtype::I32)
        } else {
            Some(safetensors::Dtype::U8)
        };
        if let Some(dt) = expected_dtype {
            if w_q.dtype != dt {
                return Err(Error::Dtype {
                    name: w_q.name.clone(),
                    expected: format!("{dt:?}"),
                    found: format!("{:?}", w_q.dtype),
                });
            }
        }
        // view_as_float stores the packed bits bit-cast to a float dtype: the bytes are the same.
        let packed = w_q.bytes.clone();
        let scale = get("scale")?.to_f32()?;
        let zero = get("zero")?.to_f32()?;
        let bias = match file.contains(&format!("{prefix}bias")) {
            true => Some(get("bias")?.to_f32()?),
            false => None,
        };
        Self::from_parts(
            out_features as usize,
            in_features as usize,
            nbits as u32,
            group_size as usize,
            axis as usize,
            packed,
            scale,
            zero,
            bias,
            compute_dtype,
        )
        .map_err(|e| match e {
            Error::Shape {
                name,
                expected,
                found,
            } => Error::Shape {
                name: format!("{prefix}{name}"),
                expected,
                found,
            },
            Error::NonFinite { name, index, value } => Error::NonFinite {
                name: format!("{prefix}{name}"),
                index,
                value,
            },
            other => other,
        })
    }

    /// Loads `model.safetensors` of a checkpoint directory; `module` like
    /// `model.layers.0.self_attn.q_proj`.
    pub fn load(dir: &Path, module: &str) -> Result<Self> {
        let file = TensorFile::open(dir.join("model.safetensors"))?;
        Self::from_tensors(&file, &format!("{module}."))
    }
}

/// Min-max codes (HQQ's `Quantizer.quantize`), refined by the solver when `config.optimize`.
/// Returns the codes in flat order, the multiplicative scales and the zeros, in f32.
pub fn quantize_codes(
    w: &[f32],
    grouping: &Grouping,
    config: &HqqConfig,
) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    let groups = grouping.groups();
    let mut lo = vec![f32::INFINITY; groups];
    let mut hi = vec![f32::NEG_INFINITY; groups];
    for (f, v) in w.iter().enumerate() {
        let g = grouping.group_of(f);
        lo[g] = lo[g].min(*v);
        hi[g] = hi[g].max(*v);
    }
    let max_code = config.max_code();
    let inv_scale: Vec<f32> = lo
        .iter()
        .zip(&hi)
        .map(|(mn, mx)| {
            let range = mx - mn;
            // torch evaluates `scalar / tensor` as `scalar * reciprocal(tensor)`: two roundings.
            let s = if range.abs() <= 1e-4 {
                1.0
            } else {
                max_code * (1.0 / range)
            };
            s.min(2e4)
        })
        .collect();
    let mut zero: Vec<f32> = lo.iter().zip(&inv_scale).map(|(mn, s)| -mn * s).collect();
    if config.round_zero {
        zero.iter_mut().for_each(|z| *z = solver::round_even(*z));
    }
    if config.optimize {
        zero = solver::optimize_zero(w, grouping, &inv_scale, zero, max_code, &config.solver);
    }
    let codes = w
        .iter()
        .enumerate()
        .map(|(f, v)| {
            let g = grouping.group_of(f);
            solver::round_even(v * inv_scale[g] + zero[g]).clamp(0.0, max_code) as u8
        })
        .collect();
    let scale = inv_scale.iter().map(|s| 1.0 / s).collect();
    (codes, scale, zero)
}

impl QuantFormat for HqqWeight {
    fn format_name(&self) -> &'static str {
        "hqq"
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

    fn dequantize(&self) -> Matrix {
        let data = self
            .codes()
            .iter()
            .enumerate()
            .map(|(f, q)| self.dequant_value(*q, self.grouping.group_of(f)))
            .collect();
        Matrix {
            rows: self.out_features,
            cols: self.in_features,
            data,
        }
    }

    fn packed_bytes(&self) -> usize {
        let meta_bytes = match self.compute_dtype {
            ComputeDtype::F32 => 4,
            _ => 2,
        };
        self.packed.len() + 2 * meta_bytes * self.scale.len()
    }
}
