//! OFT (orthogonal fine-tuning) as PEFT ≥ 0.18 computes it.
//!
//! The adapter stores, per block, the strict upper triangle of a skew-symmetric generator `Q`
//! (row-major over `(0,1), (0,2), …, (b−2,b−1)`). Each block becomes a `b × b` rotation `R`, and the
//! layer input is rotated row-vector style, `x · blockdiag(R₁ … R_k)`, before the base matmul.
//! A merge is therefore `W · R_fullᵀ`, never `R · W` or `W · R`.

use rayon::prelude::*;
use serde::Deserialize;
use serde_json::Value;

use crate::adapters::peft_dir::{PeftAdapterDir, adapter_error, in_adapter};
use crate::error::{Error, Result, check_finite};
use crate::tensor::Matrix;

/// The tensor suffix of an OFT adapter on a Linear layer.
pub const OFT_SUFFIX: &str = "oft_R.weight";

/// `OFTConfig.eps`'s default.
pub const DEFAULT_COFT_EPS: f32 = 6e-5;

/// The fields of an OFT `adapter_config.json` that matter for inference.
#[derive(Clone, Debug, PartialEq)]
pub struct OftConfig {
    /// Number of blocks (0 = derive it from `oft_block_size`).
    pub r: usize,
    /// Block size (0 = derive it from `r`). Exactly one of `r` and `oft_block_size` is non-zero.
    pub oft_block_size: usize,
    /// A missing key means `true` (the field default; PEFT's docstring says otherwise).
    pub use_cayley_neumann: bool,
    /// Series length when `use_cayley_neumann` is set (see [`Parameterization::Neumann`]).
    pub num_cayley_neumann_terms: usize,
    /// COFT: constrain each block's generator to a Frobenius ball of radius `eps / sqrt(rows)`.
    pub coft: bool,
    /// COFT's radius; must be positive and finite when `coft` is set.
    pub eps: f32,
    /// One rotation block shared by all blocks (the parameter has a single row).
    pub block_share: bool,
    /// Parsed and ignored: no PEFT forward has applied it since 0.16.0, and it only ever acted in
    /// training mode.
    pub module_dropout: f32,
    /// First written by PEFT 0.18.0. A Cayley–Neumann adapter saved without it (or by an older
    /// PEFT) was trained with every series coefficient 2; current PEFT, like this crate, applies
    /// the ≥ 0.18 series to it anyway.
    pub peft_version: Option<String>,
}

#[derive(Deserialize)]
struct RawOftConfig {
    #[serde(default)]
    r: usize,
    oft_block_size: Option<usize>,
    #[serde(default = "default_true")]
    use_cayley_neumann: bool,
    #[serde(default = "default_neumann_terms")]
    num_cayley_neumann_terms: usize,
    #[serde(default)]
    coft: bool,
    #[serde(default = "default_eps")]
    eps: f32,
    #[serde(default)]
    block_share: bool,
    #[serde(default)]
    module_dropout: f32,
    #[serde(default)]
    peft_version: Option<String>,
    #[serde(default)]
    bias: Option<String>,
}

fn default_true() -> bool {
    true
}

fn default_neumann_terms() -> usize {
    5
}

fn default_eps() -> f32 {
    DEFAULT_COFT_EPS
}

