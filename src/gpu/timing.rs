//! GPU time of a recorded workload from timestamp queries at compute-pass boundaries.

use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::gpu::buffers::{create_buffer, read_buffer};

/// Runs `record` inside one timestamped compute pass, `repeats` times in separate submissions,
/// and returns the GPU time of each run in microseconds.
pub fn time_pass(
    ctx: &GpuContext,
    repeats: usize,
    record: impl Fn(&mut wgpu::ComputePass<'_>),
) -> Result<Vec<f64>> {
    if !ctx.has_timestamps() {
        return Err(Error::Unsupported(
            "GPU timing needs TIMESTAMP_QUERY".into(),
        ));
    }
    let queries = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
        label: Some("timing"),
        ty: wgpu::QueryType::Timestamp,
        count: 2,
    });
    let resolve = create_buffer(
        ctx,
        &wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size: 16,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        },
    )?;
    let period = ctx.queue.get_timestamp_period() as f64;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        ctx.run(|enc| {
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("timed"),
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: &queries,
                        beginning_of_pass_write_index: Some(0),
                        end_of_pass_write_index: Some(1),
                    }),
                });
                record(&mut pass);
            }
            enc.resolve_query_set(&queries, 0..2, &resolve, 0);
        })?;
        let bytes = read_buffer(ctx, &resolve, 16)?;
        let t: Vec<u64> = bytemuck::pod_collect_to_vec(&bytes);
        times.push(t[1].saturating_sub(t[0]) as f64 * period / 1000.0);
    }
    Ok(times)
}

/// How often a measurement repeats: `warmup` trials are run and dropped, then `trials` are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trials {
    /// Trials run first and dropped (pipeline compilation, clocks ramping up).
    pub warmup: usize,
    /// Trials kept; at least 1.
    pub trials: usize,
}

/// GPU time of one run in microseconds: `runs` runs recorded back to back in one compute pass
/// (`record_run(pass, i)` records run `i`), timestamps at the pass's beginning and end, the total
/// divided by `runs`, the median over the kept trials. Back-to-back runs hide the submission cost
/// and leave the launch cost in, as a model's sequence of layers would.
pub fn time_runs(
    ctx: &GpuContext,
    runs: usize,
    trials: Trials,
    record_run: impl Fn(&mut wgpu::ComputePass<'_>, usize),
) -> Result<f64> {
    if runs == 0 || trials.trials == 0 {
        return Err(Error::config(format!(
            "timing needs at least one run and one trial, got {runs} runs and {} trials",
            trials.trials
        )));
    }
    let record = |pass: &mut wgpu::ComputePass<'_>| (0..runs).for_each(|i| record_run(pass, i));
    if trials.warmup > 0 {
        time_pass(ctx, trials.warmup, record)?;
    }
    Ok(median(&time_pass(ctx, trials.trials, record)?) / runs as f64)
}

/// How a rotation over data copies is timed (see [`time_rotation`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rotation {
    /// Each trial records whole rotations until it lasts about this long (GPU microseconds).
    pub trial_us: f64,
    /// The most runs one trial records, unless one rotation is longer.
    pub max_runs: usize,
    /// Trials run and dropped, the sizing rotation being the first, then trials kept.
    pub trials: Trials,
}

/// GPU time of one run in microseconds, and the runs each trial recorded, where consecutive runs
/// use consecutive copies of the data (`record_run(pass, i)` records run `i` on copy
/// `i % copies`), so no run reads what the previous one left in a cache. The first warm-up trial
/// is one rotation over every copy, which also sizes the others (see [`Rotation`]); the rest is
/// [`time_runs`].
pub fn time_rotation(
    ctx: &GpuContext,
    copies: usize,
    rotation: Rotation,
    record_run: impl Fn(&mut wgpu::ComputePass<'_>, usize),
) -> Result<(f64, usize)> {
    let once = Trials {
        warmup: 0,
        trials: 1,
    };
    let estimate = time_runs(ctx, copies, once, &record_run)?.max(1e-3);
    let runs = ((rotation.trial_us / estimate).ceil() as usize)
        .min(rotation.max_runs)
        .next_multiple_of(copies)
        .max(copies);
    let trials = Trials {
        warmup: rotation.trials.warmup.saturating_sub(1),
        trials: rotation.trials.trials,
    };
    Ok((time_runs(ctx, runs, trials, record_run)?, runs))
}

/// The median of a non-empty sample.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
