//! Host-side dense matrices: the currency of the CPU reference and of host <-> GPU copies.

use crate::error::{Error, Result};

/// A row-major `rows x cols` matrix of f32 (weights are `[out, in]`, activations `[batch, in]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    /// Number of rows (output features of a weight, batch rows of an activation).
    pub rows: usize,
    /// Number of columns (elements per row).
    pub cols: usize,
    /// The `rows * cols` elements, row after row.
    pub data: Vec<f32>,
}

impl Matrix {
    /// Wraps row-major `data`; fails with [`Error::Shape`] unless it holds exactly
    /// `rows * cols` elements.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(Error::shape(
                "matrix",
                format!("[{rows}, {cols}]"),
                &[data.len()],
            ));
        }
        Ok(Self { rows, cols, data })
    }

    /// A `rows x cols` matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// Fresh uniform random values in `[-scale, scale)` (for demos, benchmarks and tests).
    #[cfg(feature = "random")]
    pub fn random(rows: usize, cols: usize, scale: f32) -> Self {
        use rand::Rng;
        let mut rng = rand::rng();
        let data = (0..rows * cols)
            .map(|_| rng.random_range(-scale..scale))
            .collect();
        Self { rows, cols, data }
    }

    /// The `n x n` identity.
    pub fn identity(n: usize) -> Self {
        let mut m = Self::zeros(n, n);
        for i in 0..n {
            m.data[i * n + i] = 1.0;
        }
        m
    }

    /// Row `r` as a slice of `cols` elements. Panics if `r >= rows`.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// Row `r`, mutable. Panics if `r >= rows`.
    pub fn row_mut(&mut self, r: usize) -> &mut [f32] {
        &mut self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// The element at row `r`, column `c`. Panics if out of bounds.
    pub fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.cols + c]
    }

    /// A new `cols x rows` matrix with rows and columns swapped.
    pub fn transpose(&self) -> Self {
        let mut t = Self::zeros(self.cols, self.rows);
        for r in 0..self.rows {
            for c in 0..self.cols {
                t.data[c * self.rows + r] = self.data[r * self.cols + c];
            }
        }
        t
    }

    /// `self · otherᵀ` with f64 accumulation: `[m, k] x [n, k] -> [m, n]`
    /// (an activation times an `[out, in]` weight). Fails with [`Error::Shape`] unless both
    /// have `k` columns.
    pub fn matmul_t(&self, other: &Matrix) -> Result<Matrix> {
        if self.cols != other.cols {
            return Err(Error::shape(
                "matmul operand",
                format!("[_, {}]", self.cols),
                &[other.rows, other.cols],
            ));
        }
        let mut out = Matrix::zeros(self.rows, other.rows);
        for i in 0..self.rows {
            let a = self.row(i);
            for j in 0..other.rows {
                let b = other.row(j);
                let acc: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
                out.data[i * other.rows + j] = acc as f32;
            }
        }
        Ok(out)
    }

    /// `self · other` with f64 accumulation: `[m, k] x [k, n] -> [m, n]`. Fails with
    /// [`Error::Shape`] unless `other` has `k` rows.
    pub fn matmul(&self, other: &Matrix) -> Result<Matrix> {
        self.matmul_t(&other.transpose())
    }

    /// Adds `bias[j]` to every row.
    pub fn add_row_vector(&mut self, bias: &[f32]) {
        for r in 0..self.rows {
            for (v, b) in self.row_mut(r).iter_mut().zip(bias) {
                *v += b;
            }
        }
    }

    /// Rounds every element to the nearest f16 (round half to even), as a PyTorch cast does.
    pub fn round_to_f16(&mut self) {
        for v in &mut self.data {
            *v = round_f16(*v);
        }
    }

    /// Frobenius norm `sqrt(Σ v²)`, accumulated in f64.
    pub fn frobenius(&self) -> f64 {
        self.data
            .iter()
            .map(|v| (*v as f64) * (*v as f64))
            .sum::<f64>()
            .sqrt()
    }
}

/// f32 -> nearest f16 (ties to even) -> f32.
pub fn round_f16(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// `max |a - b| / max |b|`: the golden README's measure for forward outputs.
pub fn max_rel_error(ours: &[f32], reference: &[f32]) -> f64 {
    let scale = reference
        .iter()
        .fold(0f64, |m, v| m.max((*v as f64).abs()))
        .max(f64::MIN_POSITIVE);
    let diff = ours
        .iter()
        .zip(reference)
        .fold(0f64, |m, (a, b)| m.max(((*a as f64) - (*b as f64)).abs()));
    if ours.len() != reference.len() || ours.iter().any(|v| v.is_nan()) {
        return f64::INFINITY;
    }
    diff / scale
}

/// `‖a - b‖_F / ‖b‖_F`: the measure for quantization error.
pub fn rel_frobenius_error(ours: &[f32], reference: &[f32]) -> f64 {
    if ours.len() != reference.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (a, b) in ours.iter().zip(reference) {
        let d = *a as f64 - *b as f64;
        num += d * d;
        den += (*b as f64) * (*b as f64);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}