impl OftConfig {
    /// Parses an OFT `adapter_config.json`; unknown keys are ignored (every PEFT release adds some).
    pub fn from_json(config: &Value) -> Result<Self> {
        let raw: RawOftConfig = serde_json::from_value(config.clone())
            .map_err(|e| Error::config(format!("OFT adapter_config.json: {e}")))?;
        let oft_block_size = raw.oft_block_size.ok_or_else(|| {
            Error::config(
                "OFT adapter_config.json has no `oft_block_size`: a checkpoint from before \
                 PEFT 0.14, which current PEFT refuses too",
            )
        })?;
        if (raw.r == 0) == (oft_block_size == 0) {
            return Err(Error::config(format!(
                "OFT needs exactly one of `r` and `oft_block_size` non-zero, found r = {} and \
                 oft_block_size = {oft_block_size}",
                raw.r
            )));
        }
        if let Some(bias) = raw.bias.filter(|b| b != "none") {
            return Err(Error::Unsupported(format!(
                "OFT with bias = \"{bias}\" trains base-layer biases, which an adapter cannot carry"
            )));
        }
        if raw.coft && !(raw.eps.is_finite() && raw.eps > 0.0) {
            return Err(Error::config(format!(
                "COFT needs a positive finite `eps`, found {}",
                raw.eps
            )));
        }
        Ok(Self {
            r: raw.r,
            oft_block_size,
            use_cayley_neumann: raw.use_cayley_neumann,
            num_cayley_neumann_terms: raw.num_cayley_neumann_terms,
            coft: raw.coft,
            eps: raw.eps,
            block_share: raw.block_share,
            module_dropout: raw.module_dropout,
            peft_version: raw.peft_version,
        })
    }

    /// The rotation mode this config asks for.
    pub fn parameterization(&self) -> Parameterization {
        if self.use_cayley_neumann {
            Parameterization::Neumann {
                terms: self.num_cayley_neumann_terms,
            }
        } else {
            Parameterization::Cayley
        }
    }

    /// `Some(eps)` when COFT is on.
    pub fn coft_eps(&self) -> Option<f32> {
        self.coft.then_some(self.eps)
    }

    /// `(number of blocks, block size)` PEFT uses on a layer with `in_features` inputs, after its
    /// adjustment of a size that does not divide `in_features` (see [`adjust`]).
    pub fn blocks_for(&self, in_features: usize) -> Result<(usize, usize)> {
        if in_features == 0 {
            return Err(Error::config("OFT on a layer with 0 input features"));
        }
        Ok(if self.r == 0 {
            let b = adjust(in_features, self.oft_block_size);
            (in_features / b, b)
        } else {
            let r = adjust(in_features, self.r);
            (r, in_features / r)
        })
    }
}

/// PEFT's replacement for a block count or block size `p` that does not divide `n`: `n` itself
/// when `p ≥ n`, else the divisor of `n` nearest to `p`, ties going to the lower one.
/// A `p` that already divides `n` is returned unchanged.
pub fn adjust(n: usize, p: usize) -> usize {
    if p >= n {
        return n;
    }
    let p = p.max(1);
    let lo = (1..=p).rev().find(|d| n.is_multiple_of(*d)).unwrap_or(1);
    let hi = (p..=n).find(|d| n.is_multiple_of(*d)).unwrap_or(n);
    if p - lo <= hi - p { lo } else { hi }
}

/// How a generator `Q` becomes a block rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parameterization {
    /// Exact Cayley, `R = (I − Q)(I + Q)⁻¹` (`use_cayley_neumann = false`).
    Cayley,
    /// PEFT's truncated series (`use_cayley_neumann = true`):
    /// `I + 2Q + 2Q² + … + 2Q^(p−1) + Q^p` with `p = max(terms − 1, 3)`; `terms ≤ 1` gives `I` and
    /// `terms = 2` gives `I + 2Q`. It approximates `(I + Q)(I − Q)⁻¹`, the *transpose* of the exact
    /// mode's rotation: an adapter must run in the mode it was trained in.
    Neumann {
        /// PEFT's `num_cayley_neumann_terms`.
        terms: usize,
    },
}

/// One OFT adapter on one Linear layer, validated, COFT-projected, with its rotations computed.
#[derive(Clone, Debug)]
pub struct OftAdapter {
    name: String,
    in_features: usize,
    block_size: usize,
    n_blocks: usize,
    block_share: bool,
    params: Vec<f32>,
    parameterization: Parameterization,
    coft_eps: Option<f32>,
    blocks: Vec<Matrix>,
}

