//! Timing over rotated copies: each item's data exists in several copies and consecutive runs
//! use consecutive copies, so no run finds its weights in a cache the previous run warmed.

use std::time::Instant;

use crate::bench::plan::Plan;
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::gpu::timing::{Trials, median, time_runs};
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
    let record = |pass: &mut wgpu::ComputePass<'_>, run: usize| {
        copies[run % copies.len()]
            .iter()
            .for_each(|d| d.record(pass));
    };
    let rotation = Trials {
        warmup: 0,
        trials: 1,
    };
    let estimate = time_runs(ctx, copies.len(), rotation, record)?.max(1e-3);
    let wanted = (plan.trial_us / estimate).ceil() as usize;
    let runs = wanted
        .min(plan.max_runs)
        .next_multiple_of(copies.len())
        .max(copies.len());
    let trials = Trials {
        warmup: plan.trials.warmup.saturating_sub(1),
        trials: plan.trials.trials,
    };
    Ok(Timed {
        us: time_runs(ctx, runs, trials, record)?,
        copies: copies.len(),
        runs_per_trial: runs,
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
