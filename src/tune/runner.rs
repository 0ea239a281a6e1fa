//! Checks and times every GEMV candidate of one weight on the device at hand.

use crate::error::{Error, Result};
use crate::formats::{QuantFormat, QuantWeight};
use crate::gpu::timing::{Rotation, Trials, time_rotation};
use crate::gpu::{ActDtype, GpuContext, GpuTensor};
use crate::kernels::Dispatch;
use crate::kernels::fused::Fused;
use crate::kernels::gemv::GemvVariant;
use crate::kernels::quant::GpuQuantWeight;
use crate::tensor::{Matrix, max_rel_error};
use crate::tune::{DeviceKey, GemvKey, TuneCache, TuneEntry};

/// The golden README's GPU tolerance for forward outputs (max |ours - ref| / max |ref|) with
/// f32 activations; a candidate outside it may not win.
const F32_TOLERANCE: f64 = 1e-4;
/// The same with f16 activations.
const F16_TOLERANCE: f64 = 5e-3;
/// Trials of about 2 ms of GPU time (at most 256 runs); after the sizing rotation, one more
/// warm-up trial, then the median of 5.
const ROTATION: Rotation = Rotation {
    trial_us: 2000.0,
    max_runs: 256,
    trials: Trials {
        warmup: 2,
        trials: 5,
    },
};

/// How one candidate fared.
#[derive(Clone, Debug)]
pub struct CandidateResult {
    /// The variant.
    pub variant: GemvVariant,
    /// Its error against the CPU reference (max |gpu - cpu| / max |cpu|).
    pub max_rel_error: f64,
    /// GPU microseconds per launch; `None` where it failed the check and was not timed.
    pub micros: Option<f64>,
}

/// The outcome of tuning one kernel.
#[derive(Clone, Debug)]
pub struct TuneReport {
    /// The kernel tuned.
    pub gemv: GemvKey,
    /// What the heuristic would run without a cache.
    pub default: GemvVariant,
    /// The fastest variant that passed the check.
    pub winner: GemvVariant,
    /// Every candidate, in the order tried.
    pub candidates: Vec<CandidateResult>,
}

impl TuneReport {
    /// GPU microseconds of `variant`, if it was timed.
    pub fn micros(&self, variant: GemvVariant) -> Option<f64> {
        self.candidates
            .iter()
            .find(|c| c.variant == variant)
            .and_then(|c| c.micros)
    }
}

/// Tunes the GEMV of `copies` (uploads of `reference`, all alike: consecutive timed runs use
/// consecutive copies so the weight is not read from a cache the previous run warmed) for
/// `rows` rows of x at `act` activations, and records the winner in `cache`.
///
/// Every candidate first runs once on fresh random x and is compared with `reference`'s CPU
/// forward at the golden README's GPU tolerance (1e-4 of max |y| with f32 activations, 5e-3
/// with f16); only those within it are timed, with timestamp queries. Fails with
/// [`Error::Unsupported`] without timestamp queries, and when no candidate passes.
pub fn tune_gemv(
    ctx: &GpuContext,
    copies: &[GpuQuantWeight],
    reference: &QuantWeight,
    rows: usize,
    act: ActDtype,
    cache: &mut TuneCache,
) -> Result<TuneReport> {
    let weight = copies
        .first()
        .ok_or_else(|| Error::config("tuning needs at least one copy of the weight"))?;
    let shape = (reference.out_features(), reference.in_features());
    if copies
        .iter()
        .any(|c| (c.out_features, c.in_features) != shape)
    {
        return Err(Error::config(
            "every copy to tune must have the reference's shape",
        ));
    }
    if !ctx.has_timestamps() {
        return Err(Error::Unsupported(format!(
            "tuning times kernels with timestamp queries, which {} lacks",
            ctx.info.name
        )));
    }
    let fused = Fused::default();
    let mut x = Matrix::random(rows, shape.1, 1.0);
    if act == ActDtype::F16 {
        x.round_to_f16();
    }
    let expected = reference.forward_cpu(&x)?;
    let tolerance = match act {
        ActDtype::F32 => F32_TOLERANCE,
        ActDtype::F16 => F16_TOLERANCE,
    };
    let x_gpu = GpuTensor::upload(ctx, &x, act)?;
    let outputs = copies
        .iter()
        .map(|_| GpuTensor::output(ctx, rows, shape.0, act))
        .collect::<Result<Vec<_>>>()?;

    let mut candidates = Vec::new();
    for variant in weight.gemv_candidates(ctx, rows, &fused) {
        let launches = copies
            .iter()
            .zip(&outputs)
            .map(|(w, y)| w.prepare_gemv(ctx, &x_gpu, y, variant, &fused))
            .collect::<Result<Vec<Dispatch>>>()?;
        Dispatch::submit_all(ctx, &[&launches[0]])?;
        let got = outputs[0].download(ctx)?;
        let error = max_rel_error(&got.data, &expected.data);
        let micros = if error <= tolerance {
            Some(time_launches(ctx, &launches)?)
        } else {
            None
        };
        candidates.push(CandidateResult {
            variant,
            max_rel_error: error,
            micros,
        });
    }
    let (winner, micros) = candidates
        .iter()
        .filter_map(|c| c.micros.map(|us| (c.variant, us)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "no GEMV candidate of a {}x{} {} weight matched the CPU reference on {}",
                shape.0,
                shape.1,
                reference.format_name(),
                ctx.info.name
            ))
        })?;
    let gemv = weight.gemv_key(act, rows);
    cache.insert(TuneEntry {
        device: DeviceKey::of(ctx),
        gemv: gemv.clone(),
        variant: winner,
        micros,
    });
    Ok(TuneReport {
        gemv,
        default: weight.gemv_default(ctx, rows, &fused),
        winner,
        candidates,
    })
}

/// GPU microseconds per launch, rotating over `launches` (one per weight copy).
fn time_launches(ctx: &GpuContext, launches: &[Dispatch]) -> Result<f64> {
    let (us, _) = time_rotation(ctx, launches.len(), ROTATION, |pass, run| {
        launches[run % launches.len()].record(pass);
    })?;
    Ok(us)
}
