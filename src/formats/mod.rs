//! Quantized weight formats. Each one owns its packed storage, validates it at load, and knows its
//! CPU dequantization (the reference); the GPU kernels live in `crate::kernels`.

pub mod eetq;
pub mod gptq;
pub mod hqq;

use crate::error::Result;
use crate::tensor::Matrix;

/// What every quantized base weight offers, whatever its packing.
pub trait QuantFormat {
    /// `"hqq"`, `"gptq"` or `"eetq"`.
    fn format_name(&self) -> &'static str;
    fn out_features(&self) -> usize;
    fn in_features(&self) -> usize;
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
    Hqq(hqq::HqqWeight),
    Gptq(gptq::GptqWeight),
    Eetq(eetq::EetqWeight),
}

impl QuantWeight {
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
