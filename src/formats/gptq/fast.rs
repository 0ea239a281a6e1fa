//! GPTQ's fast CPU forward (see `formats::fast_cpu`): `qweight` packs each output's codes down
//! its column, so one row of words holds `32 / bits` inputs of consecutive outputs, and a
//! [`ColumnSource`] decodes an input for [`COLS`] outputs with contiguous loads. Every weight is
//! rounded to f16 as the reference rounds it; act-order needs nothing more, as each input looks
//! its group up in `g_idx`.

use super::GptqWeight;
use crate::error::Result;
use crate::formats::fast_cpu::{COLS, ColumnSource, column_forward, round_f16};
use crate::tensor::Matrix;

/// The scales and true zeros of a block of outputs, for every group.
pub(crate) struct GptqBlock {
    n0: usize,
    width: usize,
    scales: Vec<[f32; COLS]>,
    zeros: Vec<[f32; COLS]>,
}

impl GptqWeight {
    /// `x · Wᵀ + bias` on the CPU in f32 with threads and SIMD, within the README's CPU tolerance
    /// of [`crate::formats::QuantFormat::forward_cpu`].
    pub fn forward_fast(&self, x: &Matrix) -> Result<Matrix> {
        column_forward(self, x)
    }
}

/// `f16(s · (q − z))`, as the reference dequantizes.
#[inline(always)]
fn dequant(q: u32, s: f32, z: f32) -> f32 {
    round_f16(s * (q as i32 as f32 - z))
}

impl ColumnSource for GptqWeight {
    type Block = GptqBlock;

    fn block(&self, n0: usize, width: usize) -> GptqBlock {
        let mut scales = vec![[0f32; COLS]; self.groups];
        let mut zeros = vec![[0f32; COLS]; self.groups];
        for (g, (s, z)) in scales.iter_mut().zip(&mut zeros).enumerate() {
            let row = &self.scales[g * self.out_features + n0..][..width];
            s[..width].copy_from_slice(row);
            for (c, zc) in z[..width].iter_mut().enumerate() {
                *zc = self.zero(g, n0 + c) as f32;
            }
        }
        GptqBlock {
            n0,
            width,
            scales,
            zeros,
        }
    }

    #[inline(always)]
    fn weights(&self, block: &GptqBlock, k: usize, out: &mut [f32; COLS]) {
        let (n_out, bits) = (self.out_features, self.config.bits as usize);
        let g = self.g_idx[k] as usize;
        let (word_row, shift) = ((k * bits) / 32, ((k * bits) % 32) as u32);
        let mask = self.config.max_code();
        let words = &self.qweight[word_row * n_out + block.n0..][..block.width];
        let (scales, zeros) = (&block.scales[g], &block.zeros[g]);
        let out = &mut out[..block.width];
        if shift as usize + bits <= 32 {
            for (((o, w), s), z) in out.iter_mut().zip(words).zip(scales).zip(zeros) {
                *o = dequant((w >> shift) & mask, *s, *z);
            }
        } else {
            // A 3-bit code split between this word and the next row's.
            let next = &self.qweight[(word_row + 1) * n_out + block.n0..][..block.width];
            let parts = words.iter().zip(next);
            for (((o, (w, v)), s), z) in out.iter_mut().zip(parts).zip(scales).zip(zeros) {
                *o = dequant(((w >> shift) | (v << (32 - shift))) & mask, *s, *z);
            }
        }
    }
}
