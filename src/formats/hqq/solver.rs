//! HQQ's half-quadratic proximal solver for the zero point (`optimize_weights_proximal_legacy`,
//! the default of hqq 0.2.8): the scale stays fixed; each iteration re-rounds the codes, shrinks the
//! residual with a generalised soft threshold and updates the zero in closed form.

use super::Grouping;

/// The solver's parameters, HQQ's defaults in [`Default`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SolverParams {
    /// Exponent `p` of the lp norm the shrinkage minimises (HQQ default 0.7).
    pub lp_norm: f32,
    /// Penalty weight of the half-quadratic split (HQQ default 10).
    pub beta: f32,
    /// Growth of beta per improving iteration. hqq 0.2.8 ignores it (beta stays constant); the
    /// dropbox/hqq fork multiplies beta by kappa. `grow_beta` picks the behaviour.
    pub kappa: f32,
    /// Multiply `beta` by `kappa` after each improving iteration (off in hqq 0.2.8).
    pub grow_beta: bool,
    /// Maximum iterations; the solver stops earlier once the error stops falling.
    pub iters: usize,
}

impl Default for SolverParams {
    fn default() -> Self {
        Self {
            lp_norm: 0.7,
            beta: 10.0,
            kappa: 1.01,
            grow_beta: false,
            iters: 20,
        }
    }
}

/// `sign(x) * max(|x| - |x + 1e-8|^(p-1) / beta, 0)`.
pub fn shrink(x: f32, beta: f32, p: f32) -> f32 {
    let threshold = if p == 1.0 {
        1.0 / beta
    } else {
        (1.0 / beta) * (x.abs() + 1e-8).powf(p - 1.0)
    };
    x.signum() * (x.abs() - threshold).max(0.0)
}

/// Round half to even, as `torch.round`.
pub fn round_even(v: f32) -> f32 {
    v.round_ties_even()
}

/// Refines `zero` (one per group) for weights `w` (flat), with fixed inverse scales `inv_scale`.
/// Returns the updated zeros; the caller re-rounds the codes from `w`.
pub fn optimize_zero(
    w: &[f32],
    grouping: &Grouping,
    inv_scale: &[f32],
    mut zero: Vec<f32>,
    max_code: f32,
    params: &SolverParams,
) -> Vec<f32> {
    let groups = zero.len();
    let mut beta = params.beta;
    let mut best_error = 1e4f64;
    let mut sums = vec![0f64; groups];
    for _ in 0..params.iters {
        sums.iter_mut().for_each(|s| *s = 0.0);
        let mut abs_error = 0f64;
        for (f, wf) in w.iter().enumerate() {
            let g = grouping.group_of(f);
            let (s, z) = (inv_scale[g], zero[g]);
            let q = round_even(wf * s + z).clamp(0.0, max_code);
            let wr = (q - z) / s;
            let we = shrink(wf - wr, beta, params.lp_norm);
            sums[g] += (q - (wf - we) * s) as f64;
            abs_error += (wf - wr).abs() as f64;
        }
        let per_group = grouping.group_size as f64;
        for (z, s) in zero.iter_mut().zip(&sums) {
            *z = (*s / per_group) as f32;
        }
        let error = abs_error / w.len() as f64;
        if error < best_error {
            best_error = error;
            if params.grow_beta {
                beta *= params.kappa;
            }
        } else {
            break;
        }
    }
    zero
}
