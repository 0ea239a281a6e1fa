//! The golden vectors through the same runner as `quantadapt verify-golden`, on the CPU and the
//! GPU: every case passes on both.

mod common;

use common::{golden_dir, golden_model_dir, gpu};
use quantadapt::golden::{self, GoldenBackend};

#[test]
fn every_golden_case_passes_on_cpu_and_gpu() {
    let cases = golden::read_manifest(&golden_dir()).unwrap();
    assert!(cases.len() >= 140);
    let outcomes = golden::run(
        &golden_dir(),
        &[GoldenBackend::Cpu, GoldenBackend::Gpu],
        Some(gpu()),
    )
    .unwrap();
    assert_eq!(outcomes.len(), 2 * cases.len());
    let failures: Vec<String> = outcomes
        .iter()
        .filter_map(|o| {
            o.result
                .as_ref()
                .err()
                .map(|r| format!("{} [{}]: {r}", o.case, o.backend))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The whole-model cases (tests/data/golden-model) on one backend: one outcome per run, merges
/// included, every one passing.
fn model_runs_pass(backend: GoldenBackend) {
    let gpu = (backend == GoldenBackend::Gpu).then(gpu);
    let outcomes = golden::run(&golden_model_dir(), &[backend], gpu).unwrap();
    // Two models: a `targets` check and every run of each (10 and 8 runs).
    assert_eq!(outcomes.len(), 20, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .any(|o| o.case == "llama_hqq4_g64/merge_oft")
    );
    let failures: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().err().map(|r| format!("{}: {r}", o.case)))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_model_run_passes_on_cpu() {
    model_runs_pass(GoldenBackend::Cpu);
}

#[test]
fn every_model_run_passes_on_gpu() {
    model_runs_pass(GoldenBackend::Gpu);
}
