//! EETQ's fast CPU forward (see `formats::fast_cpu`): the codes are `[in, out]` row-major, so an
//! input's codes for [`COLS`] consecutive outputs are contiguous bytes. Every weight is rounded to
//! f16 as the reference rounds it.

use super::EetqWeight;
use crate::error::Result;
use crate::formats::fast_cpu::{COLS, ColumnSource, column_forward, round_f16};
use crate::tensor::Matrix;

/// The scales of a block of outputs.
pub(crate) struct EetqBlock {
    n0: usize,
    width: usize,
    scales: [f32; COLS],
}

impl EetqWeight {
    /// `x · Wᵀ + bias` on the CPU in f32 with threads and SIMD, within the README's CPU tolerance
    /// of [`crate::formats::QuantFormat::forward_cpu`].
    pub fn forward_fast(&self, x: &Matrix) -> Result<Matrix> {
        column_forward(self, x)
    }
}

impl ColumnSource for EetqWeight {
    type Block = EetqBlock;

    fn block(&self, n0: usize, width: usize) -> EetqBlock {
        let mut scales = [0f32; COLS];
        scales[..width].copy_from_slice(&self.scales[n0..n0 + width]);
        EetqBlock { n0, width, scales }
    }

    #[inline(always)]
    fn weights(&self, block: &EetqBlock, k: usize, out: &mut [f32; COLS]) {
        let codes = &self.codes[k * self.out_features + block.n0..][..block.width];
        for ((o, q), s) in out.iter_mut().zip(codes).zip(&block.scales) {
            *o = round_f16(*q as f32 * s);
        }
    }
}
