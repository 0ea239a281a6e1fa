//! The golden vectors through the same runner as `quantadapt verify-golden`, on the CPU and the
//! GPU: every case passes on both.

mod common;

use common::{golden_dir, gpu};
use quantadapt::golden::{self, Backend};

#[test]
fn every_golden_case_passes_on_cpu_and_gpu() {
    let cases = golden::read_manifest(&golden_dir()).unwrap();
    assert!(cases.len() >= 140);
    let outcomes = golden::run(&golden_dir(), &[Backend::Cpu, Backend::Gpu], Some(gpu())).unwrap();
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
