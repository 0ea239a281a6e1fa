//! The golden vectors through the same runner as `quantadapt verify-golden`, on the CPU and the
//! GPU. Kinds whose pieces are implemented must pass; the others must fail naming what is missing.

mod common;

use common::{golden_dir, gpu};
use quantadapt::golden::{self, Backend};

const IMPLEMENTED: &[&str] = &["hqq_quant", "hqq_f16", "oft_gptq", "oft_eetq"];

#[test]
fn golden_cases_pass_on_cpu_and_gpu() {
    let cases = golden::read_manifest(&golden_dir()).unwrap();
    let outcomes = golden::run(&golden_dir(), &[Backend::Cpu, Backend::Gpu], Some(gpu())).unwrap();
    assert_eq!(outcomes.len(), 2 * cases.len());
    let mut failures = Vec::new();
    for (o, case) in outcomes.iter().zip(cases.iter().flat_map(|c| [c, c])) {
        let kind = case["kind"].as_str().unwrap();
        match (&o.result, IMPLEMENTED.contains(&kind)) {
            (Err(reason), true) => failures.push(format!("{} [{}]: {reason}", o.case, o.backend)),
            (Err(reason), false) => {
                assert!(reason.contains("not implemented"), "{}: {reason}", o.case)
            }
            (Ok(()), false) => panic!("{}: kind {kind} passes; add it to IMPLEMENTED", o.case),
            (Ok(()), true) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