impl OftAdapter {
    /// Loads the adapter of `module` (or of the only module carrying `oft_R.weight`) from a PEFT
    /// directory. The block size comes from the tensor and must agree with the config as PEFT
    /// resolves it for `in_features`.
    pub fn from_peft_dir(
        name: &str,
        dir: &PeftAdapterDir,
        module: Option<&str>,
        in_features: usize,
    ) -> Result<Self> {
        load(name, dir, module, in_features).map_err(in_adapter(name))
    }

    /// Builds the adapter from its parameter `[rows, b(b−1)/2]` (rows = number of blocks, or 1
    /// under `block_share`). COFT (`coft_eps = Some(eps)`) is applied once here.
    pub fn from_params(
        name: &str,
        in_features: usize,
        params: Matrix,
        parameterization: Parameterization,
        coft_eps: Option<f32>,
        block_share: bool,
    ) -> Result<Self> {
        build(
            name,
            in_features,
            params,
            parameterization,
            coft_eps,
            block_share,
        )
        .map_err(in_adapter(name))
    }

    /// The adapter's name, as used in error messages and adapter selection.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Width of the rotated input.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Rows and columns of one rotation block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// `in_features / block_size`: how many diagonal blocks the rotation has.
    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    /// Whether all blocks share one parameter row.
    pub fn block_share(&self) -> bool {
        self.block_share
    }

    /// How each generator becomes a rotation.
    pub fn parameterization(&self) -> Parameterization {
        self.parameterization
    }

    /// COFT's radius if COFT was applied at load, else `None`.
    pub fn coft_eps(&self) -> Option<f32> {
        self.coft_eps
    }

    /// Rows of the parameter: `n_blocks`, or 1 under `block_share`.
    pub fn param_rows(&self) -> usize {
        self.blocks.len()
    }

    /// The parameter after COFT, `[param_rows, b(b−1)/2]` row-major (PEFT's `oft_R.weight`).
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// One `b × b` rotation per parameter row (a single one under `block_share`).
    pub fn rotation_blocks(&self) -> &[Matrix] {
        &self.blocks
    }

    /// The rotation blocks for a GPU buffer: `param_rows × b × b` f32, block after block, each
    /// row-major (`[block][k][c]`, the factor of `x[block·b + k]` in `out[block·b + c]`). Under
    /// `block_share` it holds one block, used for every `block`.
    pub fn blocks_flat(&self) -> Vec<f32> {
        self.blocks
            .iter()
            .flat_map(|m| m.data.iter().copied())
            .collect()
    }

    /// The `[in, in]` block-diagonal rotation (PEFT's `get_delta_weight`).
    pub fn full_rotation(&self) -> Matrix {
        let (b, n) = (self.block_size, self.in_features);
        let mut full = Matrix::zeros(n, n);
        for blk in 0..self.n_blocks {
            let r = self.block(blk);
            for k in 0..b {
                let row = blk * b + k;
                full.data[row * n + blk * b..row * n + (blk + 1) * b].copy_from_slice(r.row(k));
            }
        }
        full
    }

