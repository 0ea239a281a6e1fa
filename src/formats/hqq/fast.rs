//! HQQ's fast CPU forward (see `formats::fast_cpu`). An output row is `K` consecutive flat
//! indices, so its codes are runs of consecutive packed elements, each run in one slab (one bit
//! field) and, along axis 1, in one group; a task walks its rows run by run, decoding
//! [`TILE`] codes at a time straight from HQQ's storage.
//!
//! In f32 (no rounding in the reference), axis 1: a run's group is factored,
//! `s·Σ x·q − s·z·Σ x`. Otherwise (f16 / bf16, whose reference rounds every weight, or axis 0,
//! where every element of a run has its own group) a tile is dequantized as HQQ does, then
//! multiplied in.

use std::ops::Range;

use pulp::{Arch, Simd, WithSimd};

use super::{ComputeDtype, HqqWeight};
use crate::error::Result;
use crate::formats::fast_cpu::{
    NoRounding, PrefixSums, RoundBf16, RoundF16, Rounding, check_input, dot_into, par_output_rows,
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
        let prefix = self.factored().then(|| PrefixSums::new(x));
        Ok(par_output_rows(
            x,
            self.out_features,
            1,
            self.bias.as_deref(),
            |rows, out| {
                Arch::new().dispatch(RowTask {
                    w: self,
                    x,
                    prefix: prefix.as_ref(),
                    rows,
                    out,
                });
            },
        ))
    }

    /// Whether runs are factored: one group per run and no rounding of the weights.
    fn factored(&self) -> bool {
        self.grouping.axis == 1 && self.compute_dtype == ComputeDtype::F32
    }

    /// Calls `visit` on the runs of output row `n`, in order along K.
    #[inline(always)]
    fn runs(&self, n: usize, mut visit: impl FnMut(Run)) {
        let k_in = self.in_features;
        let slab_len = self.packed_rows * self.packed_cols;
        let (group_size, groups) = (self.grouping.group_size, self.grouping.groups());
        let (mut flat, end) = (n * k_in, (n + 1) * k_in);
        while flat < end {
            let slab = flat / slab_len;
            let mut next = end.min((slab + 1) * slab_len);
            let group = if self.grouping.axis == 1 {
                let g = flat / group_size;
                next = next.min((g + 1) * group_size);
                g
            } else {
                let e = flat % groups;
                next = next.min(flat + groups - e);
                e
            };
            visit(Run {
                k: flat - n * k_in,
                len: next - flat,
                slab,
                element: flat - slab * slab_len,
                group,
            });
            flat = next;
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

struct RowTask<'a> {
    w: &'a HqqWeight,
    x: &'a Matrix,
    prefix: Option<&'a PrefixSums>,
    rows: Range<usize>,
    out: &'a mut [f32],
}

impl WithSimd for RowTask<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        match (self.prefix, self.w.compute_dtype) {
            (Some(prefix), _) => self.factored(simd, prefix),
            (None, ComputeDtype::F32) => self.dequantized::<S, NoRounding>(simd),
            (None, ComputeDtype::F16) => self.dequantized::<S, RoundF16>(simd),
            (None, ComputeDtype::BF16) => self.dequantized::<S, RoundBf16>(simd),
        }
    }
}

impl RowTask<'_> {
    /// `y[m][n] = Σ_runs s·Σ x·q − s·z·Σ x`.
    #[inline(always)]
    fn factored<S: Simd>(self, simd: S, prefix: &PrefixSums) {
        let Self {
            w, x, rows, out, ..
        } = self;
        let m = x.rows;
        let zero = simd.splat_f32s(0.0);
        let (mut acc, mut tail) = (vec![zero; m], vec![0f32; m]);
        let (mut run_acc, mut run_tail) = (vec![zero; m], vec![0f32; m]);
        let mut codes = [0f32; TILE];
        for (outs, n) in out.chunks_exact_mut(m).zip(rows) {
            acc.fill(zero);
            tail.fill(0.0);
            w.runs(n, |run| {
                run_acc.fill(zero);
                run_tail.fill(0.0);
                for start in (0..run.len).step_by(TILE) {
                    let len = TILE.min(run.len - start);
                    let q = &mut codes[..len];
                    w.decode(run.slab, run.element + start, q);
                    let k = run.k + start;
                    for (row, (a, t)) in run_acc.iter_mut().zip(&mut run_tail).enumerate() {
                        *t += dot_into(simd, &x.row(row)[k..k + len], q, a);
                    }
                }
                let (s, z) = (w.scale[run.group], w.zero[run.group]);
                let sv = simd.splat_f32s(s);
                for row in 0..m {
                    acc[row] = simd.mul_add_e_f32s(sv, run_acc[row], acc[row]);
                    let zero_term = s as f64 * z as f64 * prefix.range(row, run.k, run.len);
                    tail[row] += (s as f64 * run_tail[row] as f64 - zero_term) as f32;
                }
            });
            for ((o, a), t) in outs.iter_mut().zip(&acc).zip(&tail) {
                *o = simd.reduce_sum_f32s(*a) + t;
            }
        }
    }

    /// `y[m][n] = Σ x·w` over tiles dequantized with HQQ's rounding `R`.
    #[inline(always)]
    fn dequantized<S: Simd, R: Rounding>(self, simd: S) {
        let Self {
            w, x, rows, out, ..
        } = self;
        let m = x.rows;
        let zero = simd.splat_f32s(0.0);
        let (mut acc, mut tail) = (vec![zero; m], vec![0f32; m]);
        let mut weights = [0f32; TILE];
        for (outs, n) in out.chunks_exact_mut(m).zip(rows) {
            acc.fill(zero);
            tail.fill(0.0);
            w.runs(n, |run| {
                for start in (0..run.len).step_by(TILE) {
                    let len = TILE.min(run.len - start);
                    let wt = &mut weights[..len];
                    w.decode(run.slab, run.element + start, wt);
                    let group = match w.grouping.axis {
                        1 => run.group,
                        _ => run.group + start,
                    };
                    w.dequant::<R>(group, wt);
                    let k = run.k + start;
                    for (row, (a, t)) in acc.iter_mut().zip(&mut tail).enumerate() {
                        *t += dot_into(simd, &x.row(row)[k..k + len], wt, a);
                    }
                }
            });
            for ((o, a), t) in outs.iter_mut().zip(&acc).zip(&tail) {
                *o = simd.reduce_sum_f32s(*a) + t;
            }
        }
    }
}
