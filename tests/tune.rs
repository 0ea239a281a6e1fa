//! The autotuner on the adapter at hand: every candidate checked against the CPU, the winner
//! cached in a file, and that file steering the next context's plans.

mod common;

use common::{gpu, random_matrix};
use quantadapt::formats::QuantFormat;
use quantadapt::formats::QuantWeight;
use quantadapt::formats::hqq::{HqqConfig, HqqWeight};
use quantadapt::gpu::{ActDtype, GpuContext, GpuTensor};
use quantadapt::kernels::MatmulPath;
use quantadapt::kernels::fused::Fused;
use quantadapt::kernels::quant::GpuQuantWeight;
use quantadapt::tensor::max_rel_error;
use quantadapt::tune::{DeviceKey, TuneCache, TuneEntry, tune_gemv};

fn hqq4(out: usize, inp: usize) -> QuantWeight {
    let mut config = HqqConfig::new(4, 64, 1);
    config.optimize = false;
    let w = random_matrix(out, inp, 0.05);
    QuantWeight::Hqq(
        HqqWeight::quantize(&w, Some(random_matrix(1, out, 0.1).data), &config).unwrap(),
    )
}

#[test]
fn every_candidate_is_checked_and_the_winner_is_the_fastest_that_passed() {
    let ctx = gpu();
    let reference = hqq4(96, 1088);
    let weight = GpuQuantWeight::upload(ctx, &reference).unwrap();
    let mut cache = TuneCache::default();
    let report = tune_gemv(ctx, &[weight], &reference, 3, ActDtype::F32, &mut cache).unwrap();
    assert!(!report.candidates.is_empty());
    for c in &report.candidates {
        assert!(
            c.max_rel_error <= 1e-4 && c.micros.is_some(),
            "{:?}: error {:.2e}",
            c.variant,
            c.max_rel_error
        );
    }
    let best = report
        .candidates
        .iter()
        .filter_map(|c| c.micros)
        .fold(f64::INFINITY, f64::min);
    assert_eq!(report.micros(report.winner), Some(best));
    assert_eq!(cache.entries().len(), 1);
    assert_eq!(
        cache.lookup(&DeviceKey::of(ctx), &report.gemv),
        Some(report.winner)
    );
}

#[test]
fn the_next_context_plans_with_the_cached_variant() {
    let ctx = gpu();
    let reference = hqq4(64, 512);
    let weight = GpuQuantWeight::upload(ctx, &reference).unwrap();
    let fused = Fused::default();
    let candidates = weight.gemv_candidates(ctx, 2, &fused);
    let default = weight.gemv_default(ctx, 2, &fused);
    // A candidate the heuristic would not pick, so the cache visibly decides.
    let pick = candidates
        .iter()
        .copied()
        .find(|v| *v != default)
        .expect("more than one GEMV candidate");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tune.json");
    let mut cache = TuneCache::default();
    cache.insert(TuneEntry {
        device: DeviceKey::of(ctx),
        gemv: weight.gemv_key(ActDtype::F32, 2),
        variant: pick,
        micros: 1.0,
    });
    cache.save(&path).unwrap();

    let next = GpuContext::new().unwrap();
    next.set_debug_poison(true);
    let weight = GpuQuantWeight::upload(&next, &reference).unwrap();
    assert_eq!(weight.gemv_choice(&next, 2, ActDtype::F32, &fused), default);
    next.set_tuning(TuneCache::load(&path).unwrap());
    assert_eq!(weight.gemv_choice(&next, 2, ActDtype::F32, &fused), pick);
    // Another row specialization has no entry and keeps the default.
    assert_eq!(
        weight.gemv_choice(&next, 16, ActDtype::F32, &fused),
        weight.gemv_default(&next, 16, &fused)
    );

    let x = random_matrix(2, 512, 1.0);
    let y = weight
        .forward_with(
            &next,
            &GpuTensor::upload(&next, &x, ActDtype::F32).unwrap(),
            MatmulPath::Gemv,
        )
        .unwrap()
        .download(&next)
        .unwrap();
    let expected = reference.forward_cpu(&x).unwrap();
    assert!(max_rel_error(&y.data, &expected.data) <= 1e-4);
}

#[test]
fn a_cached_variant_that_is_no_longer_a_candidate_is_ignored() {
    let ctx = GpuContext::new().unwrap();
    let reference = hqq4(64, 256);
    let weight = GpuQuantWeight::upload(&ctx, &reference).unwrap();
    let fused = Fused::default();
    let mut stale = weight.gemv_default(&ctx, 1, &fused);
    stale.workgroup_size = 3;
    let mut cache = TuneCache::default();
    cache.insert(TuneEntry {
        device: DeviceKey::of(&ctx),
        gemv: weight.gemv_key(ActDtype::F32, 1),
        variant: stale,
        micros: 1.0,
    });
    ctx.set_tuning(cache);
    assert_eq!(
        weight.gemv_choice(&ctx, 1, ActDtype::F32, &fused),
        weight.gemv_default(&ctx, 1, &fused)
    );
}