    /// The true inverse of every rotation block (what an unmerge needs: a Cayley–Neumann block is
    /// not orthogonal, so its transpose is not its inverse). Fails if a block is singular.
    pub fn inverse_blocks(&self) -> Result<Vec<Matrix>> {
        let b = self.block_size;
        let identity = identity_f64(b);
        self.blocks
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let r64: Vec<f64> = r.data.iter().map(|v| *v as f64).collect();
                let inv = solve(r64, identity.clone(), b).ok_or_else(|| {
                    adapter_error(&self.name, format!("rotation block {i} is singular"))
                })?;
                Ok(to_matrix(&inv, b))
            })
            .collect()
    }

    /// [`Self::rotate_cpu`] in f32, rows of `x` in parallel: what a CPU layer runs. An output
    /// sums `b` products, so f32 stays within a few ulps of the f64 reference.
    pub fn rotate_fast(&self, x: &Matrix) -> Result<Matrix> {
        self.check_input(x)?;
        let b = self.block_size;
        let mut out = Matrix::zeros(x.rows, x.cols);
        let rows = out
            .data
            .par_chunks_mut(x.cols)
            .zip(x.data.par_chunks(x.cols));
        rows.for_each(|(dst, src)| {
            let blocks = dst.chunks_exact_mut(b).zip(src.chunks_exact(b));
            for (blk, (d, s)) in blocks.take(self.n_blocks).enumerate() {
                // Row k of R scaled by x[k], added along the block: contiguous, vectorized.
                for (xk, rk) in s.iter().zip(self.block(blk).data.chunks_exact(b)) {
                    for (dc, rc) in d.iter_mut().zip(rk) {
                        *dc += xk * rc;
                    }
                }
            }
        });
        Ok(out)
    }

    fn check_input(&self, x: &Matrix) -> Result<()> {
        if x.cols != self.in_features {
            return Err(adapter_error(
                &self.name,
                format!(
                    "input has {} features, the adapter rotates {}",
                    x.cols, self.in_features
                ),
            ));
        }
        Ok(())
    }

    /// `x · blockdiag(R)` for `x: [m, in]`, f64 accumulation.
    pub fn rotate_cpu(&self, x: &Matrix) -> Result<Matrix> {
        self.check_input(x)?;
        let b = self.block_size;
        let mut out = Matrix::zeros(x.rows, x.cols);
        for m in 0..x.rows {
            let (src, dst) = (x.row(m), out.row_mut(m));
            for blk in 0..self.n_blocks {
                let r = self.block(blk);
                let xs = &src[blk * b..(blk + 1) * b];
                for c in 0..b {
                    let acc: f64 = (0..b).map(|k| xs[k] as f64 * r.at(k, c) as f64).sum();
                    dst[blk * b + c] = acc as f32;
                }
            }
        }
        Ok(out)
    }

    fn block(&self, blk: usize) -> &Matrix {
        &self.blocks[if self.block_share { 0 } else { blk }]
    }
}

fn load(
    name: &str,
    dir: &PeftAdapterDir,
    module: Option<&str>,
    in_features: usize,
) -> Result<OftAdapter> {
    if dir.peft_type() != "OFT" {
        return Err(Error::config(format!(
            "{} holds a {} adapter, not OFT",
            dir.path().display(),
            dir.peft_type()
        )));
    }
    let config = dir
        .config()
        .oft()
        .ok_or_else(|| Error::config("not an OFT config"))?;
    let module = dir.resolve_module(module, OFT_SUFFIX)?;
    check_module_keys(dir, &module)?;
    let tensor = dir.tensor_for(Some(&module), OFT_SUFFIX)?;
    let &[rows, len] = tensor.shape.as_slice() else {
        return Err(Error::shape(
            &tensor.name,
            "[rows, b(b-1)/2]",
            &tensor.shape,
        ));
    };
    let params = Matrix::new(rows, len, tensor.to_f32()?)?;
    let b = block_size_from_len(len)?;
    let (_, config_b) = config.blocks_for(in_features)?;
    if b != config_b {
        return Err(Error::config(format!(
            "`{}` holds blocks of size {b}, but the config (r = {}, oft_block_size = {}) gives \
             blocks of size {config_b} on a layer with {in_features} inputs",
            tensor.name, config.r, config.oft_block_size
        )));
    }
    build(
        name,
        in_features,
        params,
        config.parameterization(),
        config.coft_eps(),
        config.block_share,
    )
}

