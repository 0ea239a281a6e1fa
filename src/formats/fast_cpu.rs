//! The fast CPU forward of the base matmul: what a layer without a GPU runs.
//!
//! f32 with fused multiply-adds, threads over blocks of output rows (rayon), SIMD chosen at run
//! time (pulp: AVX2 + FMA where the CPU has them, NEON on aarch64). Nothing dequantizes the whole
//! weight: a task decodes a small tile of codes at a time and multiplies it into every row of `x`.
//! Tasks come in two shapes, after the storage: a format whose output rows are contiguous along K
//! (HQQ) walks a row at a time with [`dot_rows`]; one stored `[in, out]` (GPTQ, EETQ) is a
//! [`ColumnSource`] yielding [`COLS`] outputs per input, multiplied in by [`column_forward`].
//!
//! Where a format's reference rounds every dequantized weight to f16 or bf16 (GPTQ, EETQ, HQQ
//! computing in f16 / bf16), the fast path rounds it the same way, bit for bit ([`round_f16`],
//! [`round_bf16`]): skipping that rounding moves outputs by about 2e-4 of max |y|, twenty times the
//! CPU tolerance. Only where the reference does not round (HQQ in f32) are groups factored:
//! `y = Σ_g s_g·Σ x·(q − z_g)`, the zero taken off each decoded code (one subtraction per code,
//! shared by every row of `x`) and the scale applied once per group and row. Either way only the summation order differs from
//! [`super::QuantFormat::forward_cpu`], the f64 oracle.

use std::ops::Range;

use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::formats::QuantFormat;
use crate::tensor::Matrix;

/// Output columns a [`ColumnSource`] decodes per input.
pub(crate) const COLS: usize = 16;
/// Inputs decoded per step of [`column_forward`] (a 2 KiB tile, L1-resident).
const K_TILE: usize = 32;

/// Fails unless `x` is `[_, in_features]`.
pub(crate) fn check_input(x: &Matrix, in_features: usize) -> Result<()> {
    if x.cols != in_features || x.data.len() != x.rows * x.cols {
        return Err(Error::shape(
            "x",
            format!("[batch, {in_features}]"),
            &[x.rows, x.cols],
        ));
    }
    Ok(())
}

/// Runs `task(rows, out)` over blocks of output rows in parallel, `out` being `[rows, m]` for the
/// `m` rows of `x`, and returns `y: [m, n_out]` with `bias` added. Blocks start at multiples of
/// `align`. Every output starts as NaN, so one a task leaves unwritten shows.
pub(crate) fn par_output_rows<F>(
    x: &Matrix,
    n_out: usize,
    align: usize,
    bias: Option<&[f32]>,
    task: F,
) -> Matrix
where
    F: Fn(Range<usize>, &mut [f32]) + Sync,
{
    let m = x.rows;
    if m == 0 || n_out == 0 {
        return Matrix::zeros(m, n_out);
    }
    // A few blocks per thread even out uneven tasks; each still holds hundreds of rows at 4096.
    let blocks = 4 * rayon::current_num_threads();
    let rows_per_task = n_out.div_ceil(blocks).next_multiple_of(align);
    let mut transposed = vec![f32::NAN; n_out * m];
    transposed
        .par_chunks_mut(rows_per_task * m)
        .enumerate()
        .for_each(|(i, out)| {
            let start = i * rows_per_task;
            task(start..start + out.len() / m, out)
        });
    let mut y = Matrix::zeros(m, n_out);
    for (n, outs) in transposed.chunks_exact(m).enumerate() {
        let b = bias.map_or(0.0, |b| b[n]);
        for (row, v) in outs.iter().enumerate() {
            y.data[row * n_out + n] = v + b;
        }
    }
    y
}

/// `acc += x · w` over whole vectors (two chains, so one row does not wait on FMA latency);
/// returns the dot product of the elements past the last whole vector. `x` and `w` have the same
/// length.
#[inline(always)]
pub(crate) fn dot_into<S: Simd>(simd: S, x: &[f32], w: &[f32], acc: &mut S::f32s) -> f32 {
    let (xv, xt) = S::as_simd_f32s(x);
    let (wv, wt) = S::as_simd_f32s(w);
    let (mut a0, mut a1) = (*acc, simd.splat_f32s(0.0));
    let mut pairs_x = xv.chunks_exact(2);
    let mut pairs_w = wv.chunks_exact(2);
    for (px, pw) in (&mut pairs_x).zip(&mut pairs_w) {
        a0 = simd.mul_add_e_f32s(px[0], pw[0], a0);
        a1 = simd.mul_add_e_f32s(px[1], pw[1], a1);
    }
    for (vx, vw) in pairs_x.remainder().iter().zip(pairs_w.remainder()) {
        a0 = simd.mul_add_e_f32s(*vx, *vw, a0);
    }
    *acc = simd.add_f32s(a0, a1);
    let mut tail = 0.0;
    for (a, b) in xt.iter().zip(wt) {
        tail += a * b;
    }
    tail
}

