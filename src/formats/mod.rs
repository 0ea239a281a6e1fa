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