fn check_module_keys(dir: &PeftAdapterDir, module: &str) -> Result<()> {
    for suffix in dir.suffixes_of(module) {
        let reason = match suffix {
            OFT_SUFFIX => continue,
            "oft_r" | "oft_s" => "an OFT checkpoint from before PEFT 0.16 (keys `oft_r`/`oft_s`), \
                 which current PEFT refuses too"
                .to_string(),
            s if s.starts_with("oft_embedding_R") => {
                "OFT on an embedding layer is not supported".to_string()
            }
            s if s.starts_with("base_layer.") => format!(
                "a trained base-layer tensor (`{s}`, saved with bias != \"none\") is not supported"
            ),
            s => format!("unknown key `{s}`"),
        };
        return Err(Error::config(format!("module `{module}`: {reason}")));
    }
    Ok(())
}

fn build(
    name: &str,
    in_features: usize,
    mut params: Matrix,
    parameterization: Parameterization,
    coft_eps: Option<f32>,
    block_share: bool,
) -> Result<OftAdapter> {
    check_finite(OFT_SUFFIX, &params.data)?;
    let b = block_size_from_len(params.cols)?;
    if in_features == 0 || !in_features.is_multiple_of(b) {
        return Err(Error::config(format!(
            "block size {b} does not divide in_features = {in_features}"
        )));
    }
    let n_blocks = in_features / b;
    let rows = if block_share { 1 } else { n_blocks };
    if params.rows != rows {
        return Err(Error::config(format!(
            "the parameter has {} rows; {in_features} inputs in blocks of {b}{} need {rows}",
            params.rows,
            if block_share { " (shared)" } else { "" }
        )));
    }
    if let Some(eps) = coft_eps {
        if !(eps.is_finite() && eps > 0.0) {
            return Err(Error::config(format!(
                "COFT needs a positive finite eps, found {eps}"
            )));
        }
        coft_project(&mut params, eps);
    }
    let blocks = (0..params.rows)
        .map(|i| {
            let q = skew_from_row(params.row(i), b);
            let r = match parameterization {
                Parameterization::Cayley => cayley_exact(&q, b).ok_or_else(|| {
                    Error::config(format!("I + Q of block {i} is numerically singular"))
                })?,
                Parameterization::Neumann { terms } => cayley_neumann(&q, b, terms),
            };
            Ok(to_matrix(&r, b))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(OftAdapter {
        name: name.to_string(),
        in_features,
        block_size: b,
        n_blocks,
        block_share,
        params: params.data,
        parameterization,
        coft_eps,
        blocks,
    })
}

/// `b` from the length `b(b−1)/2` of a strict upper triangle (`0` means `b = 1`).
fn block_size_from_len(len: usize) -> Result<usize> {
    let estimate = ((1.0 + (1.0 + 8.0 * len as f64).sqrt()) / 2.0).round() as usize;
    (estimate.saturating_sub(1)..=estimate + 1)
        .find(|&b| b >= 1 && b.checked_mul(b - 1).map(|p| p / 2) == Some(len))
        .ok_or_else(|| {
            Error::config(format!(
                "parameter rows of length {len} are not a strict upper triangle b(b-1)/2"
            ))
        })
}

/// COFT: projects every block's generator onto the Frobenius ball of radius `eps/√rows`. The
/// norm is that of the skew matrix, `√2·‖row‖`.
fn coft_project(params: &mut Matrix, eps: f32) {
    let radius = eps as f64 / (params.rows as f64).sqrt();
    for i in 0..params.rows {
        let row = params.row_mut(i);
        let norm = (2.0 * row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>()).sqrt();
        if norm > radius {
            let scale = radius / norm;
            row.iter_mut().for_each(|v| *v = (*v as f64 * scale) as f32);
        }
    }
}

/// The skew-symmetric `Q = S − Sᵀ` whose strict upper triangle is `row`, row-major `b × b`.
fn skew_from_row(row: &[f32], b: usize) -> Vec<f64> {
    let mut q = vec![0.0; b * b];
    let mut values = row.iter();
    for i in 0..b {
        for j in i + 1..b {
            let v = values.next().map_or(0.0, |v| *v as f64);
            q[i * b + j] = v;
            q[j * b + i] = -v;
        }
    }
    q
}

/// `(I − Q)(I + Q)⁻¹`, computed as `(I + Q)⁻¹(I − Q)` (the factors commute).
fn cayley_exact(q: &[f64], b: usize) -> Option<Vec<f64>> {
    let identity = identity_f64(b);
    let plus = identity.iter().zip(q).map(|(i, q)| i + q).collect();
    let minus = identity.iter().zip(q).map(|(i, q)| i - q).collect();
    solve(plus, minus, b)
}

/// PEFT's series, term by term: `I`, `+2Q` when terms > 1, `+2Q²` when terms > 2, `+2Q^k` for
/// k = 3 … terms−2, then the next power with coefficient 1.
fn cayley_neumann(q: &[f64], b: usize, terms: usize) -> Vec<f64> {
    let mut r = identity_f64(b);
    if terms > 1 {
        add_scaled(&mut r, q, 2.0);
        if terms > 2 {
            let mut power = mul(q, q, b);
            add_scaled(&mut r, &power, 2.0);
            for _ in 3..terms - 1 {
                power = mul(&power, q, b);
                add_scaled(&mut r, &power, 2.0);
            }
            power = mul(&power, q, b);
            add_scaled(&mut r, &power, 1.0);
        }
    }
    r
}

fn identity_f64(n: usize) -> Vec<f64> {
    let mut m = vec![0.0; n * n];
    (0..n).for_each(|i| m[i * n + i] = 1.0);
    m
}

fn add_scaled(acc: &mut [f64], m: &[f64], alpha: f64) {
    acc.iter_mut().zip(m).for_each(|(a, v)| *a += alpha * v);
}

fn mul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * n];
    for i in 0..n {
        for k in 0..n {
            let aik = a[i * n + k];
            for j in 0..n {
                out[i * n + j] += aik * b[k * n + j];
            }
        }
    }
    out
}