/// `acc[i] += s · (x[i][k..k + len] · t)` for every row `i` of `x`, `len = t.len()`; vector
/// parts into `acc`, the elements past the last whole vector into `tail`. Four rows at a time
/// share each load of `t`, and their four chains hide the FMA latency.
#[inline(always)]
pub(crate) fn dot_rows<S: Simd>(
    simd: S,
    x: &Matrix,
    k: usize,
    t: &[f32],
    s: f32,
    acc: &mut [S::f32s],
    tail: &mut [f32],
) {
    let len = t.len();
    let (tv, tt) = S::as_simd_f32s(t);
    let sv = simd.splat_f32s(s);
    let zero = simd.splat_f32s(0.0);
    let row = |i: usize| &x.data[i * x.cols + k..i * x.cols + k + len];
    let blocks = acc.chunks_exact_mut(4).zip(tail.chunks_exact_mut(4));
    let mut first = 0;
    for (a, t4) in blocks {
        let xs = [row(first), row(first + 1), row(first + 2), row(first + 3)];
        let [x0, x1, x2, x3] = xs.map(|r| S::as_simd_f32s(r).0);
        let mut d = [zero; 4];
        for ((((q, v0), v1), v2), v3) in tv.iter().zip(x0).zip(x1).zip(x2).zip(x3) {
            d[0] = simd.mul_add_e_f32s(*v0, *q, d[0]);
            d[1] = simd.mul_add_e_f32s(*v1, *q, d[1]);
            d[2] = simd.mul_add_e_f32s(*v2, *q, d[2]);
            d[3] = simd.mul_add_e_f32s(*v3, *q, d[3]);
        }
        for (i, (ai, ti)) in a.iter_mut().zip(t4).enumerate() {
            *ai = simd.mul_add_e_f32s(sv, d[i], *ai);
            let xt = &xs[i][len - tt.len()..];
            let mut rest = 0.0;
            for (p, q) in xt.iter().zip(tt) {
                rest += p * q;
            }
            *ti += s * rest;
        }
        first += 4;
    }
    for (i, (ai, ti)) in acc.iter_mut().zip(tail.iter_mut()).enumerate().skip(first) {
        let mut d = zero;
        let rest = dot_into(simd, row(i), t, &mut d);
        *ai = simd.mul_add_e_f32s(sv, d, *ai);
        *ti += s * rest;
    }
}

/// One rounding of a dequantized weight: none (f32), to f16 or to bf16, as PyTorch rounds an op's
/// result. Plain integer and float operations, so the compiler vectorizes a loop of them.
pub(crate) trait Rounding {
    fn round(v: f32) -> f32;
}

pub(crate) struct NoRounding;
pub(crate) struct RoundF16;
pub(crate) struct RoundBf16;

impl Rounding for NoRounding {
    #[inline(always)]
    fn round(v: f32) -> f32 {
        v
    }
}

impl Rounding for RoundF16 {
    #[inline(always)]
    fn round(v: f32) -> f32 {
        round_f16(v)
    }
}

impl Rounding for RoundBf16 {
    #[inline(always)]
    fn round(v: f32) -> f32 {
        round_bf16(v)
    }
}

const F16_MIN_NORMAL: f32 = 6.103_515_6e-5; // 2^-14
const F16_MAX: f32 = 65504.0;

/// f32 -> nearest f16 (ties to even) -> f32 for finite `v`, equal to `half::f16::from_f32(v)
/// .to_f32()` (zero's sign aside). Normal range: drop 13 mantissa bits with a rounding carry.
/// Below 2^-14, f16 steps are 2^-24, the spacing of f32 in [0.5, 1): adding and subtracting 0.75
/// rounds to them. Above 65504 the carry lands past f16's range: infinity.
#[inline(always)]
pub(crate) fn round_f16(v: f32) -> f32 {
    let bits = v.to_bits();
    let carry = 0x0FFF + ((bits >> 13) & 1);
    let normal = f32::from_bits(bits.wrapping_add(carry) & 0xFFFF_E000);
    let small = (v + 0.75) - 0.75;
    let r = if v.abs() < F16_MIN_NORMAL {
        small
    } else {
        normal
    };
    if r.abs() > F16_MAX {
        f32::INFINITY.copysign(v)
    } else {
        r
    }
}

/// f32 -> nearest bf16 (ties to even) -> f32 for finite `v`, equal to `half::bf16`'s rounding.
#[inline(always)]
pub(crate) fn round_bf16(v: f32) -> f32 {
    let bits = v.to_bits();
    let carry = 0x7FFF + ((bits >> 16) & 1);
    f32::from_bits(bits.wrapping_add(carry) & 0xFFFF_0000)
}

