//! Timing over rotated copies: each item's data exists in several copies and consecutive runs
//! use consecutive copies, so no run finds its weights in a cache the previous run warmed.

use std::time::Instant;

use crate::bench::plan::Plan;
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::gpu::timing::{Rotation, median, time_rotation};
use crate::kernels::Dispatch;

/// One timed item: GPU microseconds per run and how it was measured.
#[derive(Clone, Copy, Debug)]
pub struct Timed {
    pub us: f64,
    pub copies: usize,
    pub runs_per_trial: usize,
}

/// GPU time of one run, where `copies[c]` holds the launches of a run on copy `c`. The first
/// warm-up trial is one rotation over every copy, which also sizes the other trials to
/// `plan.trial_us` (a whole number of rotations, at most `plan.max_runs` runs unless one
/// rotation is longer).
pub fn time_rotated(ctx: &GpuContext, plan: &Plan, copies: &[Vec<Dispatch>]) -> Result<Timed> {
    if copies.is_empty() || copies.iter().any(Vec::is_empty) {
        return Err(Error::config(
            "a timed item needs at least one copy of its launches",
        ));
    }
    let rotation = Rotation {
        trial_us: plan.trial_us,
        max_runs: plan.max_runs,
        trials: plan.trials,
    };
    let (us, runs_per_trial) = time_rotation(ctx, copies.len(), rotation, |pass, run| {
        copies[run % copies.len()]
            .iter()
            .for_each(|d| d.record(pass));
    })?;
    Ok(Timed {
        us,
        copies: copies.len(),
        runs_per_trial,
    })
}

/// Wall-clock microseconds of `run`, median of `trials` after one dropped warm-up call.
pub fn wall_clock(trials: usize, mut run: impl FnMut() -> Result<()>) -> Result<f64> {
    run()?;
    let mut times = Vec::with_capacity(trials);
    for _ in 0..trials.max(1) {
        let start = Instant::now();
        run()?;
        times.push(start.elapsed().as_secs_f64() * 1e6);
    }
    Ok(median(&times))
}

/// Kernel launches a run records.
pub fn launches(run: &[Dispatch]) -> usize {
    run.iter().map(Dispatch::launches).sum()
}

/// `count` copies of what `build` makes.
pub fn build_copies<T>(count: usize, mut build: impl FnMut() -> Result<T>) -> Result<Vec<T>> {
    (0..count).map(|_| build()).collect()
}