/// Solves `A·X = B` (`A` n×n, `B` n×n) by LU with partial pivoting; `None` if `A` is singular.
fn solve(mut a: Vec<f64>, mut x: Vec<f64>, n: usize) -> Option<Vec<f64>> {
    for col in 0..n {
        let pivot =
            (col..n).max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs()))?;
        let p = a[pivot * n + col];
        if p == 0.0 || !p.is_finite() {
            return None;
        }
        if pivot != col {
            for j in 0..n {
                a.swap(col * n + j, pivot * n + j);
                x.swap(col * n + j, pivot * n + j);
            }
        }
        for row in col + 1..n {
            let f = a[row * n + col] / p;
            if f == 0.0 {
                continue;
            }
            for j in col..n {
                a[row * n + j] -= f * a[col * n + j];
            }
            for j in 0..n {
                x[row * n + j] -= f * x[col * n + j];
            }
        }
    }
    for col in (0..n).rev() {
        let p = a[col * n + col];
        for j in 0..n {
            let s: f64 = (col + 1..n).map(|k| a[col * n + k] * x[k * n + j]).sum();
            x[col * n + j] = (x[col * n + j] - s) / p;
        }
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

fn to_matrix(m: &[f64], n: usize) -> Matrix {
    Matrix {
        rows: n,
        cols: n,
        data: m.iter().map(|v| *v as f32).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_from_len_inverts_the_triangle() {
        for b in 1..200usize {
            assert_eq!(block_size_from_len(b * (b - 1) / 2).unwrap(), b);
        }
        assert!(block_size_from_len(2).is_err());
        assert!(block_size_from_len(usize::MAX).is_err());
    }

    #[test]
    fn solve_inverts() {
        let a = vec![0.0, 2.0, 1.0, 1.0];
        let x = solve(a.clone(), identity_f64(2), 2).unwrap();
        let prod = mul(&a, &x, 2);
        for (p, i) in prod.iter().zip(identity_f64(2)) {
            assert!((p - i).abs() < 1e-15);
        }
        assert!(solve(vec![1.0, 2.0, 2.0, 4.0], identity_f64(2), 2).is_none());
    }
}