/// A format stored `[in, out]`: yields the dequantized weights of one input for [`COLS`]
/// consecutive outputs, exactly as its reference dequantizes them.
pub(crate) trait ColumnSource: QuantFormat + Sync {
    /// What a block of columns needs decoded once (a GPTQ block's scales and zeros per group).
    type Block;
    /// The block of outputs `n0..n0 + width` (`width <= COLS`).
    fn block(&self, n0: usize, width: usize) -> Self::Block;
    /// Weights of input `k` for the block's outputs into `out[..width]`.
    fn weights(&self, block: &Self::Block, k: usize, out: &mut [f32; COLS]);
}

/// `x · Wᵀ + bias` for a [`ColumnSource`]: each task takes blocks of [`COLS`] outputs, decodes
/// [`K_TILE`] inputs at a time and adds them into every row of `x`.
pub(crate) fn column_forward<C: ColumnSource>(src: &C, x: &Matrix) -> Result<Matrix> {
    check_input(x, src.in_features())?;
    Ok(par_output_rows(
        x,
        src.out_features(),
        COLS,
        src.bias(),
        |rows, out| {
            Arch::new().dispatch(ColumnTask { src, x, rows, out });
        },
    ))
}

struct ColumnTask<'a, C> {
    src: &'a C,
    x: &'a Matrix,
    rows: Range<usize>,
    out: &'a mut [f32],
}

impl<C: ColumnSource> WithSimd for ColumnTask<'_, C> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self { src, x, rows, out } = self;
        let (m, k_in) = (x.rows, x.cols);
        let mut acc = vec![[0f32; COLS]; m];
        let mut tile = [[0f32; COLS]; K_TILE];
        for n0 in rows.clone().step_by(COLS) {
            let width = COLS.min(rows.end - n0);
            let block = src.block(n0, width);
            acc.fill([0.0; COLS]);
            for k0 in (0..k_in).step_by(K_TILE) {
                let kt = K_TILE.min(k_in - k0);
                for (t, w) in tile[..kt].iter_mut().enumerate() {
                    src.weights(&block, k0 + t, w);
                }
                for (row, a) in acc.iter_mut().enumerate() {
                    let xs = &x.row(row)[k0..k0 + kt];
                    // A tile's sum apart, then added: shorter chains of rounding along K.
                    let mut part = [0f32; COLS];
                    let (pv, _) = S::as_mut_simd_f32s(&mut part);
                    for (xv, w) in xs.iter().zip(&tile) {
                        let (wv, _) = S::as_simd_f32s(w);
                        let xb = simd.splat_f32s(*xv);
                        for (p, w) in pv.iter_mut().zip(wv) {
                            *p = simd.mul_add_e_f32s(xb, *w, *p);
                        }
                    }
                    for (a, p) in a.iter_mut().zip(&part) {
                        *a += p;
                    }
                }
            }
            let first = (n0 - rows.start) * m;
            for (c, outs) in out[first..first + width * m]
                .chunks_exact_mut(m)
                .enumerate()
            {
                for (o, a) in outs.iter_mut().zip(&acc) {
                    *o = a[c];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(ours: f32, reference: f32) -> bool {
        ours == reference || (ours.is_nan() && reference.is_nan())
    }

    fn check_rounding(v: f32) {
        let f16 = half::f16::from_f32(v).to_f32();
        assert!(same(round_f16(v), f16), "f16 of {v:e} ({:#x})", v.to_bits());
        let bf16 = half::bf16::from_f32(v).to_f32();
        assert!(same(round_bf16(v), bf16), "bf16 of {v:e}");
    }

    #[test]
    fn rounding_matches_half_around_every_boundary() {
        // Every f16 value and the points a quarter, a half and three quarters of a step away
        // (ties included), both signs, subnormals and the overflow edge.
        for h in 0..0x7BFFu16 {
            let lo = half::f16::from_bits(h).to_f32();
            let hi = half::f16::from_bits(h + 1).to_f32();
            for t in [0.0, 0.25, 0.5, 0.75] {
                let v = lo + (hi - lo) * t;
                check_rounding(v);
                check_rounding(-v);
                check_rounding(f32::from_bits(v.to_bits() + 1));
                check_rounding(f32::from_bits(v.to_bits().saturating_sub(1)));
            }
        }
        for v in [
            65504.0,
            65519.99,
            65520.0,
            1e6,
            f32::MAX,
            1e-30,
            2.9e-8,
            3.0e-8,
        ] {
            check_rounding(v);
            check_rounding(-v);
        }
    }

    #[test]
    fn rounding_matches_half_on_random_floats() {
        use rand::Rng;
        let mut rng = rand::rng();
        for _ in 0..1_000_000 {
            let v = f32::from_bits(rng.random::<u32>());
            if v.is_finite() {
                check_rounding(v);
            }
        }
    }
}
