//! HQQ's fast CPU forward (see `formats::fast_cpu`). An output row is `K` consecutive flat
//! indices, so its codes are runs of consecutive packed elements, each run in one slab (one bit
//! field) and, along axis 1, in one group; a task walks its rows run by run, decoding
//! [`TILE`] codes at a time straight from HQQ's storage.
//!
//! In f32 (no rounding in the reference), axis 1: a run's group is factored, `s·Σ x·(q − z)`.
//! Otherwise (f16 / bf16, whose reference rounds every weight, or axis 0,
//! where every element of a run has its own group) a tile is dequantized as HQQ does, then
//! multiplied in.

use std::ops::Range;

use pulp::{Arch, Simd, WithSimd};

use super::{ComputeDtype, HqqWeight};
use crate::error::Result;
use crate::formats::fast_cpu::{
    NoRounding, RoundBf16, RoundF16, Rounding, check_input, dot_rows, par_output_rows,
};
use crate::tensor::Matrix;

/// Codes decoded per step.
const TILE: usize = 64;

/// Consecutive codes of one row in one slab and (axis 1) one group.
#[derive(Clone, Copy, Debug)]
struct Run {
    /// First input of the run.
    k: usize,
    len: usize,
    slab: usize,
    /// Packed element holding the first code.
    element: usize,
    /// The group (axis 1), or the group of the first code, the next ones following (axis 0).
    group: usize,
}

impl HqqWeight {
    /// `x · Wᵀ + bias` on the CPU in f32 with threads and SIMD, within the README's CPU tolerance
    /// of [`crate::formats::QuantFormat::forward_cpu`].
    pub fn forward_fast(&self, x: &Matrix) -> Result<Matrix> {
        check_input(x, self.in_features)?;
        Ok(par_output_rows(
            x,
            self.out_features,
            1,
            self.bias.as_deref(),
            |rows, out| {
                Arch::new().dispatch(RowTask {
                    w: self,
                    x,
                    rows,
                    out,
                });
            },
        ))
    }

    /// Whether tiles are factored (`s·Σ x·(q − z)`): one group per run, no rounding of weights.
    fn factored(&self) -> bool {
        self.grouping.axis == 1 && self.compute_dtype == ComputeDtype::F32
    }

    /// The runs of output row `n`, in order along K.
    fn runs(&self, n: usize) -> Runs<'_> {
        let k_in = self.in_features;
        Runs {
            w: self,
            row_start: n * k_in,
            flat: n * k_in,
            end: (n + 1) * k_in,
        }
    }

    /// The codes of `len` consecutive packed elements from `element` in bit field `slab`, as f32.
    #[inline(always)]
    fn decode(&self, slab: usize, element: usize, codes: &mut [f32]) {
        let shift = self.packing.shift(slab);
        let mask = self.packing.mask();
        if self.packing.element_bytes == 4 {
            let words = self.packed[4 * element..].chunks_exact(4);
            for (q, b) in codes.iter_mut().zip(words) {
                let word = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                *q = ((word >> shift) & mask) as i32 as f32;
            }
        } else {
            for (q, b) in codes.iter_mut().zip(&self.packed[element..]) {
                *q = ((*b as u32 >> shift) & mask) as i32 as f32;
            }
        }
    }

    /// Dequantizes decoded codes in place as [`HqqWeight::dequant_value`] does; `group` is the
    /// run's group (axis 1) or the first code's (axis 0).
    #[inline(always)]
    fn dequant<R: Rounding>(&self, group: usize, codes: &mut [f32]) {
        if self.grouping.axis == 1 {
            let (s, z) = (self.scale[group], self.zero[group]);
            for q in codes.iter_mut() {
                *q = R::round(R::round(*q - z) * s);
            }
        } else {
            let len = codes.len();
            let scales = &self.scale[group..group + len];
            let zeros = &self.zero[group..group + len];
            for ((q, s), z) in codes.iter_mut().zip(scales).zip(zeros) {
                *q = R::round(R::round(*q - z) * s);
            }
        }
    }
}

/// Iterator over a row's [`Run`]s (an iterator rather than a callback, so that the loops over
/// them stay inside the SIMD-enabled function).
struct Runs<'a> {
    w: &'a HqqWeight,
    row_start: usize,
    flat: usize,
    end: usize,
}

impl Iterator for Runs<'_> {
    type Item = Run;

    fn next(&mut self) -> Option<Run> {
        let (w, flat) = (self.w, self.flat);
        if flat >= self.end {
            return None;
        }
        let slab_len = w.packed_rows * w.packed_cols;
        let slab = flat / slab_len;
        let mut next = self.end.min((slab + 1) * slab_len);
        let group = if w.grouping.axis == 1 {
            let g = flat / w.grouping.group_size;
            next = next.min((g + 1) * w.grouping.group_size);
            g
        } else {
            let (groups, e) = (w.grouping.groups(), flat % w.grouping.groups());
            next = next.min(flat + groups - e);
            e
        };
        self.flat = next;
        Some(Run {
            k: flat - self.row_start,
            len: next - flat,
            slab,
            element: flat - slab * slab_len,
            group,
        })
    }
}

struct RowTask<'a> {
    w: &'a HqqWeight,
    x: &'a Matrix,
    rows: Range<usize>,
    out: &'a mut [f32],
}

impl WithSimd for RowTask<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        match self.w.compute_dtype {
            ComputeDtype::F32 => self.run::<S, NoRounding>(simd),
            ComputeDtype::F16 => self.run::<S, RoundF16>(simd),
            ComputeDtype::BF16 => self.run::<S, RoundBf16>(simd),
        }
    }
}

impl RowTask<'_> {
    /// `y[m][n]` for the task's rows, tiles dequantized with HQQ's rounding `R` (or, factored,
    /// `q − z` with the scale applied per tile).
    #[inline(always)]
    fn run<S: Simd, R: Rounding>(self, simd: S) {
        let Self { w, x, rows, out } = self;
        let (m, factored) = (x.rows, w.factored());
        let zero = simd.splat_f32s(0.0);
        let (mut acc, mut tail) = (vec![zero; m], vec![0f32; m]);
        let mut tile = [0f32; TILE];
        for (outs, n) in out.chunks_exact_mut(m).zip(rows) {
            acc.fill(zero);
            tail.fill(0.0);
            for run in w.runs(n) {
                for start in (0..run.len).step_by(TILE) {
                    let t = &mut tile[..TILE.min(run.len - start)];
                    w.decode(run.slab, run.element + start, t);
                    let scale = if factored {
                        let z = w.zero[run.group];
                        t.iter_mut().for_each(|q| *q -= z);
                        w.scale[run.group]
                    } else {
                        let group = match w.grouping.axis {
                            1 => run.group,
                            _ => run.group + start,
                        };
                        w.dequant::<R>(group, t);
                        1.0
                    };
                    dot_rows(simd, x, run.k + start, t, scale, &mut acc, &mut tail);
                }
            }
            for ((o, a), t) in outs.iter_mut().zip(&acc).zip(&tail) {
                *o = simd.reduce_sum_f32s(*a) + t;
            }
        }
    }
}
